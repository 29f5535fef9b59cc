"""relaycore.sdk.upstream: signatures, parsing, completions, the ASGI handler, and a round trip
through the real relay (its upstream pointed at the handler)."""

from __future__ import annotations

import json
import time

import anyio
import httpx
import msgpack
import pytest
import trio
from trio_websocket import connect_websocket_url

from relaycore.protocol import generate_access_token
from relaycore.relay import RelayConfig, serve_relay
from relaycore.relay._http import HttpConnection, Response
from relaycore.sdk import HubException
from relaycore.sdk.upstream import (
    UpstreamError,
    UpstreamHandler,
    completion_reply,
    parse_request,
    verify_signature,
)
from relayhelpers import load_vectors

BACKENDS = ["asyncio", "trio"]
KEY = "upstream-test-key"


def signature_vector() -> dict:
    return load_vectors("service-protocol.json")["related_vectors"]["upstream_signature"]


def headers(event="connected", category="connections", conn="c1", **extra) -> dict[str, str]:
    from relaycore.protocol import upstream_signature

    return {"X-ASRS-Connection-Id": conn, "X-ASRS-Hub": "chat", "X-ASRS-Category": category,
            "X-ASRS-Event": event, "X-ASRS-Signature": upstream_signature(conn, [KEY]),
            "X-ASRS-User-Id": "alice", "X-ASRS-User-Claims": "asrs.s.uid: alice, role: admin",
            "X-ASRS-Client-Query": "?hub=chat&lang=fr", **extra}


# -- signatures and parsing ------------------------------------------------------------------


def test_signature_vector_verifies_with_either_key_and_any_case():
    v = signature_vector()
    header = v["header_value_example"]
    assert verify_signature(v["connection_id"], header, v["access_keys"][:1])
    assert verify_signature(v["connection_id"], header, v["access_keys"][1:])
    assert verify_signature(v["connection_id"], header.upper().replace("SHA256", "sha256"),
                            v["access_keys"][:1])
    assert not verify_signature(v["connection_id"], header, ["another-key"])
    assert not verify_signature("other-connection", header, v["access_keys"])
    assert not verify_signature(v["connection_id"], None, v["access_keys"])


def test_connected_event_is_parsed_with_claims_and_query():
    event = parse_request(headers(), b'{"type":10}', access_keys=[KEY])
    assert (event.connection_id, event.hub, event.event, event.user_id) == (
        "c1", "chat", "connected", "alice")
    assert event.claims == {"asrs.s.uid": "alice", "role": "admin"}
    assert event.query == {"hub": "chat", "lang": "fr"}


def test_disconnected_event_carries_its_error():
    event = parse_request(headers("disconnected"), b'{"Type":11,"Error":"timeout"}',
                          access_keys=[KEY])
    assert event.error == "timeout"


def test_json_and_messagepack_invocations_are_parsed():
    body = b'{"type":1,"invocationId":"3","target":"Echo","arguments":["hi"]}'
    event = parse_request(headers("Echo", "messages", **{"Content-Type": "application/json"}),
                          body, access_keys=[KEY])
    assert event.invocation.target == "Echo" and list(event.invocation.arguments) == ["hi"]
    packed = msgpack.packb([1, {}, "4", "Echo", [b"\x01"]], use_bin_type=True)
    event = parse_request(headers("echo", "messages",
                                  **{"Content-Type": "application/x-msgpack"}), packed,
                          access_keys=[KEY])
    assert event.protocol == "messagepack" and list(event.invocation.arguments) == [b"\x01"]


@pytest.mark.parametrize(
    ("hdrs", "body", "status"),
    [
        (headers(**{"X-ASRS-Signature": "sha256=00"}), b"", 401),
        ({k: v for k, v in headers().items() if k != "X-ASRS-Signature"}, b"", 401),
        ({"X-ASRS-Hub": "chat"}, b"", 400),
        (headers("Echo", "messages", **{"Content-Type": "text/plain"}), b"{}", 415),
        (headers("Echo", "messages", **{"Content-Type": "application/json"}), b"{nope", 400),
        (headers("Other", "messages", **{"Content-Type": "application/json"}),
         b'{"type":1,"target":"Echo","arguments":[]}', 400),
    ],
)
def test_bad_requests_are_rejected_with_the_right_status(hdrs, body, status):
    with pytest.raises(UpstreamError) as info:
        parse_request(hdrs, body, access_keys=[KEY])
    assert info.value.status == status and str(info.value)


def test_completion_reply_is_framed_for_the_clients_protocol():
    body = b'{"type":1,"invocationId":"9","target":"T","arguments":[]}'
    event = parse_request(headers("T", "messages", **{"Content-Type": "application/json"}),
                          body, access_keys=[KEY])
    assert completion_reply(event, 42) == (b'{"type":3,"invocationId":"9","result":42}\x1e',
                                           "application/json")
    payload, ctype = completion_reply(event, error="no")
    assert json.loads(payload.rstrip(b"\x1e"))["error"] == "no"


# -- the ASGI handler ------------------------------------------------------------------------------


def make_handler() -> tuple[UpstreamHandler, list]:
    handler = UpstreamHandler(access_keys=[KEY])
    seen: list = []

    @handler.on_connected
    async def connected(event):
        seen.append(("connected", event.connection_id))

    @handler.on_disconnected
    async def disconnected(event):
        seen.append(("disconnected", event.error))

    @handler.on_message("Add")
    async def add(event, a, b):
        return a + b

    @handler.on_message("Fail")
    async def fail(event):
        raise HubException("not allowed")

    @handler.on_message("Crash")
    async def crash(event):
        raise RuntimeError("secret detail")

    return handler, seen


@pytest.mark.parametrize("backend", BACKENDS)
def test_asgi_handler_dispatches_events_and_answers_invocations(backend):
    handler, seen = make_handler()

    async def scenario():
        transport = httpx.ASGITransport(app=handler)
        with anyio.fail_after(20):
            await talk(transport)

    async def talk(transport):
        async with httpx.AsyncClient(transport=transport, base_url="http://up") as http:
            r = await http.post("/", headers=headers(), content=b'{"type":10}')
            assert r.status_code == 200

            async def invoke(target, args, conn="c1"):
                body = json.dumps({"type": 1, "invocationId": "1", "target": target,
                                   "arguments": args}).encode()
                return await http.post("/", content=body, headers=headers(
                    target, "messages", conn, **{"Content-Type": "application/json"}))

            r = await invoke("add", [2, 3])
            assert r.content == b'{"type":3,"invocationId":"1","result":5}\x1e'
            r = await invoke("Fail", [])
            assert "HubException: not allowed" in json.loads(r.content.rstrip(b"\x1e"))["error"]
            r = await invoke("Crash", [])
            assert "secret" not in r.text and "Crash" in r.text
            assert (await invoke("Missing", [])).status_code == 404
            r = await http.post("/", headers={**headers(), "X-ASRS-Signature": "sha256=1"})
            assert r.status_code == 401 and r.json()["message"]
            r = await http.post("/", headers=headers("disconnected"),
                                content=b'{"type":11,"error":"gone"}')
            assert r.status_code == 200

    anyio.run(scenario, backend=backend)
    assert seen == [("connected", "c1"), ("disconnected", "gone")]


# -- round trip through the real relay ---------------------------------------------------------


async def serve_asgi(app, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """A minimal HTTP server for an ASGI app (enough for upstream POSTs), on trio."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])

    async def handle(stream):
        http = HttpConnection(stream, max_head=65536, max_body=1 << 20)
        async with stream:
            while (request := await http.read_request()) is not None:
                scope = {"type": "http", "method": request.method, "path": request.path,
                         "headers": [(k.encode(), v.encode()) for k, v in request.headers.items()]}
                sent: dict = {}

                async def receive(body=request.body):
                    return {"type": "http.request", "body": body, "more_body": False}

                async def send(message, sent=sent):
                    sent.update(message)
                    if message["type"] == "http.response.start":
                        sent["status_code"] = message["status"]
                        sent["ctype"] = dict(message["headers"]).get(b"content-type", b"")

                await app(scope, receive, send)
                await http.send_response(Response(sent["status_code"], sent.get("body", b""),
                                                  content_type=sent["ctype"].decode() or None))
                if not http.can_continue():
                    return

    await trio.serve_listeners(handle, listeners)


async def test_relay_upstream_round_trip_through_the_handler(nursery):
    handler, seen = make_handler()
    port = await nursery.start(serve_asgi, handler)
    relay = await nursery.start(serve_relay, RelayConfig(
        port=0, access_keys=[KEY], upstreams=[f"http://127.0.0.1:{port}/{{event}}"]))
    token = generate_access_token(KEY, "http://127.0.0.1/client/?hub=chat", now=time.time(),
                                  user_id="alice")
    ws = await connect_websocket_url(
        nursery, f"ws://127.0.0.1:{relay.port}/client/?hub=chat&access_token={token}")
    try:
        await ws.send_message('{"protocol":"json","version":1}\x1e')
        assert await ws.get_message() == "{}\x1e"
        await ws.send_message('{"type":1,"invocationId":"7","target":"Add","arguments":[20,22]}'
                              "\x1e")
        with trio.fail_after(10):
            while True:
                message = json.loads((await ws.get_message()).rstrip("\x1e"))
                if message["type"] == 3:
                    break
        assert message == {"type": 3, "invocationId": "7", "result": 42}
        assert seen[0][0] == "connected"
    finally:
        await ws.aclose()
        await ws._stream.aclose()
