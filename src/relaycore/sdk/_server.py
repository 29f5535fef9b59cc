"""``HubServer``: maps hubs, keeps their server connections, routes what hubs send.

Routing (service-protocol §7, §11.2):

* A send is serialised **once** per hub protocol (``{"json": ..., "messagepack": ...}``) into
  one service message, written on one connection of every online endpoint; each endpoint
  delivers to the clients it holds. A send to one client connected to this very server goes
  only on the connection that owns it, in that client's protocol only.
* Inside a hub method, the connection that owns the caller is preferred on its endpoint, so
  that the method's sends, group changes and completion stay in order; elsewhere the first
  connected slot of each endpoint is used (one task's sends stay in order).
* ``...WithAck`` requests go to every online endpoint and wait for all the Acks; the answer is
  true if any endpoint says Ok, and an error from any endpoint is raised.
* Client results: the invocation goes out as ClientInvocation; the client's Completion comes
  back as ConnectionData to whichever server owns the client. The owner resolves it directly
  when it is also the caller, or forwards it as ClientCompletion for the service to relay to
  the caller (§2.5).
"""

from __future__ import annotations

import itertools
import logging
import random
import socket
import sys
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final
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
from ._connection import EndpointHub, ServiceConnection
from ._errors import AckTimeoutError, HubException, ServiceError, ServiceUnavailableError
from ._hub import GroupManager, Hub, HubClients, HubContext, HubMethodTable, UserGroupManager
from ._options import EndpointType, ServiceEndpoint, ServiceOptions

if TYPE_CHECKING:
    from ._asgi import NegotiateApp, UserIdProvider

__all__ = ["HubRouter", "HubServer"]

_log = logging.getLogger("relaycore.sdk")

_PROTOCOLS: Final = (JsonHubProtocol(), MessagePackHubProtocol())
#: Ack ids are positive int32 values (§2.4).
_MAX_ACK_ID: Final = 0x7FFFFFFF
#: Completions that arrived before the service's ClientInvocation told us where they go.
_MAX_ORPHANS: Final = 1024

#: §10: the .NET SDK's negotiate error when no endpoint is online.
NOT_CONNECTED_MESSAGE: Final = "Azure SignalR Service is not connected yet, please try again later."


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
        self.containers = [EndpointHub(self, endpoint) for endpoint in server.endpoints]
        #: Clients owned by this server's connections, by connection id.
        self.local_clients: dict[str, ClientConnection] = {}
        self._pending: dict[str, _PendingResult] = {}
        self._routed: dict[str, ClientInvocationMessage] = {}
        self._orphans: OrderedDict[str, tuple[ClientConnection, CompletionMessage]] = OrderedDict()

    # Choosing connections ------------------------------------------------------------------

    def online(self) -> list[EndpointHub]:
        """The containers with at least one connection up."""
        return [c for c in self.containers if c.online]

    def _targets(self) -> list[ServiceConnection]:
        preferred = current_service_connection.get()
        targets = []
        for container in self.containers:
            connection = container.pick(preferred)
            if connection is not None:
                targets.append(connection)
        if not targets:
            raise ServiceUnavailableError(
                f"no endpoint is online for hub {self.name!r}; {NOT_CONNECTED_MESSAGE}"
            )
        return targets

    def negotiate_container(self) -> EndpointHub:
        """The endpoint a new client goes to (§11.2): an online primary, else an online
        secondary, weighted by the capacity the service reports when every candidate does."""
        online = self.online()
        candidates = [c for c in online if c.endpoint.type is EndpointType.PRIMARY] or online
        if not candidates:
            raise ServiceUnavailableError(NOT_CONNECTED_MESSAGE)
        if len(candidates) == 1 or any(c.capacity == 0 for c in candidates):
            return random.choice(candidates)
        weights = [
            max((c.capacity - (c.client_count + c.server_count)) * 1000 // c.capacity, 1)
            for c in candidates
        ]
        return random.choices(candidates, weights)[0]

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
    ) -> None:
        """Send an invocation of ``method`` to the clients ``build`` addresses."""
        invocation = InvocationMessage(method, args)
        if connection_id is not None:
            client = self.local_clients.get(connection_id)
            if client is not None and client.protocol is not None:
                payloads = {client.protocol.name: client.protocol.write(invocation)}
                await client.service_connection.send(build(payloads))
                return
        await self._write_everywhere(self._targets(), build(self._payloads(invocation)))

    async def request_ack(
        self, build: Callable[[int], ServiceMessage], *, connection_scoped: bool
    ) -> bool:
        """Send a ``...WithAck`` request to every online endpoint; True if any says Ok."""
        targets = self._targets()
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
            if client is not None and client.protocol is not None:
                targets = [client.service_connection]
                payloads = {client.protocol.name: client.protocol.write(invocation)}
            else:
                targets = self._targets()
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
    """

    def __init__(self, options: ServiceOptions) -> None:
        self.options = options
        #: Every endpoint, de-duplicated (``ServiceOptions.all_endpoints``).
        self.endpoints: tuple[ServiceEndpoint, ...] = options.all_endpoints()
        #: ``X-ASRS-Server-Id`` and the ``nameid`` of this server's tokens.
        self.server_id = options.server_id or f"{socket.gethostname()}_{uuid.uuid4().hex}"
        self._routers: dict[str, HubRouter] = {}
        self._ack_ids = itertools.count(1)
        self._invocation_prefix = uuid.uuid4().hex[:12]
        self._invocation_ids = itertools.count(1)
        self._task_group: anyio.abc.TaskGroup | None = None
        self._running = False
        self._entered = False

    # Configuration -------------------------------------------------------------------------

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
            # The body's own exception propagates as is (not wrapped in an ExceptionGroup).
            await task_group.__aexit__(None, None, None)
        return None

    # Status --------------------------------------------------------------------------------

    def online_endpoints(self, hub: str) -> list[ServiceEndpoint]:
        """The endpoints with at least one server connection up for ``hub``."""
        return [c.endpoint for c in self._router(hub).online()]

    async def wait_online(self, hub: str | None = None) -> None:
        """Wait until every endpoint has a connection up for ``hub`` (every hub when
        ``None``). Bound it with ``anyio.fail_after``."""
        routers = [self._router(hub)] if hub is not None else list(self._routers.values())
        while not all(c.online for r in routers for c in r.containers):
            await anyio.sleep(0.05)

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
    ) -> dict[str, Any]:
        """The negotiate redirect for a client of ``hub``: ``{"url", "accessToken"}``.

        The endpoint is chosen as in §11.2 (a random online primary, else an online
        secondary); the token is signed with that endpoint's key, carries ``asrs.s.uid`` =
        ``user_id`` and the user's ``claims`` (§9.2), and lives ``lifetime`` seconds
        (default ``access_token_lifetime``). ``path`` (the app's hub path, sent as
        ``asrs.op``) and ``query`` (the negotiate request's query) are appended to the URL
        as the Azure SDK does. Raises ``ServiceUnavailableError`` when no endpoint is online.
        """
        router = self._router(hub)
        container = router.negotiate_container()
        endpoint = container.endpoint
        connection = endpoint.connection
        url = connection.client_url(router.wire_name)
        if path:
            url += f"&asrs.op={quote(path, safe='')}"
        if query:
            url += f"&{query.lstrip('?&')}"
        token_claims: dict[str, Any] = dict(claims or {})
        if len(self.endpoints) > 1:
            token_claims["asrs.s.secn"] = str(len(self.endpoints))
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
