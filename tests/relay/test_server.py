"""The relay's server endpoint (``relay/_server.py``): the Azure SignalR service protocol.

The first part drives a ``ServerConnection`` in memory: the app server's masked frames go to
``Peer.receive`` and what the relay queues is read back from its send buffer (no socket, no
real time; its clients are ``ClientSession``s over ``relayfakes.MemoryTransport``). The second
part is end to end, with a fake app server written with relaycore's sans-I/O pieces (the
WebSocket protocol in the client role and the service-protocol codec), so every byte on the
wire is what an SDK sends; clients are trio-websocket connections.
"""
from __future__ import annotations

import json
import os
import time

import pytest
import trio
from relayfakes import (
    HUB,
    FakeServer,
    FakeUpstream,
    RecordingPoller,
    client_frame,
    close_code,
    frames,
    make_ops,
    new_session,
)
from trio_websocket import ConnectionClosed, connect_websocket_url

from relaycore.protocol._auth import generate_access_token
from relaycore.protocol._hub import InvocationMessage, JsonHubProtocol, MessagePackHubProtocol
from relaycore.protocol._service import (
    AckStatus,
    BroadcastDataMessage,
    CheckConnectionExistenceWithAckMessage,
    CheckUserInGroupWithAckMessage,
    ClientCompletionMessage,
    ClientInvocationMessage,
    CloseConnectionMessage,
    ConnectionDataMessage,
    ConnectionType,
    ErrorCompletionMessage,
    GroupBroadcastDataMessage,
    JoinGroupMessage,
    JoinGroupWithAckMessage,
    MultiConnectionDataMessage,
    OpenConnectionMessage,
    PingKey,
    ServiceAckMessage,
    ServiceErrorMessage,
    ServiceEventKind,
    ServiceEventMessage,
    ServiceEventObjectType,
    ServiceHandshakeRequest,
    ServiceHandshakeResponse,
    ServicePing,
    ServiceProtocolParser,
    UserDataMessage,
    UserJoinGroupWithAckMessage,
    write_message,
)
from relaycore.protocol._websocket import (
    BinaryMessage,
    CloseReceived,
    Opcode,
    Role,
    WebSocketProtocol,
)
from relaycore.relay import RelayConfig, serve_relay
from relaycore.relay._peer import ConnState, PeerIO
from relaycore.relay._server import ServerConnection
from relayhelpers import ADMIN_KEY, KEY, RS, Client, admin_token, client_token, wait_for

JSON = JsonHubProtocol()
HANDSHAKE_OK = b"{}" + RS.encode()


# -- in memory ----------------------------------------------------------------------------------


class WiredServer:
    """A ``ServerConnection`` without a socket (its close timer reads trio's clock, so the tests
    run in trio), reading from now on; ``send`` is the app server
    writing, ``received`` what the relay queued for it since the last look."""

    def __init__(self, *, server_id: str = "pod1", **settings) -> None:
        self.ops = make_ops(RelayConfig(**settings))
        self.forgotten: list = []
        io = PeerIO(RecordingPoller(), self.ops.flusher, 5.0, self.ops.stats,  # type: ignore[arg-type]
                    self.forgotten.append)
        self.conn = ServerConnection(io, self.ops, hub=HUB, server_id=server_id, now=0.0)
        self.conn._reading = True  # what ``start`` does, but for the socket
        self.parser = ServiceProtocolParser()

    def send(self, *messages, now: float = 1.0) -> None:
        self.conn.receive(b"".join(client_frame(write_message(m), Opcode.BINARY)
                                   for m in messages), now)

    def received(self) -> list:
        """Service messages, and a close frame as ``("close", code)``."""
        out = []
        for opcode, payload in frames(self.conn._out):
            if opcode == Opcode.CLOSE:
                out.append(("close", close_code(payload)))
            else:
                assert opcode == Opcode.BINARY
                self.parser.receive_data(payload)
                out.extend(self.parser.messages_received())
        self.conn._out.clear()
        return out

    def opened(self, connection_type: int = ConnectionType.DEFAULT) -> WiredServer:
        self.send(ServiceHandshakeRequest(connection_type=connection_type))
        response, ping = self.received()
        assert response == ServiceHandshakeResponse() and isinstance(ping, ServicePing)
        return self

    def bound_client(self, connection_id: str = "c1", user_id: str | None = "alice"):
        """A client that chose this connection, its handshake answered by the app server."""
        session, transport = new_session(self.ops, connection_id, user_id)
        transport.deliver(JSON_HANDSHAKE)
        assert session.server is self.conn
        self.send(ConnectionDataMessage(connection_id, HANDSHAKE_OK))
        assert transport.take() == [{}]
        return session, transport


JSON_HANDSHAKE = b'{"protocol":"json","version":1}\x1e'


async def test_the_handshake_is_answered_with_a_ping_of_the_hubs_metrics():
    wired = WiredServer(capacity=10)
    wired.send(ServiceHandshakeRequest())
    response, ping = wired.received()
    assert response.succeeded
    assert (ping.get(PingKey.CLIENT_COUNT), ping.get(PingKey.SERVER_COUNT)) == ("0", "1")
    assert wired.ops.servers_of(HUB) == [wired.conn] and wired.conn.carries_clients


async def test_a_handshake_of_another_version_is_refused_and_the_connection_closed():
    wired = WiredServer()
    wired.send(ServiceHandshakeRequest(version=2))
    response, close = wired.received()
    assert not response.succeeded and "version 2" in response.error_message
    assert close == ("close", 1000) and wired.ops.servers_of(HUB) == []


async def test_a_first_message_that_is_no_handshake_is_a_service_error():
    wired = WiredServer()
    wired.send(ServicePing.of(status="1"))
    error, close = wired.received()
    assert isinstance(error, ServiceErrorMessage) and "handshake" in error.error_message
    assert close == ("close", 1000)


async def test_a_weak_connection_never_carries_clients():
    wired = WiredServer().opened(ConnectionType.WEAK)
    assert not wired.conn.carries_clients
    assert wired.ops.choose_server(HUB) is None


async def test_a_bound_client_is_opened_on_the_app_server_and_its_bytes_flow_both_ways():
    wired = WiredServer().opened()
    session, transport = new_session(wired.ops, "c1", "alice",
                                     claims={"asrs.s.uid": "alice", "exp": 1, "role": ["a", "b"]})
    transport.deliver(JSON_HANDSHAKE)
    opened, handshake = wired.received()
    assert opened.connection_id == "c1" and opened.protocol == "json"
    assert opened.claims == {"asrs.s.uid": "alice", "role": ("a", "b")}
    assert opened.headers["x-test"] == ("1",)
    assert opened.headers["Asrs-Instance-Id"] == ("node-under-test",)
    assert handshake == ConnectionDataMessage("c1", JSON_HANDSHAKE)
    wired.send(ConnectionDataMessage("c1", HANDSHAKE_OK + b'{"type":6}\x1e'))
    assert transport.take() == [{}, {"type": 6}]
    assert wired.ops.connection(HUB, "c1") is session
    transport.deliver('{"type":6}\x1e')
    assert wired.received() == [ConnectionDataMessage("c1", b'{"type":6}\x1e')]
    transport.deliver('{"type":7}\x1e')
    session.transport_ended()
    assert wired.received() == [ConnectionDataMessage("c1", b'{"type":7}\x1e'),
                                CloseConnectionMessage("c1", "")]
    assert wired.conn.clients == {}


async def test_close_connection_from_the_app_server_closes_its_client_without_a_reply():
    wired = WiredServer().opened()
    session, transport = wired.bound_client()
    wired.received()
    wired.send(CloseConnectionMessage("c1", "kicked"))
    assert transport.closes == [(1000, "")] and session.close_reason == "kicked"
    assert wired.received() == [] and wired.ops.connection(HUB, "c1") is None


async def test_operations_are_performed_and_answered_with_an_ack_or_an_event_when_asked():
    wired = WiredServer().opened()
    session, transport = wired.bound_client()
    wired.received()
    wired.send(
        BroadcastDataMessage(payloads("hello", 1)),
        JoinGroupWithAckMessage("c1", "g", 1),
        JoinGroupWithAckMessage("nope", "g", 2),
        JoinGroupMessage("nope", "g"),
        CheckUserInGroupWithAckMessage("alice", "g", 3),
        UserJoinGroupWithAckMessage("bob", "h", 4),
    )
    assert wired.received() == [
        ServiceAckMessage(1, AckStatus.OK, ""),
        ServiceAckMessage(2, AckStatus.NOT_FOUND, ""),
        ServiceEventMessage(ServiceEventObjectType.CONNECTION, "nope",
                            ServiceEventKind.NOT_EXISTED, "connection 'nope' does not exist"),
        ServiceAckMessage(3, AckStatus.OK, ""),
        ServiceAckMessage(4, AckStatus.OK, ""),
    ]
    assert transport.take() == [{"type": 1, "target": "hello", "arguments": [1]}]
    assert session.groups == {"g"}


async def test_user_data_takes_the_hot_path_to_each_connection_of_the_user():
    wired = WiredServer().opened()
    _, first = wired.bound_client("c1", "alice")
    _, second = wired.bound_client("c2", "alice")
    wired.received()
    wired.send(UserDataMessage("alice", payloads("n", 2)))
    assert first.take() == second.take() == [{"type": 1, "target": "n", "arguments": [2]}]
    assert wired.received() == []  # a send is not answered
    assert wired.ops.stats.deliveries == 2


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (client_frame(b"\x02\x91\xc1", Opcode.BINARY), "malformed service message"),
        (client_frame(b"hello", Opcode.TEXT), "the service protocol is binary"),
    ],
)
async def test_a_broken_message_closes_the_connection_and_tells_its_clients_to_reconnect(
        data, says):
    wired = WiredServer().opened()
    session, transport = wired.bound_client()
    wired.received()
    wired.conn.receive(data, 2.0)
    error, close = wired.received()
    assert isinstance(error, ServiceErrorMessage) and says in error.error_message
    assert close == ("close", 1000)
    assert wired.ops.servers_of(HUB) == []
    assert transport.take() == [{
        "type": 7, "error": "The app server connection of this client was closed; reconnect.",
        "allowReconnect": True}]


async def test_while_the_relay_drains_a_failing_connection_goes_away_without_an_error():
    wired = WiredServer().opened()
    wired.ops.draining = True
    wired.conn.fail("The relay is shutting down.")
    assert wired.received() == [("close", 1001)]


async def test_the_connections_timers_run_at_the_times_given():
    slow = WiredServer(handshake_timeout=15)
    slow.conn.tick(15.0)
    assert slow.received() == []
    slow.conn.tick(15.5)
    error, close = slow.received()
    assert "did not arrive in time" in error.error_message
    wired = WiredServer(server_keep_alive_interval=5, server_timeout=30).opened()
    wired.conn.last_send = 1.0
    wired.conn.tick(5.9)
    assert wired.received() == []
    wired.conn.tick(6.0)
    (ping,) = wired.received()
    assert ping.get(PingKey.CLIENT_COUNT) == "0"
    wired.conn.tick(31.5)  # 30 s since the app server last sent (at 1 s)
    error, close = wired.received()
    assert "sent nothing for 30 seconds" in error.error_message


async def test_an_app_server_that_stops_reading_is_closed_with_what_was_dropped():
    wired = WiredServer(server_send_buffer_limit=300).opened()
    session, transport = wired.bound_client()
    wired.received()
    transport.deliver("x" * 200)
    transport.deliver("y" * 200)  # past the limit: the backlog goes, the error goes out
    error, close = wired.received()
    assert "the app server did not read" in error.error_message
    assert close == ("close", 1008)
    assert wired.ops.stats.server_slow_closes == 1
    assert transport.take()[0]["allowReconnect"] is True


async def test_a_client_of_a_failed_connection_fails_its_pending_client_invocations():
    wired = WiredServer().opened()
    caller = FakeServer("pod2")
    wired.ops.server_opened(caller)
    session, transport = wired.bound_client()
    wired.ops.invocations.invoke(caller, ClientInvocationMessage("i1", "c1", "pod2",
                                                                 payloads("ask")))
    wired.conn.fail("gone")  # the client's own app server connection ends
    assert session.state is ConnState.CLOSING
    # The caller hears at once, not after ClientInvocations.TIMEOUT (10 minutes).
    assert caller.sent == [ErrorCompletionMessage("i1", "c1", "pod2",
                                                  "Connection 'c1' disconnected.")]


async def test_a_client_of_a_failed_connection_is_no_upstreams_disconnected_event():
    wired = WiredServer().opened()
    upstream = wired.ops.serverless = FakeUpstream()
    wired.bound_client()
    wired.conn.fail("gone")
    # The upstream never heard "connected" of a client an app server served.
    assert upstream.events == []


# -- over a real socket -------------------------------------------------------------------------


@pytest.fixture
async def relay(nursery):
    config = RelayConfig(port=0, access_keys=[KEY], close_timeout=1,
                         server_keep_alive_interval=0.3, admin_key=ADMIN_KEY)
    return await nursery.start(serve_relay, config)


class FakeAppServer:
    """One server connection of an app server: what the SDK would send, message by message."""

    def __init__(self, stream: trio.SocketStream, server_id: str) -> None:
        self.stream = stream
        self.server_id = server_id
        self.ws = WebSocketProtocol(Role.CLIENT, mask_key=lambda: os.urandom(4))
        self.parser = ServiceProtocolParser()
        self.inbox: list = []
        self.seen: list = []  # every message received, in order
        self.closed = False

    async def send(self, *messages) -> None:
        for message in messages:
            self.ws.send_binary(write_message(message))
        await self.stream.send_all(self.ws.data_to_send())

    async def next(self, kind=None, *, skip_pings=True):
        """The next message (of ``kind``, skipping others); pings are skipped unless asked for."""
        with trio.fail_after(5):
            while True:
                while self.inbox:
                    message = self.inbox.pop(0)
                    if skip_pings and isinstance(message, ServicePing) and kind is not ServicePing:
                        continue
                    if kind is None or isinstance(message, kind):
                        return message
                data = await self.stream.receive_some(65536)
                if not data:
                    self.closed = True
                    raise EOFError("the relay closed the server connection")
                self.ws.receive_data(data)
                for event in self.ws.events_received():
                    if isinstance(event, BinaryMessage):
                        self.parser.receive_data(event.data)
                        messages = self.parser.messages_received()
                        self.inbox.extend(messages)
                        self.seen.extend(messages)
                    elif isinstance(event, CloseReceived):
                        self.inbox.append(event)
                out = self.ws.data_to_send()
                if out:
                    await self.stream.send_all(out)

    async def aclose(self) -> None:
        await self.stream.aclose()


@pytest.fixture
async def app_server():
    opened: list[FakeAppServer] = []

    async def open_server(relay, hub="chat", *, server_id="pod1",
                          connection_type=ConnectionType.DEFAULT, key=KEY, handshake=True):
        token = generate_access_token(key, f"http://127.0.0.1/server/?hub={hub}",
                                      now=time.time(), user_id=server_id)
        stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
        await stream.send_all(
            (f"GET /server/?hub={hub}&cid={os.urandom(4).hex()} HTTP/1.1\r\n"
             f"Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             f"Authorization: Bearer {token}\r\nX-ASRS-Server-Id: {server_id}\r\n"
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
             ).encode())
        head = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in head:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                head += chunk
        status = int(head.split(b" ", 2)[1])
        if status != 101:
            await stream.aclose()
            return status, head.split(b"\r\n\r\n", 1)[1]
        server = FakeAppServer(stream, server_id)
        opened.append(server)
        rest = head.split(b"\r\n\r\n", 1)[1]
        if rest:
            server.ws.receive_data(rest)
        if handshake:
            await server.send(ServiceHandshakeRequest(connection_type=connection_type))
            response = await server.next(ServiceHandshakeResponse)
            assert response.succeeded, response
        return server

    yield open_server
    for server in opened:
        await server.aclose()


@pytest.fixture
async def raw_client(nursery):
    """A client whose handshake the test drives (through an app server)."""
    opened = []

    async def connect(relay, hub="chat", user=None):
        url = (f"ws://127.0.0.1:{relay.port}/client/?hub={hub}"
               f"&access_token={client_token(hub, user)}")
        ws = await connect_websocket_url(nursery, url)
        opened.append(ws)
        return ws

    yield connect
    for ws in opened:
        with trio.move_on_after(1):
            await ws.aclose()
        await ws._stream.aclose()


async def bind_client(relay, server, raw_client, user=None, *, protocol="json"):
    """Connect a client, let the fake server accept its handshake; return (client, conn id)."""
    ws = await raw_client(relay, user=user)
    await ws.send_message(json.dumps({"protocol": protocol, "version": 1}) + RS)
    opened = await server.next(OpenConnectionMessage)
    data = await server.next(ConnectionDataMessage)
    assert data.connection_id == opened.connection_id
    assert json.loads(data.payload.rstrip(b"\x1e")) == {"protocol": protocol, "version": 1}
    await server.send(ConnectionDataMessage(opened.connection_id, HANDSHAKE_OK))
    with trio.fail_after(5):
        reply = await ws.get_message()
    assert reply in ("{}" + RS, HANDSHAKE_OK)
    await wait_for(lambda: relay.table.get("chat") is not None
                   and opened.connection_id in relay.table.get("chat").connections)
    return Client(ws), opened


def payloads(target, *args):
    return {"json": JSON.write_invocation(target, list(args)),
            "messagepack": MessagePackHubProtocol().write_invocation(target, list(args))}


# -- handshake and pings -------------------------------------------------------------------


async def test_server_handshake_is_answered_then_pinged_with_metrics(relay, app_server):
    server = await app_server(relay)
    ping = await server.next(ServicePing, skip_pings=False)
    assert ping.get(PingKey.CLIENT_COUNT) == "0"
    assert ping.get(PingKey.SERVER_COUNT) == "1"


async def test_server_with_wrong_key_is_refused_with_401(relay, app_server):
    status, body = await app_server(relay, key="wrong-key")
    assert status == 401
    assert json.loads(body)["code"] == "Unauthorized.bad_signature"
    assert relay.servers_of("chat") == []


async def test_server_handshake_with_unsupported_version_gets_an_error(relay, app_server):
    server = await app_server(relay, handshake=False)
    await server.send(ServiceHandshakeRequest(version=2))
    response = await server.next(ServiceHandshakeResponse)
    assert not response.succeeded and "version 2" in response.error_message
    assert relay.servers_of("chat") == []


async def test_status_servers_and_shutdown_pings_are_answered(relay, app_server):
    a = await app_server(relay, server_id="pod-b")
    await app_server(relay, server_id="pod-a")
    await a.send(ServicePing.of(status="1"))
    reply = await a.next(ServicePing, skip_pings=False)
    while reply.get(PingKey.STATUS) is None:
        reply = await a.next(ServicePing, skip_pings=False)
    assert reply.get(PingKey.STATUS) == "0" and reply.get(PingKey.SERVER_COUNT) == "2"
    await a.send(ServicePing.of(servers=""))
    reply = await a.next(ServicePing, skip_pings=False)
    while reply.get(PingKey.SERVERS) is None:
        reply = await a.next(ServicePing, skip_pings=False)
    assert reply.get(PingKey.SERVERS).split(":", 1)[1] == "pod-a;pod-b"
    await a.send(ServicePing.of(shutdown="fin:0"))
    reply = await a.next(ServicePing, skip_pings=False)
    while reply.get(PingKey.SHUTDOWN) is None:
        reply = await a.next(ServicePing, skip_pings=False)
    assert reply.get(PingKey.SHUTDOWN) == "finack"
    assert not any(s.carries_clients for s in relay.servers_of("chat") if s.server_id == "pod-b")


# -- clients through an app server -------------------------------------------------------------


async def test_client_is_opened_on_the_server_and_bytes_flow_both_ways(relay, app_server,
                                                                        raw_client):
    server = await app_server(relay)
    client, opened = await bind_client(relay, server, raw_client, user="alice")
    assert opened.claims["asrs.s.uid"] == "alice"
    assert "exp" not in opened.claims and "aud" not in opened.claims
    assert opened.protocol == "json"
    assert "authorization" not in {k.lower() for k in opened.headers}
    invocation = '{"type":1,"invocationId":"0","target":"Echo","arguments":["hi"]}' + RS
    await client.ws.send_message(invocation)
    data = await server.next(ConnectionDataMessage)
    assert data.payload == invocation.encode()
    completion = b'{"type":3,"invocationId":"0","result":"hi"}\x1e'
    await server.send(ConnectionDataMessage(opened.connection_id, completion))
    with trio.fail_after(5):
        assert await client.next_message() == {"type": 3, "invocationId": "0", "result": "hi"}


async def test_client_disconnect_sends_close_connection_to_its_server(relay, app_server,
                                                                       raw_client):
    server = await app_server(relay)
    client, opened = await bind_client(relay, server, raw_client)
    await client.ws.aclose()
    closed = await server.next(CloseConnectionMessage)
    assert closed.connection_id == opened.connection_id


async def test_server_close_connection_closes_the_client(relay, app_server, raw_client):
    server = await app_server(relay)
    client, opened = await bind_client(relay, server, raw_client)
    await server.send(ConnectionDataMessage(opened.connection_id, b'{"type":7}\x1e'),
                      CloseConnectionMessage(opened.connection_id, ""))
    with trio.fail_after(5):
        assert await client.next_message() == {"type": 7}
    with pytest.raises(ConnectionClosed), trio.fail_after(5):
        await client.ws.get_message()


async def test_fan_out_messages_reach_exactly_their_targets(relay, app_server, raw_client):
    server = await app_server(relay)
    alice, a = await bind_client(relay, server, raw_client, user="alice")
    bob, b = await bind_client(relay, server, raw_client, user="bob")
    await server.send(BroadcastDataMessage(payloads("all"), (b.connection_id,)))
    await server.send(UserDataMessage("bob", payloads("user")))
    await server.send(MultiConnectionDataMessage((a.connection_id,), payloads("conn")))
    await server.send(JoinGroupWithAckMessage(b.connection_id, "g", 7))
    ack = await server.next(ServiceAckMessage)
    assert (ack.ack_id, ack.status) == (7, AckStatus.OK)
    await server.send(GroupBroadcastDataMessage("g", payloads("group")))
    with trio.fail_after(5):
        assert (await alice.next_message())["target"] == "all"
        assert (await alice.next_message())["target"] == "conn"
        assert (await bob.next_message())["target"] == "user"
        assert (await bob.next_message())["target"] == "group"


async def test_user_data_reaches_each_connection_of_the_user_in_its_own_protocol(
        relay, app_server, raw_client):
    # The relay's UserData shortcut (the SDK's payload map, no ext hints) against the full
    # reader (a tracing id): the same deliveries, each client getting its protocol's entry in
    # its protocol's frame type, nothing to other users, a protocol missing from the map
    # skipped, and the relay's delivery count kept.
    server = await app_server(relay)
    text, _ = await bind_client(relay, server, raw_client, user="bob")
    binary, _ = await bind_client(relay, server, raw_client, user="bob", protocol="messagepack")
    other, _ = await bind_client(relay, server, raw_client, user="carol")
    mp = MessagePackHubProtocol()

    async def next_binary():
        while True:
            data = await binary.ws.get_message()
            assert isinstance(data, bytes)  # MessagePack travels in binary frames
            found = [m for m in mp.parse(data)[0] if isinstance(m, InvocationMessage)]
            if found:
                return found[0]

    before = relay.stats.deliveries
    await server.send(UserDataMessage("bob", payloads("plain", 1)),
                      UserDataMessage("bob", payloads("traced", 2), tracing_id=9),
                      UserDataMessage("bob", {"json": JSON.write_invocation("json only", [])}),
                      UserDataMessage("nobody", payloads("lost")),
                      UserDataMessage("carol", payloads("carol")))
    with trio.fail_after(5):
        assert (await text.next_message())["target"] == "plain"
        assert (await text.next_message())["target"] == "traced"
        assert (await text.next_message())["target"] == "json only"
        first, second = await next_binary(), await next_binary()
        assert (first.target, list(first.arguments)) == ("plain", [1])
        assert (second.target, list(second.arguments)) == ("traced", [2])
        assert (await other.next_message())["target"] == "carol"
    await wait_for(lambda: relay.stats.deliveries - before == 6)
    await server.send(UserDataMessage("bob", payloads("last")))
    with trio.fail_after(5):
        assert (await next_binary()).target == "last"  # nothing else was queued before it


async def test_acked_operations_answer_not_found_for_unknown_targets(relay, app_server):
    server = await app_server(relay)
    await server.send(JoinGroupWithAckMessage("nope", "g", 1),
                      CheckConnectionExistenceWithAckMessage("nope", 2),
                      UserJoinGroupWithAckMessage("carol", "g", 3, ttl=60),
                      CheckUserInGroupWithAckMessage("carol", "g", 4))
    acks = [await server.next(ServiceAckMessage) for _ in range(4)]
    assert [(a.ack_id, a.status) for a in acks] == [
        (1, AckStatus.NOT_FOUND), (2, AckStatus.NOT_FOUND), (3, AckStatus.OK),
        (4, AckStatus.OK)]


async def test_join_without_ack_for_unknown_connection_gets_a_service_event(relay, app_server):
    server = await app_server(relay)
    await server.send(JoinGroupMessage("ghost", "g"))
    event = await server.next(ServiceEventMessage)
    assert (event.object_type, event.id, event.kind) == (1, "ghost", 2)


async def test_weak_connections_never_get_clients(relay, app_server, connect):
    server = await app_server(relay, connection_type=ConnectionType.WEAK)
    await connect(relay)  # answered by the relay itself (service_mode auto)
    assert relay.choose_server("chat") is None
    await server.send(ServicePing.of(status="1"))
    reply = await server.next(ServicePing, skip_pings=False)
    while reply.get(PingKey.STATUS) is None:
        reply = await server.next(ServicePing, skip_pings=False)
    assert reply.get(PingKey.CLIENT_COUNT) == "1"
    assert not any(isinstance(m, OpenConnectionMessage) for m in server.seen)


async def test_default_mode_without_app_server_refuses_the_handshake(nursery, raw_client):
    relay = await nursery.start(serve_relay, RelayConfig(port=0, access_keys=[KEY],
                                                         service_mode="default"))
    ws = await raw_client(relay)
    await ws.send_message('{"protocol":"json","version":1}' + RS)
    with trio.fail_after(5):
        reply = json.loads((await ws.get_message()).rstrip(RS))
    assert reply == {"error": "No app server is connected to hub 'chat'."}


async def test_clients_are_spread_over_app_servers(relay, app_server, raw_client):
    pod1 = await app_server(relay, server_id="pod1")
    pod2 = await app_server(relay, server_id="pod2")
    for _ in range(4):
        ws = await raw_client(relay)
        await ws.send_message('{"protocol":"json","version":1}' + RS)
    await wait_for(lambda: sum(len(s.clients) for s in relay.servers_of("chat")) == 4)
    counts = sorted(len(s.clients) for s in relay.servers_of("chat"))
    assert counts == [2, 2]
    assert pod1 and pod2


async def test_dropped_server_connection_closes_its_clients_with_allow_reconnect(
        relay, app_server, raw_client):
    server = await app_server(relay)
    client, _ = await bind_client(relay, server, raw_client)
    await server.aclose()
    with trio.fail_after(5):
        message = await client.next_message()
    assert message["type"] == 7 and message["allowReconnect"] is True


async def test_malformed_service_message_closes_only_that_connection(relay, app_server,
                                                                     raw_client):
    bad = await app_server(relay, server_id="bad")
    good = await app_server(relay, server_id="good")
    bad_client, _ = await bind_client(relay, bad, raw_client, user="u1")
    good_client, g = await bind_client(relay, good, raw_client, user="u2")
    bad.ws.send_binary(b"\x03\x93\x06\xc1\xc1")  # type 6 (ConnectionData) with garbage fields
    await bad.stream.send_all(bad.ws.data_to_send())
    error = await bad.next(ServiceErrorMessage)
    assert "ConnectionData" in error.error_message or "malformed" in error.error_message
    with trio.fail_after(5):
        message = await bad_client.next_message()
    assert message["type"] == 7 and message["allowReconnect"] is True
    await good.send(MultiConnectionDataMessage((g.connection_id,), payloads("still")))
    with trio.fail_after(5):
        assert (await good_client.next_message())["target"] == "still"


async def test_client_invocation_result_goes_back_to_the_caller_server(relay, app_server,
                                                                       raw_client):
    owner = await app_server(relay, server_id="owner")
    client, opened = await bind_client(relay, owner, raw_client)
    caller = await app_server(relay, server_id="caller")
    invocation = ClientInvocationMessage(
        "inv1", opened.connection_id, "caller",
        {"json": b'{"type":1,"invocationId":"inv1","target":"ask","arguments":[]}\x1e'})
    await caller.send(invocation)
    with trio.fail_after(5):
        assert (await client.next_message())["invocationId"] == "inv1"
    forwarded = await owner.next(ClientInvocationMessage)
    assert forwarded.invocation_id == "inv1"
    await owner.send(ClientCompletionMessage("inv1", opened.connection_id, "caller", "json",
                                             b'{"type":3,"invocationId":"inv1","result":42}\x1e'))
    completion = await caller.next(ClientCompletionMessage)
    assert completion.invocation_id == "inv1"


async def test_client_leaving_fails_its_pending_invocations(relay, app_server, raw_client):
    owner = await app_server(relay, server_id="owner")
    client, opened = await bind_client(relay, owner, raw_client)
    caller = await app_server(relay, server_id="caller")
    await caller.send(ClientInvocationMessage(
        "inv2", opened.connection_id, "caller",
        {"json": b'{"type":1,"invocationId":"inv2","target":"ask","arguments":[]}\x1e'}))
    await owner.next(ClientInvocationMessage)
    await client.ws.aclose()
    error = await caller.next(ErrorCompletionMessage)
    assert error.invocation_id == "inv2" and "disconnected" in error.error



async def test_oversized_client_message_closes_the_client_with_the_reason(nursery, app_server,
                                                                        raw_client):
    relay = await nursery.start(serve_relay, RelayConfig(port=0, access_keys=[KEY],
                                                         max_message_size=1000, close_timeout=1))
    server = await app_server(relay)
    client, opened = await bind_client(relay, server, raw_client)
    await client.ws.send_message("x" * 2000)
    with trio.fail_after(5):
        message = await client.next_message()
    assert message["type"] == 7 and "1000" in message["error"]
    with pytest.raises(ConnectionClosed) as info, trio.fail_after(5):
        await client.ws.get_message()
    assert info.value.reason.code == 1009
    closed = await server.next(CloseConnectionMessage)
    assert closed.connection_id == opened.connection_id


async def test_fault_injection_refuses_drops_silences_and_heals(relay, app_server, raw_client):
    import httpx

    server = await app_server(relay)
    client, _ = await bind_client(relay, server, raw_client)

    async def set_fault(mode):
        path = "/api/admin/faults"
        async with httpx.AsyncClient() as http:
            r = await http.put(f"http://127.0.0.1:{relay.port}{path}",
                               params={"serverConnections": mode},
                               headers={"Authorization": f"Bearer {admin_token(path)}"})
        assert r.status_code == 200 and r.json() == {"serverConnections": mode}

    await set_fault("drop")
    with trio.fail_after(5):
        message = await client.next_message()
    assert message["type"] == 7 and message["allowReconnect"] is True
    with pytest.raises(EOFError):
        await server.next(ServiceHandshakeResponse)
    status, body = await app_server(relay, server_id="again")
    assert status == 503 and b"fault injection" in body
    await set_fault("none")
    healed = await app_server(relay, server_id="healed")
    await set_fault("silence")
    await healed.send(ServicePing.of(status="1"))
    with pytest.raises(trio.TooSlowError), trio.fail_after(1):
        while (await healed.next(ServicePing, skip_pings=False)).get(PingKey.STATUS) is None:
            pass  # pings queued before the fault may still arrive; a status reply must not
    await set_fault("none")


async def test_status_says_whether_the_hub_has_clients_whichever_server_holds_them(
        relay, app_server, raw_client):
    holder = await app_server(relay, server_id="holder")
    other = await app_server(relay, server_id="other", connection_type=ConnectionType.WEAK)

    async def status(server):
        await server.send(ServicePing.of(status="1"))
        reply = await server.next(ServicePing, skip_pings=False)
        while reply.get(PingKey.STATUS) is None:
            reply = await server.next(ServicePing, skip_pings=False)
        return reply.get(PingKey.STATUS)

    assert await status(other) == "0"
    client, _ = await bind_client(relay, holder, raw_client)
    # An app server removing this endpoint keeps sending until no client could miss it.
    assert await status(other) == "1"
    await client.ws.aclose()
    await holder.next(CloseConnectionMessage)
    assert await status(other) == "0"


# -- OpenConnection: the query as it arrived, X-Forwarded-For, repeated claims (issue 14) -------


async def open_custom_client(nursery, relay, query, *, token, headers=()):
    """A client connecting with ``query`` as written (the token is appended as
    ``access_token``) and ``headers``; its handshake is left to the test."""
    url = f"ws://127.0.0.1:{relay.port}/client/?{query}&access_token={token}"
    return await connect_websocket_url(nursery, url, extra_headers=list(headers))


async def test_open_connection_forwards_the_raw_query_without_the_token(
        relay, app_server, nursery):
    server = await app_server(relay)
    ws = await open_custom_client(
        nursery, relay, "hub=chat&room=blue%26green&name=a+b%20c&flag&x=%E2%82%AC",
        token=client_token("chat", "alice"))
    await ws.send_message('{"protocol":"json","version":1}' + RS)
    opened = await server.next(OpenConnectionMessage)
    assert opened.query_string == "?hub=chat&room=blue%26green&name=a+b%20c&flag&x=%E2%82%AC"
    await ws.aclose()


async def test_open_connection_query_keeps_the_negotiated_id_as_azure_forwards_it(
        relay, app_server, nursery):
    import httpx

    server = await app_server(relay)
    token = client_token("chat", "alice")
    async with httpx.AsyncClient() as http:
        negotiated = (await http.post(
            f"http://127.0.0.1:{relay.port}/client/negotiate?hub=chat&negotiateVersion=1",
            headers={"Authorization": f"Bearer {token}"})).json()
    connection_token = negotiated["connectionToken"]
    ws = await open_custom_client(
        nursery, relay, f"hub=chat&id={connection_token}&room=blue%26green", token=token)
    await ws.send_message('{"protocol":"json","version":1}' + RS)
    opened = await server.next(OpenConnectionMessage)
    assert opened.query_string == f"?hub=chat&id={connection_token}&room=blue%26green"
    assert opened.connection_id == negotiated["connectionId"]
    await ws.aclose()


async def test_open_connection_headers_carry_x_forwarded_for_with_the_client_address(
        relay, app_server, nursery):
    from relaycore.protocol import header_for

    server = await app_server(relay)
    direct = await open_custom_client(nursery, relay, "hub=chat",
                                      token=client_token("chat", "alice"))
    await direct.send_message('{"protocol":"json","version":1}' + RS)
    opened = await server.next(OpenConnectionMessage)
    assert header_for(opened.headers, "X-Forwarded-For") == ("127.0.0.1",)
    proxied = await open_custom_client(
        nursery, relay, "hub=chat", token=client_token("chat", "bob"),
        headers=[(b"X-Forwarded-For", b"203.0.113.7")])
    await proxied.send_message('{"protocol":"json","version":1}' + RS)
    opened = await server.next(OpenConnectionMessage)
    assert header_for(opened.headers, "X-Forwarded-For") == ("203.0.113.7, 127.0.0.1",)
    await direct.aclose()
    await proxied.aclose()


async def test_open_connection_claims_carry_every_value_of_a_repeated_claim(
        relay, app_server, nursery):
    server = await app_server(relay)
    token = generate_access_token(KEY, "http://127.0.0.1/client/?hub=chat", now=time.time(),
                                  user_id="alice",
                                  claims={"role": ["admin", "editor"], "team": ["blue"]})
    ws = await open_custom_client(nursery, relay, "hub=chat", token=token)
    await ws.send_message('{"protocol":"json","version":1}' + RS)
    opened = await server.next(OpenConnectionMessage)
    assert opened.claims["role"] == ("admin", "editor")
    assert opened.claims["team"] == "blue"
    assert opened.claims["asrs.s.uid"] == "alice"
    await ws.aclose()


# -- a user's group membership with a TTL ends for its current connections (issue 14) ---------


async def rest_call(relay, method, path, *, params=None):
    import httpx

    from relayhelpers import rest_token

    async with httpx.AsyncClient() as http:
        return await http.request(
            method, f"http://127.0.0.1:{relay.port}{path}",
            params={"api-version": "2022-06-01", **(params or {})},
            headers={"Authorization": f"Bearer {rest_token(path)}"})


def group_members(relay, group):
    shard = relay.table.get("chat")
    return set(shard.groups.get(group, {})) if shard is not None else set()


async def test_user_group_ttl_over_rest_removes_the_users_current_connection_from_the_group(
        relay, app_server, raw_client):
    server = await app_server(relay)
    carol, c = await bind_client(relay, server, raw_client, user="carol")
    response = await rest_call(relay, "PUT", "/api/hubs/chat/groups/g/users/carol",
                               params={"ttl": "1"})
    assert response.status_code == 200
    assert group_members(relay, "g") == {c.connection_id}
    assert (await rest_call(relay, "HEAD", "/api/hubs/chat/groups/g")).status_code == 200
    await wait_for(lambda: not group_members(relay, "g"), timeout=5)
    assert (await rest_call(relay, "HEAD", "/api/hubs/chat/groups/g")).status_code == 404
    await server.send(GroupBroadcastDataMessage("g", payloads("group")),
                      MultiConnectionDataMessage((c.connection_id,), payloads("marker")))
    with trio.fail_after(5):
        assert (await carol.next_message())["target"] == "marker"  # the group send reached no one


async def test_user_group_ttl_over_the_service_protocol_keeps_direct_members(
        relay, app_server, raw_client):
    server = await app_server(relay)
    carol, c = await bind_client(relay, server, raw_client, user="carol")
    bob, b = await bind_client(relay, server, raw_client, user="bob")
    await server.send(JoinGroupWithAckMessage(b.connection_id, "g", 1),
                      UserJoinGroupWithAckMessage("carol", "g", 2, ttl=1))
    acks = [await server.next(ServiceAckMessage) for _ in range(2)]
    assert [(a.ack_id, a.status) for a in acks] == [(1, AckStatus.OK), (2, AckStatus.OK)]
    assert group_members(relay, "g") == {b.connection_id, c.connection_id}
    await wait_for(lambda: group_members(relay, "g") == {b.connection_id}, timeout=5)
    await server.send(GroupBroadcastDataMessage("g", payloads("group")),
                      MultiConnectionDataMessage((c.connection_id,), payloads("marker")))
    with trio.fail_after(5):
        assert (await bob.next_message())["target"] == "group"
        assert (await carol.next_message())["target"] == "marker"


async def test_an_app_server_that_stops_reading_is_closed_and_its_clients_told_to_reconnect(
        nursery, app_server, raw_client):
    config = RelayConfig(port=0, access_keys=[KEY], close_timeout=1,
                         server_send_buffer_limit=256 << 10)
    relay = await nursery.start(serve_relay, config)
    server = await app_server(relay)
    client, opened = await bind_client(relay, server, raw_client, user="alice")
    # From here the app server reads nothing: the client's messages pile up on the relay.
    message = json.dumps({"type": 1, "target": "Echo", "arguments": ["x" * 8000]}) + RS
    with trio.fail_after(20):
        while not relay.stats.server_slow_closes:
            await client.ws.send_message(message)
    assert relay.stats.server_dropped_bytes > 128 << 10  # most of the limit's worth
    assert relay.servers_of("chat") == []
    with trio.fail_after(5):
        closing = await client.next_message()
    assert closing["type"] == 7 and closing["allowReconnect"] is True


async def test_client_invocations_past_the_limit_fail_at_once_and_the_rest_still_complete(
        nursery, app_server, raw_client):
    relay = await nursery.start(serve_relay, RelayConfig(port=0, access_keys=[KEY],
                                                         max_pending_invocations=3))
    server = await app_server(relay)
    client, opened = await bind_client(relay, server, raw_client)
    for n in range(5):
        await server.send(ClientInvocationMessage(
            f"inv{n}", opened.connection_id, "pod1",
            {"json": f'{{"type":1,"invocationId":"inv{n}","target":"ask","arguments":[]}}\x1e'
             .encode()}))
    refused = [await server.next(ErrorCompletionMessage) for _ in range(2)]
    assert [m.invocation_id for m in refused] == ["inv3", "inv4"]
    assert "3 client invocations waiting" in refused[0].error
    assert relay.stats.invocations_refused == 2
    # Answered ones make room again.
    await server.send(ClientCompletionMessage("inv0", opened.connection_id, "pod1", "json",
                                              b'{"type":3,"invocationId":"inv0","result":1}\x1e'))
    await wait_for(lambda: len(relay.invocations.pending) == 2)
    await server.send(ClientInvocationMessage(
        "inv5", opened.connection_id, "pod1",
        {"json": b'{"type":1,"invocationId":"inv5","target":"ask","arguments":[]}\x1e'}))
    await wait_for(lambda: "inv5" in relay.invocations.pending)
