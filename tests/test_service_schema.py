"""Tests of the service protocol's schemas (``relaycore.protocol._service._codec``): one schema
per message drives its reader, its writer and its errors, and the specialised reader and writer
compiled from a schema do exactly what the generic path does with it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relaycore._accel import decode_varint
from relaycore.protocol._errors import LocalProtocolError, RemoteProtocolError
from relaycore.protocol._service import (
    ConnectionDataMessage,
    ServiceMessage,
    ServiceMessageType,
    ServiceProtocolParser,
    _codec,
    connection_data_prefix,
    parse_message_body,
    write_connection_data,
    write_message,
)
from relaycore.protocol._service._codec import (
    EXT,
    Schema,
    int32,
    nullable,
    opt,
    schema,
    string,
    strings,
)

SCHEMAS = sorted(_codec._BY_TYPE.values(), key=lambda spec: spec.type)
HOT = {"ConnectionData", "MultiConnectionData", "UserData", "MultiUserData", "BroadcastData",
       "GroupBroadcastData", "MultiGroupBroadcastData", "Ping", "OpenConnection", "CloseConnection"}


def _body(frame: bytes) -> bytes:
    got = decode_varint(frame, 0)
    assert got is not None
    return frame[got[1] :]


# --------------------------------------------------------------------------------------------
# The registry


def test_every_message_class_has_a_schema_and_every_known_type_one_class() -> None:
    assert set(_codec._SCHEMAS) == set(ServiceMessage.__args__)
    assert sorted(_codec._BY_TYPE) == list(range(1, 41))  # 41-43: layouts unconfirmed
    for cls, spec in _codec._SCHEMAS.items():
        assert spec.cls is cls and spec.type == cls.message_type


def test_the_messages_sent_per_client_message_or_connection_are_the_specialised_ones() -> None:
    assert {spec.name for spec in SCHEMAS if spec.hot} == HOT
    for spec in SCHEMAS:
        reader = _codec._READERS[spec.type]
        writer = _codec._WRITERS[spec.cls]
        assert getattr(reader, "__name__", "") == (f"read_{spec.name}" if spec.hot else "")
        assert getattr(writer, "__name__", "") == (f"write_{spec.name}" if spec.hot else "")


@pytest.mark.parametrize(
    ("message_type", "need", "layout"),
    [
        (1, 2, "[1, version, (connectionType, target)?, migrationLevel?, ext?, "
               "allowStatefulReconnects?]"),
        (3, 1, "[3, string, string, ...]"),
        (4, 3, "[4, connectionId, claims, (headers, queryString)?, ext?]"),
        (13, 4, "[13, group, excludedConnectionIds, payloads, ext?, "
                "(excludedUserIds, callerUserId)?]"),
        (20, 4, "[20, ackId, status, message, ext?, payload?]"),
        (35, 7, "[35, invocationId, connectionId, callerServerId, protocol, payload, ext]"),
        (39, 4, "[39, connectionId, connectionType, operation, ext?]"),
        (40, 6, "[40, ext, group, ackId, max, continuationToken]"),
    ],
)
def test_a_schema_gives_the_shortest_array_read_and_the_layout_quoted(
    message_type: int, need: int, layout: str
) -> None:
    spec = _codec._BY_TYPE[message_type]
    assert (spec.need, spec.layout) == (need, layout)


@pytest.mark.parametrize("spec", [s for s in SCHEMAS if s.need > 1], ids=lambda spec: spec.name)
def test_an_array_one_short_is_refused_with_the_schemas_layout(spec: Schema) -> None:
    array = [spec.type] + [None] * (spec.need - 2)
    with pytest.raises(RemoteProtocolError) as caught:
        parse_message_body(msgpack.packb(array))
    assert str(caught.value) == (
        f"{spec.name} message (type {spec.type}) has {spec.need - 1} elements; "
        f"expected at least {spec.need}: {spec.layout}"
    )


# --------------------------------------------------------------------------------------------
# The specialised paths agree with the generic one, for every message


#: Values for each kind of element, valid ones and a few wrong ones; the other kinds (enums, a
#: nil that reads as "") draw from everything.
_ANY = st.sampled_from([
    None, "", "c1", "é", 0, 1, 2, 3, 4, -1, 2**31 - 1, 2**31, 2**64 - 1, True, False, 1.5,
    b"", b"payload", (), ("a", "b"), ("a", 1), {}, {"json": b"j"}, {"json": None}, {"json": "s"},
    {"h": ("v",)}, {"a": "b"}, {1: 5}, {1: -1}, {2: 30, 3: "json"}, {5: 2, 6: True}, {6: 1},
    {9: "unknown"}, {"k": 1},
])
_KINDS: dict[Callable[..., Any], st.SearchStrategy[Any]] = {
    _codec._str: st.sampled_from(["c1", "", "é"]),
    _codec._opt_str: st.sampled_from(["c1", "", None]),
    _codec._int32: st.sampled_from([0, 1, 2, 3, -5, 2**31 - 1]),
    _codec._bool: st.booleans(),
    _codec._bin: st.sampled_from([b"", b"\x00p", None]),
    _codec._opt_bin: st.sampled_from([b"", b"p", None]),
    _codec._strs: st.sampled_from([(), ("a", "b"), None]),
    _codec._payloads: st.sampled_from([{}, {"json": b"j"}, {"json": b"j", "messagepack": b"m"},
                                       {"json": None}, None]),
    _codec._claims: st.sampled_from([{}, {"a": "b", "role": "r"}, None]),
    _codec._headers: st.sampled_from([{}, {"h": ("v", "w")}, None]),
    _codec._read_ext: st.sampled_from([{}, {1: 7}, {1: 7, 2: 30, 3: "json", 4: "f", 5: 2, 6: True},
                                       {3: None}, {9: 1}, None]),
    _codec._rest_strs: st.sampled_from(["k", "v", "", None]),
}


@st.composite
def arrays(draw: st.DrawFn, spec: Schema) -> list[Any]:
    """An array of ``spec``'s type: mostly its kinds of values, sometimes anything, cut short
    or with extra elements."""
    array: list[Any] = [spec.type]
    for field in spec.fields:
        kind = _KINDS.get(field.read) if field.read is not None else None
        if field.pack is _codec._pack_int32:  # an enum's
            kind = st.integers(0, 5)
        values = _ANY if kind is None or draw(st.integers(0, 9)) == 0 else kind
        if field.rest:
            array += draw(st.lists(values, max_size=5))
        else:
            array.append(draw(values))
    if draw(st.booleans()):
        array = array[: draw(st.integers(1, len(array)))]
    return array + draw(st.lists(_ANY, max_size=2))


def _outcome(function: Callable[[Any], Any], argument: Any) -> tuple[str, Any]:
    """What ``function(argument)`` gives: ``("ok", repr, value)``, or the error's type and
    text (a writer's MessagePack errors are the raw ones ``write_message`` turns into a
    ``LocalProtocolError``)."""
    try:
        result = function(argument)
    except (RemoteProtocolError, LocalProtocolError, TypeError, ValueError, OverflowError) as exc:
        return type(exc).__name__, str(exc)
    return "ok", (repr(result), result)


_QUIET = [HealthCheck.too_slow, HealthCheck.filter_too_much]

#: Every schema compiled, the hot ones and the others: the compiler is checked on every layout.
_COMPILED_READERS = {spec.type: _codec._compile_reader(spec) for spec in SCHEMAS}
_COMPILED_WRITERS = {spec.type: _codec._compile_writer(spec) for spec in SCHEMAS}


@pytest.mark.parametrize("spec", SCHEMAS, ids=lambda spec: spec.name)
@settings(max_examples=100, deadline=None, suppress_health_check=_QUIET)
@given(data=st.data())
def test_the_compiled_reader_reads_what_the_generic_one_reads(
    spec: Schema, data: st.DataObject
) -> None:
    compiled = _COMPILED_READERS[spec.type]
    array = tuple(msgpack.unpackb(msgpack.packb(data.draw(arrays(spec))), use_list=False,
                                  strict_map_key=False))
    assert _outcome(compiled, array) == _outcome(lambda a: _codec._read_generic(spec, a), array)


#: Values a message may be built with that MessagePack cannot carry, or that the SDK's layout
#: refuses.
_UNWRITABLE = st.sampled_from([object(), 2**64, 1.5, {"json": object()}, [object()]])


@pytest.mark.parametrize("spec", SCHEMAS, ids=lambda spec: spec.name)
@settings(max_examples=100, deadline=None, suppress_health_check=_QUIET)
@given(data=st.data())
def test_the_compiled_writer_writes_what_the_generic_one_writes(
    spec: Schema, data: st.DataObject
) -> None:
    array = tuple(msgpack.unpackb(msgpack.packb(data.draw(arrays(spec))), use_list=False,
                                  strict_map_key=False))
    try:
        message = _codec._read_generic(spec, array)
    except RemoteProtocolError:
        return
    if data.draw(st.booleans()):  # a field the writer may have to refuse
        name = data.draw(st.sampled_from([f.name for f in dataclasses.fields(message)]))
        try:
            message = dataclasses.replace(message, **{name: data.draw(_UNWRITABLE)})
        except (LocalProtocolError, AttributeError, TypeError):
            return  # refused when building it
    compiled = _COMPILED_WRITERS[spec.type]
    assert _outcome(compiled, message) == _outcome(
        lambda m: _codec._write_generic(spec, m), message
    )


@settings(max_examples=200, deadline=None)
@given(connection_id=st.text(max_size=300), payload=st.binary(max_size=70000))
def test_write_connection_data_writes_what_write_message_writes(
    connection_id: str, payload: bytes
) -> None:
    frame = write_connection_data(connection_data_prefix(connection_id), payload)
    assert frame == write_message(ConnectionDataMessage(connection_id, payload))
    parser = ServiceProtocolParser(raw_connection_data=True)
    parser.receive_data(frame)
    assert parser.items_received() == [(connection_id, payload)]


# --------------------------------------------------------------------------------------------
# A new message is one declaration


@pytest.fixture
def registered() -> Iterator[list[type]]:
    """Forget the messages a test declares, so that their type stays unknown elsewhere."""
    classes: list[type] = []
    yield classes
    for cls in classes:
        spec = _codec._SCHEMAS.pop(cls)
        del _codec._BY_TYPE[spec.type], _codec._READERS[spec.type], _codec._WRITERS[cls]


@pytest.mark.parametrize("hot", [False, True])
def test_a_declared_message_is_read_written_and_named_in_errors(
    registered: list[type], hot: bool
) -> None:
    @schema("Frobnicate", string("connectionId"), strings("tags"), int32("count"), opt(EXT),
            opt(nullable("note")), hot=hot)
    @dataclasses.dataclass(frozen=True, slots=True)
    class FrobnicateMessage:
        message_type: ClassVar[int] = 200
        connection_id: str
        tags: tuple[str, ...]
        count: int
        note: str | None = "none"
        tracing_id: int | None = None

    registered.append(FrobnicateMessage)
    message = FrobnicateMessage("c1", ("a",), 3, None, tracing_id=9)
    frame = write_message(message)  # type: ignore[arg-type]
    assert msgpack.unpackb(_body(frame), strict_map_key=False) == [200, "c1", ["a"], 3, {1: 9},
                                                                  None]
    parsed: Any = parse_message_body(_body(frame))
    assert parsed == message
    parsed = parse_message_body(msgpack.packb([200, "c1", None, 3]))
    assert parsed == FrobnicateMessage("c1", (), 3)
    with pytest.raises(RemoteProtocolError) as caught:
        parse_message_body(msgpack.packb([200, "c1", ["a"], "3"]))
    assert str(caught.value) == (
        "Frobnicate message (type 200): element 3 (count) must be an int32, got str '3'"
    )
    with pytest.raises(RemoteProtocolError, match=r"expected at least 4: "
                       r"\[200, connectionId, tags, count, ext\?, note\?\]"):
        parse_message_body(msgpack.packb([200, "c1"]))


def test_a_schema_that_names_a_field_its_class_lacks_is_refused() -> None:
    with pytest.raises(TypeError, match="no field 'group_name'"):
        @schema("Broken", string("group", "group_name"))
        @dataclasses.dataclass(frozen=True)
        class BrokenMessage:
            message_type: ClassVar[int] = ServiceMessageType.REFRESH_AUTH
            group: str
