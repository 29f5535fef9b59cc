"""The receiving side of upstream webhooks (serverless mode, service-protocol §13).

A serverless app has no server connection: the relay POSTs each client event to it. This module
verifies a request's ``X-ASRS-Signature``, parses it into an ``UpstreamEvent``, builds the
framed completion a client expects, and offers an ASGI app that dispatches events to decorated
async functions::

    from relaycore.sdk.upstream import UpstreamHandler

    handler = UpstreamHandler(access_keys=["<the relay's access key>"])

    @handler.on_connected
    async def connected(event):
        print(event.user_id, "joined", event.hub)

    @handler.on_message("echo")
    async def echo(event, text):
        return text                     # becomes the invocation's result

    app.mount("/upstream", handler)     # FastAPI/Starlette; the relay's upstream URL points here

A handler that raises makes a completion error (its text only for ``HubException``); an
invocation whose target has no handler is answered 404, which the relay turns into a completion
error for the client.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl

import orjson

from .._accel import encode_varint
from ..protocol._errors import RemoteProtocolError
from ..protocol._hub import CompletionMessage, InvocationMessage, get_protocol
from ._asgi import serve_lifespan
from ._errors import HubException

__all__ = [
    "UpstreamError",
    "UpstreamEvent",
    "UpstreamHandler",
    "completion_reply",
    "parse_request",
    "verify_signature",
]

log = logging.getLogger("relaycore.sdk.upstream")

_JSON = "application/json"
_MSGPACK = "application/x-msgpack"


class UpstreamError(Exception):
    """A request that is not a valid upstream call; ``status`` is the HTTP answer to give."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def verify_signature(connection_id: str, signature: str | None,
                     access_keys: Iterable[str]) -> bool:
    """Whether ``signature`` (the ``X-ASRS-Signature`` header: ``sha256=<hex>`` entries,
    comma-separated, one per key of the relay) matches any of ``access_keys`` (§13.3)."""
    if not signature:
        return False
    offered = {part.strip().lower() for part in signature.split(",")}
    message = connection_id.encode("utf-8")
    for key in access_keys:
        digest = hmac.new(key.encode("utf-8"), message, hashlib.sha256).hexdigest()
        expected = f"sha256={digest}"
        if any(hmac.compare_digest(expected, item) for item in offered):
            return True
    return False


@dataclasses.dataclass(frozen=True)
class UpstreamEvent:
    """One upstream call: who (connection, user, claims, query), where (hub), what (category
    ``connections`` with event ``connected``/``disconnected``, or category ``messages`` with the
    invocation)."""

    connection_id: str
    hub: str
    category: str
    event: str
    user_id: str | None = None
    claims: dict[str, str] = dataclasses.field(default_factory=dict)
    query: dict[str, str] = dataclasses.field(default_factory=dict)
    #: The client's hub protocol, for ``messages`` (``json`` or ``messagepack``).
    protocol: str | None = None
    invocation: InvocationMessage | None = None
    #: Why a ``disconnected`` connection ended, when it was not a normal close.
    error: str | None = None
    headers: dict[str, str] = dataclasses.field(default_factory=dict)


def _utf8(value: str | None) -> str | None:
    """A header value the relay sent as UTF-8 bytes, which ASGI servers (and httpx) hand out
    as Latin-1 text: the text the client chose (``José``, not ``JosÃ©``)."""
    if value is None or value.isascii():
        return value
    try:
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value  # not UTF-8 on the wire: keep what arrived


def _parse_claims(header: str | None) -> dict[str, str]:
    claims: dict[str, str] = {}
    for item in (_utf8(header) or "").split(", "):
        name, sep, value = item.partition(": ")
        if sep:
            claims.setdefault(name, value)
    return claims


def parse_request(headers: Mapping[str, str], body: bytes, *,
                  access_keys: Iterable[str] | None = None) -> UpstreamEvent:
    """Parse (and, given ``access_keys``, authenticate) an upstream request.

    ``headers`` are matched case-insensitively. Raises ``UpstreamError``: 401 for a missing or
    wrong signature, 400 for missing headers or a malformed body, 415 for another content type.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    connection_id = lower.get("x-asrs-connection-id")
    hub = lower.get("x-asrs-hub")
    category = lower.get("x-asrs-category")
    event = lower.get("x-asrs-event")
    if not (connection_id and hub and category and event):
        raise UpstreamError(400, "not an upstream request: X-ASRS-Connection-Id, X-ASRS-Hub, "
                                 "X-ASRS-Category and X-ASRS-Event are required")
    if access_keys is not None and not verify_signature(
            connection_id, lower.get("x-asrs-signature"), access_keys):
        raise UpstreamError(401, "the X-ASRS-Signature header is missing or matches no key")
    content_type = lower.get("content-type", "").split(";")[0].strip().lower()
    base = UpstreamEvent(connection_id=connection_id, hub=hub, category=category, event=event,
                         user_id=_utf8(lower.get("x-asrs-user-id")) or None,
                         claims=_parse_claims(lower.get("x-asrs-user-claims")),
                         query=dict(parse_qsl(lower.get("x-asrs-client-query", "").lstrip("?"))),
                         headers=lower)
    if category == "connections":
        error = None
        if event == "disconnected" and body:
            try:
                fields = {k.lower(): v for k, v in orjson.loads(body).items()}
            except (orjson.JSONDecodeError, AttributeError):
                raise UpstreamError(400, "the disconnected event's body is not a JSON "
                                         "object") from None
            error = fields.get("error") or None
        return dataclasses.replace(base, error=error)
    if category != "messages":
        raise UpstreamError(400, f"unknown upstream category {category!r}")
    if content_type == _JSON:
        protocol, framed = "json", body + b"\x1e"
    elif content_type == _MSGPACK:
        protocol, framed = "messagepack", encode_varint(len(body)) + body
    else:
        raise UpstreamError(415, f"an invocation must be {_JSON} or {_MSGPACK}, got "
                                 f"{content_type or 'no Content-Type'}")
    try:
        messages, _ = get_protocol(protocol).parse(framed)
    except RemoteProtocolError as exc:
        raise UpstreamError(400, f"the invocation is malformed: {exc}") from None
    if len(messages) != 1 or not isinstance(messages[0], InvocationMessage):
        raise UpstreamError(400, "the body of a messages event must be one invocation")
    invocation = messages[0]
    if invocation.target.lower() != event.lower():
        raise UpstreamError(400, f"X-ASRS-Event {event!r} does not match the invocation's "
                                 f"target {invocation.target!r}")
    return dataclasses.replace(base, protocol=protocol, invocation=invocation)


def completion_reply(event: UpstreamEvent, result: Any = None, *, error: str | None = None
                     ) -> tuple[bytes, str]:
    """The framed completion for ``event``'s invocation in the client's protocol, and its
    content type: what an upstream answers so that the relay passes it on unchanged."""
    if event.invocation is None or event.invocation.invocation_id is None:
        raise ValueError("only an invocation with an id gets a completion")
    protocol = get_protocol(event.protocol or "json")
    message = (CompletionMessage(invocation_id=event.invocation.invocation_id, error=error)
               if error is not None else
               CompletionMessage(invocation_id=event.invocation.invocation_id, result=result,
                                 has_result=True))
    return protocol.write(message), _MSGPACK if event.protocol == "messagepack" else _JSON


EventHandler = Callable[[UpstreamEvent], Awaitable[None]]
MessageHandler = Callable[..., Awaitable[Any]]


class UpstreamHandler:
    """An ASGI app receiving upstream calls and dispatching them to decorated functions."""

    def __init__(self, access_keys: Iterable[str] | None, *,
                 enable_detailed_errors: bool = False) -> None:
        """``access_keys``: the relay's keys, to check signatures (``None`` skips the check,
        for tests only)."""
        self.access_keys = None if access_keys is None else list(access_keys)
        self.enable_detailed_errors = enable_detailed_errors
        self._connected: list[EventHandler] = []
        self._disconnected: list[EventHandler] = []
        self._messages: dict[str, MessageHandler] = {}

    def on_connected(self, func: EventHandler) -> EventHandler:
        """Decorator: ``async def f(event)`` runs for every connected client."""
        self._connected.append(func)
        return func

    def on_disconnected(self, func: EventHandler) -> EventHandler:
        """Decorator: ``async def f(event)`` runs for every client that left
        (``event.error`` says why when it was not a normal close)."""
        self._disconnected.append(func)
        return func

    def on_message(self, target: str) -> Callable[[MessageHandler], MessageHandler]:
        """Decorator: ``async def f(event, *arguments)`` answers invocations of ``target``
        (case-insensitive); its return value is the result."""
        def register(func: MessageHandler) -> MessageHandler:
            self._messages[target.lower()] = func
            return func
        return register

    async def handle(self, event: UpstreamEvent) -> tuple[int, bytes, str | None]:
        """Dispatch one parsed event; returns (status, body, content type)."""
        if event.category == "connections":
            for func in self._connected if event.event == "connected" else (
                    self._disconnected if event.event == "disconnected" else ()):
                await func(event)
            return 200, b"", None
        assert event.invocation is not None
        answer = self._messages.get(event.invocation.target.lower())
        if answer is None:
            return 404, b"", None
        try:
            result = answer(event, *event.invocation.arguments)
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:  # noqa: BLE001 - every failure becomes a completion error
            log.info("upstream handler of %s failed: %r", event.invocation.target, exc)
            if event.invocation.invocation_id is None:
                return 200, b"", None
            if isinstance(exc, HubException) or self.enable_detailed_errors:
                text = f"An unexpected error occurred invoking '{event.invocation.target}' " \
                       f"on the server. {type(exc).__name__}: {exc}"
            else:
                text = (f"An unexpected error occurred invoking '{event.invocation.target}' "
                        "on the server.")
            body, ctype = completion_reply(event, error=text)
            return 200, body, ctype
        if event.invocation.invocation_id is None:
            return 200, b"", None
        body, ctype = completion_reply(event, result)
        return 200, body, ctype

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["method"] != "POST":
            await _respond(send, 405, orjson.dumps({"message": "upstream calls are POSTs"}),
                           _JSON)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            event = parse_request(headers, body, access_keys=self.access_keys)
        except UpstreamError as exc:
            await _respond(send, exc.status, orjson.dumps({"message": str(exc)}), _JSON)
            return
        status, payload, ctype = await self.handle(event)
        await _respond(send, status, payload, ctype)


async def _respond(send: Any, status: int, body: bytes, content_type: str | None) -> None:
    headers = [(b"content-length", str(len(body)).encode())]
    if content_type:
        headers.append((b"content-type", content_type.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
