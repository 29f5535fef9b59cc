"""Differential tests: the extension must give the twin's answer, or raise the same exception type.

The twin (``relaycore._fastpath_py``) is the specification; every function is fed random
arguments through both, and what one module encodes the other must parse.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import relaycore._fastpath_py as py
from relaycore.protocol._websocket import BinaryMessage, Role, TextMessage, WebSocketProtocol

REQUIRE_EXTENSIONS = os.environ.get("RELAYCORE_REQUIRE_EXTENSIONS", "") not in ("", "0")

try:
    c = importlib.import_module("relaycore._fastpath")
except ImportError as exc:
    if REQUIRE_EXTENSIONS:
        raise ImportError(
            f"RELAYCORE_REQUIRE_EXTENSIONS=1 but the extension is missing: {exc}"
        ) from exc
    pytest.skip(
        f"relaycore._fastpath is not built ({exc}); build it with "
        "RELAYCORE_BUILD_EXTENSION=yes pip install -e . --no-build-isolation",
        allow_module_level=True,
    )

EXAMPLES = settings(max_examples=200, deadline=None)


def typed(value: Any) -> Any:
    """``value`` with its types spelled out, so ``b"x" == bytearray(b"x")`` cannot hide a bug."""
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, [typed(v) for v in value])
    return (type(value).__name__, value)


def outcome(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return ("returned", typed(fn(*args, **kwargs)))
    except Exception as exc:  # noqa: BLE001 - the type is what is compared
        return ("raised", type(exc))


def assert_same(name: str, *args: Any, **kwargs: Any) -> Any:
    expected = outcome(getattr(py, name), *args, **kwargs)
    assert outcome(getattr(c, name), *args, **kwargs) == expected
    return expected


def as_buffer(draw: st.DrawFn, data: bytes) -> Any:
    """``data`` as one of the input types a caller may pass, sliced views included."""
    kind = draw(st.sampled_from(["bytes", "bytearray", "memoryview", "offset", "strided"]))
    if kind == "bytearray":
        return bytearray(data)
    if kind == "memoryview":
        return memoryview(data)
    if kind == "offset":
        return memoryview(b"\xaa" + data + b"\xbb")[1:-1]
    if kind == "strided":
        spread = bytes(b for byte in data for b in (byte, 0x55))
        return memoryview(spread)[::2]
    return data


@st.composite
def buffers(draw: st.DrawFn, data: st.SearchStrategy[bytes] | None = None) -> Any:
    return as_buffer(draw, draw(data if data is not None else st.binary(max_size=300)))


positions = st.one_of(st.integers(-3, 40), st.sampled_from([2**63, 2**80, -(2**80)]))
big_or_small = st.one_of(
    st.integers(-10, 300),
    st.integers(0, 2**64),
    st.sampled_from([2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63), -(2**64), 2**100]),
)
masks = st.one_of(
    st.binary(min_size=4, max_size=4),
    st.binary(max_size=6),
    st.binary(min_size=4, max_size=4).map(bytearray),
    st.binary(min_size=4, max_size=4).map(memoryview),
)


@st.composite
def header_like(draw: st.DrawFn) -> bytes:
    """Random bytes whose second byte often announces the 16- or 64-bit length forms."""
    second = draw(st.sampled_from([126, 127, 0xFE, 0xFF]) | st.integers(0, 255))
    return bytes([draw(st.integers(0, 255)), second]) + draw(st.binary(max_size=14))


@st.composite
def frame_streams(draw: st.DrawFn) -> bytes:
    """Well-formed frames back to back, then possibly a truncated tail."""
    out = b""
    for _ in range(draw(st.integers(0, 4))):
        length = draw(st.sampled_from([0, 1, 125, 126, 127, 300, 65535, 65536]))
        mask = draw(st.none() | st.binary(min_size=4, max_size=4))
        header = py.encode_frame_header(
            draw(st.integers(0, 15)), length, draw(st.booleans()), mask, draw(st.integers(0, 7))
        )
        out += header + bytes(length)
    return out[: draw(st.integers(0, len(out)))] if draw(st.booleans()) else out


@st.composite
def varint_streams(draw: st.DrawFn) -> bytes:
    """Varint-prefixed bodies back to back, then possibly truncated or followed by junk."""
    bodies = draw(st.lists(st.binary(max_size=200), max_size=8))
    out = b"".join(py.encode_varint(len(b)) + b for b in bodies)
    tail = draw(st.sampled_from(["none", "cut", "junk"]))
    if tail == "cut":
        return out[: draw(st.integers(0, len(out)))]
    if tail == "junk":
        return out + draw(st.binary(max_size=12))
    return out


@EXAMPLES
@given(
    data=buffers(st.one_of(st.binary(max_size=20), header_like(), frame_streams())),
    pos=positions,
)
def test_parse_frame_header_matches_twin(data: Any, pos: int) -> None:
    assert_same("parse_frame_header", data, pos)


@EXAMPLES
@given(data=buffers(frame_streams()))
def test_parse_frame_header_walks_a_stream_like_twin(data: Any) -> None:
    pos = 0
    while True:
        got = assert_same("parse_frame_header", data, pos)
        if got[0] == "raised" or got[1][1] is None:
            break
        _, (_, (_, _, _, (_, length), (_, header_length))) = got
        pos += header_length + length


@EXAMPLES
@given(
    opcode=big_or_small,
    length=big_or_small,
    fin=st.one_of(st.booleans(), st.sampled_from([0, 1, "", "x", None])),
    mask=st.none() | masks,
    rsv=big_or_small,
)
def test_encode_frame_header_matches_twin(
    opcode: int, length: int, fin: Any, mask: Any, rsv: int
) -> None:
    assert_same("encode_frame_header", opcode, length, fin, mask, rsv)
    assert_same("encode_frame_header", opcode, length, fin=fin, mask=mask, rsv=rsv)


@EXAMPLES
@given(
    opcode=st.integers(0, 15),
    length=st.one_of(st.integers(0, 70000), st.integers(0, 2**63 - 1)),
    fin=st.booleans(),
    mask=st.none() | st.binary(min_size=4, max_size=4),
    rsv=st.integers(0, 7),
)
def test_frame_header_cross_round_trip(
    opcode: int, length: int, fin: bool, mask: bytes | None, rsv: int
) -> None:
    expected_b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    for encoder, parser in [(c, py), (py, c), (c, c)]:
        header = encoder.encode_frame_header(opcode, length, fin, mask, rsv)
        b0, b1, got_mask, got_length, header_length = parser.parse_frame_header(header + b"xx")
        assert (b0, got_mask, got_length, header_length) == (
            expected_b0,
            mask,
            length,
            len(header),
        )
        assert bool(b1 & 0x80) == (mask is not None)


@EXAMPLES
@given(data=buffers(st.binary(max_size=2100)), mask=masks)
def test_apply_mask_matches_twin(data: Any, mask: Any) -> None:
    assert_same("apply_mask", data, mask)


@EXAMPLES
@given(data=st.binary(max_size=2100), mask=st.binary(min_size=4, max_size=4))
def test_apply_mask_cross_round_trip(data: bytes, mask: bytes) -> None:
    assert py.apply_mask(c.apply_mask(data, mask), mask) == data
    assert c.apply_mask(py.apply_mask(data, mask), mask) == data


@st.composite
def client_reads(draw: st.DrawFn) -> bytes:
    """What a server may read from a client: mostly whole masked text and binary messages
    (UTF-8 or not), now and then a control frame, a fragment, an unmasked frame, a set RSV bit,
    a non-minimal length form, and possibly cut anywhere."""
    out = b""
    usual = draw(st.booleans())  # half the reads are only whole masked messages
    for _ in range(draw(st.integers(0, 4))):
        payload = draw(
            st.binary(max_size=300)
            | st.text(max_size=100).map(str.encode)
            | st.sampled_from([b"{}\x1e", b'{"type":6}\x1e', b"\x02\x91\x06"])
        )
        first = draw(st.sampled_from([0x81, 0x82]) if usual else st.integers(0, 255))
        mask = draw(st.binary(min_size=4, max_size=4) if usual
                    else st.binary(min_size=4, max_size=4) | st.none())
        header = bytearray(py.encode_frame_header(first & 0x0F, len(payload), True, mask))
        header[0] = first
        if draw(st.integers(0, 9)) == 0 and len(payload) < 126:  # the 16-bit form, needlessly
            header[1:2] = bytes([header[1] & 0x80 | 126]) + len(payload).to_bytes(2, "big")
        out += bytes(header) + (py.apply_mask(payload, mask) if mask else payload)
    return out[: draw(st.integers(0, len(out)))] if draw(st.integers(0, 4)) == 0 else out


@EXAMPLES
@given(data=client_reads(), limit=st.sampled_from([0, 5, 125, 300, 2**31, -1]),
       text=st.booleans())
def test_unmask_messages_matches_twin(data: bytes, limit: int, text: bool) -> None:
    assert_same("unmask_messages", data, limit, text)


@EXAMPLES
@given(data=client_reads(), text=st.booleans(), split=st.integers(0, 2000))
def test_unmask_messages_agrees_with_the_full_parser(data: bytes, text: bool, split: int) -> None:
    """Whatever the shortcut takes, the full parser turns into the same messages, with no
    error, no output and nothing left over; the shortcut is never taken mid-message."""
    ws = WebSocketProtocol(Role.SERVER, max_message_size=200)
    got = ws.receive_messages(data, text)
    assert got == py.unmask_messages(data, 200, text)
    if got is None:
        return
    full = WebSocketProtocol(Role.SERVER, max_message_size=200)
    full.receive_data(data)
    events = full.events_received()
    assert full.error is None and full.data_to_send() == b"" and not full._buf
    assert [e.data.encode() if isinstance(e, TextMessage) else e.data for e in events] == got
    if not text:
        assert all(isinstance(e, BinaryMessage) for e in events)
    # With part of an earlier read pending, the shortcut steps aside.
    cut = split % (len(data) + 1)
    pending = WebSocketProtocol(Role.SERVER, max_message_size=200)
    pending.receive_data(data[:cut])
    if pending._buf:
        assert pending.receive_messages(data[cut:], text) is None


@EXAMPLES
@given(value=big_or_small)
def test_encode_varint_matches_twin(value: int) -> None:
    assert_same("encode_varint", value)


@EXAMPLES
@given(value=st.integers(0, 2**31 - 1), tail=st.binary(max_size=6))
def test_varint_cross_round_trip(value: int, tail: bytes) -> None:
    for encoder, decoder in [(c, py), (py, c)]:
        prefix = encoder.encode_varint(value)
        assert decoder.decode_varint(prefix + tail) == (value, len(prefix))
        assert decoder.decode_varint(b"\x00" + prefix, 1) == (value, len(prefix))


@EXAMPLES
@given(data=buffers(st.one_of(st.binary(max_size=12), varint_streams())), pos=positions)
def test_decode_varint_matches_twin(data: Any, pos: int) -> None:
    assert_same("decode_varint", data, pos)


@EXAMPLES
@given(
    data=buffers(
        st.one_of(
            st.binary(max_size=300),
            st.lists(st.sampled_from([b"\x1e", b"{}", b'{"type":1}', b"\xff"])).map(b"".join),
        )
    )
)
def test_split_records_matches_twin(data: Any) -> None:
    assert_same("split_records", data)


@EXAMPLES
@given(
    data=buffers(st.one_of(st.binary(max_size=40), varint_streams())),
    max_size=st.one_of(st.just(2**31 - 1), big_or_small),
)
def test_split_varint_frames_matches_twin(data: Any, max_size: int) -> None:
    assert_same("split_varint_frames", data, max_size)
    assert_same("split_varint_frames", data)


@EXAMPLES
@given(bodies=st.lists(st.binary(max_size=300), max_size=10), tail=st.binary(max_size=3))
def test_varint_frames_cross_round_trip(bodies: list[bytes], tail: bytes) -> None:
    for encoder, splitter in [(c, py), (py, c)]:
        stream = b"".join(encoder.encode_varint(len(b)) + b for b in bodies)
        got, consumed = splitter.split_varint_frames(stream)
        assert got == bodies
        assert consumed == len(stream)


class Conn:
    """A relay connection as ``queue_frame`` sees it (the relay's have ``__slots__`` too)."""

    __slots__ = ("state", "wire_format", "_out")

    def __init__(self, state: object, wire_format: str, out: Any) -> None:
        self.state = state
        self.wire_format = wire_format
        self._out = out


class WiderConn(Conn):
    """A subclass with a slot of its own besides those it inherits from ``Conn``."""

    __slots__ = ("extra",)


class DictConn:
    """No ``__slots__``: the attributes live in the instance ``__dict__``."""

    def __init__(self, state: object, wire_format: str, out: Any) -> None:
        self.state = state
        self.wire_format = wire_format
        self._out = out


CLASSES = [Conn, WiderConn, DictConn]
OPEN = "open"
#: Open, closed, and equal to OPEN but another object (states are compared by identity).
STATES = [OPEN, "closed", "".join(["op", "en"])]
#: Mostly good values, sometimes one that either module must reject the same way.
frame_values = st.one_of(
    st.binary(max_size=40),
    st.none(),
    st.sampled_from(["text", bytearray(b"ba"), memoryview(b"mv")]),
)
buffer_values = st.one_of(st.binary(max_size=40).map(bytearray), st.binary(max_size=4))


@st.composite
def broadcasts(draw: st.DrawFn) -> dict[str, Any]:
    """The arguments of one ``queue_frame`` call, as plain data both modules can be given."""
    good = draw(st.booleans())
    conns = draw(
        st.lists(
            st.tuples(
                st.sampled_from(range(len(CLASSES))),
                st.sampled_from([0, 0, 0, 1, 2]),  # mostly open
                st.sampled_from(["json", "messagepack", "xml"]),
                st.binary(max_size=40).map(bytearray) if good else buffer_values,
            ),
            max_size=12,
        )
    )
    value = (st.binary(max_size=40) | st.none()) if good else frame_values
    frames = draw(
        st.fixed_dictionaries({"json": st.binary(max_size=40)}, optional={"messagepack": value})
        | st.fixed_dictionaries({}, optional={"json": value, "messagepack": value})
    )
    return {
        "conns": conns,
        "frames": frames if good or draw(st.booleans()) else list(frames.items()),
        "limit": draw(
            st.one_of(st.integers(-2, 90), st.sampled_from([2**63, 2**80, -(2**80)]))
            if good
            else st.one_of(st.integers(0, 90), st.sampled_from([1.5, "9", None]))
        ),
        "dirty": draw(st.just("list") if good else st.sampled_from(["list", "tuple"])),
        "form": draw(st.sampled_from(["list", "tuple", "values", "generator"])),
    }


def queue_frame_outcome(module: Any, case: dict[str, Any]) -> Any:
    """Run ``queue_frame`` on fresh connections; what it returned or raised, and what it did to
    the buffers and the dirty list, with connections named by their index."""
    conns = [CLASSES[k](STATES[s], p, type(out)(out)) for k, s, p, out in case["conns"]]
    buffers_before = [conn._out for conn in conns]
    index = {id(conn): i for i, conn in enumerate(conns)}
    dirty: Any = [] if case["dirty"] == "list" else ()
    targets: Any = {
        "list": lambda: conns,
        "tuple": lambda: tuple(conns),
        "values": lambda: dict(enumerate(conns)).values(),
        "generator": lambda: (conn for conn in conns),
    }[case["form"]]()
    try:
        count, over = module.queue_frame(targets, case["frames"], OPEN, case["limit"], dirty)
        result: Any = ("returned", count, type(over), [index[id(conn)] for conn in over])
    except Exception as exc:  # noqa: BLE001 - the type is what is compared
        result = ("raised", type(exc))
    effects = (
        [index[id(conn)] for conn in dirty],
        [bytes(conn._out) if isinstance(conn._out, bytearray) else None for conn in conns],
        all(conn._out is before for conn, before in zip(conns, buffers_before, strict=True)),
    )
    return result, effects


@EXAMPLES
@given(case=broadcasts())
def test_queue_frame_matches_twin(case: dict[str, Any]) -> None:
    assert queue_frame_outcome(c, case) == queue_frame_outcome(py, case)
