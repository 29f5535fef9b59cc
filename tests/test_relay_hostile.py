"""Requests that once killed the whole relay process: each is answered on its own connection,
and the relay and a healthy client carry on.

The relay runs in the test's nursery, so an exception that escapes a connection's handler fails
the test itself (as it ended the process under ``python -m relaycore serve``).
"""

from __future__ import annotations

import json
import os
import time

import pytest
import trio
from trio_websocket import ConnectionClosed

from relaycore.protocol._auth import generate_access_token
from relaycore.relay import OutboundMessage, RelayConfig, serve_relay
from relayhelpers import ADMIN_KEY, KEY, RS, admin_token, rest_token, wait_for


@pytest.fixture
async def relay(nursery):
    config = RelayConfig(port=0, access_keys=[KEY], close_timeout=1)
    return await nursery.start(serve_relay, config)


async def exchange(relay, raw: bytes) -> bytes:
    """Send ``raw`` and end the sending side on a new TCP connection, then read until the
    relay closes it."""
    stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
    received = bytearray()
    with trio.fail_after(5):
        await stream.send_all(raw)
        await stream.send_eof()
        while chunk := await stream.receive_some(65536):
            received += chunk
    await stream.aclose()
    return bytes(received)


def statuses(answer: bytes) -> list[int]:
    """The status codes of the responses in ``answer``, in order."""
    return [int(line.split(b" ")[1]) for line in answer.split(b"\r\n")
            if line.startswith(b"HTTP/1.1 ")]


def json_body(answer: bytes) -> dict:
    return json.loads(answer.rsplit(b"\r\n\r\n", 1)[1])


async def healthy_client_receives(relay, connect) -> None:
    client = await connect(relay, "chat", "alice")
    reached = await relay.send_to_all("chat", OutboundMessage.invocation("notify", "still here"))
    assert reached == 1
    with trio.fail_after(3):
        message = await client.next_message()
    assert message["arguments"] == ["still here"]


async def test_relay_a_head_request_then_a_truncated_one_answers_400_without_a_body(relay, connect):
    answer = await exchange(relay, b"HEAD /api/health HTTP/1.1\r\nHost: x\r\n\r\n"
                                   b"GET / HTTP/1.1\r\nHost")
    await exchange(relay, b"HEAD /api/health HTTP/1.1\r\nHost: x\r\n\r\n"
                          b"BROKEN REQUEST\r\n\r\n")
    assert statuses(answer)[0] == 200
    assert statuses(answer)[-1] == 400
    await healthy_client_receives(relay, connect)


async def test_relay_a_non_ascii_origin_is_not_echoed_and_the_request_is_answered(relay, connect):
    answer = await exchange(relay, "GET /api/health HTTP/1.1\r\nHost: x\r\nOrigin: http://é.x\r\n"
                                   "Connection: close\r\n\r\n".encode())
    assert statuses(answer) == [200]
    assert b"access-control-allow-origin" not in answer.lower()
    await healthy_client_receives(relay, connect)


@pytest.mark.parametrize("request_head", [
    b"POST /client/negotiate?hub=chat HTTP/1.1\r\nHost: [\r\nContent-Length: 0\r\n",
    b"GET /client/?hub=chat HTTP/1.1\r\nHost: [\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n",
    b"POST /api/hubs/chat/:send?api-version=2022-06-01 HTTP/1.1\r\nHost: [\r\n"
    b"Content-Length: 0\r\n",
    b"POST //[/api/hubs/chat/:send HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n",
], ids=["negotiate", "upgrade", "rest", "target"])
async def test_relay_an_unparsable_host_is_a_400_naming_it(relay, connect, request_head):
    answer = await exchange(relay, request_head + b"Connection: close\r\n\r\n")
    assert statuses(answer) == [400]
    assert "host" in json_body(answer)["message"].lower() or b"//[" in request_head
    await healthy_client_receives(relay, connect)


async def test_relay_a_ttl_too_large_for_a_number_is_a_400(relay, connect):
    path = "/api/hubs/chat/groups/g/users/u"
    token = rest_token(path)
    answer = await exchange(relay, (
        f"PUT {path}?api-version=2022-06-01&ttl={'9' * 400} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    ).encode())
    assert statuses(answer) == [400]
    assert "ttl" in json_body(answer)["message"]
    await healthy_client_receives(relay, connect)


async def test_relay_an_exception_in_a_handler_is_a_500_for_that_request_only(
        relay, connect, monkeypatch, caplog):
    def broken(request):
        raise RuntimeError("injected")

    monkeypatch.setattr(relay.front, "_negotiate", broken)
    answer = await exchange(relay, b"POST /client/negotiate?hub=chat HTTP/1.1\r\nHost: x\r\n"
                                   b"Content-Length: 0\r\nConnection: close\r\n\r\n")
    assert statuses(answer) == [500]
    assert json_body(answer)["code"] == "InternalServerError"
    await wait_for(lambda: any("injected" in r.getMessage() or
                               (r.exc_info and "injected" in str(r.exc_info[1]))
                               for r in caplog.records))
    await healthy_client_receives(relay, connect)



async def test_relay_an_error_quotes_at_most_100_characters_of_a_client_chosen_name(
        relay, connect):
    client = await connect(relay, "chat", "alice")
    target = "m" * 60000
    await client.ws.send_message(json.dumps(
        {"type": 1, "invocationId": "1", "target": target, "arguments": []}) + RS)
    with trio.fail_after(5):
        completion = await client.next_message()
    assert completion["invocationId"] == "1" and "not delivered" in completion["error"]
    assert f"'{'m' * 100}...'" in completion["error"] and len(completion["error"]) < 300


async def test_relay_a_rest_token_for_one_user_does_not_send_to_the_same_name_in_capitals(
        relay, connect):
    client = await connect(relay, "chat", "ALICE")
    token = rest_token("/api/hubs/chat/users/alice/:send")
    answer = await exchange(relay, (
        "POST /api/hubs/chat/users/ALICE/:send?api-version=2022-06-01 HTTP/1.1\r\n"
        f"Host: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        "Content-Length: 34\r\nConnection: close\r\n\r\n"
        '{"target":"notify","arguments":[]}').encode())
    assert statuses(answer) == [401]
    assert await relay.send_to_user("chat", "ALICE", OutboundMessage.invocation("n", 1)) == 1
    with trio.fail_after(3):
        assert (await client.next_message())["target"] == "n"


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def server_upgrade_attempt(relay) -> trio.SocketStream:
    token = generate_access_token(KEY, "http://127.0.0.1/server/?hub=chat", now=time.time(),
                                  user_id="pod1")
    stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
    await stream.send_all(
        ("GET /server/?hub=chat HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
         f"Connection: Upgrade\r\nAuthorization: Bearer {token}\r\n"
         "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
         ).encode())
    return stream


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
async def test_relay_a_silenced_upgrade_lets_go_when_the_app_server_gives_up_or_heals(relay):
    baseline = open_fds()
    relay.inject_fault("silence")
    given_up = await server_upgrade_attempt(relay)
    waiting = await server_upgrade_attempt(relay)
    await wait_for(lambda: open_fds() == baseline + 4)  # two sockets on each side
    await given_up.aclose()
    # The relay notices the close and lets go of its side (it used to hold it for ever).
    await wait_for(lambda: open_fds() == baseline + 2)
    relay.inject_fault("none")
    answer = bytearray()
    with trio.fail_after(5):
        while chunk := await waiting.receive_some(65536):
            answer += chunk
    assert statuses(bytes(answer)) == [503]
    await waiting.aclose()
    await wait_for(lambda: open_fds() == baseline)


# -- an exception at every stage ends only what it was serving -------------------------------


def _raise(*args, **kwargs):
    raise RuntimeError("injected fault")


HTTP_STAGES = {
    # stage: (what to break, the request that meets it)
    "request parse": ("relaycore.relay._http.HttpConnection.read_request",
                      b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n"),
    "routing": ("relaycore.relay._front.HttpFront.route",
                b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n"),
    "auth": ("relaycore.relay._tokens.RequestAuth.check_token",
             b"POST /api/hubs/chat/:send?api-version=2022-06-01 HTTP/1.1\r\nHost: x\r\n"
             b"Content-Length: 2\r\n\r\n{}"),
    "negotiate": ("relaycore.relay._front.HttpFront._negotiate",
                  b"POST /client/negotiate?hub=chat HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Length: 0\r\n\r\n"),
    "upgrade": ("relaycore.relay._front.HttpFront._upgrade",
                b"GET /client/?hub=chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n"),
    "REST handler": ("relaycore.relay._rest._message", None),
}


@pytest.mark.parametrize("stage", list(HTTP_STAGES))
async def test_relay_an_exception_while_serving_http_is_a_500_for_that_request_only(
        relay, connect, monkeypatch, caplog, stage):
    target, request = HTTP_STAGES[stage]
    if request is None:
        path = "/api/hubs/chat/:send"
        body = '{"target":"t","arguments":[]}'
        request = (f"POST {path}?api-version=2022-06-01 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   f"Authorization: Bearer {rest_token(path)}\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n{body}").encode()
    monkeypatch.setattr(target, _raise)
    answer = await exchange(relay, request)
    monkeypatch.undo()
    assert statuses(answer) == [500]
    assert json_body(answer)["code"] == "InternalServerError"
    assert relay.stats.internal_errors == 1
    assert sum("injected fault" in str(r.exc_info[1]) for r in caplog.records if r.exc_info) == 1
    await healthy_client_receives(relay, connect)


@pytest.mark.parametrize("stage", ["handshake", "message handling", "timers"])
async def test_relay_an_exception_in_a_client_connection_closes_it_with_1011_only(
        relay, connect, monkeypatch, stage):
    healthy = await connect(relay, "chat", "healthy")
    if stage == "handshake":
        monkeypatch.setattr("relaycore.relay._session.ClientSession._try_handshake", _raise)
        victim = await connect(relay, "chat", "victim", handshake=False)
        await victim.send_message('{"protocol":"json","version":1}' + RS)
    else:
        client = await connect(relay, "chat", "victim")
        victim = client.ws
        if stage == "message handling":
            monkeypatch.setattr("relaycore.relay._session.ClientSession.receive",
                                _raise)
            await victim.send_message('{"type":6}' + RS)
        else:
            monkeypatch.setattr("relaycore.relay._session.ClientSession.tick", _raise)
            for conn in relay.table.get("chat").connections.values():
                if conn.user_id == "victim":
                    # due for a keep-alive: the ticker calls its tick()
                    conn.transport.last_send = -1e9
    with trio.fail_after(5):
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await victim.get_message()
    monkeypatch.undo()
    assert closed.value.reason.code == 1011
    assert relay.stats.internal_errors >= 1
    assert await relay.send_to_user("chat", "healthy", OutboundMessage.invocation("n", 1)) == 1
    with trio.fail_after(3):
        assert (await healthy.next_message())["arguments"] == [1]


async def put_fault(relay, token: str | None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return await exchange(relay, (
        "PUT /api/admin/faults?serverConnections=drop HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"{auth}Content-Length: 0\r\nConnection: close\r\n\r\n").encode())


async def test_relay_the_admin_api_is_off_without_an_admin_key(relay):
    answer = await put_fault(relay, rest_token("/api/admin/faults"))
    assert statuses(answer) == [404]
    assert "admin API is off" in json_body(answer)["message"]
    assert relay.fault_mode == "none"


async def test_relay_the_admin_api_takes_the_admin_key_and_never_an_access_key(nursery):
    relay = await nursery.start(serve_relay, RelayConfig(port=0, access_keys=[KEY],
                                                         admin_key=ADMIN_KEY))
    assert statuses(await put_fault(relay, rest_token("/api/admin/faults"))) == [401]
    assert relay.fault_mode == "none"
    assert statuses(await put_fault(relay, admin_token())) == [200]
    assert relay.fault_mode == "drop"
    with pytest.raises(ValueError, match="admin_key must be .* not one of the access keys"):
        RelayConfig(access_keys=[KEY], admin_key=KEY)
