"""The client's WebSocket: an HTTP/1.1 upgrade written and read by h11, then relaycore's
sans-I/O ``WebSocketProtocol`` (client role) over an anyio byte stream.

The hub connection has one reader, its receive loop, and any number of senders (invocations,
keep-alive pings, answers to the server's invocations):

* ``receive`` reads bytes, feeds them to the protocol, and flushes what the protocol queued in
  answer (the Pong to a Ping, the echo of a Close);
* ``send`` queues one message and flushes.

Every flush holds one lock, so frames never interleave, and is shielded from cancellation: a
frame cut in half would corrupt the stream for every later message. A flush that cannot finish
within ``write_timeout`` seconds ends the connection instead.

This is the client's own small driver rather than the SDK's: the client package may use
``protocol/`` but not ``sdk/``, and what the two drivers share beyond ``WebSocketProtocol``
(the upgrade's bytes, a TCP stream) is I/O, which ``protocol/`` must not hold.
"""

from __future__ import annotations

import base64
import os
import ssl
from collections import deque
from collections.abc import Sequence
from typing import Final
from urllib.parse import urlsplit

import anyio
import anyio.abc

from ..protocol import (
    BinaryMessage,
    CloseCode,
    CloseReceived,
    Role,
    State,
    TextMessage,
    WebSocketProtocol,
)
from ..protocol._errors import RemoteProtocolError
from ..protocol._upgrade import ClientUpgrade, UpgradeAccepted, UpgradeRefused
from ._errors import TransportError

__all__ = ["ClientWebSocket", "open_websocket"]

_READ_SIZE: Final = 65536
#: How much of an upgrade answer's head h11 buffers: a peer that is not a WebSocket server
#: must not make the client buffer without end.
_MAX_RESPONSE_HEAD: Final = 64 * 1024
#: How much of a refused upgrade's body is kept for the error message.
_MAX_ERROR_BODY: Final = 2048
#: Seconds ``aclose`` gives the Close frame to leave.
_CLOSE_TIMEOUT: Final = 1.0


class ClientWebSocket:
    """An open client WebSocket: ``receive`` from one task, ``send`` from any. A hub
    connection's ``Transport``."""

    #: The server's pings prove it alive, not the WebSocket: the hub connection pings too.
    inherent_keep_alive = False

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        protocol: WebSocketProtocol,
        pending: bytes,
        write_timeout: float,
    ) -> None:
        self._stream = stream
        self._ws = protocol
        self._write_timeout = write_timeout
        self._lock = anyio.Lock()
        self._messages: deque[bytes] = deque()
        self._ended: TransportError | None = None
        if pending:
            self._feed(pending)

    def _end(self, error: TransportError) -> TransportError:
        """The first reason the connection ended is the one every later call reports."""
        if self._ended is None:
            self._ended = error
        return self._ended

    def _feed(self, data: bytes) -> None:
        if data:
            self._ws.receive_data(data)
        else:
            self._ws.receive_eof()
        for event in self._ws.events_received():
            if isinstance(event, TextMessage):
                # JSON hub records are parsed as bytes; the protocol has checked the UTF-8.
                self._messages.append(event.data.encode("utf-8"))
            elif isinstance(event, BinaryMessage):
                self._messages.append(event.data)
            elif isinstance(event, CloseReceived):
                self._end(_closed(event.code, event.reason))
        if self._ws.close_expected():
            self._end(_closed(self._ws.close_code or CloseCode.ABNORMAL_CLOSURE,
                              self._ws.close_reason))

    async def _flush(self) -> None:
        async with self._lock:
            data = self._ws.data_to_send()
            if not data:
                return
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(self._write_timeout) as timer:
                    try:
                        await self._stream.send(data)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                        await anyio.aclose_forcefully(self._stream)
                        raise self._end(TransportError(
                            f"WebSocket send failed: {exc!r}", code=CloseCode.ABNORMAL_CLOSURE
                        )) from exc
                if timer.cancelled_caught:
                    await anyio.aclose_forcefully(self._stream)
                    raise self._end(TransportError(
                        f"a WebSocket write did not finish within {self._write_timeout:g} s; "
                        "the server stopped reading",
                        code=CloseCode.ABNORMAL_CLOSURE,
                    ))

    async def send(self, data: bytes, *, text: bool) -> None:
        """Send one message: a text one (``data`` is UTF-8) or a binary one."""
        if text:
            await self.send_text(data)
        else:
            await self.send_binary(data)

    async def send_text(self, data: bytes) -> None:
        """Send one text message; ``data`` is UTF-8 already (JSON hub records are)."""
        if self._ended is not None:
            raise self._ended
        self._ws.send_text(data)
        await self._flush()

    async def send_binary(self, data: bytes) -> None:
        """Send one binary message."""
        if self._ended is not None:
            raise self._ended
        self._ws.send_binary(data)
        await self._flush()

    async def receive(self) -> bytes:
        """The payload of the next data message, text or binary. Raises ``TransportError``
        once the connection has ended (after the messages that arrived before its end)."""
        while not self._messages:
            if self._ended is not None:
                await self._close_stream()
                raise self._ended
            try:
                data = await self._stream.receive(_READ_SIZE)
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                data = b""
            except anyio.ClosedResourceError:
                raise self._end(_closed(CloseCode.ABNORMAL_CLOSURE, "closed locally")) from None
            self._feed(data)
            try:
                await self._flush()
            except TransportError:
                pass  # the receive that follows reports it
        return self._messages.popleft()

    async def aclose(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """Send a Close frame (unless one was sent) and close the TCP connection without
        waiting for the server's echo: the hub connection reads nothing more."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(_CLOSE_TIMEOUT):
            if self._ws.state is State.OPEN and self._ended is None:
                self._ws.send_close(code, reason)
                try:
                    await self._flush()
                except TransportError:
                    pass
            self._end(_closed(code, reason))
        await self._close_stream()

    async def _close_stream(self) -> None:
        await anyio.aclose_forcefully(self._stream)


def _closed(code: int, reason: str) -> TransportError:
    described = f"WebSocket closed with status code: {code}" + (f" ({reason})" if reason else "")
    return TransportError(described, code=code, reason=reason)


async def open_websocket(
    url: str,
    headers: Sequence[tuple[str, str]],
    *,
    ssl_context: ssl.SSLContext | None,
    max_message_size: int | None,
    write_timeout: float,
) -> ClientWebSocket:
    """Connect to ``url`` (``ws``/``wss``, or ``http``/``https`` for the same) and upgrade.

    Raises ``TransportError``: with ``status`` when the server answered the upgrade with an
    HTTP error, without when the TCP or TLS connection failed or the answer was not a valid
    upgrade. The caller bounds the time this takes.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("ws", "wss", "http", "https"):
        raise TransportError(f"cannot open a WebSocket to {url!r}: expected a ws://, wss://, "
                             "http:// or https:// URL")
    secure = scheme in ("wss", "https")
    host = parts.hostname or ""
    port = parts.port or (443 if secure else 80)
    try:
        stream: anyio.abc.ByteStream
        if secure:
            stream = await anyio.connect_tcp(
                host, port, ssl_context=ssl_context or ssl.create_default_context(),
                tls_standard_compatible=False,
            )
        else:
            stream = await anyio.connect_tcp(host, port)
    except OSError as exc:
        raise TransportError(f"WebSocket failed to connect to {host}:{port}: {exc}") from exc
    try:
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        pending = await _upgrade(stream, parts.netloc, target, headers, url)
    except BaseException:
        await anyio.aclose_forcefully(stream)
        raise
    protocol = WebSocketProtocol(
        Role.CLIENT, max_message_size=max_message_size, mask_key=lambda: os.urandom(4)
    )
    return ClientWebSocket(stream, protocol, pending, write_timeout)


async def _receive_some(stream: anyio.abc.ByteStream) -> bytes:
    try:
        return await stream.receive(_READ_SIZE)
    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
        return b""


async def _upgrade(
    stream: anyio.abc.ByteStream,
    netloc: str,
    target: str,
    headers: Sequence[tuple[str, str]],
    url: str,
) -> bytes:
    """Send the upgrade request, read the answer; the bytes that followed the 101 head."""
    key = base64.b64encode(os.urandom(16)).decode("ascii")
    upgrade = ClientUpgrade(netloc, target, headers, key, max_head=_MAX_RESPONSE_HEAD)
    try:
        await stream.send(upgrade.data_to_send())
    except (anyio.BrokenResourceError, OSError) as exc:
        raise TransportError(f"WebSocket failed to connect to {url}: {exc!r}") from exc
    try:
        while upgrade.result is None:
            upgrade.receive_data(await _receive_some(stream))
        if isinstance(upgrade.result, UpgradeAccepted):
            return upgrade.result.trailing
        # A refusal: its body says why (read for a second at most).
        with anyio.move_on_after(1.0):
            while not upgrade.body_complete and len(upgrade.body) < _MAX_ERROR_BODY:
                upgrade.receive_data(await _receive_some(stream))
    except RemoteProtocolError as exc:
        raise TransportError(f"WebSocket failed to connect to {url}: {exc}",
                             status=upgrade.status) from None
    assert isinstance(upgrade.result, UpgradeRefused)
    shown = bytes(upgrade.body[:_MAX_ERROR_BODY]).decode("utf-8", "replace").strip()
    raise TransportError(
        f"WebSocket failed to connect to {url}: HTTP {upgrade.result.status}"
        + (f": {shown}" if shown else ""),
        status=upgrade.result.status,
    )
