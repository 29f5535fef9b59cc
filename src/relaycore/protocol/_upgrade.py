"""The client side of the WebSocket opening handshake over HTTP/1.1 (RFC 6455 §4.1), sans-I/O.

``ClientUpgrade`` writes the upgrade request (``data_to_send``), reads the server's answer from
bytes arriving in any pieces (``receive_data``; ``b""`` is the end of the stream) and says what
it was (``result``): ``UpgradeAccepted`` with the bytes that followed the 101 head (the first
WebSocket frames), or ``UpgradeRefused`` with the status and as much of the refusal's body as
has arrived (``body_complete`` says whether that is all of it, for a driver that waits a little
for the reason). A 101 that is not a WebSocket upgrade, an accept key that does not match, a
malformed answer, or a stream that ends before any answer raise ``RemoteProtocolError``.

Both anyio drivers (the SDK's server connections and ``relaycore.client``) use it; HTTP itself
is h11's. The key is the caller's (16 random bytes, base64): nothing here draws randomness.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import h11

from ._errors import RemoteProtocolError
from ._websocket import accept_key

__all__ = ["ClientUpgrade", "UpgradeAccepted", "UpgradeRefused"]


@dataclass(frozen=True, slots=True)
class UpgradeAccepted:
    """The server switched protocols; ``trailing`` is what it sent after the 101 head."""

    trailing: bytes


@dataclass(frozen=True, slots=True)
class UpgradeRefused:
    """The server answered with an HTTP response instead of 101."""

    status: int


class ClientUpgrade:
    """One WebSocket upgrade request and the reading of its answer (see the module's docs).

    >>> upgrade = ClientUpgrade("relay:8080", "/client/?hub=chat", [], "dGhlIHNhbXBsZSBub25jZQ==")
    >>> upgrade.data_to_send().startswith(b"GET /client/?hub=chat HTTP/1.1\\r\\n")
    True
    >>> upgrade.receive_data(b"HTTP/1.1 101 Switching Protocols\\r\\nUpgrade: websocket\\r\\n"
    ...                      b"Connection: Upgrade\\r\\nSec-WebSocket-Accept: "
    ...                      b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\\r\\n\\r\\n\\x81\\x00")
    >>> upgrade.result
    UpgradeAccepted(trailing=b'\\x81\\x00')
    """

    __slots__ = ("_http", "_key", "_request", "_result", "body", "body_complete", "status")

    def __init__(self, netloc: str, target: str, headers: Sequence[tuple[str, str]], key: str,
                 *, max_head: int = 16384) -> None:
        self._key = key
        self._http = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_head)
        self._request: bytes | None = self._http.send(h11.Request(
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
        ))
        self._result: UpgradeAccepted | UpgradeRefused | None = None
        #: A refusal's body so far, and whether it has all arrived.
        self.body = bytearray()
        self.body_complete = False
        #: The status of the answer's head once it has arrived (101 for a switch that was
        #: refused for a bad accept key, say).
        self.status: int | None = None

    @property
    def result(self) -> UpgradeAccepted | UpgradeRefused | None:
        """``None`` until the answer's head has arrived."""
        return self._result

    def data_to_send(self) -> bytes:
        """The upgrade request, once."""
        request, self._request = self._request or b"", None
        return request

    def receive_data(self, data: bytes) -> None:
        """Feed what the server sent (``b""``: it closed the stream)."""
        if isinstance(self._result, UpgradeAccepted) or self.body_complete:
            return
        self._http.receive_data(data)
        while True:
            try:
                event = self._http.next_event()
            except h11.RemoteProtocolError as exc:
                if self._result is not None:  # a refusal's body cut short: what came is kept
                    self.body_complete = True
                    return
                if not data:
                    raise RemoteProtocolError(
                        "the server closed the connection before answering the upgrade"
                    ) from None
                raise RemoteProtocolError(
                    f"the answer to the upgrade is not HTTP/1.1 ({exc})") from None
            if event is h11.NEED_DATA:
                return
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101:
                    self.status = 101
                    self._result = UpgradeAccepted(self._accepted(event))
                    return
                continue  # another 1xx: the real answer follows
            if isinstance(event, h11.Response):
                self.status = event.status_code
                self._result = UpgradeRefused(event.status_code)
            elif isinstance(event, h11.Data):
                self.body += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                if self._result is None:
                    raise RemoteProtocolError(
                        "the server closed the connection before answering the upgrade")
                self.body_complete = True
                return

    def _accepted(self, event: h11.InformationalResponse) -> bytes:
        answer = {name.decode().lower(): value.decode() for name, value in event.headers}
        if answer.get("upgrade", "").lower() != "websocket":
            raise RemoteProtocolError("the 101 answer has no 'Upgrade: websocket'")
        if answer.get("sec-websocket-accept") != accept_key(self._key):
            raise RemoteProtocolError("Sec-WebSocket-Accept does not match the key sent")
        return bytes(self._http.trailing_data[0])
