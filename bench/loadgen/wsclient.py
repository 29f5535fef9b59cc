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

Sampled connections (the ones that record latency), whichever backend, are a third kind,
``StampedConnection`` (Linux): its own socket with ``SO_TIMESTAMPNS``, read with ``recvmsg``, so
every read carries the time the kernel received the bytes. One generator process reads a
thousand sockets one after the other per broadcast, so the time its callback sees a frame may
include its own read-out of the others; on loopback the kernel's receive time is taken
when the server's ``write()`` hands the segment to the loopback device, which measures the
server, as a real client that reads its one socket at once would. The connection sets
``arrival_ns`` (``perf_counter_ns`` clock) before each ``Sink.on_frame``; the other kinds leave it
``None``.
"""

from __future__ import annotations

import asyncio
import base64
import os
import platform
import socket
import struct
import sys
import time
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
    #: when the kernel received the bytes of the frame being delivered (``perf_counter_ns``
    #: clock); set by ``StampedConnection`` only, ``None`` for the other kinds
    arrival_ns: int | None = None


# -- own backend ------------------------------------------------------------------------------


class _ServerFrames(_ConnMixin):
    """The server's side of the wire, whatever moves the bytes (``OwnConnection``'s transport,
    ``StampedConnection``'s own socket): the upgrade answer, then unmasked server frames; data
    frames go to the sink, a ping is answered, a close is answered and closes."""

    _buf: bytes
    _upgraded: bool
    _opened: asyncio.Future[None]

    def _send(self, opcode: int, payload: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

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
                self.close()
                return
            self._upgraded = True
            if not self._opened.done():  # not if the opener gave up waiting
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
                self.close()
                return
            pos = end
        if pos < n:
            self._buf = data[pos:]


class OwnConnection(_ServerFrames, asyncio.Protocol):
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


# -- sampled connections: the kernel's receive time --------------------------------------------


def _probe_timestamps() -> int | None:
    """``SO_TIMESTAMPNS`` (also the cmsg type, ``SCM_TIMESTAMPNS``) where the kernel can stamp
    received bytes, else
    ``None`` (then sampled connections use the backend's kind and record read times only).
    CPython does not export the constant; 35 is its value in Linux's generic socket ABI
    (alpha, parisc and sparc number it otherwise)."""
    if sys.platform != "linux":
        return None
    value = getattr(socket, "SO_TIMESTAMPNS", None)
    if value is None:
        if platform.machine().startswith(("alpha", "parisc", "sparc")):
            return None
        value = 35
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, value, 1)
    except OSError:
        return None
    return value


_SO_TIMESTAMPNS = _probe_timestamps() or 0
HAVE_STAMPS = _SO_TIMESTAMPNS != 0
_TIMESPEC = struct.Struct("@ll")  # struct timespec: tv_sec, tv_nsec (native longs)
_ANC_SIZE = socket.CMSG_SPACE(_TIMESPEC.size) if HAVE_STAMPS else 0
_RECV_SIZE = 1 << 16
_perf_ns = time.perf_counter_ns
_time_ns = time.time_ns


class _WallToPerf:
    """Turns the kernel's ``CLOCK_REALTIME`` stamps into ``perf_counter_ns`` time (Linux:
    ``CLOCK_MONOTONIC``), the clock of the due times in the payloads.

    The two clocks differ by a constant that changes only when the wall clock is stepped (NTP
    slewing speeds both up or slows both down alike), so one measurement serves; it is taken
    again once a second, which bounds what a step can skew to that second. A measurement reads
    ``time_ns()`` between two ``perf_counter_ns()`` reads and keeps the tightest of a few: a
    GIL switch between two reads (the publisher thread) would skew a single one by whole ms."""

    REFRESH_NS = 1_000_000_000

    def __init__(self) -> None:
        self.offset = 0
        self.taken = -self.REFRESH_NS
        self.refresh()

    def refresh(self) -> None:
        best = None
        for _ in range(5):
            before = _perf_ns()
            wall = _time_ns()
            after = _perf_ns()
            if best is None or after - before < best[0]:
                best = (after - before, wall - (before + after) // 2)
            if best[0] < 2_000:
                break
        self.offset = best[1]
        self.taken = _perf_ns()

    def __call__(self, wall_ns: int) -> int:
        if _perf_ns() - self.taken > self.REFRESH_NS:
            self.refresh()
        return wall_ns - self.offset


_wall_to_perf = _WallToPerf()


class StampedConnection(_ServerFrames):
    """A sampled connection, whatever the backend: its own non-blocking socket with
    ``SO_TIMESTAMPNS``, read with ``recvmsg`` from a loop reader so that each read brings the
    kernel's receive time of the (last) segment it read, set as ``arrival_ns`` before the
    frames of that read go to the sink.

    When several frames wait in the socket (the generator came round late), a read returns
    them together with the newest segment's time (the kernel also merges queued segments and
    keeps the newest time), so the older ones' arrival latency is overstated, never understated.
    Sends are masked with the zero key like ``OwnConnection``'s and go out with ``send``; what
    the socket does not take (rare: a few small frames a second) waits for a loop writer."""

    def __init__(self, sink: Sink, sampled: bool, sock: socket.socket,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.sink = sink
        self.sampled = sampled
        self.state = None
        self.ready = None
        self.arrival_ns = None
        self.closed = False
        self._sock = sock
        self._fd = sock.fileno()
        self._loop = loop
        self._buf = b""
        self._upgraded = False
        self._opened = loop.create_future()
        self._out: list[bytes] = []  # what the socket did not take yet, in order
        self._closing = False  # close() waits for _out to drain

    def _start(self, request: bytes) -> None:
        self._loop.add_reader(self._fd, self._readable)
        self._write(request)

    def _readable(self) -> None:
        try:
            data, ancillary, _flags, _address = self._sock.recvmsg(_RECV_SIZE, _ANC_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(exc)
            return
        if not data:
            self._lost(None)
            return
        arrival = None
        for level, kind, cdata in ancillary:
            if kind == _SO_TIMESTAMPNS and level == socket.SOL_SOCKET:  # SCM_TIMESTAMPNS
                seconds, nanoseconds = _TIMESPEC.unpack_from(cdata)
                arrival = _wall_to_perf(seconds * 1_000_000_000 + nanoseconds)
        self.arrival_ns = arrival  # None if this read came without a stamp
        self.data_received(data)

    def _send(self, opcode: int, payload: bytes) -> None:
        if not self.closed and not self._closing:
            self._write(encode_frame_header(opcode, len(payload), True, _ZERO_MASK) + payload)

    def _write(self, data: bytes) -> None:
        if self._out:  # keep the order behind what waits
            self._out.append(data)
            return
        try:
            sent = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._lost(exc)
            return
        if sent < len(data):
            self._out.append(data[sent:])
            self._loop.add_writer(self._fd, self._writable)

    def _writable(self) -> None:
        data = b"".join(self._out)
        try:
            sent = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(exc)
            return
        rest = data[sent:]
        self._out = [rest] if rest else []
        if not rest:
            self._loop.remove_writer(self._fd)
            if self._closing:
                self._lost(None)

    def _lost(self, exc: Exception | None) -> None:
        """The end, however it came: stop watching the socket, close it, and tell the sink on
        the next loop pass (as asyncio's ``connection_lost`` would)."""
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self._fd)
        if self._out:
            self._out = []
            self._loop.remove_writer(self._fd)
        self._sock.close()
        if not self._opened.done():
            self._opened.set_exception(ConnectionError(f"closed during the upgrade: {exc}"))
            self._opened.exception()  # retrieved: nobody may be waiting any more (churn)
        self._loop.call_soon(self.sink.on_closed, self)

    # the connection API
    def send_text(self, payload: bytes) -> None:
        self._send(TEXT, payload)

    def send_binary(self, payload: bytes) -> None:
        self._send(BINARY, payload)

    def close(self) -> None:
        """Close once what was sent has left (reading stops now), as a transport's close."""
        if self.closed or self._closing:
            return
        if self._out:
            self._closing = True
            self._loop.remove_reader(self._fd)
        else:
            self._lost(None)

    def abort(self) -> None:
        self._lost(None)


async def _open_stamped(sink: Sink, host: str, port: int, path: str, source: str, sampled: bool,
                        headers: Iterable[tuple[str, str]]) -> StampedConnection:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        sock.bind((source, 0))
        await loop.sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    conn = StampedConnection(sink, sampled, sock, loop)
    try:
        conn._start(_upgrade_request(host, port, path, headers))
        await conn._opened
    except BaseException:
        conn.abort()
        raise
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
    """Open one WebSocket client connection (upgrade done) whose frames go to ``sink``.

    A ``sampled`` connection is a ``StampedConnection`` whatever the backend (where the kernel
    can stamp received bytes): its latency is taken at the socket, not at this process's
    callback."""
    if sampled and HAVE_STAMPS:
        return await _open_stamped(sink, host, port, path, source, sampled, headers)
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
