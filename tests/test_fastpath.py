"""Example tables for the fast path, run on the pure-Python twin (``py``) and the extension (``c``).

The ``fastpath`` fixture hands each test the module itself, so the ``c`` runs exercise the
extension even when ``RELAYCORE_NO_EXTENSIONS=1`` makes ``relaycore._accel`` pick the twin.
"""

from __future__ import annotations

import collections
import importlib
import inspect
import os
import types
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest

import relaycore._accel
import relaycore._fastpath_py

REQUIRE_EXTENSIONS = os.environ.get("RELAYCORE_REQUIRE_EXTENSIONS", "") not in ("", "0")
NO_EXTENSIONS = os.environ.get("RELAYCORE_NO_EXTENSIONS", "") not in ("", "0")


def load_extension() -> ModuleType:
    """The compiled module; skip (or fail, under RELAYCORE_REQUIRE_EXTENSIONS=1) if not built."""
    try:
        return importlib.import_module("relaycore._fastpath")
    except ImportError as exc:
        reason = (
            f"relaycore._fastpath is not built ({exc}); build it with "
            "RELAYCORE_BUILD_EXTENSION=yes pip install -e . --no-build-isolation"
        )
        if REQUIRE_EXTENSIONS:
            pytest.fail(f"RELAYCORE_REQUIRE_EXTENSIONS=1 but {reason}")
        pytest.skip(reason)


@pytest.fixture(params=["py", "c"])
def fastpath(request: pytest.FixtureRequest) -> ModuleType:
    if request.param == "py":
        return relaycore._fastpath_py
    return load_extension()


def buffers(data: bytes) -> list[Any]:
    """``data`` as every input type the fast path accepts."""
    return [data, bytearray(data), memoryview(data), memoryview(bytearray(data))]


# RFC 6455 §5.7 examples.
HELLO = b"Hello"
MASK_KEY = bytes([0x37, 0xFA, 0x21, 0x3D])
HELLO_UNMASKED = bytes([0x81, 0x05]) + HELLO
HELLO_MASKED = bytes([0x81, 0x85, 0x37, 0xFA, 0x21, 0x3D, 0x7F, 0x9F, 0x4D, 0x51, 0x58])
HEL_FRAGMENT = bytes([0x01, 0x03, 0x48, 0x65, 0x6C])
LO_FRAGMENT = bytes([0x80, 0x02, 0x6C, 0x6F])
PING_UNMASKED = bytes([0x89, 0x05]) + HELLO
PONG_MASKED = bytes([0x8A, 0x85, 0x37, 0xFA, 0x21, 0x3D, 0x7F, 0x9F, 0x4D, 0x51, 0x58])
BINARY_256_HEADER = bytes([0x82, 0x7E, 0x01, 0x00])
BINARY_64K_HEADER = bytes([0x82, 0x7F, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00])

RFC_FRAMES = [
    # (wire, parsed header, payload as sent)
    pytest.param(HELLO_UNMASKED, (0x81, 0x05, None, 5, 2), HELLO, id="hello-unmasked"),
    pytest.param(HELLO_MASKED, (0x81, 0x85, MASK_KEY, 5, 6), HELLO_MASKED[6:], id="hello-masked"),
    pytest.param(HEL_FRAGMENT, (0x01, 0x03, None, 3, 2), b"Hel", id="fragment-1"),
    pytest.param(LO_FRAGMENT, (0x80, 0x02, None, 2, 2), b"lo", id="fragment-2"),
    pytest.param(PING_UNMASKED, (0x89, 0x05, None, 5, 2), HELLO, id="ping-unmasked"),
    pytest.param(PONG_MASKED, (0x8A, 0x85, MASK_KEY, 5, 6), PONG_MASKED[6:], id="pong-masked"),
    pytest.param(
        BINARY_256_HEADER + bytes(256), (0x82, 0x7E, None, 256, 4), bytes(256), id="binary-256"
    ),
    pytest.param(
        BINARY_64K_HEADER + bytes(65536),
        (0x82, 0x7F, None, 65536, 10),
        bytes(65536),
        id="binary-64k",
    ),
]


@pytest.mark.parametrize(("wire", "header", "payload"), RFC_FRAMES)
def test_parse_frame_header_rfc6455_examples_parse(
    fastpath: ModuleType, wire: bytes, header: tuple[Any, ...], payload: bytes
) -> None:
    for data in buffers(wire):
        got = fastpath.parse_frame_header(data)
        assert got == header
        assert got[2] is None or type(got[2]) is bytes
        assert data[got[4] :] == payload


@pytest.mark.parametrize(("wire", "header", "payload"), RFC_FRAMES)
def test_encode_frame_header_rfc6455_examples_round_trip(
    fastpath: ModuleType, wire: bytes, header: tuple[Any, ...], payload: bytes
) -> None:
    b0, _, mask, length, header_length = header
    encoded = fastpath.encode_frame_header(
        b0 & 0x0F, length, fin=bool(b0 & 0x80), mask=mask, rsv=(b0 >> 4) & 7
    )
    assert type(encoded) is bytes
    assert encoded == wire[:header_length]


def test_apply_mask_rfc6455_hello_masks_and_unmasks(fastpath: ModuleType) -> None:
    for data in buffers(HELLO):
        masked = fastpath.apply_mask(data, MASK_KEY)
        assert type(masked) is bytes
        assert masked == HELLO_MASKED[6:]
    for key in buffers(MASK_KEY):
        assert fastpath.apply_mask(HELLO_MASKED[6:], key) == HELLO


def test_parse_frame_header_at_offset_reads_from_pos(fastpath: ModuleType) -> None:
    stream = HEL_FRAGMENT + LO_FRAGMENT
    assert fastpath.parse_frame_header(stream, len(HEL_FRAGMENT)) == (0x80, 0x02, None, 2, 2)
    assert fastpath.parse_frame_header(stream, len(stream)) is None
    assert fastpath.parse_frame_header(stream, len(stream) + 100) is None
    assert fastpath.parse_frame_header(stream, 2**80) is None


@pytest.mark.parametrize(
    "length",
    [*range(10), 125, 126, 127, 128, 65535, 65536, 2**32, 2**63 - 1],
)
@pytest.mark.parametrize("mask", [None, MASK_KEY])
def test_encode_frame_header_length_edges_use_shortest_form(
    fastpath: ModuleType, length: int, mask: bytes | None
) -> None:
    header = fastpath.encode_frame_header(0x2, length, mask=mask)
    expected_length = (2 if length < 126 else 4 if length < 65536 else 10) + (4 if mask else 0)
    assert len(header) == expected_length
    for data in buffers(header):
        assert fastpath.parse_frame_header(data) == (
            0x82,
            (0x80 if mask else 0) | (length if length < 126 else 126 if length < 65536 else 127),
            mask,
            length,
            expected_length,
        )


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536])
@pytest.mark.parametrize("mask", [None, MASK_KEY])
def test_parse_frame_header_truncated_at_every_offset_returns_none(
    fastpath: ModuleType, length: int, mask: bytes | None
) -> None:
    header = fastpath.encode_frame_header(0x1, length, mask=mask)
    for cut in range(len(header)):
        for data in buffers(header[:cut]):
            assert fastpath.parse_frame_header(data) is None
        # The same truncation seen from an offset into a longer buffer.
        assert fastpath.parse_frame_header(b"xyz" + header[:cut], 3) is None


def test_encode_frame_header_flags_land_in_first_byte(fastpath: ModuleType) -> None:
    assert fastpath.encode_frame_header(0x0, 0, fin=False) == b"\x00\x00"
    assert fastpath.encode_frame_header(0x8, 2, rsv=0b100) == b"\xc8\x02"
    assert fastpath.encode_frame_header(0xF, 0, fin=True, rsv=7) == b"\xff\x00"
    assert fastpath.encode_frame_header(0x1, 0, mask=bytearray(b"abcd")) == b"\x81\x80abcd"


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(b"\x82\x7f\x80" + bytes(7), id="msb-only"),
        pytest.param(b"\x82\xff" + b"\xff" * 8 + MASK_KEY, id="all-ones-masked"),
    ],
)
def test_parse_frame_header_64bit_length_with_msb_set_raises(
    fastpath: ModuleType, wire: bytes
) -> None:
    with pytest.raises(ValueError, match="most significant bit"):
        fastpath.parse_frame_header(wire)


def test_parse_frame_header_negative_pos_raises(fastpath: ModuleType) -> None:
    with pytest.raises(ValueError, match="pos"):
        fastpath.parse_frame_header(HELLO_UNMASKED, -1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"opcode": 16, "length": 0}, "opcode"),
        ({"opcode": -1, "length": 0}, "opcode"),
        ({"opcode": 2**70, "length": 0}, "opcode"),
        ({"opcode": 1, "length": 0, "rsv": 8}, "rsv"),
        ({"opcode": 1, "length": 0, "rsv": -1}, "rsv"),
        ({"opcode": 1, "length": -1}, "length"),
        ({"opcode": 1, "length": 2**63}, "length"),
        ({"opcode": 1, "length": 2**100}, "length"),
        ({"opcode": 1, "length": 0, "mask": b"abc"}, "mask"),
        ({"opcode": 1, "length": 0, "mask": b"abcde"}, "mask"),
        ({"opcode": 1, "length": 0, "mask": b""}, "mask"),
    ],
)
def test_encode_frame_header_out_of_range_arguments_raise(
    fastpath: ModuleType, kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        fastpath.encode_frame_header(**kwargs)


@pytest.mark.parametrize("mask", [b"", b"abc", b"abcde", bytearray(3), memoryview(b"x" * 8)])
@pytest.mark.parametrize("data", [b"", b"payload"])
def test_apply_mask_bad_mask_length_raises(fastpath: ModuleType, mask: Any, data: bytes) -> None:
    with pytest.raises(ValueError, match="mask must be 4 bytes"):
        fastpath.apply_mask(data, mask)


@pytest.mark.parametrize("length", [*range(18), 31, 32, 33, 1000, 65536 + 3])
def test_apply_mask_every_tail_length_matches_bytewise_xor(
    fastpath: ModuleType, length: int
) -> None:
    data = bytes((i * 7 + 3) & 0xFF for i in range(length))
    expected = bytes(b ^ MASK_KEY[i % 4] for i, b in enumerate(data))
    for buffer in buffers(data):
        assert fastpath.apply_mask(buffer, MASK_KEY) == expected
    # Unaligned start: a memoryview slice one byte into a larger buffer.
    assert fastpath.apply_mask(memoryview(b"\x00" + data)[1:], MASK_KEY) == expected
    assert fastpath.apply_mask(expected, MASK_KEY) == data


def test_apply_mask_leaves_a_mutable_input_alone(fastpath: ModuleType) -> None:
    data = bytearray(b"0123456789abcdef")
    out = fastpath.apply_mask(data, MASK_KEY)
    assert data == bytearray(b"0123456789abcdef")
    assert out != bytes(data)


def test_apply_mask_non_contiguous_memoryview_is_read_in_order(fastpath: ModuleType) -> None:
    data = memoryview(bytes(range(40)))[::3]
    expected = bytes(b ^ MASK_KEY[i % 4] for i, b in enumerate(bytes(data)))
    assert fastpath.apply_mask(data, MASK_KEY) == expected


def masked_frame(payload: bytes, first: int = 0x81, key: bytes = MASK_KEY, form: int = 0) -> bytes:
    """A client frame; ``form`` forces the 16-bit (126) or 64-bit (127) length form."""
    n = len(payload)
    if form == 126:
        head = bytes([first, 0x80 | 126]) + n.to_bytes(2, "big")
    elif form == 127:
        head = bytes([first, 0x80 | 127]) + n.to_bytes(8, "big")
    else:
        head = relaycore._fastpath_py.encode_frame_header(first & 0x0F, n, True, key)
        head = bytes([first]) + head[1:]
    return head + (key if form else b"") + relaycore._fastpath_py.apply_mask(payload, key)


def test_unmask_messages_rfc6455_hello_and_several_frames(fastpath: ModuleType) -> None:
    for data in buffers(HELLO_MASKED):
        assert fastpath.unmask_messages(data, 1 << 20) == [HELLO]
    stream = (
        HELLO_MASKED
        + masked_frame(b"\x00\xffbinary", 0x82, b"\x01\x02\x03\x04")
        + masked_frame("héllo ☃".encode(), 0x81, b"\xff\x00\xee\x11")
        + masked_frame(b"", 0x82)
    )
    got = fastpath.unmask_messages(stream, 1 << 20)
    assert got == [HELLO, b"\x00\xffbinary", "héllo ☃".encode(), b""]
    assert all(type(p) is bytes for p in got)


@pytest.mark.parametrize("size", [0, 7, 8, 9, 125, 126, 127, 65535, 65536])
@pytest.mark.parametrize("form", [0, 126, 127])
def test_unmask_messages_every_length_form_and_tail(
    fastpath: ModuleType, size: int, form: int
) -> None:
    if form == 126 and size > 65535:
        return
    payload = bytes(i % 251 for i in range(size))
    wire = masked_frame(payload, 0x82, form=form)
    assert fastpath.unmask_messages(wire, size) == [payload]
    assert fastpath.unmask_messages(wire, size - 1) is None  # over the limit: the full path says
    # Cut anywhere, the frame is not whole: None, nothing judged.
    for cut in {0, 1, 2, 3, 5, len(wire) // 2, len(wire) - 1}:
        if cut < len(wire):
            assert fastpath.unmask_messages(wire[:cut], 1 << 20) is None


@pytest.mark.parametrize(
    "wire",
    [
        HELLO_UNMASKED,  # a server frame, unmasked
        PONG_MASKED,  # control frames go to the full path
        masked_frame(b"", 0x89),
        masked_frame(b"\x03\xe8", 0x88),
        masked_frame(b"Hel", 0x01),  # a first fragment (FIN clear)
        masked_frame(b"lo", 0x80),  # a continuation
        masked_frame(b"Hello", 0xC1),  # RSV1 set
        masked_frame(b"Hello", 0x83),  # a reserved opcode
        masked_frame(b"\xff\xfe", 0x81),  # text that is not UTF-8
        masked_frame(b"\xed\xa0\x80", 0x81),  # an encoded surrogate
        masked_frame(b"\xc0\xaf", 0x81),  # an overlong encoding
        masked_frame("é".encode()[:1], 0x81),  # a character cut short
        bytes([0x82, 0xFF]) + b"\x80" + bytes(7) + MASK_KEY,  # 64-bit length, top bit set
    ],
)
def test_unmask_messages_leaves_everything_else_to_the_full_parser(
    fastpath: ModuleType, wire: bytes
) -> None:
    assert fastpath.unmask_messages(wire, 1 << 20) is None
    # ... also behind a good frame: the whole read goes to the full path.
    assert fastpath.unmask_messages(HELLO_MASKED + wire, 1 << 20) is None


def test_unmask_messages_text_flag_and_limits(fastpath: ModuleType) -> None:
    binary = masked_frame(b"Hello", 0x82)
    assert fastpath.unmask_messages(HELLO_MASKED, 1 << 20, False) is None
    assert fastpath.unmask_messages(binary, 1 << 20, False) == [HELLO]
    assert fastpath.unmask_messages(binary + HELLO_MASKED, 1 << 20, text=False) is None
    # Text that is not UTF-8 is still a binary message's fine payload.
    assert fastpath.unmask_messages(masked_frame(b"\xff", 0x82), 9) == [b"\xff"]
    assert fastpath.unmask_messages(b"", 1 << 20) is None
    assert fastpath.unmask_messages(HELLO_MASKED, -1) is None
    assert fastpath.unmask_messages(HELLO_MASKED, 2**80) == [HELLO]
    with pytest.raises(TypeError):
        fastpath.unmask_messages("text", 10)


VARINTS = [
    (0, b"\x00"),
    (53, b"\x35"),
    (127, b"\x7f"),
    (128, b"\x80\x01"),
    (300, b"\xac\x02"),
    (5248, b"\x80\x29"),
    (16383, b"\xff\x7f"),
    (16384, b"\x80\x80\x01"),
    (2**21, b"\x80\x80\x80\x01"),
    (2**28, b"\x80\x80\x80\x80\x01"),
    (2**31 - 1, b"\xff\xff\xff\xff\x07"),
]


@pytest.mark.parametrize(("value", "wire"), VARINTS, ids=[str(v) for v, _ in VARINTS])
def test_encode_varint_vectors_encode(fastpath: ModuleType, value: int, wire: bytes) -> None:
    encoded = fastpath.encode_varint(value)
    assert type(encoded) is bytes
    assert encoded == wire


@pytest.mark.parametrize(("value", "wire"), VARINTS, ids=[str(v) for v, _ in VARINTS])
def test_decode_varint_vectors_decode(fastpath: ModuleType, value: int, wire: bytes) -> None:
    for data in buffers(wire + b"tail"):
        assert fastpath.decode_varint(data) == (value, len(wire))
    assert fastpath.decode_varint(b"\x01\x02" + wire, 2) == (value, len(wire))


@pytest.mark.parametrize(("value", "wire"), VARINTS, ids=[str(v) for v, _ in VARINTS])
def test_decode_varint_truncated_at_every_offset_returns_none(
    fastpath: ModuleType, value: int, wire: bytes
) -> None:
    for cut in range(len(wire)):
        for data in buffers(wire[:cut]):
            assert fastpath.decode_varint(data) is None
        assert fastpath.decode_varint(b"ab" + wire[:cut], 2) is None


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        pytest.param(b"\x80\x80\x80\x80\x80\x01", "longer than 5 bytes", id="six-bytes"),
        pytest.param(b"\x80\x80\x80\x80\x80", "longer than 5 bytes", id="fifth-continues"),
        pytest.param(b"\x80\x80\x80\x80\x08", "exceeds", id="2**31"),
        pytest.param(b"\xff\xff\xff\xff\x7f", "exceeds", id="2**35-1"),
    ],
)
def test_decode_varint_bad_prefix_raises(fastpath: ModuleType, wire: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fastpath.decode_varint(wire)
    with pytest.raises(ValueError, match=match):
        fastpath.split_varint_frames(wire + bytes(16))


@pytest.mark.parametrize("value", [-1, 2**31, 2**64, -(2**64)])
def test_encode_varint_out_of_range_raises(fastpath: ModuleType, value: int) -> None:
    with pytest.raises(ValueError, match="varint value"):
        fastpath.encode_varint(value)


def test_decode_varint_pos_past_end_returns_none_and_negative_raises(
    fastpath: ModuleType,
) -> None:
    assert fastpath.decode_varint(b"\x01", 1) is None
    assert fastpath.decode_varint(b"\x01", 2**80) is None
    with pytest.raises(ValueError, match="pos"):
        fastpath.decode_varint(b"\x01", -1)


@pytest.mark.parametrize(
    ("data", "records", "consumed"),
    [
        (b"", [], 0),
        (b"{}", [], 0),
        (b"\x1e", [b""], 1),
        (b"{}\x1e", [b"{}"], 3),
        (b'{"protocol":"json","version":1}\x1e', [b'{"protocol":"json","version":1}'], 32),
        (b"{}\x1e{\x1e\x1e[", [b"{}", b"{", b""], 6),
        (b"a\x1eb\x1e", [b"a", b"b"], 4),
    ],
)
def test_split_records_splits_on_record_separator(
    fastpath: ModuleType, data: bytes, records: list[bytes], consumed: int
) -> None:
    for buffer in buffers(data):
        got = fastpath.split_records(buffer)
        assert got == (records, consumed)
        assert all(type(record) is bytes for record in got[0])


def test_split_records_truncated_at_every_offset_keeps_the_partial_record(
    fastpath: ModuleType,
) -> None:
    stream = b'{"type":1}\x1e{"type":6}\x1e\x1e{"type":7}\x1e'
    for cut in range(len(stream) + 1):
        records, consumed = fastpath.split_records(stream[:cut])
        assert stream[:consumed].count(b"\x1e") == len(records)
        assert b"\x1e" not in stream[consumed:cut]
        assert b"\x1e".join(records) + (b"\x1e" if records else b"") == stream[:consumed]


@pytest.mark.parametrize("size", [*range(10), 125, 126, 127, 128, 65535, 65536])
def test_split_varint_frames_edge_sizes_round_trip(fastpath: ModuleType, size: int) -> None:
    body = bytes(i & 0xFF for i in range(size))
    stream = fastpath.encode_varint(size) + body + b"\x00" + b"\x02ab"
    for data in buffers(stream):
        bodies, consumed = fastpath.split_varint_frames(data)
        assert bodies == [body, b"", b"ab"]
        assert all(type(b) is bytes for b in bodies)
        assert consumed == len(stream)


def test_split_varint_frames_truncated_at_every_offset_stops_at_frame_boundary(
    fastpath: ModuleType,
) -> None:
    frames = [b"", b"x", b"y" * 200, b"z" * 3]
    stream = b"".join(fastpath.encode_varint(len(f)) + f for f in frames)
    boundaries = [0]
    for frame in frames:
        boundaries.append(boundaries[-1] + len(fastpath.encode_varint(len(frame))) + len(frame))
    for cut in range(len(stream) + 1):
        bodies, consumed = fastpath.split_varint_frames(memoryview(stream)[:cut])
        complete = max(i for i, b in enumerate(boundaries) if b <= cut)
        assert bodies == frames[:complete]
        assert consumed == boundaries[complete]


def test_split_varint_frames_over_max_size_raises(fastpath: ModuleType) -> None:
    stream = b"\x03abc\x05hello"
    assert fastpath.split_varint_frames(stream, max_size=5) == ([b"abc", b"hello"], 10)
    with pytest.raises(ValueError, match="exceeds the limit of 4"):
        fastpath.split_varint_frames(stream, max_size=4)
    # The limit applies as soon as the prefix is known, before the body has arrived.
    with pytest.raises(ValueError, match="exceeds the limit"):
        fastpath.split_varint_frames(b"\x80\x80\x01", max_size=1000)
    with pytest.raises(ValueError, match="exceeds the limit"):
        fastpath.split_varint_frames(b"\x00", max_size=-1)


class Conn:
    """A relay connection as ``queue_frame`` sees it; the relay's have ``__slots__`` too."""

    __slots__ = ("name", "state", "wire_format", "_out")

    def __init__(self, name: str, wire_format: str, state: object, out: bytes) -> None:
        self.name = name
        self.wire_format = wire_format
        self.state = state
        self._out = bytearray(out)

    def __repr__(self) -> str:
        return f"Conn({self.name!r})"


OPEN = "open"
#: Equal to OPEN but not the same object: ``queue_frame`` compares states by identity.
OPEN_LOOKALIKE = "".join(["op", "en"])
CLOSED = "closed"
#: A JSON hub-protocol invocation in a text frame, and its MessagePack twin in a binary frame.
JSON_FRAME = b'\x81\x2a{"type":1,"target":"send","arguments":[]}\x1e'
MSGPACK_FRAME = b"\x82\x0e\x0d\x95\x01\x80\xc0\xa4send\x90\x90"
FRAMES = {"json": JSON_FRAME, "messagepack": MSGPACK_FRAME}
BIG = 1 << 20


def make_conns(specs: list[tuple[str, str, object, bytes]]) -> list[Conn]:
    return [Conn(*spec) for spec in specs]


def target_forms(conns: list[Conn]) -> list[Any]:
    """``conns`` as every iterable a caller may pass: the list, a tuple, a dict's values view, a
    generator."""
    return [
        conns,
        tuple(conns),
        {conn.name: conn for conn in conns}.values(),
        (conn for conn in conns),
    ]


QUEUE_FRAME_CASES = [
    # (connections as (name, protocol, state, buffer), frames, limit, served, over, dirty)
    pytest.param([], FRAMES, BIG, [], [], [], id="no-targets"),
    pytest.param(
        [("a", "json", OPEN, b""), ("b", "messagepack", OPEN, b"")],
        FRAMES,
        BIG,
        ["a", "b"],
        [],
        ["a", "b"],
        id="json-and-messagepack",
    ),
    pytest.param(
        [("a", "json", OPEN, b""), ("b", "json", CLOSED, b""), ("c", "json", OPEN_LOOKALIKE, b"")],
        FRAMES,
        BIG,
        ["a"],
        [],
        ["a"],
        id="only-the-open-state-object",
    ),
    pytest.param(
        [("a", "xml", OPEN, b""), ("b", "json", OPEN, b"")],
        FRAMES,
        BIG,
        ["b"],
        [],
        ["b"],
        id="protocol-missing",
    ),
    pytest.param(
        [("a", "json", OPEN, b""), ("b", "messagepack", OPEN, b"")],
        {"json": JSON_FRAME, "messagepack": None},
        BIG,
        ["a"],
        [],
        ["a"],
        id="frame-none",
    ),
    pytest.param(
        [("a", "json", OPEN, b"x" * 10)],
        FRAMES,
        10 + len(JSON_FRAME),
        ["a"],
        [],
        [],
        id="exactly-at-limit",
    ),
    pytest.param(
        [("a", "json", OPEN, b"x" * 11)],
        FRAMES,
        10 + len(JSON_FRAME),
        [],
        ["a"],
        [],
        id="one-byte-over-limit",
    ),
    pytest.param(
        [("a", "json", OPEN, b""), ("b", "messagepack", OPEN, b"")],
        FRAMES,
        len(MSGPACK_FRAME),
        ["b"],
        ["a"],
        ["b"],
        id="empty-buffer-frame-over-limit",
    ),
    pytest.param(
        [("a", "json", OPEN, b""), ("b", "json", OPEN, b"queued"), ("c", "messagepack", OPEN, b"")],
        FRAMES,
        BIG,
        ["a", "b", "c"],
        [],
        ["a", "c"],
        id="dirty-only-when-empty-before",
    ),
    pytest.param(
        [
            ("a", "json", OPEN, b"x" * 60),
            ("b", "json", OPEN, b""),
            ("c", "json", CLOSED, b"x" * 60),
            ("d", "messagepack", OPEN, b"x" * 60),
        ],
        FRAMES,
        64,
        ["b"],
        ["a", "d"],
        ["b"],
        id="over-in-iteration-order",
    ),
    pytest.param(
        [("a", "json", OPEN, b""), ("b", "json", OPEN, b"x")],
        {"json": b""},
        BIG,
        ["a", "b"],
        [],
        ["a"],
        id="empty-frame-counts",
    ),
    pytest.param([("a", "json", OPEN, b"")], FRAMES, -1, [], ["a"], [], id="negative-limit"),
    pytest.param([("a", "json", OPEN, b"")], FRAMES, 2**80, ["a"], [], ["a"], id="huge-limit"),
]


@pytest.mark.parametrize(("specs", "frames", "limit", "served", "over", "dirty"), QUEUE_FRAME_CASES)
def test_queue_frame_examples_append_to_open_connections(
    fastpath: ModuleType,
    specs: list[tuple[str, str, object, bytes]],
    frames: dict[str, bytes | None],
    limit: int,
    served: list[str],
    over: list[str],
    dirty: list[str],
) -> None:
    for form in range(len(target_forms([]))):
        conns = make_conns(specs)
        buffers_before = [conn._out for conn in conns]
        already = Conn("already-dirty", "json", OPEN, b"")
        dirty_list: list[Any] = [already]
        count, got_over = fastpath.queue_frame(
            target_forms(conns)[form], frames, OPEN, limit, dirty_list
        )
        assert count == len(served)
        assert type(got_over) is list
        assert [conn.name for conn in got_over] == over
        assert dirty_list[0] is already
        assert [conn.name for conn in dirty_list[1:]] == dirty
        for conn, (name, protocol, _, before), buffer in zip(
            conns, specs, buffers_before, strict=True
        ):
            assert conn._out is buffer
            assert type(conn._out) is bytearray
            frame = frames[protocol] if name in served else None
            assert conn._out == before + (frame or b"")


def test_queue_frame_same_connection_twice_is_dirty_once(fastpath: ModuleType) -> None:
    conn = Conn("a", "json", OPEN, b"")
    dirty: list[Any] = []
    assert fastpath.queue_frame([conn, conn], FRAMES, OPEN, BIG, dirty) == (2, [])
    assert dirty == [conn]
    assert conn._out == JSON_FRAME * 2
    # The second append would pass the limit: the first stays, the connection is over once.
    conn._out.clear()
    dirty.clear()
    limit = len(JSON_FRAME) * 2 - 1
    assert fastpath.queue_frame([conn, conn], FRAMES, OPEN, limit, dirty) == (1, [conn])
    assert conn._out == JSON_FRAME


def test_queue_frame_subclassed_dict_and_list_use_their_base_behaviour(
    fastpath: ModuleType,
) -> None:
    class Defaulting(dict[str, Any]):
        def __missing__(self, key: str) -> bytes:
            return b"default"

        def get(self, key: str, default: Any = None) -> Any:
            return b"default"

    class Recording(list[Any]):
        def append(self, item: Any) -> None:
            raise AssertionError("list.append is used, not an override")

    conns = make_conns([("a", "xml", OPEN, b""), ("b", "json", OPEN, b"")])
    dirty = Recording()
    frames = Defaulting(FRAMES)
    assert fastpath.queue_frame(conns, frames, OPEN, BIG, dirty) == (1, [])
    assert list(dirty) == conns[1:]
    assert conns[0]._out == b""
    # Other dict and list subclasses are dicts and lists too.
    assert fastpath.queue_frame(conns, collections.OrderedDict(FRAMES), OPEN, BIG, []) == (1, [])


@pytest.mark.parametrize(
    ("frames", "limit", "dirty", "match"),
    [
        pytest.param(list(FRAMES.items()), BIG, [], "frames must be a dict, got list", id="pairs"),
        pytest.param(types.MappingProxyType(FRAMES), BIG, [], "frames must be a dict", id="proxy"),
        pytest.param(None, BIG, [], "frames must be a dict, got NoneType", id="frames-none"),
        pytest.param(FRAMES, BIG, (), "dirty must be a list, got tuple", id="dirty-tuple"),
        pytest.param(FRAMES, BIG, None, "dirty must be a list, got NoneType", id="dirty-none"),
        pytest.param(FRAMES, 1e6, [], "integer", id="limit-float"),
        pytest.param(FRAMES, "1000", [], "integer", id="limit-str"),
        pytest.param(FRAMES, None, [], "integer", id="limit-none"),
    ],
)
def test_queue_frame_bad_arguments_raise_before_touching_a_connection(
    fastpath: ModuleType, frames: Any, limit: Any, dirty: Any, match: str
) -> None:
    conns = make_conns([("a", "json", OPEN, b"")])
    for targets in [conns, (conn for conn in conns), []]:
        with pytest.raises(TypeError, match=match):
            fastpath.queue_frame(targets, frames, OPEN, limit, dirty)
        assert conns[0]._out == b""


class Bytes(bytes):
    pass


class ByteArray(bytearray):
    pass


@pytest.mark.parametrize(
    ("frame", "make_out", "match"),
    [
        pytest.param(
            "text", bytearray, r"frames\['json'\] must be bytes or None, got str", id="str"
        ),
        pytest.param(b"x".decode, bytearray, "must be bytes or None, got builtin", id="callable"),
        pytest.param(bytearray(b"x"), bytearray, "must be bytes or None, got bytearray", id="ba"),
        pytest.param(memoryview(b"x"), bytearray, "or None, got memoryview", id="memoryview"),
        pytest.param(Bytes(b"x"), bytearray, "must be bytes or None, got Bytes", id="bytes-sub"),
        pytest.param(b"x", bytes, "_out must be a bytearray, got bytes", id="out-bytes"),
        pytest.param(b"x", lambda: None, "_out must be a bytearray, got NoneType", id="out-none"),
        pytest.param(b"x", list, "_out must be a bytearray, got list", id="out-list"),
        pytest.param(b"x", ByteArray, "_out must be a bytearray, got ByteArray", id="out-sub"),
    ],
)
def test_queue_frame_bad_frame_or_buffer_raises_after_the_earlier_connections(
    fastpath: ModuleType, frame: Any, make_out: Callable[[], Any], match: str
) -> None:
    good = Conn("good", "messagepack", OPEN, b"")
    bad = Conn("bad", "json", OPEN, b"")
    bad._out = make_out()
    after = Conn("after", "messagepack", OPEN, b"")
    dirty: list[Any] = []
    frames = {"json": frame, "messagepack": MSGPACK_FRAME}
    with pytest.raises(TypeError, match=match):
        fastpath.queue_frame([good, bad, after], frames, OPEN, BIG, dirty)
    assert good._out == MSGPACK_FRAME
    assert dirty == [good]
    assert after._out == b""
    # A closed connection, or one without a frame, is not looked at closer.
    bad.state = CLOSED
    assert fastpath.queue_frame([bad, after], frames, OPEN, BIG, dirty) == (1, [])


class DictConn:
    """A connection without ``__slots__``: its attributes live in the instance ``__dict__``."""

    def __init__(self, name: str, wire_format: str, state: object, out: bytes) -> None:
        self.name = name
        self.wire_format = wire_format
        self.state = state
        self._out = bytearray(out)


class WiderConn(Conn):
    """A subclass with slots of its own besides those it inherits."""

    __slots__ = ("extra", "more")

    def __init__(self, name: str, wire_format: str, state: object, out: bytes) -> None:
        self.extra = self.more = None
        super().__init__(name, wire_format, state, out)


class PropertyConn:
    """``state`` is a property and ``wire_format`` comes from ``__getattr__``."""

    __slots__ = ("name", "_state", "_out")

    def __init__(self, name: str, wire_format: str, state: object, out: bytes) -> None:
        self.name = name
        self._state = state
        self._out = bytearray(out)

    @property
    def state(self) -> object:
        return self._state

    def __getattr__(self, attribute: str) -> str:
        if attribute == "wire_format":
            return "messagepack"
        raise AttributeError(attribute)


def test_queue_frame_any_connection_class_is_read_through_its_attributes(
    fastpath: ModuleType,
) -> None:
    conns: list[Any] = [
        Conn("slots", "json", OPEN, b""),
        DictConn("dict", "json", OPEN, b"q"),
        WiderConn("wider", "messagepack", OPEN, b""),
        PropertyConn("property", "json", OPEN, b""),
        Conn("slots-again", "messagepack", OPEN, b""),
        WiderConn("wider-closed", "json", CLOSED, b""),
        DictConn("dict-closed", "json", CLOSED, b""),
        PropertyConn("property-closed", "json", CLOSED, b""),
    ]
    dirty: list[Any] = []
    assert fastpath.queue_frame(conns, FRAMES, OPEN, BIG, dirty) == (5, [])
    assert [conn.name for conn in dirty] == ["slots", "wider", "property", "slots-again"]
    assert [bytes(conn._out) for conn in conns] == [
        JSON_FRAME,
        b"q" + JSON_FRAME,
        MSGPACK_FRAME,
        MSGPACK_FRAME,
        MSGPACK_FRAME,
        b"",
        b"",
        b"",
    ]


@pytest.mark.parametrize("attribute", ["state", "wire_format", "_out"])
def test_queue_frame_unset_slot_raises_attribute_error(
    fastpath: ModuleType, attribute: str
) -> None:
    conn = Conn("a", "json", OPEN, b"")
    delattr(conn, attribute)
    with pytest.raises(AttributeError, match=attribute):
        fastpath.queue_frame([conn], FRAMES, OPEN, BIG, [])
    # Attributes after the deciding one are not read: a closed connection needs no _out.
    if attribute != "state":
        conn.state = CLOSED
        assert fastpath.queue_frame([conn], FRAMES, OPEN, BIG, []) == (0, [])


def test_queue_frame_targets_not_iterable_or_connection_without_attributes_raise(
    fastpath: ModuleType,
) -> None:
    with pytest.raises(TypeError):
        fastpath.queue_frame(42, FRAMES, OPEN, BIG, [])
    with pytest.raises(AttributeError, match="state"):
        fastpath.queue_frame([object()], FRAMES, OPEN, BIG, [])
    with pytest.raises(TypeError, match="unhashable"):
        fastpath.queue_frame([Conn("a", [], OPEN, b"")], FRAMES, OPEN, BIG, [])  # type: ignore[arg-type]


def test_queue_frame_buffer_with_a_live_view_raises_buffer_error(fastpath: ModuleType) -> None:
    conn = Conn("a", "json", OPEN, b"queued")
    with memoryview(conn._out):
        with pytest.raises(BufferError):
            fastpath.queue_frame([conn], FRAMES, OPEN, BIG, [])
    assert conn._out == b"queued"
    assert fastpath.queue_frame([conn], FRAMES, OPEN, BIG, []) == (1, [])


class Meddling:
    """A connection whose buffer attribute drops the frames and grows the target list: the loop
    must neither use a freed frame nor run past the list's end."""

    __slots__ = ("state", "wire_format", "frames", "targets")

    def __init__(self, frames: dict[str, bytes | None], targets: list[Any]) -> None:
        self.state = OPEN
        self.wire_format = "json"
        self.frames = frames
        self.targets = targets

    @property
    def _out(self) -> bytearray:
        self.frames.clear()
        self.targets.append(Conn("late", "json", OPEN, b""))
        return bytearray()


def test_queue_frame_connection_changing_frames_and_targets_mid_loop(
    fastpath: ModuleType,
) -> None:
    # Built at run time, so the dict holds the only reference to the frame.
    frames: dict[str, bytes | None] = {"json": bytes(JSON_FRAME[:-1]) + b"\x1e"}
    targets: list[Any] = []
    targets.append(Meddling(frames, targets))
    dirty: list[Any] = []
    assert fastpath.queue_frame(targets, frames, OPEN, BIG, dirty) == (1, [])
    assert dirty == targets[:1]
    assert [type(t).__name__ for t in targets] == ["Meddling", "Conn"]
    assert targets[1]._out == b""


def test_fastpath_modules_export_the_same_functions_and_signatures() -> None:
    twin = relaycore._fastpath_py
    ext = load_extension()
    assert ext.__all__ == twin.__all__

    def public_functions(module: ModuleType) -> set[str]:
        return {n for n, v in vars(module).items() if not n.startswith("_") and callable(v)}

    assert public_functions(ext) == public_functions(twin) == set(twin.__all__)
    for name in twin.__all__:
        expected = [
            (p.name, p.kind, p.default)
            for p in inspect.signature(getattr(twin, name)).parameters.values()
        ]
        actual = [
            (p.name, p.kind, p.default)
            for p in inspect.signature(getattr(ext, name)).parameters.values()
        ]
        assert actual == expected, name
        assert getattr(ext, name).__doc__, f"{name} has no docstring"


def test_accel_loaded_matches_environment() -> None:
    if NO_EXTENSIONS:
        assert relaycore._accel.ACCELERATED is False
        assert relaycore._accel.apply_mask is relaycore._fastpath_py.apply_mask
    elif REQUIRE_EXTENSIONS:
        assert relaycore._accel.ACCELERATED, (
            "RELAYCORE_REQUIRE_EXTENSIONS=1 but relaycore._accel fell back to the twin"
        )
    if relaycore._accel.ACCELERATED:
        ext = importlib.import_module("relaycore._fastpath")
        for name in ext.__all__:
            assert getattr(relaycore._accel, name) is getattr(ext, name)
