"""A WebSocket client that relaycore did not write (trio-websocket on wsproto) speaking the
SignalR hub protocol by hand: no negotiate (the ``skipNegotiation`` path), the token in the
``access_token`` query parameter as browsers send it (client-protocol §1.5), the handshake,
keep-alive pings both ways, client timeout, REST fan-out, and the error answers (bad
handshake, missing or bad token).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgpack
import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    wrap_client_stream,
)
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from .harness import WAIT, RelayProcess, open_rest

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

pytestmark = pytest.mark.e2e

RS = "\x1e"
KEEP_ALIVE = 0.5
CLIENT_TIMEOUT = 2.0
#: The relay's settings for these tests: pings every 0.5 s, a client silent for 2 s is closed.
FAST_TIMERS = {"RELAYCORE_KEEP_ALIVE_INTERVAL": str(KEEP_ALIVE),
               "RELAYCORE_CLIENT_TIMEOUT": str(CLIENT_TIMEOUT)}


@contextlib.asynccontextmanager
async def websocket(url: str) -> AsyncIterator[WebSocketConnection]:
    """``open_websocket_url`` over a TCP stream that this helper owns and always closes:
    trio-websocket 0.12 leaves its stream open when the server completes the close handshake
    and then closes TCP (the reader sees EOF in state CLOSED and just stops), and when the
    upgrade is rejected; pytest would report the leaked sockets as unraisable
    ResourceWarnings."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None, url
    resource = f"{parts.path}?{parts.query}" if parts.query else parts.path
    with trio.fail_after(WAIT):
        stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(WAIT):
                connection = await wrap_client_stream(nursery, stream, parts.hostname, resource)
            try:
                yield connection
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(WAIT):
                    await connection.aclose()
    except BaseExceptionGroup as group:  # the nursery's: show the one error plainly
        if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
            raise group.exceptions[0] from None
        raise
    finally:
        await stream.aclose()


class JsonRecords:
    """JSON hub records (0x1E-terminated) read from text messages, one at a time."""

    def __init__(self, ws: Any, relay: RelayProcess) -> None:
        self.ws = ws
        self.relay = relay
        self.pending: deque[str] = deque()
        self.buffer = ""

    async def next(self, timeout: float = WAIT) -> dict[str, Any]:
        try:
            with trio.fail_after(timeout):
                while not self.pending:
                    message = await self.ws.get_message()
                    assert isinstance(message, str), f"a binary message: {message!r}"
                    self.buffer += message
                    *records, self.buffer = self.buffer.split(RS)
                    self.pending.extend(records)
        except trio.TooSlowError:
            raise AssertionError(f"no hub record within {timeout:g} s\n{self.relay.describe()}") \
                from None
        return json.loads(self.pending.popleft())

    async def next_not_ping(self, timeout: float = WAIT) -> dict[str, Any]:
        with trio.fail_after(timeout):
            while True:
                record = await self.next()
                if record != {"type": 6}:
                    return record


async def json_handshake(ws: Any, relay: RelayProcess) -> JsonRecords:
    await ws.send_message('{"protocol":"json","version":1}' + RS)
    records = JsonRecords(ws, relay)
    assert await records.next() == {}, "the handshake was not accepted"
    return records


def _read_varint(data: bytes) -> tuple[int, int]:
    value = shift = 0
    for index, byte in enumerate(data[:5]):
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, index + 1
    raise AssertionError(f"no complete VarInt at the start of {data[:5]!r}")


async def test_json_handshake_pings_and_rest_broadcast(relay_factory: Any) -> None:
    relay = await relay_factory(env=FAST_TIMERS)
    token = relay.client_token(user="ws-user")
    async with open_rest(relay) as rest, websocket(relay.ws_url("chat", token)) as ws:
        records = await json_handshake(ws, relay)
        assert not records.buffer and not records.pending, "more than the handshake reply"

        # The relay pings a client it has sent nothing to for KEEP_ALIVE seconds.
        started = time.monotonic()
        assert await records.next(timeout=KEEP_ALIVE * 10) == {"type": 6}
        assert time.monotonic() - started >= KEEP_ALIVE * 0.5

        # Our pings keep the connection open past the client timeout: answer each of the
        # relay's pings with one of ours for longer than CLIENT_TIMEOUT.
        deadline = time.monotonic() + CLIENT_TIMEOUT * 1.5
        while time.monotonic() < deadline:
            await ws.send_message('{"type":6}' + RS)
            assert await records.next(timeout=KEEP_ALIVE * 10) == {"type": 6}

        response = await rest.head("/users/ws-user", expect=200)
        assert response.status_code == 200
        await rest.send_all("notify", "hello", {"n": 1})
        assert await records.next_not_ping() == {
            "type": 1, "target": "notify", "arguments": ["hello", {"n": 1}]}
        await rest.send_user("ws-user", "direct", [1, 2])
        assert await records.next_not_ping() == {
            "type": 1, "target": "direct", "arguments": [[1, 2]]}

        # A Close message from the client ends the connection cleanly.
        await ws.send_message('{"type":7}' + RS)
        with trio.fail_after(WAIT):
            with pytest.raises(ConnectionClosed):
                while True:
                    await ws.get_message()
        await rest.head("/users/ws-user", expect=404)


async def test_silent_client_is_closed_after_the_client_timeout(relay_factory: Any) -> None:
    relay = await relay_factory(env=FAST_TIMERS)
    async with websocket(relay.ws_url("chat", relay.client_token())) as ws:
        records = await json_handshake(ws, relay)
        started = time.monotonic()
        close = await records.next_not_ping(timeout=CLIENT_TIMEOUT * 5)
        elapsed = time.monotonic() - started
        assert close["type"] == 7, close
        assert "timeout" in close.get("error", ""), close
        assert not close.get("allowReconnect"), close
        assert elapsed >= CLIENT_TIMEOUT * 0.9, elapsed
        with trio.fail_after(WAIT):
            with pytest.raises(ConnectionClosed):
                while True:
                    await ws.get_message()


async def test_messagepack_handshake_ping_and_broadcast(relay_factory: Any) -> None:
    relay = await relay_factory(env=FAST_TIMERS)
    async with open_rest(relay) as rest, \
            websocket(relay.ws_url("chat", relay.client_token())) as ws:
        await ws.send_message('{"protocol":"messagepack","version":1}' + RS)
        with trio.fail_after(WAIT):
            reply = await ws.get_message()
        reply = reply.encode() if isinstance(reply, str) else reply
        assert reply == b"{}\x1e"

        # Ping is the VarInt-framed array [6]; MessagePack output travels in binary messages.
        with trio.fail_after(KEEP_ALIVE * 10):
            ping = await ws.get_message()
        assert ping == b"\x02\x91\x06"
        await ws.send_message(b"\x02\x91\x06")

        await rest.send_all("notify", "hello", 7)
        with trio.fail_after(WAIT):
            while (message := await ws.get_message()) == ping:
                pass
        assert isinstance(message, bytes), message
        length, offset = _read_varint(message)
        assert len(message) == offset + length, "one hub message per WebSocket message"
        invocation = msgpack.unpackb(message[offset:], raw=False)
        assert invocation[:5] == [1, {}, None, "notify", ["hello", 7]], invocation


@pytest.mark.parametrize(("handshake", "error"), [
    ('{"protocol":"xml","version":1}', "The protocol 'xml' is not supported."),
    ('{"protocol":"json","version":99}', None),
])
async def test_bad_handshake_gets_an_error_and_the_socket_closes(
        relay: RelayProcess, handshake: str, error: str | None) -> None:
    async with websocket(relay.ws_url("chat", relay.client_token())) as ws:
        await ws.send_message(handshake + RS)
        with trio.fail_after(WAIT):
            reply = await ws.get_message()
        assert isinstance(reply, str) and reply.endswith(RS), reply
        body = json.loads(reply[:-1])
        assert set(body) == {"error"}, body
        if error is not None:
            assert body == {"error": error}
        else:
            assert "version 99" in body["error"], body
        with trio.fail_after(WAIT):
            with pytest.raises(ConnectionClosed):
                await ws.get_message()


@pytest.mark.parametrize("problem", ["missing", "malformed", "bad_signature", "expired",
                                     "wrong_audience"])
async def test_missing_or_invalid_token_is_401_with_the_reason(
        relay: RelayProcess, problem: str) -> None:
    token = {
        "missing": None,
        "malformed": "not-a-jwt",
        "bad_signature": relay.client_token(key="some-other-key"),
        "expired": relay.client_token(now=time.time() - 7200, lifetime=60),
        "wrong_audience": relay.client_token("otherhub"),
    }[problem]
    words = {"missing": "no access token", "malformed": "malformed",
             "bad_signature": "signature", "expired": "expired", "wrong_audience": "audience"}

    def check(status: int, body: bytes, where: str) -> None:
        assert status == 401, (where, status, body)
        doc = json.loads(body)
        assert doc["code"].startswith("Unauthorized"), (where, doc)
        assert words[problem] in doc["message"].lower(), (where, doc)

    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(timeout=WAIT) as client:
        with trio.fail_after(WAIT):
            response = await client.post(
                f"{relay.endpoint}/client/negotiate?hub=chat&negotiateVersion=1", headers=headers)
    assert response.headers.get("content-type", "").startswith("application/json"), response
    check(response.status_code, response.content, "negotiate")

    # The WebSocket upgrade is refused the same way (token in the query, as browsers send it).
    with trio.fail_after(WAIT):
        with pytest.raises(ConnectionRejected) as rejected:
            async with websocket(relay.ws_url("chat", token)):
                pass
    check(rejected.value.status_code, rejected.value.body or b"", "upgrade")


async def _negotiate(relay: RelayProcess, token: str, version: int | None = 1) -> httpx.Response:
    query = "hub=chat" + ("" if version is None else f"&negotiateVersion={version}")
    async with httpx.AsyncClient(timeout=WAIT) as client:
        with trio.fail_after(WAIT):
            return await client.post(f"{relay.endpoint}/client/negotiate?{query}",
                                     headers={"Authorization": f"Bearer {token}"})


async def test_negotiate_then_connect_with_the_connection_token(relay: RelayProcess) -> None:
    token = relay.client_token(user="neg")
    response = await _negotiate(relay, token)
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["negotiateVersion"] == 1, doc
    assert doc["availableTransports"][0] == {
        "transport": "WebSockets", "transferFormats": ["Text", "Binary"]}, doc
    assert "url" not in doc and "ProtocolVersion" not in doc and not doc.get(
        "useStatefulReconnect"), doc
    connection_id, connection_token = doc["connectionId"], doc["connectionToken"]
    assert connection_id != connection_token

    # negotiateVersion 0 (or none): no connectionToken; the connectionId is the id.
    legacy = (await _negotiate(relay, token, version=None)).json()
    assert "connectionToken" not in legacy and legacy["negotiateVersion"] == 0, legacy

    url = f"{relay.ws_url('chat', token)}&id={connection_token}"
    async with open_rest(relay) as rest, websocket(url) as ws:
        records = await json_handshake(ws, relay)
        await rest.head(f"/connections/{connection_id}", expect=200)
        await rest.send_connection(connection_id, "notify", "by connection id")
        assert await records.next_not_ping() == {
            "type": 1, "target": "notify", "arguments": ["by connection id"]}

        # A connection token is good for one WebSocket only.
        with trio.fail_after(WAIT):
            with pytest.raises(ConnectionRejected) as rejected:
                async with websocket(url):
                    pass
        assert rejected.value.status_code == 404, rejected.value


async def test_handshake_split_and_batched_with_messages(relay: RelayProcess) -> None:
    """The handshake may arrive in pieces, and hub messages may share its last WebSocket
    message (client-protocol §3.6: input may be batched)."""
    async with websocket(relay.ws_url("chat", relay.client_token())) as ws:
        await ws.send_message('{"protocol":"js')
        await ws.send_message('on","version":1}' + RS + '{"type":6}' + RS
                              + '{"type":1,"invocationId":"7","target":"Echo","arguments":["x"]}'
                              + RS)
        records = JsonRecords(ws, relay)
        assert await records.next() == {}
        completion = await records.next_not_ping()
        assert completion["type"] == 3 and completion["invocationId"] == "7", completion
        assert "not delivered" in completion["error"], completion


async def test_handshake_timeout(relay_factory: Any) -> None:
    relay = await relay_factory(env={"RELAYCORE_HANDSHAKE_TIMEOUT": "1"})
    async with websocket(relay.ws_url("chat", relay.client_token())) as ws:
        with trio.fail_after(WAIT):
            reply = await ws.get_message()
        assert isinstance(reply, str) and reply.endswith(RS), reply
        assert "error" in json.loads(reply[:-1]), reply
        with trio.fail_after(WAIT):
            with pytest.raises(ConnectionClosed):
                await ws.get_message()


async def test_v1_rest_routes(relay: RelayProcess) -> None:
    """The v1 paths (service-protocol §12.4: no api-version) reach a connection the same way."""
    token = relay.client_token(user="v1user")
    doc = (await _negotiate(relay, token)).json()
    cid = doc["connectionId"]
    url = f"{relay.ws_url('chat', token)}&id={doc['connectionToken']}"

    async with open_rest(relay) as rest, websocket(url) as ws:
        records = await json_handshake(ws, relay)

        async def v1(method: str, path: str, status: int, **kwargs: Any) -> httpx.Response:
            return await rest.request(method, f"/api/v1/hubs/chat{path}", expect=status,
                                      hub_path=False, api_version=False, **kwargs)

        await v1("PUT", f"/groups/g/connections/{cid}", 200)
        for path in ("", "/users/v1user", f"/connections/{cid}", "/groups/g"):
            await v1("POST", path, 202, json_body={"target": "notify", "arguments": [path]})
            assert await records.next_not_ping() == {
                "type": 1, "target": "notify", "arguments": [path]}, path

        await v1("HEAD", "/users/v1user", 200)
        await v1("GET", f"/connections/{cid}", 200)
        await v1("HEAD", "/groups/g", 200)
        response = await v1("GET", "/users/nobody", 404)
        assert response.headers.get("x-ms-error-code") == "Warning.User.NotExisted"

        await v1("DELETE", f"/connections/{cid}", 202, params=[("reason", "v1 bye")])
        close = await records.next_not_ping()
        assert close["type"] == 7 and close.get("error") == "v1 bye", close
        response = await v1("HEAD", f"/connections/{cid}", 404)
        assert response.headers.get("x-ms-error-code") == "Warning.Connection.NotExisted"


async def _raw_client(relay: RelayProcess, token: str, rcvbuf: int) -> tuple[
        trio.SocketStream, WSConnection]:
    """A WebSocket client on a socket with a tiny receive buffer, after the hub handshake was
    sent (its reply is left unread)."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, rcvbuf)
    with trio.fail_after(WAIT):
        await sock.connect((relay.host, relay.port))
    stream = trio.SocketStream(sock)
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host=f"{relay.host}:{relay.port}",
                                          target=f"/client/?hub=chat&access_token={token}")))
    with trio.fail_after(WAIT):
        while not any(isinstance(e, AcceptConnection) for e in ws.events()):
            data = await stream.receive_some(65536)
            assert data, "the relay closed the socket during the upgrade"
            ws.receive_data(data)
    await stream.send_all(ws.send(TextMessage(data='{"protocol":"json","version":1}' + RS)))
    return stream, ws


async def test_slow_consumer_is_closed_and_holds_up_nobody(relay_factory: Any) -> None:
    """A client that stops reading is closed once its send buffer passes the limit (with a
    Close message after whole frames); a reading client on the same hub gets everything."""
    limit = 256 * 1024
    relay = await relay_factory(env={"RELAYCORE_SEND_BUFFER_LIMIT": str(limit),
                                     "RELAYCORE_CLOSE_TIMEOUT": "60"})
    slow_stream, slow_ws = await _raw_client(relay, relay.client_token(user="slow"), 4096)
    payload = "p" * (64 * 1024)
    received: list[Any] = []
    got_one = trio.Event()

    async def read_fast(ws: WebSocketConnection) -> None:
        nonlocal got_one
        records = JsonRecords(ws, relay)
        assert await records.next() == {}
        while True:
            record = await records.next_not_ping(timeout=WAIT * 4)
            received.append(record["arguments"][0] if record["type"] == 1 else record)
            got_one.set()
            got_one = trio.Event()

    async with open_rest(relay) as rest, \
            websocket(relay.ws_url("chat", relay.client_token(user="fast"))) as fast, \
            trio.open_nursery() as nursery:
        await fast.send_message('{"protocol":"json","version":1}' + RS)
        nursery.start_soon(read_fast, fast)
        await rest.head("/users/slow", expect=200)

        # Send until the relay gives up on the slow client (bounded: 4 MB of kernel buffers
        # plus the limit is well under 400 messages of 64 KB).
        sent = 0
        while (await rest.head("/users/slow")).status_code == 200:
            assert sent < 400, f"the slow client was never closed\n{relay.describe()}"
            await rest.send_all("notify", f"{sent:06d}{payload}")
            sent += 1
        with trio.fail_after(WAIT * 4):
            while len(received) < sent:
                await got_one.wait()
        assert [r[:6] for r in received] == [f"{i:06d}" for i in range(sent)]
        nursery.cancel_scope.cancel()

    # The slow client finds whole frames, then a Close message naming the policy.
    records: list[Any] = []
    text = ""
    with trio.fail_after(WAIT * 4):
        closed = False
        while not closed:
            data = await slow_stream.receive_some(65536)
            if not data:
                break
            slow_ws.receive_data(data)
            for event in slow_ws.events():
                if isinstance(event, TextMessage):
                    text += event.data
                    if event.message_finished:
                        assert text.endswith(RS), text[-40:]
                        records.extend(json.loads(r) for r in text.split(RS)[:-1])
                        text = ""
                elif isinstance(event, CloseConnection):
                    closed = True
    await slow_stream.aclose()
    assert records[0] == {}, records[:1]
    notifications = [r["arguments"][0][:6] for r in records if r.get("type") == 1]
    assert notifications == [f"{i:06d}" for i in range(len(notifications))]
    assert records[-1]["type"] == 7, records[-1]
    assert "slow consumer" in records[-1]["error"], records[-1]
