"""The load generator's WebSocket client layer: many connections, little CPU per frame.

Two interchangeable backends open a client connection and call back into a ``Sink``:

* ``picows`` (PyPI; Cython framing, automatic pongs) when it is installed: the fast one.
* ``own``: an ``asyncio.Protocol`` with a lean frame walker (server frames are never masked)
  that needs nothing but the standard library and relaycore's fast path for client-frame
  headers. It sends client frames with an all-zero masking key (RFC 6455 asks for an
  unpredictable key to protect intermediaries; a zero key makes masking a no-op, which a load
  generator on loopback may afford and every server accepts).

Every data frame goes to ``Sink.on_frame(conn, payload: bytes)``; control frames are handled
here (pong to a ping, close on a close). A connection binds to a chosen source address
(``127.0.0.x``) so that 15k connections do not run out of ephemeral ports.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Iterable
from typing import Any, Protocol

from relaycore._accel import encode_frame_header

try:
    import picows

    HAVE_PICOWS = True
except ImportError:  # the smoke mode must run with what `make test` installs
    picows = None
    HAVE_PICOWS = False

TEXT = 0x1
BINARY = 0x2
CLOSE = 0x8
PING = 0x9
PONG = 0xA
_ZERO_MASK = b"\0\0\0\0"


class Sink(Protocol):
    def on_frame(self, conn: Any, payload: bytes) -> None: ...
    def on_closed(self, conn: Any) -> None: ...


class _ConnMixin:
    """What every connection carries, whichever backend moves its bytes."""

    sink: Sink
    sampled: bool
    #: free for the adapter (a readiness future, a user id, a room)
    state: Any
    ready: asyncio.Future[None] | None


# -- own backend ------------------------------------------------------------------------------


class OwnConnection(asyncio.Protocol, _ConnMixin):
    def __init__(self, sink: Sink, request: bytes, sampled: bool) -> None:
        self.sink = sink
        self.sampled = sampled
        self.state = None
        self.ready = None
        self.transport: asyncio.Transport | None = None
        self._buf = b""
        self._upgraded = False
        self._request = request
        self._opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = False

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self._request)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self._opened.done():
            self._opened.set_exception(ConnectionError(f"closed during the upgrade: {exc}"))
            self._opened.exception()  # retrieved: nobody may be waiting any more (churn)
        self.sink.on_closed(self)

    def data_received(self, data: bytes) -> None:
        if self._buf:
            data = self._buf + data
            self._buf = b""
        if not self._upgraded:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self._buf = data
                return
            if not data.startswith(b"HTTP/1.1 101"):
                if not self._opened.done():
                    self._opened.set_exception(ConnectionError(
                        data[:end].decode("latin-1").splitlines()[0]))
                self.transport.close()
                return
            self._upgraded = True
            self._opened.set_result(None)
            data = data[end + 4:]
        n = len(data)
        pos = 0
        sink = self.sink
        while n - pos >= 2:
            b0 = data[pos]
            length = data[pos + 1] & 0x7F
            if length < 126:
                head = 2
            elif length == 126:
                if n - pos < 4:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                head = 4
            else:
                if n - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2:pos + 10], "big")
                head = 10
            end = pos + head + length
            if end > n:
                break
            opcode = b0 & 0x0F
            if opcode == TEXT or opcode == BINARY:
                sink.on_frame(self, data[pos + head:end])
            elif opcode == PING:
                self._send(PONG, data[pos + head:end])
            elif opcode == CLOSE:
                self._send(CLOSE, data[pos + head:pos + head + 2])
                self.transport.close()
                return
            pos = end
        if pos < n:
            self._buf = data[pos:]

    def _send(self, opcode: int, payload: bytes) -> None:
        if not self.closed:
            self.transport.write(encode_frame_header(opcode, len(payload), True, _ZERO_MASK)
                                 + payload)

    # the connection API
    def send_text(self, payload: bytes) -> None:
        self._send(TEXT, payload)

    def send_binary(self, payload: bytes) -> None:
        self._send(BINARY, payload)

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.abort()


def _upgrade_request(host: str, port: int, path: str,
                     headers: Iterable[tuple[str, str]] = ()) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers)
    return (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"{extra}\r\n").encode()


async def _open_own(sink: Sink, host: str, port: int, path: str, source: str, sampled: bool,
                    headers: Iterable[tuple[str, str]]) -> OwnConnection:
    loop = asyncio.get_running_loop()
    request = _upgrade_request(host, port, path, headers)
    _, conn = await loop.create_connection(lambda: OwnConnection(sink, request, sampled),
                                           host, port, local_addr=(source, 0))
    await conn._opened
    return conn


# -- picows backend ---------------------------------------------------------------------------

if HAVE_PICOWS:
    _P_TEXT = picows.WSMsgType.TEXT
    _P_BINARY = picows.WSMsgType.BINARY
    _P_CLOSE = picows.WSMsgType.CLOSE

    class PicowsConnection(picows.WSListener, _ConnMixin):  # type: ignore[misc]
        def __init__(self, sink: Sink, sampled: bool) -> None:
            super().__init__()
            self.sink = sink
            self.sampled = sampled
            self.state = None
            self.ready = None
            self.transport: Any = None
            self.closed = False

        def on_ws_connected(self, transport: Any) -> None:
            self.transport = transport

        def on_ws_frame(self, transport: Any, frame: Any) -> None:
            t = frame.msg_type
            if t is _P_TEXT or t is _P_BINARY:
                self.sink.on_frame(self, frame.get_payload_as_bytes())
            elif t is _P_CLOSE:
                transport.send_close(frame.get_close_code())
                transport.disconnect()

        def on_ws_disconnected(self, transport: Any) -> None:
            self.closed = True
            self.sink.on_closed(self)

        def send_text(self, payload: bytes) -> None:
            if not self.closed:
                self.transport.send(_P_TEXT, payload)

        def send_binary(self, payload: bytes) -> None:
            if not self.closed:
                self.transport.send(_P_BINARY, payload)

        def close(self) -> None:
            if not self.closed:
                self.transport.disconnect(graceful=True)

        def abort(self) -> None:
            if not self.closed:
                self.transport.disconnect(graceful=False)


async def _open_picows(sink: Sink, host: str, port: int, path: str, source: str, sampled: bool,
                       headers: Iterable[tuple[str, str]]) -> Any:
    _, conn = await picows.ws_connect(
        lambda: PicowsConnection(sink, sampled), f"ws://{host}:{port}{path}",
        local_addr=(source, 0), websocket_handshake_timeout=60, enable_auto_pong=True,
        max_frame_size=64 << 20, extra_headers=list(headers) or None)
    return conn


# -- choosing ---------------------------------------------------------------------------------


def default_backend() -> str:
    return "picows" if HAVE_PICOWS else "own"


async def open_connection(backend: str, sink: Sink, host: str, port: int, path: str, *,
                          source: str = "127.0.0.1", sampled: bool = False,
                          headers: Iterable[tuple[str, str]] = ()) -> Any:
    """Open one WebSocket client connection (upgrade done) whose frames go to ``sink``."""
    if backend == "picows":
        if not HAVE_PICOWS:
            raise RuntimeError("picows is not installed (bench/peers/setup.sh installs it)")
        return await _open_picows(sink, host, port, path, source, sampled, headers)
    return await _open_own(sink, host, port, path, source, sampled, headers)


class SourceAddresses:
    """Hands out source addresses ``127.0.0.{first..last}`` round robin: each address has its
    own ~28k ephemeral ports, and spreading over many keeps earlier runs' TIME_WAIT ports out
    of the way."""

    def __init__(self, first: int = 2, last: int = 250) -> None:
        self._addresses = [f"127.0.0.{i}" for i in range(first, last + 1)]
        self._next = 0

    def __call__(self) -> str:
        address = self._addresses[self._next]
        self._next = (self._next + 1) % len(self._addresses)
        return address
