"""The WebSocket transport of a client session (``relay/_transport.py``): a ``Peer`` that hands
the session whole messages and its end, and frames what the session queues.

The first part drives ``Peer.receive`` with a client's masked frames, in memory: the transport
has no socket (its file descriptor is -1) and its poller only records what it is asked to
watch; what it queues is read from its send buffer. The second part is end to end: protocol
errors and slow consumers of a real relay, read by real WebSocket clients. A slow consumer's
Close reaches it: the backlog is dropped (and counted), the Close message and close frame go
first, and the stream stays well-formed (a frame the socket took part of is finished before
them).
"""

from __future__ import annotations

import json

import pytest
import trio
from relayfakes import (
    HUB,
    FakeUpstream,
    RecordingPoller,
    client_frame,
    close_code,
    frames,
    make_ops,
    records,
)
from relaysuite import Rest, assert_still_receives
from trio_websocket import ConnectionClosed

from relaycore._accel import apply_mask, encode_frame_header
from relaycore.protocol._websocket import (
    BinaryMessage,
    CloseCode,
    CloseReceived,
    Opcode,
    Role,
    TextMessage,
    WebSocketProtocol,
)
from relaycore.relay import OutboundMessage, RelayConfig, serve_relay
from relaycore.relay._peer import ConnState, PeerIO
from relaycore.relay._session import ClientSession
from relaycore.relay._transport import WebSocketTransport
from relayhelpers import KEY, RS, open_stalled_client, wait_for

HANDSHAKE = b'{"protocol":"json","version":1}\x1e'


class Wired:
    """A session on a ``WebSocketTransport`` without a socket, reading from now on."""

    def __init__(self, *, max_message_size: int = 4096, send_limit: int = 1 << 20,
                 close_timeout: float = 5.0) -> None:
        self.ops = make_ops(RelayConfig(max_message_size=max_message_size,
                                        send_buffer_limit=send_limit))
        self.poller = RecordingPoller()
        self.forgotten: list[object] = []
        io = PeerIO(self.poller, self.ops.flusher, close_timeout, self.ops.stats,  # type: ignore[arg-type]
                    self.forgotten.append)
        self.session = ClientSession(self.ops, connection_id="c1", hub=HUB, claims={},
                                     user_id="alice", query="", headers={})
        self.transport = WebSocketTransport(io, self.session, max_message_size=max_message_size,
                                            send_limit=send_limit, now=0.0)
        self.transport._reading = True  # what ``start`` does, but for the socket

    def receive(self, data: bytes, now: float = 1.0) -> None:
        self.transport.receive(data, now)

    def sent(self) -> list[tuple[int, bytes]]:
        """The frames queued since the last look (as if written)."""
        got = frames(self.transport._out)
        self.transport._out.clear()
        return got

    def opened(self) -> Wired:
        self.receive(client_frame(HANDSHAKE))
        assert self.sent() == [(Opcode.TEXT, b"{}\x1e")]
        return self


def invocation(invocation_id: str) -> bytes:
    return b'{"type":1,"invocationId":"%s","target":"Send","arguments":[]}\x1e' % (
        invocation_id.encode())


# -- in memory ----------------------------------------------------------------------------------


def test_the_session_shares_the_transports_send_buffer_and_state():
    wired = Wired()
    assert wired.session._out is wired.transport._out
    assert wired.transport.wire_format_for("messagepack") == "messagepack"
    wired.receive(client_frame(HANDSHAKE))
    assert wired.transport.state is wired.session.state is ConnState.OPEN
    # The first bytes queued mark the transport for the flusher.
    assert wired.ops.flusher.dirty == [wired.transport]


def test_whole_messages_and_fragmented_ones_reach_the_session_in_order():
    wired = Wired().opened()
    fragmented = (client_frame(invocation("2")[:10], fin=False)
                  + client_frame(b"pong?", Opcode.PING)
                  + client_frame(invocation("2")[10:], Opcode.CONTINUATION))
    wired.receive(client_frame(invocation("1")) + fragmented[:7])
    wired.receive(fragmented[7:] + client_frame(invocation("3"), Opcode.BINARY))
    sent = wired.sent()
    assert (Opcode.PONG, b"pong?") in sent
    answered = [m["invocationId"] for opcode, payload in sent if opcode == Opcode.TEXT
                for m in records(payload)]
    assert answered == ["1", "2", "3"]
    assert wired.transport.last_receive == 1.0


@pytest.mark.parametrize(
    ("data", "code", "says"),
    [
        (client_frame(b"x" * 5000), CloseCode.MESSAGE_TOO_BIG, "4096"),
        (client_frame(b"\xff\xfe"), CloseCode.INVALID_FRAME_PAYLOAD_DATA, "UTF-8"),
        (b"\x81\x02hi", CloseCode.PROTOCOL_ERROR, "mask"),
        (b"\x83\x80abcd", CloseCode.PROTOCOL_ERROR, "opcode"),
    ],
)
async def test_a_protocol_error_queues_the_close_message_before_the_close_frame(data, code,
                                                                                says):
    wired = Wired().opened()
    wired.receive(data)
    (text, close_message), (opcode, payload) = wired.sent()
    assert text == Opcode.TEXT and opcode == Opcode.CLOSE
    (message,) = records(close_message)
    assert message["type"] == 7 and says in message["error"]
    assert close_code(payload) == code
    assert wired.ops.connection(HUB, "c1") is None
    assert wired.ops.stats.protocol_errors == 1
    assert wired.session.state is ConnState.CLOSING


async def test_a_protocol_error_during_the_handshake_sends_only_the_close_frame():
    wired = Wired()
    wired.receive(b"\x81\x02hi")
    ((opcode, payload),) = wired.sent()
    assert opcode == Opcode.CLOSE and close_code(payload) == CloseCode.PROTOCOL_ERROR


async def test_a_clients_close_frame_is_answered_and_the_session_leaves(autojump_clock):
    wired = Wired(close_timeout=5).opened()
    wired.receive(client_frame(b"\x03\xe8", Opcode.CLOSE))
    assert wired.ops.connection(HUB, "c1") is None
    assert wired.session.state is ConnState.CLOSING
    ((opcode, payload),) = frames(wired.transport._out)  # the answer, still to be written
    assert opcode == Opcode.CLOSE and close_code(payload) == 1000
    # The close timer gives the answer until then to go out; then the transport is dropped.
    now = trio.current_time()
    assert not wired.transport.close_due(now + 4.9)
    assert wired.transport.close_due(now + 5)
    assert wired.session.state is wired.transport.state is ConnState.CLOSED
    assert wired.forgotten == [wired.transport]
    assert wired.poller.removed == [wired.transport]


def test_the_end_of_the_stream_ends_the_session_at_once():
    wired = Wired()
    upstream = wired.ops.serverless = FakeUpstream()
    wired.opened().receive(b"")
    assert wired.session.state is ConnState.CLOSED
    assert wired.forgotten == [wired.transport]
    assert upstream.events == [("connected", "c1"), ("disconnected", "c1", None)]
    wired.receive(client_frame(invocation("1")))  # nothing is read any more
    assert wired.sent() == []


async def test_a_session_past_the_send_limit_reads_its_close_after_the_unfinished_frame():
    wired = Wired(send_limit=300).opened()
    assert wired.session.enqueue(b"\x81\x7e\x00\xc8" + b"a" * 200)  # one 204-byte frame
    # The socket took 100 bytes of that frame: the rest must go before anything else.
    wired.transport._wait_writable(100)
    assert wired.transport._head_left == 104
    assert wired.session.enqueue(b"\x81\x05" + b"b" * 5)
    assert not wired.session.enqueue(b"\x81\x7e\x00\xc8" + b"c" * 200)
    out = bytes(wired.transport._out)
    assert out[:104] == b"a" * 104  # the frame the socket started on is finished
    (text, close_message), (opcode, payload) = frames(out[104:])
    assert records(close_message)[0]["error"] == (
        "Connection closed: the send buffer limit of 300 bytes was exceeded (slow consumer).")
    assert close_code(payload) == CloseCode.POLICY_VIOLATION
    assert wired.ops.stats.slow_consumer_closes == 1
    assert wired.ops.stats.slow_consumer_dropped_bytes == 7 + 204


async def test_the_relays_ticker_reaches_the_sessions_timers_through_the_transport():
    wired = Wired()
    wired.transport.tick(16.0)  # past the handshake timeout
    (handshake_answer, close_frame) = wired.sent()
    assert records(handshake_answer[1]) == [{"error": "Handshake was canceled."}]
    assert close_frame[0] == Opcode.CLOSE and close_code(close_frame[1]) == 1000


# -- end to end ---------------------------------------------------------------------------------


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


async def test_oversized_message_gets_close_message_and_code_1009(relay, rest, connect):
    healthy = await connect(relay, user="healthy")
    client = await connect(relay)
    await client.ws.send_message("x" * 5000)
    with trio.fail_after(3):
        message = await client.next_message()
    assert message["type"] == 7 and "4096" in message["error"]
    with pytest.raises(ConnectionClosed) as info, trio.fail_after(3):
        await client.ws.get_message()
    assert info.value.reason.code == 1009
    await assert_still_receives(rest, healthy)


async def test_invalid_utf8_text_frame_closes_with_1007(relay, rest, connect):
    healthy = await connect(relay, user="healthy")
    client = await connect(relay)
    # trio-websocket validates what it sends, so write a raw frame through its wsproto
    await client.ws._stream.send_all(b"\x81\x82abcd" + bytes([0xFF ^ 0x61, 0xFE ^ 0x62]))
    with pytest.raises(ConnectionClosed) as info, trio.fail_after(3):
        while True:
            await client.ws.get_message()
    assert info.value.reason.code == 1007
    await assert_still_receives(rest, healthy)


async def test_unmasked_client_frame_closes_with_1002(relay, rest, connect):
    healthy = await connect(relay, user="healthy")
    client = await connect(relay)
    await client.ws._stream.send_all(b"\x81\x02hi")
    with pytest.raises(ConnectionClosed) as info, trio.fail_after(3):
        while True:
            await client.ws.get_message()
    assert info.value.reason.code == 1002
    await assert_still_receives(rest, healthy)


async def test_reserved_opcode_closes_with_1002(relay, rest, connect):
    healthy = await connect(relay, user="healthy")
    client = await connect(relay)
    await client.ws._stream.send_all(b"\x83\x80abcd")  # opcode 3 is reserved
    with pytest.raises(ConnectionClosed) as info, trio.fail_after(3):
        while True:
            await client.ws.get_message()
    assert info.value.reason.code == 1002
    await assert_still_receives(rest, healthy)



async def test_several_messages_in_one_read_are_each_handled_with_or_without_control_frames(
    relay, connect
):
    """One write of whole masked frames (the relay's shortcut) and one that mixes in a ping and
    a message cut across two writes (the full parser): every invocation is answered, in order."""
    client = await connect(relay)

    def frame(text: str, first: int = 0x81) -> bytes:
        data = text.encode()
        return encode_frame_header(first & 0x0F, len(data), True, b"mask") + apply_mask(
            data, b"mask"
        )

    def invocation(i: int) -> str:
        return f'{{"type":1,"invocationId":"{i}","target":"Send{i}","arguments":[]}}' + RS

    stream = client.ws._stream
    await stream.send_all(frame(invocation(1)) + frame(invocation(2)) + frame(invocation(3)))
    with trio.fail_after(3):
        answered = [await client.next_message() for _ in range(3)]
    mixed = frame(invocation(4)) + frame("p", 0x89) + frame(invocation(5))
    await stream.send_all(mixed[:-7])
    await stream.send_all(mixed[-7:])
    with trio.fail_after(3):
        answered += [await client.next_message() for _ in range(2)]
    assert [(m["type"], m["invocationId"]) for m in answered] == [(3, str(i)) for i in range(1, 6)]
    assert all(f"Send{i}" in m["error"] for i, m in enumerate(answered, 1))



async def test_slow_consumer_is_closed_and_counted_while_others_get_everything(nursery, connect):
    config = RelayConfig(port=0, access_keys=[KEY], send_buffer_limit=256 << 10)
    relay = await nursery.start(serve_relay, config)
    healthy = await connect(relay, user="healthy")
    # A client that completes the handshake and then never reads again.
    stalled = await open_stalled_client(relay.port, "stalled")
    await wait_for(lambda: len(relay.table.get("chat").connections) == 2)
    big = "y" * 16000
    received = 0
    with trio.fail_after(10):
        for i in range(200):
            await relay.send_to_all("chat", OutboundMessage.invocation("big", i, big))
            while received <= i:
                message = await healthy.next_message()
                assert message["arguments"][0] == received
                received += 1
            if relay.stats.slow_consumer_closes:
                break
    assert relay.stats.slow_consumer_closes == 1
    assert await relay.user_exists("chat", "healthy")
    assert not await relay.user_exists("chat", "stalled")
    await assert_still_receives(Rest(relay), healthy)
    await stalled.aclose()

