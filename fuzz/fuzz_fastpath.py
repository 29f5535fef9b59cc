"""The fast path, differentially: the extension (``relaycore._fastpath``) must give the twin's
(``relaycore._fastpath_py``) answer for every input, or raise the same exception type.

Input: a flag byte, then the data. Flag bits 0-2 pick the function (``parse_frame_header``,
``split_records``, ``split_varint_frames``, ``decode_varint``, ``unmask_messages`` for text
and for binary, ``apply_mask``, ``encode_frame_header``); bits 3-7 give its position or limit.
The twin is instrumented, so its branches guide the search. Without the extension built there
is nothing to compare: the harness says so and exits with status 2.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

from _harness import instrumented, main, split_flags

with instrumented():
    import relaycore._fastpath_py as py

try:
    c = importlib.import_module("relaycore._fastpath")
except ImportError as exc:
    print(f"fuzz_fastpath: the extension is not built ({exc}); nothing to compare",
          file=sys.stderr)
    sys.exit(2)

LIMITS = (0, 5, 125, 1 << 20)


def outcome(fn: Callable[..., Any], *args: Any) -> tuple[str, Any]:
    try:
        return ("returned", fn(*args))
    except Exception as exc:  # noqa: BLE001 - the type is what is compared
        return ("raised", type(exc))


def test_one_input(data: bytes) -> None:
    flags, rest = split_flags(data)
    which, arg = flags & 7, flags >> 3
    if which == 0:
        call: tuple[str, tuple[Any, ...]] = ("parse_frame_header", (rest, arg))
    elif which == 1:
        call = ("split_records", (rest,))
    elif which == 2:
        call = ("split_varint_frames", (rest, LIMITS[arg & 3] or 1))
    elif which == 3:
        call = ("decode_varint", (rest, arg))
    elif which in (4, 5):
        call = ("unmask_messages", (rest, LIMITS[arg & 3], which == 4))
    elif which == 6:
        call = ("apply_mask", (rest[4:], rest[:4]))
    else:
        length = int.from_bytes(rest[:9], "little") >> (arg & 7)
        call = ("encode_frame_header", (arg & 0xF, length, bool(arg & 16), rest[9:13] or None))
    name, args = call
    expected = outcome(getattr(py, name), *args)
    got = outcome(getattr(c, name), *args)
    assert got == expected, (name, args, expected, got)
    # bytearray and memoryview inputs read the same as bytes.
    if args and isinstance(args[0], bytes) and name != "encode_frame_header":
        for view in (bytearray(args[0]), memoryview(args[0])):
            assert outcome(getattr(c, name), view, *args[1:]) == expected, (name, args)


if __name__ == "__main__":
    main(test_one_input)
