"""A WebSocket client on anyio: relaycore's sans-I/O ``WebSocketProtocol`` over a TCP stream.

The opening handshake is an HTTP/1.1 upgrade written and read with h11 in client mode; the
``Sec-WebSocket-Accept`` answer is checked against the key sent. After it, one protocol object
holds the connection's state and these tasks touch it:

* the reader (``receive``, ``receive_some``) feeds received bytes in, hands out every message
  one read brought, and flushes what the protocol queued in answer (Pongs, the reply to a
  Close);
* senders (``send``) queue a frame;
* the writer (``run_writer``, when its owner runs one) writes what was queued: the frames of
  every sender of one scheduling round in one write, so that a send costs no system call of
  its own. Without a writer each send writes (and waits for) its own frame.

A write on a plain TCP connection is one non-blocking ``write()`` on a duplicate of the
socket's descriptor, as the relay's flusher writes: no timer, no cancel scope, no round of the
event loop. Only what the kernel does not take goes through the anyio stream, which waits for
room (shielded, bounded by ``write_timeout``). On asyncio the transport may then keep bytes of
its own, so the connection writes through the stream from then on: bytes never overtake one
another. TLS connections always write through the stream.

One write is under way at a time (``_writing``), taking everything queued when it starts, so
frames never interleave; the protocol object itself is only touched between awaits, which anyio
tasks never interrupt. Frames are masked with keys drawn from the OS's random source 4 KiB at a
time (``_MaskKeys``), not one read of it per frame.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import os
import ssl
from collections.abc import Callable, Sequence
from typing import Protocol
from urllib.parse import urlsplit

import anyio
import anyio.abc
import anyio.lowlevel
import h11

from relaycore.protocol import (
    BinaryMessage,
    CloseCode,
    CloseReceived,
    Role,
    State,
    TextMessage,
    WebSocketProtocol,
    accept_key,
)

__all__ = [
    "Wakeup",
    "WebSocketClosed",
    "WebSocketConnection",
    "WebSocketHandshakeError",
    "connect_websocket",
    "loop_clock",
    "wakeup_factory",
]

_READ_SIZE = 65536
#: While a writer runs, a send returns as soon as its frame is queued, unless more than this
#: many bytes wait for the writer: then it waits for the write (backpressure, as a send into a
#: full socket buffer would).
_SEND_AHEAD = 256 * 1024
#: Random bytes read from the OS at a time for masking keys (1,024 frames' worth).
_MASK_POOL = 4096
#: Bound on the upgrade response head, so that a peer that is not a WebSocket server cannot
#: make us buffer without end.
_MAX_RESPONSE_HEAD = 64 * 1024


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _write_fd(stream: anyio.abc.ByteStream) -> int | None:
    """A duplicate of the descriptor of ``stream``'s socket (``None`` when it has none, or
    where a socket is not a file descriptor that ``os.write`` takes: Windows)."""
    raw = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
    if raw is None or os.name != "posix":
        return None
    try:
        return os.dup(raw.fileno())
    except OSError:
        return None


class Wakeup(Protocol):
    """A one-shot signal between two tasks of one event loop (``anyio.Event``'s two calls)."""

    def set(self) -> None: ...

    async def wait(self) -> None: ...


class _FutureWakeup:
    """``Wakeup`` as a future of the asyncio loop it was made on. An ``anyio.Event`` asks
    asyncio for the running loop on every ``wait``, and CPython 3.11 checks the answer with a
    ``getpid()`` system call: a task woken for every message would make one per message."""

    __slots__ = ("_future",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._future: asyncio.Future[None] = loop.create_future()

    def set(self) -> None:
        if not self._future.done():
            self._future.set_result(None)

    async def wait(self) -> None:
        # A cancellation of the waiting task cancels the future with it: it is one-shot.
        await self._future


def wakeup_factory() -> Callable[[], Wakeup]:
    """What makes ``Wakeup`` signals for the running event loop: futures of the loop on
    asyncio, ``anyio.Event`` elsewhere. Call it from the loop it is for."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return anyio.Event
    return functools.partial(_FutureWakeup, loop)


def loop_clock() -> Callable[[], float]:
    """``anyio.current_time`` of the running event loop, as a function that does not look the
    loop up on every call: on asyncio, the loop's own ``time`` (anyio finds the running loop
    and task for each call, and CPython 3.11 asks the kernel for the process id each time it
    does); elsewhere (trio) ``anyio.current_time`` itself. Call it from the loop it is for."""
    try:
        return asyncio.get_running_loop().time
    except RuntimeError:  # not asyncio (trio has no per-call cost to save)
        return anyio.current_time


class _MaskKeys:
    """Masking keys for a client's frames: 4 bytes from the OS's random source for each frame
    (RFC 6455 §5.3: unpredictable, fresh for each frame), read ``_MASK_POOL`` bytes at a time
    so that a frame costs no system call."""

    __slots__ = ("_pool", "_pos")

    def __init__(self) -> None:
        self._pool = b""
        self._pos = 0

    def __call__(self) -> bytes:
        pos = self._pos
        if pos >= len(self._pool):
            self._pool = os.urandom(_MASK_POOL)
            pos = 0
        self._pos = pos + 4
        return self._pool[pos : pos + 4]


class WebSocketHandshakeError(ConnectionError):
    """The server refused the upgrade, or answered it wrongly. ``status`` is the HTTP status
    (``None`` when the answer was not HTTP); ``body`` holds the start of the response body."""

    def __init__(self, message: str, status: int | None = None, body: bytes = b"") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class WebSocketClosed(ConnectionError):
    """The WebSocket ended: ``code`` and ``reason`` of the close (1006 without a close frame)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"WebSocket closed with code {code}" + (f": {reason}" if reason else ""))
        self.code = code
        self.reason = reason


class WebSocketConnection:
    """An open client WebSocket. Use ``send`` and ``receive`` from any tasks, one reader; run
    ``run_writer`` in a task beside them so that sends are written in batches."""

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        protocol: WebSocketProtocol,
        pending: bytes = b"",
        *,
        write_timeout: float = 30.0,
        write_fd: int | None = None,
    ) -> None:
        self._stream = stream
        self._ws = protocol
        #: Our duplicate of the socket's descriptor, for non-blocking writes (see the module
        #: doc); ``None`` once writes go through the stream. Closed with the stream.
        self._fd = write_fd
        self._own_fd = write_fd
        #: asyncio's transports buffer what the socket does not take; trio's streams do not.
        self._stream_buffers = _on_asyncio()
        #: Seconds one write may take before the connection is given up (see ``_write_out``).
        self.write_timeout = write_timeout
        self._clock = loop_clock()
        self._new_wakeup = wakeup_factory()
        self._messages: list[bytes | str] = []
        self._closed: WebSocketClosed | None = None
        #: Frames queued for the next write, and their size.
        self._out: list[bytes] = []
        self._out_size = 0
        #: A write is under way (it takes what is queued until it finds nothing more).
        self._writing = False
        #: Set after each write; made by a task that waits for one.
        self._written: anyio.Event | None = None
        #: ``run_writer`` runs: senders leave the writing to it.
        self._writer = False
        #: What the idle writer waits on; set by the send that queues the next frame.
        self._wake: Wakeup | None = None
        self._stop_writer = False
        if pending:
            self._feed(pending)

    @property
    def closed(self) -> bool:
        """Whether the connection ended (or is ending)."""
        return self._closed is not None

    def _feed(self, data: bytes) -> None:
        if data:
            self._ws.receive_data(data)
        else:
            self._ws.receive_eof()
        for event in self._ws.events_received():
            if isinstance(event, BinaryMessage | TextMessage):
                self._messages.append(event.data)
            elif isinstance(event, CloseReceived) and self._closed is None:
                self._closed = WebSocketClosed(event.code, event.reason)
        if self._ws.close_expected() and self._closed is None:
            self._closed = WebSocketClosed(self._ws.close_code or 1006, self._ws.close_reason)

    def _take(self) -> bool:
        """Move what the protocol queued to the write queue; whether there was anything."""
        data = self._ws.data_to_send()
        if not data:
            return False
        self._out.append(data)
        self._out_size += len(data)
        return True

    def _notify_written(self) -> None:
        written = self._written
        if written is not None:
            self._written = None
            written.set()

    async def _wait_written(self) -> None:
        if self._written is None:
            self._written = anyio.Event()
        await self._written.wait()

    async def _write_out(self, timeout: float) -> None:
        """Write everything queued, including what is queued while a write is under way."""
        self._writing = True
        try:
            while self._out:
                out = self._out
                self._out = []
                self._out_size = 0
                data = out[0] if len(out) == 1 else b"".join(out)
                sent = self._write_now(data)
                if sent < len(data):
                    await self._write_rest(data[sent:] if sent else data, timeout)
                self._notify_written()
        finally:
            self._writing = False
            self._notify_written()

    def _write_now(self, data: bytes) -> int:
        """A non-blocking write on the socket: how many bytes it took (an error that is not
        "full" means the connection broke, and raises)."""
        fd = self._fd
        if fd is None:
            return 0
        try:
            return os.write(fd, data)
        except BlockingIOError:
            return 0

    async def _write_rest(self, data: bytes, timeout: float) -> None:
        """Write through the stream, which waits for room."""
        if self._stream_buffers:
            self._fd = None  # the transport may keep bytes: later writes must queue behind them
        # A write cut short by a cancellation would leave half a frame on the wire and
        # corrupt the stream for every later message: it is shielded, and one that does
        # not finish within ``timeout`` ends the connection instead.
        with anyio.CancelScope(shield=True, deadline=self._clock() + timeout) as scope:
            await self._stream.send(data)
        if scope.cancelled_caught:
            self._closed = self._closed or WebSocketClosed(
                1006, f"a write did not finish within {timeout} s"
            )
            await self._close_stream(forcefully=True)
            raise self._closed

    async def _flush(self, timeout: float | None = None) -> None:
        """Return once everything queued so far is written, by this task or by the write
        under way."""
        while True:
            if self._writing:
                await self._wait_written()
            elif self._out:
                await self._write_out(self.write_timeout if timeout is None else timeout)
            else:
                return

    async def run_writer(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Write what senders queue until ``stop_writer()``, the connection's end, or
        cancellation: the frames queued in one scheduling round go out in one write, and a
        send returns without waiting for it (unless ``_SEND_AHEAD`` bytes wait already).
        A failed write ends the connection; later sends raise ``WebSocketClosed``.
        (``task_group.start`` returns once sends are left to it.)"""
        if self._writer:
            raise RuntimeError("this WebSocket already has a writer")
        self._writer = True
        task_status.started()
        try:
            while True:
                if not self._out:
                    if self._stop_writer or self._closed is not None:
                        return
                    self._wake = wake = self._new_wakeup()
                    await wake.wait()
                    continue
                # Let the other senders of this round queue their frames first.
                await anyio.lowlevel.checkpoint()
                try:
                    await self._flush()
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                    # (a timed-out write raises the WebSocketClosed it set, an OSError too)
                    self._closed = self._closed or WebSocketClosed(1006, f"send failed: {exc!r}")
                    return
        finally:
            self._writer = False
            self._wake = None
            self._notify_written()  # senders waiting for room write for themselves

    def stop_writer(self) -> None:
        """End ``run_writer`` once it has written what is queued."""
        self._stop_writer = True
        self._wake_writer()

    def _wake_writer(self) -> None:
        wake = self._wake
        if wake is not None:
            self._wake = None
            wake.set()

    async def send(self, data: bytes | str) -> None:
        """Send one message: binary for ``bytes``, text for ``str``. With a writer running it
        returns once the frame is queued; else once it is written. Raises
        ``WebSocketClosed`` once the connection ended."""
        if self._closed is not None:
            raise self._closed
        if isinstance(data, str):
            self._ws.send_text(data)
        else:
            self._ws.send_binary(data)
        self._take()
        try:
            if self._writer:
                self._wake_writer()
                while self._out_size > _SEND_AHEAD and self._writer and self._closed is None:
                    await self._wait_written()
                if self._writer or not self._out:
                    return
            await self._flush()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self._closed = self._closed or WebSocketClosed(1006, f"send failed: {exc!r}")
            raise self._closed from exc

    async def receive(self) -> bytes | str:
        """The next message (``bytes`` for binary, ``str`` for text). Raises
        ``WebSocketClosed`` when the connection ends."""
        if not self._messages:
            await self._fill()
        return self._messages.pop(0)

    async def receive_some(self) -> list[bytes | str]:
        """Every message received so far, in order, at least one (waiting for it): what one
        read brought, for a reader that handles them as a batch. Raises ``WebSocketClosed``
        when the connection ends."""
        if not self._messages:
            await self._fill()
        messages = self._messages
        self._messages = []
        return messages

    async def _fill(self) -> None:
        while not self._messages:
            if self._closed is not None:
                if self._ws.close_expected():
                    self._take()
                    try:
                        await self._flush()
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                        pass
                    await self._close_transport()
                raise self._closed
            try:
                data = await self._stream.receive(_READ_SIZE)
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                data = b""
            except anyio.ClosedResourceError:
                raise self._closed or WebSocketClosed(1006, "closed locally") from None
            self._feed(data)
            if self._take():  # Pongs, the reply to a Close
                if self._writer and self._closed is None:
                    self._wake_writer()
                    continue
                try:
                    await self._flush()
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    pass  # WebSocketClosed is an OSError too

    async def _close_transport(self) -> None:
        try:
            await self._close_stream()
        except (anyio.BrokenResourceError, OSError):
            pass

    async def _close_stream(self, *, forcefully: bool = False) -> None:
        """Close the stream, and our duplicate of its descriptor first: no write may reach
        a descriptor number the system has given to another socket since."""
        self._fd = None
        if self._own_fd is not None:
            fd, self._own_fd = self._own_fd, None
            os.close(fd)
        if forcefully:
            await anyio.aclose_forcefully(self._stream)
        else:
            await self._stream.aclose()

    async def aclose(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """Send a Close frame (if none was sent) after what is queued, and close the TCP
        connection without waiting for the peer's answer: after a clean shutdown there is
        nothing left to read."""
        self.stop_writer()
        with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
            if not self._ws.close_expected() and self._ws.state is State.OPEN:
                self._ws.send_close(code, reason)
                self._take()
            try:
                await self._flush(timeout=1.0)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass
            self._closed = self._closed or WebSocketClosed(code, reason)
            await self._close_transport()


async def connect_websocket(
    url: str,
    headers: Sequence[tuple[str, str]] = (),
    *,
    max_message_size: int | None = None,
    ssl_context: ssl.SSLContext | None = None,
    write_timeout: float = 30.0,
) -> WebSocketConnection:
    """Open a client WebSocket to ``url`` (``ws``/``wss``, or ``http``/``https`` for the same).

    Raises ``OSError`` when the TCP connection fails and ``WebSocketHandshakeError`` when the
    server does not accept the upgrade. The caller bounds the time (``anyio.fail_after``).
    A write that takes longer than ``write_timeout`` seconds ends the connection.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("ws", "wss", "http", "https"):
        raise ValueError(f"WebSocket URL {url!r} must use ws://, wss://, http:// or https://")
    secure = scheme in ("wss", "https")
    host = parts.hostname or ""
    port = parts.port or (443 if secure else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    stream: anyio.abc.ByteStream
    if secure:
        stream = await anyio.connect_tcp(
            host,
            port,
            tls=True,
            ssl_context=ssl_context or ssl.create_default_context(),
            tls_standard_compatible=False,
        )
    else:
        stream = await anyio.connect_tcp(host, port)
    try:
        pending = await _upgrade(stream, parts.netloc, target, headers)
    except BaseException:
        await anyio.aclose_forcefully(stream)
        raise
    protocol = WebSocketProtocol(
        Role.CLIENT, max_message_size=max_message_size, mask_key=_MaskKeys()
    )
    # A 101 comes once the whole request arrived: nothing of ours waits in the transport, so
    # writes on the descriptor cannot overtake bytes of the stream (see the module doc).
    return WebSocketConnection(
        stream,
        protocol,
        pending,
        write_timeout=write_timeout,
        write_fd=None if secure else _write_fd(stream),
    )


async def _upgrade(
    stream: anyio.abc.ByteStream, netloc: str, target: str, headers: Sequence[tuple[str, str]]
) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode("ascii")
    client = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_RESPONSE_HEAD)
    request = h11.Request(
        method="GET",
        target=target,
        headers=[
            ("Host", netloc),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", key),
            ("Sec-WebSocket-Version", "13"),
            *headers,
        ],
    )
    await stream.send(client.send(request))
    while True:
        try:
            event = client.next_event()
        except h11.RemoteProtocolError as exc:
            raise WebSocketHandshakeError(
                f"bad HTTP response to the WebSocket upgrade: {exc}"
            ) from None
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive(_READ_SIZE)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                data = b""
            client.receive_data(data)
            continue
        if isinstance(event, h11.InformationalResponse) and event.status_code == 101:
            response_headers = {k.decode().lower(): v.decode() for k, v in event.headers}
            if response_headers.get("sec-websocket-accept") != accept_key(key):
                raise WebSocketHandshakeError(
                    "the server's Sec-WebSocket-Accept does not match the key sent", 101
                )
            if response_headers.get("upgrade", "").lower() != "websocket":
                raise WebSocketHandshakeError("the 101 response has no 'Upgrade: websocket'", 101)
            data, _closed = client.trailing_data
            return bytes(data)
        if isinstance(event, h11.Response):
            body = await _read_body(client, stream)
            raise WebSocketHandshakeError(
                f"the server refused the WebSocket upgrade with HTTP {event.status_code}"
                + (f": {body[:200].decode('utf-8', 'replace')}" if body else ""),
                event.status_code,
                body,
            )
        if isinstance(event, h11.ConnectionClosed):
            raise WebSocketHandshakeError("the server closed the connection during the upgrade")


async def _read_body(client: h11.Connection, stream: anyio.abc.ByteStream) -> bytes:
    body = bytearray()
    with anyio.move_on_after(2.0):
        while len(body) < 4096:
            try:
                event = client.next_event()
            except h11.RemoteProtocolError:
                break
            if event is h11.NEED_DATA:
                try:
                    client.receive_data(await stream.receive(_READ_SIZE))
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    client.receive_data(b"")
                continue
            if isinstance(event, h11.Data):
                body += event.data
                continue
            break
    return bytes(body[:4096])
