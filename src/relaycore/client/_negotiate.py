"""Negotiate, as ``@microsoft/signalr`` does it: ``POST {hub url}/negotiate?negotiateVersion=1``,
following redirects, until a document names the connection to open.

One ``negotiate`` call is one connection attempt (a start or one reconnect attempt):

1. POST to the hub URL's path + ``/negotiate``, its query kept, ``negotiateVersion=1`` added,
   with ``Authorization: Bearer`` from the token factory (called once per attempt).
2. A document with ``url`` is a redirect (Azure SignalR's answer, and an app server's through
   relaycore's SDK): negotiate again at ``url``; its ``accessToken``, when present, replaces
   the factory for the rest of the attempt. At most ``MAX_REDIRECTS`` documents are read.
3. The final document gives the connection token (``connectionToken`` from version 1, the
   connection id before), and the transports the server offers, in its order of preference.

Failures raise ``NegotiateError`` in the JS client's words where it has them.
"""

from __future__ import annotations

import inspect
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import httpx

from ._errors import NegotiateError

__all__ = [
    "MAX_REDIRECTS",
    "AccessTokenFactory",
    "Negotiation",
    "connect_url",
    "negotiate",
    "negotiate_url",
    "resolve_token",
]

#: The JS client reads at most 100 negotiate documents in one start (``HttpConnection.ts``).
MAX_REDIRECTS: Final = 100

#: Returns the bearer token for the next request (``None``: none); may be ``async``.
AccessTokenFactory: TypeAlias = Callable[[], "str | None | Awaitable[str | None]"]

_ASPNET_SIGNALR: Final = (
    "Detected a connection attempt to an ASP.NET SignalR Server. This client only supports "
    "connecting to an ASP.NET Core SignalR Server. See https://aka.ms/signalr-core-differences "
    "for details."
)


@dataclass(frozen=True, slots=True)
class Negotiation:
    """The outcome of one negotiate: where to connect and with what."""

    #: The hub URL after every redirect (the relay's, after an app server's redirect).
    url: str
    #: The public id of the new connection (``None`` when the server gave none).
    connection_id: str | None
    #: The secret ``id=`` of the connect URL (the connection id in negotiate version 0).
    connection_token: str | None
    #: The bearer token for the connection: the last redirect's, else the factory's.
    access_token: str | None
    #: ``(transport, transfer formats)`` in the server's order.
    transports: tuple[tuple[str, tuple[str, ...]], ...]
    #: The server agreed to stateful reconnect (only ever when the client asked).
    stateful_reconnect: bool = False

    def offers(self, transport: str, transfer_format: str) -> bool:
        """Whether the server offers ``transport`` with ``transfer_format``."""
        return any(name == transport and transfer_format in formats
                   for name, formats in self.transports)


async def resolve_token(factory: AccessTokenFactory | None) -> str | None:
    """Call the token factory (sync or async); ``None`` without one."""
    if factory is None:
        return None
    token = factory()
    if inspect.isawaitable(token):
        token = await token
    if token is not None and not isinstance(token, str):
        raise TypeError(f"access_token_factory returned {type(token).__name__}; expected a "
                        "str (the bearer token) or None")
    return token


def negotiate_url(url: str, stateful_reconnect: bool = False) -> str:
    """The negotiate URL of a hub URL: ``/negotiate`` appended to the path (``negotiate``
    after a ``/``), the query kept and ``negotiateVersion=1`` added unless it is there, and
    ``useStatefulReconnect=true`` when asking for stateful reconnect.

    >>> negotiate_url("https://relay/client/?hub=chat")
    'https://relay/client/negotiate?hub=chat&negotiateVersion=1'
    >>> negotiate_url("http://app:8000/hubs/chat", stateful_reconnect=True)
    'http://app:8000/hubs/chat/negotiate?negotiateVersion=1&useStatefulReconnect=true'
    """
    parts = urlsplit(url)
    path = parts.path + ("negotiate" if parts.path.endswith("/") else "/negotiate")
    keys = {key for key, _ in parse_qsl(parts.query, keep_blank_values=True)}
    added = [] if "negotiateVersion" in keys else ["negotiateVersion=1"]
    if stateful_reconnect and "useStatefulReconnect" not in keys:
        added.append("useStatefulReconnect=true")
    query = "&".join([parts.query, *added] if parts.query else added)
    return urlunsplit((parts.scheme, parts.netloc, path, query, ""))


def connect_url(url: str, connection_token: str | None, *, websocket: bool = True) -> str:
    """The URL of the connection: ``id=<token>`` appended as is (servers issue URL-safe
    tokens; the JS client does not encode them either); for a WebSocket ``http`` becomes
    ``ws`` (``https``: ``wss``).

    >>> connect_url("http://relay/client/?hub=chat", "abc")
    'ws://relay/client/?hub=chat&id=abc'
    >>> connect_url("https://relay/client/?hub=chat", "abc", websocket=False)
    'https://relay/client/?hub=chat&id=abc'
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if websocket:
        scheme = {"http": "ws", "https": "wss"}.get(scheme, scheme)
    elif scheme in ("ws", "wss"):
        scheme = {"ws": "http", "wss": "https"}[scheme]
    query = parts.query
    if connection_token is not None:
        query = f"{query}&id={connection_token}" if query else f"id={connection_token}"
    return urlunsplit((scheme, parts.netloc, parts.path or "/", query, ""))


async def negotiate(
    url: str,
    *,
    access_token_factory: AccessTokenFactory | None,
    headers: Sequence[tuple[str, str]],
    timeout: float,
    ssl_context: ssl.SSLContext | None,
    stateful_reconnect: bool = False,
) -> Negotiation:
    """Negotiate a new connection with the hub at ``url``, following redirects; ask for
    stateful reconnect with ``stateful_reconnect``."""
    token = await resolve_token(access_token_factory)
    async with httpx.AsyncClient(
        timeout=timeout, verify=ssl_context if ssl_context is not None else True
    ) as http:
        for _ in range(MAX_REDIRECTS):
            document = await _post(http, negotiate_url(url, stateful_reconnect), token,
                                   headers)
            redirect = document.get("url")
            if redirect is None:
                return _negotiation(url, token, document, stateful_reconnect)
            if not isinstance(redirect, str) or not redirect:
                raise NegotiateError(f"The negotiate redirect's 'url' must be a non-empty "
                                     f"string, got {redirect!r}.", url=negotiate_url(url))
            access_token = document.get("accessToken")
            if access_token is not None:
                if not isinstance(access_token, str):
                    raise NegotiateError(
                        "The negotiate redirect's 'accessToken' must be a string, got "
                        f"{type(access_token).__name__}.", url=negotiate_url(url))
                token = access_token
            url = redirect
    raise NegotiateError("Negotiate redirection limit exceeded.", url=negotiate_url(url))


async def _post(
    http: httpx.AsyncClient, url: str, token: str | None, headers: Sequence[tuple[str, str]]
) -> dict[str, Any]:
    request_headers = [("X-Requested-With", "XMLHttpRequest"), *headers]
    if token:
        request_headers.append(("Authorization", f"Bearer {token}"))
    try:
        response = await http.post(url, headers=request_headers)
    except httpx.HTTPError as exc:
        raise NegotiateError(f"Failed to complete negotiation with the server: {exc!r}",
                             url=url) from exc
    if response.status_code != 200:
        body = response.text[:2048]
        hint = " (is the URL the hub's URL?)" if response.status_code == 404 else ""
        reason = (response.reason_phrase
                  or httpx.codes.get_reason_phrase(response.status_code) or "error")
        raise NegotiateError(
            f"Failed to complete negotiation with the server: {response.status_code} "
            f"{reason}{hint} at {url}" + (f": {body.strip()}" if body.strip() else ""),
            url=url, status=response.status_code, body=body,
        )
    try:
        document = response.json()
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise NegotiateError(
            f"The negotiate answer from {url} is not a JSON object: {response.text[:200]!r}",
            url=url, body=response.text[:2048],
        )
    error = document.get("error")
    if error is not None:
        raise NegotiateError(str(error), url=url)
    if "ProtocolVersion" in document:
        raise NegotiateError(_ASPNET_SIGNALR, url=url)
    return document


def _negotiation(url: str, token: str | None, document: Mapping[str, Any],
                 asked_stateful: bool) -> Negotiation:
    version = document.get("negotiateVersion")
    connection_id = document.get("connectionId")
    connection_token = document.get("connectionToken")
    # Version 1 names a secret token; version 0 (or none) uses the public id as the token.
    if not isinstance(version, int) or version < 1:
        connection_token = connection_id
    for name, value in (("connectionId", connection_id), ("connectionToken", connection_token)):
        if value is not None and not isinstance(value, str):
            raise NegotiateError(f"The negotiate answer's '{name}' must be a string, got "
                                 f"{type(value).__name__}.", url=negotiate_url(url))
    stateful = document.get("useStatefulReconnect") is True
    if stateful and not asked_stateful:
        raise NegotiateError("Client didn't negotiate Stateful Reconnect but the server did.",
                             url=negotiate_url(url))
    transports: list[tuple[str, tuple[str, ...]]] = []
    for entry in document.get("availableTransports") or ():
        if isinstance(entry, dict) and isinstance(entry.get("transport"), str):
            formats = entry.get("transferFormats") or ()
            transports.append((entry["transport"],
                               tuple(f for f in formats if isinstance(f, str))))
    return Negotiation(url, connection_id, connection_token, token, tuple(transports), stateful)
