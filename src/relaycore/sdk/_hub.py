"""Hubs: the classes app authors write, and the proxies they send through.

A ``Hub`` subclass's public ``async def`` methods are its hub methods. A hub instance is made for
each invocation (and for ``on_connected``/``on_disconnected``), as ASP.NET Core does, with
``context``, ``clients`` and ``groups`` set; state that must outlive one call belongs in
``context.items``.

Every proxy turns ``send(method, *args)`` into one service message (service-protocol §7) and
hands it to its ``HubSender``: the hub's dispatcher, which serialises the invocation once per hub
protocol and writes it on one server connection of every online endpoint. This module imports
nothing else of the SDK: what it needs of the layers above is declared here as protocols
(``HubSender``, ``CallerConnection``).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import ipaddress
import re
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Protocol, TypeVar, overload

from relaycore.protocol import (
    BroadcastDataMessage,
    CheckUserInGroupWithAckMessage,
    GroupBroadcastDataMessage,
    JoinGroupWithAckMessage,
    LeaveGroupWithAckMessage,
    MultiConnectionDataMessage,
    MultiGroupBroadcastDataMessage,
    MultiUserDataMessage,
    ServiceMessage,
    UserDataMessage,
    UserJoinGroupWithAckMessage,
    UserLeaveGroupWithAckMessage,
    header_for,
    is_valid_group_name,
)

__all__ = [
    # What app authors use (``relaycore.sdk`` exports it).
    "Hub",
    "hub_method",
    "HubCallerContext",
    "HubCallerClients",
    "HubClients",
    "ClientProxy",
    "SingleClientProxy",
    "GroupManager",
    "UserGroupManager",
    "HubContext",
    # What the rest of the SDK builds on.
    "ALL",
    "BROADCAST",
    "CONNECTIONS",
    "GROUPS",
    "ROLE_CLAIM_TYPES",
    "USERS",
    "USER_GROUP",
    "CallerConnection",
    "HubMethod",
    "HubMethodTable",
    "HubSender",
    "Recipients",
    "Route",
    "check_method",
    "checked_group",
    "checked_id",
    "checked_ids",
]

_F = TypeVar("_F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Route:
    """Who a message is for, as the endpoint router sees it (internal): ``kind`` is one of
    the constants below and ``keys`` the user ids, groups or connection ids; for
    ``USER_GROUP``, ``(user_id, group)`` or ``(user_id,)`` for every group."""

    kind: str
    keys: tuple[str, ...] = ()


#: Route kinds: ``EndpointRouter.get_endpoints_for_broadcast``, ``_for_user`` (one call per
#: user), ``_for_group`` (per group), ``_for_connection`` (per connection), and the
#: intersection of the user's and the group's endpoints for a user's group membership.
ALL: Final = "all"
USERS: Final = "users"
GROUPS: Final = "groups"
CONNECTIONS: Final = "connections"
USER_GROUP: Final = "user_group"

#: Every client of the hub.
BROADCAST: Final = Route(ALL)

#: The claim types whose values are a connection's roles, unless its token names another
#: (``asrs.s.rt``): .NET's default role claim type, and the JWT name ``role``, under which the
#: relay passes a token's roles on.
ROLE_CLAIM_TYPES: Final = ("role", "http://schemas.microsoft.com/ws/2008/06/identity/claims/role")


@dataclass(frozen=True)
class Recipients:
    """The clients a proxy sends to (internal): ``build`` makes the service message (§7) that
    carries a payload map; ``route`` is what the endpoint router chooses endpoints for;
    ``connection_id`` names the one client of ``clients.client(id)``, which a send may reach
    on the server connection that owns it."""

    build: Callable[[dict[str, bytes]], ServiceMessage]
    route: Route = BROADCAST
    connection_id: str | None = None


class HubSender(Protocol):
    """What proxies and group managers send through: a mapped hub's ``HubDispatcher`` in an
    app server, a hub context's calls in the management SDK."""

    async def send(self, to: Recipients, method: str, args: tuple[Any, ...]) -> None:
        """Invoke ``method`` with ``args`` on the clients ``to`` names."""
        ...

    async def request_ack(self, build: Callable[[int], ServiceMessage], route: Route) -> bool:
        """Send ``build(ack_id)`` (a ``...WithAck`` message) to the endpoints chosen for
        ``route`` and wait for their Acks; True if any says Ok. A request about one connection
        (``route`` of kind ``CONNECTIONS``) succeeds when the endpoint holding it says Ok."""
        ...

    async def invoke_client(
        self, connection_id: str, method: str, args: tuple[Any, ...], timeout: float | None
    ) -> Any:
        """Invoke ``method`` on one client and return its result (§2.5)."""
        ...


# --------------------------------------------------------------------------------------------
# Checking what app code passes


def check_method(method: str) -> None:
    """Raise ``ValueError`` unless ``method`` (a client method's name) is a non-empty string."""
    if not isinstance(method, str) or not method:
        raise ValueError(f"method must be a non-empty string, got {method!r}")


def checked_ids(values: Iterable[str], what: str) -> tuple[str, ...]:
    """``values`` (connection or user ids, named ``what`` in errors) as a tuple; ``TypeError``
    for one string in the place of a list, ``ValueError`` for an empty or non-string id."""
    if isinstance(values, str):
        raise TypeError(f"{what} must be a list of strings, not one string {values!r}")
    result = tuple(values)
    for value in result:
        if not isinstance(value, str) or not value:
            raise ValueError(f"{what} must hold non-empty strings, got {value!r}")
    return result


def checked_id(value: str, what: str) -> str:
    """One id, checked as ``checked_ids`` checks each."""
    (value,) = checked_ids([value], what)
    return value


def checked_group(name: str) -> str:
    """``name`` if it is a valid group name (1-1024 characters, not only white space), else
    ``ValueError``."""
    if not isinstance(name, str) or not is_valid_group_name(name):
        raise ValueError(
            f"group name {name!r} is invalid; expected 1-1024 characters, not only whitespace"
        )
    return name


# --------------------------------------------------------------------------------------------
# Proxies


class ClientProxy:
    """A set of clients chosen through ``clients``; ``await proxy.send(method, *args)`` invokes
    ``method`` on each of them (a non-blocking SignalR invocation: no result comes back)."""

    __slots__ = ("_sender", "recipients")

    def __init__(self, sender: HubSender, recipients: Recipients) -> None:
        self._sender = sender
        #: Who they are (the management SDK's reported sends read it).
        self.recipients = recipients

    async def send(self, method: str, *args: Any) -> None:
        """Invoke the client method ``method`` with ``args`` on every client of this set.

        Returns once the message is written to the service; raises
        ``ServiceUnavailableError`` when no endpoint is online.
        """
        check_method(method)
        await self._sender.send(self.recipients, method, args)


class SingleClientProxy(ClientProxy):
    """One client connection: ``send``, and ``invoke`` for a client result."""

    __slots__ = ()

    async def invoke(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        """Invoke ``method`` on the client and return the value its handler returned.

        Uses ClientInvocation (service-protocol §2.5). Raises ``HubException`` with the
        client's error text when the handler failed or is missing, or when the client went
        away; ``TimeoutError`` after ``timeout`` seconds (``None``: wait until the client
        answers or leaves)::

            answer = await self.clients.caller.invoke("confirm", "Delete everything?", timeout=30)
        """
        check_method(method)
        connection_id = self.recipients.connection_id
        assert connection_id is not None
        return await self._sender.invoke_client(connection_id, method, args, timeout)


class HubClients:
    """Chooses clients of one hub: everyone, connections, users or groups. Each choice is a
    proxy whose ``send`` delivers to every matching client, on whichever pod or relay node it
    is connected."""

    __slots__ = ("_sender",)

    def __init__(self, sender: HubSender) -> None:
        self._sender = sender

    def _proxy(self, recipients: Recipients) -> ClientProxy:
        return ClientProxy(self._sender, recipients)

    @property
    def all(self) -> ClientProxy:
        """Every client of the hub (BroadcastData)."""
        return self._proxy(Recipients(lambda p: BroadcastDataMessage(p)))

    def all_except(self, excluded_connection_ids: Iterable[str]) -> ClientProxy:
        """Every client but the listed connections (BroadcastData with an excluded list)."""
        excluded = checked_ids(excluded_connection_ids, "excluded_connection_ids")
        return self._proxy(Recipients(lambda p: BroadcastDataMessage(p, excluded)))

    def client(self, connection_id: str) -> SingleClientProxy:
        """One connection (MultiConnectionData); also offers ``invoke`` for a client result."""
        connection_id = checked_id(connection_id, "connection_id")
        recipients = Recipients(
            lambda p: MultiConnectionDataMessage((connection_id,), p),
            Route(CONNECTIONS, (connection_id,)),
            connection_id,
        )
        return SingleClientProxy(self._sender, recipients)

    def clients(self, connection_ids: Iterable[str]) -> ClientProxy:
        """The listed connections (MultiConnectionData)."""
        ids = checked_ids(connection_ids, "connection_ids")
        return self._proxy(
            Recipients(lambda p: MultiConnectionDataMessage(ids, p), Route(CONNECTIONS, ids))
        )

    def user(self, user_id: str) -> ClientProxy:
        """Every connection of one user (UserData)."""
        user_id = checked_id(user_id, "user_id")
        return self._proxy(
            Recipients(lambda p: UserDataMessage(user_id, p), Route(USERS, (user_id,)))
        )

    def users(self, user_ids: Iterable[str]) -> ClientProxy:
        """Every connection of the listed users (MultiUserData)."""
        ids = checked_ids(user_ids, "user_ids")
        return self._proxy(Recipients(lambda p: MultiUserDataMessage(ids, p), Route(USERS, ids)))

    def group(self, group_name: str) -> ClientProxy:
        """Every connection in a group (GroupBroadcastData)."""
        return self.group_except(group_name, ())

    def groups(self, group_names: Iterable[str]) -> ClientProxy:
        """Every connection in any of the groups, once each (MultiGroupBroadcastData)."""
        names = tuple(checked_group(n) for n in checked_ids(group_names, "group_names"))
        return self._proxy(
            Recipients(lambda p: MultiGroupBroadcastDataMessage(names, p), Route(GROUPS, names))
        )

    def group_except(self, group_name: str, excluded_connection_ids: Iterable[str]) -> ClientProxy:
        """Every connection in a group but the listed ones (GroupBroadcastData)."""
        name = checked_group(group_name)
        excluded = checked_ids(excluded_connection_ids, "excluded_connection_ids")
        return self._proxy(
            Recipients(
                lambda p: GroupBroadcastDataMessage(name, p, excluded), Route(GROUPS, (name,))
            )
        )


class HubCallerClients(HubClients):
    """``HubClients`` seen from a hub method, plus the choices relative to the caller."""

    __slots__ = ("_caller", "_caller_proxy")

    def __init__(self, sender: HubSender, caller_connection_id: str) -> None:
        super().__init__(sender)
        self._caller = caller_connection_id
        self._caller_proxy: SingleClientProxy | None = None

    @property
    def caller(self) -> SingleClientProxy:
        """The connection that invoked the hub method."""
        # Made once: a proxy holds nothing that changes, and the caller is sent to often.
        proxy = self._caller_proxy
        if proxy is None:
            proxy = self._caller_proxy = self.client(self._caller)
        return proxy

    @property
    def others(self) -> ClientProxy:
        """Every client but the caller."""
        return self.all_except([self._caller])

    def others_in_group(self, group_name: str) -> ClientProxy:
        """Every connection in the group but the caller."""
        return self.group_except(group_name, [self._caller])


class GroupManager:
    """Adds connections to groups and removes them (JoinGroupWithAck / LeaveGroupWithAck).

    Each call waits for the service's Ack (``ServiceOptions.ack_timeout``, 10 s by default),
    so a message sent to the group afterwards reaches the connection. A connection the service
    does not know is not an error (the Ack says NotFound and nothing changes).
    """

    __slots__ = ("_sender",)

    def __init__(self, sender: HubSender) -> None:
        self._sender = sender

    async def add_to_group(self, connection_id: str, group_name: str) -> None:
        """Add a connection to a group. Raises ``AckTimeoutError`` without an Ack in time."""
        await self._change(JoinGroupWithAckMessage, connection_id, group_name)

    async def remove_from_group(self, connection_id: str, group_name: str) -> None:
        """Remove a connection from a group."""
        await self._change(LeaveGroupWithAckMessage, connection_id, group_name)

    async def _change(
        self, kind: Callable[[str, str, int], ServiceMessage], connection_id: str, group: str
    ) -> None:
        connection_id = checked_id(connection_id, "connection_id")
        name = checked_group(group)
        await self._sender.request_ack(
            lambda ack: kind(connection_id, name, ack), Route(CONNECTIONS, (connection_id,))
        )


class UserGroupManager:
    """Adds users to groups, with their current and future connections (UserJoinGroupWithAck
    and friends, service-protocol §2.4). Each call waits for the service's Ack."""

    __slots__ = ("_sender",)

    def __init__(self, sender: HubSender) -> None:
        self._sender = sender

    async def add_to_group(self, user_id: str, group_name: str, ttl: float | None = None) -> None:
        """Add a user to a group for ``ttl`` seconds (``None``: no expiry; ``0``: only the
        connections the user has now)."""
        user_id, name = checked_id(user_id, "user_id"), checked_group(group_name)
        ttl_seconds: int | None = None
        if ttl is not None:
            if ttl < 0:
                raise ValueError(f"ttl must be >= 0 seconds, got {ttl!r}")
            ttl_seconds = int(ttl)
        await self._sender.request_ack(
            lambda ack: UserJoinGroupWithAckMessage(user_id, name, ack, ttl_seconds),
            Route(USER_GROUP, (user_id, name)),
        )

    async def remove_from_group(self, user_id: str, group_name: str) -> None:
        """Remove a user from a group."""
        await self._leave(user_id, group_name)

    async def remove_from_all_groups(self, user_id: str) -> None:
        """Remove a user from every group (UserLeaveGroupWithAck with no group)."""
        await self._leave(user_id, None)

    async def _leave(self, user_id: str, group_name: str | None) -> None:
        user_id = checked_id(user_id, "user_id")
        name = None if group_name is None else checked_group(group_name)
        keys = (user_id,) if name is None else (user_id, name)
        await self._sender.request_ack(
            lambda ack: UserLeaveGroupWithAckMessage(user_id, name, ack), Route(USER_GROUP, keys)
        )

    async def is_user_in_group(self, user_id: str, group_name: str) -> bool:
        """Whether the user is in the group (on any online endpoint)."""
        user_id, name = checked_id(user_id, "user_id"), checked_group(group_name)
        return await self._sender.request_ack(
            lambda ack: CheckUserInGroupWithAckMessage(user_id, name, ack),
            Route(USER_GROUP, (user_id, name)),
        )


@dataclass(frozen=True)
class HubContext:
    """A hub's clients and groups for code outside hub methods (``HubServer.hub_context``):
    a background job on any pod reaches every client, wherever it connected::

        chat = server.hub_context("chat")
        await chat.clients.user("alice").send("notify", "your report is ready")
        await chat.user_groups.add_to_group("alice", "reports")
    """

    #: Who to send to.
    clients: HubClients
    #: Connection membership in groups.
    groups: GroupManager
    #: User membership in groups (applies to the user's later connections too).
    user_groups: UserGroupManager


# --------------------------------------------------------------------------------------------
# The caller's context


class CallerConnection(Protocol):
    """What a ``HubCallerContext`` asks of the client connection it describes
    (``_client.ClientConnection``)."""

    @property
    def protocol_name(self) -> str: ...

    def abort(self) -> None: ...


class HubCallerContext:
    """The connection a hub method runs for.

    ``items`` is a dict that lives as long as the connection: the place for per-connection
    state, since hub instances live for one call only. A token's repeated claim type (a JWT
    ``"role": ["admin", "editor"]``) is in ``all_claims`` once per value; ``claims`` keeps the
    first::

        if "admin" in self.context.roles:
            ...
    """

    __slots__ = (
        "_client",
        "all_claims",
        "claims",
        "connection_id",
        "headers",
        "items",
        "query_string",
        "roles",
        "user_id",
    )

    def __init__(
        self,
        client: CallerConnection,
        connection_id: str,
        user_id: str | None,
        claims: Iterable[tuple[str, str]],
        headers: Mapping[str, Sequence[str]],
        query_string: str,
        *,
        role_claim_types: Iterable[str] = ROLE_CLAIM_TYPES,
    ) -> None:
        self._client = client
        #: The SignalR connection id, the one the client sees.
        self.connection_id = connection_id
        #: ``asrs.s.uid`` from the client's token, else its name identifier; ``None`` when
        #: anonymous.
        self.user_id = user_id
        #: Every claim of the client's token as ``(type, value)``, in order, a repeated claim
        #: type once per value; ``asrs.*`` and JWT system claims removed (``asrs.u.<name>``
        #: appears as ``<name>``).
        self.all_claims: tuple[tuple[str, str], ...] = tuple(claims)
        first: dict[str, str] = {}
        for name, value in self.all_claims:
            first.setdefault(name, value)
        #: The same claims as a mapping, with the first value of a repeated claim type.
        self.claims: Mapping[str, str] = first
        types = frozenset(role_claim_types)
        #: Every role of the user (the values of the role claim type), without repeats.
        self.roles: tuple[str, ...] = tuple(
            dict.fromkeys(value for name, value in self.all_claims if name in types))
        #: The client's HTTP request headers as the service forwarded them.
        self.headers = headers
        #: The client's original query string.
        self.query_string = query_string
        #: Per-connection state, kept until the connection ends.
        self.items: dict[Any, Any] = {}

    @property
    def remote_address(self) -> str | None:
        """The client's IP address: the first address of the ``X-Forwarded-For`` header the
        service adds, as the Azure SDK reads it (``None`` when absent or not an address)."""
        values = header_for(self.headers, "X-Forwarded-For")
        if not values:
            return None
        first = values[0].split(",", 1)[0].strip()
        try:
            return str(ipaddress.ip_address(first))
        except ValueError:
            return None

    @property
    def protocol(self) -> str:
        """The client's hub protocol name (``json`` or ``messagepack``); ``""`` before its
        handshake."""
        return self._client.protocol_name

    def abort(self) -> None:
        """Close the connection from the server side (the service closes the client)."""
        self._client.abort()

    def __repr__(self) -> str:
        return f"HubCallerContext(connection_id={self.connection_id!r}, user_id={self.user_id!r})"


# --------------------------------------------------------------------------------------------
# Hubs


class Hub:
    """Base class of hubs. Subclass it; its public ``async def`` methods are hub methods::

        class Chat(Hub):
            async def send_message(self, text: str) -> None:      # answers "SendMessage"
                await self.clients.all.send("newMessage", self.context.user_id, text)

            @hub_method("Echo")
            async def echo_back(self, value):                     # answers "Echo" only
                return value

            async def on_connected(self) -> None:
                await self.groups.add_to_group(self.context.connection_id, "lobby")

    Names match case-insensitively with underscores ignored (``send_message`` answers
    ``SendMessage`` and ``sendMessage``). A return value becomes the completion result; an
    ``async def`` generator is a streaming method (``connection.stream(...)`` on the client).

    A parameter annotated ``AsyncIterator[T]`` or ``AsyncIterable[T]`` (``collections.abc`` or
    ``typing``) receives a stream the client uploads (a ``Subject`` argument on the JS client);
    the other parameters take the invocation's arguments, in order::

        async def upload(self, name: str, items: AsyncIterator[int]) -> int:
            return sum([item async for item in items])
    """

    #: The connection this call runs for.
    context: HubCallerContext
    #: Who to send to, including ``caller`` and ``others``.
    clients: HubCallerClients
    #: Connection membership in groups.
    groups: GroupManager

    #: Items of one upload stream held for a hub method that reads more slowly than the
    #: client sends. Past it the stream fails (its iterator raises ``HubException``) rather
    #: than stop the server connection's reader, which carries other clients too.
    stream_buffer_capacity: ClassVar[int] = 1024

    async def on_connected(self) -> None:
        """Called when a client connected, after its handshake; may send and join groups."""

    async def on_disconnected(self, error: BaseException | None) -> None:
        """Called once the client is gone; ``error`` says why, ``None`` for a normal close."""


_HUB_METHOD_ATTRIBUTE = "__relaycore_hub_method__"


@overload
def hub_method(name: _F, /) -> _F: ...
@overload
def hub_method(name: str | None = None, /) -> Callable[[_F], _F]: ...
def hub_method(name: str | _F | None = None, /) -> _F | Callable[[_F], _F]:
    """Name a hub method explicitly: it then answers that name (case-insensitively) only::

        @hub_method("SendMessage")
        async def post(self, text): ...

    Also makes a method whose name starts with ``_`` a hub method.
    """
    if callable(name):
        func = name
        setattr(func, _HUB_METHOD_ATTRIBUTE, func.__name__)
        return func

    def decorate(func: _F) -> _F:
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"hub method name must be a non-empty string, got {name!r}")
        setattr(func, _HUB_METHOD_ATTRIBUTE, name or func.__name__)
        return func

    return decorate


@dataclass(frozen=True)
class HubMethod:
    """One hub method as resolved from its class (internal, but handy in tests)."""

    #: The name clients use in error messages: the explicit name or the attribute name.
    name: str
    #: The attribute holding the function.
    attribute: str
    #: An ``async def`` generator: results are streamed.
    streaming: bool
    signature: inspect.Signature
    #: The parameters that receive the client's upload streams, in order.
    uploads: tuple[str, ...] = ()
    #: ``(least, most)`` arguments a call may pass when every parameter (the hub instance left
    #: out) is positional, none takes a stream and none is ``*args``/``**kwargs``: such a call
    #: binds its arguments as they are (``bind``'s shortcut). ``None`` for other methods.
    plain_arity: tuple[int, int] | None = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parameters = list(self.signature.parameters.values())[1:]
        plain = not self.uploads and all(
            p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters
        )
        arity = (
            (sum(1 for p in parameters if p.default is p.empty), len(parameters)) if plain else None
        )
        object.__setattr__(self, "plain_arity", arity)

    def bind(
        self, arguments: Sequence[Any], streams: Sequence[Any] = ()
    ) -> tuple[list[Any], dict[str, Any]]:
        """The positional and keyword arguments of a call (the hub instance left out): each
        stream goes to its upload parameter, the ``arguments`` fill the others in order, as
        ASP.NET Core binds them. Raise ``TypeError`` when they do not fit the parameters."""
        arity = self.plain_arity
        if arity is not None and not streams and arity[0] <= len(arguments) <= arity[1]:
            return list(arguments), {}  # what the general path below finds, without its cost
        if len(streams) != len(self.uploads):
            raise TypeError(f"expected {len(self.uploads)} stream(s), got {len(streams)}")
        by_name = dict(zip(self.uploads, streams, strict=True))
        values = list(arguments)
        positional: list[Any] = []
        keywords: dict[str, Any] = {}
        in_order = True  # still filling parameters by position
        for parameter in list(self.signature.parameters.values())[1:]:
            if parameter.name in by_name:
                if in_order:
                    positional.append(by_name[parameter.name])
                else:
                    keywords[parameter.name] = by_name[parameter.name]
            elif parameter.kind is parameter.VAR_POSITIONAL:
                positional += values
                values = []
            elif parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
                if values and in_order:
                    positional.append(values.pop(0))
                else:
                    in_order = False  # left to its default; later uploads go by name
        positional += values  # more arguments than parameters: bind() says so
        self.signature.bind(None, *positional, **keywords)
        return positional, keywords


#: An annotation that names an async iterator or iterable, read from its text when it cannot
#: be evaluated (a name imported only for type checking).
_UPLOAD_TEXT = re.compile(r"(?:[\w.]+\.)?Async(?:Iterator|Iterable)(?:\[.*\])?")
_UPLOAD_TYPES = (collections.abc.AsyncIterator, collections.abc.AsyncIterable)


def _is_upload(annotation: Any, namespace: dict[str, Any]) -> bool:
    while isinstance(annotation, str):  # postponed (PEP 563), possibly quoted as well
        try:
            annotation = eval(annotation, namespace)  # what inspect's eval_str does
        except Exception:
            return _UPLOAD_TEXT.fullmatch(annotation.strip()) is not None
    return (typing.get_origin(annotation) or annotation) in _UPLOAD_TYPES


def _uploads(function: Any, signature: inspect.Signature) -> tuple[str, ...]:
    """The names of the parameters of ``function`` annotated as async iterators or iterables:
    the ones the client's upload streams go to."""
    namespace = getattr(inspect.unwrap(function), "__globals__", {})
    return tuple(
        parameter.name
        for parameter in list(signature.parameters.values())[1:]
        if parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
        and _is_upload(parameter.annotation, namespace)
    )


def _normalise(name: str) -> str:
    return name.replace("_", "").lower()


_BASE_NAMES = frozenset(vars(Hub))
#: How many spellings of targets ``HubMethodTable.find`` remembers (clients choose them: a
#: bound keeps a client that varies its spelling from growing the table).
_FOUND_LIMIT = 1024


class HubMethodTable:
    """The hub methods of a ``Hub`` subclass, looked up by invocation target."""

    def __init__(self, hub_class: type[Hub]) -> None:
        if not (isinstance(hub_class, type) and issubclass(hub_class, Hub)):
            raise TypeError(f"expected a Hub subclass, got {hub_class!r}")
        capacity = hub_class.stream_buffer_capacity
        if type(capacity) is not int or capacity < 1:
            raise ValueError(
                f"{hub_class.__name__}.stream_buffer_capacity must be an integer >= 1, "
                f"got {capacity!r}"
            )
        self.hub_class = hub_class
        self._explicit: dict[str, HubMethod] = {}
        self._derived: dict[str, HubMethod] = {}
        #: ``find``'s answers by target as clients spell it (found methods only, bounded).
        self._found: dict[str, HubMethod] = {}
        seen: set[str] = set()
        for klass in hub_class.__mro__:
            if klass is Hub or not issubclass(klass, Hub):
                continue
            for attribute, value in vars(klass).items():
                if attribute in seen:
                    continue
                seen.add(attribute)
                self._add(attribute, value)

    def _add(self, attribute: str, value: Any) -> None:
        explicit = getattr(value, _HUB_METHOD_ATTRIBUTE, None)
        if explicit is None and (attribute.startswith("_") or attribute in _BASE_NAMES):
            return
        streaming = inspect.isasyncgenfunction(value)
        if not (inspect.iscoroutinefunction(value) or streaming):
            if explicit is not None:
                raise TypeError(
                    f"{self.hub_class.__name__}.{attribute} is marked @hub_method but is not an "
                    "'async def' function"
                )
            return
        signature = inspect.signature(value)
        method = HubMethod(
            explicit or attribute, attribute, streaming, signature, _uploads(value, signature)
        )
        table, key = (
            (self._explicit, explicit.lower())
            if explicit
            else (self._derived, _normalise(attribute))
        )
        other = table.get(key)
        if other is not None:
            raise TypeError(
                f"{self.hub_class.__name__}: hub methods {other.attribute!r} and {attribute!r} "
                f"both answer {method.name!r}; rename one or name it with @hub_method"
            )
        table[key] = method

    def find(self, target: str) -> HubMethod | None:
        """The method answering ``target``: explicit names first (case-insensitive), then
        attribute names (case-insensitive, underscores ignored)."""
        method = self._found.get(target)
        if method is not None:
            return method
        method = self._explicit.get(target.lower()) or self._derived.get(_normalise(target))
        if method is not None and len(self._found) < _FOUND_LIMIT:
            self._found[target] = method
        return method

    def methods(self) -> list[HubMethod]:
        """Every hub method, explicitly named ones first."""
        return [*self._explicit.values(), *self._derived.values()]
