"""Upstream webhooks (service-protocol §13): events and invocations of serverless clients.

The upstream is a small HTTP server in the test (relaycore's own h11 front), scripted per test:
it records every request and answers what the test says.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time

import msgpack
import pytest
import trio
from trio_websocket import connect_websocket_url

from relaycore.protocol import MessagePackHubProtocol, generate_access_token
from relaycore.relay import RelayConfig, serve_relay
from relaycore.relay._http import Response
from relaycore.sdk.upstream import parse_request
from relayhelpers import KEY, RS, FakeUpstream, wait_for


@pytest.fixture
async def upstream(nursery):
    fake = FakeUpstream()
    await nursery.start(fake.serve)
    return fake


@pytest.fixture
def start_relay(nursery, upstream):
    async def start(**settings):
        config = RelayConfig(
            port=0, access_keys=[KEY, "second-key"], close_timeout=1,
            upstreams=[f"http://127.0.0.1:{upstream.port}/{{hub}}/api/{{category}}/{{event}}"],
            upstream_retry_max_delay=0.2, **settings)
        return await nursery.start(serve_relay, config)

    return start


def signature(connection_id: str, key: str) -> str:
    return "sha256=" + hmac.new(key.encode(), connection_id.encode(), hashlib.sha256).hexdigest()


# -- system events ----------------------------------------------------------------------------


async def test_connected_event_carries_headers_signature_and_body(start_relay, upstream, connect):
    relay = await start_relay()
    await connect(relay, user="alice")
    await wait_for(lambda: upstream.events("connected"))
    request = upstream.events("connected")[0]
    conn_id = request.headers["x-asrs-connection-id"]
    assert request.path == "/chat/api/connections/connected"
    assert request.headers["x-asrs-hub"] == "chat"
    assert request.headers["x-asrs-category"] == "connections"
    assert request.headers["x-asrs-user-id"] == "alice"
    assert "asrs.s.uid: alice" in request.headers["x-asrs-user-claims"]
    assert request.headers["x-asrs-signature"] == (
        f"{signature(conn_id, KEY)},{signature(conn_id, 'second-key')}")
    assert json.loads(request.body) == {"type": 10}


async def test_disconnected_event_follows_connected_with_the_error(start_relay, upstream,
                                                                   connect):
    relay = await start_relay(keep_alive_interval=0.2, client_timeout=0.6)
    client = await connect(relay)
    await wait_for(lambda: upstream.events("disconnected"), timeout=10)
    events = [r.headers["x-asrs-event"] for r in upstream.requests]
    assert events == ["connected", "disconnected"]
    body = json.loads(upstream.events("disconnected")[0].body)
    assert body["type"] == 11 and "client timeout" in body["error"]
    assert client is not None


async def test_system_events_are_retried_until_the_upstream_is_back(start_relay, upstream,
                                                                    connect):
    failures = {"left": 6}

    def answer(request):
        if failures["left"] > 0:
            failures["left"] -= 1
            return Response(503)
        return Response(200)

    upstream.answer = answer
    relay = await start_relay()
    clients = [await connect(relay, user=f"u{i}") for i in range(3)]
    for client in clients:
        await client.ws.send_message('{"type":7}' + RS)
    await wait_for(lambda: relay.stats.upstream_events_sent == 6, timeout=15)
    delivered = [(r.headers["x-asrs-event"], r.headers["x-asrs-connection-id"])
                 for r in upstream.requests[6:]]
    assert len(delivered) == 6
    for conn_id in {c for _, c in delivered}:
        assert [e for e, c in delivered if c == conn_id] == ["connected", "disconnected"]
    assert relay.stats.upstream_dropped == 0


async def test_events_beyond_the_queue_limit_are_dropped_and_counted(start_relay, upstream,
                                                                     connect):
    gate = trio.Event()
    upstream.answer = lambda request: Response(503) if not gate.is_set() else Response(200)
    relay = await start_relay(upstream_queue_limit=2)
    for i in range(4):
        await connect(relay, user=f"u{i}")
    await wait_for(lambda: relay.stats.upstream_dropped == 2)
    gate.set()
    await wait_for(lambda: relay.stats.upstream_events_sent == 2, timeout=10)
    assert relay.stats.upstream_dropped == 2


# -- invocations ------------------------------------------------------------------------------


async def test_invocation_result_from_upstream_reaches_the_client(start_relay, upstream, connect):
    upstream.answer = lambda request: Response(
        200, b'{"type":3,"invocationId":"1","result":"pong"}' + RS.encode())
    relay = await start_relay()
    client = await connect(relay)
    invocation = '{"type":1,"invocationId":"1","target":"Ping","arguments":[1]}'
    await client.ws.send_message(invocation + RS)
    with trio.fail_after(5):
        assert await client.next_message() == {"type": 3, "invocationId": "1", "result": "pong"}
    request = upstream.events("Ping")[0]
    assert request.path == "/chat/api/messages/Ping"
    assert request.headers["content-type"] == "application/json"
    assert request.body == invocation.encode()


async def test_upstream_error_status_becomes_a_completion_error(start_relay, upstream, connect):
    upstream.answer = lambda request: Response(500)
    relay = await start_relay()
    client = await connect(relay)
    await client.ws.send_message('{"type":1,"invocationId":"7","target":"Boom","arguments":[]}'
                                 + RS)
    with trio.fail_after(5):
        message = await client.next_message()
    assert message == {"type": 3, "invocationId": "7",
                       "error": "Invocation failed, status code 500"}
    assert await relay.connection_exists("chat", next(iter(relay.table.get("chat").connections)))


async def test_unreachable_upstream_gives_a_completion_error(nursery, connect):
    with trio.socket.socket() as probe:  # a port nobody listens on
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    relay = await nursery.start(serve_relay, RelayConfig(
        port=0, access_keys=[KEY], upstreams=[f"http://127.0.0.1:{port}/{{event}}"],
        upstream_timeout=2))
    client = await connect(relay)
    await client.ws.send_message('{"type":1,"invocationId":"2","target":"X","arguments":[]}' + RS)
    with trio.fail_after(5):
        message = await client.next_message()
    assert message["invocationId"] == "2" and "could not be reached" in message["error"]


async def test_empty_upstream_answer_gives_a_void_completion(start_relay, upstream, connect):
    upstream.answer = lambda request: Response(204)
    relay = await start_relay()
    client = await connect(relay)
    await client.ws.send_message('{"type":1,"invocationId":"3","target":"V","arguments":[]}' + RS)
    with trio.fail_after(5):
        assert await client.next_message() == {"type": 3, "invocationId": "3"}


async def test_non_blocking_invocation_reaches_upstream_without_an_answer(start_relay, upstream,
                                                                          connect):
    relay = await start_relay()
    client = await connect(relay)
    await client.ws.send_message('{"type":1,"target":"Fire","arguments":["x"]}' + RS)
    await wait_for(lambda: upstream.events("Fire"))
    await client.ws.send_message('{"type":1,"invocationId":"4","target":"Then","arguments":[]}'
                                 + RS)
    with trio.fail_after(5):
        message = await client.next_message()
    assert message["invocationId"] == "4"  # nothing came back for the non-blocking one


async def test_messagepack_invocation_goes_up_unframed(start_relay, upstream, connect):
    relay = await start_relay()
    client = await connect(relay, protocol="messagepack")
    framed = MessagePackHubProtocol().write_invocation("Bin", [b"\x00\x01"])
    await client.ws.send_message(framed)
    await wait_for(lambda: upstream.events("Bin"))
    request = upstream.events("Bin")[0]
    assert request.headers["content-type"] == "application/x-msgpack"
    assert msgpack.unpackb(request.body)[3] == "Bin"
    assert framed.endswith(request.body) and len(request.body) < len(framed)


async def test_invocation_without_matching_rule_is_answered_not_delivered(nursery, upstream,
                                                                          connect):
    relay = await nursery.start(serve_relay, RelayConfig(port=0, access_keys=[KEY], upstreams=[
        {"url_template": f"http://127.0.0.1:{upstream.port}/x", "category_pattern": "connections"}
    ]))
    client = await connect(relay)
    await client.ws.send_message('{"type":1,"invocationId":"5","target":"T","arguments":[]}' + RS)
    with trio.fail_after(5):
        message = await client.next_message()
    assert "not delivered" in message["error"]


async def test_a_client_with_non_ascii_claims_reaches_the_upstream_intact(nursery, upstream,
                                                                          start_relay):
    relay = await start_relay()
    token = generate_access_token(KEY, "http://127.0.0.1/client/?hub=chat", now=time.time(),
                                  user_id="Zoë", claims={"name": "José"})
    ws = await connect_websocket_url(
        nursery, f"ws://127.0.0.1:{relay.port}/client/?hub=chat&access_token={token}")
    await ws.send_message('{"protocol":"json","version":1}' + RS)
    with trio.fail_after(5):
        assert await ws.get_message() == "{}" + RS
    # A header value is Latin-1 at most: this once raised in the relay's upstream task and
    # ended the relay process.
    await wait_for(lambda: upstream.events("connected"))
    event = parse_request(upstream.events("connected")[0].headers, b"", access_keys=[KEY])
    assert event.user_id == "Zoë" and event.claims["name"] == "José"
    assert await relay.user_exists("chat", "Zoë")
    await ws.aclose()


async def test_an_exception_in_an_upstream_call_fails_that_call_only(nursery, upstream,
                                                                     start_relay, connect,
                                                                     monkeypatch):
    relay = await start_relay()

    async def broken(*args, **kwargs):
        raise RuntimeError("injected fault")

    monkeypatch.setattr("relaycore.relay._upstream.Upstream._post", broken)
    client = await connect(relay, user="alice")
    await client.ws.send_message('{"type":1,"invocationId":"7","target":"T","arguments":[]}' + RS)
    with trio.fail_after(5):
        message = await client.next_message()
    assert message["invocationId"] == "7" and "Invocation failed" in message["error"]
    # The connected event met the same fault: dropped and counted, the relay carries on.
    await wait_for(lambda: relay.stats.upstream_dropped == 1)
    assert relay.stats.internal_errors == 2
    assert await relay.user_exists("chat", "alice")


async def test_invocations_past_the_limit_fail_at_once_while_the_upstream_is_slow(nursery,
                                                                                  connect):
    # An upstream that accepts and never answers: every call waits.
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    held = []

    async def hold(stream):
        held.append(stream)
        await trio.sleep_forever()

    nursery.start_soon(trio.serve_listeners, hold, listeners)
    relay = await nursery.start(serve_relay, RelayConfig(
        port=0, access_keys=[KEY], max_pending_invocations=3,
        upstreams=[{"url_template": f"http://127.0.0.1:{port}/{{event}}",
                    "category_pattern": "messages"}]))
    client = await connect(relay, user="alice")
    for n in range(5):
        await client.ws.send_message(
            f'{{"type":1,"invocationId":"{n}","target":"T","arguments":[]}}' + RS)
    with trio.fail_after(5):
        refused = [await client.next_message() for _ in range(2)]
    assert [m["invocationId"] for m in refused] == ["3", "4"]
    assert "3 invocations of this connection are already waiting" in refused[0]["error"]
    assert relay.stats.invocations_refused == 2
    await wait_for(lambda: len(held) == 3)
