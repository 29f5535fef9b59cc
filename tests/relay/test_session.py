"""``ClientSession``: the SignalR handshake, then an app server or the relay itself.

The first part drives a session over an in-memory transport (``relayfakes.MemoryTransport``):
the client's messages are handed to it, what it queues is read back as WebSocket frames, and
timers run at the times the test passes to ``tick``. The second part drives the same things
through a real relay and a trio-websocket client, end to end.
"""

from __future__ import annotations

import json

import pytest
import trio
from relayfakes import HUB, FakeServer, FakeUpstream, make_ops, new_session, records
from relaysuite import connection_ids
from trio_websocket import ConnectionClosed

from relaycore.protocol._hub import (
    CompletionMessage,
    InvocationMessage,
    MessagePackHubProtocol,
    PingMessage,
)
from relaycore.protocol._websocket import CloseCode, Opcode
from relaycore.relay import RelayConfig, serve_relay
from relaycore.relay._peer import ConnState
from relayhelpers import KEY, RS, wait_for

JSON_HANDSHAKE = '{"protocol":"json","version":1}\x1e'
MSGPACK_HANDSHAKE = '{"protocol":"messagepack","version":1}\x1e'
MSGPACK = MessagePackHubProtocol()


def invocation(invocation_id: str | None = "1", target: str = "Send") -> str:
    fields = {"type": 1, "target": target, "arguments": [1]}
    if invocation_id is not None:
        fields["invocationId"] = invocation_id
    return json.dumps(fields) + RS


@pytest.fixture
def ops():
    return make_ops(RelayConfig(keep_alive_interval=15, client_timeout=30, handshake_timeout=15,
                                max_message_size=4096))


def open_session(ops, handshake: str = JSON_HANDSHAKE, **kwargs):
    """A serverless session past its handshake (its answer already read)."""
    session, transport = new_session(ops, **kwargs)
    transport.deliver(handshake)
    assert session.state is ConnState.OPEN
    transport.flush()
    return session, transport


# -- the handshake ------------------------------------------------------------------------------


def test_a_json_handshake_is_answered_and_makes_the_session_routable(ops):
    session, transport = new_session(ops, user_id="alice")
    assert session.state is ConnState.HANDSHAKE and ops.connection(HUB, "c1") is None
    transport.deliver(JSON_HANDSHAKE)
    assert transport.flush() == [(Opcode.TEXT, b"{}\x1e")]
    assert session.state is transport.state is ConnState.OPEN
    assert ops.connection(HUB, "c1") is session and ops.user_exists(HUB, "alice")
    assert (session.protocol_name, session.wire_format) == ("json", "json")
    assert session.headers == {}  # only an app server is told them
    assert ops.stats.connections_opened == 1 and transport.closes == []


def test_a_messagepack_handshake_is_answered_in_a_binary_frame(ops):
    session, transport = new_session(ops)
    transport.deliver(MSGPACK_HANDSHAKE)
    assert transport.flush() == [(Opcode.BINARY, b"{}\x1e")]
    assert (session.protocol_name, session.wire_format) == ("messagepack", "messagepack")


def test_a_handshake_split_across_messages_is_answered_once_whole(ops):
    session, transport = new_session(ops)
    transport.deliver('{"protocol":"json",')
    transport.deliver('"version":1}')
    assert transport.flush() == [] and session.state is ConnState.HANDSHAKE
    transport.deliver(RS)
    assert transport.take() == [{}]
    assert session.state is ConnState.OPEN


def test_hub_messages_behind_the_handshake_in_the_same_message_are_handled(ops):
    session, transport = new_session(ops)
    transport.deliver(JSON_HANDSHAKE + invocation("7"))
    answer, completion = transport.take()
    assert answer == {}
    assert (completion["type"], completion["invocationId"]) == (3, "7")


@pytest.mark.parametrize(
    ("request_text", "error"),
    [
        ('{"protocol":"xml","version":1}\x1e', "The protocol 'xml' is not supported."),
        ('{"protocol":"json","version":7}\x1e',
         "The server does not support version 7 of the 'json' protocol."),
    ],
)
def test_a_refused_handshake_gets_the_error_then_a_close(ops, request_text, error):
    session, transport = new_session(ops)
    transport.deliver(request_text)
    assert transport.flush() == [(Opcode.TEXT, b'{"error":"%s"}\x1e' % error.encode())]
    assert transport.closes == [(CloseCode.NORMAL_CLOSURE, "")]
    assert session.state is ConnState.CLOSING and session.close_reason == error
    assert ops.connection(HUB, "c1") is None
    assert ops.stats.handshake_errors == 1 and ops.stats.connections_opened == 0


def test_a_malformed_handshake_gets_an_error_naming_it(ops):
    session, transport = new_session(ops)
    transport.deliver('{"protocol":' + RS)
    (answer,) = transport.take()
    assert "not valid JSON" in answer["error"]
    assert transport.closes and ops.stats.handshake_errors == 1


def test_a_handshake_longer_than_the_message_size_limit_is_canceled(ops):
    session, transport = new_session(ops)
    transport.deliver('{"protocol":"json","version":1,"padding":"' + "x" * 4096)
    assert transport.take() == [{"error": "Handshake was canceled."}]
    assert transport.closes and session.state is ConnState.CLOSING


def test_bytes_after_a_refused_handshake_are_dropped(ops):
    session, transport = new_session(ops)
    transport.deliver('{"protocol":"xml","version":1}\x1e', invocation("2"))
    assert transport.take() == [{"error": "The protocol 'xml' is not supported."}]
    transport.deliver(invocation("3"))
    assert transport.flush() == []


def test_without_an_app_server_a_default_mode_relay_refuses_the_handshake():
    ops = make_ops(RelayConfig(service_mode="default"))
    session, transport = new_session(ops)
    transport.deliver(JSON_HANDSHAKE)
    assert transport.take() == [{"error": "No app server is connected to hub 'chat'."}]
    assert transport.closes and ops.connection(HUB, "c1") is None


# -- serverless ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("handshake", "ping"), [(JSON_HANDSHAKE, '{"type":6}' + RS),
                                                 (MSGPACK_HANDSHAKE, b"\x02\x91\x06")])
def test_a_clients_ping_is_taken_without_an_answer(ops, handshake, ping):
    session, transport = open_session(ops, handshake)
    transport.deliver(ping, ping)
    assert transport.flush() == [] and session.state is ConnState.OPEN


def test_an_invocation_without_an_upstream_gets_a_completion_error(ops):
    session, transport = open_session(ops)
    transport.deliver(invocation("1"), invocation(None))  # the second is fire-and-forget
    assert transport.take() == [{
        "type": 3, "invocationId": "1",
        "error": "Invocation of 'Send' was not delivered: hub 'chat' has no app server "
                 "connected and no upstream configured."}]


def test_a_messagepack_invocation_without_an_upstream_gets_a_messagepack_completion(ops):
    session, transport = open_session(ops, MSGPACK_HANDSHAKE)
    transport.deliver(MSGPACK.write(InvocationMessage("Send", [1], invocation_id="9")))
    ((opcode, payload),) = transport.flush()
    assert opcode == Opcode.BINARY
    (completion,) = records(payload, "messagepack")
    assert isinstance(completion, CompletionMessage) and completion.invocation_id == "9"
    assert "'Send' was not delivered" in completion.error


def test_an_error_quotes_at_most_100_characters_of_the_method_name(ops):
    session, transport = open_session(ops)
    transport.deliver(invocation("1", target="M" * 500))
    (completion,) = transport.take()
    assert f"'{'M' * 100}...'" in completion["error"] and "M" * 101 not in completion["error"]


def test_an_upstream_gets_the_invocation_as_the_client_sent_it(ops):
    upstream = ops.serverless = FakeUpstream(takes=True)
    session, transport = open_session(ops)
    transport.deliver(invocation("5"))
    assert transport.flush() == []  # the upstream answers, later
    assert upstream.events == [
        ("connected", "c1"),
        ("invoke", "c1", "Send", "5", invocation("5")[:-1].encode()),
    ]


def test_several_invocations_in_one_message_are_each_answered_in_order(ops):
    session, transport = open_session(ops)
    transport.deliver(invocation("1") + invocation("2") + invocation("3"))
    assert [m["invocationId"] for m in transport.take()] == ["1", "2", "3"]


def test_a_close_message_ends_the_session_without_an_answer(ops):
    upstream = ops.serverless = FakeUpstream()
    session, transport = open_session(ops)
    transport.deliver('{"type":7}' + RS, invocation("1"))
    assert transport.flush() == []
    assert transport.closes == [(CloseCode.NORMAL_CLOSURE, "")]
    assert ops.connection(HUB, "c1") is None
    assert upstream.events == [("connected", "c1"), ("disconnected", "c1", None)]


@pytest.mark.parametrize(
    ("message", "code", "says"),
    [
        ('{"type":1,' + RS, CloseCode.INVALID_FRAME_PAYLOAD_DATA,
         "Connection closed with an error"),
        ('{"type":1,"target":"' + "x" * 5000, CloseCode.MESSAGE_TOO_BIG, "4096"),
    ],
)
def test_a_malformed_or_oversized_hub_message_closes_with_the_reason(ops, message, code, says):
    session, transport = open_session(ops)
    transport.deliver(message)
    (close,) = transport.take()
    assert close["type"] == 7 and says in close["error"]
    assert transport.closes == [(code, close["error"])]
    assert ops.stats.protocol_errors == 1 and ops.connection(HUB, "c1") is None


def test_replies_reach_only_an_open_session(ops):
    session, transport = new_session(ops)
    session.reply(CompletionMessage(invocation_id="1", result=2))
    session.send_framed(b'{"type":6}\x1e')
    assert not session.enqueue(b"frame")
    assert transport.flush() == []
    transport.deliver(JSON_HANDSHAKE)
    transport.flush()
    session.reply(CompletionMessage(invocation_id="1", result=2))
    session.send_framed(b'{"type":6}\x1e')
    assert transport.take() == [{"type": 3, "invocationId": "1", "result": 2}, {"type": 6}]


# -- bound to an app server ---------------------------------------------------------------------


@pytest.fixture
def server(ops):
    server = FakeServer()
    ops.server_opened(server)
    return server


def bound_session(ops, server, handshake: str = JSON_HANDSHAKE, extra: str = ""):
    session, transport = new_session(ops)
    transport.deliver(handshake + extra)
    assert session.server is server
    return session, transport


def test_a_bound_session_forwards_its_handshake_and_then_its_bytes_to_the_app_server(ops,
                                                                                  server):
    session, transport = bound_session(ops, server, extra=invocation("1"))
    assert server.events == [("opened", "c1", (JSON_HANDSHAKE + invocation("1")).encode())]
    assert transport.flush() == []  # the app server's hub answers the handshake
    assert session.state is ConnState.HANDSHAKE and ops.connection(HUB, "c1") is None
    transport.deliver(invocation("2"), '{"type":6}' + RS)
    assert server.events[1:] == [("data", "c1", invocation("2").encode()),
                                 ("data", "c1", b'{"type":6}\x1e')]


def test_the_app_servers_handshake_answer_opens_the_session(ops, server):
    session, transport = bound_session(ops, server)
    session.server_data(b"{")
    assert session.state is ConnState.HANDSHAKE  # half an answer
    session.server_data(b'}\x1e{"type":1,"target":"hi","arguments":[]}\x1e')
    assert session.state is ConnState.OPEN and ops.connection(HUB, "c1") is session
    # Each piece is forwarded as it came, in a frame of its own.
    assert transport.flush() == [
        (Opcode.TEXT, b"{"), (Opcode.TEXT, b'}\x1e{"type":1,"target":"hi","arguments":[]}\x1e')]
    session.server_data(b'{"type":6}\x1e')
    assert transport.take() == [{"type": 6}]
    assert ops.stats.connections_opened == 1


def test_the_app_servers_handshake_refusal_reaches_the_client_and_closes(ops, server):
    session, transport = bound_session(ops, server)
    session.server_data(b'{"error":"go away"}\x1e')
    assert transport.take() == [{"error": "go away"}]
    assert transport.closes == [(CloseCode.NORMAL_CLOSURE, "")]
    assert server.events[-1] == ("closed", "c1", "go away")
    assert ops.stats.handshake_errors == 1 and ops.connection(HUB, "c1") is None


def test_a_bound_messagepack_session_gets_the_app_servers_bytes_in_binary_frames(ops, server):
    session, transport = bound_session(ops, server, MSGPACK_HANDSHAKE)
    session.server_data(b"{}\x1e" + MSGPACK.write(PingMessage()))
    ((opcode, payload),) = transport.flush()
    assert opcode == Opcode.BINARY and payload == b"{}\x1e" + MSGPACK.write(PingMessage())
    assert session.state is ConnState.OPEN


def test_a_bound_client_that_leaves_is_reported_to_its_app_server_once(ops, server):
    session, transport = bound_session(ops, server)
    session.server_data(b"{}\x1e")
    session.transport_closing()
    session.transport_ended()
    assert server.events[-1] == ("closed", "c1", None)
    assert [e[0] for e in server.events].count("closed") == 1
    assert session.state is ConnState.CLOSED and ops.connection(HUB, "c1") is None


def test_a_client_the_app_server_closed_is_not_reported_back_to_it(ops, server):
    session, transport = bound_session(ops, server)
    session.server_data(b"{}\x1e")
    transport.flush()
    session.close_from_server("done")
    assert transport.closes == [(CloseCode.NORMAL_CLOSURE, "")]
    assert session.close_reason == "done" and session.server is None
    assert [e[0] for e in server.events] == ["opened"]
    assert transport.flush() == []  # the app server's hub sent the Close message itself


def test_closing_a_bound_session_sends_the_close_message_and_tells_the_app_server(ops, server):
    session, transport = bound_session(ops, server)
    session.server_data(b"{}\x1e")
    transport.flush()
    session.close("maintenance", allow_reconnect=True)
    assert transport.take() == [{"type": 7, "error": "maintenance", "allowReconnect": True}]
    assert server.events[-1] == ("closed", "c1", "maintenance")
    session.close("again")  # once only
    assert transport.flush() == [] and len(transport.closes) == 1


def test_a_client_closed_before_its_app_server_answered_the_handshake_reads_a_handshake_answer(
        ops, server):
    session, transport = bound_session(ops, server)
    # What ServerConnection._leave and Relay.drain do to the clients they end.
    session.close("The app server connection of this client was closed; reconnect.",
                  allow_reconnect=True)
    # A SignalR client reads its first record as the handshake answer: the JavaScript client
    # fails with "Expected a handshake response from the server." on a hub message.
    first = transport.take()[0]
    assert "type" not in first and "reconnect" in first["error"]


# -- timers -------------------------------------------------------------------------------------


def test_a_handshake_that_does_not_arrive_in_time_is_canceled(ops):
    session, transport = new_session(ops, now=100.0)
    session.tick(115.0)
    assert transport.flush() == [] and session.state is ConnState.HANDSHAKE
    session.tick(115.5)
    assert transport.take() == [{"error": "Handshake was canceled."}]
    assert transport.closes and ops.stats.handshake_errors == 1


def test_an_app_server_that_does_not_answer_the_handshake_in_time_cancels_it(ops, server):
    session, transport = bound_session(ops, server)
    session.tick(16.0)
    assert transport.take() == [{"error": "Handshake was canceled."}]
    assert server.events[-1] == ("closed", "c1", "Handshake was canceled.")
    assert transport.closes and session.state is ConnState.CLOSING


def test_keep_alive_pings_go_out_when_nothing_was_sent_for_the_interval(ops):
    session, transport = open_session(ops)  # at 0, the answer written at 0
    session.tick(14.9)
    assert transport.flush() == []
    session.tick(15.0)
    assert transport.take() == [{"type": 6}]
    transport.last_send = 15.0
    session._out += b"queued"  # something waits to be written: no ping on top of it
    session.tick(30.0)
    assert bytes(transport._out) == b"queued" and session.state is ConnState.OPEN


def test_a_messagepack_keep_alive_ping_is_a_binary_frame(ops):
    session, transport = open_session(ops, MSGPACK_HANDSHAKE)
    session.tick(15.0)
    assert transport.flush() == [(Opcode.BINARY, MSGPACK.write(PingMessage()))]


def test_a_client_that_sends_nothing_for_the_client_timeout_is_closed(ops):
    session, transport = open_session(ops)
    transport.deliver('{"type":6}' + RS, now=20.0)
    transport.last_send = 45.0
    session.tick(50.0)  # 30 s since the client last sent: not more
    assert transport.flush() == [] and session.state is ConnState.OPEN
    session.tick(50.5)
    assert transport.take() == [{
        "type": 7,
        "error": "Connection closed: the client sent nothing for 30 seconds (client timeout)."}]
    assert ops.connection(HUB, "c1") is None


def test_a_closed_session_has_no_timers(ops):
    session, transport = open_session(ops)
    session.close("bye")
    transport.flush()
    session.tick(1e6)
    assert transport.flush() == [] and len(transport.closes) == 1


# -- the transport's end ------------------------------------------------------------------------


def test_a_slow_consumer_loses_its_backlog_and_reads_its_close_first(ops):
    session, transport = open_session(ops, limit=200)
    assert session.enqueue(b"a" * 150)
    assert not session.enqueue(b"b" * 100)
    ((opcode, payload),) = transport.flush()  # the backlog went; the Close is all there is
    (close,) = records(payload)
    assert close["type"] == 7
    assert close["error"] == ("Connection closed: the send buffer limit of 200 bytes was "
                              "exceeded (slow consumer).")
    assert transport.closes == [(CloseCode.POLICY_VIOLATION, close["error"])]
    assert ops.stats.slow_consumer_closes == 1
    assert ops.stats.slow_consumer_dropped_bytes == 250
    assert ops.connection(HUB, "c1") is None


def test_a_transport_protocol_error_queues_a_close_message_and_leaves(ops):
    session, transport = open_session(ops)
    session.transport_failed("invalid UTF-8", CloseCode.INVALID_FRAME_PAYLOAD_DATA)
    assert transport.take() == [{"type": 7, "error": "Connection closed: invalid UTF-8"}]
    assert ops.connection(HUB, "c1") is None and ops.stats.protocol_errors == 1
    assert transport.closes == []  # the transport closes itself, after this message


def test_a_transport_protocol_error_during_the_handshake_sends_no_hub_message(ops):
    session, transport = new_session(ops)
    session.transport_failed("unmasked frame", CloseCode.PROTOCOL_ERROR)
    assert transport.flush() == [] and session.state is ConnState.CLOSING


def test_a_transport_that_ends_closes_the_session_for_good(ops):
    upstream = ops.serverless = FakeUpstream()
    session, transport = open_session(ops)
    session.transport_ended()
    assert session.state is ConnState.CLOSED and ops.connection(HUB, "c1") is None
    assert upstream.events[-1] == ("disconnected", "c1", None)
    transport.deliver(invocation("1"))
    assert transport.flush() == []


# -- over a real socket -------------------------------------------------------------------------


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
