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
   ``service_timeout`` (30 s) the session is dropped.
3. DISCONNECTED: the session ends (socket closed, ServiceError, protocol error, silence). Its
   logical clients are ended at once (the service closes them on its side, §4.5) and waiting
   acks fail. The slot sleeps ``retry_delay(n)`` after the n-th consecutive failure (1, 2, 4 ...
   60 s plus jitter) and starts again; a successful handshake resets n.

Writers (hub methods, background jobs, acks) call ``send`` from any task; the WebSocket
serialises them. ``EndpointHub.run`` also sends ``status`` pings every ``status_interval``
(10 s) on one connected slot, and keeps the endpoint metrics the service reports in pings.
"""

from __future__ import annotations

import logging
import platform
import random
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Final
from urllib.parse import quote

import anyio
import anyio.abc

from relaycore.protocol import (
    ASRS_INSTANCE_ID_HEADER,
    DEFAULT_MAX_SERVICE_MESSAGE_SIZE,
    ClientCompletionMessage,
    ClientInvocationMessage,
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
    ServiceHandshakeResponse,
    ServiceMessage,
    ServicePing,
    ServiceProtocolParser,
    generate_access_token,
    header_for,
    write_service_message,
)

from ._client import ClientConnection
from ._errors import AckTimeoutError, ServiceUnavailableError
from ._options import EndpointType, ServiceEndpoint
from ._websocket import WebSocketClosed, WebSocketConnection, connect_websocket

if TYPE_CHECKING:
    from ._server import HubRouter

__all__ = ["EndpointHub", "ServiceConnection"]

_log = logging.getLogger("relaycore.sdk")

_USER_AGENT: Final = (
    f"relaycore-sdk/0.1 (Python {platform.python_version()}; {platform.system()}; "
    f"{platform.machine()})"
)


class _SessionEnded(Exception):
    """Why a session ended (for the log); the slot reconnects."""


class _AckWaiter:
    __slots__ = ("done", "lost", "message", "status")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.status = 0
        self.message: str | None = None
        self.lost = False


class ServiceConnection:
    """One server connection slot (see the module doc)."""

    def __init__(self, container: EndpointHub, index: int) -> None:
        self.container = container
        self.router = container.router
        self.options = container.router.options
        self.endpoint = container.endpoint
        self.index = index
        #: Whether a session is established (handshake done, not yet dropped).
        self.connected = False
        #: The ``cid`` of the current or last session.
        self.cid = ""
        #: Consecutive failures, for the backoff.
        self.failures = 0
        #: Sessions established so far (tests watch it to see a reconnect).
        self.sessions = 0
        self.last_send = 0.0
        #: Logical clients owned by this connection, by connection id.
        self.clients: dict[str, ClientConnection] = {}
        self._ws: WebSocketConnection | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._acks: dict[int, _AckWaiter] = {}
        self._finack = anyio.Event()
        self.first_attempt = anyio.Event()

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        return f"<ServiceConnection {self.router.wire_name}#{self.index} {self.endpoint} {state}>"

    @property
    def connection_type(self) -> ConnectionType:
        """Default on a primary endpoint; Weak (never given clients) on a secondary one."""
        if self.endpoint.type is EndpointType.SECONDARY:
            return ConnectionType.WEAK
        return ConnectionType.DEFAULT

    # The slot's task -----------------------------------------------------------------------

    async def run(self) -> None:
        """Keep a session up until cancelled, reconnecting with backoff."""
        while True:
            try:
                await self._session()
                reason = "the service closed the connection"
            except _SessionEnded as exc:
                reason = str(exc)
            except (OSError, anyio.BrokenResourceError, TimeoutError, RemoteProtocolError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            finally:
                self.first_attempt.set()
            delay = self.options.retry_delay(self.failures)
            self.failures += 1
            _log.info(
                "server connection %s to %s ended (%s); reconnecting in %.1f s",
                self.index,
                self.endpoint,
                reason,
                delay,
            )
            await anyio.sleep(delay)

    def _url_and_headers(self) -> tuple[str, list[tuple[str, str]]]:
        connection = self.endpoint.connection
        hub = self.router.wire_name
        self.cid = str(uuid.uuid4())
        url = f"{connection.server_base}server/?hub={quote(hub, safe='')}&cid={self.cid}"
        token = generate_access_token(
            self.endpoint.access_key,
            connection.server_audience(hub),
            now=time.time(),
            lifetime=self.options.access_token_lifetime,
            claims={"nameid": self.router.server_id},
        )
        headers = [
            ("Authorization", f"Bearer {token}"),
            ("X-ASRS-Server-Id", self.router.server_id),
            ("Asrs-User-Agent", _USER_AGENT),
            ("X-Requested-With", "XMLHttpRequest"),
        ]
        return url, headers

    async def _session(self) -> None:
        url, headers = self._url_and_headers()
        parser = ServiceProtocolParser()
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
                self.last_send = anyio.current_time()
                pending = await self._handshake_response(ws, parser)
            except BaseException:
                await ws.aclose()
                raise
        self._ws = ws
        self._finack = anyio.Event()
        self.connected = True
        self.failures = 0
        self.sessions += 1
        self.first_attempt.set()
        _log.info("server connection %s to %s is up (cid %s)", self.index, self.endpoint, self.cid)
        lost = ServiceUnavailableError(f"the server connection to {self.endpoint} was lost")
        ended: str | None = None
        try:
            async with anyio.create_task_group() as task_group:
                self._task_group = task_group
                try:
                    await self._read_loop(ws, parser, pending)
                except _SessionEnded as exc:
                    ended = str(exc)
                except Exception as exc:
                    # A bug, not the service's fault: log it whole, then reconnect.
                    _log.exception("server connection %s failed", self.index)
                    ended = f"{type(exc).__name__}: {exc}"
                finally:
                    self.connected = False
                    self._ws = None
                    for client in list(self.clients.values()):
                        client.close_input(lost, lost=True)
                    for waiter in self._acks.values():
                        waiter.lost = True
                        waiter.done.set()
        finally:
            self.connected = False
            self._ws = None
            self._task_group = None
            await ws.aclose()
        if ended is not None:
            raise _SessionEnded(ended)

    async def _handshake_response(
        self, ws: WebSocketConnection, parser: ServiceProtocolParser
    ) -> list[ServiceMessage]:
        while True:
            data = await ws.receive()
            if isinstance(data, str):
                raise _SessionEnded("the service sent a text message; expected binary")
            parser.receive_data(data)
            messages = parser.messages_received()
            if not messages:
                continue
            first = messages[0]
            if not isinstance(first, ServiceHandshakeResponse):
                raise _SessionEnded(
                    f"the service sent {type(first).__name__} first; expected a handshake response"
                )
            if not first.succeeded:
                raise _SessionEnded(f"the service refused the handshake: {first.error_message}")
            return messages[1:]

    async def _read_loop(
        self, ws: WebSocketConnection, parser: ServiceProtocolParser, messages: list[ServiceMessage]
    ) -> None:
        options = self.options
        while True:
            for message in messages:
                if not await self._handle(message):
                    return
            with anyio.move_on_after(options.service_timeout) as silence:
                try:
                    data = await ws.receive()
                except WebSocketClosed as exc:
                    raise _SessionEnded(str(exc)) from None
            if silence.cancelled_caught:
                raise _SessionEnded(f"nothing received for {options.service_timeout} s")
            if isinstance(data, str):
                raise _SessionEnded("the service sent a text message; expected binary")
            try:
                parser.receive_data(data)
            except RemoteProtocolError as exc:
                raise _SessionEnded(f"bad data from the service: {exc}") from None
            messages = parser.messages_received()
            if anyio.current_time() - self.last_send >= options.keep_alive_interval:
                await self._keep_alive()

    async def _keep_alive(self) -> None:
        ping = ServicePing.of(
            {
                PingKey.CLIENTS_IN_HUB: len(self.router.local_clients),
                PingKey.CLIENTS_ON_CONNECTION: len(self.clients),
            }
        )
        try:
            await self.send(ping)
        except ServiceUnavailableError:
            pass

    async def _handle(self, message: ServiceMessage) -> bool:
        """Handle one message from the service; False ends the session."""
        if isinstance(message, ConnectionDataMessage):
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
        elif isinstance(message, ClientInvocationMessage):
            await self.router.routed_invocation(message)
        elif isinstance(message, ClientCompletionMessage):
            self.router.completion_from_service(message)
        elif isinstance(message, ErrorCompletionMessage):
            self.router.error_from_service(message)
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
        client = ClientConnection(self.router, self, message)
        self.clients[message.connection_id] = client
        self.router.local_clients[message.connection_id] = client
        self._task_group.start_soon(self._run_client, client)

    async def _run_client(self, client: ClientConnection) -> None:
        try:
            await client.run()
        except Exception:
            _log.exception("client connection %s failed", client.connection_id)
        finally:
            self.clients.pop(client.connection_id, None)
            self.router.client_gone(client)

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
        self.container.read_metrics(ping)
        status = ping.get(PingKey.STATUS)
        if status is not None:
            self.container.has_clients = status == "1"

    # Used by the router and the server ------------------------------------------------------

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
        self.last_send = anyio.current_time()

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
    about that endpoint (service-protocol §11.1 "container")."""

    def __init__(self, router: HubRouter, endpoint: ServiceEndpoint) -> None:
        self.router = router
        self.endpoint = endpoint
        self.connections = [
            ServiceConnection(self, i) for i in range(router.options.connection_count)
        ]
        #: From the service's pings (§4.4): used to weigh negotiate (§11.2).
        self.client_count = 0
        self.server_count = 0
        self.capacity = 0
        #: The last ``status`` reply: whether the service still has clients for this server.
        self.has_clients: bool | None = None
        self.ready = anyio.Event()

    @property
    def online(self) -> bool:
        """Whether at least one server connection is up (§11.1)."""
        return any(c.connected for c in self.connections)

    def pick(self, preferred: ServiceConnection | None = None) -> ServiceConnection | None:
        """The connection to write on: ``preferred`` when it belongs here and is up, else the
        first connected one (a stable choice keeps one task's messages in order)."""
        if preferred is not None and preferred.container is self and preferred.connected:
            return preferred
        for connection in self.connections:
            if connection.connected:
                return connection
        return None

    def read_metrics(self, ping: ServicePing) -> None:
        """Update the metrics from any ping that carries them."""
        for key, attribute in (
            (PingKey.CLIENT_COUNT, "client_count"),
            (PingKey.SERVER_COUNT, "server_count"),
            (PingKey.CAPACITY, "capacity"),
        ):
            value = ping.get(key)
            if value is not None and value.isdigit():
                setattr(self, attribute, int(value))

    async def run(self) -> None:
        """Run every slot; ``ready`` is set once each made its first attempt. Sends the
        ``status`` ping every ``status_interval`` on one random connected slot."""
        async with anyio.create_task_group() as task_group:
            for connection in self.connections:
                task_group.start_soon(connection.run)
            for connection in self.connections:
                await connection.first_attempt.wait()
            self.ready.set()
            while True:
                await anyio.sleep(self.router.options.status_interval)
                connected = [c for c in self.connections if c.connected]
                if connected:
                    try:
                        await random.choice(connected).send(ServicePing.of({PingKey.STATUS: "1"}))
                    except ServiceUnavailableError:
                        pass
