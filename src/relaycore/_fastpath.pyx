# cython: language_level=3, binding=True, boundscheck=False, wraparound=False, cdivision=True
"""The Cython fast path: the hot byte work of ``_fastpath_py``, in C.

``_fastpath_py.py`` is the specification. Every function here has the same name, parameters,
defaults, return type and exception types as its twin there, and the tests hold both to the
same answers. Nothing here holds state; nothing here does I/O. Import these through
``relaycore._accel``, never directly.

Inputs are read through the buffer protocol (``bytes``, ``bytearray``, ``memoryview``; read-only
is fine). A non-contiguous memoryview is copied once, as the twin's slicing would.
``binding=True`` makes these real function objects, so ``inspect.signature`` can compare them
with the twin's.

``queue_frame`` is the one function that touches objects beyond its arguments' bytes: the
per-recipient loop of a broadcast, it appends in place to the send buffers of the connections it
is given. It still keeps no state of its own.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release
from cpython.bytearray cimport (
    PyByteArray_AS_STRING,
    PyByteArray_CheckExact,
    PyByteArray_GET_SIZE,
    PyByteArray_Resize,
)
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.dict cimport PyDict_GetItemWithError
from cpython.exc cimport PyErr_Clear, PyErr_ExceptionMatches
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memchr, memcpy


cdef extern from "Python.h":
    # Declared without an exception clause: _acquire inspects the failure itself.
    int _get_buffer "PyObject_GetBuffer" (object obj, Py_buffer *view, int flags)


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

cdef enum:
    # RFC 6455 §5.2: 7-bit lengths up to 125; 126 announces a 16-bit length, 127 a 64-bit one.
    _LEN16 = 126
    _LEN64 = 127
    # Varint prefix of the hub and service protocols: at most 5 bytes, at most 2**31 - 1.
    _VARINT_MAX_BYTES = 5
    _VARINT_MAX_VALUE = 0x7FFFFFFF
    _RECORD_SEPARATOR = 0x1E
    # _varint's answers besides a prefix length (> 0).
    _INCOMPLETE = 0
    _TOO_LONG = -1
    _TOO_BIG = -2
    # First bytes of a whole (FIN set, RSV clear) text and binary frame.
    _WHOLE_TEXT = 0x81
    _WHOLE_BINARY = 0x82

cdef long long _LLONG_MAX = 0x7FFFFFFFFFFFFFFF


cdef int _acquire(object data, Py_buffer *view) except -1:
    """Fill ``view`` with ``data``'s bytes as one contiguous block; release with PyBuffer_Release."""
    if _get_buffer(data, view, PyBUF_SIMPLE) == 0:
        return 0
    if not PyErr_ExceptionMatches(BufferError):
        return -1  # not a buffer at all: the TypeError propagates
    # A strided memoryview exports no simple buffer; the twin indexes and slices it happily.
    PyErr_Clear()
    copy = memoryview(data).tobytes()
    if _get_buffer(copy, view, PyBUF_SIMPLE) != 0:
        return -1
    return 0


cdef int _as_long_long(object value, long long *out) except -1:
    """Store the integer ``value`` in ``out``, clamped to the C range.

    Returns 1 when it was clamped (it did not fit), else 0; the twin compares Python ints, so an
    out-of-range value must give its ValueError (or None), never an OverflowError.
    """
    cdef int overflow = 0
    cdef long long v = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow > 0:
        out[0] = _LLONG_MAX
        return 1
    if overflow < 0:
        out[0] = -_LLONG_MAX - 1
        return 1
    out[0] = v
    return 0


cdef inline long long _position(object pos) except? -2:
    """``pos`` as a C integer, ``ValueError`` when negative (a huge ``pos`` is simply past the end)."""
    cdef long long p
    _as_long_long(pos, &p)
    if p < 0:
        raise ValueError(f"pos must be >= 0, got {pos}")
    return p


cdef inline int _varint(const unsigned char *buf, Py_ssize_t end, Py_ssize_t pos,
                        unsigned long long *value) noexcept nogil:
    """Decode the prefix at ``buf[pos]`` (``pos <= end``) into ``value``.

    Returns the prefix length, or _INCOMPLETE, _TOO_LONG (a sixth byte would be needed) or
    _TOO_BIG (``value`` holds the offending value).
    """
    cdef unsigned long long v = 0
    cdef unsigned char byte
    cdef int i
    for i in range(_VARINT_MAX_BYTES):
        if pos + i >= end:
            return _INCOMPLETE
        byte = buf[pos + i]
        v |= (<unsigned long long>(byte & 0x7F)) << (7 * i)
        if not byte & 0x80:
            value[0] = v
            if v > _VARINT_MAX_VALUE:
                return _TOO_BIG
            return i + 1
    return _TOO_LONG


cdef inline object _varint_error(int status, unsigned long long value):
    if status == _TOO_BIG:
        return ValueError(f"varint value {value} exceeds 2**31-1")
    return ValueError("varint prefix longer than 5 bytes")


def parse_frame_header(data, pos=0):
    """Parse the RFC 6455 §5.2 frame header that starts at ``data[pos]``.

    Returns ``None`` when the header is not complete yet, else the 5-tuple
    ``(first_byte, second_byte, mask_key_or_None, payload_length, header_length)``.
    Raises ``ValueError`` when a 64-bit length has its most significant bit set or when ``pos``
    is negative. See ``_fastpath_py.parse_frame_header``.
    """
    cdef long long p = _position(pos)
    cdef Py_buffer view
    cdef const unsigned char *b
    cdef long long avail
    cdef unsigned long long length
    cdef int n = 2
    cdef int i
    _acquire(data, &view)
    try:
        avail = <long long>view.len - p
        if avail < 2:
            return None
        b = <const unsigned char *>view.buf + p
        length = b[1] & 0x7F
        if length == _LEN16:
            if avail < 4:
                return None
            length = (<unsigned long long>b[2] << 8) | b[3]
            n = 4
        elif length == _LEN64:
            if avail < 10:
                return None
            length = 0
            for i in range(2, 10):
                length = (length << 8) | b[i]
            if length >> 63:
                raise ValueError("64-bit payload length has its most significant bit set")
            n = 10
        if b[1] & 0x80:
            if avail < n + 4:
                return None
            mask = PyBytes_FromStringAndSize(<const char *>b + n, 4)
            n += 4
        else:
            mask = None
        return b[0], b[1], mask, length, n
    finally:
        PyBuffer_Release(&view)


def encode_frame_header(opcode, length, fin=True, mask=None, rsv=0):
    """Encode an RFC 6455 §5.2 frame header for a payload of ``length`` bytes.

    ``opcode`` is 0-15, ``rsv`` the three RSV bits as a 0-7 integer, ``mask`` the 4-byte
    masking key or ``None``. Uses the shortest length form. Raises ``ValueError`` for an
    out-of-range opcode, rsv or length, or a mask that is not 4 bytes long.
    """
    cdef long long op, rs, ln
    cdef unsigned char out[14]
    cdef Py_ssize_t n
    cdef int i
    # Clamped values are out of range too, so the comparisons below cover huge integers.
    _as_long_long(opcode, &op)
    if not 0 <= op <= 0x0F:
        raise ValueError(f"opcode must be 0..15, got {opcode}")
    _as_long_long(rsv, &rs)
    if not 0 <= rs <= 7:
        raise ValueError(f"rsv must be 0..7, got {rsv}")
    # 0..2**63-1 is exactly the non-negative range of a C long long; anything clamped is out.
    if _as_long_long(length, &ln) or ln < 0:
        raise ValueError(f"length must be 0..2**63-1, got {length}")
    if mask is not None:
        if len(mask) != 4:
            raise ValueError(f"mask must be 4 bytes, got {len(mask)}")
        if not PyBytes_CheckExact(mask):
            mask = bytes(mask)
            if len(mask) != 4:
                raise ValueError(f"mask must be 4 bytes, got {len(mask)}")
    out[0] = (0x80 if fin else 0) | (rs << 4) | op
    out[1] = 0x80 if mask is not None else 0
    if ln < _LEN16:
        out[1] |= ln
        n = 2
    elif ln < 0x10000:
        out[1] |= _LEN16
        out[2] = (ln >> 8) & 0xFF
        out[3] = ln & 0xFF
        n = 4
    else:
        out[1] |= _LEN64
        for i in range(8):
            out[2 + i] = (ln >> (56 - 8 * i)) & 0xFF
        n = 10
    if mask is not None:
        memcpy(out + n, PyBytes_AS_STRING(mask), 4)
        n += 4
    return PyBytes_FromStringAndSize(<const char *>out, n)


def apply_mask(data, mask):
    """XOR ``data`` with the 4-byte ``mask`` repeated (RFC 6455 §5.3); masks and unmasks.

    Raises ``ValueError`` when ``mask`` is not 4 bytes long.
    """
    cdef Py_buffer view
    cdef const unsigned char *src
    cdef unsigned char *dst
    cdef const unsigned char *key
    cdef Py_ssize_t n, i
    cdef uint32_t key32
    cdef uint64_t key64, word
    if len(mask) != 4:
        raise ValueError(f"mask must be 4 bytes, got {len(mask)}")
    _acquire(data, &view)
    try:
        n = view.len
        if n == 0:
            return b""
        if not PyBytes_CheckExact(mask):
            mask = bytes(mask)
            if len(mask) != 4:
                raise ValueError(f"mask must be 4 bytes, got {len(mask)}")
        key = <const unsigned char *>PyBytes_AS_STRING(mask)
        out = PyBytes_FromStringAndSize(NULL, n)
        dst = <unsigned char *>PyBytes_AS_STRING(out)
        src = <const unsigned char *>view.buf
        # The key repeated twice in memory order; memcpy keeps the loads and stores
        # alignment-safe and endian-neutral, and compiles to plain 64-bit moves. The GIL stays
        # held: releasing it costs about as much as masking 16 bytes, and 64 KB takes ~2 us.
        memcpy(&key32, key, 4)
        key64 = (<uint64_t>key32 << 32) | key32
        i = 0
        while i + 8 <= n:
            memcpy(&word, src + i, 8)
            word ^= key64
            memcpy(dst + i, &word, 8)
            i += 8
        # 8 is a multiple of 4, so the tail starts at key phase 0.
        while i < n:
            dst[i] = src[i] ^ key[i & 3]
            i += 1
        return out
    finally:
        PyBuffer_Release(&view)


def unmask_messages(data, limit, text=True):
    """The payloads of a client's read when it holds nothing but whole data messages.

    ``None`` for anything else, judging nothing: see ``_fastpath_py.unmask_messages``. The
    unmasking loop also ORs the payload's bytes together, so an all-ASCII text payload (the
    JSON hub protocol's usual one) is known valid UTF-8 without decoding it; any other text
    payload is judged by CPython's own strict decoder.
    """
    cdef Py_buffer view
    cdef const unsigned char *buf
    cdef const unsigned char *src
    cdef const unsigned char *key
    cdef unsigned char *dst
    cdef Py_ssize_t end, pos = 0, head, i, k
    cdef unsigned long long length
    cdef long long lim
    cdef unsigned char b0, b1
    cdef uint32_t key32
    cdef uint64_t key64, word, seen
    cdef bint allow_text = text
    cdef list payloads
    # Clamped is fine: a clamped limit answers the same for every length a buffer can hold.
    _as_long_long(limit, &lim)
    _acquire(data, &view)
    try:
        buf = <const unsigned char *>view.buf
        end = view.len
        if end == 0:
            return None
        payloads = []
        while pos < end:
            if end - pos < 2:
                return None
            b0 = buf[pos]
            b1 = buf[pos + 1]
            if b0 != _WHOLE_BINARY and (b0 != _WHOLE_TEXT or not allow_text):
                return None
            if not b1 & 0x80:
                return None
            length = b1 & 0x7F
            head = 2
            if length == _LEN16:
                if end - pos < 4:
                    return None
                length = (<unsigned long long>buf[pos + 2] << 8) | buf[pos + 3]
                head = 4
            elif length == _LEN64:
                if end - pos < 10:
                    return None
                length = 0
                for k in range(8):
                    length = (length << 8) | buf[pos + 2 + k]
                if length >> 63:
                    return None
                head = 10
            if end - pos < head + 4:
                return None
            key = buf + pos + head
            head += 4
            if lim < 0 or length > <unsigned long long>lim:
                return None
            if length > <unsigned long long>(end - pos - head):
                return None
            out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>length)
            dst = <unsigned char *>PyBytes_AS_STRING(out)
            src = buf + pos + head
            memcpy(&key32, key, 4)
            key64 = (<uint64_t>key32 << 32) | key32
            seen = 0
            i = 0
            while i + 8 <= <Py_ssize_t>length:
                memcpy(&word, src + i, 8)
                word ^= key64
                seen |= word
                memcpy(dst + i, &word, 8)
                i += 8
            while i < <Py_ssize_t>length:
                dst[i] = src[i] ^ key[i & 3]
                seen |= dst[i]
                i += 1
            if b0 == _WHOLE_TEXT and seen & 0x8080808080808080ULL:
                try:
                    PyUnicode_DecodeUTF8(<const char *>dst, <Py_ssize_t>length, "strict")
                except UnicodeDecodeError:
                    return None
            payloads.append(out)
            pos += head + <Py_ssize_t>length
        return payloads
    finally:
        PyBuffer_Release(&view)


def encode_varint(value):
    """Encode a length prefix: 7 bits per byte, least significant group first, 0x80 = more.

    Raises ``ValueError`` unless ``0 <= value <= 2**31 - 1``.
    """
    cdef long long v
    cdef unsigned char out[_VARINT_MAX_BYTES]
    cdef Py_ssize_t n = 0
    _as_long_long(value, &v)
    if not 0 <= v <= _VARINT_MAX_VALUE:
        raise ValueError(f"varint value must be 0..2**31-1, got {value}")
    while v >= 0x80:
        out[n] = (v & 0x7F) | 0x80
        v >>= 7
        n += 1
    out[n] = v
    return PyBytes_FromStringAndSize(<const char *>out, n + 1)


def decode_varint(data, pos=0):
    """Decode the length prefix at ``data[pos]``: ``(value, prefix_length)``, or ``None`` if
    the prefix is not complete yet.

    Raises ``ValueError`` when the prefix runs past 5 bytes or the value exceeds 2**31 - 1.
    """
    cdef long long p = _position(pos)
    cdef Py_buffer view
    cdef unsigned long long value = 0
    cdef int status
    _acquire(data, &view)
    try:
        if p >= view.len:
            return None
        status = _varint(<const unsigned char *>view.buf, view.len, <Py_ssize_t>p, &value)
        if status > 0:
            return value, status
        if status == _INCOMPLETE:
            return None
        raise _varint_error(status, value)
    finally:
        PyBuffer_Release(&view)


def split_records(data):
    """Split JSON hub-protocol text on the 0x1E record separator.

    Returns ``(records, consumed)``: every complete record without its separator, and how many
    bytes of ``data`` they used (separators included).
    """
    cdef Py_buffer view
    cdef const char *buf
    cdef const char *hit
    cdef Py_ssize_t start = 0, end
    cdef list records = []
    _acquire(data, &view)
    try:
        buf = <const char *>view.buf
        end = view.len
        while start < end:
            hit = <const char *>memchr(buf + start, _RECORD_SEPARATOR, end - start)
            if hit == NULL:
                break
            records.append(PyBytes_FromStringAndSize(buf + start, hit - (buf + start)))
            start = hit - buf + 1
        return records, start
    finally:
        PyBuffer_Release(&view)


def split_varint_frames(data, max_size=0x7FFFFFFF):
    """Split a stream of varint-length-prefixed bodies (MessagePack hub protocol, service
    protocol).

    Returns ``(bodies, consumed)``: every complete body without its prefix, and how many bytes
    of ``data`` they used. Raises ``ValueError`` for a bad prefix or a body longer than
    ``max_size``.
    """
    cdef Py_buffer view
    cdef const unsigned char *buf
    cdef Py_ssize_t pos = 0, end
    cdef unsigned long long size = 0
    cdef long long limit
    cdef int n
    cdef list bodies = []
    _as_long_long(max_size, &limit)
    _acquire(data, &view)
    try:
        buf = <const unsigned char *>view.buf
        end = view.len
        while pos < end:
            n = _varint(buf, end, pos, &size)
            if n == _INCOMPLETE:
                break
            if n < 0:
                raise _varint_error(n, size)
            if limit < 0 or size > <unsigned long long>limit:
                raise ValueError(f"frame of {size} bytes exceeds the limit of {max_size}")
            if <unsigned long long>(end - pos - n) < size:
                break
            bodies.append(PyBytes_FromStringAndSize(<const char *>buf + pos + n, size))
            pos += n + size
        return bodies, pos
    finally:
        PyBuffer_Release(&view)


def queue_frame(targets, frames, open_state, limit, dirty):
    """Append a shared frame to the send buffer of every open target connection.

    ``targets`` is any iterable of connections with ``state``, ``wire_format`` and ``_out``
    (exactly a ``bytearray``); ``frames`` maps a wire format to its frame (``bytes``) or
    ``None``. A connection is served when its ``state`` *is* ``open_state`` and its format has a
    frame; one whose buffer would grow past ``limit`` is collected in ``over`` instead, and one
    whose buffer was empty is appended to ``dirty``. Returns ``(count, over)``. Raises
    ``TypeError`` for a ``frames`` that is not a ``dict``, a ``dirty`` that is not a ``list``, a
    non-integer ``limit``, a frame that is not ``bytes`` or an ``_out`` that is not a
    ``bytearray``. See ``_fastpath_py.queue_frame``.
    """
    cdef long long lim
    cdef Py_ssize_t count = 0, size, n
    cdef PyObject *found
    cdef list over = []
    cdef object conn, name, data, out
    if not isinstance(frames, dict):
        raise TypeError(f"frames must be a dict, got {type(frames).__name__}")
    if not isinstance(dirty, list):
        raise TypeError(f"dirty must be a list, got {type(dirty).__name__}")
    # Clamped is fine: no buffer is near 2**63 bytes, so a clamped limit answers the same.
    _as_long_long(limit, &lim)
    # Cython indexes a list or tuple directly and falls back to the iterator protocol for the
    # rest (a dict's values, a generator). The three attributes are plain getattrs (with
    # interned names), so slots, an instance __dict__, properties and __getattr__ all work as
    # in the twin. The loop allocates nothing per connection: the buffer grows in place
    # (amortised, as ``+=`` does).
    for conn in targets:
        if conn.state is not open_state:
            continue
        name = conn.wire_format
        # Borrowed, and held as ``data`` before any other Python code can run.
        found = PyDict_GetItemWithError(frames, name)
        if found == NULL:
            continue
        data = <object>found
        if data is None:
            continue
        if not PyBytes_CheckExact(data):
            raise TypeError(f"frames[{name!r}] must be bytes or None, got {type(data).__name__}")
        out = conn._out
        if not PyByteArray_CheckExact(out):
            raise TypeError(f"a connection's _out must be a bytearray, got {type(out).__name__}")
        size = PyByteArray_GET_SIZE(out)
        n = PyBytes_GET_SIZE(data)
        if size + n > lim:
            over.append(conn)
            continue
        if size == 0:
            (<list>dirty).append(conn)
        # Raises BufferError while a memoryview of the buffer is alive, as ``+=`` does.
        PyByteArray_Resize(out, size + n)
        memcpy(PyByteArray_AS_STRING(out) + size, PyBytes_AS_STRING(data), n)
        count += 1
    return count, over
