"""``HubServer``: maps hubs, keeps their server connections, routes what hubs send.

Routing (service-protocol §7, §11.2):

* The ``EndpointRouter`` (``ServiceOptions.endpoint_router``) chooses the endpoints of each
  message: by default every online endpoint, and for a connection the endpoint that holds it
  when it is one of this server's clients. With the default router the choice is made inline
  (no call per message).
* A send is serialised **once** per hub protocol (``{"json": ..., "messagepack": ...}``) into
  one service message, written on one connection of every chosen endpoint; each endpoint
  delivers to the clients it holds. With the default router, a send to one client connected
  to this very server goes only on the connection that owns it, in that client's protocol.
* Inside a hub method, the connection that owns the caller is preferred on its endpoint, so
  that the method's sends, group changes and completion stay in order; elsewhere the first
  connected slot of each endpoint is used (one task's sends stay in order).
* ``...WithAck`` requests go to every online endpoint and wait for all the Acks; the answer is
  true if any endpoint says Ok, and an error from any endpoint is raised.
* Client results: the invocation goes out as ClientInvocation; the client's Completion comes
  back as ConnectionData to whichever server owns the client. The owner resolves it directly
  when it is also the caller, or forwards it as ClientCompletion for the service to relay to
  the caller (§2.5).

Endpoints at run time (§11.3): ``HubServer`` keeps the configured endpoints, each STAGING,
ACTIVE or REMOVING (see ``_connection``). Negotiate offers only ACTIVE ones; messages go to all
three, so that a client of an endpoint being added or removed misses nothing. Changes of one
endpoint (add, remove, rename) are serialised by a lock per endpoint identity; changes of
different endpoints run concurrently.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import os
import socket
import sys
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import quote

import anyio
import anyio.abc

from relaycore.protocol import (
    AckStatus,
    ClientCompletionMessage,
    ClientInvocationMessage,
    CompletionMessage,
    ErrorCompletionMessage,
    InvocationMessage,
    JsonHubProtocol,
    MessagePackHubProtocol,
    PingKey,
    RemoteProtocolError,
    ServiceMessage,
    UnsupportedProtocolError,
    generate_access_token,
    get_protocol,
    is_valid_hub_name,
    negotiate_redirect,
    wire_hub_name,
)

from ._client import ClientConnection, current_service_connection
from ._connection import ACTIVE, REMOVING, STAGING, EndpointHub, EndpointState, ServiceConnection
from ._endpoints import EndpointEvents, EndpointStatusEvent, HubServiceEndpoint, publish_status
from ._errors import (
    NOT_CONNECTED_MESSAGE,
    AckTimeoutError,
    HubException,
    ServiceError,
    ServiceUnavailableError,
)
from ._hub import (
    ALL,
    CONNECTIONS,
    GROUPS,
    USER_GROUP,
    USERS,
    GroupManager,
    Hub,
    HubClients,
    HubContext,
    HubMethodTable,
    Route,
    UserGroupManager,
)
from ._options import EndpointType, ServiceEndpoint, ServiceOptions, select_endpoints
from ._router import EndpointRouter, NegotiateRequest

if TYPE_CHECKING:
    from ._asgi import NegotiateApp, UserIdProvider

__all__ = ["NOT_CONNECTED_MESSAGE", "HubRouter", "HubServer"]

_log = logging.getLogger("relaycore.sdk")
_T = TypeVar("_T")
_BROADCAST: Final = Route(ALL)

_PROTOCOLS: Final = (JsonHubProtocol(), MessagePackHubProtocol())
#: Ack ids are positive int32 values (§2.4).
_MAX_ACK_ID: Final = 0x7FFFFFFF
#: Completions that arrived before the service's ClientInvocation told us where they go.
_MAX_ORPHANS: Final = 1024


async def _resolve(value: _T | Awaitable[_T]) -> _T:
    """A router method's answer (routers may be ``async def``)."""
    if inspect.isawaitable(value):
        return await value
    return value


class _PendingResult:
    """A client result this server waits for (it sent the ClientInvocation)."""

    __slots__ = ("connection_id", "done", "error", "errors_left", "result")

    def __init__(self, connection_id: str) -> None:
        self.connection_id = connection_id
        self.done = anyio.Event()
        self.result: Any = None
        self.error: str | None = None
        self.errors_left = 1

    def resolve(self, completion: CompletionMessage) -> None:
        if self.done.is_set():
            return
        self.result = completion.result
        self.error = completion.error
        self.done.set()

    def fail(self, error: str) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


class HubRouter:
    """Everything one mapped hub needs at run time: its methods, its endpoint containers,
    its local clients and pending client results."""

    def __init__(
        self,
        server: HubServer,
        name: str,
        hub_class: type[Hub],
        factory: Callable[[], Hub] | None,
    ) -> None:
        self.server = server
        self.options = server.options
        self.server_id = server.server_id
        self.name = name
        self.wire_name = wire_hub_name(name, server.options.application_name)
        self.methods = HubMethodTable(hub_class)
        self.hub_factory: Callable[[], Hub] = factory or hub_class
        #: The routing store: an ``EndpointHub`` per endpoint, whatever its state.
        self.containers = [
            EndpointHub(self, endpoint, state) for endpoint, state in server.endpoint_states()
        ]
        #: Clients owned by this server's connections, by connection id.
        self.local_clients: dict[str, ClientConnection] = {}
        self._pending: dict[str, _PendingResult] = {}
        self._routed: dict[str, ClientInvocationMessage] = {}
        self._orphans: OrderedDict[str, tuple[ClientConnection, CompletionMessage]] = OrderedDict()

    # Choosing endpoints and connections --------------------------------------------------

    def online(self) -> list[EndpointHub]:
        """The containers with at least one connection up."""
        return [c for c in self.containers if c.online]

    def add_container(self, endpoint: ServiceEndpoint, state: EndpointState) -> EndpointHub:
        """Put an endpoint into the routing store."""
        container = EndpointHub(self, endpoint, state)
        self.containers.append(container)
        return container

    def containers_of(self, identity: str) -> list[EndpointHub]:
        """The containers of the endpoint with this identity (one, or none)."""
        return [c for c in self.containers if c.endpoint.identity == identity]

    def container_for(self, endpoint: ServiceEndpoint) -> EndpointHub:
        """The container of an endpoint a router returned; ``ValueError`` when it is not an
        endpoint of this hub."""
        if isinstance(endpoint, HubServiceEndpoint):
            container = endpoint._container
            if container.router is self and container in self.containers:
                return container
        elif isinstance(endpoint, ServiceEndpoint):
            for container in self.containers:
                if container.endpoint.identity == endpoint.identity:
                    return container
        raise ValueError(
            f"the endpoint router returned {endpoint!r}, which is not an endpoint of hub "
            f"{self.name!r}; return some of the endpoints it was given"
        )

    @property
    def default_routing(self) -> bool:
        """Whether the router is the default one (choices are then made inline)."""
        return type(self.server.endpoint_router) is EndpointRouter

    async def endpoints_for(self, route: Route) -> list[EndpointHub]:
        """The containers ``route`` goes to, as the endpoint router chooses (§11.2)."""
        containers = self.containers
        if self.default_routing and route.kind != CONNECTIONS:
            return [c for c in containers if c.online]
        router = self.server.endpoint_router
        endpoints = [c.hub_endpoint for c in containers]
        kind, keys = route.kind, route.keys
        chosen: list[ServiceEndpoint] = []
        if kind == ALL:
            chosen.extend(await _resolve(router.get_endpoints_for_broadcast(endpoints)) or ())
        elif kind == USERS:
            for user_id in keys:
                chosen.extend(
                    await _resolve(router.get_endpoints_for_user(user_id, endpoints)) or ()
                )
        elif kind == GROUPS:
            for group in keys:
                chosen.extend(
                    await _resolve(router.get_endpoints_for_group(group, endpoints)) or ()
                )
        elif kind == CONNECTIONS:
            for connection_id in keys:
                chosen.extend(
                    await _resolve(router.get_endpoints_for_connection(connection_id, endpoints))
                    or ()
                )
        elif kind == USER_GROUP:
            # §11.2: a user's group membership goes where both the user and the group go.
            for_user = list(await _resolve(router.get_endpoints_for_user(keys[0], endpoints)) or ())
            if len(keys) > 1:
                for_group = {
                    id(self.container_for(e))
                    for e in await _resolve(router.get_endpoints_for_group(keys[1], endpoints))
                    or ()
                }
                for_user = [e for e in for_user if id(self.container_for(e)) in for_group]
            chosen = for_user
        else:
            raise AssertionError(f"unknown route kind {kind!r}")
        result: dict[int, EndpointHub] = {}
        for endpoint in chosen:
            container = self.container_for(endpoint)
            result.setdefault(id(container), container)
        return list(result.values())

    def _describe(self, route: Route) -> str:
        if route.kind == ALL:
            return "a broadcast"
        if route.kind == USER_GROUP:
            return f"user {route.keys[0]!r} in group {route.keys[1:] or '(all)'}"
        return f"{route.kind} {', '.join(route.keys)}"

    async def _targets(self, route: Route = _BROADCAST) -> list[ServiceConnection]:
        """One connection of every endpoint ``route`` goes to (the caller's own connection
        where it is one of them)."""
        containers = await self.endpoints_for(route)
        preferred = current_service_connection.get()
        targets = []
        for container in containers:
            connection = container.pick(preferred)
            if connection is not None:
                targets.append(connection)
        if not targets:
            if self.default_routing:
                why = self.server.refusal(self.name) or NOT_CONNECTED_MESSAGE
                raise ServiceUnavailableError(f"no endpoint is online for hub {self.name!r}; {why}")
            if not containers:
                raise ServiceUnavailableError(
                    f"the endpoint router chose no endpoint for {self._describe(route)} "
                    f"of hub {self.name!r}"
                )
            raise ServiceUnavailableError(
                f"no endpoint the router chose for {self._describe(route)} of hub "
                f"{self.name!r} is online: {', '.join(str(c.endpoint) for c in containers)}"
            )
        return targets

    # Sending -------------------------------------------------------------------------------

    @staticmethod
    def _payloads(message: InvocationMessage) -> dict[str, bytes]:
        return {protocol.name: protocol.write(message) for protocol in _PROTOCOLS}

    async def _write_everywhere(
        self, targets: list[ServiceConnection], message: ServiceMessage
    ) -> None:
        if len(targets) == 1:
            await targets[0].send(message)
            return
        failures: list[ServiceUnavailableError] = []

        async def write(connection: ServiceConnection) -> None:
            try:
                await connection.send(message)
            except ServiceUnavailableError as exc:
                failures.append(exc)

        async with anyio.create_task_group() as task_group:
            for connection in targets:
                task_group.start_soon(write, connection)
        if len(failures) == len(targets):
            raise failures[0]
        for failure in failures:
            _log.warning("a message reached only some endpoints: %s", failure)

    async def send(
        self,
        method: str,
        args: tuple[Any, ...],
        build: Callable[[dict[str, bytes]], ServiceMessage],
        *,
        connection_id: str | None = None,
        route: Route = _BROADCAST,
    ) -> None:
        """Send an invocation of ``method`` to the clients ``build`` addresses, on the
        endpoints the router chooses for ``route``."""
        invocation = InvocationMessage(method, args)
        if connection_id is not None and self.default_routing:
            client = self.local_clients.get(connection_id)
            if client is not None and client.protocol is not None:
                payloads = {client.protocol.name: client.protocol.write(invocation)}
                await client.service_connection.send(build(payloads))
                return
        await self._write_everywhere(await self._targets(route), build(self._payloads(invocation)))

    async def request_ack(
        self,
        build: Callable[[int], ServiceMessage],
        *,
        connection_scoped: bool,
        route: Route = _BROADCAST,
    ) -> bool:
        """Send a ``...WithAck`` request to the endpoints the router chooses for ``route``;
        True if any says Ok."""
        targets = await self._targets(route)
        outcomes: list[bool] = []
        errors: list[ServiceError] = []

        async def ask(connection: ServiceConnection) -> None:
            try:
                status, text = await connection.request_ack(build, self.server.next_ack_id())
            except ServiceError as exc:
                errors.append(exc)
                return
            if status == AckStatus.OK:
                outcomes.append(True)
            elif status == AckStatus.NOT_FOUND:
                outcomes.append(False)
            elif status == AckStatus.TIMEOUT:
                errors.append(AckTimeoutError(f"{connection.endpoint}: {text or 'timeout'}"))
            else:
                errors.append(
                    ServiceError(f"{connection.endpoint} answered with ack status {status}: {text}")
                )

        if len(targets) == 1:
            await ask(targets[0])
        else:
            async with anyio.create_task_group() as task_group:
                for connection in targets:
                    task_group.start_soon(ask, connection)
        if errors and not (connection_scoped and any(outcomes)):
            raise errors[0]
        return any(outcomes)

    # Client results ------------------------------------------------------------------------

    async def invoke_client(
        self, connection_id: str, method: str, args: tuple[Any, ...], timeout: float | None
    ) -> Any:
        """Invoke ``method`` on one client and wait for its result (§2.5)."""
        invocation_id = self.server.next_invocation_id()
        invocation = InvocationMessage(method, args, invocation_id=invocation_id)
        pending = _PendingResult(connection_id)
        self._pending[invocation_id] = pending
        try:
            client = self.local_clients.get(connection_id)
            if client is not None and client.protocol is not None and self.default_routing:
                targets = [client.service_connection]
                payloads = {client.protocol.name: client.protocol.write(invocation)}
            else:
                targets = await self._targets(Route(CONNECTIONS, (connection_id,)))
                payloads = self._payloads(invocation)
            # An endpoint that does not hold the client answers ErrorCompletion: the call
            # fails only when every endpoint did.
            pending.errors_left = len(targets)
            message = ClientInvocationMessage(
                invocation_id, connection_id, self.server_id, payloads
            )
            await self._write_everywhere(targets, message)
            with anyio.fail_after(timeout):
                await pending.done.wait()
        finally:
            self._pending.pop(invocation_id, None)
        if pending.error is not None:
            raise HubException(pending.error)
        return pending.result

    async def client_completed(
        self, client: ClientConnection, completion: CompletionMessage
    ) -> None:
        """A client sent a Completion (the result of a server-to-client invocation)."""
        invocation_id = completion.invocation_id
        pending = self._pending.get(invocation_id)
        if pending is not None and pending.connection_id == client.connection_id:
            pending.resolve(completion)
            # The caller's cleanup ClientCompletion: the service may forget the invocation.
            await self._send_quietly(
                client.service_connection,
                ClientCompletionMessage(
                    invocation_id, client.connection_id, self.server_id, client.protocol_name, b""
                ),
            )
            return
        routed = self._routed.pop(invocation_id, None)
        if routed is not None and routed.connection_id == client.connection_id:
            await self._forward(client, routed, completion)
            return
        # The ClientInvocation telling us who waits may still be on its way.
        self._orphans[invocation_id] = (client, completion)
        while len(self._orphans) > _MAX_ORPHANS:
            self._orphans.popitem(last=False)

    async def _forward(
        self,
        client: ClientConnection,
        routed: ClientInvocationMessage,
        completion: CompletionMessage,
    ) -> None:
        assert client.protocol is not None
        await self._send_quietly(
            client.service_connection,
            ClientCompletionMessage(
                routed.invocation_id,
                client.connection_id,
                routed.caller_server_id,
                client.protocol.name,
                client.protocol.write(completion),
            ),
        )

    @staticmethod
    async def _send_quietly(connection: ServiceConnection, message: ServiceMessage) -> None:
        try:
            await connection.send(message)
        except ServiceUnavailableError as exc:
            _log.info("could not send %s: %s", type(message).__name__, exc)

    async def routed_invocation(self, message: ClientInvocationMessage) -> None:
        """The service says another server invoked a client this server owns."""
        if message.caller_server_id == self.server_id:
            return
        orphan = self._orphans.pop(message.invocation_id, None)
        if orphan is not None and orphan[0].connection_id == message.connection_id:
            await self._forward(orphan[0], message, orphan[1])
            return
        if message.connection_id in self.local_clients:
            self._routed[message.invocation_id] = message

    def completion_from_service(self, message: ClientCompletionMessage) -> None:
        """A client's result relayed by the service to this (caller) server."""
        pending = self._pending.get(message.invocation_id)
        if pending is None or not message.payload:
            return  # someone else's, or a cleanup echo
        try:
            protocol = get_protocol(message.protocol or "json")
            messages, _consumed = protocol.parse(message.payload)
        except (UnsupportedProtocolError, RemoteProtocolError) as exc:
            pending.fail(f"Invalid client result: {exc}")
            return
        for item in messages:
            if isinstance(item, CompletionMessage):
                pending.resolve(item)
                return
        pending.fail("Invalid client result: no completion message in the payload")

    def error_from_service(self, message: ErrorCompletionMessage) -> None:
        """The service says a client invocation failed (client gone, timeout)."""
        self._routed.pop(message.invocation_id, None)
        pending = self._pending.get(message.invocation_id)
        if pending is None:
            return
        pending.errors_left -= 1
        if pending.errors_left <= 0:
            pending.fail(message.error or "Invocation failed.")

    def client_gone(self, client: ClientConnection) -> None:
        """Forget a client that left; fail the results still awaited from it."""
        if self.local_clients.get(client.connection_id) is client:
            del self.local_clients[client.connection_id]
        for pending in self._pending.values():
            if pending.connection_id == client.connection_id:
                pending.fail(f"Connection '{client.connection_id}' disconnected.")
        for invocation_id in [
            i for i, m in self._routed.items() if m.connection_id == client.connection_id
        ]:
            del self._routed[invocation_id]


class _ManagedEndpoint:
    """One configured endpoint of a ``HubServer`` and its state (every hub's container of it
    is in the same state)."""

    __slots__ = ("endpoint", "state")

    def __init__(self, endpoint: ServiceEndpoint, state: EndpointState = ACTIVE) -> None:
        self.endpoint = endpoint
        self.state: EndpointState = state


def _as_endpoint(endpoint: ServiceEndpoint | str) -> ServiceEndpoint:
    if isinstance(endpoint, str):
        return ServiceEndpoint(endpoint)
    if not isinstance(endpoint, ServiceEndpoint):
        raise TypeError(f"expected a ServiceEndpoint or a connection string, got {endpoint!r}")
    if isinstance(endpoint, HubServiceEndpoint):  # a router's view: back to configuration
        return ServiceEndpoint(endpoint.connection_string, endpoint.type, endpoint.name)
    return endpoint


def _file_signature(path: str | os.PathLike[str]) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


class HubServer:
    """An app server's side of the relay: hubs, server connections, negotiate.

    ::

        class Chat(Hub):
            async def send(self, text):
                await self.clients.all.send("message", self.context.user_id, text)

        server = HubServer(ServiceOptions.from_env())
        server.map_hub("chat", Chat)
        async with server:                       # server connections up, reconnecting
            doc = await server.negotiate("chat", user_id="alice")   # {"url", "accessToken"}
            await server.hub_context("chat").clients.all.send("hello")

    ``async with`` opens ``connection_count`` connections per hub to every endpoint and
    returns once each has made its first attempt (up or failed: failed ones keep retrying
    in the background). Leaving it tells the service (``shutdown fin:0``), waits briefly for
    the ``finack``, and closes the sockets.

    Several endpoints (service-protocol §11): primaries get server connections that carry
    clients, secondaries Weak ones that only deliver this server's messages. Negotiate and
    message routing follow ``ServiceOptions.endpoint_router``. Endpoints can be added and
    removed while the server runs (``add_endpoint``, ``remove_endpoint``,
    ``set_endpoints``, or a watched ``ServiceOptions.config_file``); every endpoint's status
    is in ``hub_endpoints(hub)``, and its changes come out of ``endpoint_events()``.
    """

    #: Make every server connection Weak, so that the service binds no client to this server
    #: (a subclass sets it: the management SDK's persistent transport only sends).
    weak_connections: bool = False

    def __init__(self, options: ServiceOptions) -> None:
        self.options = options
        #: Chooses endpoints for negotiate and for messages.
        self.endpoint_router: EndpointRouter = options.endpoint_router or EndpointRouter()
        self._managed: dict[str, _ManagedEndpoint] = {
            e.identity: _ManagedEndpoint(e) for e in options.all_endpoints()
        }
        #: ``X-ASRS-Server-Id`` and the ``nameid`` of this server's tokens.
        self.server_id = options.server_id or f"{socket.gethostname()}_{uuid.uuid4().hex}"
        self._routers: dict[str, HubRouter] = {}
        self._ack_ids = itertools.count(1)
        self._invocation_prefix = uuid.uuid4().hex[:12]
        self._invocation_ids = itertools.count(1)
        self._task_group: anyio.abc.TaskGroup | None = None
        self._running = False
        self._entered = False
        self._listeners: list[EndpointEvents] = []
        self._locks: dict[str, anyio.Lock] = {}
        self._generation = 0

    # Configuration -------------------------------------------------------------------------

    @property
    def endpoints(self) -> tuple[ServiceEndpoint, ...]:
        """The configured endpoints, de-duplicated (``ServiceOptions.all_endpoints``), with
        those added since and without those being removed."""
        return tuple(m.endpoint for m in self._managed.values() if m.state != REMOVING)

    def endpoint_states(self) -> list[tuple[ServiceEndpoint, EndpointState]]:
        """Every endpoint in the routing store and its state (internal)."""
        return [(m.endpoint, m.state) for m in self._managed.values()]

    def map_hub(
        self, name: str, hub_class: type[Hub], *, factory: Callable[[], Hub] | None = None
    ) -> None:
        """Serve ``hub_class`` as hub ``name`` (matched case-insensitively). ``factory``
        makes the hub instances (default: ``hub_class()``), e.g. to inject dependencies.

        Raises ``ValueError`` for an invalid or duplicate name, ``TypeError`` when
        ``hub_class`` is not a ``Hub`` subclass or two of its methods answer the same name.
        """
        if self._running:
            raise RuntimeError("map hubs before entering 'async with server'")
        if not isinstance(name, str) or not is_valid_hub_name(name):
            raise ValueError(
                f"hub name {name!r} is invalid; expected a letter then up to 127 letters, "
                "digits or _`,.[]"
            )
        if name.lower() in self._routers:
            raise ValueError(f"hub {name!r} is already mapped")
        self._routers[name.lower()] = HubRouter(self, name, hub_class, factory)

    def _router(self, hub: str) -> HubRouter:
        router = self._routers.get(hub.lower()) if isinstance(hub, str) else None
        if router is None:
            raise KeyError(f"hub {hub!r} is not mapped; mapped hubs: {sorted(self._routers)}")
        return router

    @property
    def hubs(self) -> list[str]:
        """The names of the mapped hubs, as given to ``map_hub``."""
        return [router.name for router in self._routers.values()]

    # Ids ----------------------------------------------------------------------------------

    def next_ack_id(self) -> int:
        """A fresh positive int32 ack id (§2.4)."""
        ack_id = next(self._ack_ids)
        if ack_id >= _MAX_ACK_ID:
            self._ack_ids = itertools.count(2)
            ack_id = 1
        return ack_id

    def next_invocation_id(self) -> str:
        """A fresh invocation id for a server-to-client invocation, unique across servers."""
        return f"{self._invocation_prefix}-{next(self._invocation_ids)}"

    # Lifetime -----------------------------------------------------------------------------

    async def __aenter__(self) -> HubServer:
        if not self._routers:
            raise RuntimeError("no hub is mapped; call server.map_hub(name, HubClass) first")
        if self._entered:
            raise RuntimeError("a HubServer runs once; make a new one to start again")
        self._entered = True
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        self._running = True
        containers = [c for router in self._routers.values() for c in router.containers]
        try:
            for container in containers:
                task_group.start_soon(container.run)
            with anyio.move_on_after(self.options.handshake_timeout + 1):
                for container in containers:
                    await container.ready.wait()
            config_file = self.options.config_file
            if config_file is not None:
                task_group.start_soon(self._watch_config, config_file, _file_signature(config_file))
        except BaseException:
            self._running = False
            task_group.cancel_scope.cancel()
            await task_group.__aexit__(*sys.exc_info())
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        task_group = self._task_group
        assert task_group is not None, "HubServer.__aexit__ without __aenter__"
        up = sum(
            connection.connected
            for router in self._routers.values()
            for container in router.containers
            for connection in container.connections
        )
        try:
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(self.options.shutdown_timeout):
                    async with anyio.create_task_group() as shutdowns:
                        for router in self._routers.values():
                            for container in router.containers:
                                for connection in container.connections:
                                    shutdowns.start_soon(connection.shutdown)
        finally:
            self._running = False
            task_group.cancel_scope.cancel()
            self._task_group = None
            try:
                # The body's own exception propagates as is (not wrapped in an ExceptionGroup).
                await task_group.__aexit__(None, None, None)
            finally:
                for listener in list(self._listeners):
                    listener.close()
                for router in self._routers.values():
                    for container in router.containers:
                        container.notify()  # wake a staging that waits for them
                _log.info(
                    "app server %s stopped: %d server connections closed", self.server_id, up
                )
        return None

    # Status --------------------------------------------------------------------------------

    def hub_endpoints(self, hub: str) -> list[HubServiceEndpoint]:
        """Every endpoint of ``hub`` with its live ``online`` and ``metrics``: those being
        added and removed included (the endpoints routers see for messages)."""
        return [c.hub_endpoint for c in self._router(hub).containers]

    def online_endpoints(self, hub: str) -> list[HubServiceEndpoint]:
        """The endpoints with at least one server connection up for ``hub``."""
        return [c.hub_endpoint for c in self._router(hub).online()]

    async def wait_online(self, hub: str | None = None) -> None:
        """Wait until every endpoint has a connection up for ``hub`` (every hub when
        ``None``). Bound it with ``anyio.fail_after``."""
        routers = [self._router(hub)] if hub is not None else list(self._routers.values())
        for router in routers:
            for container in list(router.containers):
                await container.wait_until(lambda c: c.online)

    def endpoint_events(self) -> EndpointEvents:
        """Every ``EndpointStatusEvent`` from now on, as an async iterator that ends when the
        server stops (see ``EndpointEvents``)::

            async with server.endpoint_events() as events:
                async for event in events:
                    ...
        """
        events = EndpointEvents(self._unsubscribe)
        if self._entered and not self._running:
            events.close()
        else:
            self._listeners.append(events)
        return events

    def _unsubscribe(self, events: EndpointEvents) -> None:
        if events in self._listeners:
            self._listeners.remove(events)

    def refusal(self, hub: str) -> str | None:
        """Why no endpoint offered to clients of ``hub`` is online, when the service refuses
        this app server's connections (a wrong access key: HTTP 401 and the relay's reason);
        ``None`` when an endpoint is online or none was refused. Negotiate answers it."""
        offered = [c for c in self._router(hub).containers if c.state == ACTIVE]
        if any(c.online for c in offered):
            return None
        reasons = [reason for c in offered if (reason := c.refusal()) is not None]
        return "; ".join(reasons) or None

    def publish_status(self, event: EndpointStatusEvent) -> None:
        """Publish an endpoint's status change (called by its container)."""
        publish_status(self._listeners, self.options.on_endpoint_status, event)

    # Endpoints at run time ----------------------------------------------------------------

    def _lock(self, identity: str) -> anyio.Lock:
        lock = self._locks.get(identity)
        if lock is None:
            lock = self._locks[identity] = anyio.Lock()
        return lock

    def _check_usable(self) -> None:
        if self._entered and not self._running:
            raise RuntimeError("the server has stopped; endpoints can no longer change")

    def _find(self, endpoint: ServiceEndpoint | str) -> _ManagedEndpoint:
        if isinstance(endpoint, ServiceEndpoint):
            managed = self._managed.get(endpoint.identity)
            if managed is None:
                raise ValueError(f"endpoint {endpoint} is not configured")
            return managed
        if not isinstance(endpoint, str):
            raise TypeError(f"expected a ServiceEndpoint or an endpoint name, got {endpoint!r}")
        found = [m for m in self._managed.values() if m.endpoint.name == endpoint]
        if not found:
            names = sorted(m.endpoint.name for m in self._managed.values())
            raise ValueError(f"no endpoint is named {endpoint!r}; endpoints: {names}")
        if len(found) > 1:
            raise ValueError(
                f"{len(found)} endpoints are named {endpoint!r}; pass the ServiceEndpoint"
            )
        return found[0]

    async def add_endpoint(self, endpoint: ServiceEndpoint | str) -> bool:
        """Add an endpoint (a ``ServiceEndpoint``, or a connection string for an unnamed
        primary) and return once it is offered to new clients (§11.3 Add).

        While the server runs, every hub first opens its server connections to it (messages
        already go to it), then the SDK waits until the endpoint's ``servers`` list matches
        the other endpoints' (every app server connected to them is connected to it too, so
        that none misses a client that lands there). Only then does negotiate offer it.
        That staging is bounded by ``server_scale_timeout``: past it an error is logged, the
        endpoint is offered anyway and the result is ``False``; otherwise ``True``.

        Raises ``ValueError`` when an endpoint with the same ``{scheme}://{host}:{port}`` is
        already configured (or still being removed).
        """
        endpoint = _as_endpoint(endpoint)
        self._check_usable()
        async with self._lock(endpoint.identity):
            existing = self._managed.get(endpoint.identity)
            if existing is not None:
                raise ValueError(
                    f"endpoint {endpoint} is already configured as {existing.endpoint} "
                    f"({existing.state})"
                )
            return await self._add(endpoint)

    async def remove_endpoint(self, endpoint: ServiceEndpoint | str) -> bool:
        """Remove an endpoint (a ``ServiceEndpoint``, or its name) and return once its server
        connections are closed (§11.3 Remove).

        Negotiate stops offering it at once, and the service is told (``shutdown fin:0``)
        to bind no new client to this server there. Messages still go to it until the
        service says (``status`` "0") that no client bound to this server is left, or until
        ``server_scale_timeout`` (an error is logged; the result is then ``False``). Then
        its connections close.

        Raises ``ValueError`` when it is not configured, or when it is the last primary.
        """
        self._check_usable()
        managed = self._find(endpoint)
        identity = managed.endpoint.identity
        async with self._lock(identity):
            managed = self._find(managed.endpoint)
            others = [m.endpoint for m in self._managed.values() if m is not managed]
            if not any(e.type is EndpointType.PRIMARY for e in others):
                raise ValueError(
                    f"cannot remove {managed.endpoint}: at least one primary endpoint must remain"
                )
            return await self._remove(managed)

    async def set_endpoints(self, endpoints: Iterable[ServiceEndpoint | str]) -> bool:
        """Make the server's endpoints ``endpoints``: add the new ones, remove the missing
        ones, and take a new name, role or key of an existing one in place (its connections
        stay, §11.3). Additions and removals run concurrently, as ``add_endpoint`` and
        ``remove_endpoint`` do them; returns ``True`` when every one finished in time.

        This is what a change of the watched ``ServiceOptions.config_file`` does. A newer
        call supersedes the changes of an older one that have not started yet.
        """
        wanted = {e.identity: e for e in select_endpoints(_as_endpoint(e) for e in endpoints)}
        self._check_usable()
        self._generation += 1
        generation = self._generation
        results: list[bool] = []
        async with anyio.create_task_group() as task_group:
            for identity in dict.fromkeys([*self._managed, *wanted]):
                task_group.start_soon(
                    self._reconcile, identity, wanted.get(identity), generation, results
                )
        return all(results)

    async def _reconcile(
        self,
        identity: str,
        target: ServiceEndpoint | None,
        generation: int,
        results: list[bool],
    ) -> None:
        async with self._lock(identity):
            if generation != self._generation:
                return  # a newer set_endpoints decides
            managed = self._managed.get(identity)
            if target is None:
                if managed is not None:
                    results.append(await self._remove(managed))
            elif managed is None:
                results.append(await self._add(target))
            elif managed.endpoint != target:
                self._swap(managed, target)

    def _swap(self, managed: _ManagedEndpoint, endpoint: ServiceEndpoint) -> None:
        _log.info("endpoint %s is now %s", managed.endpoint, endpoint)
        managed.endpoint = endpoint
        for router in self._routers.values():
            for container in router.containers_of(endpoint.identity):
                container.swap(endpoint)

    async def _add(self, endpoint: ServiceEndpoint) -> bool:
        running = self._running
        managed = _ManagedEndpoint(endpoint, STAGING if running else ACTIVE)
        self._managed[endpoint.identity] = managed
        containers = [r.add_container(endpoint, managed.state) for r in self._routers.values()]
        if not running:
            return True
        assert self._task_group is not None
        for container in containers:
            self._task_group.start_soon(container.run)
        _log.info(
            "adding endpoint %s: staging until every hub's server connections to it are up",
            endpoint,
        )
        staged = False
        waiting_for = "the server connections"
        try:
            with anyio.move_on_after(self.options.server_scale_timeout):
                for container in containers:
                    waiting_for = f"the server connections of hub {container.router.name}"
                    await container.wait_until(
                        lambda c: not self._running or all(x.connected for x in c.connections)
                    )
                for container in containers:
                    waiting_for = (
                        f"the servers of hub {container.router.name} on it to match those on "
                        "the other endpoints"
                    )
                    await self._servers_agree(container)
                staged = self._running
        finally:
            # Offered to clients even when the staging did not finish, as the Azure SDK
            # does: nothing more can be done from this side.
            managed.state = ACTIVE
            for container in containers:
                container.state = ACTIVE
        if staged:
            _log.info("endpoint %s added: offered to new clients", endpoint)
        elif not self._running:
            _log.info("adding endpoint %s: the server stopped", endpoint)
        else:
            _log.error(
                "adding endpoint %s: staging did not finish within server_scale_timeout "
                "(%s s), still waiting for %s; it is offered to new clients anyway, and "
                "messages from app servers not connected to it may miss its clients",
                endpoint,
                self.options.server_scale_timeout,
                waiting_for,
            )
        return staged

    async def _servers_agree(self, new: EndpointHub) -> None:
        """Return once the ``servers`` reply of ``new`` equals (case-insensitively) those of
        the hub's other online endpoints (§11.3 Add, step 4): every app server of the hub
        is connected to it. Asks every ``scale_poll_interval``; the caller bounds it."""
        interval = self.options.scale_poll_interval
        while self._running:
            others = [c for c in new.router.containers if c is not new and c.online]
            if not others:
                return
            asked = [new, *others]
            counts = {id(c): c.servers_replies for c in asked}
            for container in asked:
                await container.ask(PingKey.SERVERS)

            def answered(c: EndpointHub, counts: dict[int, int] = counts) -> bool:
                return c.servers_replies > counts[id(c)]

            with anyio.move_on_after(interval):
                for container in asked:
                    await container.wait_until(lambda c: answered(c) or not c.online)
            live = [c for c in asked if c.online]
            if new in live and all(answered(c) for c in live):
                if len({c.servers for c in live}) == 1:
                    return
                _log.debug(
                    "endpoint %s of hub %s: servers %s, elsewhere %s",
                    new.endpoint,
                    new.router.name,
                    new.servers,
                    [c.servers for c in live if c is not new],
                )
            await anyio.sleep(interval)

    async def _remove(self, managed: _ManagedEndpoint) -> bool:
        endpoint = managed.endpoint
        identity = endpoint.identity
        managed.state = REMOVING
        containers = [c for r in self._routers.values() for c in r.containers_of(identity)]
        for container in containers:
            container.state = REMOVING
        drained = not self._running
        try:
            if self._running:
                _log.info(
                    "removing endpoint %s: no new clients; its connections close once its "
                    "clients left",
                    endpoint,
                )
                with anyio.move_on_after(self.options.server_scale_timeout):
                    for container in containers:
                        await container.send_fin()
                    async with anyio.create_task_group() as task_group:
                        for container in containers:
                            task_group.start_soon(container.drain, self.options.scale_poll_interval)
                    drained = True
                if not drained:
                    _log.error(
                        "removing endpoint %s: clients still connected after "
                        "server_scale_timeout (%s s); closing its connections anyway",
                        endpoint,
                        self.options.server_scale_timeout,
                    )
        finally:
            for container in containers:
                container.router.containers.remove(container)
                container.stop()
            if self._managed.get(identity) is managed:
                del self._managed[identity]
        if self._running:
            with anyio.move_on_after(self.options.shutdown_timeout):
                for container in containers:
                    await container.stopped.wait()
            _log.info("endpoint %s removed", endpoint)
        return drained

    async def _watch_config(
        self, path: str | os.PathLike[str], last: tuple[int, int, int] | None
    ) -> None:
        """Apply the endpoints of ``path`` whenever it changes from ``last`` (polling its
        modification time, size and inode every ``config_reload_interval``)."""
        while True:
            await anyio.sleep(self.options.config_reload_interval)
            signature = _file_signature(path)
            if signature == last:
                continue
            last = signature
            try:
                endpoints = ServiceOptions.from_file(path, watch=False).all_endpoints()
            except ValueError as exc:
                _log.error("configuration not reloaded: %s", exc)
                continue
            _log.info("configuration file %s changed: applying its endpoints", os.fspath(path))
            assert self._task_group is not None
            self._task_group.start_soon(self._reload, endpoints)

    async def _reload(self, endpoints: Sequence[ServiceEndpoint]) -> None:
        try:
            await self.set_endpoints(endpoints)
        except Exception:
            _log.exception("applying the reloaded endpoints failed")

    # The API --------------------------------------------------------------------------------

    def hub_context(self, hub: str) -> HubContext:
        """``clients``, ``groups`` and ``user_groups`` of ``hub``, for code outside hub
        methods (a background job; another pod)."""
        router = self._router(hub)
        return HubContext(HubClients(router), GroupManager(router), UserGroupManager(router))

    async def negotiate(
        self,
        hub: str,
        user_id: str | None = None,
        claims: Mapping[str, Any] | None = None,
        lifetime: float | None = None,
        *,
        path: str | None = None,
        query: str | None = None,
        headers: Mapping[str, str] | None = None,
        scope: Mapping[str, Any] | None = None,
        endpoint: ServiceEndpoint | None = None,
    ) -> dict[str, Any]:
        """The negotiate redirect for a client of ``hub``: ``{"url", "accessToken"}``.

        The endpoint is the router's ``get_negotiate_endpoint`` among the endpoints offered
        to clients (not those being added or removed); by default a random online primary,
        else an online secondary (§11.2). The token is signed with that endpoint's key,
        carries ``asrs.s.uid`` = ``user_id`` and the user's ``claims`` (§9.2), and lives
        ``lifetime`` seconds (default ``access_token_lifetime``). ``path`` (the app's hub
        path, sent as ``asrs.op``) and ``query`` (the negotiate request's query) are appended
        to the URL as the Azure SDK does; ``headers`` and ``scope`` (the HTTP request's)
        are only for the router (``NegotiateRequest``). ``endpoint`` (one of the hub's)
        bypasses the router: the redirect is to that endpoint, online or not.

        Raises ``ServiceUnavailableError`` when no endpoint is online (or the router chose
        none; it says why when the service refuses this app server's connections, e.g. a
        wrong access key), and whatever the router raises (``NegotiateError`` to refuse the
        request).
        """
        router = self._router(hub)
        request = NegotiateRequest(
            hub=hub,
            user_id=user_id,
            claims=dict(claims or {}),
            path=path,
            query=(query or "").lstrip("?&"),
            headers=dict(headers or {}),
            scope=scope,
        )
        if endpoint is None:
            offered = [c.hub_endpoint for c in router.containers if c.state == ACTIVE]
            try:
                chosen = await _resolve(
                    self.endpoint_router.get_negotiate_endpoint(request, offered)
                )
            except ServiceUnavailableError as exc:
                refusal = self.refusal(hub)
                if refusal is None:
                    raise
                raise ServiceUnavailableError(refusal) from exc
            if chosen is None:
                raise ServiceUnavailableError(
                    f"the endpoint router chose no endpoint for a client of hub {hub!r}"
                )
        else:
            chosen = endpoint
        endpoint = router.container_for(chosen).endpoint
        connection = endpoint.connection
        url = connection.client_url(router.wire_name)
        if path:
            url += f"&asrs.op={quote(path, safe='')}"
        if request.query:
            url += f"&{request.query}"
        token_claims: dict[str, Any] = dict(claims or {})
        count = len(self.endpoints)
        if count > 1:
            token_claims["asrs.s.secn"] = str(count)
        if self.options.enable_detailed_errors:
            token_claims["asrs.s.derror"] = "True"
        token = generate_access_token(
            endpoint.access_key,
            connection.client_audience(router.wire_name),
            now=time.time(),
            lifetime=self.options.access_token_lifetime if lifetime is None else lifetime,
            user_id=user_id,
            claims=token_claims,
        )
        return negotiate_redirect(url, token)

    def asgi(
        self,
        *,
        user_id_provider: UserIdProvider | None = None,
        cors_origins: tuple[str, ...] | list[str] = ("*",),
    ) -> NegotiateApp:
        """An ASGI app serving ``POST /{hub}/negotiate`` (see ``NegotiateApp``)::

        app = FastAPI(lifespan=lifespan)       # lifespan: async with server: yield
        app.mount("/hubs", server.asgi())      # clients use https://app/hubs/chat
        """
        from ._asgi import NegotiateApp

        return NegotiateApp(self, user_id_provider=user_id_provider, cors_origins=cors_origins)
