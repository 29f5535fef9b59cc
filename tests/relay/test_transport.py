"""A slow consumer's Close reaches it: the backlog is dropped (and counted), the Close message
and close frame go first, and the stream stays well-formed (a frame the socket took part of is
finished before them)."""

from __future__ import annotations

import json

import pytest
import trio

from relaycore._accel import apply_mask, encode_frame_header
from relaycore.protocol._websocket import (
    BinaryMessage,
    CloseReceived,
    Opcode,
    Role,
    TextMessage,
    WebSocketProtocol,
    frame,
)
from relaycore.relay import OutboundMessage, RelayConfig, serve_relay
from relaycore.relay._peer import _frame_boundary
from relayhelpers import KEY, RS, open_stalled_client, wait_for


def test_frame_boundary_finds_the_end_of_the_frame_the_socket_took_part_of() -> None:
    frames = [frame(Opcode.TEXT, b"a" * n) for n in (10, 200, 70000, 5)]
    out = bytearray(b"".join(frames))
    ends = [sum(len(f) for f in frames[:i + 1]) for i in range(len(frames))]
    assert _frame_boundary(out, 0, 0) == 0
    assert _frame_boundary(out, 0, 1) == ends[0]
    assert _frame_boundary(out, 0, ends[0]) == ends[0]
    assert _frame_boundary(out, 0, ends[0] + 1) == ends[1]
    assert _frame_boundary(out, 0, ends[2] - 1) == ends[2]
    # The buffer starts with the last 7 bytes of a frame already partly written.
    tail = bytearray(b"1234567") + out
    assert _frame_boundary(tail, 7, 3) == 7
    assert _frame_boundary(tail, 7, 8) == 7 + ends[0]


@pytest.mark.parametrize("payload_size", [16000, 700])
async def test_a_slow_consumer_reads_its_close_before_the_dropped_backlog(nursery, payload_size):
    config = RelayConfig(port=0, access_keys=[KEY], send_buffer_limit=256 << 10,
                         close_timeout=10)
    relay = await nursery.start(serve_relay, config)
    stalled = await open_stalled_client(relay.port, "stalled")
    await wait_for(lambda: relay.table.get("chat") is not None
                   and len(relay.table.get("chat").connections) == 1)
    big = "y" * payload_size
    sent = 0
    with trio.fail_after(10):
        while not relay.stats.slow_consumer_closes:
            await relay.send_to_all("chat", OutboundMessage.invocation("big", sent, big))
            sent += 1
            await trio.sleep(0)  # let the flusher write, so the socket takes part of a frame
    assert relay.stats.slow_consumer_dropped_bytes > payload_size

    # Now read everything the relay still sends, as a WebSocket client would.
    ws = WebSocketProtocol(Role.CLIENT, max_message_size=None, mask_key=lambda: b"\0\0\0\0")
    head = bytearray()
    while b"\r\n\r\n" not in head:
        head += await stalled.receive_some(1)  # the 101 answer, byte by byte: no frame bytes
    assert head.startswith(b"HTTP/1.1 101 ")
    numbers: list[int] = []
    close_message = None
    close_frame = None
    with trio.fail_after(10):
        while close_frame is None:
            data = await stalled.receive_some(65536)
            assert data, "the relay closed the socket before its close frame arrived"
            ws.receive_data(data)
            for event in ws.events_received():
                if isinstance(event, (TextMessage, BinaryMessage)):
                    text = event.data if isinstance(event, TextMessage) else event.data.decode()
                    for record in text.split(RS)[:-1]:
                        message = json.loads(record)
                        if message.get("type") == 1:
                            assert close_message is None, "a message came after the Close"
                            numbers.append(message["arguments"][0])
                        elif message.get("type") == 7:
                            close_message = message
                elif isinstance(event, CloseReceived):
                    close_frame = event
            assert ws.error is None, f"the stream broke: {ws.error}"
    assert numbers == list(range(len(numbers)))  # in order, nothing skipped but the tail
    assert len(numbers) < sent - 1  # the backlog behind the socket's share was dropped
    assert close_message is not None and "send buffer limit" in close_message["error"]
    assert close_frame.code == 1008
    await stalled.aclose()


async def test_a_client_that_pings_and_never_reads_is_closed_at_the_send_limit(nursery, connect):
    config = RelayConfig(port=0, access_keys=[KEY], send_buffer_limit=64 << 10)
    relay = await nursery.start(serve_relay, config)
    healthy = await connect(relay, user="healthy")
    flooder = await open_stalled_client(relay.port, "flood")
    mask = b"\x01\x02\x03\x04"
    pings = (encode_frame_header(Opcode.PING, 125, mask=mask) + apply_mask(b"p" * 125, mask)) * 64
    # Each ping is answered with a pong the client never reads: without a bound the relay
    # would hold every one of them.
    with trio.fail_after(30):
        while not relay.stats.slow_consumer_closes:
            await flooder.send_all(pings)
    assert not await relay.user_exists("chat", "flood")
    assert relay.stats.slow_consumer_dropped_bytes > 0
    assert await relay.send_to_all("chat", OutboundMessage.invocation("n", 1)) == 1
    with trio.fail_after(3):
        assert (await healthy.next_message())["arguments"] == [1]
    await flooder.aclose()
