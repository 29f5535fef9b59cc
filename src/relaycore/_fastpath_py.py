"""The pure-Python twin of ``_fastpath.pyx``: the readable specification of the hot byte work.

Every public function here has a twin of the same name, signature, return type and exceptions
in the Cython extension. Nothing here holds state; nothing here does I/O. Import these through
``relaycore._accel``, which picks the extension when it is loaded.

Inputs may be ``bytes``, ``bytearray`` or ``memoryview``; outputs are always ``bytes`` (or
tuples of ints and bytes). The one exception is ``queue_frame``, the per-recipient loop of a
broadcast: it appends to the send buffers of the connection objects it is given (it keeps no
state of its own either).
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Protocol, TypeVar

    class _Connection(Protocol):
        """What ``queue_frame`` reads of a connection (the relay's have ``__slots__``)."""

        @property
        def state(self) -> object: ...
        @property
        def wire_format(self) -> str: ...
        @property
        def _out(self) -> bytearray: ...

    _C = TypeVar("_C", bound=_Connection)

__all__ = [
    "parse_frame_header",
    "encode_frame_header",
    "apply_mask",
    "unmask_messages",
    "encode_varint",
    "decode_varint",
    "split_records",
    "split_varint_frames",
    "queue_frame",
]

#: RFC 6455 §5.2: 7-bit lengths up to 125; 126 announces a 16-bit length, 127 a 64-bit one.
_LEN16 = 126
_LEN64 = 127
#: Varint prefix of the hub and service protocols: at most 5 bytes, at most 2**31 - 1.
_VARINT_MAX_BYTES = 5
_VARINT_MAX_VALUE = 0x7FFFFFFF
_RECORD_SEPARATOR = 0x1E


def parse_frame_header(
    data: bytes | bytearray | memoryview, pos: int = 0
) -> tuple[int, int, bytes | None, int, int] | None:
    """Parse the RFC 6455 §5.2 frame header that starts at ``data[pos]``.

    Returns ``None`` when the header is not complete yet, else the 5-tuple
    ``(first_byte, second_byte, mask_key_or_None, payload_length, header_length)``:

    * ``first_byte`` holds FIN (0x80), RSV1-3 (0x70) and the opcode (0x0F);
    * ``second_byte`` is the raw second byte (MASK bit 0x80 and the 7-bit length);
    * ``mask_key`` is the 4-byte masking key, or ``None`` when the frame is not masked;
    * ``payload_length`` is the decoded length; ``header_length`` is how many bytes the header
      took, so the payload starts at ``pos + header_length``.

    Raises ``ValueError`` when a 64-bit length has its most significant bit set (§5.2 forbids
    it) or when ``pos`` is negative.
    """
    if pos < 0:
        raise ValueError(f"pos must be >= 0, got {pos}")
    end = len(data)
    if end - pos < 2:
        return None
    b0 = data[pos]
    b1 = data[pos + 1]
    length = b1 & 0x7F
    n = 2
    if length == _LEN16:
        if end - pos < 4:
            return None
        length = (data[pos + 2] << 8) | data[pos + 3]
        n = 4
    elif length == _LEN64:
        if end - pos < 10:
            return None
        length = int.from_bytes(bytes(data[pos + 2 : pos + 10]), "big")
        if length >> 63:
            raise ValueError("64-bit payload length has its most significant bit set")
        n = 10
    mask: bytes | None = None
    if b1 & 0x80:
        if end - pos < n + 4:
            return None
        mask = bytes(data[pos + n : pos + n + 4])
        n += 4
    return b0, b1, mask, length, n


def encode_frame_header(
    opcode: int, length: int, fin: bool = True, mask: bytes | None = None, rsv: int = 0
) -> bytes:
    """Encode an RFC 6455 §5.2 frame header for a payload of ``length`` bytes.

    ``opcode`` is 0-15, ``rsv`` the three RSV bits as a 0-7 integer, ``mask`` the 4-byte
    masking key (client frames) or ``None`` (server frames). Uses the shortest length form.
    Raises ``ValueError`` for an out-of-range opcode, rsv or length, or a mask that is not 4
    bytes long.
    """
    if not 0 <= opcode <= 0x0F:
        raise ValueError(f"opcode must be 0..15, got {opcode}")
    if not 0 <= rsv <= 7:
        raise ValueError(f"rsv must be 0..7, got {rsv}")
    if not 0 <= length < (1 << 63):
        raise ValueError(f"length must be 0..2**63-1, got {length}")
    if mask is not None and len(mask) != 4:
        raise ValueError(f"mask must be 4 bytes, got {len(mask)}")
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    mbit = 0x80 if mask is not None else 0
    if length < _LEN16:
        head = bytes((b0, mbit | length))
    elif length < 0x10000:
        head = bytes((b0, mbit | _LEN16)) + length.to_bytes(2, "big")
    else:
        head = bytes((b0, mbit | _LEN64)) + length.to_bytes(8, "big")
    if mask is not None:
        head += bytes(mask)
    return head


def apply_mask(data: bytes | bytearray | memoryview, mask: bytes) -> bytes:
    """XOR ``data`` with the 4-byte ``mask`` repeated (RFC 6455 §5.3); masks and unmasks.

    Raises ``ValueError`` when ``mask`` is not 4 bytes long.
    """
    if len(mask) != 4:
        raise ValueError(f"mask must be 4 bytes, got {len(mask)}")
    n = len(data)
    if n == 0:
        return b""
    # Whole-buffer XOR through big integers: the mask repeated to the data's length.
    key = (bytes(mask) * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


#: First bytes of a whole (FIN set, RSV clear) text and binary frame.
_WHOLE_TEXT = 0x81
_WHOLE_BINARY = 0x82


def unmask_messages(
    data: bytes | bytearray | memoryview, limit: int, text: bool = True
) -> list[bytes] | None:
    """The payloads of a client's read when it holds nothing but whole data messages.

    The common read of a server is one or more complete frames, each a message of its own: FIN
    set, RSV1-3 clear, masked, binary (0x2) or, when ``text`` is true, text (0x1) holding valid
    UTF-8, with at most ``limit`` bytes of payload. For such ``data`` this returns the unmasked
    payloads in order (text as its UTF-8 bytes). For anything else (empty ``data``, a control or
    continuation frame, a frame cut short, an unmasked frame, a message over ``limit``, invalid
    UTF-8, a 64-bit length with its top bit set) it returns ``None`` and judges nothing: the
    caller hands the same bytes to the full parser, which reports what is wrong.
    """
    end = len(data)
    if not end:
        return None
    pos = 0
    payloads = []
    while pos < end:
        try:
            header = parse_frame_header(data, pos)
        except ValueError:
            return None
        if header is None:
            return None
        b0, _, mask, length, n = header
        if b0 != _WHOLE_BINARY and (b0 != _WHOLE_TEXT or not text):
            return None
        if mask is None or length > limit:
            return None
        start = pos + n
        stop = start + length
        if stop > end:
            return None
        payload = apply_mask(data[start:stop], mask)
        if b0 == _WHOLE_TEXT:
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                return None
        payloads.append(payload)
        pos = stop
    return payloads


def encode_varint(value: int) -> bytes:
    """Encode a length prefix: 7 bits per byte, least significant group first, 0x80 = more.

    Raises ``ValueError`` unless ``0 <= value <= 2**31 - 1``.
    """
    if not 0 <= value <= _VARINT_MAX_VALUE:
        raise ValueError(f"varint value must be 0..2**31-1, got {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(data: bytes | bytearray | memoryview, pos: int = 0) -> tuple[int, int] | None:
    """Decode the length prefix at ``data[pos]``: ``(value, prefix_length)``, or ``None`` if
    the prefix is not complete yet.

    Raises ``ValueError`` when the prefix runs past 5 bytes or the value exceeds 2**31 - 1.
    """
    if pos < 0:
        raise ValueError(f"pos must be >= 0, got {pos}")
    value = 0
    end = len(data)
    for i in range(_VARINT_MAX_BYTES):
        if pos + i >= end:
            return None
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if value > _VARINT_MAX_VALUE:
                raise ValueError(f"varint value {value} exceeds 2**31-1")
            return value, i + 1
    raise ValueError("varint prefix longer than 5 bytes")


def split_records(data: bytes | bytearray | memoryview) -> tuple[list[bytes], int]:
    """Split JSON hub-protocol text on the 0x1E record separator.

    Returns ``(records, consumed)``: every complete record without its separator, and how many
    bytes of ``data`` they used (separators included). Bytes after the last separator are an
    incomplete record for the caller to keep.
    """
    buf = bytes(data)
    records: list[bytes] = []
    start = 0
    while True:
        end = buf.find(_RECORD_SEPARATOR, start)
        if end < 0:
            return records, start
        records.append(buf[start:end])
        start = end + 1


def split_varint_frames(
    data: bytes | bytearray | memoryview, max_size: int = _VARINT_MAX_VALUE
) -> tuple[list[bytes], int]:
    """Split a stream of varint-length-prefixed bodies (MessagePack hub protocol, service
    protocol).

    Returns ``(bodies, consumed)``: every complete body without its prefix, and how many bytes
    of ``data`` they used. Raises ``ValueError`` for a bad prefix or a body longer than
    ``max_size``.
    """
    bodies: list[bytes] = []
    pos = 0
    end = len(data)
    while pos < end:
        got = decode_varint(data, pos)
        if got is None:
            break
        size, n = got
        if size > max_size:
            raise ValueError(f"frame of {size} bytes exceeds the limit of {max_size}")
        if end - pos - n < size:
            break
        bodies.append(bytes(data[pos + n : pos + n + size]))
        pos += n + size
    return bodies, pos


def queue_frame(
    targets: Iterable[_C],
    frames: dict[str, bytes | None],
    open_state: object,
    limit: int,
    dirty: list[_C],
) -> tuple[int, list[_C]]:
    """Append a shared frame to the send buffer of every open target connection.

    ``targets`` is any iterable of connections; each has ``state``, ``wire_format`` (a
    ``str``) and ``_out`` (its send buffer, exactly a ``bytearray``). ``frames`` maps a wire
    format (a hub protocol as one transport frames it) to the complete frame for connections of
    that format (``bytes``) or ``None``. A connection is served when its ``state`` *is*
    ``open_state`` and ``frames`` has a frame for its format; the others are skipped silently.

    A connection whose ``len(_out) + len(frame)`` would exceed ``limit`` is left alone and
    collected in ``over``. Otherwise the frame is appended to ``_out`` in place (the buffer stays
    the same object), and a connection whose buffer was empty is appended to ``dirty`` (the
    relay's list of connections to flush).

    Returns ``(count, over)``: how many buffers got the frame, and the connections skipped for
    the limit, in iteration order. Raises ``TypeError`` when ``frames`` is not a ``dict``,
    ``dirty`` not a ``list``, ``limit`` not an integer, or when a served connection's frame is
    not ``bytes`` or its ``_out`` not a ``bytearray`` (buffers appended to before that keep the
    frame).
    """
    if not isinstance(frames, dict):
        raise TypeError(f"frames must be a dict, got {type(frames).__name__}")
    if not isinstance(dirty, list):
        raise TypeError(f"dirty must be a list, got {type(dirty).__name__}")
    limit = operator.index(limit)
    count = 0
    over: list[_C] = []
    for conn in targets:
        if conn.state is not open_state:
            continue
        # dict's and list's own methods, as in the extension: a subclass's overrides (get,
        # __missing__, append) are not consulted.
        name = conn.wire_format
        data = dict.get(frames, name)
        if data is None:
            continue
        if type(data) is not bytes:
            raise TypeError(f"frames[{name!r}] must be bytes or None, got {type(data).__name__}")
        out = conn._out
        if type(out) is not bytearray:
            raise TypeError(f"a connection's _out must be a bytearray, got {type(out).__name__}")
        if len(out) + len(data) > limit:
            over.append(conn)
            continue
        if not out:
            list.append(dirty, conn)
        out += data
        count += 1
    return count, over
