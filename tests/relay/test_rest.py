"""The relay in-process: negotiate, client endpoint, REST API, limits and bad input.

Clients are trio-websocket connections (an independent WebSocket implementation); REST calls
go through httpx. Every wait is bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import json

import httpx
import msgpack
import pytest
import trio
from trio_websocket import ConnectionClosed

from relaycore._accel import apply_mask, encode_frame_header
from relaycore.protocol._hub import JsonHubProtocol, MessagePackHubProtocol
from relaycore.relay import OutboundMessage, RelayConfig, serve_relay
from relayhelpers import KEY, RS, client_token, open_stalled_client, rest_token, wait_for


@pytest.fixture
async def relay(nursery):
    config = RelayConfig(port=0, access_keys=[KEY], keep_alive_interval=0.3, client_timeout=3,
                         handshake_timeout=1, max_message_size=4096, max_request_body=2048,
                         close_timeout=1)
    return await nursery.start(serve_relay, config)


class Rest:
    def __init__(self, relay):
        self.base = f"http://127.0.0.1:{relay.port}"

    async def call(self, method: str, path: str, *, params=None, json_body=None, content=None,
                   headers=None, token: str | None = "auto") -> httpx.Response:
        hdrs = dict(headers or {})
        if token == "auto":
            token = rest_token(path)
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        query = {"api-version": "2022-06-01", **(params or {})}
        async with httpx.AsyncClient() as client:
            return await client.request(method, self.base + path, params=query, json=json_body,
                                        content=content, headers=hdrs)


@pytest.fixture
def rest(relay):
    return Rest(relay)


async def connection_ids(relay, hub="chat"):
    shard = relay.table.get(hub)
    return set(shard.connections) if shard else set()


# -- negotiate ---------------------------------------------------------------------------


async def test_negotiate_with_valid_token_returns_connection_id_token_and_websockets(relay, rest):
    async with httpx.AsyncClient() as client:
        r = await client.post(
            f"http://127.0.0.1:{relay.port}/client/negotiate?hub=chat&negotiateVersion=1",
            headers={"Authorization": f"Bearer {client_token('chat')}"})
    assert r.status_code == 200
    body = r.json()
    assert body["negotiateVersion"] == 1
    assert body["connectionId"] and body["connectionToken"]
    assert body["availableTransports"][0] == {"transport": "WebSockets",
                                              "transferFormats": ["Text", "Binary"]}


async def test_negotiate_version_zero_has_no_connection_token(relay):
    async with httpx.AsyncClient() as client:
        r = await client.post(f"http://127.0.0.1:{relay.port}/client/negotiate?hub=chat",
                              headers={"Authorization": f"Bearer {client_token('chat')}"})
    assert r.status_code == 200
    assert "connectionToken" not in r.json()


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (None, "missing"),
        ("not-a-jwt", "malformed"),
        (client_token("chat", key="some-other-key"), "bad_signature"),
        (client_token("chat", lifetime=-3600), "expired"),
        (client_token("other"), "wrong_audience"),
    ],
)
async def test_negotiate_with_bad_token_answers_401_naming_the_reason(relay, token, reason):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient() as client:
        r = await client.post(f"http://127.0.0.1:{relay.port}/client/negotiate?hub=chat",
                              headers=headers)
    assert r.status_code == 401
    body = r.json()
    assert body["code"] == f"Unauthorized.{reason}"
    assert body["message"]


async def test_negotiate_with_invalid_hub_name_answers_400(relay):
    async with httpx.AsyncClient() as client:
        r = await client.post(f"http://127.0.0.1:{relay.port}/client/negotiate?hub=9chat",
                              headers={"Authorization": f"Bearer {client_token('9chat')}"})
    assert r.status_code == 400
    assert "hub" in r.json()["message"]


async def test_websocket_with_unknown_connection_id_answers_404(relay):
    async with httpx.AsyncClient() as client:
        r = await client.get(
            f"http://127.0.0.1:{relay.port}/client/?hub=chat&id=nope",
            headers={"Authorization": f"Bearer {client_token('chat')}", "Connection": "Upgrade",
                     "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                     "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    assert r.status_code == 404


# -- client endpoint ---------------------------------------------------------------------


async def test_client_receives_pings_at_the_keep_alive_interval(relay, connect):
    client = await connect(relay)
    with trio.fail_after(3):
        data = await client.ws.get_message()
    assert data == '{"type":6}' + RS


async def test_handshake_with_unsupported_protocol_gets_error_then_close(relay, connect):
    ws = await connect(relay, handshake=False)
    await ws.send_message('{"protocol":"xml","version":1}' + RS)
    reply = await ws.get_message()
    assert json.loads(reply.rstrip(RS)) == {"error": "The protocol 'xml' is not supported."}
    with pytest.raises(ConnectionClosed), trio.fail_after(3):
        await ws.get_message()


async def test_handshake_with_unsupported_version_gets_error(relay, connect):
    ws = await connect(relay, handshake=False)
    await ws.send_message('{"protocol":"json","version":7}' + RS)
    reply = json.loads((await ws.get_message()).rstrip(RS))
    assert "version 7" in reply["error"]


async def test_malformed_handshake_gets_error(relay, connect):
    ws = await connect(relay, handshake=False)
    await ws.send_message('{"protocol":' + RS)
    reply = json.loads((await ws.get_message()).rstrip(RS))
    assert "error" in reply


async def test_handshake_timeout_closes_the_connection(relay, connect):
    ws = await connect(relay, handshake=False)
    with trio.fail_after(5):
        reply = json.loads((await ws.get_message()).rstrip(RS))
    assert reply == {"error": "Handshake was canceled."}


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


async def test_client_close_message_removes_the_connection(relay, connect):
    client = await connect(relay)
    assert len(await connection_ids(relay)) == 1
    await client.ws.send_message('{"type":7}' + RS)
    await wait_for(lambda: relay.table.get("chat") is None)


async def test_invocation_without_app_server_gets_a_completion_error(relay, connect):
    client = await connect(relay)
    await client.ws.send_message(
        '{"type":1,"invocationId":"0","target":"Send","arguments":[1]}' + RS)
    with trio.fail_after(3):
        message = await client.next_message()
    assert message["type"] == 3 and message["invocationId"] == "0"
    assert "Send" in message["error"]


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


async def test_silent_client_is_closed_after_the_client_timeout(nursery, connect):
    config = RelayConfig(port=0, access_keys=[KEY], keep_alive_interval=0.2, client_timeout=0.6)
    relay = await nursery.start(serve_relay, config)
    client = await connect(relay)
    with trio.fail_after(5):
        message = await client.next_message()
    assert message["type"] == 7 and "timeout" in message["error"]


@pytest.mark.parametrize("protocol", ["json", "messagepack"])
async def test_a_client_that_only_pings_stays_open_past_the_client_timeout(
        nursery, connect, protocol):
    # Pings take a shortcut (they are most of what idle clients send); they must still count
    # as hearing from the client. The silent client beside it is the control.
    config = RelayConfig(port=0, access_keys=[KEY], keep_alive_interval=0.2, client_timeout=0.6)
    relay = await nursery.start(serve_relay, config)
    pinging = await connect(relay, user="pinging", protocol=protocol)
    silent = await connect(relay, user="silent")
    ping = '{"type":6}' + RS if protocol == "json" else b"\x02\x91\x06"

    async def keep_pinging() -> None:
        while True:
            await pinging.ws.send_message(ping)
            await trio.sleep(0.1)  # the client's ping interval

    async with trio.open_nursery() as pings:
        pings.start_soon(keep_pinging)
        with trio.fail_after(5):
            message = await silent.next_message()
            while message.get("type") != 7:
                message = await silent.next_message()
        await trio.sleep(0.6)  # one more client timeout for the pinging client
        assert await relay.user_exists("chat", "pinging")
        assert not await relay.user_exists("chat", "silent")
        pings.cancel_scope.cancel()


async def assert_still_receives(rest, client):
    r = await rest.call("POST", "/api/hubs/chat/users/healthy/:send",
                        json_body={"target": "alive", "arguments": [1]})
    assert r.status_code == 202
    with trio.fail_after(3):
        message = await client.next_message()
    assert message == {"type": 1, "target": "alive", "arguments": [1]}


# -- REST API ------------------------------------------------------------------------------


async def test_rest_broadcast_reaches_every_connection_but_excluded(relay, rest, connect):
    a, b, c = [await connect(relay, user=u) for u in ("a", "b", "c")]
    excluded = sorted(await connection_ids(relay))
    shard = relay.table.get("chat")
    b_id = next(cid for cid, conn in shard.connections.items() if conn.user_id == "b")
    r = await rest.call("POST", "/api/hubs/chat/:send", params={"excluded": b_id},
                        json_body={"Target": "hello", "Arguments": ["all"]})
    assert r.status_code == 202, r.text
    assert r.json() == {"recipients": 2}
    for client in (a, c):
        with trio.fail_after(3):
            assert await client.next_message() == {"type": 1, "target": "hello",
                                                   "arguments": ["all"]}
    await rest.call("POST", "/api/hubs/chat/:send", json_body={"target": "marker"})
    with trio.fail_after(3):
        assert (await b.next_message())["target"] == "marker"
    assert len(excluded) == 3


async def test_rest_msgpack_payload_map_reaches_json_clients(relay, rest, connect):
    client = await connect(relay)
    body = msgpack.packb({
        "json": JsonHubProtocol().write_invocation("fromMap", [1, 2]),
        "messagepack": MessagePackHubProtocol().write_invocation("fromMap", [1, 2]),
    }, use_bin_type=True)
    r = await rest.call("POST", "/api/hubs/chat/:send", content=body,
                        headers={"Content-Type": "application/x-msgpack"})
    assert r.status_code == 202, r.text
    with trio.fail_after(3):
        assert await client.next_message() == {"type": 1, "target": "fromMap",
                                               "arguments": [1, 2]}


async def test_rest_existence_checks_answer_404_with_error_code_header(relay, rest, connect):
    client = await connect(relay, user="alice")
    conn_id = next(iter(await connection_ids(relay)))
    checks = [
        (f"/api/hubs/chat/connections/{conn_id}", 200, None),
        ("/api/hubs/chat/connections/nope", 404, "Warning.Connection.NotExisted"),
        ("/api/hubs/chat/users/alice", 200, None),
        ("/api/hubs/chat/users/bob", 404, "Warning.User.NotExisted"),
        ("/api/hubs/chat/groups/g", 404, "Warning.Group.NotExisted"),
        ("/api/hubs/chat/users/alice/groups/g", 404, "Info.User.NotInGroup"),
    ]
    for path, status, code in checks:
        r = await rest.call("HEAD", path)
        assert r.status_code == status, path
        assert r.headers.get("x-ms-error-code") == code, path
    r = await rest.call("PUT", f"/api/hubs/chat/groups/g/connections/{conn_id}")
    assert r.status_code == 200
    assert (await rest.call("HEAD", "/api/hubs/chat/groups/g")).status_code == 200
    assert (await rest.call("GET", "/api/hubs/chat/users/alice/groups/g")).status_code == 200
    r = await rest.call("PUT", "/api/hubs/chat/groups/g/connections/nope")
    assert r.status_code == 404 and r.headers["x-ms-error-code"] == "Error.Connection.NotExisted"
    assert client is not None


async def test_rest_close_connection_sends_close_message_with_reason(relay, rest, connect):
    client = await connect(relay)
    conn_id = next(iter(await connection_ids(relay)))
    r = await rest.call("DELETE", f"/api/hubs/chat/connections/{conn_id}",
                        params={"reason": "bye now"})
    assert r.status_code == 200
    with trio.fail_after(3):
        assert await client.next_message() == {"type": 7, "error": "bye now",
                                               "allowReconnect": True}


async def test_rest_v1_routes_send_to_application_prefixed_hub(relay, connect):
    client = await connect(relay, hub="app_chat")
    path = "/api/v1/hubs/app_chat"
    async with httpx.AsyncClient() as http:
        r = await http.post(f"http://127.0.0.1:{relay.port}{path}",
                            json={"target": "v1", "arguments": []},
                            headers={"Authorization": f"Bearer {rest_token(path)}"})
    assert r.status_code == 202
    with trio.fail_after(3):
        assert (await client.next_message())["target"] == "v1"


async def test_rest_application_parameter_prefixes_the_hub(relay, rest, connect):
    client = await connect(relay, hub="myapp_chat")
    r = await rest.call("POST", "/api/hubs/Chat/:send", params={"application": "MyApp"},
                        json_body={"target": "t", "arguments": []})
    assert r.status_code == 202
    with trio.fail_after(3):
        assert (await client.next_message())["target"] == "t"


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status"),
    [
        ("POST", "/api/hubs/chat/:nope", {}, 404),
        ("GET", "/api/hubs/chat/:send", {}, 405),
        ("POST", "/api/hubs/chat/:send", {"content": b"{not json",
                                          "headers": {"Content-Type": "application/json"}}, 400),
        ("POST", "/api/hubs/chat/:send", {"json_body": {"arguments": []}}, 400),
        ("POST", "/api/hubs/chat/:send", {"json_body": {"target": "x" * 3000}}, 413),
        ("POST", "/api/hubs/chat/:send", {"content": b"\xc1",
                                          "headers": {"Content-Type": "application/x-msgpack"}},
         400),
        ("POST", "/api/hubs/chat/:send", {"content": b"x",
                                          "headers": {"Content-Type": "image/png"}}, 415),
        ("POST", "/api/hubs/1bad/:send", {"json_body": {"target": "t"}}, 400),
        ("PUT", "/api/hubs/chat/users/u/groups/g", {"params": {"ttl": "soon"}}, 400),
        ("POST", "/api/hubs/chat/:send", {"json_body": {"target": "t"}, "token": None}, 401),
    ],
)
async def test_rest_bad_requests_get_json_errors(relay, rest, connect, method, path, kwargs,
                                                 status):
    healthy = await connect(relay, user="healthy")
    r = await rest.call(method, path, **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["message"]
    await assert_still_receives(rest, healthy)


async def test_rest_send_to_offline_user_reports_zero_recipients(relay, rest, connect):
    await connect(relay, user="online")
    r = await rest.call("POST", "/api/hubs/chat/users/offline/:send",
                        json_body={"target": "t", "arguments": []})
    assert (r.status_code, r.json()) == (202, {"recipients": 0})
    r = await rest.call("POST", "/api/hubs/chat/users/online/:send",
                        json_body={"target": "t", "arguments": []})
    assert (r.status_code, r.json()) == (202, {"recipients": 1})


async def test_rest_health_needs_no_token(relay, rest):
    r = await rest.call("HEAD", "/api/health", token=None)
    assert r.status_code == 200
    r = await rest.call("HEAD", "/api/v1/health", token=None)
    assert r.status_code == 200


# -- the relay as a library ------------------------------------------------------------------


async def test_library_methods_match_the_rest_operations(relay, connect):
    a = await connect(relay, user="alice")
    b = await connect(relay, user="bob")
    assert await relay.user_exists("chat", "alice")
    await relay.add_user_to_group("chat", "team", "alice")
    assert await relay.user_in_group("chat", "team", "alice")
    reached = await relay.send_to_group("chat", "team", OutboundMessage.invocation("t", 1))
    assert reached == 1
    with trio.fail_after(3):
        assert (await a.next_message())["arguments"] == [1]
    assert await relay.send_to_all("chat", OutboundMessage.invocation("t", 2)) == 2
    with trio.fail_after(3):
        assert (await b.next_message())["arguments"] == [2]
    assert await relay.send_to_user("chat", "nobody", OutboundMessage.invocation("t")) == 0


async def test_drain_sends_close_with_allow_reconnect(relay, connect):
    client = await connect(relay)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay.drain)
        with trio.fail_after(3):
            message = await client.next_message()
    assert message["type"] == 7 and message["allowReconnect"] is True


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


async def test_a_client_that_stops_reading_gets_everything_in_order_when_it_reads_again(
        nursery, connect):
    # Far more than the socket buffers hold, under the send buffer limit: the relay keeps the
    # rest, waits until the socket is writable again, and loses or reorders nothing.
    config = RelayConfig(port=0, access_keys=[KEY], send_buffer_limit=64 << 20)
    relay = await nursery.start(serve_relay, config)
    client = await connect(relay, user="reader")  # reads only when asked (queue of one)
    conn = next(iter(relay.table.get("chat").connections.values()))
    payload = "z" * 60000
    count = 400  # 24 MB
    for i in range(count):
        await relay.send_to_user("chat", "reader", OutboundMessage.invocation("n", i, payload))
    await wait_for(lambda: conn.transport._blocked)  # the socket refused part of it
    with trio.fail_after(30):
        for i in range(count):
            message = await client.next_message()
            assert message["arguments"] == [i, payload]
    await wait_for(lambda: not conn.transport._blocked and not conn._out)
    assert await relay.user_exists("chat", "reader")


async def test_rest_body_far_over_the_limit_gets_413_not_a_reset(relay, rest):
    r = await rest.call("POST", "/api/hubs/chat/:send", content=b"x" * (16 << 20),
                        headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "2048" in r.json()["message"]


# -- handshake versions (issue 14) -----------------------------------------------------------


async def test_handshake_with_version_zero_is_accepted_as_signalrcore_sends_it(relay, connect):
    ws = await connect(relay, "chat", "alice", handshake=False)
    await ws.send_message('{"protocol":"json","version":0}' + RS)
    with trio.fail_after(5):
        assert await ws.get_message() == "{}" + RS
    await wait_for(lambda: relay.table.get("chat") is not None
                   and len(relay.table.get("chat").connections) == 1)


async def test_handshake_with_version_above_two_gets_the_dotnet_error(relay, connect):
    ws = await connect(relay, handshake=False)
    await ws.send_message('{"protocol":"json","version":3}' + RS)
    with trio.fail_after(5):
        reply = json.loads((await ws.get_message()).rstrip(RS))
    assert reply == {"error": "The server does not support version 3 of the 'json' protocol."}
