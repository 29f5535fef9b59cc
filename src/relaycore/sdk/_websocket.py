"""A WebSocket client on anyio: relaycore's sans-I/O ``WebSocketProtocol`` over a TCP stream.

The opening handshake is an HTTP/1.1 upgrade written and read with h11 in client mode; the
``Sec-WebSocket-Accept`` answer is checked against the key sent. After it, one protocol object
holds the connection's state and two kinds of task touch it:

* the reader (``receive``) feeds received bytes in and flushes what the protocol queued in
  answer (Pongs, the reply to a Close);
* senders (``send``) queue a message and flush.

Flushes happen under one lock, so frames never interleave; the protocol object itself is only
touched between awaits, which anyio tasks never interrupt.
"""

from __future__ import annotations

import base64
import os
import ssl
from collections.abc import Sequence
from urllib.parse import urlsplit

import anyio
import anyio.abc
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

__all__ = ["WebSocketClosed", "WebSocketConnection", "WebSocketHandshakeError", "connect_websocket"]

_READ_SIZE = 65536
#: Bound on the upgrade response head, so that a peer that is not a WebSocket server cannot
#: make us buffer without end.
_MAX_RESPONSE_HEAD = 64 * 1024


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
    """An open client WebSocket. Use ``send`` and ``receive`` from any tasks, one reader."""

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        protocol: WebSocketProtocol,
        pending: bytes = b"",
        *,
        write_timeout: float = 30.0,
    ) -> None:
        self._stream = stream
        self._ws = protocol
        #: Seconds one write may take before the connection is given up (see ``_flush``).
        self.write_timeout = write_timeout
        self._send_lock = anyio.Lock()
        self._messages: list[bytes | str] = []
        self._closed: WebSocketClosed | None = None
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

    async def _flush(self, timeout: float | None = None) -> None:
        write_timeout = self.write_timeout if timeout is None else timeout
        async with self._send_lock:
            data = self._ws.data_to_send()
            if not data:
                return
            # A write cut short by a cancellation would leave half a frame on the wire and
            # corrupt the stream for every later message: writes are shielded, and one that
            # does not finish within ``write_timeout`` ends the connection instead.
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(write_timeout) as timer:
                    await self._stream.send(data)
                if timer.cancelled_caught:
                    self._closed = self._closed or WebSocketClosed(
                        1006, f"a write did not finish within {write_timeout} s"
                    )
                    await anyio.aclose_forcefully(self._stream)
                    raise self._closed

    async def send(self, data: bytes | str) -> None:
        """Send one message: binary for ``bytes``, text for ``str``. Raises
        ``WebSocketClosed`` once the connection ended."""
        if self._closed is not None:
            raise self._closed
        if isinstance(data, str):
            self._ws.send_text(data)
        else:
            self._ws.send_binary(data)
        try:
            await self._flush()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self._closed = self._closed or WebSocketClosed(1006, f"send failed: {exc!r}")
            raise self._closed from exc

    async def receive(self) -> bytes | str:
        """The next message (``bytes`` for binary, ``str`` for text). Raises
        ``WebSocketClosed`` when the connection ends."""
        while not self._messages:
            if self._closed is not None:
                if self._ws.close_expected():
                    await self._close_transport()
                raise self._closed
            try:
                data = await self._stream.receive(_READ_SIZE)
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                data = b""
            except anyio.ClosedResourceError:
                raise self._closed or WebSocketClosed(1006, "closed locally") from None
            self._feed(data)
            try:
                await self._flush()
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass
        return self._messages.pop(0)

    async def _close_transport(self) -> None:
        try:
            await self._stream.aclose()
        except (anyio.BrokenResourceError, OSError):
            pass

    async def aclose(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """Send a Close frame (if none was sent) and close the TCP connection without waiting
        for the peer's answer: after a clean shutdown there is nothing left to read."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
            if not self._ws.close_expected() and self._ws.state is State.OPEN:
                self._ws.send_close(code, reason)
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
        Role.CLIENT, max_message_size=max_message_size, mask_key=lambda: os.urandom(4)
    )
    return WebSocketConnection(stream, protocol, pending, write_timeout=write_timeout)


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
