"""What can go wrong for a hub client, one class per kind of fault.

Two families, as the JS client has them: ``HubConnectionError`` (the connection could not be
started, was lost, or was asked something its state does not allow) and ``HubException`` (the
connection is fine; the server answered an invocation or a stream with an error). A
``HubConnectionError`` is a ``ConnectionError``, so code that already catches those catches it.
"""

from __future__ import annotations

__all__ = [
    "HandshakeError",
    "HubConnectionError",
    "HubException",
    "NegotiateError",
    "ServerClosedError",
    "ServerTimeoutError",
    "TransportError",
]


class HubConnectionError(ConnectionError):
    """The hub connection failed, ended, or cannot do what was asked in its current state.

    The subclasses say which step failed; a plain ``HubConnectionError`` is a wrong state
    ("Cannot send data if the connection is not in the 'Connected' State.") or a call cut off
    by the end of its connection (its ``__cause__`` says why the connection ended).
    """


class NegotiateError(HubConnectionError):
    """``POST .../negotiate`` failed: an HTTP error, a body that is not a negotiate document,
    an ``error`` in the document, no transport in common, or too many redirects.

    ``url`` is the negotiate URL asked; ``status`` the HTTP status when the answer was not 200
    (``None`` otherwise); ``body`` the start of the body of such an answer.
    """

    def __init__(
        self, message: str, *, url: str = "", status: int | None = None, body: str = ""
    ) -> None:
        super().__init__(message)
        self.url = url
        self.status = status
        self.body = body


class TransportError(HubConnectionError):
    """The WebSocket could not be opened, or it ended.

    ``status`` is the HTTP status of a refused upgrade (404: the connection token expired or
    was already used); ``code`` and ``reason`` are those of the WebSocket close (1006: the TCP
    connection ended without a close handshake). Each is ``None`` when it does not apply.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: int | None = None,
        reason: str = "",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.reason = reason


class HandshakeError(HubConnectionError):
    """The hub handshake failed: the server refused the protocol (its error text is
    ``error``), answered something that is not a handshake response, or did not answer in
    time."""

    def __init__(self, message: str, *, error: str | None = None) -> None:
        super().__init__(message)
        self.error = error


class ServerTimeoutError(HubConnectionError):
    """Nothing arrived from the server for ``server_timeout`` seconds (the server pings every
    15 s by default, so silence means the connection is gone)."""


class ServerClosedError(HubConnectionError):
    """The server closed the connection with a Close message that carried an error.

    ``error`` is the server's text (a relay's close reason, say); ``allow_reconnect`` whether
    the server invited the client back (automatic reconnect then runs, when configured).
    """

    def __init__(self, error: str, *, allow_reconnect: bool = False) -> None:
        super().__init__(f"Server returned an error on close: {error}")
        self.error = error
        self.allow_reconnect = allow_reconnect


class HubException(Exception):
    """The server answered an invocation or a stream with an error; ``error`` is its text,
    e.g. "Unknown hub method 'nope'" or "An unexpected error occurred invoking 'add' on the
    server. HubException: no"."""

    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error
