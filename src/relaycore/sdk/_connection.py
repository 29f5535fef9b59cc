"""Server connections: the persistent WebSockets from this app server to the service.

Theory of operation
-------------------

Every hub gets, on every endpoint, an ``EndpointHub`` holding ``connection_count`` numbered
``ServiceConnection`` slots (service-protocol §4.2, §11.1). A slot is one task looping over
*sessions*:

1. CONNECTING: open ``{server_base}server/?hub={wire hub}&cid={new uuid}`` with a fresh server
   token (§3.1, §3.2), send the ServiceHandshakeRequest (Default, or Weak on a secondary
   endpoint) and wait for the HandshakeResponse; the whole step is bounded by
   ``handshake_timeout`` (15 s).
2. CONNECTED: one reader loop parses the byte stream into service messages and handles them in
   order (§4.3): OpenConnection starts a logical client (``ClientConnection``) in the session's
   task group, ConnectionData feeds it, CloseConnection ends it, Ack completes a waiting
   request, pings are answered (§4.4). Whenever something arrives and nothing was sent for
   ``keep_alive_interval`` (5 s), a keep-alive ping goes out; when nothing arrives for
   ``service_timeout`` (30 s) the session is dropped (a watchdog task beside the reader
   looks, so that a read costs no timer of its own).
3. DISCONNECTED: the session ends (socket closed, ServiceError, protocol error, silence). Its
   logical clients are ended at once (the service closes them on its side, §4.5) and waiting
   acks fail. The slot sleeps ``retry_delay(n)`` after the n-th consecutive failure (1, 2, 4 ...
   60 s plus jitter) and starts again; a successful handshake resets n.

Writers (hub methods, background jobs, acks) call ``send`` from any task; it queues the
message on the WebSocket and returns, and the session's writer task writes what was queued in
one scheduling round with one write (``WebSocketConnection.run_writer``): a loop of sends, or
the answers to a read's worth of client messages, costs one system call, not one each.
``EndpointHub.run`` also sends ``status`` pings every ``status_interval`` (10 s) on one
connected slot, and keeps the endpoint metrics the service reports in pings.

An ``EndpointHub`` is in one of three states (service-protocol §11.3), moved by the
``HubServer`` only:

* STAGING: added at run time; its connections are coming up. Messages go to it (it is in the
  routing store) but negotiate does not offer it yet.
* ACTIVE: offered to new clients and sent messages.
* REMOVING: no longer offered; every session (including one that reconnects) has told the
  service ``shutdown fin:0`` so that it binds no new client to it; messages still go to it
  until the service says it holds no more clients of ours, then the server stops it.

Whenever a slot connects or disconnects, the container recomputes ``online`` and, when it
changed, publishes an ``EndpointStatusEvent`` through the server.

What is logged
--------------

The container speaks for its slots, so that an app server with ``connection_count`` slots
writes one line per event of the endpoint, not one per slot (each slot's own events are DEBUG):

* INFO once every slot is up: ``app server <id> connected to hub chat on <endpoint>: 5 server
  connections (default)``; again after an outage or a logged failure, never per reconnect.
* When the last slot's session ends: INFO if the service closed it normally (WebSocket close
  1000 or 1001: the relay drains), else WARNING, with the reason.
* Failed attempts are counted per container until every slot is up again (a *streak*). The
  first one is a WARNING (the relay's reason; for a refusal, the HTTP status and the relay's
  message, with a hint such as "check the access key"), unless an outage line already said the
  endpoint is down and it is not a refusal. Once a slot has failed ``_ERROR_AFTER`` (5) times
  in a row, an ERROR says so; while it lasts, at most one more ERROR every
  ``_REMIND_EVERY`` (5 minutes). Retrying never stops, as with the Azure SDK: a fixed key or a
  relay back brings the slots up, and the INFO line says after how many failed attempts.
* This app server stopping logs one INFO line (``HubServer``), no WARNING.

A refusal (HTTP 4xx on the upgrade, except 408 and 429) is also what negotiate answers while
no endpoint of the hub is online (``refusal``): a 503 that says why, not "not connected yet".

Above and below
---------------

The slots carry the clients and write for the hub's ``HubDispatcher``, both of which stand above
this module. So that it imports neither, it declares what it needs of them as protocols:
``Client`` (what a slot feeds and closes) and ``Dispatcher`` (the hub's identity, options and
clients, and where the service's word on client results goes). ``Channel`` is what it offers:
what the dispatcher writes on, implemented by ``ServiceConnection`` here and by the REST
transport's ``RestChannel``.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import random
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol
from urllib.parse import quote

import anyio
import anyio.abc
import orjson

from relaycore.protocol import (
    ASRS_INSTANCE_ID_HEADER,
    DEFAULT_MAX_SERVICE_MESSAGE_SIZE,
    ClientCompletionMessage,
    ClientInvocationMessage,
    CloseCode,
    CloseConnectionMessage,
    ConnectionDataMessage,
    ConnectionType,
    ErrorCompletionMessage,
    OpenConnectionMessage,
    PingKey,
    RemoteProtocolError,
    ServiceAckMessage,
    ServiceErrorMessage,
    ServiceEventMessage,
    ServiceHandshakeRequest,
    ServiceMessage,
    ServicePing,
    ServiceProtocolParser,
    check_service_handshake_response,
    generate_access_token,
    header_for,
    write_service_message,
)

from ._endpoints import (
    EndpointMetrics,
    EndpointStatusEvent,
    EndpointType,
    HubServiceEndpoint,
    ServiceEndpoint,
)
from ._errors import AckTimeoutError, ServiceUnavailableError
from ._hub import Hub, HubCallerContext, HubMethodTable, HubSender
from ._websocket import (
    WebSocketClosed,
    WebSocketConnection,
    WebSocketHandshakeError,
    connect_websocket,
    loop_clock,
)

if TYPE_CHECKING:
    from relaycore.protocol import (
        CompletionMessage,
        JsonHubProtocol,
        MessagePackHubProtocol,
    )

    from ._options import ServiceOptions

__all__ = [
    "ACTIVE",
    "REMOVING",
    "STAGING",
    "USER_AGENT",
    "Channel",
    "Client",
    "Dispatcher",
    "EndpointHub",
    "EndpointState",
    "ServiceConnection",
    "connection_type_name",
]

_log = logging.getLogger("relaycore.sdk")

#: ``EndpointHub.state`` values (see the module doc).
STAGING: Final = "staging"
ACTIVE: Final = "active"
REMOVING: Final = "removing"
EndpointState = Literal["staging", "active", "removing"]

#: ``Asrs-User-Agent`` of the SDK's requests: server connections and REST calls.
USER_AGENT: Final = (
    f"relaycore-sdk/0.1 (Python {platform.python_version()}; {platform.system()}; "
    f"{platform.machine()})"
)


#: A slot that failed this many times in a row makes its container log an ERROR (see "What is
#: logged"); with the default backoff that is about 15 s of failures.
_ERROR_AFTER: Final = 5
#: While the failures last, at most one more ERROR line per this many seconds.
_REMIND_EVERY: Final = 300.0
#: Upgrade answers that refuse this app server rather than fail for a moment: retrying does not
#: help until its configuration (key, endpoint) changes. 408 and 429 say "try again later".
_TRANSIENT_4XX: Final = frozenset({408, 429})
#: What to check first, by the status of a refusal.
_HINTS: Final = {
    401: "check the access key (AccessKey in the connection string)",
    403: "check the access key (AccessKey in the connection string)",
    404: "check the endpoint (Endpoint and Port in the connection string)",
}


def connection_type_name(connection_type: int) -> str:
    """``default``, ``ondemand`` or ``weak``: a connection type as the logs name it."""
    try:
        return ConnectionType(connection_type).name.lower().replace("_", "")
    except ValueError:
        return f"type {connection_type}"


@dataclasses.dataclass(frozen=True)
class _Problem:
    """Why a connection attempt failed or a session ended, for the log and negotiate."""

    #: What happened, in a few words (the relay's own message where it sent one).
    text: str
    #: The service refused this app server (HTTP 4xx on the upgrade): it will go on doing so
    #: until the configuration changes.
    refused: bool = False
    #: The service ended the session normally (close 1000/1001: it is shutting down).
    going_away: bool = False
    #: What to check, for a refusal.
    hint: str = ""


def _refusal_text(exc: WebSocketHandshakeError) -> str:
    """``HTTP 401 Unauthorized.bad_signature: The access token's ...``: the status and the
    relay's ``{"code", "message"}`` body (Azure's and relaycore's error shape), else the body
    as text."""
    text = f"HTTP {exc.status}"
    detail = ""
    try:
        body = orjson.loads(exc.body) if exc.body else None
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, dict):
        code, message = body.get("code"), body.get("message") or body.get("error")
        detail = ": ".join(str(part).rstrip(".") for part in (code, message) if part)
    elif exc.body:
        detail = exc.body[:200].decode("utf-8", "replace").strip()
    return f"{text} {detail}" if detail else text


def _problem_of(exc: BaseException, handshake_timeout: float) -> _Problem:
    """The problem an attempt or a session ended with (see ``ServiceConnection.run``)."""
    if isinstance(exc, _SessionEnded):
        return exc.problem
    if isinstance(exc, WebSocketHandshakeError) and exc.status is not None:
        if 400 <= exc.status <= 499 and exc.status not in _TRANSIENT_4XX:
            return _Problem(_refusal_text(exc), refused=True, hint=_HINTS.get(exc.status, ""))
        return _Problem(_refusal_text(exc))
    if isinstance(exc, TimeoutError):
        return _Problem(f"no handshake within handshake_timeout ({handshake_timeout:g} s)")
    return _Problem(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


class _SessionEnded(Exception):
    """Why a session ended (for the log); the slot reconnects."""

    def __init__(self, reason: str, *, going_away: bool = False) -> None:
        super().__init__(reason)
        self.problem = _Problem(reason, going_away=going_away)


class _AckWaiter:
    __slots__ = ("done", "lost", "message", "status")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.status = 0
        self.message: str | None = None
        self.lost = False


# --------------------------------------------------------------------------------------------
# What a server connection offers, and what it needs from the layers above


class Channel(Protocol):
    """What a hub's messages are written on, one for each endpoint they go to: a
    ``ServiceConnection``, or the management SDK's ``RestChannel`` (the REST API in the place
    of a server connection). ``EndpointHub.pick`` chooses one."""

    @property
    def endpoint(self) -> ServiceEndpoint:
        """The endpoint it reaches."""
        ...

    async def send(self, message: ServiceMessage) -> None:
        """Write one service message; ``ServiceUnavailableError`` when it cannot go out."""
        ...

    async def request_ack(
        self, message_for: Callable[[int], ServiceMessage], ack_id: int
    ) -> tuple[int, str | None]:
        """Send ``message_for(ack_id)`` and wait for its Ack: ``(status, message)``."""
        ...


class Client(Protocol):
    """A logical client, as the server connection that carries it and the hub's dispatcher
    see it (``_client.ClientConnection``)."""

    connection_id: str
    context: HubCallerContext
    #: The server connection that owns it: everything for the client goes out there.
    service_connection: ServiceConnection

    @property
    def protocol(self) -> JsonHubProtocol | MessagePackHubProtocol | None:
        """Its hub protocol, once its handshake is done."""
        ...

    @property
    def protocol_name(self) -> str: ...

    async def run(self) -> None:
        """Serve the client until it leaves."""
        ...

    async def feed(self, payload: bytes) -> None:
        """Hand over the bytes of one ConnectionData."""
        ...

    def close_input(self, error: BaseException | None = None, *, lost: bool = False) -> None:
        """The client left (``error``: why), or with ``lost`` its server connection did."""
        ...


class Dispatcher(HubSender, Protocol):
    """What the server connections of one hub, and the clients they carry, need from the hub's
    ``HubDispatcher``: its identity and options, its clients, and where the service's
    messages about them go."""

    #: The hub, as mapped.
    name: str
    #: The hub as the service knows it (``{application}_{hub}``).
    wire_name: str
    server_id: str
    options: ServiceOptions
    hub_factory: Callable[[], Hub]
    methods: HubMethodTable

    @property
    def weak_connections(self) -> bool:
        """Every server connection is Weak (``HubServer.weak_connections``)."""
        ...

    @property
    def local_clients(self) -> Mapping[str, Client]:
        """The clients of the hub this app server's connections own, by connection id."""
        ...

    def publish_status(self, event: EndpointStatusEvent) -> None:
        """An endpoint went online or offline for the hub."""
        ...

    def open_client(self, connection: ServiceConnection, message: OpenConnectionMessage) -> Client:
        """The client ``message`` announces, owned by ``connection`` (not yet running)."""
        ...

    def client_gone(self, client: Client) -> None:
        """Forget a client that left."""
        ...

    async def client_completed(self, client: Client, completion: CompletionMessage) -> None:
        """A client answered a server-to-client invocation (§2.5)."""
        ...

    async def client_result(
        self, message: ClientInvocationMessage | ClientCompletionMessage | ErrorCompletionMessage
    ) -> None:
        """The service's word on a client invocation (§2.5)."""
        ...


# --------------------------------------------------------------------------------------------
# A server connection slot


class ServiceConnection(Channel):
    """One server connection slot (see the module doc)."""

    def __init__(self, container: EndpointHub, index: int) -> None:
        self.container = container
        self.dispatcher = container.dispatcher
        self.options = container.dispatcher.options
        self.index = index
        #: Whether a session is established (handshake done, not yet dropped).
        self.connected = False
        #: The service's last ``status`` answer on this session: whether it still holds
        #: clients bound to this connection (``None``: not asked yet).
        self.has_clients: bool | None = None
        #: ``status`` answers received (the server waits for a fresh one).
        self.status_replies = 0
        #: The ``cid`` of the current or last session.
        self.cid = ""
        #: Consecutive failures, for the backoff.
        self.failures = 0
        #: Sessions established so far (tests watch it to see a reconnect).
        self.sessions = 0
        self.last_send = 0.0
        #: ``anyio.current_time`` of the session's loop (``loop_clock``): read per message.
        self._clock: Callable[[], float] = anyio.current_time
        #: The reader waits in a read (only then may the watchdog end the session), since
        #: ``_wait_started``.
        self._receiving = False
        self._wait_started = 0.0
        #: Logical clients owned by this connection, by connection id.
        self.clients: dict[str, Client] = {}
        self._ws: WebSocketConnection | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._acks: dict[int, _AckWaiter] = {}
        self._finack = anyio.Event()
        self.first_attempt = anyio.Event()

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        return (
            f"<ServiceConnection {self.dispatcher.wire_name}#{self.index} {self.endpoint} {state}>"
        )

    @property
    def endpoint(self) -> ServiceEndpoint:
        """The endpoint (its container's: a renamed endpoint keeps its connections)."""
        return self.container.endpoint

    def _set_connected(self, connected: bool) -> None:
        if self.connected != connected:
            self.connected = connected
            self.container.connection_changed()

    @property
    def connection_type(self) -> ConnectionType:
        """Default on a primary endpoint; Weak (never given clients) on a secondary one, and
        on every endpoint of a server that carries no clients (``HubServer.weak_connections``:
        the management SDK's persistent transport)."""
        if self.endpoint.type is EndpointType.SECONDARY or self.dispatcher.weak_connections:
            return ConnectionType.WEAK
        return ConnectionType.DEFAULT

    # The slot's task -----------------------------------------------------------------------

    async def run(self) -> None:
        """Keep a session up until cancelled, reconnecting with backoff. The container logs
        what went wrong (see "What is logged")."""
        while True:
            sessions = self.sessions
            try:
                await self._session()
                problem = _Problem("the service closed the connection", going_away=True)
            except (
                _SessionEnded,
                OSError,
                anyio.BrokenResourceError,
                TimeoutError,
                RemoteProtocolError,
            ) as exc:
                problem = _problem_of(exc, self.options.handshake_timeout)
            finally:
                self.first_attempt.set()
            delay = self.options.retry_delay(self.failures)
            self.failures += 1
            self.container.slot_failed(self, problem, self.sessions != sessions, delay)
            await anyio.sleep(delay)

    def _url_and_headers(self) -> tuple[str, list[tuple[str, str]]]:
        connection = self.endpoint.connection
        hub = self.dispatcher.wire_name
        self.cid = str(uuid.uuid4())
        url = f"{connection.server_base}server/?hub={quote(hub, safe='')}&cid={self.cid}"
        token = generate_access_token(
            self.endpoint.access_key,
            connection.server_audience(hub),
            now=time.time(),
            lifetime=self.options.access_token_lifetime,
            claims={"nameid": self.dispatcher.server_id},
        )
        headers = [
            ("Authorization", f"Bearer {token}"),
            ("X-ASRS-Server-Id", self.dispatcher.server_id),
            ("Asrs-User-Agent", USER_AGENT),
            ("X-Requested-With", "XMLHttpRequest"),
        ]
        return url, headers

    async def _session(self) -> None:
        url, headers = self._url_and_headers()
        self._clock = loop_clock()
        # ConnectionData, most of what arrives, comes as (connection id, payload) tuples.
        parser = ServiceProtocolParser(raw_connection_data=True)
        with anyio.fail_after(self.options.handshake_timeout):
            ws = await connect_websocket(
                url,
                headers,
                max_message_size=DEFAULT_MAX_SERVICE_MESSAGE_SIZE,
                write_timeout=self.options.service_timeout,
            )
            try:
                await ws.send(
                    write_service_message(
                        ServiceHandshakeRequest(connection_type=self.connection_type)
                    )
                )
                self.last_send = self._clock()
                pending = await self._handshake_response(ws, parser)
            except BaseException:
                await ws.aclose()
                raise
        self._ws = ws
        self._finack = anyio.Event()
        self.has_clients = None
        self.failures = 0
        self.sessions += 1
        self._set_connected(True)
        self.first_attempt.set()
        self.container.slot_up(self)
        if self.container.state == REMOVING:
            # Reconnected while the endpoint drains: the service must not bind clients to it.
            try:
                await self.send(ServicePing.of({PingKey.SHUTDOWN: "fin:0"}))
            except ServiceUnavailableError:
                pass  # the read loop sees the socket closed
        lost = ServiceUnavailableError(f"the server connection to {self.endpoint} was lost")
        ended: _SessionEnded | None = None
        try:
            async with anyio.create_task_group() as task_group:
                self._task_group = task_group
                task_group.start_soon(ws.run_writer)
                try:
                    await self._read_loop(ws, parser, pending)
                except _SessionEnded as exc:
                    ended = exc
                except Exception as exc:
                    # A bug, not the service's fault: log it whole, then reconnect.
                    _log.exception("server connection %s failed", self.index)
                    ended = _SessionEnded(f"{type(exc).__name__}: {exc}")
                finally:
                    self._set_connected(False)
                    self._ws = None
                    ws.stop_writer()  # once what is queued is written
                    for client in list(self.clients.values()):
                        client.close_input(lost, lost=True)
                    for waiter in self._acks.values():
                        waiter.lost = True
                        waiter.done.set()
        finally:
            self._set_connected(False)
            self._ws = None
            self._task_group = None
            self._finack.set()  # a shutdown waiting for the finack: no session, nothing to wait for
            await ws.aclose()
        if ended is not None:
            raise ended

    async def _handshake_response(
        self, ws: WebSocketConnection, parser: ServiceProtocolParser
    ) -> list[ServiceMessage | tuple[Any, ...]]:
        while True:
            data = await ws.receive()
            if isinstance(data, str):
                raise _SessionEnded("the service sent a text message; expected binary")
            parser.receive_data(data)
            messages: list[Any] = parser.items_received()
            if not messages:
                continue
            first = messages[0]
            if type(first) is tuple:
                first = ConnectionDataMessage(*first)
            try:
                check_service_handshake_response(first)
            except RemoteProtocolError as exc:
                raise _SessionEnded(str(exc)) from None
            return messages[1:]

    async def _read_loop(
        self,
        ws: WebSocketConnection,
        parser: ServiceProtocolParser,
        messages: list[ServiceMessage | tuple[Any, ...]],
    ) -> None:
        """Read and handle until the session ends; ``_SessionEnded`` says why (also after
        ``service_timeout`` of silence, which ``_watch_silence`` detects)."""
        assert self._task_group is not None
        reading = anyio.CancelScope()
        watching = anyio.CancelScope()
        self._task_group.start_soon(self._watch_silence, reading, watching)
        try:
            with reading:
                await self._read(ws, parser, messages)
        finally:
            watching.cancel()
        if reading.cancelled_caught:
            raise _SessionEnded(f"nothing received for {self.options.service_timeout} s")

    async def _watch_silence(self, reading: anyio.CancelScope, watching: anyio.CancelScope) -> None:
        """Cancel ``reading`` once the reader has waited ``service_timeout`` in one read."""
        timeout = self.options.service_timeout
        with watching:
            while True:
                if not self._receiving:
                    await anyio.sleep(timeout)  # a wait that starts meanwhile ends after it
                    continue
                left = self._wait_started + timeout - self._clock()
                if left <= 0:
                    reading.cancel()
                    return
                await anyio.sleep(left)

    async def _read(
        self,
        ws: WebSocketConnection,
        parser: ServiceProtocolParser,
        messages: list[ServiceMessage | tuple[Any, ...]],
    ) -> None:
        keep_alive_interval = self.options.keep_alive_interval
        clock = self._clock
        handle = self._handle
        for message in messages:
            if not await handle(message):
                return
        while True:
            self._wait_started = clock()
            self._receiving = True
            try:
                received = await ws.receive_some()
            except WebSocketClosed as exc:
                # 1000/1001: the service closed the session on purpose (a relay draining
                # says 1001 Going Away, RFC 6455 §7.4.1); 1006 and others: it was lost.
                normal = exc.code in (CloseCode.NORMAL_CLOSURE, CloseCode.GOING_AWAY)
                raise _SessionEnded(str(exc), going_away=normal) from None
            finally:
                self._receiving = False
            for data in received:
                if isinstance(data, str):
                    raise _SessionEnded("the service sent a text message; expected binary")
                try:
                    parser.receive_data(data)
                except RemoteProtocolError as exc:
                    raise _SessionEnded(f"bad data from the service: {exc}") from None
                for message in parser.items_received():
                    if not await handle(message):
                        return
            if clock() - self.last_send >= keep_alive_interval:
                await self._keep_alive()

    async def _keep_alive(self) -> None:
        ping = ServicePing.of(
            {
                PingKey.CLIENTS_IN_HUB: len(self.dispatcher.local_clients),
                PingKey.CLIENTS_ON_CONNECTION: len(self.clients),
            }
        )
        try:
            await self.send(ping)
        except ServiceUnavailableError:
            pass

    async def _handle(self, message: ServiceMessage | tuple[Any, ...]) -> bool:
        """Handle one message from the service; False ends the session."""
        if type(message) is tuple:  # ConnectionData, as the parser hands it out raw
            client = self.clients.get(message[0])
            if client is not None:
                await client.feed(message[1])
        elif isinstance(message, ConnectionDataMessage):
            client = self.clients.get(message.connection_id)
            if client is not None:
                await client.feed(message.payload)
        elif isinstance(message, OpenConnectionMessage):
            self._open_client(message)
        elif isinstance(message, CloseConnectionMessage):
            client = self.clients.get(message.connection_id)
            if client is not None:
                error = ConnectionError(message.error_message) if message.error_message else None
                client.close_input(error)
        elif isinstance(message, ServicePing):
            await self._ping(message)
        elif isinstance(message, ServiceAckMessage):
            waiter = self._acks.get(message.ack_id)
            if waiter is not None:
                waiter.status = message.status
                waiter.message = message.message
                waiter.done.set()
        elif isinstance(
            message, (ClientInvocationMessage, ClientCompletionMessage, ErrorCompletionMessage)
        ):
            await self.dispatcher.client_result(message)
        elif isinstance(message, ServiceErrorMessage):
            raise _SessionEnded(f"the service reported an error: {message.error_message}")
        elif isinstance(message, ServiceEventMessage):
            _log.info("service event on %s: %s", self.endpoint, message)
        # Anything else (ServiceMapping, flow control, ...) needs no action here.
        return True

    def _open_client(self, message: OpenConnectionMessage) -> None:
        if self.connection_type is ConnectionType.WEAK or self._task_group is None:
            _log.warning("ignoring client %s offered on a weak connection", message.connection_id)
            return
        if message.connection_id in self.clients:
            return
        client = self.dispatcher.open_client(self, message)
        self.clients[message.connection_id] = client
        self._task_group.start_soon(self._run_client, client)

    async def _run_client(self, client: Client) -> None:
        try:
            await client.run()
        except Exception:
            _log.exception("client connection %s failed", client.connection_id)
        finally:
            self.clients.pop(client.connection_id, None)
            self.dispatcher.client_gone(client)
            self.container.notify()

    async def _ping(self, ping: ServicePing) -> None:
        if ping.is_keep_alive:
            return
        if ping.get(PingKey.ECHO) is not None:
            await self.send(ping)
            return
        offline = ping.get(PingKey.OFFLINE)
        if offline is not None:
            for client in list(self.clients.values()):
                instance = header_for(client.context.headers, ASRS_INSTANCE_ID_HEADER)
                if instance and instance[0] == offline:
                    client.close_input(ConnectionError(f"service instance {offline} is offline"))
            return
        if ping.get(PingKey.SHUTDOWN) == PingKey.FIN_ACK:
            self._finack.set()
            return
        # §4.4: metrics from any ping, then status, else servers.
        self.container.read_metrics(ping)
        status = ping.get(PingKey.STATUS)
        if status is not None:
            self.has_clients = status == "1"
            self.status_replies += 1
            self.container.has_clients = self.has_clients
            self.container.notify()
            return
        servers = ping.get(PingKey.SERVERS)
        if servers is not None:
            self.container.servers_reply(servers)

    # Used by the dispatcher and the server ------------------------------------------------

    async def send(self, message: ServiceMessage) -> None:
        """Write one service message. Raises ``ServiceUnavailableError`` when the connection
        is down or drops while writing."""
        ws = self._ws
        if ws is None or not self.connected:
            raise ServiceUnavailableError(
                f"server connection {self.index} to {self.endpoint} is not connected"
            )
        try:
            await ws.send(write_service_message(message))
        except WebSocketClosed as exc:
            raise ServiceUnavailableError(
                f"the server connection to {self.endpoint} was lost: {exc}"
            ) from None
        self.last_send = self._clock()

    async def request_ack(
        self, message_for: Callable[[int], ServiceMessage], ack_id: int
    ) -> tuple[int, str | None]:
        """Send ``message_for(ack_id)`` and wait for its Ack: ``(status, message)``."""
        waiter = _AckWaiter()
        self._acks[ack_id] = waiter
        try:
            await self.send(message_for(ack_id))
            with anyio.move_on_after(self.options.ack_timeout):
                await waiter.done.wait()
            if not waiter.done.is_set():
                raise AckTimeoutError(
                    f"no ack from {self.endpoint} within {self.options.ack_timeout} s"
                )
            if waiter.lost:
                raise ServiceUnavailableError(
                    f"the server connection to {self.endpoint} was lost before the ack"
                )
            return waiter.status, waiter.message
        finally:
            self._acks.pop(ack_id, None)

    async def shutdown(self) -> None:
        """Tell the service this server is leaving (``shutdown`` ``fin:0``) and wait for its
        ``finack`` (the caller bounds the wait)."""
        if not self.connected:
            return
        try:
            await self.send(ServicePing.of({PingKey.SHUTDOWN: "fin:0"}))
        except ServiceUnavailableError:
            return
        await self._finack.wait()


class EndpointHub:
    """The server connections of one hub on one endpoint, and what the service reported
    about that endpoint (service-protocol §11.1 "container"; states in the module doc)."""

    def __init__(
        self, dispatcher: Dispatcher, endpoint: ServiceEndpoint, state: EndpointState = ACTIVE
    ) -> None:
        self.dispatcher = dispatcher
        self.endpoint = endpoint
        self.state: EndpointState = state
        #: What routers see: the endpoint with this hub's status.
        self.hub_endpoint = HubServiceEndpoint(endpoint, dispatcher.name, self)
        self.connections = [
            ServiceConnection(self, i) for i in range(dispatcher.options.connection_count)
        ]
        #: From the service's pings (§4.4): used to weigh negotiate (§11.2).
        self.metrics = EndpointMetrics()
        #: The last ``status`` reply: whether the service still has clients for this server.
        self.has_clients: bool | None = None
        #: The server ids of the last ``servers`` reply (lower case), and how many came.
        self.servers: str | None = None
        self.servers_replies = 0
        self._servers_time = -1
        self.ready = anyio.Event()
        self._changed = anyio.Event()
        #: ``online`` as last published (a status event goes out when it changes).
        self._online = self.online
        self._scope: anyio.CancelScope | None = None
        self._stopping = False
        self.stopped = anyio.Event()
        #: The last failure since a slot was last up (``refusal`` reads it; None: none).
        self.problem: _Problem | None = None
        # The log's state (module doc, "What is logged").
        self._announced = False  # the "connected" line is current
        self._outage_logged = False  # a line said the endpoint is down; until a slot is up
        self._failed = 0  # failed attempts in the streak (since every slot was last up)
        self._warned = False  # the streak's first failure was reported
        self._warned_refusal = False  # ... and a refusal in it
        self._escalated_at: float | None = None  # when the streak's last ERROR was logged

    def __repr__(self) -> str:
        return f"<EndpointHub {self.dispatcher.name} {self.endpoint} {self.state}>"

    # Status ----------------------------------------------------------------------------------

    @property
    def online(self) -> bool:
        """Whether at least one server connection is up (§11.1)."""
        return any(c.connected for c in self.connections)

    @property
    def server_count(self) -> int:
        """The hub's server connections to this endpoint, as last reported (``metrics``)."""
        return self.metrics.server_connection_count

    def holds_connection(self, connection_id: str) -> bool:
        """Whether the client ``connection_id`` of this app server is carried by one of these
        server connections."""
        client = self.dispatcher.local_clients.get(connection_id)
        return client is not None and client.service_connection.container is self

    def notify(self) -> None:
        """Wake the tasks in ``wait_until`` (something about this container changed)."""
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_until(self, predicate: Callable[[EndpointHub], bool]) -> None:
        """Wait until ``predicate(self)`` holds, re-checking on every change (the caller
        bounds the wait)."""
        while not predicate(self):
            await self._changed.wait()

    def connection_changed(self) -> None:
        """A slot connected or disconnected: publish the endpoint's status when it changed."""
        online = self.online
        if online != self._online:
            self._online = online
            self.dispatcher.publish_status(
                EndpointStatusEvent(self.dispatcher.name, self.hub_endpoint, online)
            )
        self.notify()

    # The log (module doc, "What is logged") -----------------------------------------------

    def refusal(self) -> str | None:
        """Why the service refuses this app server's connections, when the last failure was
        a refusal and no slot has been up since (else ``None``)."""
        problem = self.problem
        if problem is None or not problem.refused:
            return None
        url = self.endpoint.connection.server_base.rstrip("/")
        hint = f"; {problem.hint}" if problem.hint else ""
        return f"the relay at {url} refuses this app server's connections: {problem.text}{hint}"

    def slot_up(self, connection: ServiceConnection) -> None:
        """A slot finished its handshake: one INFO line once every slot is up."""
        _log.debug(
            "server connection %s of hub %s to %s is up (cid %s)",
            connection.index,
            self.dispatcher.name,
            self.endpoint,
            connection.cid,
        )
        self.problem = None
        self._outage_logged = False
        if self._announced or not all(c.connected for c in self.connections):
            return
        self._announced = True
        after = f", after {self._failed} failed attempts" if self._failed else ""
        _log.info(
            "app server %s connected to hub %s on %s: %d server connections (%s)%s",
            self.dispatcher.server_id,
            self.dispatcher.name,
            self.endpoint,
            len(self.connections),
            connection_type_name(connection.connection_type),
            after,
        )
        self._failed = 0
        self._warned = self._warned_refusal = False
        self._escalated_at = None

    def slot_failed(
        self, connection: ServiceConnection, problem: _Problem, was_up: bool, delay: float
    ) -> None:
        """A slot's attempt failed (``was_up`` False) or its session ended; it retries in
        ``delay`` seconds. Logs for the container (see "What is logged")."""
        self.problem = problem
        _log.debug(
            "server connection %s of hub %s to %s ended (%s); reconnecting in %.1f s",
            connection.index,
            self.dispatcher.name,
            self.endpoint,
            problem.text,
            delay,
        )
        if was_up:
            if self.online or self._outage_logged:
                return
            self._outage_logged = True
            self._announced = False
            _log.log(
                logging.INFO if problem.going_away else logging.WARNING,
                "hub %s: the server connections to %s %s (%s); reconnecting",
                self.dispatcher.name,
                self.endpoint,
                "were closed by the service" if problem.going_away else "were lost",
                problem.text,
            )
            return
        self._failed += 1
        refusal = self.refusal()
        why = refusal or f"cannot connect to {self.endpoint}: {problem.text}"
        if not self._warned or (problem.refused and not self._warned_refusal):
            self._warned = True
            self._warned_refusal = self._warned_refusal or problem.refused
            if problem.refused or not self._outage_logged:
                self._announced = False
                _log.warning("hub %s: %s; retrying in the background", self.dispatcher.name, why)
            return
        now = anyio.current_time()
        if connection.failures >= _ERROR_AFTER and (
            self._escalated_at is None or now - self._escalated_at >= _REMIND_EVERY
        ):
            self._escalated_at = now
            self._announced = False
            _log.error(
                "hub %s: %s (%d failed attempts in a row); still retrying, next in %.2g s",
                self.dispatcher.name,
                why,
                connection.failures,
                delay,
            )

    def swap(self, endpoint: ServiceEndpoint) -> None:
        """Take a renamed (or re-typed, or re-keyed) configuration of the same endpoint: its
        connections stay; a new role applies to their connection type from their next
        session on, as the Azure SDK does (§11.3)."""
        self.endpoint = endpoint
        self.hub_endpoint = HubServiceEndpoint(endpoint, self.dispatcher.name, self)

    def read_metrics(self, ping: ServicePing) -> None:
        """Update the metrics from any ping that carries them."""
        values = {}
        for key, field in (
            (PingKey.CLIENT_COUNT, "client_connection_count"),
            (PingKey.SERVER_COUNT, "server_connection_count"),
            (PingKey.CAPACITY, "connection_capacity"),
        ):
            value = ping.get(key)
            if value is not None and value.isdigit():
                values[field] = int(value)
        if values:
            metrics = self.metrics
            self.metrics = EndpointMetrics(
                values.get("client_connection_count", metrics.client_connection_count),
                values.get("server_connection_count", metrics.server_connection_count),
                values.get("connection_capacity", metrics.connection_capacity),
            )

    def servers_reply(self, value: str) -> None:
        """A ``servers`` reply ``"<timestamp>:<id1>;<id2>..."`` (§4.4); the newest one wins."""
        stamp, colon, ids = value.partition(":")
        if not colon:
            _log.warning("ignoring a servers reply without ':' from %s: %r", self.endpoint, value)
            return
        try:
            timestamp = int(stamp)
        except ValueError:
            timestamp = self._servers_time
        if timestamp < self._servers_time:
            return
        self._servers_time = timestamp
        self.servers = ids.lower()
        self.servers_replies += 1
        self.notify()

    # Choosing a connection -------------------------------------------------------------------

    def pick(self, preferred: ServiceConnection | None = None) -> Channel | None:
        """The connection to write on: ``preferred`` when it belongs here and is up, else the
        first connected one (a stable choice keeps one task's messages in order)."""
        if preferred is not None and preferred.container is self and preferred.connected:
            return preferred
        for connection in self.connections:
            if connection.connected:
                return connection
        return None

    # Lifetime --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Run every slot until ``stop()`` or cancellation; ``ready`` is set once each made
        its first attempt. Sends the ``status`` ping every ``status_interval`` on one random
        connected slot."""
        try:
            with anyio.CancelScope() as scope:
                self._scope = scope
                if self._stopping:
                    scope.cancel()
                async with anyio.create_task_group() as task_group:
                    for connection in self.connections:
                        task_group.start_soon(connection.run)
                    for connection in self.connections:
                        await connection.first_attempt.wait()
                    self.ready.set()
                    while True:
                        await anyio.sleep(self.dispatcher.options.status_interval)
                        connected = [c for c in self.connections if c.connected]
                        if connected:
                            try:
                                await random.choice(connected).send(
                                    ServicePing.of({PingKey.STATUS: "1"})
                                )
                            except ServiceUnavailableError:
                                pass
        finally:
            self.ready.set()
            self.stopped.set()

    def stop(self) -> None:
        """End ``run``: every session closes (their clients end with them)."""
        self._stopping = True
        if self._scope is not None:
            self._scope.cancel()

    async def ask(self, key: str) -> None:
        """Send ``[3, key, ""/"1"]`` on one connected slot (``servers`` or ``status``)."""
        connection = self.pick()
        if connection is not None:
            try:
                await connection.send(ServicePing.of({key: "1" if key == PingKey.STATUS else ""}))
            except ServiceUnavailableError:
                pass

    async def send_fin(self) -> None:
        """Tell the service on every session that this server leaves the endpoint
        (``shutdown fin:0``): it binds no new client to them (§11.3 Remove, step 1)."""
        for connection in self.connections:
            if connection.connected:
                try:
                    await connection.send(ServicePing.of({PingKey.SHUTDOWN: "fin:0"}))
                except ServiceUnavailableError:
                    pass

    async def drain(self, interval: float) -> None:
        """Return once no session holds clients: the service answers ``status`` "0" on every
        connected slot, and the local clients have finished (§11.3 Remove, step 2). Polls
        every ``interval``; the caller bounds the wait."""

        def quiet(connection: ServiceConnection, asked: int) -> bool:
            if not connection.connected:
                return not connection.clients
            return (
                connection.status_replies > asked
                and connection.has_clients is False
                and not connection.clients
            )

        while True:
            asked: dict[ServiceConnection, int] = {}

            def settled(_: EndpointHub, asked: dict[ServiceConnection, int] = asked) -> bool:
                return all(quiet(c, n) for c, n in asked.items())

            for connection in self.connections:
                asked[connection] = connection.status_replies
                if connection.connected:
                    try:
                        await connection.send(ServicePing.of({PingKey.STATUS: "1"}))
                    except ServiceUnavailableError:
                        pass
            with anyio.move_on_after(interval):
                await self.wait_until(settled)
                return
