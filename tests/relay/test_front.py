"""The HTTP front (``relay/_front.py``): routing, CORS, negotiate, the upgrade's refusals,
request time limits and the eviction of HTTP connections.

The first part serves requests over trio's in-memory streams with trio's autojump clock: no
socket, no real time (a request timeout passes at once). The upgrade itself needs a socket (the
peer takes its file descriptor), so upgrades that succeed are tested over a real relay, in the
second part and in the session, transport and server tests.
"""

from __future__ import annotations

import time

import httpx
import orjson
import pytest
import trio
import trio.testing
from relayfakes import HUB, FakeSession, RecordingPoller, make_ops

from relaycore.protocol._auth import TokenValidator, generate_access_token
from relaycore.relay import OutboundMessage, RelayConfig
from relaycore.relay._front import HttpFront
from relaycore.relay._tokens import RequestAuth
from relayhelpers import KEY, client_token, rest_token

UPGRADE = ("Upgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n")


def make_front(**settings) -> HttpFront:
    config = RelayConfig(access_keys=[KEY], **settings)
    ops = make_ops(config)
    auth = RequestAuth(TokenValidator(config.access_keys, clock_skew=config.token_clock_skew),
                       ops.stats, lambda: config.endpoint_url(8080))
    # No poller: nothing served here is upgraded.
    return HttpFront(config, ops, auth, None, ops.flusher)  # type: ignore[arg-type]


def request(method: str, target: str, headers: str = "", body: bytes = b"") -> bytes:
    length = f"Content-Length: {len(body)}\r\n" if body else ""
    return (f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}{length}"
            "Connection: close\r\n\r\n").encode() + body


class Answer:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ")[1])
        self.headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()

    def json(self):
        return orjson.loads(self.body)


async def exchange(front: HttpFront, raw: bytes) -> Answer:
    """Serve one in-memory connection that sends ``raw``; the answer, read until it closes."""
    client, server = trio.testing.memory_stream_pair()
    received = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(front.handle_stream, server)
        await client.send_all(raw)
        while chunk := await client.receive_some(65536):
            received += chunk
        await client.aclose()
    return Answer(bytes(received))


# -- routing and CORS ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target", "status", "says"),
    [
        ("GET", "/client/?hub=chat", 400, "expects a WebSocket upgrade"),
        ("GET", "/nowhere", 404, "no such endpoint: GET /nowhere"),
        ("GET", "/client/negotiate?hub=chat", 405, "negotiate expects POST"),
        ("POST", "/api/hubs/chat/:nope?api-version=2022-06-01", 404, "no REST API route"),
    ],
)
async def test_requests_that_are_no_endpoint_get_a_json_error(method, target, status, says):
    answer = await exchange(make_front(), request(method, target))
    assert answer.status == status and says in answer.json()["message"]


async def test_a_get_of_negotiate_names_the_allowed_method():
    answer = await exchange(make_front(), request("GET", "/client/negotiate?hub=chat"))
    assert answer.headers["allow"] == "POST"


async def test_rest_paths_go_to_the_rest_api():
    path = "/api/hubs/chat/:send"
    answer = await exchange(make_front(), request(
        "POST", f"{path}?api-version=2022-06-01",
        f"Authorization: Bearer {rest_token(path)}\r\nContent-Type: application/json\r\n",
        b'{"target":"t","arguments":[]}'))
    assert (answer.status, answer.json()) == (202, {"recipients": 0})


async def test_a_preflight_is_answered_with_the_cors_headers_for_an_allowed_origin():
    answer = await exchange(make_front(), request("OPTIONS", "/client/negotiate?hub=chat",
                                                  "Origin: https://app.example\r\n"))
    assert answer.status == 204
    assert answer.headers["access-control-allow-origin"] == "https://app.example"
    assert answer.headers["access-control-allow-credentials"] == "true"
    assert answer.headers["vary"] == "Origin"


async def test_an_origin_not_allowed_gets_no_cors_headers_and_errors_get_them_too():
    front = make_front(cors_origins=["https://app.example"])
    other = await exchange(front, request("OPTIONS", "/x", "Origin: https://evil.example\r\n"))
    assert other.status == 204 and "access-control-allow-origin" not in other.headers
    error = await exchange(front, request("GET", "/x", "Origin: https://app.example\r\n"))
    assert error.status == 404
    assert error.headers["access-control-allow-origin"] == "https://app.example"


# -- negotiate ----------------------------------------------------------------------------------


def negotiate(version: int | None = 1, hub: str = HUB, token: str | None = "auto") -> bytes:
    token = client_token(hub) if token == "auto" else token
    query = f"?hub={hub}" + (f"&negotiateVersion={version}" if version is not None else "")
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return request("POST", f"/client/negotiate{query}", auth)


async def test_negotiate_hands_out_a_connection_token_that_expires_unused():
    front = make_front(negotiate_timeout=10)
    answer = await exchange(front, negotiate())
    body = answer.json()
    assert answer.status == 200 and body["negotiateVersion"] == 1
    assert body["connectionId"] != body["connectionToken"]
    token = body["connectionToken"]
    # Used in time, the token finds its connection; here the hub is wrong, so it is refused
    # and spent.
    refused = await exchange(front, request(
        "GET", f"/client/?hub=news&id={token}&access_token={client_token('news')}", UPGRADE))
    assert refused.status == 404 and "negotiate again" in refused.json()["message"]
    again = (await exchange(front, negotiate())).json()["connectionToken"]
    front.expire(front.ops.now() + 11)
    late = await exchange(front, request(
        "GET", f"/client/?hub=chat&id={again}&access_token={client_token('chat')}", UPGRADE))
    assert late.status == 404


async def test_negotiate_version_zero_uses_the_connection_id_as_its_token():
    body = (await exchange(make_front(), negotiate(version=None))).json()
    assert body["negotiateVersion"] == 0 and "connectionToken" not in body


async def test_negotiate_with_an_unsupported_version_says_so_in_its_body():
    answer = await exchange(make_front(), negotiate(version="x"))  # type: ignore[arg-type]
    assert answer.status == 200 and "error" in answer.json()


@pytest.mark.parametrize(("token", "code"), [(None, "Unauthorized.missing"),
                                             ("not-a-jwt", "Unauthorized.malformed")])
async def test_negotiate_without_a_valid_token_is_a_401_counted(token, code):
    front = make_front()
    answer = await exchange(front, negotiate(token=token))
    assert (answer.status, answer.json()["code"]) == (401, code)
    assert front.stats.auth_failures == 1


async def test_a_draining_relay_refuses_negotiates_and_upgrades():
    front = make_front()
    front.ops.draining = True
    assert (await exchange(front, negotiate())).status == 503
    upgrade = request("GET", f"/client/?hub=chat&access_token={client_token('chat')}", UPGRADE)
    assert (await exchange(front, upgrade)).status == 503


# -- the upgrade's refusals ---------------------------------------------------------------------


def upgrade(path: str = "/client/", hub: str = HUB, headers: str = UPGRADE) -> bytes:
    return request("GET", f"{path}?hub={hub}&access_token={client_token(hub)}", headers)


@pytest.mark.parametrize(
    ("raw", "status", "says"),
    [
        (upgrade(path="/elsewhere/"), 404, "no WebSocket endpoint"),
        (upgrade(headers=UPGRADE.replace("Version: 13", "Version: 8")), 426, "version 13"),
        (upgrade(headers=UPGRADE.replace("dGhlIHNhbXBsZSBub25jZQ==", "short")), 400,
         "Sec-WebSocket-Key"),
        (upgrade(hub="9bad"), 400, "hub"),
        (request("GET", "/client/?hub=chat", UPGRADE), 401, "token"),
    ],
)
async def test_an_upgrade_that_cannot_be_served_is_answered_with_why(raw, status, says):
    answer = await exchange(make_front(), raw)
    assert answer.status == status and says in answer.json()["message"]


async def test_an_upgrade_refused_for_the_version_names_the_one_supported():
    answer = await exchange(make_front(), upgrade(
        headers=UPGRADE.replace("Version: 13", "Version: 8")))
    assert answer.headers["sec-websocket-version"] == "13"


async def test_a_hub_at_its_connection_limit_refuses_new_clients():
    front = make_front(max_connections_per_hub=2)
    for conn_id in ("a", "b"):
        FakeSession(front.ops, conn_id).open()
    answer = await exchange(front, upgrade())
    assert answer.status == 429 and "limit of 2" in answer.json()["message"]


@pytest.mark.parametrize("mode", ["refuse", "drop"])
async def test_server_upgrades_are_refused_while_the_fault_switch_refuses_them(mode):
    front = make_front()
    front.inject_fault(mode)
    token = generate_access_token(KEY, f"http://127.0.0.1/server/?hub={HUB}", now=time.time())
    raw = request("GET", f"/server/?hub={HUB}", f"Authorization: Bearer {token}\r\n" + UPGRADE)
    answer = await exchange(front, raw)
    assert answer.status == 503 and "fault injection" in answer.json()["message"]


# -- time limits and room -----------------------------------------------------------------------


async def test_a_request_that_does_not_arrive_whole_in_time_gets_408(autojump_clock):
    front = make_front(request_timeout=5)
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(front.handle_stream, server)
        await client.send_all(b"GET /api/health HTTP/1.1\r\nHost: x\r\n")  # and no more
        started = trio.current_time()
        received = bytearray()
        while chunk := await client.receive_some(65536):
            received += chunk
        assert trio.current_time() - started == pytest.approx(5)
    assert Answer(bytes(received)).status == 408
    assert front.stats.request_timeouts == 1


async def test_an_idle_keep_alive_connection_is_closed_without_an_answer(autojump_clock):
    front = make_front(request_timeout=5)
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(front.handle_stream, server)
        await client.send_all(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
        answered = await client.receive_some(65536)
        assert answered.startswith(b"HTTP/1.1 200 ")
        assert await client.receive_some(65536) == b""  # closed after 5 idle seconds
    assert front.stats.request_timeouts == 1


async def test_past_the_http_connection_limit_the_longest_waiting_one_makes_room():
    front = make_front(max_http_connections=2)
    clients = []
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            assert front.admit() is None
            client, server = trio.testing.memory_stream_pair()
            clients.append(client)
            nursery.start_soon(front.handle_stream, server)
            await trio.testing.wait_all_tasks_blocked()
        assert await clients[0].receive_some(65536) == b""  # evicted, no answer
        assert front.stats.http_evictions == 1
        for client in clients[1:]:
            await client.send_all(b"GET /api/health HTTP/1.1\r\nHost: x\r\n"
                                  b"Connection: close\r\n\r\n")
            assert (await client.receive_some(65536)).startswith(b"HTTP/1.1 200 ")
        for client in clients:
            await client.aclose()


async def test_past_max_connections_a_new_connection_is_refused_with_why():
    front = make_front(max_connections=1)
    clients = []
    async with trio.open_nursery() as nursery:
        reason = None
        while reason is None:  # one WebSocket's room and the HTTP connections let in past it
            reason = front.admit()
            if reason is None:
                client, server = trio.testing.memory_stream_pair()
                clients.append(client)
                nursery.start_soon(front.handle_stream, server)
                await trio.testing.wait_all_tasks_blocked()
        assert "limit of 1 connections" in reason
        assert len(clients) > 1
        for client in clients:
            await client.aclose()


# -- over a real socket -------------------------------------------------------------------------


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



# -- Server-Sent Events and long polling: negotiate and routing ---------------------------------


async def test_negotiate_lists_every_transport_by_default_in_aspnet_cores_order():
    for version in (None, 1):
        body = (await exchange(make_front(), negotiate(version=version))).json()
        assert body["availableTransports"] == [
            {"transport": "WebSockets", "transferFormats": ["Text", "Binary"]},
            {"transport": "ServerSentEvents", "transferFormats": ["Text"]},
            {"transport": "LongPolling", "transferFormats": ["Text", "Binary"]},
        ]


async def test_negotiate_lists_only_the_configured_transports():
    front = make_front(transports=["longpolling", "WebSockets"])
    body = (await exchange(front, negotiate())).json()
    assert [t["transport"] for t in body["availableTransports"]] == ["WebSockets",
                                                                     "LongPolling"]


def client_request(method: str, token: str, *, user: str | None = "alice", body: bytes = b"",
                   headers: str = "", hub: str = HUB) -> bytes:
    auth = f"Authorization: Bearer {client_token(hub, user)}\r\n"
    return request(method, f"/client/?hub={hub}&id={token}&_=1", auth + headers, body)


async def negotiated(front: HttpFront, user: str | None = "alice") -> tuple[str, str]:
    """(connection id, connection token) of a fresh negotiate by ``user``."""
    raw = request("POST", f"/client/negotiate?hub={HUB}&negotiateVersion=1",
                  f"Authorization: Bearer {client_token(HUB, user)}\r\n")
    body = (await exchange(front, raw)).json()
    return body["connectionId"], body["connectionToken"]


async def test_a_long_polling_connection_through_the_front():
    front = make_front()
    connection_id, token = await negotiated(front)

    first = await exchange(front, client_request("GET", token))  # answered at once
    assert (first.status, first.body) == (200, b"")
    assert first.headers["content-type"] == "application/octet-stream"
    assert first.headers["content-length"] == "0"
    assert first.headers["cache-control"] == "no-cache, no-store"
    assert first.headers["pragma"] == "no-cache"
    assert first.headers["expires"] == "Thu, 01 Jan 1970 00:00:00 GMT"

    sent = await exchange(front, client_request("POST", token,
                                                body=b'{"protocol":"json","version":1}\x1e'))
    assert (sent.status, sent.body, sent.headers["content-type"]) == (200, b"", "text/plain")
    answer = await exchange(front, client_request("GET", token))
    assert (answer.status, answer.body) == (200, b"{}\x1e")
    assert front.ops.connection(HUB, connection_id) is not None

    front.ops.send_to_connection(HUB, connection_id, OutboundMessage.invocation("n", 1))
    answer = await exchange(front, client_request("GET", token))
    assert answer.body == b'{"type":1,"target":"n","arguments":[1]}\x1e'

    deleted = await exchange(front, client_request("DELETE", token))
    assert deleted.status == 202
    assert front.ops.connection(HUB, connection_id) is None  # forgotten at once
    assert not front.live and token not in front._by_token
    assert (await exchange(front, client_request("GET", token))).status == 404
    assert (await exchange(front, client_request("POST", token, body=b"{}"))).status == 404


async def test_a_poll_with_nothing_to_take_waits_the_poll_timeout(autojump_clock):
    front = make_front(poll_timeout=30)
    _, token = await negotiated(front)
    await exchange(front, client_request("GET", token))
    started = trio.current_time()
    answer = await exchange(front, client_request("GET", token))
    assert (answer.status, answer.body) == (200, b"")
    assert answer.headers["content-type"] == "text/plain"
    assert trio.current_time() - started == pytest.approx(30)


async def test_a_waiting_poll_is_never_evicted_for_room_and_a_delete_answers_it_204():
    front = make_front(max_http_connections=1)
    _, token = await negotiated(front)
    await exchange(front, client_request("GET", token))
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(front.handle_stream, server)
        await client.send_all(client_request("GET", token))
        await trio.testing.wait_all_tasks_blocked()
        assert front.admit() is None  # room for one HTTP connection: the poll takes none
        assert front.stats.http_evictions == 0
        assert (await exchange(front, client_request("DELETE", token))).status == 202
        received = bytearray()
        while chunk := await client.receive_some(65536):
            received += chunk
    assert Answer(bytes(received)).status == 204


async def test_a_poll_whose_client_leaves_ends_its_wait_not_the_connection():
    front = make_front()
    connection_id, token = await negotiated(front)
    await exchange(front, client_request("GET", token))
    await exchange(front, client_request("POST", token,
                                         body=b'{"protocol":"json","version":1}\x1e'))
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(front.handle_stream, server)
        await client.send_all(client_request("GET", token))  # takes the handshake answer
        assert await client.receive_some(65536)
        client2, server2 = trio.testing.memory_stream_pair()
        nursery.start_soon(front.handle_stream, server2)
        await client2.send_all(client_request("GET", token))
        await trio.testing.wait_all_tasks_blocked()
        await client2.aclose()  # an aborted poll
        await client.aclose()
    (transport,) = front.live
    assert transport._waiting is None
    assert front.ops.connection(HUB, connection_id) is not None


@pytest.mark.parametrize(
    ("raw", "status", "says"),
    [
        (request("GET", "/client/?hub=chat", f"Authorization: Bearer {client_token(HUB)}\r\n"),
         400, "expects a WebSocket upgrade, or the connection id"),
        (request("POST", "/client/?hub=chat"), 400, "connection id"),
        (client_request("GET", "no-such-token"), 404, "negotiate again"),
        (client_request("POST", "no-such-token", body=b"{}"), 404, "no connection"),
        (client_request("DELETE", "no-such-token"), 404, "no connection"),
        (client_request("PUT", "any"), 405, "GET, POST or DELETE"),
        (request("GET", "/client/?hub=chat&id=x"), 401, "token"),
    ],
)
async def test_client_requests_that_cannot_be_served_are_answered_with_why(raw, status, says):
    answer = await exchange(make_front(), raw)
    assert answer.status == status and says in answer.json()["message"]


async def test_a_connection_token_serves_only_the_user_that_negotiated_it():
    front = make_front()
    _, token = await negotiated(front, user="alice")
    refused = await exchange(front, client_request("GET", token, user="mallory"))
    assert refused.status == 403 and "another user" in refused.json()["message"]
    assert refused.headers["content-type"].startswith("application/json")
    assert (await exchange(front, client_request("GET", token))).status == 200  # still alice's
    for method in ("POST", "GET", "DELETE"):
        answer = await exchange(front, client_request(method, token, user=None, body=b"{}"))
        assert answer.status == 403, method
    ws = request("GET", f"/client/?hub=chat&id={token}&access_token={client_token(HUB, 'alice')}",
                 UPGRADE)
    answer = await exchange(front, ws)
    assert answer.status == 400 and "Cannot change transports" in answer.json()["message"]


async def test_a_token_negotiated_on_one_hub_does_not_open_a_connection_on_another():
    front = make_front()
    _, token = await negotiated(front)
    answer = await exchange(front, client_request("GET", token, hub="news"))
    assert answer.status == 404


async def test_a_post_before_any_transport_opened_finds_no_connection():
    front = make_front()
    _, token = await negotiated(front)
    answer = await exchange(front, client_request("POST", token, body=b"{}"))
    assert answer.status == 404
    assert (await exchange(front, client_request("GET", token))).status == 200  # unspent


@pytest.mark.parametrize(
    ("transports", "raw_headers", "says"),
    [
        (["WebSockets", "ServerSentEvents"], "", "LongPolling transport not supported"),
        (["WebSockets", "LongPolling"], "Accept: text/event-stream\r\n",
         "ServerSentEvents transport not supported"),
    ],
)
async def test_a_transport_not_configured_is_404(transports, raw_headers, says):
    front = make_front(transports=transports)
    _, token = await negotiated(front)
    answer = await exchange(front, client_request("GET", token, headers=raw_headers))
    assert answer.status == 404 and says in answer.json()["message"]


async def test_websockets_can_be_turned_off_too():
    front = make_front(transports=["LongPolling"])
    answer = await exchange(front, upgrade())
    assert answer.status == 404 and "WebSockets transport" in answer.json()["message"]


async def test_without_http_transports_the_client_endpoint_expects_an_upgrade():
    front = make_front(transports=["WebSockets"])
    _, token = await negotiated(front)
    for method in ("GET", "POST", "DELETE"):
        answer = await exchange(front, client_request(method, token))
        assert answer.status == 400 and "not enabled" in answer.json()["message"], method


async def test_an_event_stream_over_http_1_0_is_refused():
    front = make_front()
    _, token = await negotiated(front)
    raw = client_request("GET", token, headers="Accept: text/event-stream\r\n")
    answer = await exchange(front, raw.replace(b"HTTP/1.1", b"HTTP/1.0"))
    assert answer.status == 505


async def test_a_long_polling_connection_changed_to_an_event_stream_is_refused():
    front = make_front()
    _, token = await negotiated(front)
    await exchange(front, client_request("GET", token))
    answer = await exchange(front, client_request("GET", token,
                                                  headers="Accept: text/event-stream\r\n"))
    assert answer.status == 400 and "Cannot change transports" in answer.json()["message"]



async def test_an_event_stream_whose_client_left_before_its_head_is_forgotten():
    from relaycore.relay import _message

    front = make_front()
    front.io.poller = RecordingPoller()  # type: ignore[assignment]
    _, token = await negotiated(front)
    held = _message._holders.get("json+sse", 0)
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(client_request("GET", token, headers="Accept: text/event-stream\r\n"))
    await client.aclose()  # gone before the head could be written
    await front.handle_stream(server)
    assert not front._by_token and not front.live
    assert _message._holders.get("json+sse", 0) == held
    assert (await exchange(front, client_request("POST", token, body=b"{}"))).status == 404


async def test_a_new_long_polling_connection_is_refused_room_as_an_upgrade_is():
    full = make_front(max_connections_per_hub=1)
    FakeSession(full.ops, "someone").open()
    _, token = await negotiated(full)
    answer = await exchange(full, client_request("GET", token))
    assert answer.status == 429 and "limit of 1" in answer.json()["message"]
    draining = make_front()
    _, token = await negotiated(draining)
    draining.ops.draining = True
    assert (await exchange(draining, client_request("GET", token))).status == 503
