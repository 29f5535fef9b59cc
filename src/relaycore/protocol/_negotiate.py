"""Negotiate documents: the JSON bodies of ``POST .../negotiate`` answers, sans-I/O.

The caller serialises the returned dicts and answers with HTTP 200 and ``application/json``,
errors included: the client reads ``error`` from a 200 body and fails its ``start()`` with it
(``client-protocol.md`` §1.2). Version handling follows the .NET server
(``HttpConnectionDispatcher.ProcessNegotiate``): no ``negotiateVersion`` in the query means
version 0, a version above the highest supported one is answered with the highest, and anything
that is not a non-negative integer is an error.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from ._errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "MAX_NEGOTIATE_VERSION",
    "TRANSPORTS_ALL",
    "TRANSPORTS_WEBSOCKETS_ONLY",
    "TRANSPORT_NAMES",
    "available_transports",
    "transport_names",
    "negotiate_error",
    "negotiate_redirect",
    "negotiate_response",
    "parse_negotiate_version",
]

#: The highest negotiate protocol version there is: 1 adds ``connectionToken`` (§1.2).
MAX_NEGOTIATE_VERSION: Final = 1

#: The relay's transport list: WebSockets only, both transfer formats.
TRANSPORTS_WEBSOCKETS_ONLY: Final[list[dict[str, Any]]] = [
    {"transport": "WebSockets", "transferFormats": ["Text", "Binary"]},
]

#: What a full .NET server lists, in its order (the client tries them in this order, §1.2).
TRANSPORTS_ALL: Final[list[dict[str, Any]]] = [
    {"transport": "WebSockets", "transferFormats": ["Text", "Binary"]},
    {"transport": "ServerSentEvents", "transferFormats": ["Text"]},
    {"transport": "LongPolling", "transferFormats": ["Text", "Binary"]},
]

#: The transports' names as negotiate spells them, in the order a .NET server lists them.
TRANSPORT_NAMES: Final = tuple(t["transport"] for t in TRANSPORTS_ALL)

#: The characters .NET's ``int.TryParse`` skips around a number (NumberStyles.Integer).
_DOTNET_WHITESPACE: Final = " \t\n\v\f\r"
_INT32_MIN: Final = -(2**31)
_INT32_MAX: Final = 2**31 - 1


def _copy_transports(transports: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    # A fresh copy each time, so that no caller can change the module's constants through a
    # document it was handed.
    return [
        {"transport": t["transport"], "transferFormats": list(t["transferFormats"])}
        for t in transports
    ]


def transport_names(names: Iterable[str]) -> list[str]:
    """``names`` as negotiate spells them (any case in, ``WebSockets`` out), each once, in
    the .NET server's order; raises ``ValueError`` naming an unknown one.

    >>> transport_names(["longpolling", "WebSockets"])
    ['WebSockets', 'LongPolling']
    """
    by_lower = {name.lower(): name for name in TRANSPORT_NAMES}
    wanted = set()
    for name in names:
        known = by_lower.get(name.strip().lower())
        if known is None:
            raise ValueError(f"unknown transport {name!r}: one of {', '.join(TRANSPORT_NAMES)}")
        wanted.add(known)
    return [name for name in TRANSPORT_NAMES if name in wanted]


def available_transports(names: Iterable[str]) -> list[dict[str, Any]]:
    """The ``availableTransports`` entries of the transports ``names`` (``transport_names``),
    each with its transfer formats, in the .NET server's order: the client tries them in the
    order listed (§1.3), so WebSockets stays first whatever order a setting names them in.

    >>> [t["transport"] for t in available_transports(["LongPolling", "ServerSentEvents"])]
    ['ServerSentEvents', 'LongPolling']
    """
    wanted = set(transport_names(names))
    return _copy_transports(t for t in TRANSPORTS_ALL if t["transport"] in wanted)


def negotiate_response(
    connection_id: str,
    connection_token: str | None,
    negotiate_version: int,
    *,
    transports: Iterable[Mapping[str, Any]] | None = None,
    use_stateful_reconnect: bool = False,
) -> dict[str, Any]:
    """The negotiate answer for a new connection, in the .NET server's key order.

    ``negotiate_version`` is the one ``parse_negotiate_version`` gave. Version 0 answers
    ``negotiateVersion: 0`` and no ``connectionToken`` (the client then uses the connection id
    as its ``id=``); version 1 adds ``connectionToken``, which is then required. Set
    ``use_stateful_reconnect`` only when the client asked for it (``useStatefulReconnect=true``
    in the query): the client refuses a server that enables it unasked. ``transports`` defaults
    to ``TRANSPORTS_WEBSOCKETS_ONLY``.

    >>> negotiate_response("c1", "t1", 1)
    {'negotiateVersion': 1, 'connectionId': 'c1', 'connectionToken': 't1', \
'availableTransports': [{'transport': 'WebSockets', 'transferFormats': ['Text', 'Binary']}]}
    """
    if negotiate_version < 0:
        raise LocalProtocolError(
            f"negotiate version must be 0 or more, got {negotiate_version}; "
            "use parse_negotiate_version on the query value"
        )
    version = min(negotiate_version, MAX_NEGOTIATE_VERSION)
    doc: dict[str, Any] = {"negotiateVersion": version, "connectionId": connection_id}
    if version >= 1:
        if not connection_token:
            raise LocalProtocolError(
                "negotiate version 1 needs a connection token: the client sends it as id=..."
            )
        doc["connectionToken"] = connection_token
    if use_stateful_reconnect:
        doc["useStatefulReconnect"] = True
    doc["availableTransports"] = _copy_transports(
        TRANSPORTS_WEBSOCKETS_ONLY if transports is None else transports
    )
    return doc


def negotiate_redirect(url: str, access_token: str | None) -> dict[str, Any]:
    """An Azure-style redirect: the client negotiates again at ``url`` (§1.4).

    With ``access_token`` the client sends it as its bearer token from then on; without one
    the key is left out and the client keeps using its own token factory.

    >>> negotiate_redirect("https://relay/client/?hub=chat", "jwt")
    {'url': 'https://relay/client/?hub=chat', 'accessToken': 'jwt'}
    """
    doc: dict[str, Any] = {"url": url}
    if access_token is not None:
        doc["accessToken"] = access_token
    return doc


def negotiate_error(message: str) -> dict[str, Any]:
    """A negotiate failure: sent with status 200, the client fails ``start()`` with ``message``.

    >>> negotiate_error("Unauthorized")
    {'error': 'Unauthorized'}
    """
    return {"error": message}


def parse_negotiate_version(query_value: str | None) -> int:
    """The negotiate version to answer with, from the ``negotiateVersion`` query value.

    ``None`` (no such parameter) means 0; a value above ``MAX_NEGOTIATE_VERSION`` is lowered to
    it. A value that is not an integer, or is negative, raises ``RemoteProtocolError`` with the
    .NET server's text, for the caller to send as ``negotiate_error(str(exc))`` with status 200.

    >>> parse_negotiate_version(None), parse_negotiate_version("1"), parse_negotiate_version("7")
    (0, 1, 1)
    """
    if query_value is None:
        return 0
    text = query_value.strip(_DOTNET_WHITESPACE)
    digits = text[1:] if text.startswith(("+", "-")) else text
    # str.isdigit alone would let through other scripts' digits, int() alone "1_0"; the length
    # check keeps int() away from its digit limit.
    valid = digits.isascii() and digits.isdigit() and len(digits) <= 10
    version = int(text) if valid else 0
    if not valid or not _INT32_MIN <= version <= _INT32_MAX:
        raise RemoteProtocolError(
            f"The client requested an invalid protocol version '{query_value}'"
        )
    if version < 0:
        raise RemoteProtocolError(
            f"The client requested version '{version}', but the server does not support this "
            "version."
        )
    return min(version, MAX_NEGOTIATE_VERSION)
