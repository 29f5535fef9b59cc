"""The client against the real relay (serverless hub: REST sends): in-process under trio, a
subprocess under asyncio and uvloop. Connects in JSON and MessagePack over WebSockets,
Server-Sent Events (JSON only) and long polling, receives every kind of send, is closed by the
relay with a reason, reconnects after the relay drops it, times out a silent relay."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from clienthelpers import BACKENDS, open_relay, run, wait_for
from fakehub import FakeHub

from relaycore.client import (
    HubConnection,
    HubConnectionBuilder,
    HubConnectionState,
    NegotiateError,
    ServerClosedError,
    ServerTimeoutError,
    TransportError,
)
from relayhelpers import client_token

#: Every transport with every hub protocol it carries (an event stream is text only).
TRANSPORTS = [("WebSockets", "json"), ("WebSockets", "messagepack"),
              ("ServerSentEvents", "json"), ("LongPolling", "json"),
              ("LongPolling", "messagepack")]


class Inbox:
    """What a connection's ``notify`` handler received, waited on with a deadline."""

    def __init__(self, connection: HubConnection, target: str = "notify") -> None:
        self.items: list[tuple[Any, ...]] = []
        connection.on(target, lambda *args: self.items.append(args))

    async def wait(self, count: int, timeout: float = 5) -> list[tuple[Any, ...]]:
        await wait_for(lambda: len(self.items) >= count, timeout)
        return self.items


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("transport", "protocol"), TRANSPORTS)
def test_client_receives_sends_to_everyone_its_user_its_group_and_its_connection(
        backend, transport, protocol):
    async def scenario():
        async with open_relay(backend) as relay:
            connection = (HubConnectionBuilder()
                          .with_url(relay.client_url(), transport=transport,
                                    access_token_factory=relay.token_factory(user="alice"))
                          .with_hub_protocol(protocol)
                          .build())
            inbox = Inbox(connection)
            async with connection:
                assert connection.state is HubConnectionState.CONNECTED
                assert connection.protocol == protocol
                assert connection.transport == transport
                cid = connection.connection_id
                assert cid
                response = await relay.rest("PUT", f"/api/hubs/chat/groups/room/connections/{cid}")
                assert response.status_code == 200, response.text
                await relay.send("/api/hubs/chat", "notify", "everyone", 1)
                await relay.send("/api/hubs/chat/users/alice", "notify", "user", 2.5)
                await relay.send("/api/hubs/chat/groups/room", "notify", "group", None)
                await relay.send(f"/api/hubs/chat/connections/{cid}", "notify", "connection",
                                 {"nested": [1, "two"]})
                await relay.send("/api/hubs/chat/users/bob", "notify", "not for alice")
                await relay.send("/api/hubs/chat", "notify", "marker")
                assert await inbox.wait(5) == [
                    ("everyone", 1), ("user", 2.5), ("group", None),
                    ("connection", {"nested": [1, "two"]}), ("marker",)]
            assert connection.state is HubConnectionState.DISCONNECTED
            assert connection.connection_id is None

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("transport", "protocol"), TRANSPORTS[1:4])
def test_the_relay_closing_a_connection_with_a_reason_reaches_the_close_callback(
        backend, transport, protocol):
    async def scenario():
        async with open_relay(backend) as relay:
            connection = HubConnection(relay.client_url(), protocol=protocol,
                                       transport=transport,
                                       access_token_factory=relay.token_factory(user="carol"))
            closed: list[Any] = []
            connection.on_close(closed.append)
            await connection.start()
            response = await relay.rest(
                "DELETE", f"/api/hubs/chat/connections/{connection.connection_id}",
                params={"reason": "maintenance at noon"})
            assert response.status_code == 200, response.text
            await wait_for(lambda: closed)
            assert isinstance(closed[0], ServerClosedError)
            assert closed[0].error == "maintenance at noon"
            assert str(closed[0]) == "Server returned an error on close: maintenance at noon"
            assert connection.state is HubConnectionState.DISCONNECTED

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_closed_connection_invited_back_reconnects_with_a_new_id(backend):
    async def scenario():
        async with open_relay(backend) as relay:
            connection = HubConnection(relay.client_url(), reconnect=[0],
                                       access_token_factory=relay.token_factory(user="dave"))
            reconnecting: list[Any] = []
            reconnected: list[Any] = []
            connection.on_reconnecting(reconnecting.append)
            connection.on_reconnected(reconnected.append)
            inbox = Inbox(connection)
            async with connection:
                first = connection.connection_id
                await relay.rest("DELETE", f"/api/hubs/chat/connections/{first}",
                                 params={"reason": "rebalancing"})
                await wait_for(lambda: reconnected)
                # The relay's Close carries allowReconnect: the policy takes over.
                assert isinstance(reconnecting[0], ServerClosedError)
                assert reconnecting[0].allow_reconnect
                assert reconnected == [connection.connection_id] and reconnected[0] != first
                await relay.send("/api/hubs/chat/users/dave", "notify", "back")
                assert await inbox.wait(1) == [("back",)]

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("transport", "protocol"), TRANSPORTS[1:4])
def test_automatic_reconnect_survives_the_relay_dropping_every_socket(
        backend, transport, protocol):
    async def scenario():
        async with open_relay(backend) as relay:
            connection = HubConnection(relay.client_url(), protocol=protocol,
                                       transport=transport, reconnect=lambda context: 0.05,
                                       access_token_factory=relay.token_factory(user="erin"))
            events: list[Any] = []
            connection.on_reconnecting(lambda error: events.append(("reconnecting", error)))
            connection.on_reconnected(lambda cid: events.append(("reconnected", cid)))
            inbox = Inbox(connection)
            async with connection:
                first = connection.connection_id
                await relay.crash()
                await wait_for(lambda: events)
                assert events[0][0] == "reconnecting"
                assert isinstance(events[0][1], TransportError)
                assert connection.state is HubConnectionState.RECONNECTING
                await relay.restart()
                await wait_for(lambda: len(events) == 2, timeout=10)
                assert events[1] == ("reconnected", connection.connection_id)
                assert connection.connection_id != first
                assert connection.state is HubConnectionState.CONNECTED
                await relay.send("/api/hubs/chat/users/erin", "notify", "after the crash")
                assert await inbox.wait(1) == [("after the crash",)]

    run(backend, scenario, timeout=30)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("transport", ["WebSockets", "ServerSentEvents"])
def test_a_relay_that_sends_nothing_is_given_up_after_the_server_timeout(backend, transport):
    async def scenario():
        # The relay pings every 60 s here; the client expects something within 0.5 s.
        async with open_relay(backend, keep_alive_interval=60) as relay:
            connection = HubConnection(relay.client_url(), server_timeout=0.5,
                                       transport=transport,
                                       keep_alive_interval=0.1,
                                       access_token_factory=relay.token_factory())
            closed: list[Any] = []
            connection.on_close(closed.append)
            await connection.start()
            await wait_for(lambda: closed)
            assert isinstance(closed[0], ServerTimeoutError)

    run(backend, scenario)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_relay_refuses_a_bad_token_at_negotiate_and_accepts_skip_negotiation(backend):
    async def scenario():
        async with open_relay(backend) as relay:
            wrong = HubConnection(relay.client_url(), access_token_factory=lambda: "forged")
            with pytest.raises(NegotiateError, match="401") as caught:
                await wrong.start()
            assert caught.value.status == 401
            assert wrong.state is HubConnectionState.DISCONNECTED

            direct = HubConnection(f"ws://127.0.0.1:{relay.port}/client/?hub=chat",
                                   skip_negotiation=True,
                                   access_token_factory=lambda: client_token("chat", "frank"))
            inbox = Inbox(direct)
            async with direct:
                assert direct.connection_id is None
                await relay.send("/api/hubs/chat/users/frank", "notify", "direct")
                assert await inbox.wait(1) == [("direct",)]

    run(backend, scenario)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("transport", ["WebSockets", "ServerSentEvents", "LongPolling"])
def test_a_stopped_connection_is_gone_from_the_relay(backend, transport):
    async def scenario():
        async with open_relay(backend) as relay:
            connection = HubConnection(relay.client_url(), transport=transport,
                                       access_token_factory=relay.token_factory(user="gina"))
            async with connection:
                path = f"/api/hubs/chat/connections/{connection.connection_id}"
                assert (await relay.rest("HEAD", path)).status_code == 200

            async def gone() -> bool:
                return (await relay.rest("HEAD", path)).status_code == 404

            with anyio.fail_after(5):
                while not await gone():
                    await anyio.sleep(0.02)

    run(backend, scenario)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_transport_that_fails_to_connect_gives_way_to_the_next(backend):
    async def scenario():
        async with open_relay(backend) as relay, anyio.create_task_group() as task_group:
            # A front that offers WebSockets but refuses the upgrade, then sends the client's
            # second negotiate on to the relay, whose long polling works.
            front = await FakeHub().start(task_group)
            front.refuse_upgrade = 503
            answers = iter([
                (200, {"negotiateVersion": 1, "connectionId": "c", "connectionToken": "t",
                       "availableTransports": [
                           {"transport": "WebSockets", "transferFormats": ["Text"]},
                           {"transport": "LongPolling", "transferFormats": ["Text"]}]}),
                (200, {"url": relay.client_url(),
                       "accessToken": client_token("chat", "ivan")}),
            ])
            front.negotiate = lambda request: next(answers)
            connection = HubConnection(front.url)
            inbox = Inbox(connection)
            async with connection:
                assert connection.transport == "LongPolling"
                await relay.send("/api/hubs/chat/users/ivan", "notify", "polled")
                assert await inbox.wait(1) == [("polled",)]
            task_group.cancel_scope.cancel()

    run(backend, scenario)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_asking_the_relay_for_stateful_reconnect_works_whether_it_agrees_or_not(backend):
    async def scenario():
        async with open_relay(backend) as relay:
            connection = (HubConnectionBuilder()
                          .with_url(relay.client_url(),
                                    access_token_factory=relay.token_factory(user="judy"))
                          .with_stateful_reconnect()
                          .build())
            inbox = Inbox(connection)
            async with connection:
                await relay.send("/api/hubs/chat/users/judy", "notify", "stateful or not")
                assert await inbox.wait(1) == [("stateful or not",)]

    run(backend, scenario)
