"""The SDK against the real relay: negotiate through an app server, call a hub, and reach the
client from a second app server ("pod 2") by connection, user, group and everyone.

The relay runs as a subprocess under both backends; one more test runs it in-process under
trio and drives the client with trio-websocket, an independent WebSocket implementation.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
import trio
from relayclient import JsonHubClient, negotiate_with_app, relay_process
from sdkhelpers import BACKENDS, KEY, connection_string, run, wait_for

from relaycore.relay import RelayConfig, serve_relay
from relaycore.sdk import Hub, HubException, HubServer, ServiceEndpoint, ServiceOptions

RS = "\x1e"


class Chat(Hub):
    def __init__(self, pod: str = "?") -> None:
        self.pod = pod

    async def add(self, a, b):
        return a + b

    async def whoami(self):
        return {"pod": self.pod, "user": self.context.user_id,
                "connection": self.context.connection_id}

    async def join(self, group):
        await self.groups.add_to_group(self.context.connection_id, group)
        await self.clients.group(group).send("notify", f"joined {group}")

    async def refuse(self):
        raise HubException("no")

    async def double_via_caller(self, x):
        return await self.clients.caller.invoke("answer", x, timeout=5)


def pod(name: str, connection: str | None, **overrides: Any) -> HubServer:
    settings: dict[str, Any] = dict(connection_string=connection, connection_count=2,
                                    retry_delay=lambda n: 0.1)
    settings.update(overrides)
    server = HubServer(ServiceOptions(**settings))
    server.map_hub("chat", Chat, factory=lambda: Chat(name))
    return server


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_pods_through_the_relay(backend):
    async def scenario():
        async with relay_process() as relay, anyio.create_task_group() as tg:
            pod1 = pod("pod1", relay.connection_string)
            pod2 = pod("pod2", relay.connection_string)
            async with pod1:
                alice = await JsonHubClient.connect(
                    await negotiate_with_app(pod1.asgi(), user="alice"), tg)
                bob = await JsonHubClient.connect(
                    await negotiate_with_app(pod1.asgi(), user="bob"), tg)

                # Hub methods run on pod 1 (the only app server so far), with the user id.
                assert (await alice.invoke("add", 2, 3))["result"] == 5
                who = (await alice.invoke("whoami"))["result"]
                assert who == {"pod": "pod1", "user": "alice",
                               "connection": alice.connection_id}
                assert (await alice.invoke("refuse"))["error"].endswith("HubException: no")
                assert (await alice.invoke("nope"))["error"] == "Unknown hub method 'nope'"

                # A hub method joining a group and sending to it, then a client result.
                assert (await alice.invoke("join", "room"))["result"] is None
                assert await alice.next_invocation("notify") == ["joined room"]
                assert (await alice.invoke("double_via_caller", 4))["result"] == 8

                async with pod2:
                    chat2 = pod2.hub_context("chat")
                    await chat2.clients.client(alice.connection_id).send("notify", "connection")
                    await chat2.clients.user("alice").send("notify", "user")
                    await chat2.clients.group("room").send("notify", "group")
                    await chat2.clients.all.send("notify", "all")
                    for expected in ("connection", "user", "group", "all"):
                        assert await alice.next_invocation("notify") == [expected]
                    assert await bob.next_invocation("notify") == ["all"]

                    # Membership changed on pod 2 is seen on pod 1, and the other way round.
                    await chat2.user_groups.add_to_group("bob", "vip")
                    chat1 = pod1.hub_context("chat")
                    assert await chat1.user_groups.is_user_in_group("bob", "vip")
                    await chat1.clients.group("vip").send("notify", "vip")
                    assert await bob.next_invocation("notify") == ["vip"]
                    await chat1.groups.remove_from_group(alice.connection_id, "room")
                    await chat2.clients.groups(["room", "vip"]).send("notify", "groups")
                    await chat2.clients.all_except([bob.connection_id]).send("notify", "not bob")
                    assert await alice.next_invocation("notify") == ["not bob"]
                    assert await bob.next_invocation("notify") == ["groups"]

                    # A client result asked from pod 2 for a client pod 1 owns.
                    assert await chat2.clients.client(bob.connection_id).invoke(
                        "answer", 21, timeout=5) == 42
                    with pytest.raises(HubException, match="does not exist"):
                        await chat2.clients.client("no-such-connection").invoke("answer", 1)
                assert alice.received == [] and bob.received == []
                await alice.aclose()
                await bob.aclose()
            tg.cancel_scope.cancel()

    run(backend, scenario, timeout=40)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pod_reconnects_when_the_relay_comes_back(backend):
    async def scenario():
        async with relay_process() as relay:
            port = relay.port
            server = pod("pod1", relay.connection_string)
            await server.__aenter__()
        try:
            # The relay is gone: the pod goes offline and keeps retrying.
            await wait_for(lambda: server.online_endpoints("chat") == [])
            async with relay_process(port=port), anyio.create_task_group() as tg:
                await wait_for(lambda: len(server.online_endpoints("chat")) == 1, timeout=10)
                client = await JsonHubClient.connect(
                    await negotiate_with_app(server.asgi(), user="dave"), tg)
                assert (await client.invoke("whoami"))["result"]["user"] == "dave"
                # Both server connections come back (each on its own retry schedule).
                connections = server._dispatcher("chat").containers[0].connections
                await wait_for(lambda: [c.sessions for c in connections] == [2, 2], timeout=10)
                await client.aclose()
                tg.cancel_scope.cancel()
        finally:
            await server.__aexit__(None, None, None)

    run(backend, scenario, timeout=40)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_endpoints_negotiate_spreads_clients_and_sends_reach_both(backend):
    async def scenario():
        async with relay_process() as east, relay_process() as west, \
                anyio.create_task_group() as tg:
            endpoints = [ServiceEndpoint(east.connection_string, name="east"),
                         ServiceEndpoint(west.connection_string, name="west")]
            server = pod("pod1", east.connection_string, connection_string=None,
                         endpoints=endpoints)
            async with server:
                assert len(server.online_endpoints("chat")) == 2
                clients: dict[int, JsonHubClient] = {}
                # Negotiate picks one endpoint at random; keep going until both have a client.
                with anyio.fail_after(10):
                    while len(clients) < 2:
                        doc = await negotiate_with_app(server.asgi(), user="erin")
                        port = int(doc["url"].split(":")[2].split("/")[0])
                        if port not in clients:
                            clients[port] = await JsonHubClient.connect(doc, tg)
                assert set(clients) == {east.port, west.port}
                await server.hub_context("chat").clients.user("erin").send("notify", "both")
                for client in clients.values():
                    assert await client.next_invocation("notify") == ["both"]
                    assert (await client.invoke("add", 1, 1))["result"] == 2
                    await client.aclose()
            tg.cancel_scope.cancel()

    run(backend, scenario, timeout=40)


async def test_sdk_under_trio_with_the_relay_in_process_and_trio_websocket_client():
    from trio_websocket import open_websocket_url

    async with trio.open_nursery() as nursery:
        relay = await nursery.start(serve_relay, RelayConfig(port=0, access_keys=[KEY]))
        server = pod("pod1", connection_string(relay.port))
        async with server:
            doc = await server.negotiate("chat", user_id="carol")
            url = doc["url"].replace("http://", "ws://") + f"&access_token={doc['accessToken']}"
            async with open_websocket_url(url) as ws:
                await ws.send_message(json.dumps({"protocol": "json", "version": 1}) + RS)
                with trio.fail_after(5):
                    assert await ws.get_message() == "{}" + RS
                    await ws.send_message(json.dumps(
                        {"type": 1, "invocationId": "1", "target": "WhoAmI", "arguments": []}
                    ) + RS)
                    reply = json.loads((await ws.get_message()).split(RS)[0])
                    assert reply["result"]["user"] == "carol"
                    await server.hub_context("chat").clients.user("carol").send("hello", 1)
                    message = json.loads((await ws.get_message()).split(RS)[0])
                    assert message == {"type": 1, "target": "hello", "arguments": [1]}
        nursery.cancel_scope.cancel()
