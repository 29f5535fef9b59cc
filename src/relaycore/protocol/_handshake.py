"""The handshakes that open a connection, sans-I/O: the hub handshake and the service one.

Theory of operation
-------------------

Two handshakes open the connections relaycore carries, and both ends of each live in this
package so that the relay and the SDK answer with the same words:

* **The SignalR hub handshake** (HubProtocol.md "Overview"): a client's first record says which
  hub protocol it speaks; the hub answers ``{}`` + 0x1E or ``{"error": ...}`` + 0x1E. Whoever
  plays the hub (the relay serving a hub itself, the SDK's hub behind the service) feeds the
  client's bytes to a ``HubHandshake`` with ``receive_data`` and reads ``result``: ``None``
  while more bytes are needed, then ``HandshakeAccepted`` (the protocol, lower-cased, and the
  bytes after the separator, which are hub messages) or ``HandshakeRefused`` (the error text
  the client is answered). ``data_to_send()`` gives that answer. A hub that must stay silent
  (the relay forwarding the request to an app server, the SDK taking over a migrated client)
  simply never asks for it. A ``HandshakeResponseReader`` reads the answer from the other side
  (the relay watching what an app server's hub wrote back).
* **The service handshake** (service-protocol §3.3): an app server's first message is a
  ``ServiceHandshakeRequest``; ``answer_service_handshake`` gives the service's reply and
  ``check_service_handshake_response`` is the app server's check of it.

Refusal texts are ASP.NET Core's where it has one (``HubConnectionContext.HandshakeAsync``):
"Handshake was canceled." for a handshake that took too long or grew past the message size
limit, and "The protocol 'x' is not supported." / "The server does not support version ..."
for an unsupported request. A malformed request is answered with the parser's description of
the fault (the text ASP.NET Core shows after the exception name with detailed errors on).

Also here: ``HUB_PROTOCOL_OPCODES``, the WebSocket frame type each hub protocol travels in,
which the handshake's protocol name decides.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from ._errors import LocalProtocolError, RemoteProtocolError
from ._hub import (
    RECORD_SEPARATOR,
    SUPPORTED_PROTOCOLS,
    JsonHubProtocol,
    MessagePackHubProtocol,
    check_handshake_request,
    get_protocol,
    parse_handshake_request,
    parse_handshake_response,
    write_handshake_response,
)
from ._service import SERVICE_PROTOCOL_VERSION, ServiceHandshakeRequest, ServiceHandshakeResponse
from ._websocket import Opcode

__all__ = [
    "HUB_PROTOCOL_OPCODES",
    "HandshakeAccepted",
    "HandshakeRefused",
    "HandshakeResponse",
    "HandshakeResponseReader",
    "HubHandshake",
    "answer_service_handshake",
    "check_service_handshake_response",
]

#: The frame type of each hub protocol (``json`` -> TEXT, ``messagepack`` -> BINARY), from
#: the protocols' transfer formats: a TEXT frame must hold UTF-8, so binary frames carry
#: MessagePack (HubProtocol.md "Transport").
HUB_PROTOCOL_OPCODES: Final[Mapping[str, Opcode]] = MappingProxyType(
    {
        name: Opcode.BINARY if get_protocol(name).transfer_format == "Binary" else Opcode.TEXT
        for name in SUPPORTED_PROTOCOLS
    }
)

#: ASP.NET Core's answer to a handshake that did not complete: too slow, or too big.
_CANCELED: Final = "Handshake was canceled."


# --------------------------------------------------------------------------------------------
# The hub handshake, hub side


@dataclass(frozen=True, slots=True)
class HandshakeAccepted:
    """The client's handshake request was read and is supported.

    ``request`` is the request record as received (0x1E included), for a relay that forwards
    it to the hub that really answers; ``rest`` is what followed it, the first hub messages.
    """

    #: The hub protocol's name, lower-cased (a key of ``HUB_PROTOCOL_OPCODES``).
    protocol: str
    version: int
    request: bytes
    rest: bytes

    @property
    def hub_protocol(self) -> JsonHubProtocol | MessagePackHubProtocol:
        """The shared protocol object that reads and writes the hub messages that follow."""
        return get_protocol(self.protocol)


@dataclass(frozen=True, slots=True)
class HandshakeRefused:
    """The handshake failed; ``error`` is what the client is answered (and why it is closed)."""

    error: str


class HubHandshake:
    """The hub's side of one client's handshake: bytes in, a decision and its answer out.

    ``max_message_size`` bounds what is buffered: once more bytes than that have arrived
    without a record separator, the handshake is refused with "Handshake was canceled.", as
    ASP.NET Core does, rather than buffering a peer's endless request.

    >>> handshake = HubHandshake(max_message_size=1024)
    >>> handshake.receive_data(b'{"protocol":"JSON",')
    >>> handshake.result is None
    True
    >>> handshake.receive_data(b'"version":1}\\x1e{"type":6}\\x1e')
    >>> handshake.result
    HandshakeAccepted(protocol='json', version=1, \
request=b'{"protocol":"JSON","version":1}\\x1e', rest=b'{"type":6}\\x1e')
    >>> handshake.data_to_send()
    b'{}\\x1e'
    """

    __slots__ = ("_answered", "_buffer", "_max_message_size", "_result")

    def __init__(self, max_message_size: int) -> None:
        if type(max_message_size) is not int or max_message_size <= 0:
            raise ValueError(f"max_message_size must be an integer > 0, got {max_message_size!r}")
        self._max_message_size = max_message_size
        self._buffer = bytearray()
        self._result: HandshakeAccepted | HandshakeRefused | None = None
        self._answered = False

    @property
    def result(self) -> HandshakeAccepted | HandshakeRefused | None:
        """``None`` while the request is incomplete; then the decision, which does not change
        except through ``refuse`` or ``cancel``."""
        return self._result

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes the client sent, in any pieces.

        After a refusal the connection is closing and bytes still arriving are dropped. After
        acceptance the bytes belong to the hub protocol, so feeding more is the caller's
        mistake (``LocalProtocolError``).
        """
        if isinstance(self._result, HandshakeRefused):
            return
        if self._result is not None:
            raise LocalProtocolError(
                "The handshake was accepted; later bytes are hub messages, not handshake bytes."
            )
        start = len(self._buffer)
        self._buffer += data
        # Earlier pieces held no separator, so only a piece holding one can complete the
        # request: a request trickling in byte by byte is not re-scanned each time.
        if self._buffer.find(RECORD_SEPARATOR, start) >= 0:
            self._decide()
        elif len(self._buffer) > self._max_message_size:
            self._refused(_CANCELED)

    def _decide(self) -> None:
        try:
            found = parse_handshake_request(self._buffer)
        except RemoteProtocolError as exc:
            self._refused(str(exc))
            return
        if found is None:  # pragma: no cover - receive_data saw a separator
            return
        request, consumed = found
        # Any version up to MAX_HUB_PROTOCOL_VERSION, 0 included, as ASP.NET Core accepts.
        error = check_handshake_request(request)
        if error is not None:
            self._refused(error)
            return
        self._result = HandshakeAccepted(
            request.protocol.lower(),
            request.version,
            bytes(self._buffer[:consumed]),
            bytes(self._buffer[consumed:]),
        )
        self._buffer = bytearray()

    def _refused(self, error: str) -> None:
        self._result = HandshakeRefused(error)
        self._buffer = bytearray()

    def refuse(self, error: str) -> None:
        """Refuse for a reason of the caller's (no app server serves the hub, say), also
        after an acceptance that has not been answered yet."""
        if self._answered or isinstance(self._result, HandshakeRefused):
            raise LocalProtocolError(
                f"Cannot refuse the handshake with {error!r}: it was already "
                + ("answered." if self._answered else f"refused with {self._result!r}.")
            )
        self._refused(error)

    def cancel(self) -> None:
        """The handshake took too long: refuse it with ASP.NET Core's text for that."""
        self.refuse(_CANCELED)

    def data_to_send(self) -> bytes:
        """The answer to write to the client, once: ``{}`` + 0x1E for an acceptance,
        ``{"error": ...}`` + 0x1E for a refusal; ``b""`` before the decision and after the
        answer was taken."""
        if self._result is None or self._answered:
            return b""
        self._answered = True
        if isinstance(self._result, HandshakeRefused):
            return write_handshake_response(self._result.error)
        return write_handshake_response(None)


# --------------------------------------------------------------------------------------------
# The hub handshake, client side: the hub's answer


@dataclass(frozen=True, slots=True)
class HandshakeResponse:
    """The hub's answer to a handshake: ``error`` is ``None`` when it was accepted. ``rest``
    is what followed the answer's separator, the first hub messages."""

    error: str | None
    rest: bytes

    @property
    def succeeded(self) -> bool:
        """Whether the hub accepted the handshake."""
        return self.error is None


class HandshakeResponseReader:
    """Reads the answer a hub writes to a handshake, from bytes arriving in any pieces.

    A relay forwarding a client's handshake to an app server's hub uses it to learn whether
    the client is now connected. A malformed answer (not JSON, a hub message, a non-string
    ``error``, more than ``max_message_size`` bytes without a separator) raises
    ``RemoteProtocolError`` from ``receive_data``, and again from every later call.

    >>> reader = HandshakeResponseReader(max_message_size=1024)
    >>> reader.receive_data(b'{"error":"The protocol \\'xml\\' is not supported."}\\x1e')
    >>> reader.result
    HandshakeResponse(error="The protocol 'xml' is not supported.", rest=b'')
    """

    __slots__ = ("_buffer", "_error", "_max_message_size", "_result")

    def __init__(self, max_message_size: int) -> None:
        if type(max_message_size) is not int or max_message_size <= 0:
            raise ValueError(f"max_message_size must be an integer > 0, got {max_message_size!r}")
        self._max_message_size = max_message_size
        self._buffer = bytearray()
        self._result: HandshakeResponse | None = None
        self._error: RemoteProtocolError | None = None

    @property
    def result(self) -> HandshakeResponse | None:
        """``None`` until the whole answer has arrived."""
        return self._result

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes the hub sent. Raises ``LocalProtocolError`` once the answer was read:
        later bytes are hub messages."""
        if self._error is not None:
            raise self._error
        if self._result is not None:
            raise LocalProtocolError(
                "The handshake response was read; later bytes are hub messages."
            )
        start = len(self._buffer)
        self._buffer += data
        try:
            found = (
                parse_handshake_response(self._buffer)
                if self._buffer.find(RECORD_SEPARATOR, start) >= 0
                else None
            )
        except RemoteProtocolError as exc:
            self._error = exc
            raise
        if found is not None:
            error, consumed = found
            self._result = HandshakeResponse(error, bytes(self._buffer[consumed:]))
            self._buffer = bytearray()
        elif len(self._buffer) > self._max_message_size:
            self._error = RemoteProtocolError(
                f"The handshake response has no record separator (0x1E) in its first "
                f"{len(self._buffer)} bytes; the limit is {self._max_message_size} bytes."
            )
            raise self._error


# --------------------------------------------------------------------------------------------
# The service handshake (service-protocol §3.3)


def answer_service_handshake(message: object) -> ServiceHandshakeResponse:
    """The service's reply to an app server's first message: success, or an error when the
    app server speaks another service-protocol version (the app server then closes and
    retries, logging the error). Raises ``RemoteProtocolError`` when the first message is
    not a handshake request at all, which breaks the protocol rather than disagreeing on it.

    >>> answer_service_handshake(ServiceHandshakeRequest(version=1)).succeeded
    True
    >>> answer_service_handshake(ServiceHandshakeRequest(version=2)).error_message
    'Protocol version 2 is not supported; this relay speaks version 1.'
    """
    if not isinstance(message, ServiceHandshakeRequest):
        raise RemoteProtocolError(
            f"expected a handshake request first, got {type(message).__name__}"
        )
    if message.version != SERVICE_PROTOCOL_VERSION:
        return ServiceHandshakeResponse(
            f"Protocol version {message.version} is not supported; this relay speaks "
            f"version {SERVICE_PROTOCOL_VERSION}."
        )
    return ServiceHandshakeResponse()


def check_service_handshake_response(message: object) -> None:
    """The app server's check of the service's first message: it must be a successful
    handshake response. Raises ``RemoteProtocolError`` saying what came instead, or the
    service's refusal; the app server then drops the connection and retries.

    >>> check_service_handshake_response(ServiceHandshakeResponse("no"))
    Traceback (most recent call last):
      ...
    relaycore.protocol._errors.RemoteProtocolError: the service refused the handshake: no
    """
    if not isinstance(message, ServiceHandshakeResponse):
        raise RemoteProtocolError(
            f"the service sent {type(message).__name__} first; expected a handshake response"
        )
    if not message.succeeded:
        raise RemoteProtocolError(f"the service refused the handshake: {message.error_message}")
