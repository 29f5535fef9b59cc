"""The management SDK (``relaycore.sdk.ServiceManager``) against the real relay, seen by the
official ``@microsoft/signalr`` client under Node.js, in JSON and MessagePack, over both
transports (REST calls, Weak server connections).

Clients connect with a ``negotiate()`` redirect. Each call's effect is proved on the clients:
what each received is taken after a marker broadcast (``settle``), so "nobody else got it" needs
no sleeping; the counts ``report=True`` returns are checked against it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
import trio

from relaycore.sdk import ServiceHubContext, ServiceManager, ServiceOptions, TransportType

from .harness import WAIT, NodeAgent, RelayProcess
from .serverless import settle

pytestmark = pytest.mark.e2e

METHODS = ["m", "mark"]


@pytest.fixture(params=["json", "messagepack"])
def protocol(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=list(TransportType), ids=lambda t: t.name.lower())
def transport(request: pytest.FixtureRequest) -> TransportType:
    return TransportType(request.param)


@contextlib.asynccontextmanager
async def hub_context(relay: RelayProcess, transport: TransportType
                      ) -> AsyncIterator[ServiceHubContext]:
    options = ServiceOptions(connection_string=relay.connection_string, connection_count=1,
                             retry_delay=lambda n: 0.2, shutdown_timeout=2)
    async with ServiceManager(options, transport=transport) as manager:
        yield await manager.create_hub_context("chat")


async def connect(agent: NodeAgent, chat: ServiceHubContext, name: str, user: str | None,
                  protocol: str) -> str:
    """A Node connection made with the redirect ``negotiate()`` returns."""
    redirect = await chat.negotiate(user_id=user)
    return await agent.connect(name, redirect.url, redirect.access_token, protocol=protocol,
                               methods=METHODS)


def got(names: str, *args: object, everyone: str = "a1 a2 b anon") -> dict[str, list]:
    """The ``settle()`` result when ``names`` received ``m(*args)`` and the rest of
    ``everyone`` nothing."""
    return {n: [("m", list(args))] if n in names.split() else [] for n in everyone.split()}


async def test_each_management_call_has_its_effect_on_the_clients(
        relay: RelayProcess, node_agent: NodeAgent, protocol: str,
        transport: TransportType) -> None:
    agent = node_agent
    async with hub_context(relay, transport) as chat:
        ids = {}
        for name, user in (("a1", "alice"), ("a2", "alice"), ("b", "bob"), ("anon", None)):
            ids[name] = await connect(agent, chat, name, user, protocol)

        # Sends, each counting the connections it reached.
        binary = b"\x00\xff" if protocol == "messagepack" else "AP8="  # JSON: base64
        assert await chat.clients.all.send("m", "héllo ✓", {"n": [1, 2.5, None, True]},
                                           b"\x00\xff", report=True) == 4
        assert await settle(agent, chat) == got("a1 a2 b anon", "héllo ✓",
                                                {"n": [1, 2.5, None, True]}, binary)
        assert await chat.clients.all_except([ids["b"]]).send("m", 2, report=True) == 3
        assert await settle(agent, chat) == got("a1 a2 anon", 2)
        assert await chat.clients.client(ids["a1"]).send("m", 3, report=True) == 1
        assert await settle(agent, chat) == got("a1", 3)
        assert await chat.clients.clients([ids["a2"], ids["b"]]).send("m", 4, report=True) == 2
        assert await settle(agent, chat) == got("a2 b", 4)
        assert await chat.clients.user("alice").send("m", 5, report=True) == 2
        assert await settle(agent, chat) == got("a1 a2", 5)
        assert await chat.clients.users(["alice", "bob"]).send("m", 6, report=True) == 3
        assert await settle(agent, chat) == got("a1 a2 b", 6)
        assert await chat.clients.user("nobody").send("m", 7, report=True) == 0
        assert await settle(agent, chat) == got("")

        # Connections in groups.
        await chat.groups.add_to_group(ids["a1"], "g1")
        await chat.groups.add_to_group(ids["b"], "g1")
        await chat.groups.add_to_group(ids["anon"], "g2")
        assert await chat.client_manager.group_exists("g1")
        assert not await chat.client_manager.group_exists("g9")
        assert await chat.clients.group("g1").send("m", 8, report=True) == 2
        assert await settle(agent, chat) == got("a1 b", 8)
        assert await chat.clients.group_except("g1", [ids["b"]]).send("m", 9, report=True) == 1
        assert await settle(agent, chat) == got("a1", 9)
        assert await chat.clients.groups(["g1", "g2"]).send("m", 10, report=True) == 3
        assert await settle(agent, chat) == got("a1 b anon", 10)
        await chat.groups.remove_from_group(ids["b"], "g1")
        assert await chat.clients.group("g1").send("m", 11, report=True) == 1
        assert await settle(agent, chat) == got("a1", 11)

        # Users in groups.
        await chat.user_groups.add_to_group("alice", "vip", ttl=600)
        assert await chat.user_groups.is_user_in_group("alice", "vip")
        assert not await chat.user_groups.is_user_in_group("bob", "vip")
        assert await chat.clients.group("vip").send("m", 12, report=True) == 2
        assert await settle(agent, chat) == got("a1 a2", 12)
        await chat.user_groups.remove_from_group("alice", "vip")
        assert not await chat.user_groups.is_user_in_group("alice", "vip")
        await chat.user_groups.add_to_group("bob", "x")
        await chat.user_groups.add_to_group("bob", "y")
        # The REST API has no multi-group send: one call per group, so bob (in both) gets it
        # twice over REST (a reported send goes over REST under either transport), once over
        # a server connection (docs/serverless.md).
        assert await chat.clients.groups(["x", "y"]).send("m", 13, report=True) == 2
        assert await settle(agent, chat) == {**got(""), "b": [("m", [13])] * 2}
        await chat.clients.groups(["x", "y"]).send("m", 14)
        times = 2 if transport is TransportType.TRANSIENT else 1
        assert await settle(agent, chat) == {**got(""), "b": [("m", [14])] * times}
        await chat.user_groups.remove_from_all_groups("bob")
        assert await chat.clients.groups(["vip", "x", "y"]).send("m", 15, report=True) == 0
        assert await settle(agent, chat) == got("")

        # Existence checks.
        assert await chat.client_manager.connection_exists(ids["a1"])
        assert not await chat.client_manager.connection_exists("no-such-connection")
        assert await chat.client_manager.user_exists("bob")
        assert not await chat.client_manager.user_exists("nobody")

        # Closing, with the reason the client's onclose gets.
        await chat.client_manager.close_connection(ids["anon"], reason="bye anon")
        assert "bye anon" in (await agent.wait_closed("anon") or "")
        await chat.client_manager.close_user_connections("alice", reason="alice out",
                                                         excluded=[ids["a2"]])
        assert "alice out" in (await agent.wait_closed("a1") or "")
        await chat.groups.add_to_group(ids["b"], "doomed")
        await chat.client_manager.close_group_connections("doomed", reason="group closed")
        assert "group closed" in (await agent.wait_closed("b") or "")
        assert await settle(agent, chat) == {"a2": []}
        assert not await chat.client_manager.connection_exists(ids["b"])
        await chat.client_manager.close_connections(reason="maintenance")
        assert "maintenance" in (await agent.wait_closed("a2") or "")
        assert agent.live() == []
        assert await chat.clients.all.send("m", 16, report=True) == 0


async def test_a_send_to_a_user_who_went_offline_reports_zero_recipients(
        relay: RelayProcess, node_agent: NodeAgent, transport: TransportType) -> None:
    async with hub_context(relay, transport) as chat:
        await connect(node_agent, chat, "carol", "carol", "json")
        assert await chat.clients.user("carol").send("m", "online?", report=True) == 1
        assert [m.args for m in await node_agent.wait_messages("carol", 1)] == [["online?"]]
        node_agent.take("carol")
        await node_agent.stop("carol")
        # stop() resolves without waiting for the relay to read the close: ask until it did.
        with trio.fail_after(WAIT):
            while await chat.client_manager.user_exists("carol"):
                await trio.sleep(0.02)
        assert await chat.clients.user("carol").send("m", "anyone?", report=True) == 0
