"""Property-based tests of every parser that reads what a peer sends.

Whatever bytes or text arrive, each parser answers with a result or with its documented error,
never with another exception (that would be a traceback in the relay, or a dropped connection
without a Close):

* HTTP front (``relay._http.HttpConnection``): a ``Request``, ``None`` or ``HttpError``, and
  the answer to it can always be written;
* WebSocket (``protocol._websocket``), server and client roles: events, or ``.error`` set;
* hub protocol, JSON and MessagePack, and its handshake: ``RemoteProtocolError`` only;
* service protocol (``ServiceProtocolParser``, ``parse_message_body``): ``RemoteProtocolError``;
* negotiate versions: an int, or ``RemoteProtocolError`` with .NET's verdict;
* JWTs (``TokenValidator.validate``): ``TokenError`` only; connection strings:
  ``ConnectionStringError`` only;
* REST routes and query values, through ``Relay.handle_stream`` on an in-memory stream: an
  answer that is not a 500, and no internal error counted.

The parsers that use the fast path run with the pure-Python twin (``py``) and with the
extension (``c``) patched into their modules by the ``fastpath`` fixture, whatever
``RELAYCORE_NO_EXTENSIONS`` says. Inputs mix plain random bytes, mutated byte vectors from
``tests/vectors`` and inputs built from each grammar, so that the deep paths are reached too.
Coverage-guided fuzzing of the same entry points lives in ``fuzz/`` (``make fuzz``).
"""

from __future__ import annotations

import base64
import importlib
import json
import logging
import os
import re
import time
from collections.abc import Coroutine, Iterator
from types import ModuleType
from typing import Any
from urllib.parse import quote

import h11
import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import relaycore._fastpath_py
from relaycore.protocol import _hub, _websocket, _wire
from relaycore.protocol._auth import (
    ConnectionString,
    ConnectionStringError,
    TokenError,
    TokenValidator,
    audience_matches,
    generate_access_token,
    normalize_audience,
    wire_hub_name,
)
from relaycore.protocol._errors import RemoteProtocolError
from relaycore.protocol._hub import (
    HandshakeRequest,
    JsonHubProtocol,
    MessagePackHubProtocol,
    check_handshake_request,
    parse_handshake_request,
    parse_handshake_response,
)
from relaycore.protocol._negotiate import (
    MAX_NEGOTIATE_VERSION,
    negotiate_response,
    parse_negotiate_version,
)
from relaycore.protocol._service import (
    ServiceMessage,
    ServiceProtocolParser,
    parse_message_body,
)
from relaycore.protocol._service import _codec as _service_codec
from relaycore.protocol._service import _parser as _service_parser
from relaycore.protocol._websocket import (
    BinaryMessage,
    CloseReceived,
    Ping,
    Pong,
    Role,
    State,
    TextMessage,
    WebSocketProtocol,
)
from relaycore.relay import Relay, RelayConfig
from relaycore.relay._http import HttpConnection, HttpError, Response
from relayhelpers import KEY, load_vectors

REQUIRE_EXTENSIONS = os.environ.get("RELAYCORE_REQUIRE_EXTENSIONS", "") not in ("", "0")

#: Examples per property: enough to meet every branch the strategies aim at, few enough that
#: the module takes about 30 s per pass (CI runs it twice). ``make fuzz`` goes much further.
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large]
MANY = settings(max_examples=200, deadline=None, suppress_health_check=_QUIET)
FEWER = settings(max_examples=100, deadline=None, suppress_health_check=_QUIET)

# --------------------------------------------------------------------------------------------
# The fast path: the twin or the extension, patched into the parsers that import it


#: The modules that took their fast-path functions from ``relaycore._accel`` at import time.
_ACCEL_USERS = (_websocket, _hub, _wire, _service_codec, _service_parser)
_ACCEL_NAMES = ("apply_mask", "decode_varint", "encode_frame_header", "encode_varint",
                "parse_frame_header", "split_records", "split_varint_frames", "unmask_messages")


def _load_extension() -> ModuleType:
    try:
        return importlib.import_module("relaycore._fastpath")
    except ImportError as exc:
        reason = (f"relaycore._fastpath is not built ({exc}); build it with "
                  "RELAYCORE_BUILD_EXTENSION=yes pip install -e . --no-build-isolation")
        if REQUIRE_EXTENSIONS:
            pytest.fail(f"RELAYCORE_REQUIRE_EXTENSIONS=1 but {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module", params=["py", "c"])
def fastpath(request: pytest.FixtureRequest) -> Iterator[ModuleType]:
    """The parsers of this module run on the twin (``py``) or the extension (``c``)."""
    module = relaycore._fastpath_py if request.param == "py" else _load_extension()
    with pytest.MonkeyPatch.context() as patch:
        for user in _ACCEL_USERS:
            for name in _ACCEL_NAMES:
                if hasattr(user, name):
                    patch.setattr(user, name, getattr(module, name))
        yield module


def test_the_fastpath_fixture_patches_every_protocol_module_that_took_the_fast_path() -> None:
    import pkgutil

    import relaycore._accel
    import relaycore.protocol

    takers = set()
    for info in pkgutil.walk_packages(relaycore.protocol.__path__, "relaycore.protocol."):
        module = importlib.import_module(info.name)
        if any(getattr(module, name, None) is getattr(relaycore._accel, name)
               for name in _ACCEL_NAMES):
            takers.add(module)
    assert takers == set(_ACCEL_USERS)


# --------------------------------------------------------------------------------------------
# Input strategies shared by the parsers


def _vector_bytes(name: str, keys: tuple[str, ...], hex_keys: tuple[str, ...]) -> list[bytes]:
    """Every value under ``keys`` (text, as UTF-8) or ``hex_keys`` (hex) in a vector file."""
    found: list[bytes] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key in hex_keys and isinstance(item, str):
                    found.append(bytes.fromhex(item))
                elif key in keys and isinstance(item, str):
                    found.append(item.encode("utf-8"))
                else:
                    walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(load_vectors(name))
    return found


_HUB = load_vectors("hub-protocol.json")
HUB_JSON_VECTORS = [v["text"].encode() for group in ("json", "json_client_accepts",
                                                      "json_client_rejects")
                    for v in _HUB[group]]
HUB_MSGPACK_VECTORS = [bytes.fromhex(v["framed_hex"]) for group in ("msgpack", "msgpack_invalid")
                       for v in _HUB[group] if "framed_hex" in v]
HANDSHAKE_VECTORS = [v["text"].encode() for v in _HUB["handshake"]]
SERVICE_VECTORS = [bytes.fromhex(v["framed_hex"])
                   for v in load_vectors("service-protocol.json")["vectors"]]


@st.composite
def mutated(draw: st.DrawFn, seeds: st.SearchStrategy[bytes]) -> bytes:
    """A seed with a few random edits: bytes flipped, inserted, deleted, or the tail cut."""
    data = bytearray(draw(seeds))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "cut", "repeat"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        elif op == "cut":
            del data[at:]
        elif op == "repeat":
            data[at:at] = data[at:at + draw(st.integers(1, 16))] * draw(st.integers(1, 4))
    return bytes(data)


@st.composite
def chunked(draw: st.DrawFn, data: st.SearchStrategy[bytes]) -> list[bytes]:
    """``data`` as the pieces one read after another hands over (empty pieces excluded)."""
    whole = draw(data)
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(whole) - 1)), max_size=4)))
    pieces = [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)], strict=True)]
    return [p for p in pieces if p]


def varint(n: int) -> bytes:
    return relaycore._fastpath_py.encode_varint(n)


scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
           | st.text(max_size=12))
json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)
msgpack_values = st.recursive(
    scalars | st.binary(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(scalars, inner, max_size=4),
    max_leaves=12,
)


def drive(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coroutine`` to its end without an event loop; the streams here never wait."""
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value
    coroutine.close()
    raise AssertionError("the coroutine waited on the event loop; expected it never to wait")


class ScriptedStream:
    """A stream that hands out ``chunks``, then end of stream, and keeps what is sent to it.
    Nothing in it waits, so code over it runs with ``drive`` or under trio alike."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)
        self.sent = bytearray()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""

    async def send_all(self, data: bytes) -> None:
        self.sent += data

    async def send_eof(self) -> None:
        pass

    async def wait_send_all_might_not_block(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


# --------------------------------------------------------------------------------------------
# HTTP front


REQUESTS = [
    b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"HEAD /api/health HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost",
    b"HEAD /api/health HTTP/1.1\r\nHost: x\r\n\r\nBROKEN REQUEST\r\n\r\n",
    b"POST /client/negotiate?hub=chat&negotiateVersion=1 HTTP/1.1\r\nHost: [\r\n"
    b"Content-Length: 0\r\n\r\n",
    b"POST /api/hubs/chat/:send?api-version=2022-06-01 HTTP/1.1\r\nHost: h\r\n"
    b"Content-Type: application/json\r\nContent-Length: 33\r\n\r\n"
    b'{"target":"t","arguments":[1,2]}\n',
    b"POST /api/hubs/chat/:send HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n",
    b"GET /client/?hub=chat&access_token=x HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58",
    "GET //[ HTTP/1.1\r\nHost: x\r\nOrigin: http://\u00e9.x\r\n\r\n".encode(),
    b"PUT /api/hubs/chat/groups/g/users/u?ttl=" + b"9" * 400 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
]

http_inputs = st.one_of(
    st.binary(max_size=400),
    mutated(st.sampled_from(REQUESTS)),
    mutated(st.lists(st.sampled_from(REQUESTS), min_size=2, max_size=3).map(b"".join)),
)


def serve_http(chunks: list[bytes], *, max_head: int, max_body: int) -> tuple[bytes, list[str]]:
    """The relay's request loop over one connection, answering each request: what it wrote,
    and the method of each request answered ("" for one that did not parse)."""
    stream = ScriptedStream(chunks)
    http = HttpConnection(stream, max_head=max_head, max_body=max_body)  # type: ignore[arg-type]
    methods = []
    for _ in range(8):
        try:
            request = drive(http.read_request())
        except HttpError as err:
            # 4xx, or 501 for a transfer coding h11 does not implement; never a 500.
            assert 400 <= err.status < 500 or err.status == 501, err
            drive(http.send_response(Response.error(err), close=True))
            methods.append("")
            break
        if request is None or request.is_websocket_upgrade:
            break
        drive(http.send_response(Response.json(200, {"path": request.path})))
        methods.append(request.method)
        if not http.can_continue():
            break
    return bytes(stream.sent), methods


def response_statuses(sent: bytes, methods: list[str]) -> list[int]:
    """The status of each response in ``sent``, read by h11 as the client that sent requests
    with ``methods`` reads them (a HEAD's answer has no body)."""
    client = h11.Connection(h11.CLIENT)
    client.receive_data(sent)
    statuses: list[int] = []
    for method in methods:
        client.send(h11.Request(method=method or "GET", target="/", headers=[("Host", "x")]))
        client.send(h11.EndOfMessage())
        while True:
            event = client.next_event()
            if isinstance(event, h11.Response):
                statuses.append(event.status_code)
            elif isinstance(event, h11.EndOfMessage):
                break
            elif event is h11.NEED_DATA:
                return statuses
        if client.our_state is not h11.DONE or client.their_state is not h11.DONE:
            return statuses
        client.start_next_cycle()
    return statuses


@MANY
@given(chunks=chunked(http_inputs), max_head=st.sampled_from([64, 1024, 16 << 10]),
       max_body=st.sampled_from([0, 16, 1 << 20]))
def test_http_read_request_any_bytes_give_a_request_none_or_an_http_error(
    chunks: list[bytes], max_head: int, max_body: int
) -> None:
    sent, methods = serve_http(chunks, max_head=max_head, max_body=max_body)
    # What was written is one well-formed response per request answered.
    assert len(response_statuses(sent, methods)) == len(methods)


def test_http_a_head_then_a_malformed_request_is_answered_with_a_body() -> None:
    sent, methods = serve_http([REQUESTS[2]], max_head=16 << 10, max_body=1 << 20)
    assert methods == ["HEAD", ""]
    assert response_statuses(sent, methods) == [200, 400]


def test_http_a_head_with_a_malformed_target_is_answered_400_without_a_body() -> None:
    sent, methods = serve_http([b"HEAD //[ HTTP/1.1\r\nHost: x\r\n\r\n"],
                               max_head=16 << 10, max_body=1 << 20)
    assert methods == [""]
    assert response_statuses(sent, ["HEAD"]) == [400]


# --------------------------------------------------------------------------------------------
# WebSocket


def ws_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0,
             mask: bytes | None = None, length: int | None = None) -> bytes:
    """One frame as RFC 6455 §5.2 lays it out; ``length`` may lie about the payload."""
    n = len(payload) if length is None else length
    head = bytearray([(0x80 if fin else 0) | (rsv << 4) | opcode])
    bit = 0x80 if mask is not None else 0
    if n < 126:
        head.append(bit | n)
    elif n < 1 << 16:
        head.append(bit | 126)
        head += n.to_bytes(2, "big")
    else:
        head.append(bit | 127)
        head += n.to_bytes(8, "big")
    if mask is None:
        return bytes(head) + payload
    head += mask
    return bytes(head) + relaycore._fastpath_py.apply_mask(payload, mask)


payloads = st.one_of(
    st.binary(max_size=140),
    st.text(max_size=40).map(lambda t: t.encode("utf-8")),
    st.tuples(st.integers(0, 5000), st.text(max_size=20)).map(
        lambda cr: cr[0].to_bytes(2, "big") + cr[1].encode("utf-8")),  # a Close payload
)


@st.composite
def ws_frames(draw: st.DrawFn, masked: bool) -> bytes:
    """Frames in the shape a peer in that role sends, with now and then a broken field."""
    out = []
    for _ in range(draw(st.integers(1, 6))):
        opcode = draw(st.sampled_from([0, 1, 2, 8, 9, 10]) | st.integers(0, 15))
        payload = draw(payloads)
        fin = draw(st.booleans())
        rsv = draw(st.sampled_from([0, 0, 0, 1, 4]))
        use_mask = masked if draw(st.integers(0, 9)) else not masked
        mask = draw(st.binary(min_size=4, max_size=4)) if use_mask else None
        length = draw(st.none() | st.none() | st.sampled_from([0, 126, 65535, 65536, 2**63]))
        out.append(ws_frame(opcode, payload, fin=fin, rsv=rsv, mask=mask, length=length))
    return b"".join(out)


def ws_inputs(masked: bool) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=300), ws_frames(masked), mutated(ws_frames(masked)))


EVENTS = (TextMessage, BinaryMessage, Ping, Pong, CloseReceived)


def feed_websocket(ws: WebSocketProtocol, chunks: list[bytes]) -> list[Any]:
    events: list[Any] = []
    for chunk in chunks:
        ws.receive_data(chunk)
        events += ws.events_received()
        assert isinstance(ws.data_to_send(), bytes)
    assert all(isinstance(event, EVENTS) for event in events)
    if ws.error is not None:
        assert isinstance(ws.error, RemoteProtocolError)
        assert ws.close_expected()
    ws.receive_eof()
    assert ws.state is State.CLOSED
    return events


@FEWER
@given(data=st.data(), role=st.sampled_from(Role),
       limit=st.sampled_from([None, 0, 5, 1 << 20]))
def test_websocket_receive_data_any_bytes_give_events_or_an_error(
    fastpath: ModuleType, data: st.DataObject, role: Role, limit: int | None
) -> None:
    chunks = data.draw(chunked(ws_inputs(masked=role is Role.SERVER)))
    mask_key = (lambda: b"\x01\x02\x03\x04") if role is Role.CLIENT else None
    ws = WebSocketProtocol(role, max_message_size=limit, mask_key=mask_key)
    feed_websocket(ws, chunks)


@FEWER
@given(data=ws_inputs(masked=True), text=st.booleans(), limit=st.sampled_from([None, 5, 1 << 20]))
def test_websocket_receive_messages_agrees_with_receive_data(
    fastpath: ModuleType, data: bytes, text: bool, limit: int | None
) -> None:
    shortcut = WebSocketProtocol(Role.SERVER, max_message_size=limit).receive_messages(data, text)
    if shortcut is None:
        return
    ws = WebSocketProtocol(Role.SERVER, max_message_size=limit)
    ws.receive_data(data)
    events = ws.events_received()
    assert ws.error is None
    assert ws.state is State.OPEN
    assert all(isinstance(e, TextMessage if text and isinstance(e, TextMessage)
                          else BinaryMessage) for e in events)
    assert shortcut == [e.data.encode("utf-8") if isinstance(e, TextMessage) else e.data
                        for e in events]


# --------------------------------------------------------------------------------------------
# Hub protocol: handshake, JSON, MessagePack


HUB_FIELDS = ["type", "target", "arguments", "invocationId", "headers", "streamIds", "result",
              "error", "item", "allowReconnect", "sequenceId", "protocol", "version"]


@st.composite
def hub_json_records(draw: st.DrawFn) -> bytes:
    records = []
    for _ in range(draw(st.integers(1, 4))):
        obj = draw(st.dictionaries(st.sampled_from(HUB_FIELDS) | st.text(max_size=4),
                                   json_values, max_size=6))
        if draw(st.integers(0, 4)):
            obj["type"] = draw(st.integers(-1, 11))
        records.append(json.dumps(obj).encode("utf-8"))
    tail = draw(st.sampled_from([b"\x1e", b"\x1e", b"", b"\x1e{"]))
    return b"\x1e".join(records) + tail


hub_json_inputs = st.one_of(
    st.binary(max_size=300),
    hub_json_records(),
    mutated(st.sampled_from(HUB_JSON_VECTORS)),
    mutated(hub_json_records()),
)


@st.composite
def hub_msgpack_frames(draw: st.DrawFn) -> bytes:
    out = []
    for _ in range(draw(st.integers(1, 4))):
        array = [draw(st.integers(-1, 11) | scalars),
                 *draw(st.lists(msgpack_values, max_size=7))]
        body = msgpack.packb(array, use_bin_type=True)
        out.append(varint(len(body)) + body)
    return b"".join(out)


hub_msgpack_inputs = st.one_of(
    st.binary(max_size=300),
    hub_msgpack_frames(),
    mutated(st.sampled_from(HUB_MSGPACK_VECTORS)),
    mutated(hub_msgpack_frames()),
)

#: An Invocation whose arguments are nested 1,000 deep (msgpack's packer refuses to write it).
_DEEP_MSGPACK = b"\x96\x01\x80\xc0\xa1t" + b"\x91" * 1000 + b"\x01\x90"


def parse_hub(protocol: JsonHubProtocol | MessagePackHubProtocol, data: bytes,
              limit: int | None) -> None:
    try:
        messages, consumed = protocol.parse(data, limit)
    except RemoteProtocolError:
        return
    assert 0 <= consumed <= len(data)
    assert all(type(m).__module__ == _hub.__name__ and type(m).__name__.endswith("Message")
               for m in messages)
    if isinstance(protocol, JsonHubProtocol):
        assert b"\x1e" not in data[consumed:]
        for message in messages:  # what was read can be written back and reads the same
            assert protocol.parse(protocol.write(message))[0] == [message]


@FEWER
@given(data=hub_json_inputs, limit=st.sampled_from([None, 8, 1 << 20]))
@example(data=b"[" * 5000 + b"\x1e", limit=None)
@example(data=b'{"type":1,"target":"t","arguments":' + b"[" * 1100 + b"]" * 1100 + b"}\x1e",
         limit=None)
def test_hub_json_parse_raises_only_remote_protocol_error(
    fastpath: ModuleType, data: bytes, limit: int | None
) -> None:
    parse_hub(JsonHubProtocol(), data, limit)


@FEWER
@given(data=hub_msgpack_inputs, limit=st.sampled_from([None, 8, 1 << 20]))
@example(data=varint(len(_DEEP_MSGPACK)) + _DEEP_MSGPACK, limit=None)
@example(data=b"\xff\xff\xff\xff\x7f", limit=None)
def test_hub_msgpack_parse_raises_only_remote_protocol_error(
    fastpath: ModuleType, data: bytes, limit: int | None
) -> None:
    parse_hub(MessagePackHubProtocol(), data, limit)


handshake_inputs = st.one_of(
    st.binary(max_size=200),
    mutated(st.sampled_from(HANDSHAKE_VECTORS)),
    st.dictionaries(st.sampled_from(["protocol", "version", "error", "type"]), json_values,
                    max_size=4).map(lambda d: json.dumps(d).encode() + b"\x1e"),
)


@MANY
@given(data=handshake_inputs)
def test_hub_handshake_parsing_raises_only_remote_protocol_error(data: bytes) -> None:
    try:
        found = parse_handshake_request(data)
    except RemoteProtocolError:
        pass
    else:
        if found is not None:
            request, consumed = found
            assert isinstance(request, HandshakeRequest)
            assert 0 < consumed <= len(data)
            verdict = check_handshake_request(request)
            assert verdict is None or isinstance(verdict, str)
    try:
        reply = parse_handshake_response(data)
    except RemoteProtocolError:
        return
    assert reply is None or reply[0] is None or isinstance(reply[0], str)


# --------------------------------------------------------------------------------------------
# Service protocol


@st.composite
def service_frames(draw: st.DrawFn) -> bytes:
    out = []
    for _ in range(draw(st.integers(1, 4))):
        array = [draw(st.integers(0, 45) | scalars),
                 *draw(st.lists(msgpack_values | st.text(max_size=6), max_size=10))]
        body = msgpack.packb(array, use_bin_type=True)
        out.append(varint(len(body)) + body)
    return b"".join(out)


service_inputs = st.one_of(
    st.binary(max_size=300),
    service_frames(),
    mutated(st.sampled_from(SERVICE_VECTORS)),
    mutated(st.lists(st.sampled_from(SERVICE_VECTORS), min_size=2, max_size=4).map(b"".join)),
    mutated(service_frames()),
)

#: A ConnectionData whose payload is an array nested 1,000 deep instead of bin.
_DEEP_SERVICE = b"\x93\x06\xa1c" + b"\x91" * 1000 + b"\x01"


def feed_service(parser: ServiceProtocolParser, chunks: list[bytes]) -> tuple[list[Any], bool]:
    """Feed every chunk; the items handed out, and whether the parser failed."""
    items: list[Any] = []
    first_error: RemoteProtocolError | None = None
    for chunk in chunks:
        try:
            parser.receive_data(chunk)
        except RemoteProtocolError as exc:
            # Once failed, the parser raises the same error on every later call.
            assert first_error is None or exc is first_error
            first_error = exc
        items += parser.items_received()
    if first_error is None:
        try:
            parser.receive_eof()
        except RemoteProtocolError:
            pass
    return items, first_error is not None


@FEWER
@given(chunks=chunked(service_inputs), raw=st.booleans(),
       limit=st.sampled_from([16, 1024, 16 << 20]))
@example(chunks=[varint(len(_DEEP_SERVICE)) + _DEEP_SERVICE], raw=True, limit=16 << 20)
@example(chunks=[varint(len(_DEEP_SERVICE)) + _DEEP_SERVICE], raw=False, limit=16 << 20)
def test_service_parser_raises_only_remote_protocol_error(
    fastpath: ModuleType, chunks: list[bytes], raw: bool, limit: int
) -> None:
    parser = ServiceProtocolParser(limit, raw_connection_data=raw, raw_user_data=raw)
    items, _failed = feed_service(parser, chunks)
    assert all(isinstance(item, (tuple, *ServiceMessage.__args__)) for item in items)
    if not raw:
        assert not any(isinstance(item, tuple) for item in items)


@FEWER
@given(data=service_inputs)
def test_service_raw_and_full_parsers_agree_on_what_is_valid(
    fastpath: ModuleType, data: bytes
) -> None:
    raw_items, raw_failed = feed_service(
        ServiceProtocolParser(raw_connection_data=True, raw_user_data=True), [data])
    items, failed = feed_service(ServiceProtocolParser(), [data])
    assert raw_failed == failed
    assert len(raw_items) == len(items)


@MANY
@given(body=st.one_of(st.binary(max_size=200), mutated(
    st.sampled_from(SERVICE_VECTORS).map(lambda framed: framed[1:]))))
@example(body=_DEEP_SERVICE)
def test_service_parse_message_body_raises_only_remote_protocol_error(body: bytes) -> None:
    try:
        message = parse_message_body(body)
    except RemoteProtocolError:
        return
    assert message is None or isinstance(message, ServiceMessage.__args__)


# --------------------------------------------------------------------------------------------
# Negotiate


_DOTNET_SPACE = " \t\n\v\f\r"


def dotnet_version(value: str) -> int | None:
    """What .NET's ``int.TryParse`` makes of ``value`` (None: not an int32)."""
    text = value.strip(_DOTNET_SPACE)
    digits = text[1:] if text[:1] in ("+", "-") else text
    if not digits or not all("0" <= c <= "9" for c in digits):
        return None
    if len(digits) > 10:
        # .NET reads "00000000001" as 1; relaycore refuses more digits than int32 has, so that
        # int() never meets a huge string (a documented difference, not a crash).
        return None
    number = int(text)
    return number if -(2**31) <= number < 2**31 else None


version_texts = st.one_of(
    st.text(max_size=14),
    st.builds(lambda a, s, d, b: a + s + d + b, st.text(_DOTNET_SPACE, max_size=2),
              st.sampled_from(["", "+", "-"]), st.text("0123456789", min_size=1, max_size=11),
              st.text(_DOTNET_SPACE, max_size=2)),
)


@MANY
@given(value=st.none() | version_texts)
@example(value="\u0661")  # an Arabic-Indic digit one: isdigit(), but not to .NET
@example(value="1_0")
def test_negotiate_version_is_dotnets_verdict_or_remote_protocol_error(value: str | None) -> None:
    expected = 0 if value is None else dotnet_version(value)
    try:
        version = parse_negotiate_version(value)
    except RemoteProtocolError:
        assert expected is None or expected < 0
        return
    assert expected is not None and expected >= 0
    assert version == min(expected, MAX_NEGOTIATE_VERSION)
    document = negotiate_response("c", "t", version)
    assert document["negotiateVersion"] == version


# --------------------------------------------------------------------------------------------
# JWTs, audiences, connection strings, names


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64json(value: Any) -> str:
    return b64url(json.dumps(value).encode("utf-8"))


@st.composite
def tokens(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["text", "segments", "signed", "mutated"]))
    if kind == "text":
        return draw(st.text(max_size=80))
    if kind == "segments":
        header = draw(st.fixed_dictionaries(
            {}, optional={"alg": st.sampled_from(["HS256", "HS512", "none", "RS256"]) | json_values,
                          "typ": json_values, "crit": json_values}) | json_values)
        claims = draw(st.fixed_dictionaries(
            {}, optional={"exp": json_values | st.floats(), "nbf": json_values | st.floats(),
                          "aud": json_values}) | json_values)
        signature = draw(st.binary(max_size=64))
        return f"{b64json(header)}.{b64json(claims)}.{b64url(signature)}"
    token = generate_access_token(
        KEY, draw(st.sampled_from(["http://h/client/?hub=chat", "http://h/api/hubs/chat"])
                  | st.text(max_size=20)),
        now=draw(st.sampled_from([0.0, 1e9, 1e12])), lifetime=draw(st.sampled_from([1, 3600])),
        user_id=draw(st.none() | st.text(max_size=8)))
    if kind == "signed":
        return token
    return draw(mutated(st.just(token.encode("ascii")))).decode("latin-1")


audiences = st.lists(st.sampled_from(["http://h/client/?hub=chat", "https://H:443/api/hubs/c"])
                     | st.text(max_size=30), max_size=3)


@MANY
@given(token=st.none() | tokens(), candidates=audiences,
       now=st.sampled_from([0.0, 1e9, 1e12]), query_optional=st.booleans())
def test_token_validator_any_string_gives_claims_or_a_token_error(
    token: str | None, candidates: list[str], now: float, query_optional: bool
) -> None:
    validator = TokenValidator([KEY, "another key"])
    try:
        claims = validator.validate(token, audiences=candidates, now=now,
                                    query_optional=query_optional)
    except TokenError as exc:
        assert exc.reason in ("missing", "malformed", "expired", "bad_signature",
                              "wrong_audience", "not_yet_valid")
        return
    assert isinstance(claims, dict)


def test_token_validator_a_header_nested_deeper_than_the_recursion_limit_is_malformed() -> None:
    token = f"{b64url(b'[' * 5000)}.{b64json({})}.{b64url(b'x')}"
    with pytest.raises(TokenError) as caught:
        TokenValidator([KEY]).validate(token, audiences=["http://h/client/?hub=chat"], now=0)
    assert caught.value.reason == "malformed"


@MANY
@given(aud=json_values | st.text(max_size=40), candidates=audiences, query_optional=st.booleans())
def test_audience_matching_never_raises(aud: Any, candidates: list[str],
                                        query_optional: bool) -> None:
    assert audience_matches(aud, candidates, query_optional=query_optional) in (True, False)
    if isinstance(aud, str):
        assert isinstance(normalize_audience(aud), str)


CS_KEYS = ["Endpoint", "AccessKey", "Version", "Port", "ClientEndpoint", "ServerEndpoint",
           "AuthType", "endpoint", "x"]
CS_VALUES = ["http://localhost", "https://h.example/", "http://[::1]:8080", "http://[",
             "https://h:99999", "ftp://h", "http://h?x", "k", "", "1.0", "2.0", "8888", "0",
             "65536", "aad", " ", "http:// h"]


@st.composite
def connection_strings(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        return draw(st.text(max_size=60))
    pairs = draw(st.lists(st.tuples(st.sampled_from(CS_KEYS) | st.text(max_size=5),
                                    st.sampled_from(CS_VALUES) | st.text(max_size=12)),
                          max_size=6))
    return "".join(f"{key}={value};" for key, value in pairs)


@MANY
@given(text=connection_strings())
def test_connection_string_parse_raises_only_connection_string_error(text: str) -> None:
    try:
        parsed = ConnectionString.parse(text)
    except ConnectionStringError:
        return
    # Everything derived from a parsed string can be computed, and it parses back the same.
    for value in (parsed.audience_base, parsed.connection_base, parsed.client_url("chat"),
                  parsed.client_audience("chat"), parsed.server_audience("chat")):
        assert isinstance(value, str)
    again = ConnectionString.parse(str(parsed))
    assert again == ConnectionString.parse(str(again))


@MANY
@given(hub=st.text(max_size=12), application=st.none() | st.text(max_size=8))
def test_wire_hub_name_raises_only_value_error(hub: str, application: str | None) -> None:
    try:
        assert isinstance(wire_hub_name(hub, application), str)
    except ValueError:
        pass


# --------------------------------------------------------------------------------------------
# REST routes and query values, negotiate, through the relay's HTTP front


ROUTE_SHAPES = [
    "/api/health", "/api/admin/faults", "/api/hubs/{hub}/:send", "/api/hubs/{hub}/users/{x}/:send",
    "/api/hubs/{hub}/connections/{x}/:send", "/api/hubs/{hub}/groups/{x}/:send",
    "/api/hubs/{hub}/:closeConnections", "/api/hubs/{hub}/groups/{x}/:closeConnections",
    "/api/hubs/{hub}/users/{x}/:closeConnections", "/api/hubs/{hub}/connections/{x}",
    "/api/hubs/{hub}/connections/{x}/groups", "/api/hubs/{hub}/groups/{x}",
    "/api/hubs/{hub}/groups/{x}/connections/{y}", "/api/hubs/{hub}/connections/{x}/groups/{y}",
    "/api/hubs/{hub}/users/{x}", "/api/hubs/{hub}/users/{x}/groups/{y}",
    "/api/hubs/{hub}/groups/{x}/users/{y}", "/api/hubs/{hub}/users/{x}/groups",
    "/api/v1/hubs/{hub}", "/api/v1/hubs/{hub}/users/{x}", "/api/v1/hubs/{hub}/groups/{x}",
    "/api/v1/hubs/{hub}/connections/{x}", "/api/v1/hubs/{hub}/groups/{x}/users/{y}",
    "/client/negotiate", "/client/", "/server/", "/", "//[", "/api/", "/api/hubs//:send",
]
QUERY_NAMES = ["api-version", "application", "ttl", "excluded", "reason", "hub",
               "negotiateVersion", "access_token", "serverConnections", "id"]
QUERY_VALUES = ["2022-06-01", "chat", "app", "0", "-1", "2147483648", "9" * 400, "1e3", " 7",
                "none", "silence", "refuse", "drop", "", "%ZZ", "%00", "a%2Fb", "\u00e9"]
segment_texts = (st.sampled_from(["chat", "Chat", "c_hat", "u", "g", "%2F", "..", "", "a b"])
                 | st.text(max_size=8).map(lambda t: quote(t, safe="")) | st.text(max_size=6))


@st.composite
def rest_requests(draw: st.DrawFn) -> bytes:
    path = draw(st.sampled_from(ROUTE_SHAPES)).format(
        hub=draw(segment_texts), x=draw(segment_texts), y=draw(segment_texts))
    pairs = draw(st.lists(st.tuples(st.sampled_from(QUERY_NAMES) | st.text(max_size=4),
                                    st.sampled_from(QUERY_VALUES) | st.text(max_size=6)),
                          max_size=4))
    query = "&".join(f"{name}={value}" for name, value in pairs)
    target = f"{path}?{query}" if query else path
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]))
    host = draw(st.sampled_from(["127.0.0.1", "127.0.0.1:9", "[", "[::1]", "", "H"])
                | st.text(max_size=6))
    headers = [("Host", host)]
    auth = draw(st.sampled_from(["valid", "valid", "junk", "none"]))
    if auth == "valid":
        # Signed for this very URL, as the SDK signs: the request reaches the operation.
        hub = parse_hub_query(pairs)
        audience = (f"http://127.0.0.1/client/?hub={hub}" if path.startswith("/client")
                    else f"http://127.0.0.1{target}")
        headers.append(("Authorization", "Bearer " + generate_access_token(
            KEY, audience, now=time.time(), user_id=draw(st.none() | st.just("u")))))
    elif auth == "junk":
        headers.append(("Authorization", draw(st.text(max_size=20))))
    if draw(st.booleans()):
        headers.append(("Origin", draw(st.sampled_from(["http://a.b", "http://\u00e9.x", "*"])
                                       | st.text(max_size=8))))
    content_type = draw(st.sampled_from(["application/json", "application/x-msgpack",
                                         "text/plain", "image/png", ""]))
    if content_type:
        headers.append(("Content-Type", content_type))
    body = draw(st.one_of(
        st.binary(max_size=40),
        st.fixed_dictionaries({}, optional={"target": json_values, "Arguments": json_values,
                                            "arguments": json_values}).map(
            lambda d: json.dumps(d).encode()),
        st.dictionaries(st.text(max_size=12), st.binary(max_size=8) | scalars, max_size=3).map(
            lambda d: msgpack.packb(d, use_bin_type=True)),
    ))
    headers.append(("Content-Length", str(len(body))))
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    return head.encode("utf-8") + b"\r\n" + body


def parse_hub_query(pairs: list[tuple[str, str]]) -> str:
    return next((value for name, value in pairs if name == "hub"), "chat")


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@FEWER
@given(data=st.one_of(rest_requests(), mutated(rest_requests())))
async def test_relay_any_request_is_answered_without_an_internal_error(data: bytes) -> None:
    relay = Relay(RelayConfig(port=0, access_keys=[KEY], close_timeout=1))
    stream = ScriptedStream([data])
    errors = _Errors()
    logger = logging.getLogger("relaycore")
    logger.addHandler(errors)
    try:
        await relay.handle_stream(stream)  # type: ignore[arg-type]
    finally:
        logger.removeHandler(errors)
    assert not errors.records, [r.getMessage() for r in errors.records]
    assert relay.stats.internal_errors == 0
    assert not re.search(rb"(^|\r\n)HTTP/1\.1 5\d\d ", bytes(stream.sent).split(b"\r\n\r\n")[0])
