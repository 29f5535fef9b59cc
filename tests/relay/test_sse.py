"""The Server-Sent Events transport of a client session (``relay/_sse.py``) and its wire
format (``_message.server_sent_event``).

The first part runs the transport in memory: it has no socket (its file descriptor is -1),
its poller only records what it is asked to watch, the client's messages come as the bodies of
its ``POST`` requests (``receive_posted``), and what it queues is read from its send buffer as
a client reads the chunked body. The second part is a real relay and a raw HTTP client.
"""

from __future__ import annotations

import json
import socket

import httpx
import pytest
import trio
from relayfakes import HUB, FakeUpstream, RecordingPoller, make_ops, records

from relaycore.protocol._websocket import CloseCode
from relaycore.relay import OutboundMessage, RelayConfig
from relaycore.relay._message import WIRE_FORMATS, server_sent_event
from relaycore.relay._peer import _IN, _OUT, ConnState, PeerIO
from relaycore.relay._session import ClientSession
from relaycore.relay._sse import END_OF_STREAM, ServerSentEventsTransport, _chunk_boundary
from relayhelpers import client_token, wait_for

HANDSHAKE = b'{"protocol":"json","version":1}\x1e'


def chunks(data: bytes | bytearray) -> list[bytes]:
    """The whole chunks of a chunked body (the last one, ``0``, as ``b""``)."""
    out = []
    pos = 0
    while pos < len(data):
        line_end = data.index(b"\r\n", pos)
        size = int(data[pos:line_end], 16)
        start = line_end + 2
        assert data[start + size:start + size + 2] == b"\r\n", f"a partial chunk at {pos}"
        out.append(bytes(data[start:start + size]))
        pos = start + size + 2
    return out


def event_data(event: bytes) -> bytes:
    """What an ``EventSource`` hands its listener for one event: the ``data:`` lines'
    values, joined by LF."""
    assert event.endswith(b"\r\n\r\n"), event
    lines = event[:-4].split(b"\r\n")
    assert all(line.startswith(b"data: ") for line in lines), lines
    return b"\n".join(line[len(b"data: "):] for line in lines)


class Streamed:
    """A session on a ``ServerSentEventsTransport`` without a socket, its stream open."""

    def __init__(self, *, send_limit: int = 1 << 20, close_timeout: float = 5.0,
                 started: bool = True, **settings: object) -> None:
        self.ops = make_ops(RelayConfig(send_buffer_limit=send_limit, **settings))  # type: ignore[arg-type]
        self.poller = RecordingPoller()
        self.forgotten: list[object] = []
        io = PeerIO(self.poller, self.ops.flusher, close_timeout,  # type: ignore[arg-type]
                    self.ops.stats, self.forgotten.append)
        self.session = ClientSession(self.ops, connection_id="c1", hub=HUB, claims={},
                                     user_id="alice", query="", headers={})
        self.transport = ServerSentEventsTransport(io, self.session, token="t1",
                                                   send_limit=send_limit, now=0.0)
        if started:  # what ``start`` does, but for the socket
            self.transport._reading = True
            self.transport._blocked = False

    def post(self, data: bytes, now: float = 1.0) -> None:
        self.transport.receive_posted(data, now)

    def sent(self) -> list[bytes]:
        """The chunks queued since the last look (as if written); the end is ``b""``."""
        got = chunks(self.transport._out)
        self.transport._out.clear()
        return got

    def opened(self) -> Streamed:
        self.post(HANDSHAKE)
        assert [event_data(c) for c in self.sent()] == [b"{}\x1e"]
        return self


# -- the wire format ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "lines"),
    [
        (b'{"type":6}\x1e', [b'{"type":6}\x1e']),
        (b"one\ntwo", [b"one", b"two"]),
        (b"one\r\ntwo\r\n", [b"one", b"two", b""]),  # a CR before the LF goes
        (b"a\rb", [b"a\rb"]),  # a CR alone is not a line end
    ],
)
def test_an_event_holds_each_line_of_the_payload_as_a_data_line(payload, lines):
    (event,) = chunks(server_sent_event(payload))
    assert event == b"".join(b"data: " + line + b"\r\n" for line in lines) + b"\r\n"


def test_the_event_stream_format_frames_json_only():
    assert WIRE_FORMATS["json+sse"] == ("json", server_sent_event)
    message = OutboundMessage.invocation("n", "x\ny")
    (event,) = chunks(message.frame("json+sse"))
    assert records(event_data(event)) == [{"type": 1, "target": "n", "arguments": ["x\ny"]}]


def test_a_chunk_boundary_is_found_past_what_the_socket_took():
    out = bytearray(server_sent_event(b"a" * 20) + server_sent_event(b"b") + END_OF_STREAM)
    first = len(server_sent_event(b"a" * 20))
    assert _chunk_boundary(out, 0, 1) == first
    assert _chunk_boundary(out, 0, first) == first
    assert _chunk_boundary(out, 0, first + 1) == len(out) - len(END_OF_STREAM)
    assert _chunk_boundary(out, 0, len(out) - 1) == len(out)


# -- in memory ----------------------------------------------------------------------------------


def test_the_handshake_comes_by_post_and_its_answer_as_an_event():
    streamed = Streamed()
    assert streamed.transport.wire_format_for("json") == "json+sse"
    streamed.opened()
    assert streamed.session.state is streamed.transport.state is ConnState.OPEN
    assert streamed.session.wire_format == "json+sse"
    assert streamed.transport.last_receive == 1.0
    # The first bytes queued marked the transport for the flusher, as a WebSocket's do.
    assert streamed.ops.flusher.dirty == [streamed.transport]


async def test_messagepack_is_refused_in_the_handshake_with_aspnet_cores_words():
    streamed = Streamed()
    assert streamed.transport.wire_format_for("messagepack") is None
    streamed.post(b'{"protocol":"messagepack","version":1}\x1e')
    answer, end = streamed.sent()
    assert json.loads(event_data(answer).rstrip(b"\x1e")) == {
        "error": "Cannot use the 'messagepack' protocol on the current transport. The "
                 "transport does not support 'Binary' transfer format."}
    assert end == b""  # the body ends
    assert streamed.session.state is ConnState.CLOSING
    assert streamed.ops.stats.handshake_errors == 1


def test_what_the_session_sends_are_events_in_order():
    streamed = Streamed(service_mode="serverless").opened()
    streamed.post(b'{"type":1,"invocationId":"1","target":"Send","arguments":[]}\x1e'
                  b'{"type":1,"invocationId":"2","target":"Send","arguments":[]}\x1e')
    answered = [records(event_data(c))[0]["invocationId"] for c in streamed.sent()]
    assert answered == ["1", "2"]


async def test_a_close_sends_the_close_message_then_ends_the_body():
    streamed = Streamed().opened()
    streamed.session.close("kicked")
    close, end = streamed.sent()
    assert records(event_data(close)) == [{"type": 7, "error": "kicked"}]
    assert end == b""
    assert not streamed.transport._reading  # the socket closes once that is out
    assert streamed.poller.watching[streamed.transport] == 0
    assert streamed.ops.connection(HUB, "c1") is None
    streamed.session.close("again")
    assert streamed.sent() == []


async def test_a_closing_stream_whose_client_reads_nothing_is_dropped_in_time(autojump_clock):
    streamed = Streamed(close_timeout=5).opened()
    streamed.session.close("bye")
    now = trio.current_time()
    assert not streamed.transport.close_due(now + 4.9)
    assert streamed.transport.close_due(now + 5)
    assert streamed.forgotten == [streamed.transport]


def test_the_clients_end_of_the_stream_ends_the_session_at_once():
    streamed = Streamed()
    upstream = streamed.ops.serverless = FakeUpstream()
    streamed.opened()
    streamed.transport.receive(b"GET / HTTP/1.1\r\n\r\n", 2.0)  # ignored: no request here
    assert streamed.session.state is ConnState.OPEN
    assert streamed.transport.last_receive == 1.0  # only its POSTs count as life
    streamed.transport.receive(b"", 3.0)
    assert streamed.session.state is streamed.transport.state is ConnState.CLOSED
    assert streamed.forgotten == [streamed.transport]
    assert upstream.events == [("connected", "c1"), ("disconnected", "c1", None)]


async def test_the_sessions_timers_run_through_the_transport():
    streamed = Streamed(keep_alive_interval=15, client_timeout=30).opened()
    streamed.transport.last_send = 1.0
    streamed.transport.tick(16.0)
    assert [records(event_data(c)) for c in streamed.sent()] == [[{"type": 6}]]
    streamed.post(b'{"type":6}\x1e', now=20.0)
    streamed.transport.tick(49.0)
    assert streamed.session.state is ConnState.OPEN
    assert [records(event_data(c)) for c in streamed.sent()] == [[{"type": 6}]]
    streamed.transport.last_send = 49.0
    streamed.transport.tick(50.5)  # 30 s without a POST
    close, end = streamed.sent()
    assert "client timeout" in records(event_data(close))[0]["error"]


async def test_past_the_send_limit_the_close_follows_the_chunk_the_socket_started():
    streamed = Streamed(send_limit=350).opened()
    big = server_sent_event(b"a" * 150)
    assert streamed.session.enqueue(big)
    streamed.transport._wait_writable(100)  # the socket took 100 bytes of that chunk
    assert streamed.transport._head_left == len(big) - 100
    assert streamed.poller.watching[streamed.transport] == _IN | _OUT
    assert streamed.session.enqueue(server_sent_event(b"b"))
    assert not streamed.session.enqueue(server_sent_event(b"c" * 300))
    out = bytes(streamed.transport._out)
    head = len(big) - 100
    assert out[:head] == big[100:]
    close, end = chunks(out[head:])
    assert "send buffer limit of 350 bytes" in records(event_data(close))[0]["error"]
    assert end == b""
    assert streamed.ops.stats.slow_consumer_closes == 1


def test_an_internal_error_drops_the_stream_without_a_websocket_goodbye():
    streamed = Streamed().opened()
    try:
        raise RuntimeError("a bug")
    except RuntimeError:
        streamed.transport._internal_error()
    assert streamed.transport._out == b""
    assert streamed.ops.stats.internal_errors == 1
    assert streamed.forgotten == [streamed.transport]


def socket_stream() -> tuple[trio.SocketStream, socket.socket]:
    """A stream for ``start`` and the client's end of it."""
    ours, theirs = socket.socketpair()
    theirs.settimeout(5)
    return trio.SocketStream(trio.socket.from_stdlib_socket(ours)), theirs


async def test_what_is_queued_before_the_head_is_out_waits_for_start():
    """The client posts its handshake once it has read the head, maybe before the front's
    task runs again: the answer waits in the buffer, unwritten, until the stream starts."""
    streamed = Streamed(started=False)
    streamed.post(HANDSHAKE)
    flusher = streamed.ops.flusher
    flusher.flush_all(0.0)  # there is no socket yet: nothing is written
    assert [event_data(c) for c in chunks(streamed.transport._out)] == [b"{}\x1e"]
    stream, client = socket_stream()
    streamed.transport.start(stream, b"")
    assert streamed.poller.watching[streamed.transport] == _IN
    flusher.flush_all(1.0)
    assert [event_data(c) for c in chunks(client.recv(65536))] == [b"{}\x1e"]
    streamed.transport.receive(b"", 2.0)  # the client closes its EventSource
    assert streamed.session.state is ConnState.CLOSED
    client.close()


async def test_a_stream_closed_before_its_head_is_out_ends_once_it_starts():
    streamed = Streamed(started=False)
    streamed.post(b'{"protocol":"messagepack","version":1}\x1e')  # refused: closing
    stream, client = socket_stream()
    streamed.transport.start(stream, b"")
    assert not streamed.transport._reading
    streamed.ops.flusher.flush_all(1.0)
    answer, end = chunks(client.recv(65536))
    assert b"Cannot use the 'messagepack' protocol" in answer and end == b""
    assert client.recv(65536) == b""  # written, then closed
    assert streamed.forgotten == [streamed.transport]
    client.close()


# -- over a socket ------------------------------------------------------------------------------


async def negotiate(port: int, user: str = "alice") -> str:
    async with httpx.AsyncClient() as client:
        answer = await client.post(
            f"http://127.0.0.1:{port}/client/negotiate?hub=chat&negotiateVersion=1",
            headers={"Authorization": f"Bearer {client_token('chat', user)}"})
    return str(answer.json()["connectionToken"])


async def post(port: int, token: str, body: bytes, user: str = "alice") -> int:
    async with httpx.AsyncClient() as client:
        answer = await client.post(f"http://127.0.0.1:{port}/client/?hub=chat&id={token}",
                                   headers={"Authorization": f"Bearer "
                                            f"{client_token('chat', user)}"}, content=body)
    return answer.status_code


async def delete(port: int, token: str, user: str = "alice") -> int:
    async with httpx.AsyncClient() as client:
        answer = await client.delete(f"http://127.0.0.1:{port}/client/?hub=chat&id={token}",
                                     headers={"Authorization": f"Bearer "
                                              f"{client_token('chat', user)}"})
    return answer.status_code


class RawStream:
    """An event stream read as bytes from a raw socket: the head, then chunk by chunk."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.head = b""

    async def _more(self) -> None:
        with trio.fail_after(5):
            data = await self.stream.receive_some(65536)
        assert data, "the relay closed the stream"
        self.buffer += data

    async def read_head(self) -> bytes:
        while b"\r\n\r\n" not in self.buffer:
            await self._more()
        end = self.buffer.index(b"\r\n\r\n") + 4
        self.head, self.buffer = bytes(self.buffer[:end]), self.buffer[end:]
        return self.head

    async def next_chunk(self) -> bytes:
        while not (end := _whole_chunks(self.buffer, 1)):
            await self._more()
        (chunk,) = chunks(self.buffer[:end])
        del self.buffer[:end]
        return chunk


def _whole_chunks(data: bytearray, limit: int | None = None) -> int:
    """How many bytes of ``data`` are whole chunks (at most ``limit`` of them)."""
    pos = count = 0
    while pos < len(data) and (limit is None or count < limit):
        line_end = data.find(b"\r\n", pos)
        if line_end < 0:
            break
        end = line_end + 2 + int(data[pos:line_end], 16) + 2
        if end > len(data):
            break
        pos, count = end, count + 1
    return pos


async def open_event_stream(port: int, token: str, user: str = "alice") -> RawStream:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(
        f"GET /client/?hub=chat&id={token}&access_token={client_token('chat', user)} "
        "HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
        "Origin: https://app.example\r\n\r\n".encode())
    return RawStream(stream)


async def test_an_event_stream_end_to_end(relay, rest):
    token = await negotiate(relay.port)
    raw = await open_event_stream(relay.port, token)
    head = (await raw.read_head()).decode("latin-1").lower()
    assert head.startswith("http/1.1 200 ")
    for header in ("content-type: text/event-stream", "cache-control: no-cache,no-store",
                   "pragma: no-cache", "content-encoding: identity", "x-accel-buffering: no",
                   "transfer-encoding: chunked",
                   "access-control-allow-origin: https://app.example"):
        assert f"\r\n{header}\r\n" in head, header
    assert "content-length" not in head
    assert await raw.next_chunk() == b":\r\n"

    assert await post(relay.port, token, HANDSHAKE) == 200
    assert event_data(await raw.next_chunk()) == b"{}\x1e"
    assert await post(relay.port, token, HANDSHAKE, user="mallory") == 403
    assert await delete(relay.port, token) == 400  # only long polling ends so
    r = await rest.call("POST", "/api/hubs/chat/users/alice/:send",
                        json_body={"target": "notify", "arguments": ["a\nb"]})
    assert r.status_code == 202
    assert records(event_data(await raw.next_chunk())) == [
        {"type": 1, "target": "notify", "arguments": ["a\nb"]}]

    # The client closes its EventSource: the connection is forgotten at once.
    (connection_id,) = relay.table.get("chat").connections
    await raw.stream.aclose()
    await wait_for(lambda: relay.table.get("chat") is None)
    r = await rest.call("HEAD", f"/api/hubs/chat/connections/{connection_id}")
    assert r.status_code == 404
    assert token not in relay.front._by_token
    assert await post(relay.port, token, b'{"type":6}\x1e') == 404


async def test_a_second_event_stream_of_one_connection_is_a_conflict(relay):
    token = await negotiate(relay.port)
    first = await open_event_stream(relay.port, token)
    await first.read_head()
    second = await open_event_stream(relay.port, token)
    assert (await second.read_head()).startswith(b"HTTP/1.1 409 ")
    await first.stream.aclose()
    await second.stream.aclose()


async def test_a_close_by_the_relay_ends_the_body_and_the_connection(relay, rest):
    token = await negotiate(relay.port)
    raw = await open_event_stream(relay.port, token)
    await raw.read_head()
    await raw.next_chunk()
    await post(relay.port, token, HANDSHAKE)
    await raw.next_chunk()
    (connection_id,) = relay.table.get("chat").connections
    r = await rest.call("DELETE", f"/api/hubs/chat/connections/{connection_id}",
                        params={"reason": "bye"})
    assert r.status_code == 200
    close = records(event_data(await raw.next_chunk()))
    assert close[0]["type"] == 7 and close[0]["error"] == "bye"
    assert await raw.next_chunk() == b""  # the last chunk
    with trio.fail_after(5):
        assert await raw.stream.receive_some(65536) == b""  # and the socket closes
    await raw.stream.aclose()
    await wait_for(lambda: not relay.front.live)


async def test_close_codes_do_not_matter_to_an_event_stream():
    """The session names a WebSocket close code; an event stream has none to send."""
    streamed = Streamed().opened()
    streamed.transport.close(CloseCode.POLICY_VIOLATION, "x")
    assert streamed.sent() == [b""]
