"""HubServer against a fake service: server connections, the logical-client flow, routing,
acks, reconnects and shutdown. Every test runs under asyncio and under trio."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from sdkhelpers import BACKENDS, RS, FakeService, run, wait_for

from relaycore.protocol import (
    AckStatus,
    BroadcastDataMessage,
    ClientCompletionMessage,
    ClientInvocationMessage,
    CloseConnectionMessage,
    ConnectionDataMessage,
    ConnectionType,
    ErrorCompletionMessage,
    GroupBroadcastDataMessage,
    JoinGroupWithAckMessage,
    LeaveGroupWithAckMessage,
    MessagePackHubProtocol,
    MultiConnectionDataMessage,
    MultiGroupBroadcastDataMessage,
    MultiUserDataMessage,
    OpenConnectionMessage,
    ServiceErrorMessage,
    ServicePing,
    UserDataMessage,
    UserJoinGroupWithAckMessage,
    UserLeaveGroupWithAckMessage,
)
from relaycore.sdk import (
    AckTimeoutError,
    EndpointType,
    Hub,
    HubException,
    HubServer,
    ServiceEndpoint,
    ServiceOptions,
    ServiceUnavailableError,
    hub_method,
)

HANDSHAKE = b'{"protocol":"json","version":1}' + RS

events: list[Any] = []


class Chat(Hub):
    async def add(self, a, b):
        return a + b

    async def whoami(self):
        return {"id": self.context.connection_id, "user": self.context.user_id,
                "claims": dict(self.context.claims), "protocol": self.context.protocol}

    async def fail(self):
        raise ValueError("secret detail")

    async def refuse(self):
        raise HubException("not allowed")

    async def join(self, group):
        await self.groups.add_to_group(self.context.connection_id, group)
        await self.clients.group(group).send("joined", self.context.connection_id)

    async def remember(self, value):
        self.context.items["value"] = value

    async def recall(self):
        return self.context.items.get("value")

    async def sleep_then(self, seconds, value):
        await anyio.sleep(seconds)
        return value

    async def ask_caller(self, question):
        return await self.clients.caller.invoke("answer", question, timeout=5)

    async def leave(self):
        self.context.abort()
        return "bye"

    async def count(self, n):
        for i in range(n):
            yield i

    @hub_method("Shout")
    async def _shout(self, text):
        return text.upper()

    async def on_connected(self):
        events.append(("connected", self.context.connection_id))

    async def on_disconnected(self, error):
        events.append(("disconnected", self.context.connection_id, error))


def options(service: FakeService, **overrides: Any) -> ServiceOptions:
    settings: dict[str, Any] = dict(connection_string=service.connection_string,
                                    connection_count=1, retry_delay=lambda n: 0.05)
    settings.update(overrides)
    return ServiceOptions(**settings)


def records(payload: bytes) -> list[dict]:
    return [json.loads(r) for r in payload.split(RS) if r]


async def open_client(conn, connection_id="c1", claims=None, handshake=HANDSHAKE, **kw):
    await conn.send(OpenConnectionMessage(connection_id, claims or {"asrs.s.uid": "alice"},
                                          protocol="json", **kw))
    await conn.send(ConnectionDataMessage(connection_id, handshake))
    return await conn.client_data(connection_id)


async def invoke(conn, target, *args, invocation_id="1", connection_id="c1"):
    message = {"type": 1, "target": target, "arguments": list(args)}
    if invocation_id is not None:
        message["invocationId"] = invocation_id
    await conn.send(ConnectionDataMessage(connection_id, json.dumps(message).encode() + RS))
    if invocation_id is None:
        return None
    while True:
        for record in records(await conn.client_data(connection_id)):
            if record.get("invocationId") == invocation_id and record["type"] == 3:
                return record


async def serving(scenario, **overrides):
    """Run ``scenario(service, server)`` with one fake service and a HubServer on it."""
    async with anyio.create_task_group() as tg:
        service = await FakeService().start(tg)
        server = HubServer(options(service, **overrides))
        server.map_hub("chat", Chat)
        async with server:
            await scenario(service, server)
        tg.cancel_scope.cancel()


@pytest.fixture(autouse=True)
def _clear_events():
    events.clear()


# --- server connections ------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_server_opens_connection_count_connections_with_signed_token_and_headers(backend):
    async def scenario(service, server):
        conns = await service.wait_connections(3)
        cids = {c.query["cid"] for c in conns}
        assert len(cids) == 3
        for conn in conns:
            assert conn.query["hub"] == "shop_chat"
            assert conn.claims["nameid"] == server.server_id
            assert conn.headers["x-asrs-server-id"] == server.server_id
            assert conn.headers["asrs-user-agent"].startswith("relaycore-sdk/")
            assert conn.handshake.version == 1
            assert conn.handshake.connection_type == ConnectionType.DEFAULT

    run(backend, lambda: serving(scenario, connection_count=3, application_name="Shop"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_server_exit_sends_shutdown_fin_and_waits_for_finack(backend):
    async def scenario():
        async with anyio.create_task_group() as tg:
            service = await FakeService().start(tg)
            server = HubServer(options(service, connection_count=2))
            server.map_hub("chat", Chat)
            async with server:
                conns = await service.wait_connections(2)
            assert service.fins == ["fin:0", "fin:0"]
            for conn in conns:
                with anyio.fail_after(5):
                    await conn.closed.wait()
            tg.cancel_scope.cancel()

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_server_runs_once_and_needs_a_hub(backend):
    async def scenario():
        async with anyio.create_task_group() as tg:
            service = await FakeService().start(tg)
            server = HubServer(options(service))
            with pytest.raises(RuntimeError, match="no hub is mapped"):
                await server.__aenter__()
            server.map_hub("chat", Chat)
            async with server:
                with pytest.raises(RuntimeError, match="before entering"):
                    server.map_hub("other", Chat)
            with pytest.raises(RuntimeError, match="runs once"):
                await server.__aenter__()
            tg.cancel_scope.cancel()

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_server_exit_without_finack_gives_up_after_shutdown_timeout(backend):
    async def scenario():
        async with anyio.create_task_group() as tg:
            service = await FakeService().start(tg)
            service.answer_fin = False
            server = HubServer(options(service, shutdown_timeout=0.2))
            server.map_hub("chat", Chat)
            async with server:
                await service.wait_connections(1)
            start = anyio.current_time()
            assert service.connections[0].received[-1] == ServicePing.of(shutdown="fin:0") \
                or any(isinstance(m, ServicePing) and m.get("shutdown") == "fin:0"
                       for m in service.connections[0].received)
            assert anyio.current_time() - start < 1
            tg.cancel_scope.cancel()

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_server_reconnects_with_backoff_when_service_drops_the_socket(backend):
    delays: list[int] = []

    def retry_delay(failures: int) -> float:
        delays.append(failures)
        return 0.01

    async def scenario(service, server):
        first = (await service.wait_connections(1))[0]
        await first.drop()
        second = (await service.wait_connections(2))[1]
        assert second.query["cid"] != first.query["cid"]
        assert delays == [0]
        await wait_for(lambda: server.online_endpoints("chat") != [])

    run(backend, lambda: serving(scenario, retry_delay=retry_delay))


@pytest.mark.parametrize("backend", BACKENDS)
def test_server_backoff_grows_with_consecutive_failures_and_resets_on_success(backend):
    delays: list[int] = []

    def retry_delay(failures: int) -> float:
        delays.append(failures)
        return 0.01

    async def scenario():
        async with anyio.create_task_group() as tg:
            service = await FakeService().start(tg)
            service.handshake_error = "go away"
            server = HubServer(options(service, retry_delay=retry_delay))
            server.map_hub("chat", Chat)
            async with server:
                await wait_for(lambda: len(delays) >= 3)
                service.handshake_error = None
                conn = (await service.wait_connections(1))[0]
                await conn.drop()
                await service.wait_connections(2)
                assert delays[:3] == [0, 1, 2]
                assert delays[-1] == 0
            tg.cancel_scope.cancel()

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_server_with_refused_upgrade_keeps_retrying_and_is_not_online(backend):
    async def scenario():
        async with anyio.create_task_group() as tg:
            service = await FakeService().start(tg)
            service.reject_status = 401
            server = HubServer(options(service))
            server.map_hub("chat", Chat)
            async with server:
                await wait_for(lambda: len(service.attempts) >= 2)
                assert server.online_endpoints("chat") == []
                with pytest.raises(ServiceUnavailableError):
                    await server.negotiate("chat")
                with pytest.raises(ServiceUnavailableError):
                    await server.hub_context("chat").clients.all.send("x")
            tg.cancel_scope.cancel()

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_server_drops_a_silent_service_and_reconnects(backend):
    async def scenario(service, server):
        await service.wait_connections(2, timeout=5)

    run(backend, lambda: serving(scenario, service_timeout=0.3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_server_sends_status_pings(backend):
    async def scenario(service, server):
        conn = (await service.wait_connections(1))[0]
        status = await conn.next(ServicePing)
        while status.get("status") is None:
            status = await conn.next(ServicePing)
        assert status.get("status") == "1"
        container = server._dispatcher("chat").containers[0]
        await wait_for(lambda: container.has_clients is False and container.server_count == 1)

    run(backend, lambda: serving(scenario, status_interval=0.05))


@pytest.mark.parametrize("backend", BACKENDS)
def test_server_answers_what_it_receives_with_a_keep_alive_and_echoes(backend):
    async def scenario(service, server):
        conn = (await service.wait_connections(1))[0]
        # Let the keep-alive interval pass since the SDK's last send (its handshake); the
        # elapsed time is the condition here, not a stand-in for one.
        await anyio.sleep(0.06)
        await conn.send(ServicePing())
        ping = await conn.next(ServicePing)
        assert (ping.get("#clientInHub"), ping.get("#client")) == ("0", "0")
        await conn.send(ServicePing.of(echo="42"))
        echoed = await conn.next(ServicePing)
        while echoed.get("echo") is None:
            echoed = await conn.next(ServicePing)
        assert echoed.get("echo") == "42"

    run(backend, lambda: serving(scenario, keep_alive_interval=0.05))


@pytest.mark.parametrize("backend", BACKENDS)
def test_server_service_error_ends_the_session_and_reconnects(backend):
    async def scenario(service, server):
        conn = (await service.wait_connections(1))[0]
        await conn.send(ServiceErrorMessage("bad things"))
        await service.wait_connections(2)

    run(backend, lambda: serving(scenario))


@pytest.mark.parametrize("backend", BACKENDS)
def test_secondary_endpoint_gets_weak_connections(backend):
    async def scenario():
        async with anyio.create_task_group() as tg:
            primary = await FakeService().start(tg)
            secondary = await FakeService().start(tg)
            server = HubServer(ServiceOptions(
                connection_string=primary.connection_string, connection_count=1,
                endpoints=[ServiceEndpoint(secondary.connection_string, EndpointType.SECONDARY,
                                           "backup")]))
            server.map_hub("chat", Chat)
            async with server:
                (p,) = await primary.wait_connections(1)
                (s,) = await secondary.wait_connections(1)
                assert p.handshake.connection_type == ConnectionType.DEFAULT
                assert s.handshake.connection_type == ConnectionType.WEAK
                # negotiate prefers the primary; sends go to both
                for _ in range(5):
                    doc = await server.negotiate("chat")
                    assert doc["url"] == f"http://127.0.0.1:{primary.port}/client/?hub=chat"
                await server.hub_context("chat").clients.all.send("hi")
                assert isinstance(await p.next(BroadcastDataMessage), BroadcastDataMessage)
                assert isinstance(await s.next(BroadcastDataMessage), BroadcastDataMessage)
                await p.drop()
                primary.handshake_error = "down"
                await wait_for(lambda: len(server.online_endpoints("chat")) == 1)
                doc = await server.negotiate("chat")
                assert doc["url"] == f"http://127.0.0.1:{secondary.port}/client/?hub=chat"
            tg.cancel_scope.cancel()

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_server_reads_the_socket_as_a_byte_stream(backend):
    async def scenario(service, server):
        conn = (await service.wait_connections(1))[0]
        from relaycore.protocol import write_service_message
        opened = write_service_message(OpenConnectionMessage("c1", {}, protocol="json"))
        data = write_service_message(ConnectionDataMessage("c1", HANDSHAKE))
        both = opened + data
        # one frame split over three messages, then the rest glued to the next frame
        await conn.send_raw(both[:1], both[1:4], both[4:len(opened) + 2], both[len(opened) + 2:])
        assert await conn.client_data("c1") == b"{}" + RS

    run(backend, lambda: serving(scenario))


# --- the logical client ------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_client_handshake_invocation_and_completion(backend):
    async def scenario(service, server):
        conn = (await service.wait_connections(1))[0]
        assert await open_client(conn) == b"{}" + RS
        reply = await invoke(conn, "Add", 2, 3)
        assert reply == {"type": 3, "invocationId": "1", "result": 5}
        reply = await invoke(conn, "WhoAmI", invocation_id="2")
        assert reply["result"] == {"id": "c1", "user": "alice", "claims": {}, "protocol": "json"}
        assert ("connected", "c1") in events

    run(backend, lambda: serving(scenario))


@pytest.mark.parametrize("backend", BACKENDS)
def test_client_claims_are_cleaned_and_user_id_falls_back_to_nameid(backend):
    async def scenario(service, server):
        conn = (await service.wait_connections(1))[0]
        claims = {"nameid": "bob", "asrs.s.aut": "Bearer", "asrs.u.exp": "x", "role": "admin",
                  "exp": "1"}
        await open_client(conn, claims=claims)
        reply = await invoke(conn, "whoami")
        assert reply["result"]["user"] == "bob"
        assert reply["result"]["claims"] == {"nameid": "bob", "exp": "x", "role": "admin"}

    run(backend, lambda: serving(scenario))


@pytest.mark.parametrize("backend", BACKENDS)
def test_client_messagepack_protocol(backend):
    async def scenario(service, server):
        conn = (await service.wait_connections(1))[0]
        hs = b'{"protocol":"messagepack","version":1}' + RS
        assert await open_client(conn, handshake=hs) == b"{}" + RS
        mp = MessagePackHubProtocol()
        from relaycore.protocol import CompletionMessage, InvocationMessage
        await conn.send(ConnectionDataMessage(
            "c1", mp.write(InvocationMessage("add", [1, 2], invocation_id="7"))))
        messages, _ = mp.parse(await conn.client_data("c1"))
        assert messages == [CompletionMessage("7", result=3, has_result=True)]
        # a send to this local client goes in its protocol only, on its connection
        await server.hub_context("chat").clients.client("c1").send("note", b"\x00")
        sent = await conn.next(MultiConnectionDataMessage)
        assert set(sent.payloads) == {"messagepack"}

    run(backend, lambda: serving(scenario))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("handshake", "error"),
    [
        (b'{"protocol":"xml","version":1}' + RS, "The protocol 'xml' is not supported."),
        (b'{"protocol":"json","version":9}' + RS,
         "The server does not support version 9 of the 'json' protocol."),
        (b'{"protocol":"json"}' + RS, "Missing required property 'version'."),
    ],
)
def test_client_bad_handshake_gets_error_and_close(backend, handshake, error):
    async def scenario(service, server):
        conn = (await service.wait_connections(1))[0]
        reply = await open_client(conn, handshake=handshake)
        assert json.loads(reply.rstrip(RS))["error"].startswith(error)
        close = await conn.next(CloseConnectionMessage)
        assert close.connection_id == "c1" and close.error_message.startswith(error)
        assert events == []

    run(backend, lambda: serving(scenario))


@pytest.mark.parametrize("backend", BACKENDS)
def test_client_handshake_split_across_messages_and_followed_by_invocation(backend):
    async def scenario(service, server):
        conn = (await service.wait_connections(1))[0]
        await conn.send(OpenConnectionMessage("c1", {}, protocol="json"))
        invocation = b'{"type":1,"invocationId":"1","target":"add","arguments":[1,1]}' + RS
        await conn.send(ConnectionDataMessage("c1", HANDSHAKE[:5]))
        await conn.send(ConnectionDataMessage("c1", HANDSHAKE[5:] + invocation))
        data = await conn.client_data("c1")
        while data.count(RS) < 2:
            data += await conn.client_data("c1")
        assert data.startswith(b"{}" + RS)
        assert records(data[3:]) == [{"type": 3, "invocationId": "1", "result": 2}]

    run(backend, lambda: serving(scenario))


@pytest.mark.parametrize("backend", BACKENDS)
def test_client_handshake_timeout_closes_the_client(backend):
    async def scenario(service, server):
        conn = (await service.wait_connections(1))[0]
        await conn.send(OpenConnectionMessage("c1", {}))
        close = await conn.next(CloseConnectionMessage)
        assert close.error_message == "Handshake was canceled."

    run(backend, lambda: serving(scenario, client_handshake_timeout=0.2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_hub_method_errors_are_completions_and_the_connection_stays_up(backend):
    async def scenario(service, server):
        conn = (await service.wait_connections(1))[0]
        await open_client(conn)
        assert (await invoke(conn, "nope", invocation_id="1"))["error"] == \
            "Unknown hub method 'nope'"
        assert (await invoke(conn, "add", 1, invocation_id="2"))["error"] == \
            "Failed to invoke 'add' due to an error on the server."
        assert (await invoke(conn, "Fail", invocation_id="3"))["error"] == \
            "An unexpected error occurred invoking 'Fail' on the server."
        assert (await invoke(conn, "refuse", invocation_id="4"))["error"] == \
            "An unexpected error occurred invoking 'refuse' on the server. " \
            "HubException: not allowed"
        assert (await invoke(conn, "count", 2, invocation_id="5"))["error"] == \
            "The client attempted to invoke the streaming 'count' method with a " \
            "non-streaming invocation."
        assert (await invoke(conn, "add", 1, 1, invocation_id="6"))["result"] == 2

    run(backend, lambda: serving(scenario))


@pytest.mark.parametrize("backend", BACKENDS)
def test_detailed_errors_include_exception_type_and_message(backend):
    async def scenario(service, server):
        conn = (await service.wait_connections(1))[0]
        await open_client(conn)
        assert (await invoke(conn, "fail"))["error"] == \
            "An unexpected error occurred invoking 'fail' on the server. " \
            "ValueError: secret detail"

    run(backend, lambda: serving(scenario, enable_detailed_errors=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_invocation_without_id_gets_no_completion(backend):
    async def scenario(service, server):
        conn = (await service.wait_connections(1))[0]
        await open_client(conn)
        await invoke(conn, "remember", 41, invocation_id=None)
        await invoke(conn, "fail", invocation_id=None)
        assert (await invoke(conn, "recall", invocation_id="9")) == \
            {"type": 3, "invocationId": "9", "result": 41}

    run(backend, lambda: serving(scenario))


@pytest.mark.parametrize("backend", BACKENDS)
def test_invocations_run_concurrently_and_complete_in_order_of_completion(backend):
    async def scenario(service, server):
        conn = (await service.wait_connections(1))[0]
        await open_client(conn)
        slow = json.dumps({"type": 1, "invocationId": "slow", "target": "sleep_then",
                           "arguments": [0.5, "slow"]}).encode() + RS
        fast = json.dumps({"type": 1, "invocationId": "fast", "target": "sleep_then",
                           "arguments": [0, "fast"]}).encode() + RS
        await conn.send(ConnectionDataMessage("c1", slow + fast))
        first = records(await conn.client_data("c1"))[0]
        second = records(await conn.client_data("c1"))[0]
        assert [first["result"], second["result"]] == ["fast", "slow"]

    run(backend, lambda: serving(scenario))


@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_hub_method_name(backend):
    async def scenario(service, server):
        conn = (await service.wait_connections(1))[0]
        await open_client(conn)
        assert (await invoke(conn, "shout", "hi"))["result"] == "HI"
        assert (await invoke(conn, "_shout", "hi", invocation_id="2"))["error"] == \
            "Unknown hub method '_shout'"

    run(backend, lambda: serving(scenario))


@pytest.mark.parametrize("backend", BACKENDS)
def test_streaming_method_sends_items_then_completion(backend):
    async def scenario(service, server):
        conn = (await service.wait_connections(1))[0]
        await open_client(conn)
        message = {"type": 4, "invocationId": "s", "target": "count", "arguments": [3]}
        await conn.send(ConnectionDataMessage("c1", json.dumps(message).encode() + RS))
        got: list[dict] = []
        while not got or got[-1]["type"] != 3:
            got += records(await conn.client_data("c1"))
        assert got == [{"type": 2, "invocationId": "s", "item": i} for i in range(3)] + [
            {"type": 3, "invocationId": "s"}]

    run(backend, lambda: serving(scenario))


@pytest.mark.parametrize("backend", BACKENDS)
def test_close_connection_runs_on_disconnected_and_forgets_the_client(backend):
    async def scenario(service, server):
        conn = (await service.wait_connections(1))[0]
        await open_client(conn)
        await conn.send(CloseConnectionMessage("c1", "client went away"))
        await wait_for(lambda: any(e[0] == "disconnected" for e in events))
        (_, cid, error) = events[-1]
        assert cid == "c1" and isinstance(error, ConnectionError)
        assert str(error) == "client went away"
        await wait_for(lambda: not server._dispatcher("chat").local_clients)
        # data for a forgotten client is ignored; the server connection is fine
        await conn.send(ConnectionDataMessage("c1", b"garbage"))
        await open_client(conn, "c2")
        assert (await invoke(conn, "add", 1, 2, connection_id="c2"))["result"] == 3

    run(backend, lambda: serving(scenario))


@pytest.mark.parametrize("backend", BACKENDS)
def test_abort_closes_the_client_from_the_server_side(backend):
    async def scenario(service, server):
        conn = (await service.wait_connections(1))[0]
        await open_client(conn)
        assert (await invoke(conn, "leave"))["result"] == "bye"
        close = await conn.next(CloseConnectionMessage)
        assert (close.connection_id, close.error_message) == ("c1", "")
        await wait_for(lambda: any(e[0] == "disconnected" for e in events))
        assert events[-1] == ("disconnected", "c1", None)

    run(backend, lambda: serving(scenario))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropped_server_connection_disconnects_its_clients(backend):
    async def scenario(service, server):
        conn = (await service.wait_connections(1))[0]
        await open_client(conn)
        await conn.drop()
        await wait_for(lambda: any(e[0] == "disconnected" for e in events))
        assert isinstance(events[-1][2], ServiceUnavailableError)

    run(backend, lambda: serving(scenario))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_hub_message_closes_the_client_with_an_error(backend):
    async def scenario(service, server):
        conn = (await service.wait_connections(1))[0]
        await open_client(conn)
        await conn.send(ConnectionDataMessage("c1", b"{not json" + RS))
        close = records(await conn.client_data("c1"))[0]
        assert close["type"] == 7 and close["error"].startswith("Connection closed with an error.")
        assert (await conn.next(CloseConnectionMessage)).connection_id == "c1"

    run(backend, lambda: serving(scenario))


# --- groups and acks ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_to_group_waits_for_the_ack_then_sends_to_the_group(backend):
    async def scenario(service, server):
        conn = (await service.wait_connections(1))[0]
        await open_client(conn)
        service.auto_ack = False
        await conn.send(ConnectionDataMessage("c1", json.dumps(
            {"type": 1, "invocationId": "1", "target": "join", "arguments": ["room"]}
        ).encode() + RS))
        join = await conn.next(JoinGroupWithAckMessage)
        assert (join.connection_id, join.group_name) == ("c1", "room")
        with pytest.raises(TimeoutError):  # nothing more until the ack
            await conn.next(GroupBroadcastDataMessage, timeout=0.2)
        from relaycore.protocol import ServiceAckMessage
        await conn.send(ServiceAckMessage(join.ack_id, AckStatus.OK))
        sent = await conn.next(GroupBroadcastDataMessage)
        assert sent.group_name == "room"
        assert set(sent.payloads) == {"json", "messagepack"}
        assert records(sent.payloads["json"]) == [
            {"type": 1, "target": "joined", "arguments": ["c1"]}]

    run(backend, lambda: serving(scenario))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ack_timeout_and_failure_statuses_raise(backend):
    async def scenario(service, server):
        await service.wait_connections(1)
        groups = server.hub_context("chat").groups
        service.auto_ack = False
        with pytest.raises(AckTimeoutError):
            await groups.add_to_group("c1", "g")
        service.auto_ack = True
        service.ack_status = AckStatus.NOT_FOUND
        await groups.add_to_group("nobody", "g")  # NotFound is not an error
        service.ack_status = AckStatus.TIMEOUT
        with pytest.raises(AckTimeoutError):
            await groups.remove_from_group("c1", "g")
        service.ack_status = AckStatus.INTERNAL_SERVER_ERROR
        from relaycore.sdk import ServiceError
        with pytest.raises(ServiceError):
            await groups.remove_from_group("c1", "g")

    run(backend, lambda: serving(scenario, ack_timeout=0.2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_user_groups_send_the_with_ack_messages(backend):
    async def scenario(service, server):
        conn = (await service.wait_connections(1))[0]
        user_groups = server.hub_context("chat").user_groups
        await user_groups.add_to_group("alice", "vip", ttl=60)
        join = await conn.next(UserJoinGroupWithAckMessage)
        assert (join.user_id, join.group_name, join.ttl) == ("alice", "vip", 60)
        await user_groups.remove_from_group("alice", "vip")
        leave = await conn.next(UserLeaveGroupWithAckMessage)
        assert (leave.user_id, leave.group_name) == ("alice", "vip")
        await user_groups.remove_from_all_groups("alice")
        leave = await conn.next(UserLeaveGroupWithAckMessage)
        assert leave.group_name is None
        assert await user_groups.is_user_in_group("alice", "vip") is True
        service.ack_status = AckStatus.NOT_FOUND
        assert await user_groups.is_user_in_group("alice", "vip") is False
        await server.hub_context("chat").groups.remove_from_group("c9", "vip")
        assert (await conn.next(LeaveGroupWithAckMessage)).connection_id == "c9"

    run(backend, lambda: serving(scenario))


# --- sends ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_sends_choose_the_service_message_and_serialise_once_per_protocol(backend):
    async def scenario(service, server):
        conn = (await service.wait_connections(1))[0]
        clients = server.hub_context("chat").clients
        cases = [
            (clients.all, BroadcastDataMessage, {"excluded_connection_ids": ()}),
            (clients.all_except(["a", "b"]), BroadcastDataMessage,
             {"excluded_connection_ids": ("a", "b")}),
            (clients.client("x"), MultiConnectionDataMessage, {"connection_ids": ("x",)}),
            (clients.clients(["x", "y"]), MultiConnectionDataMessage,
             {"connection_ids": ("x", "y")}),
            (clients.user("u"), UserDataMessage, {"user_id": "u"}),
            (clients.users(["u", "v"]), MultiUserDataMessage, {"user_ids": ("u", "v")}),
            (clients.group("g"), GroupBroadcastDataMessage,
             {"group_name": "g", "excluded_connection_ids": ()}),
            (clients.groups(["g", "h"]), MultiGroupBroadcastDataMessage,
             {"group_names": ("g", "h")}),
            (clients.group_except("g", ["x"]), GroupBroadcastDataMessage,
             {"group_name": "g", "excluded_connection_ids": ("x",)}),
        ]
        mp = MessagePackHubProtocol()
        for proxy, kind, fields in cases:
            await proxy.send("notify", 1, "two")
            message = await conn.next(kind)
            for name, value in fields.items():
                assert getattr(message, name) == value
            assert records(message.payloads["json"]) == [
                {"type": 1, "target": "notify", "arguments": [1, "two"]}]
            parsed, _ = mp.parse(message.payloads["messagepack"])
            assert parsed[0].target == "notify" and parsed[0].arguments == (1, "two")

    run(backend, lambda: serving(scenario))


@pytest.mark.parametrize("backend", BACKENDS)
def test_caller_others_and_others_in_group(backend):
    class Relay(Hub):
        async def fan(self):
            await self.clients.caller.send("me")
            await self.clients.others.send("them")
            await self.clients.others_in_group("g").send("group")

    async def scenario():
        async with anyio.create_task_group() as tg:
            service = await FakeService().start(tg)
            server = HubServer(options(service))
            server.map_hub("chat", Relay)
            async with server:
                conn = (await service.wait_connections(1))[0]
                await open_client(conn)
                await invoke(conn, "fan")
                caller = await conn.next(MultiConnectionDataMessage)
                assert caller.connection_ids == ("c1",) and set(caller.payloads) == {"json"}
                others = await conn.next(BroadcastDataMessage)
                assert others.excluded_connection_ids == ("c1",)
                group = await conn.next(GroupBroadcastDataMessage)
                assert (group.group_name, group.excluded_connection_ids) == ("g", ("c1",))
            tg.cancel_scope.cancel()

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_send_with_bad_arguments_is_refused_before_sending(backend):
    async def scenario(service, server):
        await service.wait_connections(1)
        clients = server.hub_context("chat").clients
        with pytest.raises(ValueError, match="group name"):
            clients.group("")
        with pytest.raises(TypeError, match="list of strings"):
            clients.users("alice")
        with pytest.raises(ValueError, match="method"):
            await clients.all.send("")

    run(backend, lambda: serving(scenario))


# --- client results ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_client_result_of_a_local_client(backend):
    async def scenario(service, server):
        conn = (await service.wait_connections(1))[0]
        await open_client(conn)
        await conn.send(ConnectionDataMessage("c1", json.dumps(
            {"type": 1, "invocationId": "1", "target": "ask_caller", "arguments": ["2+2?"]}
        ).encode() + RS))
        invocation = await conn.next(ClientInvocationMessage)
        assert invocation.connection_id == "c1"
        assert invocation.caller_server_id == server.server_id
        (sent,) = records(invocation.payloads["json"])
        assert sent["target"] == "answer" and sent["arguments"] == ["2+2?"]
        completion = {"type": 3, "invocationId": sent["invocationId"], "result": 4}
        await conn.send(ConnectionDataMessage("c1", json.dumps(completion).encode() + RS))
        cleanup = await conn.next(ClientCompletionMessage)
        assert cleanup.invocation_id == sent["invocationId"] and cleanup.payload == b""
        reply = records(await conn.client_data("c1"))[0]
        assert reply == {"type": 3, "invocationId": "1", "result": 4}

    run(backend, lambda: serving(scenario))


@pytest.mark.parametrize("backend", BACKENDS)
def test_client_result_relayed_from_another_server_and_errors(backend):
    async def scenario(service, server):
        conn = (await service.wait_connections(1))[0]
        clients = server.hub_context("chat").clients
        result: dict[str, Any] = {}

        async def ask():
            result["value"] = await clients.client("remote").invoke("answer", timeout=5)

        async def ask_fail():
            try:
                await clients.client("remote").invoke("answer", timeout=5)
            except HubException as exc:
                result["error"] = str(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask)
            invocation = await conn.next(ClientInvocationMessage)
            assert set(invocation.payloads) == {"json", "messagepack"}
            payload = json.dumps({"type": 3, "invocationId": invocation.invocation_id,
                                  "result": "yes"}).encode() + RS
            await conn.send(ClientCompletionMessage(invocation.invocation_id, "remote",
                                                    server.server_id, "json", payload))
        assert result["value"] == "yes"
        async with anyio.create_task_group() as tg:
            tg.start_soon(ask_fail)
            invocation = await conn.next(ClientInvocationMessage)
            await conn.send(ErrorCompletionMessage(invocation.invocation_id, "remote",
                                                   server.server_id, "Connection gone."))
        assert result["error"] == "Connection gone."
        with pytest.raises(TimeoutError):
            await clients.client("remote").invoke("answer", timeout=0.1)

    run(backend, lambda: serving(scenario))


@pytest.mark.parametrize("backend", BACKENDS)
def test_owner_forwards_a_completion_for_another_caller(backend):
    async def scenario(service, server):
        conn = (await service.wait_connections(1))[0]
        await open_client(conn)
        await conn.send(ClientInvocationMessage("inv-9", "c1", "other-server",
                                                {"json": b'{"type":1}' + RS}))
        completion = {"type": 3, "invocationId": "inv-9", "result": [1, 2]}
        await conn.send(ConnectionDataMessage("c1", json.dumps(completion).encode() + RS))
        forwarded = await conn.next(ClientCompletionMessage)
        assert (forwarded.invocation_id, forwarded.caller_server_id, forwarded.protocol) == (
            "inv-9", "other-server", "json")
        assert records(forwarded.payload) == [completion]

    run(backend, lambda: serving(scenario))
