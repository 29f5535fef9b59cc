"""Tests of ``relaycore.protocol._service``: the Azure SignalR service protocol.

Every vector of ``tests/vectors/service-protocol.json`` is asserted: parsed and compared with
its ``decoded`` view, and, for the two ``current-*`` sets, written back byte for byte (the two
ConnectionFlowControl vectors included: their int32-forced fields are written by hand). The
``compat-2024-03`` vectors are older, shorter encodings: they must parse, and what is written
back is the current form, which must parse to the same message.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaycore._accel import decode_varint, encode_varint
from relaycore.protocol._errors import LocalProtocolError, RemoteProtocolError
from relaycore.protocol._service import (
    DEFAULT_MAX_SERVICE_MESSAGE_SIZE,
    AccessKeyRequestMessage,
    AccessKeyResponseMessage,
    AckStatus,
    BroadcastDataMessage,
    CheckConnectionExistenceWithAckMessage,
    CheckGroupExistenceWithAckMessage,
    CheckUserExistenceWithAckMessage,
    CheckUserInGroupWithAckMessage,
    ClientCompletionMessage,
    ClientInvocationMessage,
    CloseConnectionMessage,
    CloseConnectionsWithAckMessage,
    CloseConnectionWithAckMessage,
    CloseGroupConnectionsWithAckMessage,
    CloseUserConnectionsWithAckMessage,
    ConnectionDataMessage,
    ConnectionFlowControlMessage,
    ConnectionFlowControlOperation,
    ConnectionReconnectMessage,
    ConnectionType,
    DataMessageType,
    ErrorCompletionMessage,
    FlowControlConnectionType,
    GroupBroadcastDataMessage,
    GroupMemberQueryMessage,
    JoinGroupMessage,
    JoinGroupWithAckMessage,
    LeaveGroupMessage,
    LeaveGroupWithAckMessage,
    MultiConnectionDataMessage,
    MultiGroupBroadcastDataMessage,
    MultiUserDataMessage,
    OpenConnectionMessage,
    PingKey,
    ServiceAckMessage,
    ServiceErrorMessage,
    ServiceEventMessage,
    ServiceHandshakeRequest,
    ServiceHandshakeResponse,
    ServiceMappingMessage,
    ServiceMessage,
    ServiceMessageType,
    ServicePing,
    ServiceProtocolParser,
    UserDataMessage,
    UserJoinGroupMessage,
    UserJoinGroupWithAckMessage,
    UserLeaveGroupMessage,
    UserLeaveGroupWithAckMessage,
    connection_data_prefix,
    header_for,
    parse_message_body,
    payload_for,
    upstream_signature,
    write_connection_data,
    write_message,
    write_messages,
)
from relayhelpers import load_vectors

VECTORS: dict[str, Any] = load_vectors("service-protocol.json")
ALL = VECTORS["vectors"]
CURRENT = [v for v in ALL if v["id"].startswith("current-")]
COMPAT = [v for v in ALL if v["id"].startswith("compat-")]


def _by_id(entries: list[dict[str, Any]]) -> list[Any]:
    return [pytest.param(entry, id=entry["id"]) for entry in entries]


def _pack(value: Any) -> bytes:
    body: bytes = msgpack.packb(value, use_bin_type=True)
    return body


def _frame(array: list[Any]) -> bytes:
    body = _pack(array)
    return encode_varint(len(body)) + body


def _body_of(frame: bytes) -> bytes:
    got = decode_varint(frame)
    assert got is not None
    size, n = got
    assert len(frame) == n + size
    return frame[n:]


# --------------------------------------------------------------------------------------------
# The vectors' decoded view of a message


def _bin(value: bytes) -> dict[str, str]:
    return {"bin_hex": value.hex()}


def _payloads(payloads: dict[str, bytes]) -> dict[str, Any]:
    return {name: _bin(value) for name, value in payloads.items()}


def _headers(headers: dict[str, Any]) -> dict[str, list[str]]:
    return {name: list(values) for name, values in headers.items()}


def _ext(m: Any) -> dict[str, Any]:
    ext: dict[str, Any] = {}
    for attr, label in (
        ("tracing_id", "1:tracingId"),
        ("ttl", "2:ttl"),
        ("protocol", "3:protocol"),
        ("filter", "4:filter"),
    ):
        value = getattr(m, attr, None)
        if value is not None:
            ext[label] = value
    if getattr(m, "data_message_type", 0):
        ext["5:dataMessageType"] = m.data_message_type
    if getattr(m, "is_partial", False):
        ext["6:isPartial"] = True
    return ext


def decoded_view(m: ServiceMessage) -> dict[str, Any]:
    """The message in the labels of a vector's ``decoded`` field."""
    view: dict[str, Any] = {"type": int(m.message_type)}
    if isinstance(m, ServiceHandshakeRequest):
        view |= {
            "version": m.version,
            "connectionType": m.connection_type,
            "target": m.target,
            "migrationLevel": m.migration_level,
            "extensions": {},
            "allowStatefulReconnects": m.allow_stateful_reconnects,
        }
    elif isinstance(m, ServiceHandshakeResponse):
        view |= {"errorMessage": m.error_message, "extensions": {}, "connectionId": m.connection_id}
    elif isinstance(m, ServicePing):
        view["messages"] = list(m.values)
    elif isinstance(m, ServiceErrorMessage):
        view["errorMessage"] = m.error_message
    elif isinstance(m, ServiceEventMessage):
        view |= {
            "objectType": m.object_type,
            "id": m.id,
            "kind": m.kind,
            "message": m.message,
            "extensions": {},
        }
    elif isinstance(m, AccessKeyRequestMessage):
        view |= {"token": m.token, "kid": m.kid, "extensions": {}}
    elif isinstance(m, AccessKeyResponseMessage):
        view |= {
            "kid": m.kid,
            "accessKey": m.access_key,
            "errorType": m.error_type,
            "errorMessage": m.error_message,
            "extensions": {},
        }
    elif isinstance(m, OpenConnectionMessage):
        view |= {
            "connectionId": m.connection_id,
            "claims": m.claims,
            "headers": _headers(m.headers),
            "queryString": m.query_string,
        }
    elif isinstance(m, CloseConnectionMessage):
        view |= {
            "connectionId": m.connection_id,
            "errorMessage": m.error_message,
            "headers": _headers(m.headers),
        }
    elif isinstance(m, ConnectionDataMessage):
        view |= {"connectionId": m.connection_id, "payload": _bin(m.payload)}
    elif isinstance(m, ConnectionReconnectMessage):
        view |= {"connectionId": m.connection_id, "extensions": {}}
    elif isinstance(m, MultiConnectionDataMessage):
        view |= {"connectionList": list(m.connection_ids), "payloads": _payloads(m.payloads)}
    elif isinstance(m, UserDataMessage):
        view |= {"userId": m.user_id, "payloads": _payloads(m.payloads)}
    elif isinstance(m, MultiUserDataMessage):
        view |= {"userList": list(m.user_ids), "payloads": _payloads(m.payloads)}
    elif isinstance(m, BroadcastDataMessage):
        view |= {
            "excludedList": list(m.excluded_connection_ids),
            "payloads": _payloads(m.payloads),
        }
    elif isinstance(m, GroupBroadcastDataMessage):
        view |= {
            "groupName": m.group_name,
            "excludedList": list(m.excluded_connection_ids),
            "payloads": _payloads(m.payloads),
            "excludedUserList": list(m.excluded_user_ids),
            "callerUserId": m.caller_user_id,
        }
    elif isinstance(m, MultiGroupBroadcastDataMessage):
        view |= {"groupList": list(m.group_names), "payloads": _payloads(m.payloads)}
    elif isinstance(
        m, (JoinGroupMessage, LeaveGroupMessage, JoinGroupWithAckMessage, LeaveGroupWithAckMessage)
    ):
        view |= {"connectionId": m.connection_id, "groupName": m.group_name}
    elif isinstance(
        m,
        (
            UserJoinGroupMessage,
            UserLeaveGroupMessage,
            UserJoinGroupWithAckMessage,
            UserLeaveGroupWithAckMessage,
            CheckUserInGroupWithAckMessage,
        ),
    ):
        view |= {"userId": m.user_id, "groupName": m.group_name}
    elif isinstance(m, CheckGroupExistenceWithAckMessage):
        view["groupName"] = m.group_name
    elif isinstance(m, CheckConnectionExistenceWithAckMessage):
        view["connectionId"] = m.connection_id
    elif isinstance(m, CheckUserExistenceWithAckMessage):
        view["userId"] = m.user_id
    elif isinstance(m, CloseConnectionWithAckMessage):
        view |= {"connectionId": m.connection_id, "reason": m.reason}
    elif isinstance(m, CloseConnectionsWithAckMessage):
        view |= {"reason": m.reason, "excludedList": list(m.excluded_connection_ids)}
    elif isinstance(m, CloseUserConnectionsWithAckMessage):
        view |= {
            "userId": m.user_id,
            "reason": m.reason,
            "excludedList": list(m.excluded_connection_ids),
        }
    elif isinstance(m, CloseGroupConnectionsWithAckMessage):
        view |= {
            "groupName": m.group_name,
            "reason": m.reason,
            "excludedList": list(m.excluded_connection_ids),
        }
    elif isinstance(m, ServiceAckMessage):
        view |= {
            "ackId": m.ack_id,
            "status": m.status,
            "message": m.message,
            "extensions": {},
            "payload": None if m.payload is None else _bin(m.payload),
        }
    elif isinstance(m, ClientInvocationMessage):
        view |= {
            "invocationId": m.invocation_id,
            "connectionId": m.connection_id,
            "callerServerId": m.caller_server_id,
            "payloads": _payloads(m.payloads),
        }
    elif isinstance(m, ClientCompletionMessage):
        view |= {
            "invocationId": m.invocation_id,
            "connectionId": m.connection_id,
            "callerServerId": m.caller_server_id,
            "protocol": m.protocol,
            "payload": _bin(m.payload),
        }
    elif isinstance(m, ErrorCompletionMessage):
        view |= {
            "invocationId": m.invocation_id,
            "connectionId": m.connection_id,
            "callerServerId": m.caller_server_id,
            "error": m.error,
        }
    elif isinstance(m, ServiceMappingMessage):
        view |= {
            "invocationId": m.invocation_id,
            "connectionId": m.connection_id,
            "instanceId": m.instance_id,
            "extensions": {},
        }
    elif isinstance(m, ConnectionFlowControlMessage):
        view |= {
            "connectionId": m.connection_id,
            "connectionType": m.connection_type,
            "operation": m.operation,
            "extensions": {},
        }
    elif isinstance(m, GroupMemberQueryMessage):
        view |= {
            "groupName": m.group_name,
            "max": m.max_count,
            "continuationToken": m.continuation_token,
        }
    else:  # pragma: no cover
        raise AssertionError(f"no view for {m!r}")
    if hasattr(m, "ack_id"):
        view["ackId"] = m.ack_id
    view.setdefault("extensions", _ext(m))
    return view


# --------------------------------------------------------------------------------------------
# Vectors


def test_vector_file_has_the_three_sets_and_123_vectors() -> None:
    assert VECTORS["count"] == len(ALL) == 123
    sets = {v["id"].split("/")[0] for v in ALL}
    assert sets == {"current-2024-03", "compat-2024-03", "current-newer"}
    assert len(CURRENT) + len(COMPAT) == 123


@pytest.mark.parametrize("vector", _by_id(ALL))
def test_vector_framing_is_the_varint_length_of_its_body(vector: dict[str, Any]) -> None:
    body = bytes.fromhex(vector["body_hex"])
    assert encode_varint(len(body)) + body == bytes.fromhex(vector["framed_hex"])


@pytest.mark.parametrize("vector", _by_id(ALL))
def test_vector_parses_to_its_decoded_view(vector: dict[str, Any]) -> None:
    message = parse_message_body(bytes.fromhex(vector["body_hex"]))
    assert message is not None
    assert message.message_type == vector["message_type"]
    view = decoded_view(message)
    decoded = vector["decoded"]
    assert {key: view[key] for key in decoded} == decoded


@pytest.mark.parametrize("vector", _by_id(CURRENT))
def test_current_vector_is_written_back_byte_for_byte(vector: dict[str, Any]) -> None:
    message = parse_message_body(bytes.fromhex(vector["body_hex"]))
    assert message is not None
    assert write_message(message).hex() == vector["framed_hex"]


@pytest.mark.parametrize("vector", _by_id(COMPAT))
def test_compat_vector_is_written_in_the_current_form_which_parses_to_the_same_message(
    vector: dict[str, Any],
) -> None:
    message = parse_message_body(bytes.fromhex(vector["body_hex"]))
    assert message is not None
    written = _body_of(write_message(message))
    assert len(written) >= len(bytes.fromhex(vector["body_hex"]))
    assert parse_message_body(written) == message


def test_flow_control_vectors_force_int32_where_plain_msgpack_would_not() -> None:
    flow = [v for v in ALL if v["message_type"] == 39]
    assert len(flow) == 2
    for vector in flow:
        body = bytes.fromhex(vector["body_hex"])
        assert _pack(msgpack.unpackb(body)) != body  # why they need the hand-written writer
        message = parse_message_body(body)
        assert isinstance(message, ConnectionFlowControlMessage)
        assert write_message(message) == bytes.fromhex(vector["framed_hex"])


def test_upstream_signature_vector_is_hmac_sha256_of_the_connection_id_per_key() -> None:
    entry = VECTORS["related_vectors"]["upstream_signature"]
    for key, signature in zip(entry["access_keys"], entry["signatures"], strict=True):
        assert upstream_signature(entry["connection_id"], [key]) == signature
    header = upstream_signature(entry["connection_id"], entry["access_keys"])
    assert header == entry["header_value_example"]


# --------------------------------------------------------------------------------------------
# Stream parser

SAMPLE: list[ServiceMessage] = [
    ServiceHandshakeRequest(),
    ServicePing(),
    OpenConnectionMessage(
        "c1", {"asrs.s.uid": "alice"}, {"Asrs-Instance-Id": ["i1"]}, "", protocol="json"
    ),
    ConnectionDataMessage("c1", b'{"protocol":"json","version":1}\x1e' * 10),
    BroadcastDataMessage({"json": b"x" * 200, "messagepack": b"y" * 3}, ["c2"]),
    ServicePing.of(status="1"),
]


@pytest.mark.parametrize("connection_id", ["c1", "x" * 31, "y" * 32, "z" * 300])
@pytest.mark.parametrize("size", [0, 1, 255, 256, 65535, 65536, 70000])
def test_connection_data_writer_matches_write_message(connection_id: str, size: int) -> None:
    # The relay's hot path writes ConnectionData without the dataclass; it must be the same
    # bytes as the general writer at every msgpack length boundary (fixstr/str8/str16 ids,
    # bin8/bin16/bin32 payloads).
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    fast = write_connection_data(connection_data_prefix(connection_id), payload)
    assert fast == write_message(ConnectionDataMessage(connection_id, payload))
    parser = ServiceProtocolParser()
    parser.receive_data(fast)
    assert parser.messages_received() == [ConnectionDataMessage(connection_id, payload)]


def test_parser_raw_connection_data_gives_tuples_in_stream_order() -> None:
    # The relay's hot path: plain ConnectionData comes out as (connection id, payload), in its
    # place among the other messages; data with ext hints still comes out as a message.
    hinted = ConnectionDataMessage("c2", b"x", tracing_id=7)
    stream = write_messages([
        OpenConnectionMessage("c1", {}),
        ConnectionDataMessage("c1", b"{}\x1e"),
        hinted,
        CloseConnectionMessage("c1", ""),
        ConnectionDataMessage("c3", b"\x00" * 300),
    ])
    parser = ServiceProtocolParser(raw_connection_data=True)
    parser.receive_data(stream)
    assert parser.items_received() == [
        OpenConnectionMessage("c1", {}),
        ("c1", b"{}\x1e"),
        hinted,
        CloseConnectionMessage("c1", ""),
        ("c3", b"\x00" * 300),
    ]
    plain = ServiceProtocolParser()
    plain.receive_data(stream)
    assert [type(m) for m in plain.messages_received()].count(ConnectionDataMessage) == 3
    with pytest.raises(TypeError, match="items_received"):
        parser.messages_received()  # typed as messages only: a raw parser must say so


def test_parser_raw_user_data_gives_tuples_only_for_plain_sdk_payload_maps() -> None:
    # An app server's Clients.User(id): plain UserData with the SDK's payload map comes out as
    # (8, user id, payloads); ext hints, other map keys or a nil payload take the full reader.
    payloads = {"json": b'{"type":1}\x1e', "messagepack": b"\x01\x02"}
    hinted = UserDataMessage("u2", {"json": b"x"}, tracing_id=3)
    odd_key = UserDataMessage("u3", {"Json": b"x"})
    stream = write_messages([
        UserDataMessage("u1", payloads),
        hinted,
        odd_key,
        ConnectionDataMessage("c1", b"{}\x1e"),
        UserDataMessage("u4", {}),
    ])
    body = msgpack.packb([8, "u5", {"json": None}, {}])  # the SDK reads a nil bin as empty
    stream += encode_varint(len(body)) + body
    parser = ServiceProtocolParser(raw_user_data=True)
    parser.receive_data(stream)
    items = parser.items_received()
    assert items == [
        (ServiceMessageType.USER_DATA, "u1", payloads),
        hinted,
        odd_key,
        ConnectionDataMessage("c1", b"{}\x1e"),  # raw_connection_data was not asked for
        UserDataMessage("u4", {}),
        UserDataMessage("u5", {"json": b""}),
    ]
    assert items[0][0] == 8
    with pytest.raises(TypeError, match="items_received"):
        parser.messages_received()
    both = ServiceProtocolParser(raw_connection_data=True, raw_user_data=True)
    both.receive_data(stream)
    assert both.items_received()[3] == ("c1", b"{}\x1e")


@pytest.mark.parametrize(
    ("array", "field"),
    [
        ([8, 42, {"json": b"x"}], "userId"),
        ([8, "u", {"json": 5}], "payloads"),
        ([8, "u", [b"x"]], "payloads"),
        ([8, "u"], "3"),
    ],
)
def test_parser_raw_user_data_still_names_a_malformed_field(array: list[Any], field: str) -> None:
    body = msgpack.packb(array)
    parser = ServiceProtocolParser(raw_user_data=True)
    with pytest.raises(RemoteProtocolError, match=field):
        parser.receive_data(encode_varint(len(body)) + body)


def test_parser_raw_connection_data_still_names_a_malformed_field() -> None:
    body = msgpack.packb([6, 42, b"payload", {}])  # connectionId is not a string
    parser = ServiceProtocolParser(raw_connection_data=True)
    with pytest.raises(RemoteProtocolError, match="connectionId"):
        parser.receive_data(encode_varint(len(body)) + body)


def test_parser_yields_every_message_whatever_the_split_point() -> None:
    stream = write_messages(SAMPLE)
    assert len(stream) > 300  # some prefixes take two bytes
    for cut in range(len(stream) + 1):
        parser = ServiceProtocolParser()
        parser.receive_data(stream[:cut])
        first = parser.messages_received()
        parser.receive_data(stream[cut:])
        assert first + parser.messages_received() == SAMPLE, cut
        assert parser.buffered == 0


def test_parser_fed_byte_at_a_time_gives_what_it_gives_fed_at_once() -> None:
    stream = b"".join(bytes.fromhex(v["framed_hex"]) for v in ALL)
    at_once = ServiceProtocolParser()
    at_once.receive_data(stream)
    expected = at_once.messages_received()
    assert len(expected) == 123
    parser = ServiceProtocolParser()
    got: list[ServiceMessage] = []
    for i in range(len(stream)):
        parser.receive_data(stream[i : i + 1])
        got += parser.messages_received()
    assert got == expected


def test_parser_accepts_bytearray_and_memoryview_input() -> None:
    stream = write_messages(SAMPLE)
    for data in (bytearray(stream), memoryview(stream)):
        parser = ServiceProtocolParser()
        parser.receive_data(data[:7])
        parser.receive_data(data[7:])
        assert parser.messages_received() == SAMPLE


def test_parser_drops_unknown_message_types() -> None:
    parser = ServiceProtocolParser()
    parser.receive_data(
        _frame([99, "from the future", {}])
        + write_message(ServicePing())
        + _frame([41, "refresh auth: layout unconfirmed"])
        + _frame([42, "token", 1, {}])
        + write_message(ServicePing.of(status="0"))
    )
    assert parser.messages_received() == [ServicePing(), ServicePing(("status", "0"))]


def test_parse_message_body_returns_none_for_an_unknown_type() -> None:
    assert parse_message_body(_pack([1000, 1, 2, 3])) is None


def test_parser_refuses_an_oversized_body_from_its_prefix_alone() -> None:
    parser = ServiceProtocolParser(max_message_size=100)
    with pytest.raises(RemoteProtocolError, match="101 bytes exceeds the maximum message size"):
        parser.receive_data(encode_varint(101) + b"\x95")


def test_parser_accepts_a_body_of_exactly_the_maximum_size() -> None:
    frame = write_message(ConnectionDataMessage("c", b"x" * 80))
    parser = ServiceProtocolParser(max_message_size=len(_body_of(frame)))
    parser.receive_data(frame)
    assert parser.messages_received() == [ConnectionDataMessage("c", b"x" * 80)]


def test_parser_default_limit_is_16_mib() -> None:
    assert ServiceProtocolParser().max_message_size == DEFAULT_MAX_SERVICE_MESSAGE_SIZE == 2**24


def test_parser_keeps_the_messages_before_a_bad_frame_and_keeps_failing() -> None:
    parser = ServiceProtocolParser()
    with pytest.raises(RemoteProtocolError, match="length prefix"):
        parser.receive_data(write_message(ServicePing()) + b"\x80\x80\x80\x80\x80\x80")
    assert parser.messages_received() == [ServicePing()]
    with pytest.raises(RemoteProtocolError, match="length prefix"):
        parser.receive_data(write_message(ServicePing()))
    assert parser.messages_received() == []


def test_parser_raises_for_a_malformed_body_after_handing_out_the_good_ones() -> None:
    parser = ServiceProtocolParser()
    with pytest.raises(RemoteProtocolError, match=r"ConnectionData message \(type 6\)"):
        parser.receive_data(write_message(ServicePing()) + _frame([6, 42, b""]))
    assert parser.messages_received() == [ServicePing()]


def test_parser_receive_eof_inside_a_frame_is_an_error_and_between_frames_is_not() -> None:
    frame = write_message(ServicePing.of(status="1"))
    parser = ServiceProtocolParser()
    parser.receive_data(frame)
    parser.receive_eof()
    parser.receive_data(frame[:3])
    with pytest.raises(RemoteProtocolError, match="incomplete frame"):
        parser.receive_eof()


def test_parser_refuses_a_nonsense_limit() -> None:
    with pytest.raises(ValueError):
        ServiceProtocolParser(max_message_size=0)


# --------------------------------------------------------------------------------------------
# Reading rules


def test_extension_map_unknown_keys_are_skipped() -> None:
    message = parse_message_body(
        _pack([6, "c", b"x", {7: "zzz", 1: 5, 99: [1, {"a": 2}], 6: True, 100: None}])
    )
    assert message == ConnectionDataMessage("c", b"x", tracing_id=5, is_partial=True)


def test_extension_members_a_type_does_not_carry_are_ignored() -> None:
    message = parse_message_body(_pack([11, "c", "g", {2: 30, 3: "json", 5: 2}]))
    assert message == JoinGroupMessage("c", "g")


def test_extra_trailing_elements_are_ignored() -> None:
    message = parse_message_body(_pack([6, "c", b"x", {}, "later field", 42, [1, 2]]))
    assert message == ConnectionDataMessage("c", b"x")
    ack = parse_message_body(_pack([20, 1, 1, "", {}, b"p", "seventh"]))
    assert ack == ServiceAckMessage(1, 1, "", b"p")


def test_bytes_after_the_array_in_a_body_are_ignored_as_the_sdk_does() -> None:
    assert parse_message_body(_pack([3]) + b"\x01") == ServicePing()


def test_nil_strings_lists_and_maps_are_read_as_the_sdk_reads_them() -> None:
    assert parse_message_body(_pack([5, "c", None])) == CloseConnectionMessage("c", None)
    assert parse_message_body(_pack([10, None, None, None])) == BroadcastDataMessage({})
    assert parse_message_body(_pack([6, "c", None, {}])) == ConnectionDataMessage("c", b"")
    assert parse_message_body(_pack([7, ["a"], {"json": None}])) == MultiConnectionDataMessage(
        ["a"], {"json": b""}
    )
    assert parse_message_body(_pack([19, "c", None, 3, {}])) == LeaveGroupWithAckMessage(
        "c", None, 3
    )
    assert parse_message_body(_pack([3, "echo", None])) == ServicePing(("echo", ""))


def test_group_broadcast_of_length_six_has_ext_but_no_user_fields() -> None:
    message = parse_message_body(_pack([13, "g", ["c"], {"json": b"j"}, {1: 9}, ["u"]]))
    assert message == GroupBroadcastDataMessage("g", {"json": b"j"}, ["c"], tracing_id=9)


def test_client_completion_protocol_from_the_extension_wins() -> None:
    message = parse_message_body(_pack([35, "i", "c", "s", "json", b"r", {3: "messagepack"}]))
    assert isinstance(message, ClientCompletionMessage)
    assert message.protocol == "messagepack"


def test_handshake_request_of_length_three_reads_the_version_only() -> None:
    assert parse_message_body(_pack([1, 1, 2])) == ServiceHandshakeRequest(1)


def _error_of(array: Any) -> str:
    with pytest.raises(RemoteProtocolError) as caught:
        parse_message_body(_pack(array))
    return str(caught.value)


MALFORMED = [
    ([4, 5, {}, {}, "", {}], "OpenConnection", "connectionId"),
    ([4, "c"], "OpenConnection", "expected at least 3"),
    ([4, "c", {"a": 1}], "OpenConnection", "claims"),
    ([4, "c", {}, {"h": "v"}, ""], "OpenConnection", "headers"),
    ([4, "c", {}, {}, 7], "OpenConnection", "queryString"),
    ([5, "c", None, {"h": [1]}], "CloseConnection", "headers"),
    ([6, "c", "text, not bin"], "ConnectionData", "payload"),
    ([6, "c"], "ConnectionData", "expected at least 3"),
    ([6, "c", b"", {1: "x"}], "ConnectionData", "tracing id"),
    ([6, "c", b"", {1: -1}], "ConnectionData", "tracing id"),
    ([6, "c", b"", {"k": 1}], "ConnectionData", "integer keys"),
    ([6, "c", b"", {6: 1}], "ConnectionData", "boolean"),
    ([6, "c", b"", [1]], "ConnectionData", "ext"),
    ([7, ["a", 1], {}], "MultiConnectionData", "connectionIds"),
    ([7, [], {"json": "str"}], "MultiConnectionData", "payloads"),
    ([7, [], ["json"]], "MultiConnectionData", "payloads"),
    ([8, None, {}], "UserData", "userId"),
    ([10, "c1", {}], "BroadcastData", "excludedConnectionIds"),
    ([13, "g", []], "GroupBroadcastData", "expected at least 4"),
    ([13, "g", [], {}, {}, [], 5], "GroupBroadcastData", "callerUserId"),
    ([14, [b"g"], {}], "MultiGroupBroadcastData", "groups"),
    ([16, "u", "g", {2: "x"}], "UserJoinGroup", "ttl"),
    ([18, "c", "g", "1"], "JoinGroupWithAck", "ackId"),
    ([18, "c", "g", 2**31], "JoinGroupWithAck", "ackId"),
    ([20, "1", 1, ""], "Ack", "ackId"),
    ([20, 1, 1, "", {}, "str"], "Ack", "payload"),
    ([20, 1, 1], "Ack", "expected at least 4"),
    ([22, 1, "id", 1, "m"], "ServiceEvent", "expected at least 6"),
    ([23, "g", 1], "CheckGroupExistenceWithAck", "expected at least 4"),
    ([26, "u", "g", 1, {2: 1.5}], "UserJoinGroupWithAck", "ttl"),
    ([32, "u", None, 1, None, {3: 4}], "CloseUserConnectionsWithAck", "key 3"),
    ([35, "i", "c", "s", 5, b"", {}], "ClientCompletion", "protocol"),
    ([1, 1, 0, "", 0, {}, "yes"], "HandshakeRequest", "allowStatefulReconnects"),
    ([1, True], "HandshakeRequest", "version"),
    ([2], "HandshakeResponse", "expected at least 2"),
    ([3, "a", 5], "Ping", "ping value"),
    ([39, "c", 3, 1, {}], "ConnectionFlowControl", "connectionType"),
    ([39, "c", 1, 9, {}], "ConnectionFlowControl", "operation"),
    ([40, {}, "g", 1], "GroupMemberQuery", "expected at least 6"),
    ([40, "g", 1, 10, None, {}], "GroupMemberQuery", "ext"),
]


@pytest.mark.parametrize(("array", "name", "field"), MALFORMED)
def test_malformed_body_raises_a_remote_error_naming_the_type_and_field(
    array: list[Any], name: str, field: str
) -> None:
    text = _error_of(array)
    assert f"{name} message (type {array[0]})" in text
    assert field in text


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (_pack({"type": 3}), "expected a non-empty array"),
        (_pack([]), "expected a non-empty array"),
        (_pack(["3"]), "element 0 (type) must be an integer"),
        (b"\xc1", "not valid MessagePack"),
        (b"\x93\x06", "not valid MessagePack"),
        (b"", "not valid MessagePack"),
        (b"\x93\x06\xa2\xff\xfe\xc4\x00", "(ConnectionData, type 6)"),
    ],
)
def test_body_that_is_not_a_message_raises_a_remote_error(body: bytes, expected: str) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        parse_message_body(body)
    assert expected in str(caught.value)


# --------------------------------------------------------------------------------------------
# Writing rules


def _written(message: ServiceMessage) -> Any:
    return msgpack.unpackb(_body_of(write_message(message)), strict_map_key=False)


def test_extension_keys_are_written_only_when_set() -> None:
    assert _written(ConnectionDataMessage("c", b"x")) == [6, "c", b"x", {}]
    assert _written(
        ConnectionDataMessage(
            "c", b"x", 7, data_message_type=DataMessageType.INVOCATION, is_partial=True
        )
    ) == [6, "c", b"x", {1: 7, 5: 2, 6: True}]
    assert _written(UserJoinGroupMessage("u", "g", ttl=0))[-1] == {2: 0}
    assert _written(OpenConnectionMessage("c", protocol="json", tracing_id=2))[-1] == {
        1: 2,
        3: "json",
    }
    assert _written(BroadcastDataMessage({}, filter="f"))[-1] == {4: "f"}


def test_no_extension_key_outside_one_to_six_is_ever_written() -> None:
    frames = write_messages(SAMPLE + [ClientCompletionMessage("i", "c", "s", "json", b"", 1)])
    parser = ServiceProtocolParser()
    parser.receive_data(frames)
    assert len(parser.messages_received()) == len(SAMPLE) + 1
    pos = 0
    while pos < len(frames):
        got = decode_varint(frames, pos)
        assert got is not None
        size, n = got
        array = msgpack.unpackb(frames[pos + n : pos + n + size], strict_map_key=False)
        for value in array:
            if isinstance(value, dict) and all(isinstance(k, int) for k in value):
                assert set(value) <= {1, 2, 3, 4, 5, 6}
        pos += n + size


def test_handshake_request_is_six_elements_unless_stateful_reconnect_is_said() -> None:
    assert _written(ServiceHandshakeRequest()) == [1, 1, 0, "", 0, {}]
    assert _written(ServiceHandshakeRequest(allow_stateful_reconnects=False))[-1] is False
    on_demand = ServiceHandshakeRequest(connection_type=ConnectionType.ON_DEMAND, target="i9")
    assert _written(on_demand) == [1, 1, 1, "i9", 0, {}]


def test_handshake_request_target_is_written_empty_for_a_default_connection() -> None:
    assert _written(ServiceHandshakeRequest(target="ignored"))[3] == ""


def test_ack_is_five_elements_unless_it_has_a_payload() -> None:
    assert _written(ServiceAckMessage(3, AckStatus.NOT_FOUND)) == [20, 3, 2, "", {}]
    assert _written(ServiceAckMessage(3, AckStatus.OK, payload=b"\x92\x90\xc0")) == [
        20,
        3,
        1,
        "",
        {},
        b"\x92\x90\xc0",
    ]


def test_group_broadcast_is_always_written_with_seven_elements() -> None:
    assert _written(GroupBroadcastDataMessage("g", {"json": b"j"})) == [
        13,
        "g",
        [],
        {"json": b"j"},
        {},
        [],
        None,
    ]


def test_handshake_response_success_is_the_documented_bytes() -> None:
    assert _body_of(write_message(ServiceHandshakeResponse())).hex() == "9402a080c0"
    assert ServiceHandshakeResponse().succeeded
    assert ServiceHandshakeResponse(None).succeeded
    assert not ServiceHandshakeResponse("Version mismatch.").succeeded


def test_group_member_query_writes_its_extension_map_second() -> None:
    message = GroupMemberQueryMessage("g", 1, 10, None, tracing_id=3)
    assert _written(message) == [40, {1: 3}, "g", 1, 10, None]


def test_flow_control_writes_int32_even_for_large_values_and_refuses_overflow() -> None:
    message = ConnectionFlowControlMessage(
        "c", ConnectionFlowControlOperation.OFFLINE, FlowControlConnectionType.SERVER
    )
    assert _body_of(write_message(message)).hex() == "9527a163d200000002d20000000480"
    with pytest.raises(LocalProtocolError, match="int32"):
        write_message(ConnectionFlowControlMessage("c", 2**31))


def test_writing_something_that_is_not_a_service_message_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError, match="expected a service message"):
        write_message("hello")  # type: ignore[arg-type]


def test_writing_a_value_msgpack_cannot_carry_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError, match="ConnectionDataMessage"):
        write_message(ConnectionDataMessage("c", object()))  # type: ignore[arg-type]


def test_messages_built_with_lists_equal_parsed_ones() -> None:
    built = MultiUserDataMessage(["u1", "u2"], {"json": b"j"})
    assert built.user_ids == ("u1", "u2")
    assert parse_message_body(_body_of(write_message(built))) == built
    open_ = OpenConnectionMessage("c", headers={"h": ["a", "b"]})
    assert open_.headers == {"h": ("a", "b")}
    assert parse_message_body(_body_of(write_message(open_))) == open_


def test_a_string_where_a_list_belongs_is_refused_when_building() -> None:
    with pytest.raises(LocalProtocolError, match="connection_ids"):
        MultiConnectionDataMessage("c1", {})


ROUND_TRIP: list[ServiceMessage] = [
    ServiceHandshakeRequest(1, ConnectionType.WEAK, "t", 2, True),
    ServiceHandshakeResponse("no", "cid"),
    ServicePing(("a", "b", "c")),
    ServiceErrorMessage("boom"),
    ServiceEventMessage(1, "c", 3, "full"),
    AccessKeyRequestMessage("tok", "kid"),
    AccessKeyResponseMessage("kid", "key", None, None),
    OpenConnectionMessage("c", {"a": "b"}, {"h": ["1", "2"]}, "?a=b", "messagepack", 2**64 - 1),
    CloseConnectionMessage("c", "err", {"Asrs-Migrate-To": ["s2"]}, 4),
    ConnectionDataMessage("c", b"\x00" * 70000, 1, 3, True),
    ConnectionReconnectMessage("c"),
    MultiConnectionDataMessage(["a", "b"], {"json": b"j"}, 2, "f"),
    UserDataMessage("u", {"json": b"j"}, None, "f"),
    MultiUserDataMessage(["u"], {}, 3),
    BroadcastDataMessage({"json": b"j"}, ["x"], 4, None),
    GroupBroadcastDataMessage("g", {"json": b"j"}, ["x"], ["u"], "caller", 5, "f"),
    MultiGroupBroadcastDataMessage(["g1", "g2"], {"messagepack": b"m"}),
    JoinGroupMessage("c", "g", 1),
    LeaveGroupMessage("c", None),
    UserJoinGroupMessage("u", "g", 3600, 1),
    UserLeaveGroupMessage("u", None, 1),
    JoinGroupWithAckMessage("c", "g", 2**31 - 1),
    LeaveGroupWithAckMessage("c", None, 1, 2),
    UserJoinGroupWithAckMessage("u", "g", 1, 0, 2),
    UserLeaveGroupWithAckMessage("u", "g", 1),
    CheckUserInGroupWithAckMessage("u", "g", 1),
    CheckGroupExistenceWithAckMessage("g", 1),
    CheckConnectionExistenceWithAckMessage("c", 1, 9),
    CheckUserExistenceWithAckMessage("u", 1),
    CloseConnectionWithAckMessage("c", 1, "bye", 3),
    CloseConnectionsWithAckMessage(1, None, ["x"]),
    CloseUserConnectionsWithAckMessage("u", 1, "r", ["x"], 1),
    CloseGroupConnectionsWithAckMessage("g", 1, None, (), 1),
    GroupMemberQueryMessage("g", 1, 100, "next"),
    ServiceAckMessage(1, AckStatus.TIMEOUT, None, b""),
    ClientInvocationMessage("i", "c", "s", {"json": b"j"}, 1),
    ClientCompletionMessage("i", "c", "s", None, b"r"),
    ErrorCompletionMessage("i", "c", "s", None, 1),
    ServiceMappingMessage("i", "c", "instance"),
    ConnectionFlowControlMessage("c", ConnectionFlowControlOperation.RESUME),
]


def test_round_trip_table_covers_every_message_class() -> None:
    classes = {type(m) for m in ROUND_TRIP}
    assert classes == set(ServiceMessage.__args__)


@pytest.mark.parametrize("message", ROUND_TRIP, ids=lambda m: type(m).__name__)
def test_every_message_type_round_trips(message: ServiceMessage) -> None:
    frame = write_message(message)
    assert parse_message_body(_body_of(frame)) == message
    assert _written(message)[0] == message.message_type


@settings(max_examples=50, deadline=None)
@given(
    connection_id=st.text(max_size=40),
    payload=st.binary(max_size=300),
    tracing_id=st.none() | st.integers(0, 2**64 - 1),
    is_partial=st.booleans(),
)
def test_connection_data_round_trips_for_any_values(
    connection_id: str, payload: bytes, tracing_id: int | None, is_partial: bool
) -> None:
    message = ConnectionDataMessage(connection_id, payload, tracing_id, is_partial=is_partial)
    parser = ServiceProtocolParser()
    parser.receive_data(write_message(message))
    assert parser.messages_received() == [message]


# --------------------------------------------------------------------------------------------
# Enums, lookups and pings


def test_message_type_ids_are_the_catalogues() -> None:
    assert [int(t) for t in ServiceMessageType] == list(range(1, 44))
    assert int(ServiceMessageType.SERVICE_ERROR) == 15
    assert int(ServiceMessageType.SERVICE_EVENT) == 22
    assert int(ServiceMessageType.GROUP_MEMBER_QUERY) == 40
    assert [int(s) for s in AckStatus] == [1, 2, 3, 4]
    assert [int(c) for c in ConnectionType] == [0, 1, 2]


def test_payload_for_matches_the_protocol_name_case_insensitively() -> None:
    payloads = {"Json": b"j", "messagepack": b"m"}
    assert payload_for(payloads, "json") == b"j"
    assert payload_for(payloads, "MessagePack") == b"m"
    assert payload_for(payloads, "messagepack") == b"m"
    assert payload_for(payloads, "blazorpack") is None


def test_header_for_matches_the_header_name_case_insensitively() -> None:
    headers = {"asrs-instance-id": ("i1",)}
    assert header_for(headers, "Asrs-Instance-Id") == ("i1",)
    assert header_for(headers, "X-Forwarded-For") is None


def test_ping_of_builds_key_value_strings_in_order() -> None:
    ping = ServicePing.of(
        {PingKey.DIAGNOSTIC_MESSAGES: True}, status="1", clientcount=12, capacity=1000
    )
    assert ping.values == ("d-m", "1", "status", "1", "clientcount", "12", "capacity", "1000")
    assert _written(ping) == [3, "d-m", "1", "status", "1", "clientcount", "12", "capacity", "1000"]
    assert ServicePing.of([(PingKey.SHUTDOWN, PingKey.FIN_ACK)]).values == ("shutdown", "finack")


def test_ping_of_refuses_a_value_that_is_not_a_string_or_int() -> None:
    with pytest.raises(LocalProtocolError, match="status"):
        ServicePing.of(status=1.0)  # type: ignore[arg-type]


def test_ping_get_reads_keys_at_even_positions_only_as_the_sdk_does() -> None:
    ping = ServicePing(("#clientInHub", "status", "status", "0", "target"))
    assert ping.get(PingKey.STATUS) == "0"
    assert ping.get(PingKey.TARGET) is None  # last element: no value
    assert ping.get("#clientInHub") == "status"
    assert ping.as_dict() == {"#clientInHub": "status", "status": "0"}
    assert ServicePing(("a", "1", "a", "2")).get("a") == "1"
    assert ServicePing().is_keep_alive and not ping.is_keep_alive


def test_ping_servers_reply_sorts_the_ids_and_holds_a_colon() -> None:
    reply = ServicePing.servers_reply(638000000000000000, ["s2", "s10", "s1"])
    assert reply.values == ("servers", "638000000000000000:s1;s10;s2")
    assert ServicePing.servers_reply(1, []).get(PingKey.SERVERS) == "1:"


def test_sdk_keep_alive_ping_parses() -> None:
    body = _pack([3, "#clientInHub", "3", "#client", "1"])
    ping = parse_message_body(body)
    assert isinstance(ping, ServicePing)
    assert ping.as_dict() == {"#clientInHub": "3", "#client": "1"}


# -- repeated claim types in OpenConnection (issue 14) ---------------------------------------

#: OpenConnection as the SDK's writer lays out a token with two roles: the claims map header
#: counts every claim, and the type ``role`` comes twice (WriteMapHeader(Claims.Length)).
_OPEN_WITH_REPEATED_ROLE = bytes.fromhex(
    "9604" "a26331"
    "83" "aa" + b"asrs.s.uid".hex() + "a161"
    "a4" + b"role".hex() + "a5" + b"admin".hex()
    + "a4" + b"role".hex() + "a6" + b"editor".hex()
    + "80" "a0" "80"
)


def test_open_connection_repeated_claim_type_is_written_once_per_value():
    message = OpenConnectionMessage("c1", {"asrs.s.uid": "a", "role": ("admin", "editor")})
    assert write_message(message) == encode_varint(len(_OPEN_WITH_REPEATED_ROLE)) + \
        _OPEN_WITH_REPEATED_ROLE


def test_open_connection_repeated_claim_type_is_read_with_every_value_in_order():
    message = parse_message_body(_OPEN_WITH_REPEATED_ROLE)
    assert message == OpenConnectionMessage("c1", {"asrs.s.uid": "a",
                                                   "role": ("admin", "editor")})
    parser = ServiceProtocolParser(raw_connection_data=True, raw_user_data=True)
    parser.receive_data(write_message(message))
    assert parser.items_received() == [message]


def test_open_connection_claims_given_as_a_list_equal_the_parsed_tuple():
    built = OpenConnectionMessage("c1", {"role": ["admin", "editor", "admin"]})
    assert parse_message_body(write_message(built)[1:]) == built
    assert built.claims == {"role": ("admin", "editor", "admin")}


def test_open_connection_claim_that_is_not_a_string_is_refused():
    body = bytes.fromhex("9304a2633181a4726f6c6591a161")  # claims {"role": ["a"]}
    with pytest.raises(RemoteProtocolError, match="claims"):
        parse_message_body(body)


@pytest.mark.parametrize("depth", [100, 1000, 5000])
def test_parse_a_value_nested_deeper_than_python_recurses_is_a_short_protocol_error(depth):
    # A HandshakeResponse whose error field is a list nested ``depth`` deep: quoting it in
    # the error message once recursed past Python's limit.
    body = b"\x92\x02" + b"\x91" * depth + b"\x01"
    with pytest.raises(RemoteProtocolError) as caught:
        parse_message_body(body)
    assert len(str(caught.value)) < 300
    if depth > 2000:  # past msgpack's own nesting limit
        assert "(values nested too deeply)" in str(caught.value)
