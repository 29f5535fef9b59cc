"""EndpointRouter: the default rules one by one, each overridable method with its fallback, and
the three examples of docs/endpoints.md run as written there (against fake services)."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from sdkhelpers import BACKENDS, FakeService, run, sent_to

from relaycore.protocol import (
    BroadcastDataMessage,
    GroupBroadcastDataMessage,
    JoinGroupWithAckMessage,
    MultiConnectionDataMessage,
    MultiGroupBroadcastDataMessage,
    MultiUserDataMessage,
    ServiceMessage,
    UserDataMessage,
    UserJoinGroupWithAckMessage,
)
from relaycore.sdk import (
    EndpointMetrics,
    EndpointRouter,
    EndpointType,
    Hub,
    HubServer,
    NegotiateError,
    NegotiateRequest,
    ServiceEndpoint,
    ServiceOptions,
    ServiceUnavailableError,
)

PRIMARY, SECONDARY = EndpointType.PRIMARY, EndpointType.SECONDARY
DOC = Path(__file__).resolve().parents[2] / "docs" / "endpoints.md"


class Stub:
    """What the default router reads of an endpoint."""

    def __init__(self, name: str, type: EndpointType = PRIMARY, online: bool = True,
                 metrics: EndpointMetrics | None = None, holds: tuple[str, ...] = ()) -> None:
        self.name = name
        self.type = type
        self.online = online
        self.metrics = metrics or EndpointMetrics()
        self.holds = holds

    def holds_connection(self, connection_id: str) -> bool:
        return connection_id in self.holds

    def __repr__(self) -> str:
        return self.name


def names(endpoints) -> list[str]:
    return [e.name for e in endpoints]


def negotiate_many(router: EndpointRouter, endpoints, times: int = 200) -> set[str]:
    request = NegotiateRequest("chat")
    return {router.get_negotiate_endpoint(request, endpoints).name for _ in range(times)}


# --- the default rules ----------------------------------------------------------------------


def test_default_negotiate_picks_only_online_primaries_when_there_are_some():
    endpoints = [Stub("p1"), Stub("p2"), Stub("p3", online=False), Stub("s1", SECONDARY)]
    assert negotiate_many(EndpointRouter(), endpoints) == {"p1", "p2"}


def test_default_negotiate_falls_back_to_online_secondaries():
    endpoints = [Stub("p1", online=False), Stub("s1", SECONDARY),
                 Stub("s2", SECONDARY), Stub("s3", SECONDARY, online=False)]
    assert negotiate_many(EndpointRouter(), endpoints) == {"s1", "s2"}


def test_default_negotiate_without_an_online_endpoint_raises_service_unavailable():
    endpoints = [Stub("p1", online=False), Stub("s1", SECONDARY, online=False)]
    with pytest.raises(ServiceUnavailableError, match="not connected yet"):
        EndpointRouter().get_negotiate_endpoint(NegotiateRequest("chat"), endpoints)
    with pytest.raises(ServiceUnavailableError):
        EndpointRouter().get_negotiate_endpoint(NegotiateRequest("chat"), [])


def test_default_negotiate_weighs_by_the_room_left_when_every_candidate_reports_capacity():
    random.seed(11)
    full = Stub("full", metrics=EndpointMetrics(880, 20, 1000))     # weight 100
    empty = Stub("empty", metrics=EndpointMetrics(0, 0, 1000))      # weight 1000
    request = NegotiateRequest("chat")
    picks = [EndpointRouter().get_negotiate_endpoint(request, [full, empty]).name
             for _ in range(3000)]
    share = picks.count("empty") / len(picks)
    assert 0.87 < share < 0.95          # 1000 / 1100 = 0.909
    over = Stub("over", metrics=EndpointMetrics(5000, 0, 1000))     # weight floor: 1
    picks = [EndpointRouter().get_negotiate_endpoint(request, [over, empty]).name
             for _ in range(3000)]
    assert 0 < picks.count("over") < 20


def test_default_negotiate_is_uniform_when_a_candidate_reports_no_capacity():
    random.seed(5)
    busy = Stub("busy", metrics=EndpointMetrics(990, 0, 1000))
    unknown = Stub("unknown", metrics=EndpointMetrics(0, 0, 0))
    request = NegotiateRequest("chat")
    picks = [EndpointRouter().get_negotiate_endpoint(request, [busy, unknown]).name
             for _ in range(2000)]
    assert 0.4 < picks.count("busy") / len(picks) < 0.6


def test_default_messages_go_to_every_online_endpoint_primary_or_secondary():
    endpoints = [Stub("p1"), Stub("p2", online=False), Stub("s1", SECONDARY)]
    router = EndpointRouter()
    assert names(router.get_endpoints_for_broadcast(endpoints)) == ["p1", "s1"]
    assert names(router.get_endpoints_for_user("alice", endpoints)) == ["p1", "s1"]
    assert names(router.get_endpoints_for_group("room", endpoints)) == ["p1", "s1"]


def test_default_connection_goes_to_the_endpoint_holding_it_else_everywhere():
    endpoints = [Stub("p1"), Stub("p2", holds=("c2",)), Stub("s1", SECONDARY),
                 Stub("p3", online=False, holds=("c3",))]
    router = EndpointRouter()
    assert names(router.get_endpoints_for_connection("c2", endpoints)) == ["p2"]
    assert names(router.get_endpoints_for_connection("elsewhere", endpoints)) == ["p1", "p2", "s1"]
    # Held by an endpoint that is offline now: every online endpoint (the relay may know it).
    assert names(router.get_endpoints_for_connection("c3", endpoints)) == ["p1", "p2", "s1"]


def test_negotiate_request_exposes_query_parameters():
    request = NegotiateRequest("chat", query="region=west&x=1&x=2&empty=")
    assert request.query_params == {"region": "west", "x": "2", "empty": ""}


def test_options_refuse_a_router_that_is_not_an_endpoint_router():
    with pytest.raises(ValueError, match="endpoint_router must be an EndpointRouter"):
        ServiceOptions(connection_string="Endpoint=http://a.example;AccessKey=k;Version=1.0;",
                       endpoint_router=object())  # type: ignore[arg-type]


# --- custom routers against two fake services ----------------------------------------------


class Chat(Hub):
    async def ping(self):
        return "pong"


async def two_endpoints(scenario, router: EndpointRouter | None, *,
                        second: EndpointType = PRIMARY, names=("east-1", "west-1")) -> None:
    """Run ``scenario(a, b, server)``: fake services a and b as endpoints ``names``."""
    async with anyio.create_task_group() as tg:
        a = await FakeService().start(tg)
        b = await FakeService().start(tg)
        server = HubServer(ServiceOptions(
            endpoints=[ServiceEndpoint(a.connection_string, name=names[0]),
                       ServiceEndpoint(b.connection_string, second, names[1])],
            connection_count=1, retry_delay=lambda n: 0.05, endpoint_router=router))
        server.map_hub("chat", Chat)
        async with server:
            await a.wait_connections(1)
            await b.wait_connections(1)
            await server.wait_online()
            await scenario(a, b, server)
        tg.cancel_scope.cancel()


async def received(service: FakeService, kind: type) -> list[ServiceMessage]:
    """Every message of ``kind`` received so far (after a round trip that flushes them)."""
    return [m for c in service.connections for m in c.received if isinstance(m, kind)]


def endpoint_port(doc: dict) -> int:
    return int(doc["url"].split(":")[2].split("/")[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_broadcast_user_and_group_choices_and_fallback_to_the_default(backend):
    calls: list[tuple] = []

    class Router(EndpointRouter):
        def get_endpoints_for_broadcast(self, endpoints):
            calls.append(("broadcast", names(endpoints)))
            return [e for e in endpoints if e.name == "east-1"]

        def get_endpoints_for_user(self, user_id, endpoints):
            calls.append(("user", user_id))
            if user_id.startswith("w"):
                return [e for e in endpoints if e.name == "west-1"]
            return super().get_endpoints_for_user(user_id, endpoints)

        async def get_endpoints_for_group(self, group, endpoints):  # async works too
            await anyio.sleep(0)
            calls.append(("group", group))
            return [e for e in endpoints if e.name.startswith(group[:4])]

    async def scenario(a, b, server):
        clients = server.hub_context("chat").clients
        await clients.all.send("x")
        await clients.user("walter").send("x")
        await clients.user("anna").send("x")                 # default: both
        await clients.users(["wendy", "walt"]).send("x")      # union: west only, once
        await clients.group("east-room").send("x")
        await clients.groups(["east-a", "west-b"]).send("x")  # union: both
        assert await sent_to(a, server, 0) == [
            "BroadcastDataMessage", "UserDataMessage", "GroupBroadcastDataMessage",
            "MultiGroupBroadcastDataMessage"]
        assert await sent_to(b, server, 1) == [
            "UserDataMessage", "UserDataMessage", "MultiUserDataMessage",
            "MultiGroupBroadcastDataMessage"]
        assert calls == [("broadcast", ["east-1", "west-1"]), ("user", "walter"),
                         ("user", "anna"), ("user", "wendy"), ("user", "walt"),
                         ("group", "east-room"), ("group", "east-a"), ("group", "west-b")]

    run(backend, lambda: two_endpoints(scenario, Router()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_connection_choice_applies_to_sends_group_changes_and_invocations(backend):
    class Router(EndpointRouter):
        def get_endpoints_for_connection(self, connection_id, endpoints):
            if connection_id.startswith("b-"):
                return [e for e in endpoints if e.name == "west-1"]
            return super().get_endpoints_for_connection(connection_id, endpoints)

    async def scenario(a, b, server):
        chat = server.hub_context("chat")
        await chat.clients.client("b-1").send("x")
        await chat.clients.clients(["b-2", "other"]).send("x")   # union: both
        await chat.groups.add_to_group("b-3", "room")
        assert await sent_to(a, server, 0) == [
            "MultiConnectionDataMessage"]
        assert await sent_to(b, server, 1) == [
            "MultiConnectionDataMessage", "MultiConnectionDataMessage",
            "JoinGroupWithAckMessage"]

    run(backend, lambda: two_endpoints(scenario, Router()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_user_group_changes_go_where_both_user_and_group_go(backend):
    class Router(EndpointRouter):
        def get_endpoints_for_user(self, user_id, endpoints):
            return [e for e in endpoints if e.name == "west-1"] if user_id == "w" else endpoints

        def get_endpoints_for_group(self, group, endpoints):
            return [e for e in endpoints if e.name == "east-1"] if group == "e" else endpoints

    async def scenario(a, b, server):
        user_groups = server.hub_context("chat").user_groups
        await user_groups.add_to_group("w", "any")     # west ∩ both = west
        await user_groups.add_to_group("x", "e")       # both ∩ east = east
        with pytest.raises(ServiceUnavailableError, match="chose no endpoint"):
            await user_groups.add_to_group("w", "e")   # west ∩ east = nobody
        await user_groups.remove_from_all_groups("w")  # no group: the user's endpoints
        assert await sent_to(a, server, 0) == [
            "UserJoinGroupWithAckMessage"]
        assert await sent_to(b, server, 1) == [
            "UserJoinGroupWithAckMessage", "UserLeaveGroupWithAckMessage"]

    run(backend, lambda: two_endpoints(scenario, Router()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_router_choosing_nobody_offline_or_foreign_endpoints_is_an_error(backend):
    foreign = ServiceEndpoint("Endpoint=http://elsewhere.example;AccessKey=k;Version=1.0;")

    class Router(EndpointRouter):
        def get_endpoints_for_broadcast(self, endpoints):
            return []

        def get_endpoints_for_user(self, user_id, endpoints):
            return [foreign]

        def get_endpoints_for_group(self, group, endpoints):
            return [e for e in endpoints if e.name == "west-1"]

        def get_negotiate_endpoint(self, request, endpoints):
            return None if request.user_id == "nobody" else foreign

    async def scenario(a, b, server):
        clients = server.hub_context("chat").clients
        with pytest.raises(ServiceUnavailableError, match="chose no endpoint for a broadcast"):
            await clients.all.send("x")
        with pytest.raises(ValueError, match="not an endpoint of hub 'chat'"):
            await clients.user("u").send("x")
        with pytest.raises(ServiceUnavailableError, match="chose no endpoint for a client"):
            await server.negotiate("chat", user_id="nobody")
        with pytest.raises(ValueError, match="not an endpoint of hub 'chat'"):
            await server.negotiate("chat")
        b.handshake_error = "down"
        await b.connections[0].drop()
        await anyio.sleep(0)
        with anyio.fail_after(5):
            while server.hub_endpoints("chat")[1].online:
                await anyio.sleep(0.01)
        with pytest.raises(ServiceUnavailableError, match="is online: west-1"):
            await clients.group("g").send("x")

    run(backend, lambda: two_endpoints(scenario, Router()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_negotiate_router_sees_the_request_and_only_offered_endpoints(backend):
    seen: list[Any] = []

    class Router(EndpointRouter):
        async def get_negotiate_endpoint(self, request, endpoints):
            seen.append((request.hub, request.user_id, request.query_params,
                         request.headers.get("x-region"), names(endpoints),
                         [e.online for e in endpoints], request.scope is not None))
            return endpoints[1]

    async def scenario(a, b, server):
        transport = httpx.ASGITransport(app=server.asgi(), root_path="/hubs")
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            response = await http.post("/hubs/chat/negotiate?negotiateVersion=1&user=u1&k=v",
                                       headers={"X-Region": "w"})
        assert response.status_code == 200
        assert endpoint_port(response.json()) == b.port
        assert seen == [("chat", "u1", {"user": "u1", "k": "v"}, "w",
                         ["east-1", "west-1"], [True, True], True)]

    run(backend, lambda: two_endpoints(scenario, Router()))


# --- the examples of docs/endpoints.md ------------------------------------------------------


def doc_example(name: str) -> dict[str, Any]:
    """Run the code block after ``<!-- example: {name} -->`` in docs/endpoints.md."""
    text = DOC.read_text(encoding="utf-8")
    match = re.search(rf"<!-- example: {name} -->\s*```python\n(.*?)```", text, re.S)
    assert match, f"no example {name!r} in {DOC}"
    namespace: dict[str, Any] = {}
    exec(compile(match.group(1), f"{DOC}:{name}", "exec"), namespace)
    return namespace


async def negotiate_http(server: HubServer, query: str = "") -> httpx.Response:
    transport = httpx.ASGITransport(app=server.asgi(), root_path="/hubs")
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
        return await http.post(f"/hubs/chat/negotiate?negotiateVersion=1{query}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_doc_region_router_needs_the_parameter_and_falls_back_for_unknown_regions(backend):
    router = doc_example("region-router")["RegionRouter"]()

    async def scenario(a, b, server):
        missing = await negotiate_http(server)
        assert missing.status_code == 400
        assert missing.json() == {"error": "the 'region' query parameter is required"}
        for _ in range(10):
            response = await negotiate_http(server, "&region=west")
            assert response.status_code == 200
            assert endpoint_port(response.json()) == b.port
        # The region is passed on to the relay, as every negotiate query is.
        assert response.json()["url"].endswith("&region=west")
        # Unknown: the default (the only primary is "east").
        for _ in range(10):
            assert endpoint_port((await negotiate_http(server, "&region=north")).json()) == a.port
        # Offline: the default too.
        b.handshake_error = "down"
        await b.connections[0].drop()
        with anyio.fail_after(5):
            while server.hub_endpoints("chat")[1].online:
                await anyio.sleep(0.01)
        assert endpoint_port((await negotiate_http(server, "&region=west")).json()) == a.port

    run(backend, lambda: two_endpoints(scenario, router, second=SECONDARY,
                                       names=("east", "west")))


@pytest.mark.parametrize("backend", BACKENDS)
def test_doc_east_groups_router_keeps_east_groups_in_the_east(backend):
    router = doc_example("east-groups-router")["EastGroupsRouter"]()

    async def scenario(a, b, server):
        clients = server.hub_context("chat").clients
        await clients.group("east-news").send("x")
        await clients.group("news").send("x")
        await clients.all.send("x")
        assert await sent_to(a, server, 0) == [
            "GroupBroadcastDataMessage", "GroupBroadcastDataMessage", "BroadcastDataMessage"]
        assert await sent_to(b, server, 1) == [
            "GroupBroadcastDataMessage", "BroadcastDataMessage"]
        assert [m.group_name for m in await received(b, GroupBroadcastDataMessage)] == ["news"]

    run(backend, lambda: two_endpoints(scenario, router))


@pytest.mark.parametrize("backend", BACKENDS)
def test_doc_fewest_clients_router_follows_the_reported_counts(backend):
    router = doc_example("fewest-clients-router")["FewestClientsRouter"]()

    async def scenario(a, b, server):
        a.metrics = {"clientcount": 40, "servercount": 1}
        b.metrics = {"clientcount": 3, "servercount": 1}
        await wait_metrics(server, [40, 3])
        for _ in range(5):
            assert endpoint_port(await server.negotiate("chat")) == b.port
        b.metrics = {"clientcount": 50, "servercount": 1}
        await wait_metrics(server, [40, 50])
        for _ in range(5):
            assert endpoint_port(await server.negotiate("chat")) == a.port

    async def wait_metrics(server, counts):
        with anyio.fail_after(5):
            while [e.metrics.client_connection_count
                   for e in server.hub_endpoints("chat")] != counts:
                await anyio.sleep(0.01)

    async def with_fast_status():
        async with anyio.create_task_group() as tg:
            a = await FakeService().start(tg)
            b = await FakeService().start(tg)
            server = HubServer(ServiceOptions(
                endpoints=[ServiceEndpoint(a.connection_string, name="a"),
                           ServiceEndpoint(b.connection_string, SECONDARY, name="b")],
                connection_count=1, status_interval=0.05, endpoint_router=router))
            server.map_hub("chat", Chat)
            async with server:
                await scenario(a, b, server)
            tg.cancel_scope.cancel()

    run(backend, with_fast_status)


# Keep the imported message types referenced: they name what the assertions expect.
_EXPECTED = (BroadcastDataMessage, GroupBroadcastDataMessage, JoinGroupWithAckMessage,
             MultiConnectionDataMessage, MultiGroupBroadcastDataMessage, MultiUserDataMessage,
             UserDataMessage, UserJoinGroupWithAckMessage, NegotiateError)
