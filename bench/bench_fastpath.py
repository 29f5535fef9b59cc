"""Fast path, twin vs extension: each function timed on the same input through both modules.

    .venv/bin/python -m pytest bench/bench_fastpath.py --benchmark-only     # measure
    .venv/bin/python -m pytest bench/bench_fastpath.py --benchmark-disable  # smoke: once each

Each case is a pytest-benchmark group holding a ``py`` and a ``c`` run; ``bench/conftest.py``
prints the py/c ratio of the medians after the tables. A timing never fails anything.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest

import relaycore._fastpath_py

MASK = b"\x37\xfa\x21\x3d"


def _record(i: int) -> bytes:
    return b'{"type":1,"target":"send","arguments":["user%d","hello world"]}' % i


#: 100 JSON hub-protocol records of about 60 bytes, the shape of a busy text connection's read.
RECORDS = b"".join(_record(i) + b"\x1e" for i in range(100))
#: 100 varint-prefixed bodies of about 60 bytes, the MessagePack / service-protocol equivalent.
VARINT_FRAMES = b"".join(
    relaycore._fastpath_py.encode_varint(len(_record(i))) + _record(i) for i in range(100)
)
#: A masked client frame carrying 2 KB: the 16-bit length form plus a key (8-byte header).
CLIENT_FRAME_HEADER = relaycore._fastpath_py.encode_frame_header(0x1, 2048, mask=MASK)

#: A client's read of three masked JSON text frames of about 60 bytes each (an invocation
#: ending in the record separator), what the relay's shortcut past the WebSocket parser takes.
CLIENT_READ = b"".join(
    relaycore._fastpath_py.encode_frame_header(0x1, len(_record(i)) + 1, mask=MASK)
    + relaycore._fastpath_py.apply_mask(_record(i) + b"\x1e", MASK)
    for i in range(3)
)

#: case id -> (function name, positional arguments)
CASES: dict[str, tuple[str, tuple[Any, ...]]] = {
    "apply_mask-16B": ("apply_mask", (bytes(range(16)), MASK)),
    "apply_mask-2KB": ("apply_mask", (bytes(2048), MASK)),
    "apply_mask-64KB": ("apply_mask", (bytes(65536), MASK)),
    "parse_frame_header-masked-2KB": ("parse_frame_header", (CLIENT_FRAME_HEADER + bytes(64),)),
    "encode_frame_header-2KB": ("encode_frame_header", (0x1, 2048)),
    "encode_varint-300": ("encode_varint", (300,)),
    "decode_varint-300": ("decode_varint", (b"\xac\x02" + bytes(30),)),
    "split_records-100": ("split_records", (RECORDS,)),
    "split_varint_frames-100": ("split_varint_frames", (VARINT_FRAMES,)),
    "unmask_messages-3x60B": ("unmask_messages", (CLIENT_READ, 1 << 20)),
}


def _load(impl: str) -> ModuleType:
    if impl == "py":
        return relaycore._fastpath_py
    try:
        return importlib.import_module("relaycore._fastpath")
    except ImportError as exc:
        if os.environ.get("RELAYCORE_REQUIRE_EXTENSIONS", "") not in ("", "0"):
            pytest.fail(f"RELAYCORE_REQUIRE_EXTENSIONS=1 but relaycore._fastpath is missing: {exc}")
        pytest.skip(f"relaycore._fastpath is not built ({exc})")


@pytest.mark.parametrize("impl", ["py", "c"])
@pytest.mark.parametrize("case", list(CASES))
def test_fastpath(benchmark: Any, case: str, impl: str) -> None:
    name, args = CASES[case]
    fn: Callable[..., Any] = getattr(_load(impl), name)
    benchmark.group = case
    result = benchmark(fn, *args)
    # The result must be the twin's, so a fast wrong answer cannot pass as a speed-up.
    assert result == getattr(relaycore._fastpath_py, name)(*args)


class _Conn:
    """A client connection as a broadcast sees it; the relay's have ``__slots__`` too."""

    __slots__ = ("state", "wire_format", "_out")

    def __init__(self, state: object) -> None:
        self.state = state
        # Its own string object, as the relay's ``request.protocol.lower()`` gives each client.
        self.wire_format = "JSON".lower()
        self._out = bytearray()


_OPEN = object()
#: A JSON hub-protocol record in a server text frame: 2 bytes of header and 30 of payload.
BROADCAST_FRAME = (
    relaycore._fastpath_py.encode_frame_header(0x1, 30) + b'{"type":1,"target":"updated"}\x1e'
)
BROADCAST_FRAMES: dict[str, bytes | None] = {"json": BROADCAST_FRAME, "messagepack": None}
BROADCAST_LIMIT = 1 << 20


@pytest.mark.parametrize("impl", ["py", "c"])
def test_fastpath_queue_frame(benchmark: Any, impl: str) -> None:
    """One broadcast of a 32-byte frame to 1,000 idle open connections: every buffer starts
    empty (the setup clears them, untimed), so every connection also lands on the dirty list."""
    fn: Callable[..., Any] = _load(impl).queue_frame
    conns = [_Conn(_OPEN) for _ in range(1000)]

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        for conn in conns:
            conn._out.clear()
        return (conns, BROADCAST_FRAMES, _OPEN, BROADCAST_LIMIT, []), {}

    benchmark.group = "queue_frame-1000x32B"
    result = benchmark.pedantic(fn, setup=setup, rounds=2000, warmup_rounds=20)
    twin_conns = [_Conn(_OPEN) for _ in range(1000)]
    expected = relaycore._fastpath_py.queue_frame(
        twin_conns, BROADCAST_FRAMES, _OPEN, BROADCAST_LIMIT, []
    )
    assert result == (1000, []) == expected
    assert len(BROADCAST_FRAME) == 32
    assert all(conn._out == BROADCAST_FRAME for conn in conns)
