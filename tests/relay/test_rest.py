"""The data-plane REST API (``relay/_rest.py``) of an in-process relay: sends, existence checks,
closes, the v1 routes, the application prefix, and bad requests answered with JSON errors.

Clients are trio-websocket connections (an independent WebSocket implementation); REST calls
go through httpx. Every wait is bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import httpx
import msgpack
import pytest
import trio
from relaysuite import assert_still_receives, connection_ids

from relaycore.protocol._hub import JsonHubProtocol, MessagePackHubProtocol
from relayhelpers import rest_token


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



async def test_rest_body_far_over_the_limit_gets_413_not_a_reset(relay, rest):
    r = await rest.call("POST", "/api/hubs/chat/:send", content=b"x" * (16 << 20),
                        headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "2048" in r.json()["message"]

