"""Protocol adapters: how a subscriber connects and becomes ready, what keeps it alive, how an
echo is written, and how a publisher makes the server fan a message out.

* ``SignalRAdapter``: relaycore's client endpoint (SignalR JSON or MessagePack hub protocol, no
  negotiate); published to by an app server's server connection (service protocol
  ``BroadcastData`` / ``GroupBroadcastData`` / ``UserData``) or the REST API.
* ``RawAdapter``: the bench protocol of the raw-WebSocket peers (node ``ws``, python
  ``websockets``, uWS.js): ``/sub?room=R`` subscribes, ``/pub`` sends ``ROOM|payload``.
* ``SocketIOAdapter``: Engine.IO v4 / Socket.IO v5 over a WebSocket (node ``socket.io``,
  python-socketio): ``40`` to connect, ``42["pub","ROOM|payload"]`` to publish, ``42["t",...]``
  delivered, ``2``/``3`` ping/pong.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson

from relaycore.protocol import (
    BroadcastDataMessage,
    CloseConnectionMessage,
    ConnectionDataMessage,
    ConnectionType,
    GroupBroadcastDataMessage,
    JsonHubProtocol,
    MessagePackHubProtocol,
    OpenConnectionMessage,
    PingMessage,
    ServiceAckMessage,
    ServiceHandshakeRequest,
    ServiceHandshakeResponse,
    ServicePing,
    ServiceProtocolParser,
    UserDataMessage,
    UserJoinGroupWithAckMessage,
    connection_data_prefix,
    generate_access_token,
    write_connection_data,
    write_service_message,
)

from .wsclient import SourceAddresses, open_connection

ACCESS_KEY = "bench-access-key-0123456789abcdefgh"
JSON = JsonHubProtocol()
MSGPACK = MessagePackHubProtocol()


class Adapter:
    name = "adapter"
    needs_keepalive = False
    keepalive_interval = 10.0

    def sub_path(self, *, room: str | None, user: str | None) -> tuple[str, list[tuple[str, str]]]:
        raise NotImplementedError

    async def after_open(self, conn: Any) -> None:
        pass

    def on_other(self, conn: Any, payload: bytes) -> None:
        pass

    def on_closed(self, conn: Any) -> None:
        ready = getattr(conn, "ready", None)
        if ready is not None and not ready.done():
            ready.set_exception(ConnectionError("closed before it was ready"))

    def keepalive(self, conn: Any) -> None:
        pass

    def send_echo(self, conn: Any, text: str) -> None:
        raise NotImplementedError

    async def open_publisher(self, port: int, backend: str) -> Any:
        raise NotImplementedError


async def _wait_ready(conn: Any, timeout: float = 30.0) -> None:
    if conn.ready is None:
        conn.ready = asyncio.get_running_loop().create_future()
    await asyncio.wait_for(conn.ready, timeout)


def _set_ready(conn: Any, error: str | None = None) -> None:
    if conn.ready is None:  # the answer came before anyone waited for it
        conn.ready = asyncio.get_running_loop().create_future()
    ready = conn.ready
    if not ready.done():
        if error is None:
            ready.set_result(None)
        else:
            ready.set_exception(ConnectionError(error))


# -- relaycore: SignalR clients, service-protocol publishers ----------------------------------


class SignalRAdapter(Adapter):
    name = "signalr"
    needs_keepalive = True
    keepalive_interval = 15.0  # as the SignalR clients (the relay times a client out at 30 s)

    def __init__(self, hub: str = "bench", protocol: str = "json",
                 key: str = ACCESS_KEY) -> None:
        self.hub = hub
        self.protocol = protocol
        self.key = key
        self._tokens: dict[str | None, str] = {}
        self._handshake = (f'{{"protocol":"{protocol}","version":1}}\x1e').encode()
        hub_protocol = MSGPACK if protocol == "messagepack" else JSON
        self._ping = hub_protocol.write(PingMessage())
        self._binary = protocol == "messagepack"

    def token(self, user: str | None) -> str:
        token = self._tokens.get(user)
        if token is None:
            token = self._tokens[user] = generate_access_token(
                self.key, f"http://127.0.0.1/client/?hub={self.hub}", now=time.time(),
                lifetime=24 * 3600, user_id=user)
        return token

    def sub_path(self, *, room: str | None, user: str | None) -> tuple[str, list[tuple[str, str]]]:
        return f"/client/?hub={self.hub}&access_token={self.token(user)}", []

    async def after_open(self, conn: Any) -> None:
        conn.ready = asyncio.get_running_loop().create_future()
        conn.send_text(self._handshake)
        await asyncio.wait_for(conn.ready, 30.0)

    def on_other(self, conn: Any, payload: bytes) -> None:
        if conn.ready is None or not conn.ready.done():
            if payload.startswith(b"{}"):
                _set_ready(conn)
            elif payload.startswith(b'{"error"'):
                _set_ready(conn, payload.decode(errors="replace"))

    def keepalive(self, conn: Any) -> None:
        if self._binary:
            conn.send_binary(self._ping)
        else:
            conn.send_text(self._ping)

    def invocation(self, target: str, text: str) -> bytes:
        if self._binary:
            return MSGPACK.write_invocation(target, [text])
        return b'{"type":1,"target":"%s","arguments":["%s"]}\x1e' % (target.encode(),
                                                                      text.encode())

    def send_echo(self, conn: Any, text: str) -> None:
        if self._binary:
            conn.send_binary(self.invocation("echo", text))
        else:
            conn.send_text(self.invocation("echo", text))

    async def open_publisher(self, port: int, backend: str) -> ServiceConnection:
        return await ServiceConnection.open(port, backend, hub=self.hub, key=self.key,
                                            connection_type=ConnectionType.WEAK)


class ServiceConnection:
    """An app server's connection to relaycore (service protocol over a binary WebSocket).

    As a publisher (Weak connection) it sends ``BroadcastData``, ``GroupBroadcastData`` and
    ``UserData`` with a ``{"json": ...}`` payload map, as the SDK does. As an echo app server
    (Default connection) it answers each client's handshake and sends each invocation back to
    its caller (``ConnectionData``), parsing and re-encoding it as a hub would.
    """

    def __init__(self, echo: bool) -> None:
        self.conn: Any = None
        self.parser = ServiceProtocolParser(raw_connection_data=True)
        self.echo = echo
        self.sampled = False
        self.state = None
        self.ready: asyncio.Future[None] | None = None
        self.closed = False
        self.acks: dict[int, asyncio.Future[int]] = {}
        self._next_ack = 1
        self.clients: dict[str, str] = {}  # connection id -> protocol
        self._prefixes: dict[str, bytes] = {}  # connection id -> ConnectionData prefix
        self.echoes = 0
        self._ping_task: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, port: int, backend: str, *, hub: str, key: str = ACCESS_KEY,
                   connection_type: int = ConnectionType.WEAK, echo: bool = False,
                   server_id: str = "bench-server") -> ServiceConnection:
        self = cls(echo)
        token = generate_access_token(key, f"http://127.0.0.1/server/?hub={hub}",
                                      now=time.time(), lifetime=24 * 3600, user_id=server_id)
        self.conn = await open_connection(
            backend, self, "127.0.0.1", port, f"/server/?hub={hub}",
            headers=[("Authorization", f"Bearer {token}"), ("X-ASRS-Server-Id", server_id)])
        self.ready = asyncio.get_running_loop().create_future()
        self.conn.send_binary(write_service_message(
            ServiceHandshakeRequest(connection_type=connection_type)))
        await asyncio.wait_for(self.ready, 30.0)
        self._ping_task = asyncio.get_running_loop().create_task(self._pinger())
        return self

    async def _pinger(self) -> None:
        ping = write_service_message(ServicePing())
        while True:
            await asyncio.sleep(5.0)
            self.conn.send_binary(ping)

    # sink
    def on_frame(self, conn: Any, payload: bytes) -> None:
        self.parser.receive_data(payload)
        out = []
        for m in self.parser.items_received():
            if type(m) is tuple:  # ConnectionData (connection id, payload)
                if self.echo:
                    out.append(self._echo(*m))
            elif isinstance(m, ConnectionDataMessage):
                if self.echo:
                    out.append(self._echo(m.connection_id, m.payload))
            elif isinstance(m, OpenConnectionMessage):
                self.clients[m.connection_id] = m.protocol or "json"
            elif isinstance(m, CloseConnectionMessage):
                self.clients.pop(m.connection_id, None)
                self._prefixes.pop(m.connection_id, None)
            elif isinstance(m, ServiceAckMessage):
                future = self.acks.pop(m.ack_id, None)
                if future is not None and not future.done():
                    future.set_result(m.status)
            elif isinstance(m, ServiceHandshakeResponse):
                if self.ready is not None and not self.ready.done():
                    if m.error_message:
                        self.ready.set_exception(ConnectionError(m.error_message))
                    else:
                        self.ready.set_result(None)
        out = [x for x in out if x]
        if out:
            self.conn.send_binary(b"".join(out))

    def _echo(self, connection_id: str, data: bytes) -> bytes:
        """What a hub's ``echo(text)`` method that answers ``Clients.Caller`` sends."""
        prefix = self._prefixes.get(connection_id)
        if prefix is None:
            prefix = self._prefixes[connection_id] = connection_data_prefix(connection_id)
        if data.startswith(b'{"protocol"'):  # the client's handshake: the hub accepts it
            return write_connection_data(prefix, b"{}\x1e")
        replies = []
        for record in data.split(b"\x1e")[:-1]:
            message = orjson.loads(record)
            if message.get("type") == 1:
                replies.append(JSON.write_invocation("echo", message["arguments"]))
                self.echoes += 1
        if not replies:
            return b""
        return write_connection_data(prefix, b"".join(replies))

    def on_closed(self, conn: Any) -> None:
        self.closed = True
        if self.ready is not None and not self.ready.done():
            self.ready.set_exception(ConnectionError("the relay closed the server connection"))

    # publishing
    @staticmethod
    def _payloads(text: str) -> dict[str, bytes]:
        return {"json": b'{"type":1,"target":"t","arguments":["%s"]}\x1e' % text.encode(),
                "messagepack": MSGPACK.write_invocation("t", [text])}

    def publish(self, room: str, text: str) -> None:
        if room == "all":
            message: Any = BroadcastDataMessage(self._payloads(text))
        else:
            message = GroupBroadcastDataMessage(room, self._payloads(text))
        self.conn.send_binary(write_service_message(message))

    def send_to_user(self, user: str, text: str) -> None:
        self.conn.send_binary(write_service_message(UserDataMessage(user, self._payloads(text))))

    async def join_users(self, pairs: list[tuple[str, str]], batch: int = 500) -> None:
        """``UserJoinGroupWithAck`` for each (user, group); returns when all are acked."""
        loop = asyncio.get_running_loop()
        for i in range(0, len(pairs), batch):
            futures = []
            frames = []
            for user, group in pairs[i:i + batch]:
                ack_id = self._next_ack
                self._next_ack += 1
                self.acks[ack_id] = future = loop.create_future()
                futures.append(future)
                frames.append(write_service_message(
                    UserJoinGroupWithAckMessage(user, group, ack_id)))
            self.conn.send_binary(b"".join(frames))
            await asyncio.wait_for(asyncio.gather(*futures), 60.0)

    async def aclose(self) -> None:
        if self._ping_task is not None:
            self._ping_task.cancel()
        self.conn.close()
        await asyncio.sleep(0.01)


class RestPublisher:
    """Publishes through relaycore's REST API (``POST /api/hubs/{hub}/:send``, 2022-06-01) on a
    pool of keep-alive HTTP/1.1 connections, one request in flight on each: open loop as long
    as a connection is free, queued (and so late, which the latency shows) when none is."""

    def __init__(self, port: int, hub: str, key: str = ACCESS_KEY, pool: int = 16) -> None:
        self.port = port
        self.hub = hub
        self.pool_size = pool
        path = f"/api/hubs/{hub}/:send"
        token = generate_access_token(key, f"http://127.0.0.1{path}", now=time.time(),
                                      lifetime=24 * 3600)
        self._head = (f"POST {path}?api-version=2022-06-01 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                      f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                      "Content-Length: ").encode()
        self._idle: list[_HttpConn] = []
        self._queue: list[bytes] = []
        self.statuses: dict[int, int] = {}

    async def start(self) -> RestPublisher:
        loop = asyncio.get_running_loop()
        for _ in range(self.pool_size):
            _, conn = await loop.create_connection(lambda: _HttpConn(self), "127.0.0.1",
                                                   self.port)
            self._idle.append(conn)
        return self

    def publish(self, room: str, text: str) -> None:
        body = b'{"target":"t","arguments":["%s"]}' % text.encode()
        request = self._head + str(len(body)).encode() + b"\r\n\r\n" + body
        if self._idle:
            self._idle.pop().send(request)
        else:
            self._queue.append(request)

    def _done(self, conn: _HttpConn, status: int) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if self._queue:
            conn.send(self._queue.pop(0))
        else:
            self._idle.append(conn)

    async def aclose(self) -> None:
        for conn in self._idle:
            conn.transport.close()


class _HttpConn(asyncio.Protocol):
    def __init__(self, owner: RestPublisher) -> None:
        self.owner = owner
        self.buf = b""
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def send(self, request: bytes) -> None:
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length:]
            self.owner._done(self, int(head.split(" ", 2)[1]))


# -- raw WebSocket peers ----------------------------------------------------------------------


class RawAdapter(Adapter):
    name = "raw"

    def sub_path(self, *, room: str | None, user: str | None) -> tuple[str, list[tuple[str, str]]]:
        return (f"/sub?room={room}" if room else "/sub"), []

    def send_echo(self, conn: Any, text: str) -> None:
        conn.send_text(text.encode())

    async def open_publisher(self, port: int, backend: str) -> RawPublisher:
        conn = await open_connection(backend, _NullSink(self), "127.0.0.1", port, "/pub")
        return RawPublisher(conn)


class RawPublisher:
    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def publish(self, room: str, text: str) -> None:
        self.conn.send_text(f"{room}|{text}".encode())

    async def aclose(self) -> None:
        self.conn.close()


class _NullSink:
    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter

    def on_frame(self, conn: Any, payload: bytes) -> None:
        self.adapter.on_other(conn, payload)

    def on_closed(self, conn: Any) -> None:
        self.adapter.on_closed(conn)


# -- Socket.IO peers --------------------------------------------------------------------------


class SocketIOAdapter(Adapter):
    """Engine.IO v4 over a WebSocket from the start (no polling): the server's open packet
    ``0{...}``, our ``40`` (connect to namespace "/"), its ``40{"sid":...}``; the server pings
    (``2``) and we answer (``3``)."""

    name = "socketio"

    def sub_path(self, *, room: str | None, user: str | None) -> tuple[str, list[tuple[str, str]]]:
        path = "/socket.io/?EIO=4&transport=websocket"
        return (path + f"&room={room}" if room else path), []

    async def after_open(self, conn: Any) -> None:
        await _wait_ready(conn)

    def on_other(self, conn: Any, payload: bytes) -> None:
        if payload == b"2":
            conn.send_text(b"3")
        elif payload.startswith(b"40"):
            _set_ready(conn)
        elif payload.startswith(b"0"):
            conn.send_text(b"40")
        elif payload.startswith(b"44"):
            _set_ready(conn, payload.decode(errors="replace"))

    def send_echo(self, conn: Any, text: str) -> None:
        conn.send_text(b'42["echo","%s"]' % text.encode())

    async def open_publisher(self, port: int, backend: str) -> SocketIOPublisher:
        conn = await open_connection(backend, _NullSink(self), "127.0.0.1", port,
                                     "/socket.io/?EIO=4&transport=websocket&role=pub")
        await self.after_open(conn)
        return SocketIOPublisher(conn)


class SocketIOPublisher:
    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def publish(self, room: str, text: str) -> None:
        self.conn.send_text(b'42["pub","%s|%s"]' % (room.encode(), text.encode()))

    async def aclose(self) -> None:
        self.conn.close()


ADAPTERS: dict[str, Callable[[], Adapter]] = {
    "signalr": SignalRAdapter,
    "raw": RawAdapter,
    "socketio": SocketIOAdapter,
}

__all__ = ["ADAPTERS", "Adapter", "RawAdapter", "RestPublisher", "ServiceConnection",
           "SignalRAdapter", "SocketIOAdapter", "SourceAddresses"]
