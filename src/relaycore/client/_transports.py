"""The transports a hub connection can run on, and the two that ride on plain HTTP requests.

A transport carries hub protocol bytes both ways once negotiate named the connection; the
hub connection sees only ``Transport``. ``ClientWebSocket`` (``_websocket.py``) is one; here
are the others (``client-protocol.md`` §2.2-2.4, the JS client's ``ServerSentEventsTransport``
and ``LongPollingTransport``):

* **Server-Sent Events**: ``GET {url}?id=...`` with ``Accept: text/event-stream`` carries the
  server's messages as events (``data:`` lines, a blank line ending each); text only, so JSON
  only. The transport is open once the server answered 200.
* **Long polling**: ``GET {url}?id=...&_=<ms>`` answered with whatever the server has: the
  first poll at once (the connection is then open), later ones when there is something, or
  empty after the server's poll timeout (poll again), or 204 when the server ended the
  connection. Each poll proves the connection alive, so the hub connection neither pings nor
  times the server out (``inherent_keep_alive``). Stopping sends ``DELETE {url}?id=...``.

Both send with ``POST {url}?id=...``, one request at a time so that messages keep their order.
Every request carries the bearer token in its ``Authorization`` header.
"""

from __future__ import annotations

import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Final, Protocol

import anyio
import httpx

from ._errors import TransportError

__all__ = [
    "LONG_POLLING",
    "SERVER_SENT_EVENTS",
    "TRANSPORT_NAMES",
    "WEBSOCKETS",
    "LongPollingTransport",
    "ServerSentEventsTransport",
    "Transport",
    "transport_names",
]

WEBSOCKETS: Final = "WebSockets"
SERVER_SENT_EVENTS: Final = "ServerSentEvents"
LONG_POLLING: Final = "LongPolling"
#: The transports' names as negotiate lists them, in ASP.NET Core's order of preference.
TRANSPORT_NAMES: Final = (WEBSOCKETS, SERVER_SENT_EVENTS, LONG_POLLING)

#: The JS client gives up on a poll after 100 s (servers hold one for 90 s at most).
_POLL_TIMEOUT: Final = 100.0
_TEXT: Final = "text/plain;charset=UTF-8"
_BINARY: Final = "application/octet-stream"


class Transport(Protocol):
    """What the hub connection needs of a transport."""

    #: The transport proves the connection alive by itself: no pings, no server timeout.
    inherent_keep_alive: bool

    async def send(self, data: bytes, *, text: bool) -> None:
        """Send hub protocol bytes (``text``: UTF-8, a JSON record or the handshake)."""
        ...

    async def receive(self) -> bytes:
        """The next bytes from the server; ``TransportError`` once the transport ended."""
        ...

    async def aclose(self) -> None:
        """End the transport (idempotent)."""
        ...


def transport_names(transport: str | Sequence[str] | None) -> tuple[str, ...]:
    """The transports a caller allows, spelled as negotiate spells them (any case given).

    >>> transport_names(None)
    ('WebSockets', 'ServerSentEvents', 'LongPolling')
    >>> transport_names(["longpolling", "WEBSOCKETS"])
    ('LongPolling', 'WebSockets')
    """
    if transport is None:
        return TRANSPORT_NAMES
    names = [transport] if isinstance(transport, str) else list(transport)
    known = {name.lower(): name for name in TRANSPORT_NAMES}
    chosen: list[str] = []
    for name in names:
        spelled = known.get(str(name).lower()) if isinstance(name, str) else None
        if spelled is None:
            raise ValueError(f"unknown transport {name!r}; expected one of "
                             f"{', '.join(TRANSPORT_NAMES)}")
        if spelled not in chosen:
            chosen.append(spelled)
    if not chosen:
        raise ValueError("at least one transport is needed")
    return tuple(chosen)


class _HttpTransport:
    """What both HTTP transports share: the client, the URL with ``id``, the POSTs."""

    inherent_keep_alive = False

    def __init__(self, http: httpx.AsyncClient, url: str, headers: Sequence[tuple[str, str]],
                 name: str) -> None:
        self._http = http
        self._url = url
        self._headers = list(headers)
        self._name = name
        self._send_lock = anyio.Lock()
        self._ended: TransportError | None = None

    def _end(self, error: TransportError) -> TransportError:
        if self._ended is None:
            self._ended = error
        return self._ended

    async def send(self, data: bytes, *, text: bool) -> None:
        if self._ended is not None:
            raise self._ended
        async with self._send_lock:
            try:
                response = await self._http.post(self._url, content=data, headers=[
                    *self._headers, ("Content-Type", _TEXT if text else _BINARY)])
            except httpx.HTTPError as exc:
                raise TransportError(f"{self._name}: sending to {self._url} failed: {exc!r}"
                                     ) from exc
        if response.status_code != 200:
            raise TransportError(
                f"{self._name}: sending to {self._url} was answered HTTP "
                f"{response.status_code}: {response.text[:200]}", status=response.status_code)

    async def _close_client(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._http.aclose()


def _client(timeout: httpx.Timeout, ssl_context: ssl.SSLContext | None) -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=timeout,
                             verify=ssl_context if ssl_context is not None else True)


class LongPollingTransport(_HttpTransport):
    """Long polling (see the module doc). ``open`` returns it once the first poll answered."""

    inherent_keep_alive = True

    @classmethod
    async def open(cls, url: str, headers: Sequence[tuple[str, str]], *, timeout: float,
                   ssl_context: ssl.SSLContext | None) -> LongPollingTransport:
        http = _client(httpx.Timeout(timeout, read=_POLL_TIMEOUT), ssl_context)
        transport = cls(http, url, headers, LONG_POLLING)
        try:
            response = await transport._poll()
            if response.status_code != 200:
                raise TransportError(
                    f"LongPolling failed to connect to {url}: HTTP {response.status_code}: "
                    f"{response.text[:200]}", status=response.status_code)
        except BaseException:
            await transport._close_client()
            raise
        return transport

    async def _poll(self) -> httpx.Response:
        # The cache buster of the JS client: a proxy must not answer a poll from its cache.
        url = f"{self._url}&_={int(time.time() * 1000)}"
        try:
            return await self._http.get(url, headers=self._headers)
        except httpx.HTTPError as exc:
            raise TransportError(f"LongPolling: the poll of {self._url} failed: {exc!r}"
                                 ) from exc

    async def receive(self) -> bytes:
        while True:
            if self._ended is not None:
                raise self._ended
            try:
                response = await self._poll()
            except TransportError as exc:
                if isinstance(exc.__cause__, httpx.TimeoutException):
                    continue  # a poll the server held too long: poll again, as the JS client
                raise self._end(exc) from exc.__cause__
            if response.status_code == 204:
                raise self._end(TransportError(
                    "The server ended the long-polling connection (HTTP 204).", status=204))
            if response.status_code != 200:
                raise self._end(TransportError(
                    f"LongPolling: the poll of {self._url} was answered HTTP "
                    f"{response.status_code}: {response.text[:200]}",
                    status=response.status_code))
            if response.content:
                return response.content
            # Empty: the server's poll timeout passed with nothing to say.

    async def aclose(self) -> None:
        if self._ended is None:
            self._end(TransportError("LongPolling: the connection was closed by the client."))
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                try:
                    await self._http.delete(self._url, headers=self._headers)
                except httpx.HTTPError:
                    pass  # the server forgets an idle connection anyway
        await self._close_client()


class ServerSentEventsTransport(_HttpTransport):
    """Server-Sent Events (see the module doc). ``open`` returns it once the server answered
    the event stream's ``GET`` with 200."""

    def __init__(self, http: httpx.AsyncClient, url: str, headers: Sequence[tuple[str, str]],
                 response: httpx.Response) -> None:
        super().__init__(http, url, headers, SERVER_SENT_EVENTS)
        self._response = response
        self._chunks: AsyncIterator[bytes] = response.aiter_bytes()
        #: Whether a ``receive`` is inside the chunks' generator (only then may it not be
        #: closed from outside: an exception ends it instead).
        self._reading = False
        self._buffer = bytearray()
        self._data: list[bytes] = []
        self._events: deque[bytes] = deque()

    @classmethod
    async def open(cls, url: str, headers: Sequence[tuple[str, str]], *, timeout: float,
                   ssl_context: ssl.SSLContext | None) -> ServerSentEventsTransport:
        # No read timeout: the stream is quiet between messages; the server timeout (pings)
        # watches it instead.
        http = _client(httpx.Timeout(timeout, read=None), ssl_context)
        try:
            request = http.build_request("GET", url, headers=[
                *headers, ("Accept", "text/event-stream"), ("Cache-Control", "no-cache")])
            try:
                response = await http.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise TransportError(f"ServerSentEvents failed to connect to {url}: {exc!r}"
                                     ) from exc
            if response.status_code != 200:
                body = (await response.aread())[:200].decode("utf-8", "replace")
                await response.aclose()
                raise TransportError(
                    f"ServerSentEvents failed to connect to {url}: HTTP "
                    f"{response.status_code}: {body}", status=response.status_code)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await http.aclose()
            raise
        return cls(http, url, headers, response)

    def _parse(self) -> None:
        """Complete lines of the buffer into events (the EventSource rules this transport
        needs: ``data`` fields joined by newlines, comments and other fields ignored)."""
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[:end]).removesuffix(b"\r")
            del self._buffer[:end + 1]
            if not line:
                if self._data:
                    self._events.append(b"\n".join(self._data))
                    self._data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)

    async def receive(self) -> bytes:
        while not self._events:
            if self._ended is not None:
                raise self._ended
            self._reading = True
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                raise self._end(TransportError(
                    "The server ended the event stream (ServerSentEvents).")) from None
            except (httpx.HTTPError, anyio.ClosedResourceError, anyio.BrokenResourceError
                    ) as exc:
                raise self._end(TransportError(
                    f"ServerSentEvents: the event stream failed: {exc!r}")) from exc
            finally:
                self._reading = False
            self._buffer += chunk
            self._parse()
        return self._events.popleft()

    async def aclose(self) -> None:
        self._end(TransportError("ServerSentEvents: the connection was closed by the client."))
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await self._response.aclose()
            if not self._reading:
                # The chunks are httpx's generators nested in one another, suspended between
                # two chunks: closing the outer one would leave the inner ones to be collected
                # unfinished. Reading the closed stream ends them all, by its error.
                try:
                    while True:
                        await self._chunks.__anext__()
                except Exception:
                    pass
        await self._close_client()
