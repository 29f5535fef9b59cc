"""The benchmark generator's sampled connections take latency at the socket, not at the callback.

``bench/loadgen`` holds a thousand subscribers in one process; the time its callback sees a
frame includes its own read-out of the other sockets. A ``StampedConnection`` carries the
kernel's receive time (``SO_TIMESTAMPNS``) instead: these tests check, against a tiny WebSocket
server in the test, that the frame reaches the sink with ``arrival_ns`` between the server's
write and the callback, and that a generator which is busy for 30 ms before it reads shows in
the read latency only.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from loadgen.core import ARRIVAL_CLOCK, READ_CLOCK, Meter, latency_clock, message_text  # noqa: E402
from loadgen.wsclient import HAVE_STAMPS, StampedConnection, open_connection  # noqa: E402

try:
    import uvloop
except ImportError:
    uvloop = None

pytestmark = pytest.mark.skipif(not HAVE_STAMPS, reason="needs SO_TIMESTAMPNS (Linux)")

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
STEP = 7
BLOCK_S = 0.030  # how long the "generator" is busy before it gets round to reading


class Adapter:
    """What ``Meter`` hands frames without a marker and closes to."""

    def __init__(self) -> None:
        self.others: list[bytes] = []
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_other(self, conn: Any, payload: bytes) -> None:
        self.others.append(payload)

    def on_closed(self, conn: Any) -> None:
        self.closed.set_result(None)


class Sink(Meter):
    """The generator's meter, plus when each frame reached the callback and its arrival."""

    def __init__(self, adapter: Adapter) -> None:
        super().__init__(adapter)
        self.seen: list[tuple[bytes, int | None, int]] = []
        self.got = asyncio.Event()

    def on_frame(self, conn: Any, payload: bytes) -> None:
        self.seen.append((payload, conn.arrival_ns, time.perf_counter_ns()))
        super().on_frame(conn, payload)
        self.got.set()


def server_frame(opcode: int, payload: bytes) -> bytes:
    assert len(payload) < 126
    return bytes([0x80 | opcode, len(payload)]) + payload


async def exchange() -> None:
    loop = asyncio.get_running_loop()
    served: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
        loop.create_future())

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        key = re.search(rb"(?im)^sec-websocket-key: *(\S+)", request).group(1)
        answer = base64.b64encode(hashlib.sha1(key + GUID).digest())
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + answer + b"\r\n\r\n")
        served.set_result((reader, writer))

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    adapter = Adapter()
    sink = Sink(adapter)
    sink.begin(STEP)
    conn = await open_connection("own", sink, "127.0.0.1", port, "/sub", source="127.0.0.1",
                                 sampled=True)
    reader, writer = await served
    try:
        assert isinstance(conn, StampedConnection)

        # the client's frames are masked with the zero key; a ping gets its pong
        conn.send_text(b"hello")
        assert await reader.readexactly(11) == b"\x81\x85\0\0\0\0hello"
        # Linux turns receive timestamps on for the whole machine a moment after the first
        # socket asks (a deferred switch): segments that arrive before carry no stamp. Ping
        # until the client's read of a ping came stamped.
        deadline = time.monotonic() + 10
        while True:
            writer.write(server_frame(0x9, b"p"))
            assert await reader.readexactly(7) == b"\x8a\x81\0\0\0\0p"
            if conn.arrival_ns is not None:
                break
            assert time.monotonic() < deadline, "no receive timestamp within 10 s"

        # the server writes a marked frame; the loop (the generator) is then busy for 30 ms
        # before it can read it
        sent_ns = time.perf_counter_ns()
        text = message_text(STEP, sent_ns // 1000, 64)
        writer.write(server_frame(0x1, text.encode()))
        time.sleep(BLOCK_S)
        await sink.got.wait()

        [(payload, arrival_ns, callback_ns)] = sink.seen
        assert payload == text.encode()
        assert sink.count == 1
        assert arrival_ns is not None
        assert sent_ns <= arrival_ns <= callback_ns
        assert callback_ns - arrival_ns >= BLOCK_S * 1e9 * 0.9
        [arrival_us] = sink.latencies
        [read_us] = sink.read_latencies
        assert read_us >= BLOCK_S * 1e6
        assert arrival_us < BLOCK_S * 1e6 / 3  # the block is not in it
        assert sink.stamped == 1
        assert latency_clock(sink.stamped, len(sink.latencies)) == ARRIVAL_CLOCK
        assert adapter.others == []

        # a close is answered (masked, the code echoed) and ends the connection
        writer.write(server_frame(0x8, b"\x03\xe8"))
        assert await reader.readexactly(8) == b"\x88\x82\0\0\0\0\x03\xe8"
        assert await reader.read() == b""
        await adapter.closed
        assert conn.closed
    finally:
        conn.abort()
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_stamped_connection_takes_latency_at_the_socket(loop: str) -> None:
    if loop == "uvloop" and uvloop is None:
        pytest.skip("uvloop is not installed")
    # A loop of our own rather than asyncio.Runner (3.11+): the project supports 3.10.
    event_loop = uvloop.new_event_loop() if loop == "uvloop" else asyncio.new_event_loop()
    try:
        event_loop.run_until_complete(exchange())
        event_loop.run_until_complete(event_loop.shutdown_asyncgens())
    finally:
        event_loop.close()


def test_frames_without_a_stamp_fall_back_to_the_read_time() -> None:
    meter = Meter(SimpleNamespace())
    meter.begin(STEP)
    due_us = time.perf_counter_ns() // 1000 - 5000
    conn = SimpleNamespace(sampled=True, arrival_ns=None)
    meter.on_frame(conn, message_text(STEP, due_us, 40).encode())
    assert meter.latencies == meter.read_latencies
    assert meter.latencies[0] >= 5000
    assert meter.stamped == 0
    assert latency_clock(meter.stamped, len(meter.latencies)) == READ_CLOCK
