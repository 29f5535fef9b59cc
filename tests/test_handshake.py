"""Tests of ``relaycore.protocol._handshake``: the hub handshake (hub side and the reading of
its answer), the service handshake's two sides, the protocol -> opcode map and the system
claims rule. Plain function calls on bytes: no event loop, no socket."""

from __future__ import annotations

import json

import pytest

from relaycore.protocol import (
    HUB_PROTOCOL_OPCODES,
    SERVICE_PROTOCOL_VERSION,
    SUPPORTED_PROTOCOLS,
    HandshakeAccepted,
    HandshakeRefused,
    HandshakeResponse,
    HandshakeResponseReader,
    HubHandshake,
    LocalProtocolError,
    Opcode,
    OpenConnectionMessage,
    RemoteProtocolError,
    ServiceHandshakeRequest,
    ServiceHandshakeResponse,
    ServicePing,
    answer_service_handshake,
    check_service_handshake_response,
    is_system_claim,
)

RS = b"\x1e"
LIMIT = 1 << 20


def fed(pieces: list[bytes], limit: int = LIMIT) -> HubHandshake:
    """A handshake fed ``pieces`` until it decides (later bytes are the next stage's)."""
    handshake = HubHandshake(limit)
    for piece in pieces:
        if handshake.result is not None:
            break
        handshake.receive_data(piece)
    return handshake


def splits(data: bytes) -> list[list[bytes]]:
    """``data`` in one piece, in two pieces at every offset, and byte by byte."""
    return [[data[:i], data[i:]] for i in range(len(data) + 1)] + [
        [data[i : i + 1] for i in range(len(data))]
    ]


# --------------------------------------------------------------------------------------------
# HubHandshake: accepted requests

ACCEPTED = [
    # (request, trailing bytes, protocol as reported, version)
    (b'{"protocol":"json","version":1}', b"", "json", 1),
    (b'{"protocol":"json","version":1}', b'{"type":6}' + RS, "json", 1),
    (b'{"protocol":"JSON","version":2}', b'{"type":1,"target":"x","arguments":[]}' + RS, "json", 2),
    (b'{"protocol":"messagepack","version":0}', b"\x02\x91\x06", "messagepack", 0),
    (b'{"version":1,"protocol":"MessagePack","extra":[1]}', b"\x02\x91\x06\x1e", "messagepack", 1),
]


@pytest.mark.parametrize(("request_json", "rest", "protocol", "version"), ACCEPTED)
def test_a_supported_request_is_accepted_whatever_the_pieces_and_keeps_what_follows(
    request_json: bytes, rest: bytes, protocol: str, version: int
) -> None:
    wire = request_json + RS + rest
    for pieces in splits(wire):
        handshake = HubHandshake(LIMIT)
        sent = 0
        while handshake.result is None:
            assert RS not in wire[:sent], pieces  # undecided only while the request is partial
            handshake.receive_data(pieces.pop(0))
            sent = len(wire) - sum(map(len, pieces))
        result = handshake.result
        assert (result.protocol, result.version, result.request) == (
            protocol, version, request_json + RS)
        # The bytes after the separator are handed on, whether they came with it or after.
        assert result.rest + b"".join(pieces) == rest
        assert result.hub_protocol.name == protocol


def test_an_accepted_handshake_is_answered_with_an_empty_object_once() -> None:
    handshake = HubHandshake(LIMIT)
    assert handshake.data_to_send() == b""  # nothing decided yet
    handshake.receive_data(b'{"protocol":"json","version":1}' + RS)
    assert handshake.data_to_send() == b"{}" + RS
    assert handshake.data_to_send() == b""


def test_bytes_fed_after_acceptance_are_the_callers_mistake() -> None:
    handshake = fed([b'{"protocol":"json","version":1}' + RS])
    with pytest.raises(LocalProtocolError, match="hub messages"):
        handshake.receive_data(b'{"type":6}' + RS)


# --------------------------------------------------------------------------------------------
# HubHandshake: refused requests, with the texts clients are answered today

REFUSED = [
    # (wire, the error text or, for parser faults that quote the content, its start)
    (b'{"protocol":"xml","version":1}', "The protocol 'xml' is not supported."),
    (b'{"protocol":"","version":10}', "The protocol '' is not supported."),
    (b'{"protocol":"json","version":3}',
     "The server does not support version 3 of the 'json' protocol."),
    # The version error quotes the protocol as the request spelled it, as .NET does.
    (b'{"protocol":"Json","version":9}',
     "The server does not support version 9 of the 'Json' protocol."),
    (b'{"protocol":"json"}', "Missing required property 'version'. Message content: "),
    (b'{"version":1}', "Missing required property 'protocol'. Message content: "),
    (b'{"protocol":1,"version":1}', "Expected 'protocol' to be a string, got int 1. "),
    (b'{"protocol":"json","version":"1"}',
     "Expected 'version' to be an integer, got str '1'. "),
    (b'{"protocol":', "The handshake request is not valid JSON ("),
    (b"", "The handshake request is not valid JSON ("),
    (b"[1,2]", "The handshake request is a JSON list; expected a JSON object."),
]


@pytest.mark.parametrize(("request_json", "error"), REFUSED)
def test_a_bad_or_unsupported_request_is_refused_with_the_text_answered_today(
    request_json: bytes, error: str
) -> None:
    wire = request_json + RS + b'{"type":6}' + RS
    for pieces in splits(wire):
        handshake = fed(pieces)
        assert isinstance(handshake.result, HandshakeRefused), pieces
        assert handshake.result.error.startswith(error)
        answer = handshake.data_to_send()
        assert answer.endswith(RS)
        assert json.loads(answer[:-1]) == {"error": handshake.result.error}
        assert handshake.data_to_send() == b""


@pytest.mark.parametrize(
    ("pieces", "limit", "result"),
    [
        # Up to the limit without a separator: still waiting.
        ([b"x" * 16], 16, None),
        ([b"x" * 8, b"x" * 8], 16, None),
        # One byte more, in any pieces: canceled, as ASP.NET Core answers.
        ([b"x" * 17], 16, HandshakeRefused("Handshake was canceled.")),
        ([b"x" * 16, b"x"], 16, HandshakeRefused("Handshake was canceled.")),
        ([b'{"protocol":"json",', b" " * 16], 16, HandshakeRefused("Handshake was canceled.")),
        # The limit bounds what waits for a separator: a whole request that arrived is read.
        ([b'{"protocol":"json","version":1}' + RS], 16,
         HandshakeAccepted("json", 1, b'{"protocol":"json","version":1}' + RS, b"")),
    ],
)
def test_the_buffered_bytes_are_bounded_by_the_message_size_limit(
    pieces: list[bytes], limit: int, result: HandshakeAccepted | HandshakeRefused | None
) -> None:
    assert fed(pieces, limit).result == result


def test_bytes_after_a_refusal_are_dropped_and_change_nothing() -> None:
    handshake = fed([b"y" * 17], limit=16)
    handshake.receive_data(b'{"protocol":"json","version":1}' + RS)
    handshake.receive_data(b"z" * 1000)
    assert handshake.result == HandshakeRefused("Handshake was canceled.")
    assert handshake.data_to_send() == b'{"error":"Handshake was canceled."}' + RS


@pytest.mark.parametrize("limit", [0, -1, 1.5, None])
def test_the_limit_must_be_a_positive_integer(limit: object) -> None:
    with pytest.raises(ValueError, match="max_message_size"):
        HubHandshake(limit)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_message_size"):
        HandshakeResponseReader(limit)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# HubHandshake: refusals decided by the caller


@pytest.mark.parametrize(
    "pieces", [[], [b'{"protocol":"json"'], [b'{"protocol":"json","version":1}' + RS]]
)
def test_cancel_refuses_an_undecided_or_unanswered_handshake_as_timed_out(
    pieces: list[bytes],
) -> None:
    handshake = fed(pieces)
    handshake.cancel()
    assert handshake.result == HandshakeRefused("Handshake was canceled.")
    assert handshake.data_to_send() == b'{"error":"Handshake was canceled."}' + RS


def test_refuse_after_acceptance_answers_the_callers_reason() -> None:
    handshake = fed([b'{"protocol":"json","version":1}' + RS + b'{"type":6}' + RS])
    handshake.refuse("No app server is connected to hub 'chat'.")
    assert handshake.result == HandshakeRefused("No app server is connected to hub 'chat'.")
    assert json.loads(handshake.data_to_send()[:-1]) == {
        "error": "No app server is connected to hub 'chat'."}


@pytest.mark.parametrize(
    ("pieces", "answer_first", "complaint"),
    [
        ([b'{"protocol":"json","version":1}' + RS], True, "already answered"),
        ([b'{"protocol":"xml","version":1}' + RS], False, "already refused"),
        ([b'{"protocol":"xml","version":1}' + RS], True, "already answered"),
    ],
)
def test_refuse_after_an_answer_or_a_refusal_is_the_callers_mistake(
    pieces: list[bytes], answer_first: bool, complaint: str
) -> None:
    handshake = fed(pieces)
    if answer_first:
        handshake.data_to_send()
    before = handshake.result
    with pytest.raises(LocalProtocolError, match=complaint):
        handshake.cancel()
    assert handshake.result == before


# --------------------------------------------------------------------------------------------
# HandshakeResponseReader: the hub's answer, read by whoever sent the request

ANSWERS = [
    (b"{}" + RS, HandshakeResponse(None, b"")),
    (b"{}" + RS + b'{"type":6}' + RS, HandshakeResponse(None, b'{"type":6}' + RS)),
    (b'{"error":null}' + RS, HandshakeResponse(None, b"")),
    (b'{"unknown":1}' + RS, HandshakeResponse(None, b"")),
    (b'{"error":"The protocol \'xml\' is not supported."}' + RS,
     HandshakeResponse("The protocol 'xml' is not supported.", b"")),
]


@pytest.mark.parametrize(("wire", "expected"), ANSWERS)
def test_the_answer_is_read_whatever_the_pieces(wire: bytes, expected: HandshakeResponse) -> None:
    for pieces in splits(wire):
        reader = HandshakeResponseReader(LIMIT)
        sent = 0
        while reader.result is None:
            assert RS not in wire[:sent], pieces
            reader.receive_data(pieces.pop(0))
            sent = len(wire) - sum(map(len, pieces))
        assert reader.result.error == expected.error
        assert reader.result.rest + b"".join(pieces) == expected.rest
        assert reader.result.succeeded is (expected.error is None)


@pytest.mark.parametrize(
    ("pieces", "limit", "complaint"),
    [
        ([b"nope" + RS], LIMIT, "not valid JSON"),
        ([b"[]" + RS], LIMIT, "expected a JSON object"),
        ([b'{"type":6}' + RS], LIMIT, "got a hub message"),
        ([b'{"error":5}' + RS], LIMIT, "'error' to be a string"),
        ([b"{" + b" " * 16], 16, "no record separator"),
        ([b"{", b" " * 16], 16, "no record separator"),
    ],
)
def test_a_malformed_answer_raises_now_and_on_every_later_call(
    pieces: list[bytes], limit: int, complaint: str
) -> None:
    reader = HandshakeResponseReader(limit)
    with pytest.raises(RemoteProtocolError, match=complaint):
        for piece in pieces:
            reader.receive_data(piece)
    with pytest.raises(RemoteProtocolError, match=complaint):
        reader.receive_data(b"{}" + RS)
    assert reader.result is None


def test_bytes_fed_after_the_answer_are_the_callers_mistake() -> None:
    reader = HandshakeResponseReader(LIMIT)
    reader.receive_data(b"{}" + RS)
    with pytest.raises(LocalProtocolError, match="hub messages"):
        reader.receive_data(b'{"type":6}' + RS)


@pytest.mark.parametrize(("request_json", "rest", "protocol", "version"), ACCEPTED[:2])
def test_both_sides_agree(request_json: bytes, rest: bytes, protocol: str, version: int) -> None:
    hub = fed([request_json + RS + rest])
    reader = HandshakeResponseReader(LIMIT)
    reader.receive_data(hub.data_to_send() + b'{"type":6}' + RS)
    assert reader.result == HandshakeResponse(None, b'{"type":6}' + RS)


# --------------------------------------------------------------------------------------------
# The service handshake


@pytest.mark.parametrize(
    ("message", "answer"),
    [
        (ServiceHandshakeRequest(), ServiceHandshakeResponse()),
        (ServiceHandshakeRequest(version=SERVICE_PROTOCOL_VERSION, connection_type=1),
         ServiceHandshakeResponse()),
        (ServiceHandshakeRequest(version=2), ServiceHandshakeResponse(
            "Protocol version 2 is not supported; this relay speaks version 1.")),
        (ServiceHandshakeRequest(version=0), ServiceHandshakeResponse(
            "Protocol version 0 is not supported; this relay speaks version 1.")),
    ],
)
def test_the_service_answers_a_handshake_request_and_the_app_server_checks_the_answer(
    message: ServiceHandshakeRequest, answer: ServiceHandshakeResponse
) -> None:
    assert answer_service_handshake(message) == answer
    if answer.succeeded:
        check_service_handshake_response(answer)
    else:
        with pytest.raises(RemoteProtocolError) as caught:
            check_service_handshake_response(answer)
        assert str(caught.value) == f"the service refused the handshake: {answer.error_message}"


@pytest.mark.parametrize(
    "message", [ServicePing(), OpenConnectionMessage("c1", {}), ServiceHandshakeResponse()]
)
def test_a_first_message_that_is_not_a_handshake_request_breaks_the_protocol(
    message: object,
) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        answer_service_handshake(message)
    assert str(caught.value) == (
        f"expected a handshake request first, got {type(message).__name__}")


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (ServicePing(), "the service sent ServicePing first; expected a handshake response"),
        (ServiceHandshakeRequest(),
         "the service sent ServiceHandshakeRequest first; expected a handshake response"),
        (ServiceHandshakeResponse("maintenance"),
         "the service refused the handshake: maintenance"),
        (ServiceHandshakeResponse(None), None),
        (ServiceHandshakeResponse(""), None),
    ],
)
def test_the_app_server_accepts_only_a_successful_handshake_response_first(
    message: object, error: str | None
) -> None:
    if error is None:
        check_service_handshake_response(message)
        return
    with pytest.raises(RemoteProtocolError) as caught:
        check_service_handshake_response(message)
    assert str(caught.value) == error


# --------------------------------------------------------------------------------------------
# What the handshake decides for later: the frame type, and whose claims are passed on


def test_each_hub_protocol_travels_in_the_frame_type_of_its_transfer_format() -> None:
    assert dict(HUB_PROTOCOL_OPCODES) == {"json": Opcode.TEXT, "messagepack": Opcode.BINARY}
    assert tuple(HUB_PROTOCOL_OPCODES) == SUPPORTED_PROTOCOLS
    with pytest.raises(TypeError):
        HUB_PROTOCOL_OPCODES["xml"] = Opcode.TEXT  # type: ignore[index]


@pytest.mark.parametrize(
    ("name", "system"),
    [
        *[(name, True) for name in
          ("aud", "exp", "iat", "nbf", "iss", "jti", "nonce", "actort", "acr", "azp", "c_hash")],
        *[(name, False) for name in
          ("role", "nameid", "sub", "name", "asrs.s.uid", "asrs.u.exp", "EXP", "")],
    ],
)
def test_system_claims_are_the_tokens_own(name: str, system: bool) -> None:
    assert is_system_claim(name) is system
