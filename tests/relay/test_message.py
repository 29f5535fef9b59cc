"""The fan-out (``relay/_message.py``): a message encoded once per wire format, framed once, and
queued on every open target; the targets are plain objects with what the fan-out reads
(``state``, ``wire_format``, ``_out``) and an ``enqueue`` that keeps to a limit.
"""

from __future__ import annotations

import pytest
from relayfakes import frames, records

from relaycore.protocol._hub import InvocationMessage, JsonHubProtocol, MessagePackHubProtocol
from relaycore.protocol._websocket import Opcode
from relaycore.relay import OutboundMessage, _message
from relaycore.relay._message import (
    WIRE_FORMATS,
    fan_out,
    hold_formats,
    queue_payloads,
    release_formats,
)
from relaycore.relay._peer import ConnState, Flusher

JSON, MSGPACK = JsonHubProtocol(), MessagePackHubProtocol()


class Target:
    def __init__(self, wire_format: str = "json", *, state: ConnState = ConnState.OPEN,
                 limit: int = 1 << 20) -> None:
        self.state = state
        self.wire_format = wire_format
        self._out = bytearray()
        self.limit = limit
        self.enqueued = 0

    def enqueue(self, data: bytes) -> bool:
        self.enqueued += 1
        if self.state is not ConnState.OPEN or len(self._out) + len(data) > self.limit:
            return False
        self._out += data
        return True

    def received(self) -> list:
        got = [m for _, payload in frames(self._out) for m in records(payload, self.wire_format)]
        self._out.clear()
        return got


def test_a_message_is_either_an_invocation_or_a_payload_map():
    with pytest.raises(ValueError):
        OutboundMessage()
    with pytest.raises(ValueError):
        OutboundMessage("t", payloads={"json": b"{}"})


def test_an_invocation_is_framed_once_per_wire_format_and_the_frame_shared():
    message = OutboundMessage.invocation("notify", "hi", 2)
    text = message.frame("json")
    assert text is message.frame("json")
    assert frames(text) == [(Opcode.TEXT, JSON.write_invocation("notify", ["hi", 2]))]
    assert frames(message.frame("messagepack")) == [
        (Opcode.BINARY, MSGPACK.write_invocation("notify", ["hi", 2]))]
    assert message.payload_map() == {"json": JSON.write_invocation("notify", ["hi", 2]),
                                     "messagepack": MSGPACK.write_invocation("notify", ["hi", 2])}


def test_a_payload_map_is_forwarded_as_is_and_a_missing_protocol_has_no_frame():
    message = OutboundMessage(payloads={"JSON": b'{"type":6}\x1e'})
    assert message.payload_map() == {"json": b'{"type":6}\x1e'}  # keys lower-cased
    assert frames(message.frame("json")) == [(Opcode.TEXT, b'{"type":6}\x1e')]
    assert message.frame("messagepack") is None
    assert message.frame("messagepack") is None  # and that is remembered too


def test_every_wire_format_frames_its_hub_protocol():
    assert {name: protocol for name, (protocol, _) in WIRE_FORMATS.items()} == {
        "json": "json", "messagepack": "messagepack", "json+sse": "json",
        "json+lp": "json", "messagepack+lp": "messagepack"}


def test_fan_out_queues_on_every_open_target_and_marks_the_empty_buffers():
    flusher = Flusher()
    targets = [Target(), Target("messagepack"), Target(state=ConnState.HANDSHAKE),
               Target(state=ConnState.CLOSING), Target()]
    targets[4]._out += b"\x81\x00"  # something queued already: marked before
    assert fan_out(targets, OutboundMessage.invocation("n", 1), flusher, 1 << 20) == 3
    assert flusher.dirty == [targets[0], targets[1]]
    assert targets[0].received() == [{"type": 1, "target": "n", "arguments": [1]}]
    assert targets[1].received() == [InvocationMessage("n", [1])]
    assert not targets[2]._out and not targets[3]._out
    assert all(t.enqueued == 0 for t in targets)  # the fast path appends to the buffers


def test_fan_out_hands_a_target_past_the_limit_to_its_enqueue():
    flusher = Flusher()
    message = OutboundMessage.invocation("n", "x" * 100)
    size = len(message.frame("json"))
    full, roomy, other = Target(limit=size), Target(), Target()
    full._out += b"\0" * 10
    assert fan_out([full, roomy, other], message, flusher, size + 5) == 2
    assert full.enqueued == 1 and len(full._out) == 10  # enqueue decides (and closes it)
    assert roomy.received() and other.received()


def test_fan_out_to_one_or_two_targets_frames_only_their_formats():
    message = OutboundMessage.invocation("n", 1)
    one = Target("messagepack")
    assert fan_out((one,), message, Flusher(), 1 << 20) == 1
    assert one.enqueued == 1 and "json" not in message._frames
    refusing = Target(state=ConnState.CLOSING)
    assert fan_out([one, refusing], message, Flusher(), 1 << 20) == 1


def test_queue_payloads_frames_each_payload_for_the_targets_of_its_protocol():
    payloads = {"json": JSON.write_invocation("n", [1]),
                "messagepack": MSGPACK.write_invocation("n", [1])}
    targets = [Target(), Target(), Target("messagepack"), Target(state=ConnState.CLOSING)]
    assert queue_payloads(targets, payloads) == 3
    assert [t.received() for t in targets[:3]] == [
        [{"type": 1, "target": "n", "arguments": [1]}],
        [{"type": 1, "target": "n", "arguments": [1]}],
        [InvocationMessage("n", [1])]]
    only_json = [Target("messagepack"), Target()]
    assert queue_payloads(only_json, {"json": payloads["json"]}) == 1
    assert not only_json[0]._out and only_json[0].enqueued == 0


def test_the_http_formats_carry_the_protocols_bytes_as_they_are_or_as_events():
    message = OutboundMessage.invocation("notify", "a\nb")
    assert message.frame("json+lp") == JSON.write_invocation("notify", ["a\nb"])
    assert message.frame("messagepack+lp") == MSGPACK.write_invocation("notify", ["a\nb"])
    event = b'data: {"type":1,"target":"notify","arguments":["a\\nb"]}\x1e\r\n\r\n'
    assert message.frame("json+sse") == b"%x\r\n%b\r\n" % (len(event), event)
    assert OutboundMessage(payloads={"json": b"{}\x1e"}).frame("messagepack+lp") is None


def test_a_fan_out_frames_the_http_formats_only_while_a_transport_holds_them(monkeypatch):
    # The holds are the process's: transports other tests left open must not count here.
    monkeypatch.setattr(_message, "_holders", {})
    monkeypatch.setattr(_message, "_framed", _message._ALWAYS_FRAMED)
    flusher = Flusher()
    targets = [Target(), Target("json+lp"), Target("messagepack+lp"), Target("json+sse")]
    message = OutboundMessage.invocation("n", 1)
    assert fan_out(targets, message, flusher, 1 << 20) == 1  # no transport may use them
    assert set(message._frames) == {"json", "messagepack"}
    held = ("json+lp", "messagepack+lp", "json+sse")
    hold_formats(held)
    hold_formats(held[:1])
    try:
        assert fan_out(targets, OutboundMessage.invocation("n", 2), flusher, 1 << 20) == 4
        release_formats(held)
        assert fan_out(targets, OutboundMessage.invocation("n", 3), flusher, 1 << 20) == 2
    finally:
        release_formats(held[:1])
    assert targets[1]._out == JSON.write_invocation("n", [2]) + JSON.write_invocation("n", [3])
    assert targets[2]._out == MSGPACK.write_invocation("n", [2])
