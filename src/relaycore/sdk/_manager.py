"""The management SDK: ``ServiceManager`` and its ``ServiceHubContext``\\ s, for apps without
server connections of their own (serverless: functions, small HTTP services, background jobs).

::

    async with ServiceManager(ServiceOptions.from_env()) as manager:
        chat = await manager.create_hub_context("chat")
        redirect = await chat.negotiate(user_id="alice")          # .url, .access_token
        reached = await chat.clients.user("alice").send("notify", "hi", report=True)
        if reached == 0:
            ...                                                   # nobody online: push instead

Theory of operation
-------------------

A hub context is the server SDK's ``HubContext`` (``HubClients``, ``GroupManager``,
``UserGroupManager``: the same proxies, the same service messages of service-protocol §7)
written through the ``HubDispatcher`` of the chosen transport:

* **TRANSIENT**: the hub is mapped on a ``HubServer`` that is never entered and whose endpoint
  containers are ``RestEndpointHub``\\ s: their one channel turns each service message into
  the REST call that does the same (``_restclient``). ``online`` comes from the
  ``HEAD /api/health`` probe (every ``health_check_interval``, an offline endpoint again after
  ``health_retry_interval``), run in the background under ``async with``, else before a call
  when the last probe is stale.
* **PERSISTENT**: each hub context's hub is mapped on a ``HubServer`` of its own whose server
  connections are all Weak (``HubServer.weak_connections``): they send, and the service never
  binds a client to them. It runs in the manager's task group (so PERSISTENT needs
  ``async with``), reconnecting as any app server does; ``online`` is "a connection is up".

Both share the endpoint router (the manager wraps it in ``_ScopedRouter``, which restricts
the endpoints it is offered for a context made by ``with_endpoints``), negotiate
(``HubServer.negotiate``), and the serialisation of hub messages: a send is serialised once
per hub protocol into a payload map, written as is on a server connection or as the body of
the REST call, so the clients receive the same frames over either transport.

A send with ``report=True`` needs the count of connections reached, which only the REST API
returns (``{"recipients": n}``, a relaycore addition). Under PERSISTENT such a send therefore
goes through the REST API too (its order relative to the earlier messages of the connection
is not guaranteed); an endpoint that does not report a count (Azure) makes the result ``None``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import enum
import logging
import socket
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from relaycore.protocol import (
    CheckConnectionExistenceWithAckMessage,
    CheckGroupExistenceWithAckMessage,
    CheckUserExistenceWithAckMessage,
    CloseConnectionMessage,
    CloseConnectionsWithAckMessage,
    CloseGroupConnectionsWithAckMessage,
    CloseUserConnectionsWithAckMessage,
    ServiceMessage,
)

from ._connection import EndpointHub, EndpointState
from ._dispatcher import HubDispatcher
from ._endpoints import HubServiceEndpoint, ServiceEndpoint
from ._errors import NOT_CONNECTED_MESSAGE, ServiceUnavailableError
from ._hub import (
    BROADCAST,
    CONNECTIONS,
    GROUPS,
    USERS,
    ClientProxy,
    GroupManager,
    Hub,
    HubClients,
    HubSender,
    Recipients,
    Route,
    UserGroupManager,
    check_method,
    checked_group,
    checked_id,
    checked_ids,
)
from ._options import ServiceOptions
from ._restclient import (
    CallState,
    EndpointHealth,
    RestClient,
    RestEndpointHub,
    RetryOptions,
    current_call,
)
from ._router import EndpointRouter, NegotiateRequest
from ._scaling import Lifetime
from ._server import HubServer

if TYPE_CHECKING:
    import httpx

__all__ = [
    "ClientManager",
    "EndpointNegotiation",
    "NegotiationResponse",
    "ServiceClientProxy",
    "ServiceHubClients",
    "ServiceHubContext",
    "ServiceManager",
    "TransportType",
]

_log = logging.getLogger("relaycore.sdk")


class TransportType(enum.IntEnum):
    """How a ``ServiceManager`` reaches the service. Both offer the same API, and clients
    receive the same messages either way."""

    #: One REST call per operation (service-protocol §12), signed for its own URL; nothing
    #: stays open between calls. The default, as in the Azure SDK.
    TRANSIENT = 0
    #: Weak server connections per hub context (service-protocol §7), kept open and
    #: reconnected: lower latency for many messages. Needs ``async with ServiceManager(...)``.
    PERSISTENT = 1


# --------------------------------------------------------------------------------------------
# Negotiate results


@dataclasses.dataclass(frozen=True)
class NegotiationResponse:
    """Where a client connects and the token it connects with (service-protocol §10)::

    redirect = await chat.negotiate(user_id="alice")
    return redirect.to_dict()        # a negotiate endpoint's answer: {"url", "accessToken"}
    """

    #: The client URL of the endpoint (``{client endpoint}/client/?hub={hub}``).
    url: str
    #: A client token signed with that endpoint's access key.
    access_token: str

    def to_dict(self) -> dict[str, str]:
        """The negotiate redirect document SignalR clients follow."""
        return {"url": self.url, "accessToken": self.access_token}


@dataclasses.dataclass(frozen=True)
class EndpointNegotiation:
    """One endpoint of ``ServiceHubContext.negotiate_all``: the endpoint (``name``,
    ``type``, ``endpoint``, live ``online``) and a redirect to it, as the Azure Functions
    ``SignalRNegotiation`` binding gives them."""

    #: The endpoint, with its status when asked.
    endpoint: HubServiceEndpoint
    #: The client URL and token for that endpoint.
    connection_info: NegotiationResponse
    #: Whether it was online when negotiated.
    online: bool

    def to_dict(self) -> dict[str, Any]:
        """The Functions binding's JSON: ``{"name", "endpointType", "endpoint", "online",
        "connectionInfo": {"url", "accessToken"}}``."""
        return {
            "name": self.endpoint.name,
            "endpointType": self.endpoint.type.name.capitalize(),
            "endpoint": self.endpoint.endpoint,
            "online": self.online,
            "connectionInfo": self.connection_info.to_dict(),
        }


# --------------------------------------------------------------------------------------------
# Routing within a chosen subset of endpoints

#: The identities of the endpoints a ``with_endpoints`` context may use (``None``: all).
_endpoint_scope: contextvars.ContextVar[frozenset[str] | None] = contextvars.ContextVar(
    "relaycore_management_endpoints", default=None
)


class _ScopedRouter(EndpointRouter):
    """The app's router, offered only the endpoints of the running call's scope."""

    def __init__(self, inner: EndpointRouter) -> None:
        self.inner = inner

    @staticmethod
    def _allowed(endpoints: Sequence[HubServiceEndpoint]) -> Sequence[HubServiceEndpoint]:
        scope = _endpoint_scope.get()
        if scope is None:
            return endpoints
        return [e for e in endpoints if e.identity in scope]

    # Each may return an awaitable (an async router): HubDispatcher resolves it.
    def get_negotiate_endpoint(
        self, request: NegotiateRequest, endpoints: Sequence[HubServiceEndpoint]
    ) -> Any:
        return self.inner.get_negotiate_endpoint(request, self._allowed(endpoints))

    def get_endpoints_for_broadcast(self, endpoints: Sequence[HubServiceEndpoint]) -> Any:
        return self.inner.get_endpoints_for_broadcast(self._allowed(endpoints))

    def get_endpoints_for_user(self, user_id: str, endpoints: Sequence[HubServiceEndpoint]) -> Any:
        return self.inner.get_endpoints_for_user(user_id, self._allowed(endpoints))

    def get_endpoints_for_group(self, group: str, endpoints: Sequence[HubServiceEndpoint]) -> Any:
        return self.inner.get_endpoints_for_group(group, self._allowed(endpoints))

    def get_endpoints_for_connection(
        self, connection_id: str, endpoints: Sequence[HubServiceEndpoint]
    ) -> Any:
        return self.inner.get_endpoints_for_connection(connection_id, self._allowed(endpoints))


# --------------------------------------------------------------------------------------------
# The servers behind the transports


class _ManagementHub(Hub):
    """The hub class mapped for a management hub: no methods (no client is ever bound)."""


class _ManagementServer(HubServer):
    """A server of the management SDK: its hubs are mapped as they are asked for."""

    def dispatcher_for(self, hub: str) -> HubDispatcher:
        """The hub's dispatcher, mapping the hub on first use (``ValueError`` for an invalid
        name)."""
        try:
            return self._dispatcher(hub)
        except KeyError:
            self.map_hub(hub, _ManagementHub)
            return self._dispatcher(hub)


class _WeakServer(_ManagementServer):
    """A hub context's server connections under PERSISTENT: all Weak, sending only."""

    weak_connections = True


class _RestServer(_ManagementServer):
    """The TRANSIENT transport's server: never entered; every hub's endpoint containers are
    ``RestEndpointHub``\\ s sharing the manager's health probes."""

    def __init__(
        self, options: ServiceOptions, client: RestClient, healths: Mapping[str, EndpointHealth]
    ) -> None:
        super().__init__(dataclasses.replace(options, connection_count=0))
        self._client = client
        self._healths = healths

    def make_container(
        self, dispatcher: HubDispatcher, endpoint: ServiceEndpoint, state: EndpointState
    ) -> EndpointHub:
        return RestEndpointHub(dispatcher, endpoint, self._healths[endpoint.identity], self._client)


# --------------------------------------------------------------------------------------------
# One hub context's writes


@dataclasses.dataclass(frozen=True)
class _HubSender(HubSender):
    """What a hub context's proxies and managers send through: the hub's dispatcher on the
    transport's server, plus the bookkeeping of a management call (recipients, errors of
    several endpoints, the endpoint scope)."""

    manager: ServiceManager
    hub: str
    #: The transport's server (the REST one under TRANSIENT).
    server: _ManagementServer
    #: The REST server, for reported sends under PERSISTENT.
    rest: _RestServer
    #: The identities of the endpoints the context may use (``None``: all).
    scope: frozenset[str] | None = None

    @property
    def transient(self) -> bool:
        return self.server is self.rest

    def endpoints(self, server: HubServer | None = None) -> list[HubServiceEndpoint]:
        """The hub's endpoints on ``server`` (default: the transport's) within the scope."""
        endpoints = (server or self.server).hub_endpoints(self.hub)
        if self.scope is None:
            return endpoints
        return [e for e in endpoints if e.identity in self.scope]

    @contextlib.contextmanager
    def calling(self, state: CallState, server: HubServer) -> Iterator[None]:
        """Run one call: its state and scope visible to the channels it reaches."""
        self.manager._check_open()
        call_token = current_call.set(state)
        scope_token = _endpoint_scope.set(self.scope)
        try:
            yield
        except ServiceUnavailableError as exc:
            endpoints = self.endpoints(server)
            if not any(e.online for e in endpoints):
                # The router saw no online endpoint: say that, not "the router chose none".
                names = ", ".join(str(e) for e in endpoints) or "none configured"
                raise ServiceUnavailableError(
                    f"no endpoint is online for hub {self.hub!r} ({names}); {NOT_CONNECTED_MESSAGE}"
                ) from exc
            raise
        finally:
            _endpoint_scope.reset(scope_token)
            current_call.reset(call_token)

    @staticmethod
    def raise_errors(state: CallState) -> None:
        if not state.errors:
            return
        for other in state.errors[1:]:
            _log.warning("a management call also failed on another endpoint: %s", other)
        raise state.errors[0]

    async def prepare(self, rest: bool) -> None:
        if rest:
            await self.manager._refresh_health()

    # HubSender -------------------------------------------------------------------------------

    async def send(self, to: Recipients, method: str, args: tuple[Any, ...]) -> None:
        await self.deliver(to, method, args)

    async def deliver(
        self, to: Recipients, method: str, args: tuple[Any, ...], *, report: bool = False
    ) -> int | None:
        """``send``, returning the recipients when ``report`` is set (see the module doc)."""
        server = self.rest if report else self.server
        await self.prepare(server is self.rest)
        state = CallState()
        with self.calling(state, server):
            await server.dispatcher_for(self.hub).send(to, method, args)
        self.raise_errors(state)
        return state.total() if report else None

    async def request_ack(self, build: Callable[[int], ServiceMessage], route: Route) -> bool:
        await self.prepare(self.transient)
        with self.calling(CallState(), self.server):
            return await self.server.dispatcher_for(self.hub).request_ack(build, route)

    async def invoke_client(
        self, connection_id: str, method: str, args: tuple[Any, ...], timeout: float | None
    ) -> Any:
        raise NotImplementedError(
            "a management hub context cannot wait for client results; serverless clients "
            "answer through upstream webhooks"
        )

    async def close_connection(self, message: CloseConnectionMessage) -> None:
        await self.prepare(self.transient)
        state = CallState()
        with self.calling(state, self.server):
            await self.server.dispatcher_for(self.hub).write(
                message, Route(CONNECTIONS, (message.connection_id,))
            )
        self.raise_errors(state)


# --------------------------------------------------------------------------------------------
# What a hub context offers


class ServiceClientProxy:
    """A set of clients chosen through ``ServiceHubContext.clients``."""

    __slots__ = ("_recipients", "_sender")

    def __init__(self, sender: _HubSender, proxy: ClientProxy) -> None:
        self._sender = sender
        self._recipients = proxy.recipients

    async def send(self, method: str, *args: Any, report: bool = False) -> int | None:
        """Invoke the client method ``method`` with ``args`` on every client of this set.

        With ``report=True``, return how many connections it was delivered to, summed over
        the endpoints it went to (``None`` when an endpoint does not tell, as Azure's REST API
        does not): ``0`` means nobody was online. Under PERSISTENT a reported send goes
        through the REST API. Without ``report`` the result is ``None``.

        Raises ``ServiceUnavailableError`` when no endpoint is online, and a
        ``ServiceRequestError`` subclass when the service refused the call.
        """
        check_method(method)
        return await self._sender.deliver(self._recipients, method, args, report=report)


class ServiceHubClients:
    """Chooses the clients of a hub to send to (the management SDK's ``HubClients``)::

    await chat.clients.all.send("announce", "maintenance at noon")
    reached = await chat.clients.user("alice").send("notify", "hi", report=True)
    """

    __slots__ = ("_clients", "_sender")

    def __init__(self, sender: _HubSender) -> None:
        self._sender = sender
        self._clients = HubClients(sender)

    def _wrap(self, proxy: ClientProxy) -> ServiceClientProxy:
        return ServiceClientProxy(self._sender, proxy)

    @property
    def all(self) -> ServiceClientProxy:
        """Every client of the hub."""
        return self._wrap(self._clients.all)

    def all_except(self, excluded_connection_ids: Iterable[str]) -> ServiceClientProxy:
        """Every client but the listed connections."""
        return self._wrap(self._clients.all_except(excluded_connection_ids))

    def client(self, connection_id: str) -> ServiceClientProxy:
        """One connection."""
        return self._wrap(self._clients.client(connection_id))

    def clients(self, connection_ids: Iterable[str]) -> ServiceClientProxy:
        """The listed connections."""
        return self._wrap(self._clients.clients(connection_ids))

    def user(self, user_id: str) -> ServiceClientProxy:
        """Every connection of one user."""
        return self._wrap(self._clients.user(user_id))

    def users(self, user_ids: Iterable[str]) -> ServiceClientProxy:
        """Every connection of the listed users."""
        return self._wrap(self._clients.users(user_ids))

    def group(self, group_name: str) -> ServiceClientProxy:
        """Every connection in a group."""
        return self._wrap(self._clients.group(group_name))

    def groups(self, group_names: Iterable[str]) -> ServiceClientProxy:
        """Every connection in any of the groups: once each under PERSISTENT; under
        TRANSIENT one REST call per group, so a connection in two of them gets it twice (the
        REST API has no multi-group send)."""
        return self._wrap(self._clients.groups(group_names))

    def group_except(
        self, group_name: str, excluded_connection_ids: Iterable[str]
    ) -> ServiceClientProxy:
        """Every connection in a group but the listed ones."""
        return self._wrap(self._clients.group_except(group_name, excluded_connection_ids))


class ClientManager:
    """Existence checks and closing connections (the Azure SDK's ``ClientManager``)::

    if not await chat.client_manager.user_exists("alice"):
        ...
    await chat.client_manager.close_user_connections("mallory", reason="banned")
    """

    __slots__ = ("_sender",)

    def __init__(self, sender: _HubSender) -> None:
        self._sender = sender

    async def connection_exists(self, connection_id: str) -> bool:
        """Whether the connection is connected (on any endpoint)."""
        connection_id = checked_id(connection_id, "connection_id")
        route = Route(CONNECTIONS, (connection_id,))
        return await self._exists(CheckConnectionExistenceWithAckMessage, route)

    async def user_exists(self, user_id: str) -> bool:
        """Whether the user has a connection (on any endpoint)."""
        return await self._exists(
            CheckUserExistenceWithAckMessage, Route(USERS, (checked_id(user_id, "user_id"),))
        )

    async def group_exists(self, group_name: str) -> bool:
        """Whether the group has a connection (on any endpoint)."""
        return await self._exists(
            CheckGroupExistenceWithAckMessage, Route(GROUPS, (checked_group(group_name),))
        )

    async def _exists(self, check: Callable[[str, int], ServiceMessage], route: Route) -> bool:
        (key,) = route.keys
        return await self._sender.request_ack(lambda ack: check(key, ack), route)

    async def close_connection(self, connection_id: str, reason: str | None = None) -> None:
        """Close a connection; its client gets a Close message with ``reason`` as the error.
        An unknown connection is not an error."""
        connection_id = checked_id(connection_id, "connection_id")
        await self._sender.close_connection(CloseConnectionMessage(connection_id, reason or ""))

    async def close_connections(
        self, reason: str | None = None, excluded: Iterable[str] = ()
    ) -> None:
        """Close every connection of the hub but ``excluded``."""
        skip = checked_ids(excluded, "excluded")
        await self._sender.request_ack(
            lambda ack: CloseConnectionsWithAckMessage(ack, reason, skip), BROADCAST
        )

    async def close_user_connections(
        self, user_id: str, reason: str | None = None, excluded: Iterable[str] = ()
    ) -> None:
        """Close every connection of a user but ``excluded``."""
        user_id = checked_id(user_id, "user_id")
        skip = checked_ids(excluded, "excluded")
        await self._sender.request_ack(
            lambda ack: CloseUserConnectionsWithAckMessage(user_id, ack, reason, skip),
            Route(USERS, (user_id,)),
        )

    async def close_group_connections(
        self, group_name: str, reason: str | None = None, excluded: Iterable[str] = ()
    ) -> None:
        """Close every connection in a group but ``excluded``."""
        name = checked_group(group_name)
        skip = checked_ids(excluded, "excluded")
        await self._sender.request_ack(
            lambda ack: CloseGroupConnectionsWithAckMessage(name, ack, reason, skip),
            Route(GROUPS, (name,)),
        )


class ServiceHubContext:
    """One hub, managed from outside (``ServiceManager.create_hub_context``)::

        chat = await manager.create_hub_context("chat")
        redirect = await chat.negotiate(user_id="alice", claims={"role": "admin"})
        await chat.groups.add_to_group(connection_id, "room")
        await chat.user_groups.add_to_group("alice", "vip", ttl=3600)
        await chat.clients.group("room").send("newMessage", "alice", "hello")
        if await chat.client_manager.user_exists("bob"): ...

    ``groups`` and ``user_groups`` are the server SDK's ``GroupManager`` and
    ``UserGroupManager``: each call returns once the service has done it.
    """

    def __init__(self, manager: ServiceManager, sender: _HubSender) -> None:
        self._manager = manager
        self._sender = sender
        #: The hub, as given to ``create_hub_context``.
        self.hub = sender.hub
        #: Who to send to.
        self.clients = ServiceHubClients(sender)
        #: Connection membership in groups.
        self.groups = GroupManager(sender)
        #: User membership in groups (applies to the user's later connections too).
        self.user_groups = UserGroupManager(sender)
        #: Existence checks and closing connections.
        self.client_manager = ClientManager(sender)

    def __repr__(self) -> str:
        transport = "TRANSIENT" if self._sender.transient else "PERSISTENT"
        scope = "" if self._sender.scope is None else " (some endpoints)"
        return f"<ServiceHubContext {self.hub!r} {transport}{scope}>"

    async def negotiate(
        self,
        user_id: str | None = None,
        claims: Mapping[str, Any] | None = None,
        lifetime: float | None = None,
    ) -> NegotiationResponse:
        """A client's redirect: the ``url`` of the endpoint the router picks (by default an
        online primary, else an online secondary) and an ``access_token`` signed with its key,
        carrying ``user_id`` and ``claims``, valid ``lifetime`` seconds (default
        ``ServiceOptions.access_token_lifetime``).

        Raises ``ServiceUnavailableError`` when no endpoint is online.
        """
        sender = self._sender
        await sender.prepare(sender.transient)
        with sender.calling(CallState(), sender.server):
            document = await sender.server.negotiate(self.hub, user_id, claims, lifetime)
        return NegotiationResponse(document["url"], document["accessToken"])

    async def negotiate_all(
        self,
        user_id: str | None = None,
        claims: Mapping[str, Any] | None = None,
        lifetime: float | None = None,
    ) -> list[EndpointNegotiation]:
        """A redirect to every endpoint, each with the endpoint's name, type and online flag,
        as the Azure Functions ``SignalRNegotiation`` binding gives: a client picks one (or
        the app does, e.g. by region)."""
        sender = self._sender
        results = []
        for endpoint in await self.list_endpoints():
            with sender.calling(CallState(), sender.server):
                document = await sender.server.negotiate(
                    self.hub, user_id, claims, lifetime, endpoint=endpoint
                )
            results.append(
                EndpointNegotiation(
                    endpoint,
                    NegotiationResponse(document["url"], document["accessToken"]),
                    endpoint.online,
                )
            )
        return results

    async def list_endpoints(self) -> list[HubServiceEndpoint]:
        """The hub's endpoints (``name``, ``type``, ``endpoint``, ``online``, ``metrics``), as
        the Azure Functions ``SignalREndpoints`` binding lists them. Under TRANSIENT a stale
        health status is probed again first."""
        await self._sender.prepare(self._sender.transient)
        return self._sender.endpoints()

    def with_endpoints(self, endpoints: Iterable[ServiceEndpoint | str]) -> ServiceHubContext:
        """The same hub, limited to some endpoints (``ServiceEndpoint``\\ s, or names): its
        messages, group changes, checks and negotiate go to those only, as the endpoint
        router chooses among them::

            east = chat.with_endpoints(["east"])
            await east.clients.all.send("notify", "east only")
        """
        configured = self._manager.endpoints
        chosen: set[str] = set()
        for item in endpoints:
            if isinstance(item, ServiceEndpoint):
                matches = [e for e in configured if e.identity == item.identity]
            elif isinstance(item, str):
                matches = [e for e in configured if e.name == item]
            else:
                raise TypeError(f"expected ServiceEndpoint objects or names, got {item!r}")
            if not matches:
                names = sorted(e.name or str(e) for e in configured)
                raise ValueError(f"{item!r} is not an endpoint of this manager: {names}")
            chosen.update(e.identity for e in matches)
        if not chosen:
            raise ValueError("with_endpoints needs at least one endpoint")
        scoped = dataclasses.replace(self._sender, scope=frozenset(chosen))
        return ServiceHubContext(self._manager, scoped)


# --------------------------------------------------------------------------------------------
# The manager


class ServiceManager:
    """Manages hubs of the service from an app that holds no client connections (serverless):
    negotiate client tokens, send to clients, users and groups, manage groups, check and close
    connections.

    ::

        async with ServiceManager(ServiceOptions.from_env()) as manager:
            chat = await manager.create_hub_context("chat")
            await chat.clients.all.send("newMessage", "system", "hello")

    ``options`` gives the endpoints (one or several, primary or secondary, as for
    ``HubServer``), ``application_name``, token lifetime and, for PERSISTENT, the server
    connection settings (``connection_count`` per hub and endpoint, timeouts, backoff).
    ``router`` (default: ``options.endpoint_router``, else ``EndpointRouter()``) chooses the
    endpoints of negotiate and of each call. ``transport``: see ``TransportType``.

    TRANSIENT only: ``retry`` (``RetryOptions``), ``request_timeout`` of each REST request,
    and the health probe's ``health_check_interval``, ``health_retry_interval`` (for an
    offline endpoint) and ``health_check_timeout``; ``http_client`` replaces the manager's
    own ``httpx.AsyncClient`` (its settings are then yours, and the manager does not close it).

    Use ``async with`` (or ``await manager.aclose()`` when done). TRANSIENT works without
    ``async with`` too (health is then probed when stale, before a call); PERSISTENT needs it,
    since its connections run in the manager's task group.
    """

    def __init__(
        self,
        options: ServiceOptions,
        router: EndpointRouter | None = None,
        transport: TransportType = TransportType.TRANSIENT,
        *,
        retry: RetryOptions | None = None,
        request_timeout: float = 30.0,
        health_check_interval: float = 120.0,
        health_retry_interval: float = 3.0,
        health_check_timeout: float = 2.0,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        import httpx

        if not isinstance(options, ServiceOptions):
            raise TypeError(f"options must be ServiceOptions, got {type(options).__name__}")
        inner = router or options.endpoint_router or EndpointRouter()
        if not isinstance(inner, EndpointRouter):
            raise ValueError(
                f"router must be an EndpointRouter (or a subclass) instance, got "
                f"{type(inner).__name__}"
            )
        try:
            self.transport = TransportType(transport)
        except ValueError:
            raise ValueError(
                f"transport must be TransportType.TRANSIENT or PERSISTENT, got {transport!r}"
            ) from None
        for name, value in (
            ("request_timeout", request_timeout),
            ("health_check_interval", health_check_interval),
            ("health_retry_interval", health_retry_interval),
            ("health_check_timeout", health_check_timeout),
        ):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
        server_id = options.server_id or f"{socket.gethostname()}_{uuid.uuid4().hex}"
        #: The options the manager's servers run with: ``endpoint_router`` is the manager's
        #: wrapper of ``router``; a ``config_file`` is not watched.
        self.options = dataclasses.replace(
            options, endpoint_router=_ScopedRouter(inner), server_id=server_id, config_file=None
        )
        #: The endpoint router (the one given, or the default).
        self.router = inner
        self.retry = retry if retry is not None else RetryOptions()
        self.health_check_interval = float(health_check_interval)
        self.health_retry_interval = float(health_retry_interval)
        self._endpoints = self.options.all_endpoints()  # ValueError when none
        self._healths = {e.identity: EndpointHealth(e) for e in self._endpoints}
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=request_timeout)
        self._client = RestClient(
            self._http,
            retry=self.retry,
            application=self.options.application_name,
            name_id=server_id,
            health_timeout=float(health_check_timeout),
        )
        self._rest = _RestServer(self.options, self._client, self._healths)
        self._weak: dict[str, _WeakServer] = {}
        self._stops: list[anyio.Event] = []
        self._life = Lifetime()
        self._health_scope: anyio.CancelScope | None = None
        self._health_lock: anyio.Lock | None = None
        self._weak_lock: anyio.Lock | None = None
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"<ServiceManager {self.transport.name} {', '.join(str(e) for e in self._endpoints)}>"
        )

    @property
    def endpoints(self) -> tuple[ServiceEndpoint, ...]:
        """The configured endpoints (de-duplicated, ``ServiceOptions.all_endpoints``)."""
        return self._endpoints

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the ServiceManager is closed")

    # Lifetime ----------------------------------------------------------------------------

    async def __aenter__(self) -> ServiceManager:
        self._check_open()
        task_group = await self._life.begin(
            "a ServiceManager is entered once; make a new one to start again"
        )
        if self.transport is TransportType.TRANSIENT:
            task_group.start_soon(self._health_loop)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        life = self._life
        task_group = life.task_group
        assert task_group is not None, "ServiceManager.__aexit__ without __aenter__"
        self._stop_background()
        try:
            # Weak servers say goodbye to the service (shutdown fin) within shutdown_timeout.
            await task_group.__aexit__(None, None, None)
        finally:
            life.task_group = None
            life.running = False
            await self._close_http()

    async def aclose(self) -> None:
        """Close the manager: its PERSISTENT connections end and its HTTP client closes (at
        the end of ``async with`` when inside one). Calls made afterwards raise
        ``RuntimeError``."""
        self._stop_background()
        if self._life.task_group is None:
            await self._close_http()

    def _stop_background(self) -> None:
        self._closed = True
        if self._health_scope is not None:
            self._health_scope.cancel()
        for stop in self._stops:
            stop.set()

    async def _close_http(self) -> None:
        if self._owns_http:
            with anyio.CancelScope(shield=True):
                await self._http.aclose()

    # Hub contexts ---------------------------------------------------------------------------

    async def create_hub_context(self, hub: str) -> ServiceHubContext:
        """The context of ``hub`` (matched case-insensitively, like mapped hubs).

        Under PERSISTENT the hub's Weak server connections are opened first (once per hub;
        later contexts of the hub share them) and this returns once each has made its first
        attempt; under TRANSIENT the endpoints' health is probed if it is not known yet.

        Raises ``ValueError`` for an invalid hub name, ``RuntimeError`` when the manager is
        closed or, under PERSISTENT, not entered with ``async with``.
        """
        self._check_open()
        self._rest.dispatcher_for(hub)  # ValueError for an invalid name
        if self.transport is TransportType.TRANSIENT:
            sender = _HubSender(self, hub, self._rest, self._rest)
            await self._refresh_health()
        else:
            sender = _HubSender(self, hub, await self._weak_server(hub), self._rest)
        return ServiceHubContext(self, sender)

    async def _weak_server(self, hub: str) -> _WeakServer:
        task_group = self._life.task_group
        if task_group is None:
            raise RuntimeError(
                "TransportType.PERSISTENT keeps server connections open in the background: "
                "use 'async with ServiceManager(...) as manager'"
            )
        if self._weak_lock is None:
            self._weak_lock = anyio.Lock()
        async with self._weak_lock:
            server = self._weak.get(hub.lower())
            if server is None:
                server = _WeakServer(self.options)
                server.dispatcher_for(hub)
                stop = anyio.Event()
                self._stops.append(stop)
                await task_group.start(self._run_weak, server, stop)
                self._weak[hub.lower()] = server
        return server

    @staticmethod
    async def _run_weak(
        server: HubServer,
        stop: anyio.Event,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        async with server:
            task_status.started()
            await stop.wait()

    # Health (TRANSIENT) ----------------------------------------------------------------------

    async def check_health(self) -> None:
        """Probe every endpoint's ``HEAD /api/health`` now (TRANSIENT status; PERSISTENT
        reported sends)."""
        await self._refresh_health(force=True)

    async def _refresh_health(self, *, force: bool = False) -> None:
        """Probe the endpoints whose status is stale (all with ``force``), concurrently."""
        if self._health_lock is None:
            self._health_lock = anyio.Lock()
        async with self._health_lock:
            now = anyio.current_time()
            due = [
                h
                for h in self._healths.values()
                if force
                or now >= h.next_due(self.health_check_interval, self.health_retry_interval)
            ]
            if not due:
                return

            async def probe(health: EndpointHealth) -> None:
                health.update(await self._client.probe(health.endpoint))

            async with anyio.create_task_group() as task_group:
                for health in due:
                    task_group.start_soon(probe, health)

    async def _health_loop(self) -> None:
        with anyio.CancelScope() as scope:
            self._health_scope = scope
            if self._closed:
                scope.cancel()
            while True:
                await self._refresh_health()
                wake = min(
                    h.next_due(self.health_check_interval, self.health_retry_interval)
                    for h in self._healths.values()
                )
                await anyio.sleep(max(wake - anyio.current_time(), 0.01))
