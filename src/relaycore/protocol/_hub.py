"""The SignalR hub protocol, sans-I/O: handshake, JSON encoding, MessagePack encoding.

Theory of operation
-------------------

A hub connection starts with a handshake and then carries hub messages:

1. The client sends a handshake request, always JSON text ending in the record separator 0x1E:
   ``{"protocol":"json","version":1}`` (or ``"messagepack"``). ``parse_handshake_request`` reads
   it from whatever bytes arrived so far; ``check_handshake_request`` says whether the protocol
   and version are supported, in the .NET server's words.
2. The server answers ``{}`` + 0x1E, or ``{"error":"..."}`` + 0x1E and closes
   (``write_handshake_response``). Bytes after a separator belong to the next stage.
3. Both sides then exchange hub messages in the chosen encoding (``JsonHubProtocol`` or
   ``MessagePackHubProtocol``). ``parse(data)`` turns every *complete* record at the start of
   ``data`` into a message object and says how many bytes it used; the caller keeps the rest
   and calls again when more bytes arrive. ``write(message)`` gives one framed record.

Nothing here keeps connection state: the protocol objects are stateless and shared
(``get_protocol``). Message objects are frozen dataclasses named after the spec's message types.

Encoding choices (``protocol/client-protocol.md`` §3.4-3.5, ``HubProtocol.md``):

* JSON is written the way the .NET server writes it (``type`` first, then the fields in .NET's
  order), so that output matches the .NET vectors byte for byte; it is read in any key order, and
  unknown keys are ignored.
* MessagePack is written in the .NET form (Invocation with 6 elements, Close with 3) and read in
  the JavaScript client's shorter forms too; extra trailing elements are ignored.
* A message whose type number is unknown is skipped, for forward compatibility (both the .NET
  server and the JS client do so). A known message with bad fields raises
  ``RemoteProtocolError``; the connection should then be closed.
"""

from __future__ import annotations

import base64
import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import msgpack  # type: ignore[import-untyped]
import orjson

from .._accel import encode_varint, split_records, split_varint_frames
from ._errors import LocalProtocolError, RemoteProtocolError, show_value, unpack_error_text
from ._wire import MAX_FRAME, as_tuple, frames_before_error, too_big

__all__ = [
    "MAX_HUB_PROTOCOL_VERSION",
    "RECORD_SEPARATOR",
    "SUPPORTED_PROTOCOLS",
    "AckMessage",
    "CancelInvocationMessage",
    "CloseMessage",
    "CompletionMessage",
    "HandshakeRequest",
    "HubMessage",
    "InvocationMessage",
    "JsonHubProtocol",
    "MessagePackHubProtocol",
    "MessageType",
    "PingMessage",
    "SequenceMessage",
    "StreamInvocationMessage",
    "StreamItemMessage",
    "UnsupportedProtocolError",
    "check_handshake_request",
    "get_protocol",
    "parse_handshake_request",
    "parse_handshake_response",
    "write_handshake_request",
    "write_handshake_response",
]

#: Ends every JSON hub message and every handshake message (HubProtocol.md, "Message framing").
RECORD_SEPARATOR: Final = b"\x1e"
_RS: Final = 0x1E

#: Names accepted in the handshake's ``protocol`` field, as the .NET server spells them.
SUPPORTED_PROTOCOLS: Final = ("json", "messagepack")

#: The highest hub protocol version a handshake may ask for. ASP.NET Core's JSON and
#: MessagePack protocols are at version 2 (stateful reconnect's Ack and Sequence messages)
#: and accept every version up to their own (``IsVersionSupported``: ``version <= Version``),
#: so 0 passes too: ``signalrcore`` asks for the negotiate version, which is 0 when it does not
#: ask for negotiate version 1. Version 2 only turns on stateful reconnect, which the
#: negotiate decides on separately.
MAX_HUB_PROTOCOL_VERSION: Final = 2

#: How much of an offending payload an error message quotes.
_QUOTE_LIMIT: Final = 200


class MessageType(enum.IntEnum):
    """Hub message type numbers: the ``type`` field, or element 0 of a MessagePack array."""

    #: Call a method on the other side; with an invocation id, a Completion is expected back.
    INVOCATION = 1
    #: One item of a streamed result or of an upload stream.
    STREAM_ITEM = 2
    #: The end of an invocation or stream: a result, an error, or neither (void).
    COMPLETION = 3
    #: Call a streaming method on the server; results come back as StreamItem + Completion.
    STREAM_INVOCATION = 4
    #: Stop a stream started by StreamInvocation.
    CANCEL_INVOCATION = 5
    #: Keep-alive; carries nothing and needs no answer.
    PING = 6
    #: End the connection, with an optional error and an optional invitation to reconnect.
    CLOSE = 7
    #: Stateful reconnect: every trackable message up to ``sequence_id`` was received.
    ACK = 8
    #: Stateful reconnect: the next trackable message sent has id ``sequence_id``.
    SEQUENCE = 9


# --------------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True, slots=True)
class InvocationMessage:
    """Type 1: call ``target`` on the other side with ``arguments``.

    Without ``invocation_id`` the call is non-blocking and must not be answered; with one, the
    callee answers with a ``CompletionMessage`` carrying the same id. ``stream_ids`` name upload
    streams whose items follow as ``StreamItemMessage``.

    >>> InvocationMessage("broadcast", ["alice", "hi"])
    InvocationMessage(target='broadcast', arguments=('alice', 'hi'), invocation_id=None, \
stream_ids=(), headers=None)
    """

    message_type: ClassVar[MessageType] = MessageType.INVOCATION
    target: str
    arguments: Sequence[Any] = ()
    invocation_id: str | None = None
    stream_ids: Sequence[str] = ()
    headers: dict[str, str] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "arguments", as_tuple(self.arguments, "arguments"))
        object.__setattr__(self, "stream_ids", as_tuple(self.stream_ids, "stream_ids"))


@dataclass(frozen=True, slots=True)
class StreamInvocationMessage:
    """Type 4: call the streaming method ``target``; items come back under ``invocation_id``."""

    message_type: ClassVar[MessageType] = MessageType.STREAM_INVOCATION
    invocation_id: str
    target: str
    arguments: Sequence[Any] = ()
    stream_ids: Sequence[str] = ()
    headers: dict[str, str] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "arguments", as_tuple(self.arguments, "arguments"))
        object.__setattr__(self, "stream_ids", as_tuple(self.stream_ids, "stream_ids"))


@dataclass(frozen=True, slots=True)
class StreamItemMessage:
    """Type 2: one ``item`` of the stream ``invocation_id``."""

    message_type: ClassVar[MessageType] = MessageType.STREAM_ITEM
    invocation_id: str
    item: Any
    headers: dict[str, str] | None = None


@dataclass(frozen=True, slots=True)
class CompletionMessage:
    """Type 3: the end of invocation or stream ``invocation_id``.

    Exactly one of three forms: an ``error``; a result (``has_result`` true, ``result`` possibly
    ``None``, written as ``"result":null``); or neither (void). A ``result`` other than ``None``
    implies ``has_result``. Giving both an error and a result raises ``LocalProtocolError``.

    >>> CompletionMessage("7", result=42).has_result
    True
    """

    message_type: ClassVar[MessageType] = MessageType.COMPLETION
    invocation_id: str
    error: str | None = None
    result: Any = None
    has_result: bool = False
    headers: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if self.result is not None and not self.has_result:
            object.__setattr__(self, "has_result", True)
        if self.error is not None and self.has_result:
            raise LocalProtocolError(
                "a Completion carries either an error or a result, not both: "
                f"got error={self.error!r} and result={self.result!r}"
            )


@dataclass(frozen=True, slots=True)
class CancelInvocationMessage:
    """Type 5: stop the stream ``invocation_id`` (client to server)."""

    message_type: ClassVar[MessageType] = MessageType.CANCEL_INVOCATION
    invocation_id: str
    headers: dict[str, str] | None = None


@dataclass(frozen=True, slots=True)
class PingMessage:
    """Type 6: keep-alive. Carries nothing, never has headers, needs no answer."""

    message_type: ClassVar[MessageType] = MessageType.PING


@dataclass(frozen=True, slots=True)
class CloseMessage:
    """Type 7: the sender is closing the connection.

    ``error`` is shown to the other side; ``allow_reconnect`` asks a client with automatic
    reconnect to come back (``client-protocol.md`` §4.3).
    """

    message_type: ClassVar[MessageType] = MessageType.CLOSE
    error: str | None = None
    allow_reconnect: bool = False


@dataclass(frozen=True, slots=True)
class AckMessage:
    """Type 8 (stateful reconnect): every trackable message up to ``sequence_id`` arrived."""

    message_type: ClassVar[MessageType] = MessageType.ACK
    sequence_id: int


@dataclass(frozen=True, slots=True)
class SequenceMessage:
    """Type 9 (stateful reconnect): the next trackable message sent has id ``sequence_id``."""

    message_type: ClassVar[MessageType] = MessageType.SEQUENCE
    sequence_id: int


#: Any hub message; ``isinstance(x, HubMessage)`` works.
HubMessage = (
    InvocationMessage
    | StreamInvocationMessage
    | StreamItemMessage
    | CompletionMessage
    | CancelInvocationMessage
    | PingMessage
    | CloseMessage
    | AckMessage
    | SequenceMessage
)

_PING: Final = PingMessage()
_MISSING: Final[Any] = object()


def _show(value: Any) -> str:
    """Describe a received value for an error message, briefly."""
    if value is _MISSING:
        return "nothing"
    if value is None:
        return "null"
    return show_value(value)


def _quote(payload: bytes) -> str:
    text = payload[:_QUOTE_LIMIT].decode("utf-8", errors="replace")
    return text + ("..." if len(payload) > _QUOTE_LIMIT else "")


# --------------------------------------------------------------------------------------------
# Handshake (HubProtocol.md "Overview"; client-protocol.md §3.1)


@dataclass(frozen=True, slots=True)
class HandshakeRequest:
    """The client's first message: the hub protocol it wants and that protocol's version."""

    protocol: str
    version: int


def _split_first_record(data: bytes | bytearray | memoryview) -> tuple[bytes, int] | None:
    buf = bytes(data) if isinstance(data, memoryview) else data
    end = buf.find(_RS)
    if end < 0:
        return None
    return bytes(buf[:end]), end + 1


def _load_handshake_object(payload: bytes, what: str) -> dict[str, Any]:
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise RemoteProtocolError(
            f"The {what} is not valid JSON ({exc}); expected a JSON object followed by 0x1E. "
            f"Message content: {_quote(payload)}"
        ) from None
    if type(obj) is not dict:
        raise RemoteProtocolError(
            f"The {what} is a JSON {type(obj).__name__}; expected a JSON object. "
            f"Message content: {_quote(payload)}"
        )
    return obj


def parse_handshake_request(
    data: bytes | bytearray | memoryview,
) -> tuple[HandshakeRequest, int] | None:
    """Read the client's handshake request from the bytes received so far.

    Returns ``(request, consumed)``, where ``consumed`` counts the bytes up to and including the
    0x1E separator (bytes after it are hub messages), or ``None`` while no separator has
    arrived. Raises ``RemoteProtocolError`` for bad JSON or a missing or mistyped ``protocol``
    or ``version``. Unknown fields are ignored. Whether the protocol and version are supported
    is the caller's decision (``get_protocol``).

    >>> parse_handshake_request(b'{"protocol":"json","version":1}\\x1e')
    (HandshakeRequest(protocol='json', version=1), 32)
    """
    found = _split_first_record(data)
    if found is None:
        return None
    payload, consumed = found
    obj = _load_handshake_object(payload, "handshake request")
    protocol = obj.get("protocol", _MISSING)
    version = obj.get("version", _MISSING)
    # Messages as the .NET server words them (HandshakeProtocol.cs), with the content quoted.
    if protocol is _MISSING:
        raise RemoteProtocolError(
            f"Missing required property 'protocol'. Message content: {_quote(payload)}"
        )
    if version is _MISSING:
        raise RemoteProtocolError(
            f"Missing required property 'version'. Message content: {_quote(payload)}"
        )
    if type(protocol) is not str:
        raise RemoteProtocolError(
            f"Expected 'protocol' to be a string, got {_show(protocol)}. "
            f"Message content: {_quote(payload)}"
        )
    if type(version) is not int:
        raise RemoteProtocolError(
            f"Expected 'version' to be an integer, got {_show(version)}. "
            f"Message content: {_quote(payload)}"
        )
    return HandshakeRequest(protocol, version), consumed


def check_handshake_request(request: HandshakeRequest) -> str | None:
    """Why a server refuses ``request``, worded as the .NET server's handshake error, or
    ``None`` when its protocol (any case) and version (``<= MAX_HUB_PROTOCOL_VERSION``, as
    ASP.NET Core decides) are supported.

    >>> check_handshake_request(HandshakeRequest("json", 0)) is None
    True
    >>> check_handshake_request(HandshakeRequest("JSON", 3))
    "The server does not support version 3 of the 'JSON' protocol."
    """
    try:
        get_protocol(request.protocol)
    except UnsupportedProtocolError as exc:
        return str(exc)
    if request.version > MAX_HUB_PROTOCOL_VERSION:
        # HubConnectionContext quotes the protocol as the request spelled it.
        return (
            f"The server does not support version {request.version} of the "
            f"'{request.protocol}' protocol."
        )
    return None


def write_handshake_request(protocol: str, version: int = 1) -> bytes:
    """Encode a handshake request exactly as ``@microsoft/signalr`` does.

    >>> write_handshake_request("json")
    b'{"protocol":"json","version":1}\\x1e'
    """
    return orjson.dumps({"protocol": protocol, "version": version}) + RECORD_SEPARATOR


#: The .NET server's success reply, byte for byte.
_HANDSHAKE_SUCCESS: Final = b"{}\x1e"


def write_handshake_response(error: str | None = None) -> bytes:
    """Encode the server's handshake reply: ``{}`` on success, ``{"error": ...}`` on failure.

    >>> write_handshake_response()
    b'{}\\x1e'
    >>> write_handshake_response("The protocol 'xml' is not supported.")
    b'{"error":"The protocol \\'xml\\' is not supported."}\\x1e'
    """
    if error is None:
        return _HANDSHAKE_SUCCESS
    return orjson.dumps({"error": error}) + RECORD_SEPARATOR


def parse_handshake_response(
    data: bytes | bytearray | memoryview,
) -> tuple[str | None, int] | None:
    """Read the server's handshake reply from the bytes received so far (client side).

    Returns ``(error, consumed)`` (``error`` is ``None`` on success) or ``None`` while no 0x1E
    has arrived. Like the JS client, raises ``RemoteProtocolError`` when the reply has a
    ``type`` field (a hub message arrived instead of a handshake reply) or a non-string error.
    """
    found = _split_first_record(data)
    if found is None:
        return None
    payload, consumed = found
    obj = _load_handshake_object(payload, "handshake response")
    if "type" in obj:
        raise RemoteProtocolError(
            "Expected a handshake response from the server, got a hub message. "
            f"Message content: {_quote(payload)}"
        )
    error = obj.get("error")
    if error is not None and type(error) is not str:
        raise RemoteProtocolError(
            f"Expected the handshake 'error' to be a string, got {_show(error)}. "
            f"Message content: {_quote(payload)}"
        )
    return error, consumed


# --------------------------------------------------------------------------------------------
# JSON encoding (client-protocol.md §3.4)

#: Ping is constant; writing it needs no encoder.
_JSON_PING: Final = b'{"type":6}\x1e'


def _json_default(value: Any) -> Any:
    # .NET's System.Text.Json writes byte[] as a base64 string; do the same.
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"Type is not JSON serializable: {type(value).__name__}")


def _json_dumps(obj: Any) -> bytes:
    try:
        return orjson.dumps(obj, default=_json_default)
    except TypeError as exc:  # orjson.JSONEncodeError is a TypeError
        raise LocalProtocolError(
            f"cannot encode the message as JSON ({exc}); expected JSON values: str, int "
            "(64-bit), float, bool, None, list, tuple, dict with str keys, bytes, datetime"
        ) from None


# Writers: .NET field order (JsonHubProtocol.cs WriteMessageCore): type, headers (only when not
# empty), then the fields of the message type.


def _json_invocation(m: InvocationMessage) -> dict[str, Any]:
    obj: dict[str, Any] = {"type": 1}
    if m.headers:
        obj["headers"] = m.headers
    if m.invocation_id is not None:
        obj["invocationId"] = m.invocation_id
    obj["target"] = m.target
    obj["arguments"] = m.arguments
    if m.stream_ids:
        obj["streamIds"] = m.stream_ids
    return obj


def _json_stream_invocation(m: StreamInvocationMessage) -> dict[str, Any]:
    obj: dict[str, Any] = {"type": 4}
    if m.headers:
        obj["headers"] = m.headers
    obj["invocationId"] = m.invocation_id
    obj["target"] = m.target
    obj["arguments"] = m.arguments
    if m.stream_ids:
        obj["streamIds"] = m.stream_ids
    return obj


def _json_stream_item(m: StreamItemMessage) -> dict[str, Any]:
    obj: dict[str, Any] = {"type": 2}
    if m.headers:
        obj["headers"] = m.headers
    obj["invocationId"] = m.invocation_id
    obj["item"] = m.item
    return obj


def _json_completion(m: CompletionMessage) -> dict[str, Any]:
    obj: dict[str, Any] = {"type": 3}
    if m.headers:
        obj["headers"] = m.headers
    obj["invocationId"] = m.invocation_id
    if m.error is not None:
        obj["error"] = m.error
    elif m.has_result:
        obj["result"] = m.result
    return obj


def _json_cancel(m: CancelInvocationMessage) -> dict[str, Any]:
    obj: dict[str, Any] = {"type": 5}
    if m.headers:
        obj["headers"] = m.headers
    obj["invocationId"] = m.invocation_id
    return obj


def _json_close(m: CloseMessage) -> dict[str, Any]:
    obj: dict[str, Any] = {"type": 7}
    if m.error is not None:
        obj["error"] = m.error
    if m.allow_reconnect:
        obj["allowReconnect"] = True
    return obj


def _json_ack(m: AckMessage) -> dict[str, Any]:
    return {"type": 8, "sequenceId": m.sequence_id}


def _json_sequence(m: SequenceMessage) -> dict[str, Any]:
    return {"type": 9, "sequenceId": m.sequence_id}


_JSON_WRITERS: Final[dict[type, Callable[[Any], dict[str, Any]]]] = {
    InvocationMessage: _json_invocation,
    StreamInvocationMessage: _json_stream_invocation,
    StreamItemMessage: _json_stream_item,
    CompletionMessage: _json_completion,
    CancelInvocationMessage: _json_cancel,
    CloseMessage: _json_close,
    AckMessage: _json_ack,
    SequenceMessage: _json_sequence,
}


# Readers. Validation follows the JS client (JsonHubProtocol.ts) and the .NET server: required
# ids and targets are non-empty strings, "type" and "sequenceId" are integers.


def _json_headers(obj: dict[str, Any], kind: str) -> dict[str, str] | None:
    headers = obj.get("headers")
    if headers is None:
        return None
    if type(headers) is not dict:
        raise RemoteProtocolError(
            f"{kind} message: 'headers' must be an object of strings, got {_show(headers)}"
        )
    for key, value in headers.items():
        if not key or type(value) is not str:
            raise RemoteProtocolError(
                f"{kind} message: 'headers' must map non-empty names to strings, "
                f"got {key!r}: {_show(value)}"
            )
    return headers or None


def _json_id(obj: dict[str, Any], kind: str) -> str:
    value = obj.get("invocationId", _MISSING)
    if type(value) is not str or not value:
        raise RemoteProtocolError(
            f"{kind} message: 'invocationId' must be a non-empty string, got {_show(value)}"
        )
    return value


def _json_target(obj: dict[str, Any], kind: str) -> str:
    value = obj.get("target", _MISSING)
    if type(value) is not str or not value:
        raise RemoteProtocolError(
            f"{kind} message: 'target' must be a non-empty string, got {_show(value)}"
        )
    return value


def _json_arguments(obj: dict[str, Any], kind: str) -> tuple[Any, ...]:
    value = obj.get("arguments", _MISSING)
    if type(value) is list:
        return tuple(value)
    if value is _MISSING:
        # The JS client does not insist on "arguments"; a call without any has none.
        return ()
    raise RemoteProtocolError(f"{kind} message: 'arguments' must be an array, got {_show(value)}")


def _json_stream_ids(obj: dict[str, Any], kind: str) -> tuple[str, ...]:
    value = obj.get("streamIds")
    if value is None:
        return ()
    if type(value) is not list or any(type(v) is not str for v in value):
        raise RemoteProtocolError(
            f"{kind} message: 'streamIds' must be an array of strings, got {_show(value)}"
        )
    return tuple(value)


def _json_sequence_id(obj: dict[str, Any], kind: str) -> int:
    value = obj.get("sequenceId", _MISSING)
    if type(value) is not int:
        raise RemoteProtocolError(
            f"{kind} message: 'sequenceId' must be an integer, got {_show(value)}"
        )
    return value


def _read_json_invocation(obj: dict[str, Any]) -> InvocationMessage:
    invocation_id = obj.get("invocationId")
    if invocation_id is not None and (type(invocation_id) is not str or not invocation_id):
        raise RemoteProtocolError(
            "Invocation message: 'invocationId' must be absent (non-blocking call) or a "
            f"non-empty string, got {_show(invocation_id)}"
        )
    return InvocationMessage(
        _json_target(obj, "Invocation"),
        _json_arguments(obj, "Invocation"),
        invocation_id,
        _json_stream_ids(obj, "Invocation"),
        _json_headers(obj, "Invocation"),
    )


def _read_json_stream_invocation(obj: dict[str, Any]) -> StreamInvocationMessage:
    kind = "StreamInvocation"
    return StreamInvocationMessage(
        _json_id(obj, kind),
        _json_target(obj, kind),
        _json_arguments(obj, kind),
        _json_stream_ids(obj, kind),
        _json_headers(obj, kind),
    )


def _read_json_stream_item(obj: dict[str, Any]) -> StreamItemMessage:
    invocation_id = _json_id(obj, "StreamItem")
    item = obj.get("item", _MISSING)
    if item is _MISSING:
        raise RemoteProtocolError("StreamItem message: 'item' is missing; expected any value")
    return StreamItemMessage(invocation_id, item, _json_headers(obj, "StreamItem"))


def _read_json_completion(obj: dict[str, Any]) -> CompletionMessage:
    invocation_id = _json_id(obj, "Completion")
    headers = _json_headers(obj, "Completion")
    error = obj.get("error")
    if error is not None and type(error) is not str:
        raise RemoteProtocolError(
            f"Completion message: 'error' must be a string, got {_show(error)}"
        )
    result = obj.get("result", _MISSING)
    if result is _MISSING:
        return CompletionMessage(invocation_id, error, headers=headers)
    if error is None:
        return CompletionMessage(invocation_id, None, result, True, headers)
    if result is None:
        # The JS client accepts an error next to "result": null (the error wins); so do we.
        return CompletionMessage(invocation_id, error, headers=headers)
    raise RemoteProtocolError(
        "Completion message: has both 'error' and 'result'; expected at most one of them"
    )


def _read_json_cancel(obj: dict[str, Any]) -> CancelInvocationMessage:
    return CancelInvocationMessage(
        _json_id(obj, "CancelInvocation"), _json_headers(obj, "CancelInvocation")
    )


def _read_json_ping(obj: dict[str, Any]) -> PingMessage:
    return _PING


def _read_json_close(obj: dict[str, Any]) -> CloseMessage:
    error = obj.get("error")
    if error is not None and type(error) is not str:
        raise RemoteProtocolError(f"Close message: 'error' must be a string, got {_show(error)}")
    allow_reconnect = obj.get("allowReconnect")
    if allow_reconnect is None:
        allow_reconnect = False
    elif type(allow_reconnect) is not bool:
        raise RemoteProtocolError(
            f"Close message: 'allowReconnect' must be true or false, got {_show(allow_reconnect)}"
        )
    return CloseMessage(error, allow_reconnect)


def _read_json_ack(obj: dict[str, Any]) -> AckMessage:
    return AckMessage(_json_sequence_id(obj, "Ack"))


def _read_json_sequence(obj: dict[str, Any]) -> SequenceMessage:
    return SequenceMessage(_json_sequence_id(obj, "Sequence"))


_JSON_READERS: Final[dict[int, Callable[[dict[str, Any]], HubMessage]]] = {
    1: _read_json_invocation,
    2: _read_json_stream_item,
    3: _read_json_completion,
    4: _read_json_stream_invocation,
    5: _read_json_cancel,
    6: _read_json_ping,
    7: _read_json_close,
    8: _read_json_ack,
    9: _read_json_sequence,
}


def _read_json_record(record: bytes) -> HubMessage | None:
    try:
        obj = orjson.loads(record)
    except orjson.JSONDecodeError as exc:
        raise RemoteProtocolError(
            f"Hub message is not valid JSON ({exc}); expected one JSON object per "
            f"0x1E-terminated record. Message content: {_quote(record)}"
        ) from None
    if type(obj) is not dict:
        raise RemoteProtocolError(
            f"Hub message is a JSON {type(obj).__name__}; expected a JSON object with an "
            f"integer 'type'. Message content: {_quote(record)}"
        )
    message_type = obj.get("type", _MISSING)
    if type(message_type) is not int:
        raise RemoteProtocolError(
            f"Hub message has no integer 'type' (got {_show(message_type)}); expected a "
            f"message type number. Message content: {_quote(record)}"
        )
    reader = _JSON_READERS.get(message_type)
    if reader is None:
        return None  # unknown type: skipped, for forward compatibility
    return reader(obj)


class JsonHubProtocol:
    """The ``json`` hub protocol: UTF-8 JSON objects, each followed by 0x1E.

    >>> protocol = JsonHubProtocol()
    >>> protocol.write(InvocationMessage("notify", ["hi"]))
    b'{"type":1,"target":"notify","arguments":["hi"]}\\x1e'
    >>> protocol.parse(b'{"type":6}\\x1e{"type":')
    ([PingMessage()], 11)
    """

    name: ClassVar[str] = "json"
    version: ClassVar[int] = 1
    transfer_format: ClassVar[str] = "Text"

    def write(self, message: HubMessage) -> bytes:
        """Encode ``message`` as one record: JSON in the .NET server's key order, then 0x1E.

        Raises ``LocalProtocolError`` for something that is not a hub message or holds values
        JSON cannot carry. ``bytes`` values are written as base64 strings, as .NET does.
        """
        if type(message) is PingMessage:
            return _JSON_PING
        writer = _JSON_WRITERS.get(type(message))
        if writer is None:
            raise LocalProtocolError(
                f"cannot write {type(message).__name__}: expected a hub message "
                "(InvocationMessage, CompletionMessage, ...)"
            )
        return _json_dumps(writer(message)) + RECORD_SEPARATOR

    def write_many(self, messages: Iterable[HubMessage]) -> bytes:
        """Encode several messages into one buffer, in order."""
        return b"".join([self.write(message) for message in messages])

    def write_invocation(self, target: str, arguments: Sequence[Any]) -> bytes:
        """Encode a non-blocking Invocation of ``target`` directly (the REST send path)."""
        return _json_dumps({"type": 1, "target": target, "arguments": arguments}) + RECORD_SEPARATOR

    def parse(
        self, data: bytes | bytearray | memoryview, max_message_size: int | None = None
    ) -> tuple[list[HubMessage], int]:
        """Decode every complete record at the start of ``data``.

        Returns ``(messages, consumed)``; ``data[consumed:]`` is an incomplete record to keep
        for the next call. Records of unknown type are skipped. Raises ``RemoteProtocolError``
        for a bad record, or for a record (separator not counted) longer than
        ``max_message_size``, including an unfinished one that is already too long.
        """
        records, consumed = split_records(data)
        if max_message_size is not None:
            for record in records:
                if len(record) > max_message_size:
                    raise too_big("Hub message", len(record), max_message_size)
            pending = len(data) - consumed
            if pending > max_message_size:
                raise RemoteProtocolError(
                    f"Hub message exceeds the maximum message size of {max_message_size} "
                    f"bytes: {pending} bytes arrived without a 0x1E record separator"
                )
        messages: list[HubMessage] = []
        for record in records:
            message = _read_json_record(record)
            if message is not None:
                messages.append(message)
        return messages, consumed


# --------------------------------------------------------------------------------------------
# MessagePack encoding (client-protocol.md §3.5, HubProtocol.md "MessagePack Encoding")

#: Ping is constant: varint 2, then the array [6].
_MSGPACK_PING: Final = b"\x02\x91\x06"

# MessagePack Completion "resultKind" (HubProtocol.md, Completion message encoding).
_RESULT_ERROR: Final = 1
_RESULT_VOID: Final = 2
_RESULT_NON_VOID: Final = 3


def _msgpack_frame(array: list[Any]) -> bytes:
    try:
        # datetime=True: aware datetimes become the timestamp extension (-1), which the JS
        # client reads as a Date.
        body: bytes = msgpack.packb(array, use_bin_type=True, datetime=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(
            f"cannot encode the message as MessagePack ({exc}); expected str, int (64-bit), "
            "float, bool, None, bytes, list, tuple, dict, timezone-aware datetime"
        ) from None
    try:
        return encode_varint(len(body)) + body
    except ValueError:
        raise LocalProtocolError(
            f"a MessagePack hub message of {len(body)} bytes exceeds the 2GB framing limit"
        ) from None


# Writers: the .NET layouts (MessagePackHubProtocolWorker.cs), headers always present (an
# empty map when there are none).


def _msgpack_invocation(m: InvocationMessage) -> list[Any]:
    return [1, m.headers or {}, m.invocation_id, m.target, m.arguments, m.stream_ids]


def _msgpack_stream_invocation(m: StreamInvocationMessage) -> list[Any]:
    return [4, m.headers or {}, m.invocation_id, m.target, m.arguments, m.stream_ids]


def _msgpack_stream_item(m: StreamItemMessage) -> list[Any]:
    return [2, m.headers or {}, m.invocation_id, m.item]


def _msgpack_completion(m: CompletionMessage) -> list[Any]:
    if m.error is not None:
        return [3, m.headers or {}, m.invocation_id, _RESULT_ERROR, m.error]
    if m.has_result:
        return [3, m.headers or {}, m.invocation_id, _RESULT_NON_VOID, m.result]
    return [3, m.headers or {}, m.invocation_id, _RESULT_VOID]


def _msgpack_cancel(m: CancelInvocationMessage) -> list[Any]:
    return [5, m.headers or {}, m.invocation_id]


def _msgpack_close(m: CloseMessage) -> list[Any]:
    return [7, m.error, m.allow_reconnect]


def _msgpack_ack(m: AckMessage) -> list[Any]:
    return [8, m.sequence_id]


def _msgpack_sequence(m: SequenceMessage) -> list[Any]:
    return [9, m.sequence_id]


_MSGPACK_WRITERS: Final[dict[type, Callable[[Any], list[Any]]]] = {
    InvocationMessage: _msgpack_invocation,
    StreamInvocationMessage: _msgpack_stream_invocation,
    StreamItemMessage: _msgpack_stream_item,
    CompletionMessage: _msgpack_completion,
    CancelInvocationMessage: _msgpack_cancel,
    CloseMessage: _msgpack_close,
    AckMessage: _msgpack_ack,
    SequenceMessage: _msgpack_sequence,
}


# Readers. Minimum element counts are the JS client's; more elements are ignored so that later
# protocol versions can append fields.


def _mp_need(array: list[Any], count: int, kind: str, layout: str) -> None:
    if len(array) < count:
        raise RemoteProtocolError(
            f"{kind} message has {len(array)} elements; expected at least {count}: {layout}"
        )


def _mp_headers(array: list[Any], kind: str) -> dict[str, str] | None:
    headers = array[1]
    if type(headers) is not dict:
        raise RemoteProtocolError(
            f"{kind} message: element 1 (headers) must be a map, got {_show(headers)}"
        )
    for key, value in headers.items():
        if type(key) is not str or not key or type(value) is not str:
            raise RemoteProtocolError(
                f"{kind} message: headers must map non-empty string names to strings, "
                f"got {_show(key)}: {_show(value)}"
            )
    return headers or None


def _mp_string(array: list[Any], index: int, name: str, kind: str) -> str:
    value = array[index]
    if type(value) is not str or not value:
        raise RemoteProtocolError(
            f"{kind} message: element {index} ({name}) must be a non-empty string, "
            f"got {_show(value)}"
        )
    return value


def _mp_arguments(array: list[Any], kind: str) -> tuple[Any, ...]:
    value = array[4]
    if type(value) is not list:
        raise RemoteProtocolError(
            f"{kind} message: element 4 (arguments) must be an array, got {_show(value)}"
        )
    return tuple(value)


def _mp_stream_ids(array: list[Any], kind: str) -> tuple[str, ...]:
    # The JS client writes no streamIds slot when there are no streams (5 elements).
    if len(array) < 6 or array[5] is None:
        return ()
    value = array[5]
    if type(value) is not list or any(type(v) is not str for v in value):
        raise RemoteProtocolError(
            f"{kind} message: element 5 (streamIds) must be an array of strings, got {_show(value)}"
        )
    return tuple(value)


def _mp_sequence_id(array: list[Any], kind: str) -> int:
    _mp_need(array, 2, kind, f"[{array[0]}, sequenceId]")
    value = array[1]
    if type(value) is not int:
        raise RemoteProtocolError(
            f"{kind} message: element 1 (sequenceId) must be an integer, got {_show(value)}"
        )
    return value


def _read_mp_invocation(array: list[Any]) -> InvocationMessage:
    kind = "Invocation"
    _mp_need(array, 2, kind, "[1, headers, invocationId, target, arguments, streamIds?]")
    headers = _mp_headers(array, kind)
    _mp_need(array, 5, kind, "[1, headers, invocationId, target, arguments, streamIds?]")
    invocation_id = array[2]
    if invocation_id is not None and (type(invocation_id) is not str or not invocation_id):
        raise RemoteProtocolError(
            "Invocation message: element 2 (invocationId) must be nil (non-blocking call) or "
            f"a non-empty string, got {_show(invocation_id)}"
        )
    return InvocationMessage(
        _mp_string(array, 3, "target", kind),
        _mp_arguments(array, kind),
        invocation_id,
        _mp_stream_ids(array, kind),
        headers,
    )


def _read_mp_stream_invocation(array: list[Any]) -> StreamInvocationMessage:
    kind = "StreamInvocation"
    _mp_need(array, 2, kind, "[4, headers, invocationId, target, arguments, streamIds?]")
    headers = _mp_headers(array, kind)
    _mp_need(array, 5, kind, "[4, headers, invocationId, target, arguments, streamIds?]")
    return StreamInvocationMessage(
        _mp_string(array, 2, "invocationId", kind),
        _mp_string(array, 3, "target", kind),
        _mp_arguments(array, kind),
        _mp_stream_ids(array, kind),
        headers,
    )


def _read_mp_stream_item(array: list[Any]) -> StreamItemMessage:
    kind = "StreamItem"
    _mp_need(array, 2, kind, "[2, headers, invocationId, item]")
    headers = _mp_headers(array, kind)
    _mp_need(array, 4, kind, "[2, headers, invocationId, item]")
    return StreamItemMessage(_mp_string(array, 2, "invocationId", kind), array[3], headers)


def _read_mp_completion(array: list[Any]) -> CompletionMessage:
    kind = "Completion"
    layout = "[3, headers, invocationId, resultKind, error or result (kinds 1 and 3)]"
    _mp_need(array, 2, kind, layout)
    headers = _mp_headers(array, kind)
    _mp_need(array, 4, kind, layout)
    invocation_id = _mp_string(array, 2, "invocationId", kind)
    result_kind = array[3]
    if type(result_kind) is not int:
        raise RemoteProtocolError(
            f"Completion message: element 3 (resultKind) must be an integer, "
            f"got {_show(result_kind)}"
        )
    if result_kind == _RESULT_VOID:
        return CompletionMessage(invocation_id, headers=headers)
    if result_kind == _RESULT_ERROR:
        _mp_need(array, 5, kind, "[3, headers, invocationId, 1, error]")
        error = array[4]
        if type(error) is not str:
            raise RemoteProtocolError(
                f"Completion message: element 4 (error) must be a string, got {_show(error)}"
            )
        return CompletionMessage(invocation_id, error, headers=headers)
    if result_kind == _RESULT_NON_VOID:
        _mp_need(array, 5, kind, "[3, headers, invocationId, 3, result]")
        return CompletionMessage(invocation_id, None, array[4], True, headers)
    raise RemoteProtocolError(
        f"Completion message: invalid resultKind {result_kind}; expected 1 (error), "
        "2 (void) or 3 (result)"
    )


def _read_mp_cancel(array: list[Any]) -> CancelInvocationMessage:
    kind = "CancelInvocation"
    _mp_need(array, 2, kind, "[5, headers, invocationId]")
    headers = _mp_headers(array, kind)
    _mp_need(array, 3, kind, "[5, headers, invocationId]")
    return CancelInvocationMessage(_mp_string(array, 2, "invocationId", kind), headers)


def _read_mp_ping(array: list[Any]) -> PingMessage:
    return _PING


def _read_mp_close(array: list[Any]) -> CloseMessage:
    _mp_need(array, 2, "Close", "[7, error or nil, allowReconnect?]")
    error = array[1]
    if error is not None and type(error) is not str:
        raise RemoteProtocolError(
            f"Close message: element 1 (error) must be a string or nil, got {_show(error)}"
        )
    allow_reconnect = array[2] if len(array) > 2 else None
    if allow_reconnect is None:
        allow_reconnect = False
    elif type(allow_reconnect) is not bool:
        raise RemoteProtocolError(
            "Close message: element 2 (allowReconnect) must be a boolean, "
            f"got {_show(allow_reconnect)}"
        )
    return CloseMessage(error, allow_reconnect)


def _read_mp_ack(array: list[Any]) -> AckMessage:
    return AckMessage(_mp_sequence_id(array, "Ack"))


def _read_mp_sequence(array: list[Any]) -> SequenceMessage:
    return SequenceMessage(_mp_sequence_id(array, "Sequence"))


_MSGPACK_READERS: Final[dict[int, Callable[[list[Any]], HubMessage]]] = {
    1: _read_mp_invocation,
    2: _read_mp_stream_item,
    3: _read_mp_completion,
    4: _read_mp_stream_invocation,
    5: _read_mp_cancel,
    6: _read_mp_ping,
    7: _read_mp_close,
    8: _read_mp_ack,
    9: _read_mp_sequence,
}


def _read_msgpack_body(body: bytes) -> HubMessage | None:
    try:
        # timestamp=3: the timestamp extension (-1, a JS Date) becomes an aware datetime.
        array = msgpack.unpackb(body, raw=False, strict_map_key=False, timestamp=3)
    except msgpack.ExtraData:
        raise RemoteProtocolError(
            f"MessagePack hub message of {len(body)} bytes holds more than one value; "
            "expected exactly one array per length-prefixed frame"
        ) from None
    except (ValueError, TypeError, OverflowError) as exc:
        raise RemoteProtocolError(
            f"MessagePack hub message of {len(body)} bytes is not valid MessagePack "
            f"({unpack_error_text(exc)}); expected one array"
        ) from None
    if type(array) is not list or not array:
        raise RemoteProtocolError(
            f"MessagePack hub message is {_show(array)}; expected a non-empty array whose "
            "first element is the message type"
        )
    message_type = array[0]
    if type(message_type) is not int:
        raise RemoteProtocolError(
            f"MessagePack hub message: element 0 (type) must be an integer, "
            f"got {_show(message_type)}"
        )
    reader = _MSGPACK_READERS.get(message_type)
    if reader is None:
        return None  # unknown type: skipped, for forward compatibility
    return reader(array)


def _split_binary_frames(
    data: bytes | bytearray | memoryview, max_message_size: int | None = None
) -> tuple[list[bytes], int]:
    """Split varint-length-prefixed frames; ``RemoteProtocolError`` for a bad or big prefix.

    A frame is refused as soon as its prefix announces more than ``max_message_size`` bytes,
    before its body is buffered.
    """
    limit = MAX_FRAME if max_message_size is None else max_message_size
    try:
        return split_varint_frames(data, limit)
    except ValueError:
        raise frames_before_error(data, limit, "MessagePack hub message")[2] from None


class MessagePackHubProtocol:
    """The ``messagepack`` hub protocol: a varint length prefix, then one MessagePack array.

    Binary values travel as MessagePack ``bin`` and come back as ``bytes``; timezone-aware
    ``datetime`` values travel as the timestamp extension.

    >>> MessagePackHubProtocol().write(PingMessage())
    b'\\x02\\x91\\x06'
    """

    name: ClassVar[str] = "messagepack"
    version: ClassVar[int] = 1
    transfer_format: ClassVar[str] = "Binary"

    def write(self, message: HubMessage) -> bytes:
        """Encode ``message`` as one frame in the .NET server's layout.

        Invocation and StreamInvocation have 6 elements (an empty streamIds array when there
        are no streams), Close has 3. Raises ``LocalProtocolError`` for something that is not a
        hub message or holds values MessagePack cannot carry.
        """
        if type(message) is PingMessage:
            return _MSGPACK_PING
        writer = _MSGPACK_WRITERS.get(type(message))
        if writer is None:
            raise LocalProtocolError(
                f"cannot write {type(message).__name__}: expected a hub message "
                "(InvocationMessage, CompletionMessage, ...)"
            )
        return _msgpack_frame(writer(message))

    def write_many(self, messages: Iterable[HubMessage]) -> bytes:
        """Encode several messages into one buffer, in order."""
        return b"".join([self.write(message) for message in messages])

    def write_invocation(self, target: str, arguments: Sequence[Any]) -> bytes:
        """Encode a non-blocking Invocation of ``target`` directly (the REST send path)."""
        return _msgpack_frame([1, {}, None, target, arguments, ()])

    def parse(
        self, data: bytes | bytearray | memoryview, max_message_size: int | None = None
    ) -> tuple[list[HubMessage], int]:
        """Decode every complete frame at the start of ``data``.

        Returns ``(messages, consumed)``; ``data[consumed:]`` is an incomplete frame to keep
        for the next call. Frames of unknown message type are skipped. Raises
        ``RemoteProtocolError`` for a bad frame, and for a length prefix announcing more than
        ``max_message_size`` bytes as soon as the prefix has arrived.
        """
        bodies, consumed = _split_binary_frames(data, max_message_size)
        messages: list[HubMessage] = []
        for body in bodies:
            message = _read_msgpack_body(body)
            if message is not None:
                messages.append(message)
        return messages, consumed


# --------------------------------------------------------------------------------------------
# Protocol selection


class UnsupportedProtocolError(RemoteProtocolError, KeyError, ValueError):
    """The handshake asked for a hub protocol this side does not implement.

    A ``RemoteProtocolError``, and also a ``KeyError`` and a ``ValueError`` so that a lookup
    failure can be caught either way. ``str()`` gives the .NET server's handshake error text.
    """

    def __str__(self) -> str:
        # KeyError would quote the message; the text goes to the peer as is.
        return str(self.args[0]) if self.args else ""


_JSON_PROTOCOL: Final = JsonHubProtocol()
_MSGPACK_PROTOCOL: Final = MessagePackHubProtocol()
_PROTOCOLS: Final[dict[str, JsonHubProtocol | MessagePackHubProtocol]] = {
    "json": _JSON_PROTOCOL,
    "messagepack": _MSGPACK_PROTOCOL,
}


def get_protocol(name: str) -> JsonHubProtocol | MessagePackHubProtocol:
    """The shared, stateless protocol object for a handshake's protocol name (any case).

    Raises ``UnsupportedProtocolError`` (a ``RemoteProtocolError``, ``KeyError`` and
    ``ValueError``) whose text is the .NET reply, ready for ``write_handshake_response``:

    >>> get_protocol("MessagePack").name
    'messagepack'
    >>> get_protocol("xml")
    Traceback (most recent call last):
      ...
    relaycore.protocol._hub.UnsupportedProtocolError: The protocol 'xml' is not supported.
    """
    protocol = _PROTOCOLS.get(name.lower()) if type(name) is str else None
    if protocol is None:
        raise UnsupportedProtocolError(f"The protocol '{name}' is not supported.")
    return protocol
