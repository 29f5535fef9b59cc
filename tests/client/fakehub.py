"""A scriptable SignalR server on 127.0.0.1, for what the relay cannot be made to do on cue.

``FakeHub`` answers ``POST .../negotiate`` with whatever document ``negotiate`` returns (a
v1 document naming a fresh token by default) and upgrades ``GET`` requests to hub connections:
it reads the client's handshake with the project's ``HubHandshake``, answers it (or with
``handshake_answer``), and records every hub message the client sends. Tests then send hub
messages, raw bytes, or drop the TCP connection. Every request is recorded (method, target,
headers), so tests can check what the client asked.

With ``stateful`` set, negotiate agrees to stateful reconnect when asked, and an upgrade that
names the ``id`` of an earlier connection is that connection resumed: no handshake, the same
protocol. The stateful bookkeeping itself (Sequence, Ack, replays) is the test's to script.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import anyio.abc
import h11
import orjson

from relaycore.protocol import (
    BinaryMessage,
    HandshakeAccepted,
    HubHandshake,
    HubMessage,
    PingMessage,
    Role,
    TextMessage,
    WebSocketProtocol,
    accept_key,
    get_protocol,
)


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(urlsplit(self.target).query).items()}


@dataclass
class FakeHubConnection:
    """One upgraded client connection, seen from the server."""

    request: Request
    stream: anyio.abc.ByteStream
    ws: WebSocketProtocol = field(default_factory=lambda: WebSocketProtocol(
        Role.SERVER, max_message_size=None))
    protocol_name: str = ""
    #: The version the handshake asked for (None: resumed, no handshake).
    handshake_version: int | None = None
    #: Every hub message received, in order (pings included).
    received: list[HubMessage] = field(default_factory=list)
    #: The frame type of each data message received ("text" or "binary"), in order.
    frames: list[str] = field(default_factory=list)
    closed: anyio.Event = field(default_factory=anyio.Event)
    #: Set once the handshake was read (or the connection ended before).
    ready: anyio.Event = field(default_factory=anyio.Event)
    _arrived: anyio.Event = field(default_factory=anyio.Event)
    _lock: anyio.Lock = field(default_factory=anyio.Lock)

    @property
    def protocol(self) -> Any:
        return get_protocol(self.protocol_name)

    async def send(self, *messages: HubMessage) -> None:
        """Each message in a WebSocket message of its own."""
        for message in messages:
            await self.send_raw(self.protocol.write(message))

    async def send_raw(self, data: bytes) -> None:
        async with self._lock:
            if self.protocol_name == "messagepack":
                self.ws.send_binary(data)
            else:
                self.ws.send_text(data)
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await self.stream.send(self.ws.data_to_send())

    async def drop(self) -> None:
        """The TCP connection closed without a close handshake."""
        await anyio.aclose_forcefully(self.stream)

    def of(self, kind: type) -> list[Any]:
        return [m for m in self.received if isinstance(m, kind)]

    async def next(self, kind: type, timeout: float = 5) -> Any:
        """The first received message of ``kind`` not yet taken by this method."""
        taken = getattr(self, "_taken", set())
        self._taken = taken
        with anyio.fail_after(timeout):
            while True:
                for index, message in enumerate(self.received):
                    if isinstance(message, kind) and index not in taken:
                        taken.add(index)
                        return message
                self._arrived = anyio.Event()
                await self._arrived.wait()

    async def run(self, pending: bytes, answer: bytes | None) -> None:
        """Serve the connection: ``pending`` are bytes that came with the upgrade request.
        A connection whose ``protocol_name`` is set already is a resumed one: no handshake."""
        handshake = HubHandshake(max_message_size=1 << 20)
        if self.protocol_name:
            self.ready.set()
        buffer = bytearray()
        data = pending
        try:
            while True:
                if data:
                    self.ws.receive_data(data)
                for event in self.ws.events_received():
                    if not isinstance(event, TextMessage | BinaryMessage):
                        continue
                    self.frames.append("text" if isinstance(event, TextMessage) else "binary")
                    payload = event.data.encode() if isinstance(event.data, str) else event.data
                    if not self.protocol_name:
                        handshake.receive_data(payload)
                        result = handshake.result
                        if isinstance(result, HandshakeAccepted):
                            self.protocol_name = result.protocol
                            self.handshake_version = result.version
                            await self.send_raw(b"{}\x1e" if answer is None else answer)
                            buffer += result.rest
                            self.ready.set()
                    else:
                        buffer += payload
                    if self.protocol_name:
                        messages, consumed = self.protocol.parse(buffer)
                        del buffer[:consumed]
                        self.received.extend(messages)
                        self._arrived.set()
                async with self._lock:
                    out = self.ws.data_to_send()
                    if out:
                        with contextlib.suppress(anyio.BrokenResourceError,
                                                 anyio.ClosedResourceError):
                            await self.stream.send(out)
                if self.ws.close_expected():
                    return
                try:
                    data = await self.stream.receive(65536)
                except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    self.ws.receive_eof()
                    return
        finally:
            self.closed.set()
            self.ready.set()
            self._arrived.set()
            await anyio.aclose_forcefully(self.stream)

    def pings(self) -> int:
        return len(self.of(PingMessage))


class FakeHub:
    """The server (see the module doc)."""

    def __init__(self) -> None:
        self.port = 0
        self.requests: list[Request] = []
        self.connections: list[FakeHubConnection] = []
        self._tokens = itertools.count(1)
        #: The negotiate answer: (status, JSON document) for a request.
        self.negotiate: Callable[[Request], tuple[int, Any]] = self.default_negotiate
        #: Upgrades are answered with this status instead of 101 (None: upgrade).
        self.refuse_upgrade: int | None = None
        #: The handshake answer's bytes (None: ``{}`` + 0x1E).
        self.handshake_answer: bytes | None = None
        #: Agree to stateful reconnect, and take an upgrade with a known id as a resume.
        self.stateful = False
        self._changed = anyio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hub"

    def default_negotiate(self, request: Request) -> tuple[int, Any]:
        token = f"tok-{next(self._tokens)}"
        document: dict[str, Any] = {
            "negotiateVersion": 1, "connectionId": f"id-{token}", "connectionToken": token,
            "availableTransports": [{"transport": "WebSockets",
                                     "transferFormats": ["Text", "Binary"]}]}
        if self.stateful and request.query.get("useStatefulReconnect") == "true":
            document["useStatefulReconnect"] = True
        return 200, document

    def of(self, method: str) -> list[Request]:
        return [r for r in self.requests if r.method == method]

    async def connection(self, index: int, timeout: float = 5) -> FakeHubConnection:
        """The ``index``-th upgraded connection, once its handshake was read."""
        with anyio.fail_after(timeout):
            while len(self.connections) <= index:
                self._changed = anyio.Event()
                await self._changed.wait()
            await self.connections[index].ready.wait()
        return self.connections[index]

    async def start(self, task_group: anyio.abc.TaskGroup) -> FakeHub:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        task_group.start_soon(self._listen, listener, task_group)
        return self

    async def _listen(self, listener: Any, task_group: anyio.abc.TaskGroup) -> None:
        async with listener:
            await listener.serve(self._serve, task_group)

    async def _serve(self, stream: anyio.abc.ByteStream) -> None:
        http = h11.Connection(h11.SERVER)
        try:
            while True:
                event = http.next_event()
                if event is h11.NEED_DATA:
                    http.receive_data(await stream.receive(65536))
                    continue
                if not isinstance(event, h11.Request):
                    return
                request = Request(event.method.decode(), event.target.decode(),
                                  {k.decode().lower(): v.decode() for k, v in event.headers})
                self.requests.append(request)
                if request.headers.get("upgrade", "").lower() == "websocket":
                    await self._upgrade(http, stream, request)
                    return
                while not isinstance(event, h11.EndOfMessage):
                    event = http.next_event()
                    if event is h11.NEED_DATA:
                        http.receive_data(await stream.receive(65536))
                if request.method == "POST" and request.path.endswith("/negotiate"):
                    status, document = self.negotiate(request)
                    await self._respond(http, stream, status, orjson.dumps(document))
                else:
                    await self._respond(http, stream, 404, b"no such thing")
                if http.our_state is h11.MUST_CLOSE:
                    return
                http.start_next_cycle()
        except (anyio.EndOfStream, anyio.BrokenResourceError, h11.ProtocolError):
            pass
        finally:
            await anyio.aclose_forcefully(stream)

    @staticmethod
    async def _respond(http: h11.Connection, stream: anyio.abc.ByteStream, status: int,
                       body: bytes) -> None:
        await stream.send(http.send(h11.Response(status_code=status, headers=[
            ("content-type", "application/json"), ("content-length", str(len(body)))]))
            + http.send(h11.Data(data=body)) + http.send(h11.EndOfMessage()))

    async def _upgrade(self, http: h11.Connection, stream: anyio.abc.ByteStream,
                       request: Request) -> None:
        if self.refuse_upgrade is not None:
            await self._respond(http, stream, self.refuse_upgrade, b"refused by the test")
            await anyio.aclose_forcefully(stream)
            return
        await stream.send(http.send(h11.InformationalResponse(status_code=101, headers=[
            ("upgrade", "websocket"), ("connection", "Upgrade"),
            ("sec-websocket-accept", accept_key(request.headers["sec-websocket-key"]))])))
        connection = FakeHubConnection(request, stream)
        earlier = [c for c in self.connections
                   if c.request.query.get("id") == request.query.get("id")]
        if self.stateful and earlier and request.query.get("id"):
            connection.protocol_name = earlier[0].protocol_name
        self.connections.append(connection)
        self._changed.set()
        await connection.run(bytes(http.trailing_data[0]), self.handshake_answer)
