"""What every harness in this folder shares: instrumenting relaycore, running the fuzzer, and
driving the relay's coroutines without an event loop.

A harness is ``fuzz_<parser>.py``: it imports what it fuzzes inside ``instrumented()``,
defines ``test_one_input(data: bytes)`` that returns normally for every input the parser
handles as documented (its result or its documented error) and raises for anything else, and
ends with ``main(test_one_input)``. It takes libFuzzer's arguments: corpus folders, then flags
such as ``-max_total_time=60``, ``-runs=N``, ``-artifact_prefix=path/``.

With ``atheris`` installed (``pip install -e '.[fuzz]'``) the fuzzer is libFuzzer, guided by the
coverage of relaycore's Python code. Without it (no wheel for this Python), a plain
random-mutation loop over the corpus takes the same arguments and prints the same closing
line, ``Done N runs in T second(s)``, so that ``make fuzz`` still runs every harness.

Nothing here imports relaycore: a module imported before ``instrumented()`` would not be
instrumented.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import sys
import time
import traceback
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

try:
    import atheris
except ImportError:  # no wheel for this Python: the fallback below
    atheris = None

#: Where the inputs a harness reads start: its flag byte chooses among variants of the call
#: (role, limits, how the bytes are cut into reads) so that one corpus explores all of them.
FLAG_BYTES = 1


def instrumented(*packages: str) -> contextlib.AbstractContextManager[Any]:
    """Instrument ``relaycore`` (and ``packages``) for coverage as they are imported."""
    if atheris is None:
        return contextlib.nullcontext()
    return atheris.instrument_imports(include=["relaycore", *packages])


def split_flags(data: bytes) -> tuple[int, bytes]:
    """The flag byte (0 for empty input) and the rest."""
    return (data[0], data[1:]) if data else (0, b"")


def reads(data: bytes, flags: int) -> list[bytes]:
    """``data`` cut into the reads a socket might hand over: whole when the top 5 bits of
    ``flags`` are 0, else pieces of 1 + 3 * (flags >> 3) bytes."""
    size = (flags >> 3) * 3 + 1 if flags >> 3 else len(data) or 1
    return [data[i:i + size] for i in range(0, len(data), size)]


def drive(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coroutine`` to its end without an event loop (its streams never wait)."""
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value
    coroutine.close()
    raise AssertionError("the coroutine waited on the event loop; expected it never to wait")


class ScriptedStream:
    """A stream that hands out ``chunks``, then end of stream, and keeps what is sent to it."""

    def __init__(self, chunks: Sequence[bytes]) -> None:
        self.chunks = list(chunks)
        self.sent = bytearray()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""

    async def send_all(self, data: bytes) -> None:
        self.sent += data

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


# --------------------------------------------------------------------------------------------
# Running


def main(test_one_input: Callable[[bytes], None]) -> None:
    """Fuzz ``test_one_input`` with libFuzzer's command line (``sys.argv``)."""
    if atheris is not None:
        atheris.Setup(sys.argv, test_one_input)
        atheris.Fuzz()
    else:
        sys.exit(_mutation_fuzz(test_one_input, sys.argv[1:]))


def _flag(args: Sequence[str], name: str, default: str) -> str:
    for arg in args:
        if arg.startswith(f"-{name}="):
            return arg.split("=", 1)[1]
    return default


def _corpus(dirs: Sequence[str]) -> list[bytes]:
    seeds = []
    for folder in dirs:
        for path in sorted(Path(folder).glob("*")):
            if path.is_file():
                seeds.append(path.read_bytes())
    return seeds or [b""]


def _mutate(rng: random.Random, data: bytes, seeds: Sequence[bytes]) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(7)
        at = rng.randint(0, len(out))
        if op == 0 and out:
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        elif op == 1 and out:
            out[rng.randrange(len(out))] = rng.choice((0, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif op == 2:
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3:
            del out[at:at + rng.randint(1, 16)]
        elif op == 4:
            del out[at:]
        elif op == 5:
            other = rng.choice(seeds)
            start = rng.randint(0, len(other))
            out[at:at] = other[start:start + rng.randint(1, 64)]
        else:
            out[at:at] = out[at:at + rng.randint(1, 16)] * rng.randint(2, 8)
    return bytes(out[:4096])


def _mutation_fuzz(test_one_input: Callable[[bytes], None], args: Sequence[str]) -> int:
    """The fallback: mutate corpus inputs at random; the first failing input is written to
    ``{artifact_prefix}crash-{sha1}`` and ends the run with status 1."""
    dirs = [arg for arg in args if not arg.startswith("-")]
    max_time = float(_flag(args, "max_total_time", "0")) or float("inf")
    max_runs = int(_flag(args, "runs", "-1"))
    prefix = _flag(args, "artifact_prefix", "./")
    rng = random.Random(int(_flag(args, "seed", "0")) or None)
    seeds = _corpus(dirs)
    print(f"INFO: atheris is not installed; random mutation of {len(seeds)} seed(s)",
          file=sys.stderr)
    start = time.monotonic()
    runs = 0
    queue = list(seeds)  # the seeds themselves first, then mutations of them
    while runs != max_runs and time.monotonic() - start < max_time:
        data = queue.pop() if queue else _mutate(rng, rng.choice(seeds), seeds)
        try:
            test_one_input(data)
        except Exception:  # noqa: BLE001 - any escape is the finding
            traceback.print_exc()
            name = f"{prefix}crash-{hashlib.sha1(data).hexdigest()}"
            Path(name).write_bytes(data)
            print(f"==ERROR: uncaught exception; input written to {name}", file=sys.stderr)
            return 1
        runs += 1
    print(f"Done {runs} runs in {int(time.monotonic() - start)} second(s)", file=sys.stderr)
    return 0

