"""Stateful reconnect on the relay (``_session.StatefulSession``, ``_transport.ResumedTransport``
and the front's resume path), as ASP.NET Core 8 serves it over WebSockets.

The first part drives a session over in-memory transports: what the flusher would write is
taken through the session's ``_sink`` (as ``_peer._write_out`` does) and read back as frames;
a dropped WebSocket is the transport telling the session it ended, a resume a second transport
handed to ``resume``. The second part runs the real relay with a trio-websocket client that
negotiates the feature, loses its socket and resumes it.
"""

from __future__ import annotations

import json

import httpx
import pytest
import trio
import trio_websocket
from relayfakes import HUB, Clock, FakeServer, MemoryTransport, make_ops, records
from relaysuite import Rest
from test_front import exchange, make_front, request

from relaycore.protocol._websocket import CloseCode
from relaycore.relay import RelayConfig, serve_relay
from relaycore.relay._message import OutboundMessage
from relaycore.relay._peer import ConnState
from relaycore.relay._session import ClientSession, StatefulSession
from relayhelpers import KEY, RS, client_token, wait_for

V2 = '{"protocol":"json","version":2}\x1e'
V1 = '{"protocol":"json","version":1}\x1e'
MSGPACK_V2 = '{"protocol":"messagepack","version":2}\x1e'


class DroppableTransport(MemoryTransport):
    """A ``MemoryTransport`` that can be dropped as a ``Peer`` is (a resume drops the old
    WebSocket when the relay has not yet noticed that it died)."""

    def __init__(self, session, **kwargs) -> None:
        self.dropped = False
        super().__init__(session, **kwargs)

    def drop(self) -> None:
        self.dropped = True
        self.session.transport_ended()


def written(session, transport) -> list[dict]:
    """What the flusher would write for the session now, as hub messages (handshake
    answers included)."""
    sink = session._sink
    assert sink is transport
    return transport.take()


def invocation(n: int, invocation_id: str | None = None) -> str:
    fields: dict = {"type": 1, "target": "Send", "arguments": [n]}
    if invocation_id is not None:
        fields["invocationId"] = invocation_id
    return json.dumps(fields) + RS


def send(ops, n: int, connection_id: str = "c1") -> int:
    return ops.send_to_connection(HUB, connection_id, OutboundMessage.invocation("n", n))


def numbers(messages: list[dict]) -> list[int]:
    return [m["arguments"][0] for m in messages if m.get("type") == 1 and m["target"] == "n"]


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def ops(clock):
    return make_ops(RelayConfig(service_mode="serverless", stateful_reconnect_buffer=2000,
                                stateful_reconnect_window=15), clock=clock)


def stateful_session(ops, handshake: str = V2, connection_id: str = "c1"):
    session = StatefulSession(ops, connection_id=connection_id, hub=HUB, claims={},
                              user_id=None, query="", headers={})
    transport = DroppableTransport(session)
    transport.deliver(handshake)
    return session, transport


# -- numbering, acknowledging, resending --------------------------------------------------------


def test_a_version_2_handshake_turns_it_on_and_a_version_1_one_leaves_a_plain_session(ops):
    session, transport = stateful_session(ops)
    assert session.stateful and session._out is not transport._out
    assert written(session, transport) == [{}]
    plain, plain_transport = stateful_session(ops, V1, "c2")
    assert not plain.stateful and plain._out is plain_transport._out
    assert plain._sink is plain_transport


def test_what_the_client_did_not_acknowledge_is_resent_after_sequence_on_a_resumed_socket(
        ops, clock):
    session, transport = stateful_session(ops)
    written(session, transport)
    for n in (1, 2, 3):
        assert send(ops, n) == 1
    assert numbers(written(session, transport)) == [1, 2, 3]
    transport.deliver('{"type":8,"sequenceId":2}' + RS)  # the client got 1 and 2
    send(ops, 4)
    transport.session.transport_ended()  # the socket died, with 4 perhaps still in it
    assert session.state is ConnState.OPEN and ops.connection(HUB, "c1") is session
    assert send(ops, 5) == 1  # sent while the client is away: kept
    clock.now += 10
    new = DroppableTransport(session)  # attach leaves the session where it is ...
    assert session.transport is not new
    session.resume(new)  # ... until the new socket starts
    assert session.transport is new and new.state is ConnState.OPEN
    got = written(session, new)
    assert got[0] == {"type": 9, "sequenceId": 3}
    assert numbers(got) == [3, 4, 5]
    send(ops, 6)
    assert numbers(written(session, new)) == [6]


def test_a_resume_that_arrives_before_the_old_socket_is_known_dead_replaces_it(ops):
    session, transport = stateful_session(ops)
    written(session, transport)
    send(ops, 1)
    new = DroppableTransport(session)
    session.resume(new)
    assert transport.dropped and session.transport is new
    assert session.state is ConnState.OPEN  # the old socket's end was no news
    got = written(session, new)
    assert got[0] == {"type": 9, "sequenceId": 1} and numbers(got) == [1]
    transport.deliver(invocation(9))  # late bytes of the old socket go nowhere
    assert session._in_done == 0


def test_the_fan_outs_c_loop_appends_to_the_staging_buffer_and_the_flusher_moves_it(ops):
    sessions = [stateful_session(ops, connection_id=f"c{i}") for i in range(3)]
    for session, transport in sessions:
        written(session, transport)
    dirty = ops.flusher.dirty
    dirty.clear()
    assert ops.send_to_all(HUB, OutboundMessage.invocation("n", 7)) == 3
    assert {id(s) for s in dirty} >= {id(s) for s, _ in sessions}  # marked, as any session
    for session, transport in sessions:
        assert session._out and not transport._out  # staged, not yet on the transport
        assert numbers(written(session, transport)) == [7]
        assert session._sent_seq == 1 and len(session._replay) == 1


def test_pings_and_handshake_answers_are_not_numbered_and_not_kept(ops):
    session, transport = stateful_session(ops)
    session.tick(16.0)  # keep-alive ping (the transport's times start at 0)
    assert written(session, transport)[-1] == {"type": 6}
    assert session._sent_seq == 0 and not session._replay


def test_messagepack_messages_are_numbered_too(ops):
    session, transport = stateful_session(ops, MSGPACK_V2)
    transport.flush()
    send(ops, 1)
    send(ops, 2)
    session._sink  # noqa: B018 - what the flusher does
    got = [m for _, payload in transport.flush() for m in records(payload, "messagepack")]
    assert [list(m.arguments) for m in got] == [[1], [2]]
    assert session._sent_seq == 2
    transport.deliver(b"\x03\x92\x08\x01")  # Ack 1, as MessagePack
    assert [first for first, _, _ in session._replay] == [2]


# -- the client's messages ----------------------------------------------------------------------


@pytest.fixture
def bound_ops(clock):
    """Operations whose hub has an app server (``server``): sessions are bound to it."""
    return make_ops(RelayConfig(service_mode="default", stateful_reconnect_buffer=2000,
                                stateful_reconnect_window=15), clock=clock)


@pytest.fixture
def server(bound_ops):
    server = FakeServer()
    bound_ops.server_opened(server)
    return server


def test_an_app_server_sees_a_version_1_client_and_never_its_acks_or_sequences(bound_ops, server):
    session, transport = stateful_session(bound_ops)
    assert server.events == [("opened", "c1", V1.encode())]
    session.server_data(b"{}\x1e")
    assert session.state is ConnState.OPEN
    transport.deliver(invocation(1, "a"), '{"type":8,"sequenceId":0}' + RS)
    assert server.events[1:] == [("data", "c1", invocation(1, "a").encode())]
    # The relay acknowledges what it got, so that the client frees its buffer.
    assert {"type": 8, "sequenceId": 1} in written(session, transport)


def test_messages_the_client_resends_after_a_resume_reach_the_app_server_once(bound_ops, server):
    session, transport = stateful_session(bound_ops)
    session.server_data(b"{}\x1e")
    transport.deliver(invocation(1), invocation(2))
    session.transport_ended()
    new = DroppableTransport(session)
    session.resume(new)
    # The client did not see our Ack of 2: it resends from 2, then sends 3.
    new.deliver('{"type":9,"sequenceId":2}' + RS + invocation(2) + invocation(3))
    data = [event[2] for event in server.events if event[0] == "data"]
    assert b"".join(data) == (invocation(1) + invocation(2) + invocation(3)).encode()
    assert [e for e in server.events if e[0] == "closed"] == []


def test_a_sequence_past_what_the_relay_received_closes_with_the_aspnet_words(ops):
    session, transport = stateful_session(ops)
    transport.deliver(invocation(1))
    transport.deliver('{"type":9,"sequenceId":5}' + RS)
    assert session.state is ConnState.CLOSING
    assert "Sequence ID greater than amount of messages we've received." in str(
        written(session, transport)[-1])


# -- the bounds -----------------------------------------------------------------------------------


def test_over_the_buffer_bound_the_client_is_closed_with_a_reason(ops):
    session, transport = stateful_session(ops)
    written(session, transport)
    n = 0
    while session.state is ConnState.OPEN:
        n += 1
        send(ops, n)
        assert n < 200
    got = written(session, transport)
    assert got[-1]["type"] == 7
    assert "stateful reconnect buffer of 2000 bytes" in got[-1]["error"]
    assert transport.closes == [(CloseCode.POLICY_VIOLATION, got[-1]["error"])]
    assert ops.connection(HUB, "c1") is None


def test_over_the_bound_while_away_the_connection_ends_and_cannot_be_resumed(bound_ops, server):
    session, transport = stateful_session(bound_ops)
    session.server_data(b"{}\x1e")
    session.transport_ended()
    n = 0
    while session.state is ConnState.OPEN:
        n += 1
        send(bound_ops, n)
        session._sink  # noqa: B018 - what the flusher does
        assert n < 200
    assert not session.can_resume() and session.resume_over(0.0)
    assert server.events[-1][0] == "closed" and "stateful reconnect buffer" in server.events[-1][2]


def test_a_client_that_does_not_come_back_in_time_leaves_and_its_app_server_is_told(
        bound_ops, server, clock):
    session, transport = stateful_session(bound_ops)
    session.server_data(b"{}\x1e")
    session.transport_ended()
    assert not session.resume_over(clock.now + 14)
    assert [e for e in server.events if e[0] == "closed"] == []
    assert session.resume_over(clock.now + 16)
    assert bound_ops.connection(HUB, "c1") is None and session.state is ConnState.CLOSED
    assert server.events[-1] == (
        "closed", "c1", "Connection closed: the client did not reconnect within 15 seconds.")


def test_a_close_frame_from_the_client_ends_the_connection_as_for_any_client(bound_ops, server):
    session, transport = stateful_session(bound_ops)
    session.server_data(b"{}\x1e")
    session.transport_closing()
    session.transport_ended()
    assert session.state is ConnState.CLOSED and not session.can_resume()
    assert server.events[-1][0] == "closed"


def test_a_plain_session_has_no_sink_property():
    assert "_sink" in ClientSession.__slots__ and isinstance(StatefulSession._sink, property)


# -- end to end, in process ------------------------------------------------------------------------


@pytest.fixture
async def stateful_relay(nursery):
    config = RelayConfig(port=0, access_keys=[KEY], service_mode="serverless",
                         keep_alive_interval=5, client_timeout=10, close_timeout=1,
                         stateful_reconnect_window=5)
    return await nursery.start(serve_relay, config)


async def negotiate(relay, *, stateful: bool) -> dict:
    query = "&useStatefulReconnect=true" if stateful else ""
    async with httpx.AsyncClient() as http:
        answer = await http.post(
            f"http://127.0.0.1:{relay.port}/client/negotiate?hub={HUB}&negotiateVersion=1"
            + query, headers={"Authorization": f"Bearer {client_token(HUB)}"})
    return answer.json()


async def test_negotiate_answers_use_stateful_reconnect_only_when_asked(stateful_relay):
    assert (await negotiate(stateful_relay, stateful=True))["useStatefulReconnect"] is True
    assert "useStatefulReconnect" not in await negotiate(stateful_relay, stateful=False)


async def test_a_client_resumes_on_a_new_websocket_and_gets_what_it_missed(
        stateful_relay, nursery):
    relay = stateful_relay
    answer = await negotiate(relay, stateful=True)
    token, connection_id = answer["connectionToken"], answer["connectionId"]
    url = (f"ws://127.0.0.1:{relay.port}/client/?hub={HUB}&id={token}"
           f"&access_token={client_token(HUB)}")
    first = await trio_websocket.connect_websocket_url(nursery, url)
    await first.send_message(V2)
    assert await first.get_message() == "{}" + RS
    rest = Rest(relay)

    async def send_number(n: int) -> None:
        r = await rest.call("POST", f"/api/hubs/{HUB}/connections/{connection_id}/:send",
                            json_body={"target": "n", "arguments": [n]})
        assert r.status_code == 202

    await send_number(1)
    assert json.loads((await first.get_message()).rstrip(RS))["arguments"] == [1]
    # The socket dies without a close frame (the network, not the client).
    first._stream.socket.close()
    await send_number(2)  # the relay may or may not have noticed yet
    second = await trio_websocket.connect_websocket_url(nursery, url)
    got: list[dict] = []
    with trio.fail_after(5):
        while not any(m.get("arguments") == [2] for m in got):
            text = await second.get_message()
            got += [json.loads(r) for r in text.split(RS)[:-1]]
    assert got[0] == {"type": 9, "sequenceId": 1}
    assert [m["arguments"][0] for m in got if m.get("type") == 1] == [1, 2]
    await second.send_message('{"type":8,"sequenceId":2}' + RS)
    await send_number(3)
    with trio.fail_after(5):
        text = await second.get_message()
    assert json.loads(text.rstrip(RS))["arguments"] == [3]
    assert relay.ops.connection(HUB, connection_id) is not None
    await second.aclose()
    await wait_for(lambda: relay.ops.connection(HUB, connection_id) is None)
    # A connection that is over cannot be resumed.
    assert await upgrade_status(relay, url) == 404


async def upgrade_status(relay, url: str) -> int:
    """The status of a WebSocket upgrade of ``url`` (read off the socket: a refusal is the
    answer the test wants, not an error)."""
    target = url.split(str(relay.port), 1)[1]
    stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
    async with stream:
        await stream.send_all(
            f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        head = b""
        with trio.fail_after(5):
            while b"\r\n" not in head:
                head += await stream.receive_some(4096)
    return int(head.split(b" ", 2)[1])


async def test_a_client_that_never_resumes_leaves_the_table_after_the_window(nursery):
    config = RelayConfig(port=0, access_keys=[KEY], service_mode="serverless",
                         keep_alive_interval=5, client_timeout=10, close_timeout=1,
                         stateful_reconnect_window=0.3)
    relay = await nursery.start(serve_relay, config)
    answer = await negotiate(relay, stateful=True)
    url = (f"ws://127.0.0.1:{relay.port}/client/?hub={HUB}&id={answer['connectionToken']}"
           f"&access_token={client_token(HUB)}")
    ws = await trio_websocket.connect_websocket_url(nursery, url)
    await ws.send_message(V2)
    assert await ws.get_message() == "{}" + RS
    assert relay.ops.connection(HUB, answer["connectionId"]) is not None
    ws._stream.socket.close()
    closed_at = trio.current_time()
    await wait_for(lambda: relay.ops.connection(HUB, answer["connectionId"]) is None)
    assert trio.current_time() - closed_at >= 0.3  # it waited for its client that long
    assert await upgrade_status(relay, url) == 404


async def test_a_worker_sharing_its_port_does_not_offer_it_and_a_zero_buffer_turns_it_off():
    """A resume must reach the process that holds the connection: ``serve --workers``'
    workers (``reuse_port``) cannot promise it, so they do not offer stateful reconnect."""
    for settings in ({"reuse_port": True}, {"stateful_reconnect_buffer": 0}, {}):
        front = make_front(**settings)
        answer = await exchange(front, request(
            "POST", f"/client/negotiate?hub={HUB}&negotiateVersion=1&useStatefulReconnect=true",
            f"Authorization: Bearer {client_token(HUB)}\r\n"))
        assert answer.json().get("useStatefulReconnect", False) is (not settings), settings


def test_an_app_servers_frame_of_several_messages_is_numbered_per_message(bound_ops, server):
    session, transport = stateful_session(bound_ops)
    session.server_data(b"{}\x1e")
    three = (b'{"type":1,"target":"n","arguments":[1]}\x1e{"type":6}\x1e'
             b'{ "type": 1, "target": "n", "arguments": [2] }\x1e'
             b'{"target":"n","type":1,"arguments":[3]}\x1e')
    session.server_data(three)
    assert session._sent_seq == 3
    assert [(first, last) for first, last, _ in session._replay] == [(1, 3)]
    transport.deliver('{"type":8,"sequenceId":2}' + RS)  # 3 may be lost: the frame stays
    assert [(first, last) for first, last, _ in session._replay] == [(1, 3)]
    session.transport_ended()
    new = DroppableTransport(session)
    session.resume(new)
    got = written(session, new)
    # The frame again, after Sequence 1: the client drops 1 and 2, which it has.
    assert got[0] == {"type": 9, "sequenceId": 1} and numbers(got) == [1, 2, 3]
    new.deliver('{"type":8,"sequenceId":3}' + RS)
    assert not session._replay and session._replay_bytes == 0
