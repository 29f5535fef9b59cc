"""The negotiate endpoint as a plain ASGI app (no framework inside the SDK).

``POST {mount}/{hub}/negotiate`` answers the SignalR client with a redirect to the relay
(service-protocol §10): ``{"url": ..., "accessToken": ...}``. The client then negotiates again
at that URL with that token and connects to the relay, not to this app server.

Browsers call it cross-origin when the page is served elsewhere, and ``@microsoft/signalr``
sends credentials by default, so CORS answers echo the allowed ``Origin`` with
``Access-Control-Allow-Credentials: true`` (``*`` is refused with credentials).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import Any, Final, Protocol, TypeAlias
from urllib.parse import parse_qsl, urlencode

import orjson

from ._errors import NOT_CONNECTED_MESSAGE, NegotiateError, ServiceUnavailableError

__all__ = [
    "NegotiateApp",
    "Negotiator",
    "UserIdProvider",
    "default_user_id_provider",
    "serve_lifespan",
]

_log = logging.getLogger("relaycore.sdk")

Scope: TypeAlias = MutableMapping[str, Any]
Message: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]

#: Takes the ASGI scope of the negotiate request, returns the user id (or ``None``:
#: anonymous); may be ``async``.
UserIdProvider: TypeAlias = Callable[[Scope], "str | None | Awaitable[str | None]"]

_ALLOWED_HEADERS: Final = (
    "authorization, content-type, x-requested-with, x-signalr-user-agent, x-user-id"
)


class Negotiator(Protocol):
    """What a ``NegotiateApp`` asks of its ``HubServer``."""

    @property
    def hubs(self) -> list[str]: ...

    async def negotiate(
        self,
        hub: str,
        *,
        user_id: str | None,
        path: str | None,
        query: str | None,
        headers: Mapping[str, str] | None,
        scope: Mapping[str, Any] | None,
    ) -> dict[str, Any]: ...

    def refusal(self, hub: str) -> str | None: ...


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def default_user_id_provider(scope: Scope) -> str | None:
    """**Demo default, not authentication**: the ``user`` query parameter, else the
    ``X-User-Id`` header. Anyone can claim any user this way; in production pass a provider
    that reads your session or a verified token (``HubServer.asgi(user_id_provider=...)``)."""
    query = bytes(scope.get("query_string", b"")).decode("latin-1")
    for key, value in parse_qsl(query):
        if key == "user" and value:
            return value
    return _header(scope, b"x-user-id") or None


class NegotiateApp:
    """ASGI app: ``POST /{hub}/negotiate`` for every hub of a ``HubServer``.

    Mount it anywhere (``app.mount("/hubs", server.asgi())`` in FastAPI or Starlette, or run
    it alone under an ASGI server); the client URL is then ``{mount}/{hub}``. Answers:

    * 200 ``{"url", "accessToken"}``: the redirect, with ``asrs.op`` = the hub path and the
      request's query (except ``negotiateVersion``) appended to the relay URL;
    * 404 for an unknown hub or path, 405 for a method other than POST or OPTIONS;
    * 503 ``{"error": "Azure SignalR Service is not connected yet, please try again later."}``
      when no endpoint is online (the .NET SDK answers 500; 503 says "try again later"), or,
      when the relay refuses this app server's connections, a 503 that says so and why:
      ``{"error": "the relay at http://relay:8080 refuses this app server's connections:
      HTTP 401 Unauthorized.bad_signature: ...; check the access key (AccessKey in the
      connection string)"}``;
    * a ``NegotiateError``'s status (e.g. 400) with ``{"error": message}`` when the endpoint
      router or the user id provider refused the request;
    * CORS preflights (``OPTIONS``) for origins in ``cors_origins`` (``"*"``: any origin).

    It does not run the ``HubServer``: enter ``async with server`` in the application's
    lifespan. A ``lifespan`` scope is acknowledged so the app also runs alone.
    """

    def __init__(
        self,
        server: Negotiator,
        *,
        user_id_provider: UserIdProvider | None = None,
        cors_origins: Iterable[str] = ("*",),
    ) -> None:
        self.server = server
        self.user_id_provider: UserIdProvider = user_id_provider or default_user_id_provider
        self.cors_origins = frozenset(cors_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await serve_lifespan(receive, send)
            return
        if kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        if kind != "http":
            return
        await self._http(scope, receive, send)

    def _cors_headers(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        origin = _header(scope, b"origin")
        if origin is None or not ("*" in self.cors_origins or origin in self.cors_origins):
            return []
        return [
            (b"access-control-allow-origin", origin.encode("latin-1")),
            (b"access-control-allow-credentials", b"true"),
            (b"vary", b"Origin"),
        ]

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _drain(receive)
        path: str = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        parts = [p for p in path.split("/") if p]
        cors = self._cors_headers(scope)
        if (
            len(parts) != 2
            or parts[1] != "negotiate"
            or parts[0].lower() not in {h.lower() for h in self.server.hubs}
        ):
            await _json(send, 404, {"error": f"Not found: {scope.get('path', '')}"}, cors)
            return
        method = scope.get("method", "GET")
        if method == "OPTIONS":
            requested = _header(scope, b"access-control-request-headers")
            headers = [
                *cors,
                (b"access-control-allow-methods", b"POST, OPTIONS"),
                (b"access-control-allow-headers", (requested or _ALLOWED_HEADERS).encode()),
                (b"access-control-max-age", b"600"),
                (b"content-length", b"0"),
            ]
            await send({"type": "http.response.start", "status": 204, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        if method != "POST":
            await _json(
                send, 405, {"error": "Use POST for negotiate."}, [*cors, (b"allow", b"POST")]
            )
            return
        hub = parts[0]
        query = bytes(scope.get("query_string", b"")).decode("latin-1")
        kept = [
            (k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != "negotiateVersion"
        ]
        hub_path = (root or "") + "/" + hub
        request_headers = {
            bytes(k).decode("latin-1").lower(): bytes(v).decode("latin-1")
            for k, v in scope.get("headers", ())
        }
        try:
            user = self.user_id_provider(scope)
            if inspect.isawaitable(user):
                user = await user
            document = await self.server.negotiate(
                hub,
                user_id=user,
                path=hub_path,
                query=urlencode(kept) if kept else None,
                headers=request_headers,
                scope=scope,
            )
        except NegotiateError as exc:
            await _json(send, exc.status_code, {"error": exc.message}, cors)
            return
        except ServiceUnavailableError as exc:
            refusal = self.server.refusal(hub)
            if refusal is None:
                _log.warning("negotiate for hub %s refused: %s", hub, exc)
            else:  # the server connections' own log says it, once, not per request
                _log.debug("negotiate for hub %s refused: %s", hub, refusal)
            await _json(send, 503, {"error": refusal or NOT_CONNECTED_MESSAGE}, cors)
            return
        await _json(send, 200, document, cors)


async def _drain(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


async def _json(
    send: Send, status: int, body: Mapping[str, Any], headers: list[tuple[bytes, bytes]]
) -> None:
    data = orjson.dumps(body)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                (b"cache-control", b"no-store"),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


async def serve_lifespan(receive: Receive, send: Send) -> None:
    """Acknowledge an ASGI ``lifespan`` scope's startup and shutdown (the SDK's apps have
    nothing to start), so that they also run alone under an ASGI server."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
