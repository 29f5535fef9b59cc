"""Tests of relaycore.protocol._websocket: two in-memory peers, wire tables, RFC 6455 vectors."""

from __future__ import annotations

import itertools
import tracemalloc

import pytest

from relaycore._accel import apply_mask, encode_frame_header
from relaycore.protocol._errors import LocalProtocolError, RemoteProtocolError
from relaycore.protocol._websocket import (
    BinaryMessage,
    CloseCode,
    CloseReceived,
    Opcode,
    Ping,
    Pong,
    Role,
    State,
    TextMessage,
    WebSocketProtocol,
    accept_key,
    frame,
    is_valid_client_key,
)

#: RFC 6455 §5.7's masking key.
RFC_MASK = bytes.fromhex("37fa213d")


def fixed_mask(key: bytes = RFC_MASK):
    return lambda: key


def counting_masks():
    """Distinct, deterministic mask keys, so that masking bugs cannot hide behind one key."""
    counter = itertools.count(1)
    return lambda: next(counter).to_bytes(4, "big")


def masked(opcode: int, payload: bytes, fin: bool = True, rsv: int = 0, mask=RFC_MASK) -> bytes:
    """A client-to-server frame, built independently of WebSocketProtocol."""
    return encode_frame_header(opcode, len(payload), fin, mask, rsv) + apply_mask(payload, mask)


def unmasked(opcode: int, payload: bytes, fin: bool = True, rsv: int = 0) -> bytes:
    return encode_frame_header(opcode, len(payload), fin, None, rsv) + payload


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return code.to_bytes(2, "big") + reason


class Pair:
    """A server and a client WebSocketProtocol wired back to back (h11's ConnectionPair)."""

    def __init__(self, **kwargs) -> None:
        self.server = WebSocketProtocol(Role.SERVER, **kwargs)
        self.client = WebSocketProtocol(Role.CLIENT, mask_key=counting_masks(), **kwargs)

    def pump(self) -> tuple[list, list]:
        """Move bytes both ways until quiet; return (server's events, client's events)."""
        server_events: list = []
        client_events: list = []
        while True:
            to_server = self.client.data_to_send()
            to_client = self.server.data_to_send()
            if not to_server and not to_client:
                return server_events, client_events
            self.server.receive_data(to_server)
            self.client.receive_data(to_client)
            server_events += self.server.events_received()
            client_events += self.client.events_received()


def decode_as(role: Role, data: bytes) -> list:
    """What a fresh peer in ``role`` makes of ``data``."""
    kwargs = {"mask_key": counting_masks()} if role is Role.CLIENT else {}
    peer = WebSocketProtocol(role, max_message_size=None, **kwargs)
    peer.receive_data(data)
    assert peer.error is None
    return peer.events_received()


# Peers ------------------------------------------------------------------------------------


def test_pair_text_from_client_arrives_at_server_as_text_message():
    pair = Pair()
    pair.client.send_text("héllo ✓")
    assert pair.pump() == ([TextMessage("héllo ✓")], [])


def test_pair_text_from_server_arrives_at_client_as_text_message():
    pair = Pair()
    pair.server.send_text(b"already utf-8")
    assert pair.pump() == ([], [TextMessage("already utf-8")])


def test_pair_binary_both_ways_arrives_as_binary_messages():
    pair = Pair()
    pair.client.send_binary(bytearray(b"\x00\x01\xff"))
    pair.server.send_binary(memoryview(b"\xfe\x00"))
    assert pair.pump() == ([BinaryMessage(b"\x00\x01\xff")], [BinaryMessage(b"\xfe\x00")])


def test_pair_many_messages_in_one_read_arrive_in_order():
    pair = Pair()
    for i in range(5):
        pair.client.send_text(str(i))
        pair.client.send_binary(bytes([i]))
    server_events, _ = pair.pump()
    expected = []
    for i in range(5):
        expected += [TextMessage(str(i)), BinaryMessage(bytes([i]))]
    assert server_events == expected


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 200_000])
def test_pair_payload_of_any_length_form_round_trips(size):
    pair = Pair(max_message_size=None)
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    pair.client.send_binary(data)
    pair.server.send_binary(data)
    assert pair.pump() == ([BinaryMessage(data)], [BinaryMessage(data)])


def test_pair_fragmented_text_from_server_is_reassembled_across_utf8_boundaries():
    pair = Pair()
    raw = "añ€😀".encode()
    # Split inside every multi-byte character.
    pieces = [raw[:2], raw[2:4], raw[4:7], raw[7:]]
    wire = frame(Opcode.TEXT, pieces[0], fin=False)
    wire += frame(Opcode.CONTINUATION, pieces[1], fin=False)
    wire += frame(Opcode.CONTINUATION, pieces[2], fin=False)
    wire += frame(Opcode.CONTINUATION, pieces[3])
    pair.client.receive_data(wire)
    assert pair.client.events_received() == [TextMessage("añ€😀")]


def test_pair_fragmented_binary_from_client_is_reassembled():
    server = WebSocketProtocol(Role.SERVER)
    server.receive_data(
        masked(Opcode.BINARY, b"ab", fin=False)
        + masked(Opcode.CONTINUATION, b"", fin=False)
        + masked(Opcode.CONTINUATION, b"cd")
    )
    assert server.events_received() == [BinaryMessage(b"abcd")]
    assert server.error is None


def test_pair_control_frames_between_fragments_are_handled_in_order():
    server = WebSocketProtocol(Role.SERVER)
    server.receive_data(
        masked(Opcode.TEXT, b"Hel", fin=False)
        + masked(Opcode.PING, b"p")
        + masked(Opcode.PONG, b"q")
        + masked(Opcode.CONTINUATION, b"lo")
    )
    assert server.events_received() == [Ping(b"p"), Pong(b"q"), TextMessage("Hello")]
    assert server.data_to_send() == frame(Opcode.PONG, b"p")


def test_pair_ping_is_answered_with_pong_of_same_payload():
    pair = Pair()
    pair.client.send_ping(b"hb-1")
    assert pair.pump() == ([Ping(b"hb-1")], [Pong(b"hb-1")])


def test_pair_unsolicited_pong_arrives_as_pong():
    pair = Pair()
    pair.server.send_pong(b"x")
    assert pair.pump() == ([], [Pong(b"x")])


def test_pair_client_initiated_close_completes_handshake():
    pair = Pair()
    pair.client.send_close(CloseCode.GOING_AWAY, "bye")
    assert pair.client.state is State.CLOSING
    assert not pair.client.close_expected()

    pair.server.receive_data(pair.client.data_to_send())
    assert pair.server.events_received() == [CloseReceived(1001, "bye")]
    assert pair.server.state is State.CLOSING  # the echo is not flushed yet
    assert pair.server.close_expected()
    echo = pair.server.data_to_send()
    assert echo == frame(Opcode.CLOSE, close_payload(1001, b"bye"))
    assert pair.server.state is State.CLOSED

    pair.client.receive_data(echo)
    assert pair.client.events_received() == [CloseReceived(1001, "bye")]
    assert pair.client.state is State.CLOSED
    assert pair.client.close_expected()
    for side in (pair.client, pair.server):
        assert (side.close_code, side.close_reason, side.error) == (1001, "bye", None)


def test_pair_server_initiated_close_completes_handshake():
    pair = Pair()
    pair.server.send_close(4000, "custom")
    server_events, client_events = pair.pump()
    assert server_events == [CloseReceived(4000, "custom")]
    assert client_events == [CloseReceived(4000, "custom")]
    for side in (pair.client, pair.server):
        assert side.state is State.CLOSED
        assert side.close_expected()
        assert side.close_code == 4000


def test_pair_close_without_code_is_received_as_1005_and_echoed_empty():
    pair = Pair()
    pair.client.send_close(CloseCode.NO_STATUS_RCVD)
    pair.server.receive_data(pair.client.data_to_send())
    assert pair.server.events_received() == [CloseReceived(1005, "")]
    assert pair.server.data_to_send() == b"\x88\x00"


def test_pair_simultaneous_close_ends_closed_on_both_sides():
    pair = Pair()
    pair.client.send_close(1000, "a")
    pair.server.send_close(1001, "b")
    server_events, client_events = pair.pump()
    assert server_events == [CloseReceived(1000, "a")]
    assert client_events == [CloseReceived(1001, "b")]
    assert (pair.client.close_code, pair.server.close_code) == (1000, 1001)
    assert pair.client.state is pair.server.state is State.CLOSED


def test_pair_messages_sent_before_close_arrive_before_close():
    pair = Pair()
    pair.client.send_text("last")
    pair.client.send_close()
    assert pair.pump()[0] == [TextMessage("last"), CloseReceived(1000, "")]


def test_protocol_data_frames_after_close_sent_are_still_delivered():
    server = WebSocketProtocol(Role.SERVER)
    server.send_close()
    server.data_to_send()
    server.receive_data(masked(Opcode.TEXT, b"late"))
    assert server.events_received() == [TextMessage("late")]
    assert not server.close_expected()


def test_protocol_ping_after_close_sent_is_reported_but_not_answered():
    server = WebSocketProtocol(Role.SERVER)
    server.send_close()
    server.data_to_send()
    server.receive_data(masked(Opcode.PING, b"p"))
    assert server.events_received() == [Ping(b"p")]
    assert server.data_to_send() == b""


def test_protocol_data_after_close_received_is_ignored():
    server = WebSocketProtocol(Role.SERVER)
    server.receive_data(masked(Opcode.CLOSE, close_payload(1000)) + masked(Opcode.TEXT, b"x"))
    server.receive_data(masked(Opcode.PING, b"y") + b"\xff\xff garbage")
    assert server.events_received() == [CloseReceived(1000, "")]
    assert server.data_to_send() == frame(Opcode.CLOSE, close_payload(1000))
    assert server.error is None


@pytest.mark.parametrize(
    "send",
    [
        lambda ws: ws.send_text("x"),
        lambda ws: ws.send_binary(b"x"),
        lambda ws: ws.send_ping(),
        lambda ws: ws.send_pong(),
        lambda ws: ws.send_close(),
    ],
    ids=["text", "binary", "ping", "pong", "close"],
)
@pytest.mark.parametrize("how", ["sent", "echoed", "failed", "eof"])
def test_protocol_send_after_close_raises_local_protocol_error(send, how):
    server = WebSocketProtocol(Role.SERVER)
    if how == "sent":
        server.send_close()
    elif how == "echoed":
        server.receive_data(masked(Opcode.CLOSE, b""))
    elif how == "failed":
        server.receive_data(unmasked(Opcode.TEXT, b"x"))
    else:
        server.receive_eof()
    with pytest.raises(LocalProtocolError):
        send(server)


def test_protocol_send_close_truncates_reason_at_character_boundary():
    server = WebSocketProtocol(Role.SERVER)
    server.send_close(1000, "é" * 100)  # 200 bytes of UTF-8
    (event,) = decode_as(Role.CLIENT, server.data_to_send())
    assert event == CloseReceived(1000, "é" * 61)  # 122 bytes: 123 would split a character


@pytest.mark.parametrize("code", [999, 1004, 1006, 1015, 1016, 2999, 5000])
def test_protocol_send_close_with_invalid_code_raises(code):
    server = WebSocketProtocol(Role.SERVER)
    with pytest.raises(LocalProtocolError):
        server.send_close(code)
    assert server.state is State.OPEN


@pytest.mark.parametrize("method", ["send_ping", "send_pong"])
def test_protocol_control_payload_over_125_bytes_raises(method):
    server = WebSocketProtocol(Role.SERVER)
    with pytest.raises(LocalProtocolError):
        getattr(server, method)(b"x" * 126)
    getattr(server, method)(b"x" * 125)


def test_protocol_client_without_mask_key_is_refused():
    with pytest.raises(ValueError):
        WebSocketProtocol(Role.CLIENT)


def test_protocol_server_with_mask_key_is_refused():
    with pytest.raises(ValueError):
        WebSocketProtocol(Role.SERVER, mask_key=fixed_mask())


def test_protocol_client_masks_every_frame_with_a_fresh_key():
    keys = iter([b"\x01\x02\x03\x04", b"\xaa\xbb\xcc\xdd"])
    client = WebSocketProtocol(Role.CLIENT, mask_key=lambda: next(keys))
    client.send_binary(b"abcd")
    client.send_binary(b"abcd")
    assert client.data_to_send() == masked(
        Opcode.BINARY, b"abcd", mask=b"\x01\x02\x03\x04"
    ) + masked(Opcode.BINARY, b"abcd", mask=b"\xaa\xbb\xcc\xdd")


def test_protocol_data_to_send_is_empty_after_being_read():
    server = WebSocketProtocol(Role.SERVER)
    server.send_text("x")
    assert server.data_to_send() == b"\x81\x01x"
    assert server.data_to_send() == b""
    assert server.events_received() == []


def test_protocol_eof_while_open_closes_with_1006():
    server = WebSocketProtocol(Role.SERVER)
    server.receive_data(masked(Opcode.TEXT, b"partial", fin=False))
    server.receive_eof()
    assert server.state is State.CLOSED
    assert (server.close_code, server.close_reason) == (1006, "")
    assert server.close_expected()
    assert server.error is None
    server.receive_data(masked(Opcode.TEXT, b"more"))
    assert server.events_received() == []


def test_protocol_eof_after_close_sent_without_answer_closes_with_1006():
    server = WebSocketProtocol(Role.SERVER)
    server.send_close(1000)
    server.receive_eof()
    assert (server.state, server.close_code) == (State.CLOSED, 1006)


def test_protocol_eof_after_completed_handshake_keeps_close_code():
    server = WebSocketProtocol(Role.SERVER)
    server.receive_data(masked(Opcode.CLOSE, close_payload(1001, b"away")))
    server.data_to_send()
    server.receive_eof()
    assert (server.state, server.close_code, server.close_reason) == (
        State.CLOSED,
        1001,
        "away",
    )


def test_protocol_eof_after_failure_keeps_failure_code():
    server = WebSocketProtocol(Role.SERVER)
    server.receive_data(unmasked(Opcode.TEXT, b"x"))
    server.receive_eof()
    assert (server.state, server.close_code) == (State.CLOSED, 1002)


# RFC 6455 §5.7 examples ---------------------------------------------------------------------

RFC_HELLO_UNMASKED = bytes.fromhex("810548656c6c6f")
RFC_HELLO_MASKED = bytes.fromhex("818537fa213d7f9f4d5158")
RFC_FRAGMENTS = bytes.fromhex("010348656c") + bytes.fromhex("80026c6f")
RFC_PING_UNMASKED = bytes.fromhex("890548656c6c6f")
RFC_PONG_MASKED = bytes.fromhex("8a8537fa213d7f9f4d5158")
RFC_BINARY_256 = bytes.fromhex("827e0100")
RFC_BINARY_64K = bytes.fromhex("827f0000000000010000")


def test_rfc_single_unmasked_text_frame_is_what_frame_encodes():
    assert frame(Opcode.TEXT, b"Hello") == RFC_HELLO_UNMASKED
    server = WebSocketProtocol(Role.SERVER)
    server.send_text("Hello")
    assert server.data_to_send() == RFC_HELLO_UNMASKED


def test_rfc_single_unmasked_text_frame_parses_at_client():
    assert decode_as(Role.CLIENT, RFC_HELLO_UNMASKED) == [TextMessage("Hello")]


def test_rfc_single_masked_text_frame_is_what_client_sends():
    client = WebSocketProtocol(Role.CLIENT, mask_key=fixed_mask())
    client.send_text("Hello")
    assert client.data_to_send() == RFC_HELLO_MASKED


def test_rfc_single_masked_text_frame_parses_at_server():
    assert decode_as(Role.SERVER, RFC_HELLO_MASKED) == [TextMessage("Hello")]


def test_rfc_fragmented_unmasked_text_is_what_frame_encodes_and_parses_whole():
    assert frame(Opcode.TEXT, b"Hel", fin=False) + frame(Opcode.CONTINUATION, b"lo") == (
        RFC_FRAGMENTS
    )
    assert decode_as(Role.CLIENT, RFC_FRAGMENTS) == [TextMessage("Hello")]


def test_rfc_unmasked_ping_round_trips():
    assert frame(Opcode.PING, b"Hello") == RFC_PING_UNMASKED
    server = WebSocketProtocol(Role.SERVER)
    server.send_ping(b"Hello")
    assert server.data_to_send() == RFC_PING_UNMASKED
    client = WebSocketProtocol(Role.CLIENT, mask_key=fixed_mask())
    client.receive_data(RFC_PING_UNMASKED)
    assert client.events_received() == [Ping(b"Hello")]
    # The automatic answer is the RFC's masked Pong.
    assert client.data_to_send() == RFC_PONG_MASKED


def test_rfc_masked_pong_parses_at_server():
    assert decode_as(Role.SERVER, RFC_PONG_MASKED) == [Pong(b"Hello")]


def test_rfc_256_byte_binary_uses_16_bit_length():
    data = bytes(range(256))
    assert frame(Opcode.BINARY, data) == RFC_BINARY_256 + data
    assert decode_as(Role.CLIENT, RFC_BINARY_256 + data) == [BinaryMessage(data)]


def test_rfc_64_kib_binary_uses_64_bit_length():
    data = b"\x5a" * 65536
    assert frame(Opcode.BINARY, data) == RFC_BINARY_64K + data
    assert decode_as(Role.CLIENT, RFC_BINARY_64K + data) == [BinaryMessage(data)]


def test_frame_control_payload_over_125_bytes_raises():
    with pytest.raises(LocalProtocolError):
        frame(Opcode.PING, b"x" * 126)


def test_frame_accepts_bytearray_and_memoryview_payloads():
    assert frame(Opcode.BINARY, bytearray(b"ab")) == b"\x82\x02ab"
    assert frame(Opcode.BINARY, memoryview(b"ab")) == b"\x82\x02ab"


# Opening handshake helpers ------------------------------------------------------------------


def test_accept_key_rfc_example_matches():
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize(
    ("key", "valid"),
    [
        ("dGhlIHNhbXBsZSBub25jZQ==", True),
        ("AAAAAAAAAAAAAAAAAAAAAA==", True),
        ("", False),
        ("dGhlIHNhbXBsZSBub25jZQ", False),  # padding missing
        ("dGhlIHNhbXBsZSBub25j", False),  # 15 bytes
        ("dGhlIHNhbXBsZSBub25jZXM=", False),  # 17 bytes
        ("dGhlIHNhbXBsZSBub25jZQ!=", False),  # not base64
        ("dGhlIHNhbXBsZSBub25jZé==", False),  # not ASCII
        (" dGhlIHNhbXBsZSBub25jZQ==", False),
    ],
)
def test_is_valid_client_key_checks_base64_of_16_bytes(key, valid):
    assert is_valid_client_key(key) is valid


# Wire errors --------------------------------------------------------------------------------

# (id, role, wire bytes, expected close code). Each wire is preceded by nothing; bytes after
# the bad frame must be ignored.
WIRE_ERRORS = [
    ("server_gets_unmasked_frame", Role.SERVER, unmasked(Opcode.TEXT, b"hi"), 1002),
    ("client_gets_masked_frame", Role.CLIENT, masked(Opcode.TEXT, b"hi"), 1002),
    ("rsv1_set", Role.SERVER, masked(Opcode.TEXT, b"hi", rsv=4), 1002),
    ("rsv2_set", Role.SERVER, masked(Opcode.BINARY, b"hi", rsv=2), 1002),
    ("rsv3_set", Role.CLIENT, unmasked(Opcode.PING, b"", rsv=1), 1002),
    *[
        (f"opcode_{op:#x}", Role.SERVER, masked(op, b""), 1002)
        for op in (3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF)
    ],
    ("continuation_without_message", Role.SERVER, masked(Opcode.CONTINUATION, b"x"), 1002),
    (
        "text_while_fragmented_text",
        Role.SERVER,
        masked(Opcode.TEXT, b"a", fin=False) + masked(Opcode.TEXT, b"b"),
        1002,
    ),
    (
        "binary_while_fragmented_binary",
        Role.CLIENT,
        unmasked(Opcode.BINARY, b"a", fin=False) + unmasked(Opcode.BINARY, b"b", fin=False),
        1002,
    ),
    ("fragmented_ping", Role.SERVER, masked(Opcode.PING, b"p", fin=False), 1002),
    ("fragmented_close", Role.SERVER, masked(Opcode.CLOSE, b"", fin=False), 1002),
    ("ping_of_126_bytes", Role.SERVER, masked(Opcode.PING, b"p" * 126), 1002),
    ("pong_of_126_bytes", Role.CLIENT, unmasked(Opcode.PONG, b"p" * 126), 1002),
    (
        "close_of_126_bytes",
        Role.SERVER,
        masked(Opcode.CLOSE, close_payload(1000, b"r" * 124)),
        1002,
    ),
    ("close_of_1_byte", Role.SERVER, masked(Opcode.CLOSE, b"\x03"), 1002),
    *[
        (f"close_code_{code}", Role.SERVER, masked(Opcode.CLOSE, close_payload(code)), 1002)
        for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535)
    ],
    (
        "64_bit_length_with_msb_set",
        Role.CLIENT,
        b"\x82\x7f\x80\x00\x00\x00\x00\x00\x00\x00",
        1002,
    ),
    ("invalid_utf8_text", Role.SERVER, masked(Opcode.TEXT, b"\xce\xba\xe1\xbd"), 1007),
    ("surrogate_in_text", Role.CLIENT, unmasked(Opcode.TEXT, b"\xed\xa0\x80"), 1007),
    ("overlong_utf8_text", Role.SERVER, masked(Opcode.TEXT, b"\xc0\xaf"), 1007),
    (
        "invalid_utf8_in_first_fragment",
        Role.SERVER,
        masked(Opcode.TEXT, b"ok\xff", fin=False),
        1007,
    ),
    (
        "utf8_truncated_at_message_end",
        Role.SERVER,
        masked(Opcode.TEXT, b"ok", fin=False) + masked(Opcode.CONTINUATION, b"\xe2\x82"),
        1007,
    ),
    (
        "invalid_utf8_in_close_reason",
        Role.SERVER,
        masked(Opcode.CLOSE, close_payload(1000, b"\xff")),
        1007,
    ),
    ("frame_over_max_size", Role.SERVER, masked(Opcode.BINARY, b"x" * 101), 1009),
    (
        "fragments_over_max_size",
        Role.CLIENT,
        unmasked(Opcode.TEXT, b"x" * 60, fin=False) + unmasked(Opcode.CONTINUATION, b"x" * 41),
        1009,
    ),
]


def make(role: Role, max_message_size: int | None = 100) -> WebSocketProtocol:
    kwargs = {"mask_key": counting_masks()} if role is Role.CLIENT else {}
    return WebSocketProtocol(role, max_message_size=max_message_size, **kwargs)


def after_valid_frame(role: Role) -> bytes:
    return masked(Opcode.BINARY, b"ok") if role is Role.SERVER else unmasked(Opcode.BINARY, b"ok")


@pytest.mark.parametrize(
    ("role", "wire", "code"), [c[1:] for c in WIRE_ERRORS], ids=[c[0] for c in WIRE_ERRORS]
)
def test_wire_error_fails_connection_with_expected_close_code(role, wire, code):
    ws = make(role)
    ws.receive_data(after_valid_frame(role) + wire + after_valid_frame(role))
    # Frames before the bad one are delivered; nothing after it is.
    assert ws.events_received() == [BinaryMessage(b"ok")]
    assert isinstance(ws.error, RemoteProtocolError)
    assert str(ws.error)
    assert ws.close_code == code
    assert ws.state is State.CLOSING
    assert ws.close_expected()
    other = Role.CLIENT if role is Role.SERVER else Role.SERVER
    (close,) = decode_as(other, ws.data_to_send())
    assert isinstance(close, CloseReceived)
    assert close.code == code
    assert close.reason == ws.close_reason
    assert 0 < len(close.reason.encode()) <= 123
    # Later input is ignored, and nothing more is sent.
    ws.receive_data(after_valid_frame(role) + masked(Opcode.PING, b"") + b"\xff" * 20)
    assert ws.events_received() == []
    assert ws.data_to_send() == b""


@pytest.mark.parametrize(
    ("role", "wire", "code"), [c[1:] for c in WIRE_ERRORS], ids=[c[0] for c in WIRE_ERRORS]
)
def test_wire_error_fed_byte_at_a_time_fails_the_same_way(role, wire, code):
    ws = make(role)
    for i in range(len(wire)):
        ws.receive_data(wire[i : i + 1])
    assert ws.events_received() == []
    assert ws.close_code == code
    assert isinstance(ws.error, RemoteProtocolError)


@pytest.mark.parametrize("code", [*range(1000, 1004), *range(1007, 1015), 3000, 3999, 4000, 4999])
def test_wire_close_with_valid_code_is_accepted(code):
    server = make(Role.SERVER)
    server.receive_data(masked(Opcode.CLOSE, close_payload(code, "fin ✓".encode())))
    assert server.events_received() == [CloseReceived(code, "fin ✓")]
    assert server.error is None


def test_wire_error_after_close_sent_keeps_sent_code_and_sends_nothing_more():
    server = make(Role.SERVER)
    server.send_close(1001, "going")
    server.data_to_send()
    server.receive_data(unmasked(Opcode.TEXT, b"x"))
    assert isinstance(server.error, RemoteProtocolError)
    assert server.close_code == 1001
    assert server.close_expected()
    assert server.data_to_send() == b""


# Message size limit -------------------------------------------------------------------------


def test_max_size_oversized_frame_fails_from_its_header_alone():
    server = make(Role.SERVER, max_message_size=1 << 20)
    # Only the header of a 2 GiB frame: the protocol must not wait for (or buffer) its payload.
    server.receive_data(encode_frame_header(Opcode.BINARY, 1 << 31, True, RFC_MASK))
    assert server.close_code == CloseCode.MESSAGE_TOO_BIG
    assert "1048576" in server.close_reason
    assert server.close_expected()


def test_max_size_fragments_fail_once_their_sum_exceeds_the_limit():
    server = make(Role.SERVER, max_message_size=100)
    server.receive_data(masked(Opcode.BINARY, b"x" * 50, fin=False))
    server.receive_data(masked(Opcode.CONTINUATION, b"x" * 50, fin=False))
    assert server.error is None
    # The header announcing one byte too many is enough.
    server.receive_data(encode_frame_header(Opcode.CONTINUATION, 1, True, RFC_MASK))
    assert server.close_code == 1009
    assert server.events_received() == []


def test_max_size_message_of_exactly_the_limit_is_accepted():
    server = make(Role.SERVER, max_message_size=100)
    server.receive_data(masked(Opcode.TEXT, b"x" * 100))
    server.receive_data(masked(Opcode.TEXT, b"y" * 40, fin=False) + masked(0, b"y" * 60))
    assert server.events_received() == [TextMessage("x" * 100), TextMessage("y" * 100)]
    assert server.error is None


def test_max_size_does_not_apply_to_control_frames_between_fragments():
    server = make(Role.SERVER, max_message_size=10)
    server.receive_data(
        masked(Opcode.TEXT, b"x" * 10, fin=False)
        + masked(Opcode.PING, b"p" * 100)
        + masked(Opcode.CONTINUATION, b"")
    )
    assert server.events_received() == [Ping(b"p" * 100), TextMessage("x" * 10)]


def test_max_size_none_accepts_any_size():
    client = make(Role.CLIENT, max_message_size=None)
    client.receive_data(frame(Opcode.BINARY, b"z" * 3_000_000))
    assert client.events_received() == [BinaryMessage(b"z" * 3_000_000)]


# Chunking -----------------------------------------------------------------------------------


def mixed_stream() -> bytes:
    """Client-to-server bytes exercising every frame kind and length form."""
    return b"".join(
        [
            masked(Opcode.TEXT, "héllo".encode()),
            masked(Opcode.BINARY, bytes(range(256)) * 2, mask=b"\x01\x02\x03\x04"),
            masked(Opcode.TEXT, "€".encode()[:2], fin=False),
            masked(Opcode.PING, b"mid"),
            masked(Opcode.CONTINUATION, "€".encode()[2:] + b"!"),
            masked(Opcode.BINARY, b"", fin=False),
            masked(Opcode.CONTINUATION, b"a" * 70000),
            masked(Opcode.PONG, b""),
            masked(Opcode.TEXT, b""),
            masked(Opcode.CLOSE, close_payload(1000, b"done")),
        ]
    )


def feed(chunks) -> tuple[list, bytes]:
    server = make(Role.SERVER, max_message_size=None)
    for chunk in chunks:
        server.receive_data(chunk)
    assert server.error is None
    return server.events_received(), server.data_to_send()


def test_chunking_whole_stream_gives_every_expected_event():
    events, out = feed([mixed_stream()])
    assert events == [
        TextMessage("héllo"),
        BinaryMessage(bytes(range(256)) * 2),
        Ping(b"mid"),
        TextMessage("€!"),
        BinaryMessage(b"a" * 70000),
        Pong(b""),
        TextMessage(""),
        CloseReceived(1000, "done"),
    ]
    assert out == frame(Opcode.PONG, b"mid") + frame(Opcode.CLOSE, close_payload(1000, b"done"))


def test_chunking_byte_at_a_time_gives_same_events_as_whole():
    stream = mixed_stream()
    assert feed(stream[i : i + 1] for i in range(len(stream))) == feed([stream])


@pytest.mark.parametrize("size", [2, 3, 7, 125, 4096])
@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_chunking_any_chunk_size_and_buffer_type_gives_same_events(size, kind):
    stream = mixed_stream()
    chunks = [kind(stream[i : i + size]) for i in range(0, len(stream), size)]
    assert feed(chunks) == feed([stream])


def test_chunking_caller_buffer_reused_after_call_does_not_corrupt_leftover():
    server = make(Role.SERVER)
    wire = masked(Opcode.TEXT, b"stable")
    scratch = bytearray(wire[:5])
    server.receive_data(scratch)
    scratch[:] = b"\x00" * 5
    server.receive_data(wire[5:])
    assert server.events_received() == [TextMessage("stable")]


# Enums --------------------------------------------------------------------------------------


def test_enums_carry_rfc_6455_wire_values():
    assert [int(o) for o in Opcode] == [0, 1, 2, 8, 9, 10]
    assert CloseCode.MESSAGE_TOO_BIG == 1009
    assert (Role.SERVER, Role.CLIENT) == (0, 1)
    assert (State.OPEN, State.CLOSING, State.CLOSED) == (1, 2, 3)


def test_protocol_receive_messages_steps_aside_unless_nothing_is_pending():
    """The server's shortcut takes whole messages only when no earlier input is pending: not in
    the middle of a fragmented message, not with part of a frame buffered, not after Close,
    and never in the client role."""
    hello = encode_frame_header(Opcode.TEXT, 5, True, RFC_MASK) + apply_mask(b"Hello", RFC_MASK)
    server = WebSocketProtocol(Role.SERVER)
    assert server.receive_messages(hello) == [b"Hello"]
    assert server.events_received() == []
    assert server.receive_messages(hello, text=False) is None

    first = encode_frame_header(Opcode.TEXT, 3, False, RFC_MASK) + apply_mask(b"Hel", RFC_MASK)
    server.receive_data(first)
    assert server.receive_messages(hello) is None  # the full parser must fail this
    server.receive_data(hello)
    assert server.error is not None

    partial = WebSocketProtocol(Role.SERVER)
    partial.receive_data(hello[:4])
    assert partial.receive_messages(hello) is None
    partial.receive_data(hello[4:])
    assert partial.events_received() == [TextMessage("Hello")]

    closed = WebSocketProtocol(Role.SERVER)
    closed.receive_data(
        encode_frame_header(Opcode.CLOSE, 2, True, RFC_MASK) + apply_mask(b"\x03\xe8", RFC_MASK)
    )
    assert closed.receive_messages(hello) is None

    limited = WebSocketProtocol(Role.SERVER, max_message_size=4)
    assert limited.receive_messages(hello) is None
    assert WebSocketProtocol(Role.SERVER, max_message_size=None).receive_messages(hello) == [
        b"Hello"
    ]
    assert WebSocketProtocol(Role.CLIENT, mask_key=fixed_mask()).receive_messages(hello) is None


@pytest.mark.parametrize("opcode", [Opcode.TEXT, Opcode.BINARY])
def test_max_size_a_flood_of_empty_fragments_holds_nothing(opcode):
    # (max_message_frames would end it after 4,096: lifted to see what the fragments hold)
    server = WebSocketProtocol(Role.SERVER, max_message_size=1 << 20, max_message_frames=1 << 30)
    server.receive_data(masked(opcode, b"a", fin=False))
    empty = masked(Opcode.CONTINUATION, b"", fin=False) * 1000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(50):  # 50,000 empty fragments, 300 KB on the wire
            server.receive_data(empty)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert server.error is None
    assert grown < 64 << 10  # a list of parts would hold 400 KB of pointers by now
    server.receive_data(masked(Opcode.CONTINUATION, b"b"))
    expected = TextMessage("ab") if opcode == Opcode.TEXT else BinaryMessage(b"ab")
    assert server.events_received() == [expected]


def test_max_frames_a_message_in_more_frames_than_allowed_fails_with_1009():
    server = make(Role.SERVER, max_message_size=1 << 20)
    assert server.max_message_frames == 4096  # max_message_size // 256
    server = WebSocketProtocol(Role.SERVER, max_message_size=1 << 20, max_message_frames=10)
    server.receive_data(masked(Opcode.TEXT, b"a", fin=False))
    server.receive_data(masked(Opcode.CONTINUATION, b"", fin=False) * 5
                        + masked(Opcode.PING, b"") * 4)  # control frames count: 10 frames
    assert server.error is None
    server.receive_data(masked(Opcode.CONTINUATION, b"", fin=False))
    assert server.close_code == CloseCode.MESSAGE_TOO_BIG
    assert "more than 10 frames" in server.close_reason


def test_max_frames_counts_each_message_afresh():
    server = WebSocketProtocol(Role.SERVER, max_message_size=1 << 20, max_message_frames=3)
    for _ in range(5):
        server.receive_data(masked(Opcode.BINARY, b"a", fin=False)
                            + masked(Opcode.CONTINUATION, b"b", fin=False)
                            + masked(Opcode.CONTINUATION, b"c"))
    assert server.error is None
    assert server.events_received() == [BinaryMessage(b"abc")] * 5
