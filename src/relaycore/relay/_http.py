"""The relay's HTTP/1.1 front on h11: read a request with its limits, write a response.

One ``HttpConnection`` per accepted TCP stream. Requests are read whole (bodies are small: the
REST API caps them at ``max_request_body``); a WebSocket upgrade hands the stream and any bytes
h11 read past the request to the WebSocket driver.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from urllib.parse import parse_qsl, unquote, unquote_plus, urlsplit

import h11
import orjson
import trio

_READ_SIZE = 65536


class HttpError(Exception):
    """An error answered with ``status`` and a JSON body ``{"code", "message"}``."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or _default_code(status)
        self.headers = list(headers)


def _default_code(status: int) -> str:
    return {
        400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
        405: "MethodNotAllowed", 408: "RequestTimeout", 409: "Conflict",
        413: "PayloadTooLarge", 415: "UnsupportedMediaType", 426: "UpgradeRequired",
        429: "TooManyRequests", 500: "InternalServerError", 503: "ServiceUnavailable",
    }.get(status, "Error")


@dataclasses.dataclass
class Request:
    method: str
    target: str
    path: str
    raw_query: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes = b""
    #: The client's IP address (the TCP peer), when the stream is a socket.
    peer: str | None = None

    def arg(self, name: str, default: str | None = None) -> str | None:
        """The first value of query parameter ``name`` (compared case-insensitively)."""
        lname = name.lower()
        for key, value in self.query:
            if key.lower() == lname:
                return value
        return default

    def args(self, name: str) -> list[str]:
        lname = name.lower()
        return [value for key, value in self.query if key.lower() == lname]

    @property
    def is_websocket_upgrade(self) -> bool:
        return (
            self.method == "GET"
            and self.headers.get("upgrade", "").lower() == "websocket"
            and "upgrade" in self.headers.get("connection", "").lower()
        )


@dataclasses.dataclass
class Response:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    content_type: str | None = None

    @classmethod
    def json(cls, status: int, obj: object, headers: Sequence[tuple[str, str]] = ()) -> Response:
        return cls(status, orjson.dumps(obj), list(headers), "application/json; charset=utf-8")

    @classmethod
    def error(cls, err: HttpError) -> Response:
        return cls.json(err.status, {"code": err.code, "message": err.message}, err.headers)


def parse_target(target: str) -> tuple[str, str, list[tuple[str, str]]]:
    parts = urlsplit(target)
    return unquote(parts.path), parts.query, parse_qsl(parts.query, keep_blank_values=True)


def query_without(raw_query: str, names: Collection[str]) -> str:
    """``raw_query`` as it arrived on the wire (still percent-encoded, its order, spelling and
    empty parameters kept) without the parameters whose decoded name, lower-cased, is in
    ``names``.

    >>> query_without("hub=chat&room=blue%26green&Access_Token=t", {"access_token"})
    'hub=chat&room=blue%26green'
    """
    parts = raw_query.split("&")
    kept = [part for part in parts
            if unquote_plus(part.split("=", 1)[0]).lower() not in names]
    return raw_query if len(kept) == len(parts) else "&".join(kept)


def peer_address(stream: object) -> str | None:
    """The IP address at the other end of ``stream``, or ``None`` when it is not a connected
    socket (an in-memory stream in tests)."""
    sock = getattr(stream, "socket", None)
    try:
        address = sock.getpeername() if sock is not None else None
    except OSError:
        return None
    if isinstance(address, tuple) and address and isinstance(address[0], str):
        return address[0]
    return None


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer ...`` header, if there is one."""
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return None


class HttpConnection:
    """h11 over one trio stream: ``read_request()`` / ``send_response()`` in a loop."""

    def __init__(self, stream: trio.abc.Stream, *, max_head: int, max_body: int) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head)
        self.max_body = max_body
        self.peer = peer_address(stream)
        self._method = ""
        #: Whether bytes of the request being read have arrived (a slow sender, when it
        #: times out; an idle keep-alive connection otherwise).
        self.received = False

    async def _next_event(self) -> object:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = await self.stream.receive_some(_READ_SIZE)
                self.received = self.received or bool(data)
                self.conn.receive_data(data)
                continue
            return event

    async def read_request(self) -> Request | None:
        """The next request with its body, or ``None`` when the client closed the connection.

        Raises ``HttpError`` (400, 413) for a malformed or oversized request.
        """
        # The method decides whether a response carries a body: forget the previous
        # request's, so that an error answer to a request that never parsed has its body
        # (a HEAD before it once left the answer's body off under its Content-Length).
        self._method = ""
        self.received = False
        try:
            event = await self._next_event()
        except h11.RemoteProtocolError as exc:
            status = 431 if "too long" in str(exc).lower() else 400
            raise HttpError(exc.error_status_hint or status,
                            f"malformed HTTP request: {exc}") from None
        if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None
        if not isinstance(event, h11.Request):
            raise HttpError(400, "expected an HTTP request")
        # Known from here on, so that even an error answer to this request is framed for it
        # (no body after a HEAD).
        self._method = event.method.decode("ascii")
        target = event.target.decode("latin-1")
        try:
            path, raw_query, query = parse_target(target)
        except ValueError as exc:
            raise HttpError(400, f"malformed request target {target[:100]!r}: {exc}") from None
        headers: dict[str, str] = {}
        for name, value in event.headers:
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        request = Request(self._method, target, path, raw_query, query, headers, peer=self.peer)
        if request.is_websocket_upgrade:
            return request
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise HttpError(413, f"request body of {length} bytes exceeds the limit of "
                            f"{self.max_body} bytes")
        chunks = []
        size = 0
        while True:
            try:
                event = await self._next_event()
            except h11.RemoteProtocolError as exc:
                raise HttpError(400, f"malformed HTTP request body: {exc}") from None
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > self.max_body:
                    raise HttpError(413, f"request body exceeds the limit of {self.max_body} bytes")
                chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                return None
        request.body = b"".join(chunks)
        return request

    async def send_response(self, response: Response, *, close: bool = False) -> None:
        headers = [(k, v) for k, v in response.headers]
        if response.content_type:
            headers.append(("Content-Type", response.content_type))
        if response.status not in (204, 304) and not (100 <= response.status < 200):
            headers.append(("Content-Length", str(len(response.body))))
        if close:
            headers.append(("Connection", "close"))
        data = self.conn.send(h11.Response(status_code=response.status, headers=headers))
        if response.body and self._method != "HEAD":
            data += self.conn.send(h11.Data(data=response.body))
        data += self.conn.send(h11.EndOfMessage())
        await self.stream.send_all(data)

    async def send_switching_protocols(self, headers: Mapping[str, str]) -> bytes:
        """Answer 101 and return the bytes h11 had read past the upgrade request."""
        data = self.conn.send(h11.InformationalResponse(
            status_code=101, headers=list(headers.items())))
        await self.stream.send_all(data)
        trailing, _closed = self.conn.trailing_data
        return bytes(trailing)

    async def linger(self, *, max_bytes: int, timeout: float = 2.0) -> None:
        """After an error answer that closes the connection: stop sending, then read and
        drop what the client is still sending (a refused body), up to ``max_bytes`` and
        ``timeout``, so that closing does not reset the connection before the client has
        read the answer."""
        with trio.move_on_after(timeout):
            try:
                await self.stream.send_eof()  # type: ignore[attr-defined]
                received = 0
                while received < max_bytes:
                    data = await self.stream.receive_some(_READ_SIZE)
                    if not data:
                        return
                    received += len(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return

    def can_continue(self) -> bool:
        """True when the connection may carry another request (HTTP keep-alive)."""
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
            return True
        return False
