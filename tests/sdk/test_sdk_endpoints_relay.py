"""Several endpoints against real relays (``python -m relaycore serve`` subprocesses): regional
failover and recovery with two relays and two app servers, metrics from a relay started with
``--capacity``, an endpoint added and removed while messages flow (every message counted), and
a router deciding on the metrics the relays report. Every scenario runs under asyncio, uvloop
and trio."""

from __future__ import annotations

import contextlib
from typing import Any

import anyio
import pytest
from relayclient import JsonHubClient, negotiate_with_app, relay_process
from sdkhelpers import BACKENDS, run, wait_for
from test_sdk_router import doc_example

from relaycore.sdk import (
    EndpointMetrics,
    EndpointStatusEvent,
    EndpointType,
    Hub,
    HubServer,
    ServiceEndpoint,
    ServiceOptions,
)


class Chat(Hub):
    def __init__(self, pod: str) -> None:
        self.pod = pod

    async def where(self):
        return self.pod


def app_server(name: str, endpoints: list[ServiceEndpoint], **overrides: Any) -> HubServer:
    settings: dict[str, Any] = dict(endpoints=endpoints, connection_count=2,
                                    retry_delay=lambda n: 0.1, shutdown_timeout=2)
    settings.update(overrides)
    server = HubServer(ServiceOptions(**settings))
    server.map_hub("chat", Chat, factory=lambda: Chat(name))
    return server


def port_of(doc: dict) -> int:
    return int(doc["url"].split(":")[2].split("/")[0])


async def negotiated_port(server: HubServer) -> int:
    return port_of(await negotiate_with_app(server.asgi()))


async def everyone_gets(senders: list[HubServer], clients: list[JsonHubClient], text: str):
    """Each sender broadcasts ``text``; each client receives it once from each sender."""
    for sender in senders:
        await sender.hub_context("chat").clients.all.send("news", text)
    for client in clients:
        for _ in senders:
            assert await client.next_invocation("news") == [text]
    for client in clients:
        assert client.received == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_failover_to_the_secondary_region_and_recovery_with_two_app_servers(backend):
    async def scenario():
        async with contextlib.AsyncExitStack() as relays:
            east = await relays.enter_async_context(relay_process())
            west = await relays.enter_async_context(relay_process())
            east_string, west_string = east.connection_string, west.connection_string
            events: list[EndpointStatusEvent] = []
            # Each region's app server: its own relay as primary, the other as secondary.
            pod_east = app_server("pod-east", [
                ServiceEndpoint(east_string, name="east"),
                ServiceEndpoint(west_string, EndpointType.SECONDARY, "west")],
                on_endpoint_status=events.append)
            pod_west = app_server("pod-west", [
                ServiceEndpoint(west_string, name="west"),
                ServiceEndpoint(east_string, EndpointType.SECONDARY, "east")])
            async with anyio.create_task_group() as tg:
                async with pod_east, pod_west:
                    with anyio.fail_after(10):
                        await pod_east.wait_online()
                        await pod_west.wait_online()

                    # Clients land in their own region, on their own region's app server.
                    e1 = await JsonHubClient.connect(await negotiate_with_app(pod_east.asgi()),
                                                     tg)
                    w1 = await JsonHubClient.connect(await negotiate_with_app(pod_west.asgi()),
                                                     tg)
                    assert (await e1.invoke("where"))["result"] == "pod-east"
                    assert (await w1.invoke("where"))["result"] == "pod-west"
                    for _ in range(5):
                        assert await negotiated_port(pod_east) == east.port
                        assert await negotiated_port(pod_west) == west.port
                    await everyone_gets([pod_east, pod_west], [e1, w1], "both regions up")

                    # The east relay dies: at once, the east app server sends new clients
                    # west, where the west app server takes them.
                    events.clear()
                    await east.kill()
                    await wait_for(lambda: [(e.endpoint.name, e.online) for e in events]
                                   == [("east", False)], timeout=5)
                    assert [e.name for e in pod_east.online_endpoints("chat")] == ["west"]
                    for _ in range(5):
                        assert await negotiated_port(pod_east) == west.port
                    e2 = await JsonHubClient.connect(await negotiate_with_app(pod_east.asgi()),
                                                     tg)
                    # The east app server holds only a Weak connection there.
                    assert (await e2.invoke("where"))["result"] == "pod-west"
                    # Messages from both app servers still reach every connected client.
                    await everyone_gets([pod_east, pod_west], [w1, e2], "east is down")

                    # East comes back on the same port: new clients go east again; e2 stays
                    # west and still receives.
                    await relays.enter_async_context(relay_process(port=east.port))
                    with anyio.fail_after(10):
                        await pod_east.wait_online()
                        await pod_west.wait_online()
                    assert [(e.endpoint.name, e.online) for e in events] == [
                        ("east", False), ("east", True)]
                    for _ in range(5):
                        assert await negotiated_port(pod_east) == east.port
                    e3 = await JsonHubClient.connect(await negotiate_with_app(pod_east.asgi()),
                                                     tg)
                    assert (await e3.invoke("where"))["result"] == "pod-east"
                    assert (await e2.invoke("where"))["result"] == "pod-west"
                    await everyone_gets([pod_east, pod_west], [w1, e2, e3], "east is back")
                    for client in (e1, w1, e2, e3):
                        await client.aclose()
                tg.cancel_scope.cancel()

    run(backend, scenario, timeout=60)


@pytest.mark.parametrize("backend", BACKENDS)
def test_metrics_come_from_a_relay_started_with_a_capacity(backend):
    async def scenario():
        async with relay_process(args=("--capacity", "250")) as relay, \
                anyio.create_task_group() as tg:
            server = app_server("pod", [ServiceEndpoint(relay.connection_string, name="r")],
                                status_interval=0.1)
            async with server:
                (endpoint,) = server.hub_endpoints("chat")
                # Reported when the connections came up: 2 server connections, the quota.
                await wait_for(lambda: endpoint.metrics == EndpointMetrics(0, 2, 250))
                clients = [await JsonHubClient.connect(await negotiate_with_app(server.asgi()),
                                                       tg) for _ in range(3)]
                await wait_for(lambda: endpoint.metrics == EndpointMetrics(3, 2, 250))
                await clients[0].aclose()
                await wait_for(lambda: endpoint.metrics.client_connection_count == 2)
                for client in clients[1:]:
                    await client.aclose()
            tg.cancel_scope.cancel()

    run(backend, scenario, timeout=30)


@pytest.mark.parametrize("backend", BACKENDS)
def test_endpoint_added_and_removed_while_messages_flow_loses_none(backend):
    async def scenario():
        async with relay_process() as relay_a, relay_process() as relay_b, \
                anyio.create_task_group() as tg:
            server = app_server("pod", [ServiceEndpoint(relay_a.connection_string, name="a")],
                                scale_poll_interval=0.1)
            sent = 0
            stop = anyio.Event()

            async def send_numbers():
                nonlocal sent
                clients = server.hub_context("chat").clients
                while not stop.is_set():
                    await clients.all.send("n", sent)
                    sent += 1
                    await anyio.sleep(0.005)   # a steady flow, not a flood

            def numbers(client: JsonHubClient) -> list[int]:
                return [m["arguments"][0] for m in client.received if m.get("target") == "n"]

            async with server:
                a1 = await JsonHubClient.connect(await negotiate_with_app(server.asgi()), tg)
                async with anyio.create_task_group() as sender:
                    sender.start_soon(send_numbers)
                    await wait_for(lambda: len(numbers(a1)) >= 20)

                    assert await server.add_endpoint(
                        ServiceEndpoint(relay_b.connection_string, name="b"))
                    with anyio.fail_after(10):
                        while True:  # negotiate picks one of the two primaries at random
                            doc = await negotiate_with_app(server.asgi())
                            if port_of(doc) == relay_b.port:
                                break
                    b1 = await JsonHubClient.connect(doc, tg)
                    await wait_for(lambda: len(numbers(b1)) >= 20)

                    removal: list[bool] = []

                    async def remove():
                        removal.append(await server.remove_endpoint("b"))

                    tg.start_soon(remove)
                    await wait_for(lambda: [e.name for e in server.endpoints] == ["a"])
                    for _ in range(10):   # not offered any more, at once ...
                        assert await negotiated_port(server) == relay_a.port
                    seen = len(numbers(b1))    # ... but its client still gets every message
                    await wait_for(lambda: len(numbers(b1)) >= seen + 20)
                    assert removal == []
                    await b1.aclose()
                    await wait_for(lambda: removal == [True], timeout=10)
                    assert [e.name for e in server.hub_endpoints("chat")] == ["a"]

                    count = sent
                    await wait_for(lambda: sent >= count + 20)
                    stop.set()
                await server.hub_context("chat").clients.all.send("n", -1)
                await wait_for(lambda: numbers(a1)[-1:] == [-1])
            # Nothing lost: a1 got every number in order; b1 every one from its first to
            # its last.
            assert numbers(a1) == [*range(sent), -1]
            got = numbers(b1)
            assert got == list(range(got[0], got[0] + len(got))) and len(got) >= 40
            await a1.aclose()
            tg.cancel_scope.cancel()

    run(backend, scenario, timeout=60)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fewest_clients_router_on_the_counts_two_relays_report(backend):
    router = doc_example("fewest-clients-router")["FewestClientsRouter"]()

    async def scenario():
        async with relay_process() as one, relay_process() as two, \
                anyio.create_task_group() as tg:
            server = app_server("pod", [ServiceEndpoint(one.connection_string, name="one"),
                                        ServiceEndpoint(two.connection_string, name="two")],
                                status_interval=0.1, endpoint_router=router)
            async with server:
                await server.wait_online()
                endpoints = server.hub_endpoints("chat")

                def counts() -> list[int]:
                    return [e.metrics.client_connection_count for e in endpoints]

                clients = []
                # Each client goes where the relays report the fewest (the first on a tie).
                for expected in ([1, 0], [1, 1], [2, 1], [2, 2]):
                    doc = await negotiate_with_app(server.asgi())
                    clients.append(await JsonHubClient.connect(doc, tg))
                    await wait_for(lambda expected=expected: counts() == expected)
                for client in clients:
                    await client.aclose()
            tg.cancel_scope.cancel()

    run(backend, scenario, timeout=30)


@pytest.mark.parametrize("backend", BACKENDS)
def test_new_endpoint_is_offered_only_once_every_app_server_is_connected_to_it(backend):
    async def scenario():
        async with relay_process() as relay_a, relay_process() as relay_b:
            pod1 = app_server("pod1", [ServiceEndpoint(relay_a.connection_string, name="a")],
                              scale_poll_interval=0.1)
            pod2 = app_server("pod2", [ServiceEndpoint(relay_a.connection_string, name="a")],
                              scale_poll_interval=0.1)
            b = ServiceEndpoint(relay_b.connection_string, name="b")
            async with pod1, pod2, anyio.create_task_group() as tg:
                added: list[str] = []

                async def add(pod: HubServer, name: str) -> None:
                    assert await pod.add_endpoint(b)
                    added.append(name)

                tg.start_soon(add, pod1, "pod1")
                # pod1 is connected to b, but pod2 is not: b's servers differ from a's, so
                # pod1 keeps b out of negotiate (a client there would miss pod2's messages).
                await wait_for(lambda: [e.online for e in pod1.hub_endpoints("chat")]
                               == [True, True])
                # Two rounds of servers pings answered by both relays, and still staging.
                await wait_for(lambda: pod1._dispatcher("chat").containers[1].servers_replies >= 2)
                for _ in range(20):
                    assert await negotiated_port(pod1) == relay_a.port
                assert added == []
                tg.start_soon(add, pod2, "pod2")
                await wait_for(lambda: sorted(added) == ["pod1", "pod2"], timeout=10)
                with anyio.fail_after(10):
                    while await negotiated_port(pod1) != relay_b.port:
                        pass

    run(backend, scenario, timeout=40)
