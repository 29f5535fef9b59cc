"""The server connection's byte stream cut into service messages, and the hot path of client
data to an app server (``protocol/service-protocol.md`` §1, §5).

The socket is a byte stream: a frame is a varint length prefix and a body of that many bytes,
and frames are not aligned with WebSocket messages. ``ServiceProtocolParser`` buffers the
stream and hands out whole messages; the relay's own parser may hand plain ConnectionData and
UserData out raw, as tuples, without building a message object for each.
"""

from __future__ import annotations

from typing import Any, Final

import msgpack  # type: ignore[import-untyped]

from ..._accel import encode_varint, split_varint_frames
from .._errors import LocalProtocolError, RemoteProtocolError
from .._wire import MAX_FRAME, frames_before_error
from ._codec import _unpack, parse_message_body
from ._messages import ServiceMessage, ServiceMessageType

__all__ = [
    "DEFAULT_MAX_SERVICE_MESSAGE_SIZE",
    "ServiceProtocolParser",
    "connection_data_prefix",
    "write_connection_data",
]

#: Default limit on one service message body; a prefix announcing more is refused at once.
DEFAULT_MAX_SERVICE_MESSAGE_SIZE: Final = 16 * 1024 * 1024


def connection_data_prefix(connection_id: str) -> bytes:
    """The bytes every ``ConnectionData`` frame of one connection starts its body with (the
    array header, the type and the connection id), for ``write_connection_data``."""
    packed: bytes = msgpack.packb(connection_id)
    return b"\x94\x06" + packed


def write_connection_data(prefix: bytes, payload: bytes) -> bytes:
    """``write_message(ConnectionDataMessage(connection_id, payload))`` without building the
    message: ``prefix`` is ``connection_data_prefix(connection_id)``. The hot path of every
    client message that goes to an app server.

    >>> prefix = connection_data_prefix("c1")
    >>> write_connection_data(prefix, b"{}\x1e") == write_message(
    ...     ConnectionDataMessage("c1", b"{}\x1e"))
    True
    """
    size = len(payload)
    if size < 0x100:
        head = b"\xc4" + size.to_bytes(1, "big")
    elif size < 0x10000:
        head = b"\xc5" + size.to_bytes(2, "big")
    else:
        head = b"\xc6" + size.to_bytes(4, "big")
    length = len(prefix) + len(head) + size + 1
    if length > MAX_FRAME:
        raise LocalProtocolError(
            f"ConnectionDataMessage of {length} bytes exceeds the service protocol's "
            f"limit of {MAX_FRAME} bytes"
        )
    return b"".join((encode_varint(length), prefix, head, payload, b"\x80"))


#: The first byte of a 3- or 4-element array: how a ConnectionData body (then 0x06) or a
#: UserData body (then 0x08) starts.
_DATA_HEADS: Final = (b"\x93", b"\x94")
#: The payload map keys a raw UserData may carry (the SDK's lower-case protocol names).
_RAW_PROTOCOLS: Final = frozenset(("json", "messagepack"))

#: What a parser made with ``raw_connection_data`` or ``raw_user_data`` hands out besides
#: messages: ``(connection_id, payload)`` for ConnectionData, ``(8, user_id, payloads)`` for
#: UserData.
RawItem = tuple[str, bytes] | tuple[int, str, dict[str, bytes]]


def _plain(array: tuple[Any, ...]) -> bool:
    """Whether a data message's array has no ``ext`` hints (3 elements, or an empty map)."""
    return len(array) == 3 or (len(array) == 4 and array[3] == {})


def _plain_payloads(value: Any) -> bool:
    """Whether a payload map is what the SDK sends: lower-case protocol names to bin."""
    if type(value) is not dict or not value:
        return False
    for key, payload in value.items():
        if key not in _RAW_PROTOCOLS or type(payload) is not bytes:
            return False
    return True


class ServiceProtocolParser:
    """Turns the bytes of a server connection into service messages.

    The socket is a byte stream (§1): feed whatever arrived with ``receive_data``, in any
    pieces, then take the complete messages with ``messages_received``. Messages of unknown type
    are dropped. A bad length prefix, a body over ``max_message_size`` (refused as soon as its
    prefix arrives, before the body is buffered) or a malformed body raises
    ``RemoteProtocolError``; the messages before the bad frame are still handed out, and every
    later call raises the same error again.

    >>> parser = ServiceProtocolParser()
    >>> frame = write_message(ServicePing())
    >>> parser.receive_data(frame + frame[:1])
    >>> parser.messages_received()
    [ServicePing(values=())]
    >>> parser.receive_data(frame[1:])
    >>> parser.messages_received()
    [ServicePing(values=())]
    """

    __slots__ = ("_buffer", "_error", "_max_message_size", "_messages", "_raw_data",
                 "_raw_user")

    def __init__(
        self,
        max_message_size: int = DEFAULT_MAX_SERVICE_MESSAGE_SIZE,
        *,
        raw_connection_data: bool = False,
        raw_user_data: bool = False,
    ) -> None:
        """``raw_connection_data``: hand out each plain ``ConnectionData`` (no ``ext`` hints)
        as a ``(connection_id, payload)`` tuple instead of a ``ConnectionDataMessage``, in
        its place among the other messages: the relay's hot path, where most messages are
        client data and building a frozen message object for each one is measurable.
        ``raw_user_data``: likewise each plain ``UserData`` whose payload map holds only
        ``json`` and ``messagepack`` bins, as ``(ServiceMessageType.USER_DATA, user_id,
        payloads)`` (what an app server's ``Clients.User(id)`` sends). Anything else, or
        anything malformed, goes through the full reader and its errors."""
        if not 0 < max_message_size <= MAX_FRAME:
            raise ValueError(f"max_message_size must be 1..2**31-1, got {max_message_size}")
        self._raw_data = raw_connection_data
        self._raw_user = raw_user_data
        self._max_message_size = max_message_size
        self._buffer = bytearray()
        self._messages: list[ServiceMessage | RawItem] = []
        self._error: RemoteProtocolError | None = None

    @property
    def max_message_size(self) -> int:
        """The largest body accepted, in bytes."""
        return self._max_message_size

    @property
    def buffered(self) -> int:
        """How many bytes of an incomplete frame are waiting for the rest."""
        return len(self._buffer)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes received on the server connection."""
        if self._error is not None:
            raise self._error
        if not data:
            return
        if self._buffer:
            self._buffer += data
            stream: bytes | bytearray | memoryview = self._buffer
        else:
            stream = data  # the common case: whole frames, parsed without a copy into the buffer
        try:
            bodies, consumed = split_varint_frames(stream, self._max_message_size)
        except ValueError:
            bodies, consumed, self._error = frames_before_error(
                stream, self._max_message_size, "service message"
            )
        try:
            raw_data, raw_user = self._raw_data, self._raw_user
            for body in bodies:
                if (raw_data or raw_user) and body[:1] in _DATA_HEADS:
                    kind = body[1:2]
                    if raw_data and kind == b"\x06":
                        array = _unpack(body)
                        if _plain(array) and type(array[1]) is str and type(array[2]) is bytes:
                            self._messages.append((array[1], array[2]))
                            continue
                    elif raw_user and kind == b"\x08":
                        array = _unpack(body)
                        if _plain(array) and type(array[1]) is str and _plain_payloads(array[2]):
                            self._messages.append(
                                (ServiceMessageType.USER_DATA, array[1], array[2])
                            )
                            continue
                message = parse_message_body(body)
                if message is not None:
                    self._messages.append(message)
        except RemoteProtocolError as exc:
            self._error = exc
        if self._error is not None:
            self._buffer = bytearray()
            raise self._error
        if stream is self._buffer:
            del self._buffer[:consumed]
        elif consumed < len(data):
            self._buffer = bytearray(data[consumed:])

    def receive_eof(self) -> None:
        """The connection ended; raises ``RemoteProtocolError`` if it ended inside a frame."""
        if self._buffer:
            size = len(self._buffer)
            self._buffer = bytearray()
            raise RemoteProtocolError(
                f"server connection ended inside a service message ({size} bytes of an "
                "incomplete frame)"
            )

    def messages_received(self) -> list[ServiceMessage]:
        """The messages completed since the last call, in order; the list is handed over.
        A parser made with ``raw_connection_data`` or ``raw_user_data`` hands out with
        ``items_received``."""
        if self._raw_data or self._raw_user:
            raise TypeError("this parser hands out raw data messages: call items_received()")
        messages = self._messages
        self._messages = []
        return messages  # type: ignore[return-value]  # no tuples without raw_connection_data

    def items_received(self) -> list[ServiceMessage | RawItem]:
        """As ``messages_received``, with plain ``ConnectionData`` as ``(connection_id,
        payload)`` tuples when the parser was made with ``raw_connection_data``, and plain
        ``UserData`` as ``(ServiceMessageType.USER_DATA, user_id, payloads)`` with
        ``raw_user_data``."""
        messages = self._messages
        self._messages = []
        return messages
