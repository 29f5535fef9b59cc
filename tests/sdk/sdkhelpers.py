"""Helpers for the SDK tests: run a scenario on a backend, and a scriptable fake service.

``FakeService`` is the service side of the service protocol, small enough to read: it accepts
``GET /server/?hub=...`` upgrades (checking the server token), answers the handshake, answers
``status`` pings and ``shutdown`` fins, optionally acks ``...WithAck`` requests, and hands
every other message to the test. Tests drive the logical-client flow by sending
OpenConnection / ConnectionData / CloseConnection themselves.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import anyio.abc
import h11
import pytest

from relaycore.protocol import (
    AckStatus,
    BinaryMessage,
    CloseReceived,
    ConnectionDataMessage,
    PingKey,
    Role,
    ServiceAckMessage,
    ServiceHandshakeRequest,
    ServiceHandshakeResponse,
    ServicePing,
    ServiceProtocolParser,
    TokenValidator,
    WebSocketProtocol,
    accept_key,
    write_service_message,
)

#: Every SDK scenario runs on each: asyncio, asyncio with uvloop's loop, trio.
BACKENDS = ["asyncio", "uvloop", "trio"]
KEY = "sdk-test-access-key-0123456789"
RS = b"\x1e"

#: The .WithAck messages the fake acks itself when ``auto_ack`` is set.
_ACKED = (
    "JoinGroupWithAckMessage",
    "LeaveGroupWithAckMessage",
    "UserJoinGroupWithAckMessage",
    "UserLeaveGroupWithAckMessage",
    "CheckUserInGroupWithAckMessage",
)


def run(backend: str, scenario: Callable[[], Awaitable[None]], timeout: float = 15) -> None:
    """Run ``scenario`` on ``backend`` (a name of ``BACKENDS``) under a deadline."""

    async def main() -> None:
        with anyio.fail_after(timeout):
            await scenario()

    if backend == "uvloop":
        pytest.importorskip("uvloop")
        anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})
    else:
        anyio.run(main, backend=backend)


def connection_string(port: int, key: str = KEY) -> str:
    return f"Endpoint=http://127.0.0.1;Port={port};AccessKey={key};Version=1.0;"


async def wait_for(predicate: Callable[[], bool], timeout: float = 5) -> None:
    """Wait until ``predicate()`` holds (polling; the deadline fails the test)."""
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)


class FakeServerConnection:
    """One accepted server connection, seen from the service."""

    def __init__(self, service: FakeService, stream: anyio.abc.ByteStream, target: str,
                 headers: dict[str, str], claims: dict[str, Any]) -> None:
        self.service = service
        self.stream = stream
        self.target = target
        self.query = {k: v[0] for k, v in parse_qs(urlsplit(target).query).items()}
        self.headers = headers
        self.claims = claims
        self.ws = WebSocketProtocol(Role.SERVER, max_message_size=None)
        self.parser = ServiceProtocolParser()
        self.handshake: ServiceHandshakeRequest | None = None
        self.received: list[Any] = []
        self._inbox: deque[Any] = deque()
        self._arrived = anyio.Event()
        self.closed = anyio.Event()
        self.lock = anyio.Lock()

    async def send(self, *messages: Any) -> None:
        """Send service messages (one WebSocket message each)."""
        async with self.lock:
            for message in messages:
                self.ws.send_binary(write_service_message(message))
            await self.stream.send(self.ws.data_to_send())

    async def send_raw(self, *chunks: bytes) -> None:
        """Send each chunk as one binary WebSocket message (service frames may be split
        across messages or share one)."""
        async with self.lock:
            for chunk in chunks:
                self.ws.send_binary(chunk)
            await self.stream.send(self.ws.data_to_send())

    async def next(self, kind: type | None = None, timeout: float = 5) -> Any:
        """The first message received and not yet taken (of ``kind``; others stay queued for
        later calls). Without ``kind``, pings are passed over."""
        with anyio.fail_after(timeout):
            while True:
                for index, message in enumerate(self._inbox):
                    if kind is None and isinstance(message, ServicePing):
                        continue
                    if kind is None or isinstance(message, kind):
                        del self._inbox[index]
                        return message
                await self._arrived.wait()
                self._arrived = anyio.Event()

    async def client_data(self, connection_id: str, timeout: float = 5) -> bytes:
        """The next ConnectionData payload for ``connection_id``."""
        with anyio.fail_after(timeout):
            while True:
                message = await self.next(ConnectionDataMessage, timeout)
                if message.connection_id == connection_id:
                    return message.payload

    async def drop(self) -> None:
        """Close the TCP connection without a close handshake."""
        await anyio.aclose_forcefully(self.stream)

    async def run(self) -> None:
        try:
            while True:
                try:
                    data = await self.stream.receive(65536)
                except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    self.ws.receive_eof()
                    return
                self.ws.receive_data(data)
                for event in self.ws.events_received():
                    if isinstance(event, BinaryMessage):
                        self.parser.receive_data(event.data)
                        for message in self.parser.messages_received():
                            await self._handle(message)
                    elif isinstance(event, CloseReceived):
                        pass
                async with self.lock:
                    out = self.ws.data_to_send()
                    if out:
                        try:
                            await self.stream.send(out)
                        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                            return
                if self.ws.close_expected():
                    return
        finally:
            self.closed.set()
            await anyio.aclose_forcefully(self.stream)

    async def _handle(self, message: Any) -> None:
        self.received.append(message)
        service = self.service
        if isinstance(message, ServiceHandshakeRequest):
            self.handshake = message
            await self.send(ServiceHandshakeResponse(service.handshake_error or ""))
            if not service.handshake_error:
                service.connections.append(self)
                service.connected_count += 1
            return
        if isinstance(message, ServicePing):
            if message.get(PingKey.STATUS) is not None:
                service.status_pings += 1
                await self.send(ServicePing.of({PingKey.STATUS: service.status_for(self),
                                                **service.metrics}))
            elif message.get(PingKey.SERVERS) is not None:
                service.servers_pings += 1
                if service.answer_servers:
                    await self.send(ServicePing.servers_reply(
                        int(time.monotonic() * 1000), service.server_ids()))
            fin = message.get(PingKey.SHUTDOWN)
            if fin is not None and service.answer_fin:
                service.fins.append(fin)
                await self.send(ServicePing.of({PingKey.SHUTDOWN: PingKey.FIN_ACK}))
        if service.auto_ack and type(message).__name__ in _ACKED:
            await self.send(ServiceAckMessage(message.ack_id, service.ack_status))
        self._inbox.append(message)
        self._arrived.set()


class FakeService:
    """A service endpoint on 127.0.0.1 for the SDK to connect to (see the module doc)."""

    def __init__(self, *, key: str = KEY) -> None:
        self.key = key
        self.port = 0
        #: Server connections whose handshake succeeded, in order.
        self.connections: list[FakeServerConnection] = []
        self.connected_count = 0
        #: Every upgrade attempt (target, headers).
        self.attempts: list[tuple[str, dict[str, str]]] = []
        #: Answer handshakes with this error (None: accept).
        self.handshake_error: str | None = None
        #: Answer upgrades with this HTTP status instead of 101 (None: upgrade).
        self.reject_status: int | None = None
        self.auto_ack = True
        self.ack_status = AckStatus.OK
        self.answer_fin = True
        self.fins: list[str] = []
        #: The ``status`` reply: a value, or a function of the connection asking.
        self.status: str | Callable[[FakeServerConnection], str] = "0"
        #: Metrics added to every ``status`` reply.
        self.metrics: dict[str, int] = {"clientcount": 0, "servercount": 1}
        #: The ids in ``servers`` replies (None: the server ids of the open connections).
        self.servers: list[str] | None = None
        self.answer_servers = True
        self.status_pings = 0
        self.servers_pings = 0
        self._validator = TokenValidator([key])

    def status_for(self, connection: FakeServerConnection) -> str:
        return self.status(connection) if callable(self.status) else self.status

    def server_ids(self) -> list[str]:
        if self.servers is not None:
            return sorted(self.servers)
        return sorted({c.headers.get("x-asrs-server-id", "") for c in self.open_connections()})

    def open_connections(self) -> list[FakeServerConnection]:
        return [c for c in self.connections if not c.closed.is_set()]

    @property
    def connection_string(self) -> str:
        return connection_string(self.port, self.key)

    async def start(self, task_group: anyio.abc.TaskGroup) -> FakeService:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        task_group.start_soon(self._serve, listener, task_group)
        return self

    async def _serve(self, listener: Any, task_group: anyio.abc.TaskGroup) -> None:
        async with listener:
            await listener.serve(self._accept, task_group)

    async def wait_connections(self, count: int, timeout: float = 5) -> list[FakeServerConnection]:
        await wait_for(lambda: len(self.connections) >= count, timeout)
        return self.connections

    async def _accept(self, stream: anyio.abc.ByteStream) -> None:
        try:
            upgraded = await self._upgrade(stream)
        except (anyio.EndOfStream, anyio.BrokenResourceError, h11.RemoteProtocolError):
            upgraded = None
        if upgraded is None:
            await anyio.aclose_forcefully(stream)
            return
        await upgraded.run()

    async def _upgrade(self, stream: anyio.abc.ByteStream) -> FakeServerConnection | None:
        conn = h11.Connection(h11.SERVER)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive(65536))
                continue
            break
        assert isinstance(event, h11.Request)
        target = event.target.decode()
        headers = {k.decode().lower(): v.decode() for k, v in event.headers}
        self.attempts.append((target, headers))
        claims: dict[str, Any] = {}
        status = self.reject_status
        if status is None:
            hub = parse_qs(urlsplit(target).query).get("hub", [""])[0]
            token = headers.get("authorization", "").removeprefix("Bearer ")
            try:
                claims = self._validator.validate(
                    token, audiences=[f"http://127.0.0.1/server/?hub={hub}"], now=time.time()
                )
            except Exception:
                status = 401
        if status is not None:
            body = b'{"error":"refused"}'
            data = conn.send(h11.Response(status_code=status, headers=[
                ("content-length", str(len(body))), ("content-type", "application/json")]))
            await stream.send(data + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
            return None
        response = h11.InformationalResponse(status_code=101, headers=[
            ("upgrade", "websocket"), ("connection", "Upgrade"),
            ("sec-websocket-accept", accept_key(headers["sec-websocket-key"]))])
        await stream.send(conn.send(response))
        pending, _ = conn.trailing_data
        upgraded = FakeServerConnection(self, stream, target, headers, claims)
        if pending:
            upgraded.ws.receive_data(bytes(pending))
            for event in upgraded.ws.events_received():
                if isinstance(event, BinaryMessage):
                    upgraded.parser.receive_data(event.data)
                    for message in upgraded.parser.messages_received():
                        await upgraded._handle(message)
        return upgraded


async def sent_to(service: FakeService, server: Any, index: int, hub: str = "chat") -> list[str]:
    """The type names of the messages ``server`` wrote to ``service`` (its endpoint number
    ``index`` for ``hub``) since the last call, pings and handshakes left out.

    A marker ping is written on the same server connection after them, so that once it has
    arrived, everything written before it has too.
    """
    container = server._dispatcher(hub).containers[index]
    connection = container.pick()
    assert connection is not None, f"endpoint {index} of {hub} is offline"
    marker = f"marker-{id(connection)}-{connection.sessions}-{len(service.connections)}"
    conn = next(c for c in service.open_connections()
                if c.query.get("cid") == connection.cid)
    await connection.send(ServicePing.of({"marker": marker}))
    while (await conn.next(ServicePing)).get("marker") != marker:
        pass
    start = getattr(conn, "drained", 0)
    end = next(i for i, m in enumerate(conn.received)
               if isinstance(m, ServicePing) and m.get("marker") == marker)
    conn.drained = end + 1  # type: ignore[attr-defined]
    return [type(m).__name__ for m in conn.received[start:end]
            if not isinstance(m, (ServicePing, ServiceHandshakeRequest))]
