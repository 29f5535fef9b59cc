"""Server-Sent Events and long polling with the official ``@microsoft/signalr`` client under
Node.js (``transport: HttpTransportType.ServerSentEvents`` or ``LongPolling``, negotiated),
against the real relay (client-protocol §2.2-§2.4): JSON over Server-Sent Events, JSON and
MessagePack over long polling.

Sends come from the REST API and from an app server (relaycore's SDK, ``HubServer``, run in
this test's trio loop with one server connection, so that its sends keep their order). As in
test_signalr_node.py, "reaches nobody else" is proved without sleeping: a broadcast marker
follows the sends under test, and what a client got before it is what they delivered.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Sequence

import pytest
import trio

from relaycore.sdk import Hub, HubServer, ServiceOptions

from .harness import AgentError, NodeAgent, NodeAgentFactory, RelayFactory, RelayProcess, Rest

pytestmark = pytest.mark.e2e

#: (transport, hub protocol): every pair the official client uses (it never takes
#: Server-Sent Events with MessagePack, a Binary protocol).
CASES = [("ServerSentEvents", "json"), ("LongPolling", "json"), ("LongPolling", "messagepack")]

_markers = itertools.count()


@pytest.fixture(params=CASES, ids=["sse-json", "lp-json", "lp-messagepack"])
def case(request: pytest.FixtureRequest) -> tuple[str, str]:
    return request.param  # type: ignore[no-any-return]


async def connect(agent: NodeAgent, relay: RelayProcess, case: tuple[str, str],
                  users: dict[str, str | None], hub: str = "chat") -> dict[str, str]:
    """Connect each ``name: user`` over ``case``'s transport; returns name -> connection id."""
    transport, protocol = case
    ids = {}
    for name, user in users.items():
        ids[name] = await agent.connect(name, relay.client_url(hub), relay.client_token(hub, user),
                                        protocol=protocol, transport=transport)
        assert ids[name], f"{name} has no connection id"
    return ids


async def barrier(agent: NodeAgent, rest: Rest, names: Sequence[str]) -> dict[str, list[list]]:
    """Broadcast a marker, wait until each of ``names`` has it, and return what each received
    before it (the arguments of its ``notify`` calls)."""
    marker = f"marker-{next(_markers)}"
    await rest.send_all("notify", marker)
    await agent.wait_for(
        lambda: all(any(m.args == [marker] for m in agent.messages.get(n, [])) for n in names),
        what=f"the marker {marker!r} on {list(names)}")
    got = {}
    for name in names:
        messages = agent.take(name)
        assert messages[-1].args == [marker], f"{name} received after the marker: {messages}"
        got[name] = [m.args for m in messages[:-1]]
    return got


async def test_every_kind_of_send_reaches_its_clients_only(
        relay: RelayProcess, rest: Rest, node_agent: NodeAgent, case: tuple[str, str]) -> None:
    users = {"a1": "alice", "a2": "alice", "b": "bob", "anon": None}
    ids = await connect(node_agent, relay, case, users)
    names = list(users)

    await rest.send_all("notify", "everyone", {"n": [1, 2.5, None, True]})
    assert await barrier(node_agent, rest, names) == {
        n: [["everyone", {"n": [1, 2.5, None, True]}]] for n in names}

    await rest.send_user("alice", "notify", "to alice")
    await rest.send_connection(ids["b"], "notify", "to b")
    await rest.add_to_group("room", ids["a2"])
    await rest.add_to_group("room", ids["anon"])
    await rest.send_group("room", "notify", "to the room")
    await rest.send_all("notify", "not a1", excluded=[ids["a1"]])
    assert await barrier(node_agent, rest, names) == {
        "a1": [["to alice"]],
        "a2": [["to alice"], ["to the room"], ["not a1"]],
        "b": [["to b"], ["not a1"]],
        "anon": [["to the room"], ["not a1"]],
    }


async def test_large_and_multi_line_messages_arrive_whole(
        relay: RelayProcess, rest: Rest, node_agent: NodeAgent, case: tuple[str, str]) -> None:
    await connect(node_agent, relay, case, {"a": "alice"})
    texts = ["line one\nline two\r\nline three", "x" * 100_000, "é" * 30_000]
    for text in texts:
        await rest.send_user("alice", "notify", text)
    assert await barrier(node_agent, rest, ["a"]) == {"a": [[text] for text in texts]}


async def test_client_stop_removes_the_connection_at_once(
        relay: RelayProcess, rest: Rest, node_agent: NodeAgent, case: tuple[str, str]) -> None:
    ids = await connect(node_agent, relay, case, {"b": "bob", "c": "carol"})
    await rest.add_to_group("solo", ids["b"])

    await node_agent.stop("b")
    assert await node_agent.wait_closed("b") is None
    response = await rest.wait_status("HEAD", f"/connections/{ids['b']}", 404, timeout=5)
    assert response.headers.get("x-ms-error-code") == "Warning.Connection.NotExisted"
    await rest.head("/users/bob", expect=404)
    await rest.head("/groups/solo", expect=404)
    assert await barrier(node_agent, rest, ["c"]) == {"c": []}


async def test_a_close_by_the_service_reaches_the_client_with_its_reason(
        relay: RelayProcess, rest: Rest, node_agent: NodeAgent, case: tuple[str, str]) -> None:
    ids = await connect(node_agent, relay, case, {"a": "alice", "b": "bob", "c": "carol"})

    await rest.close_connection(ids["a"], reason="kicked by the e2e test")
    error = await node_agent.wait_closed("a")
    assert error is not None and "kicked by the e2e test" in error, error
    await rest.close_user("bob", reason="bob logged out")
    error = await node_agent.wait_closed("b")
    assert error is not None and "bob logged out" in error, error
    await rest.head(f"/connections/{ids['a']}", expect=404)
    assert await barrier(node_agent, rest, ["c"]) == {"c": []}
    assert node_agent.live() == ["c"]


async def test_messagepack_is_never_taken_over_server_sent_events(
        relay: RelayProcess, node_agent: NodeAgent) -> None:
    """Negotiate lists Server-Sent Events with the Text format only: a MessagePack client
    limited to it finds no transport (client-protocol §1.3)."""
    with pytest.raises(AgentError, match="transports"):
        await node_agent.connect("m", relay.client_url(), relay.client_token(),
                                 protocol="messagepack", transport="ServerSentEvents")


async def test_only_the_configured_transports_are_offered(
        relay_factory: RelayFactory, node_agent_factory: NodeAgentFactory) -> None:
    relay = await relay_factory(args=["--transports", "WebSockets,LongPolling"])
    agent = await node_agent_factory(relay)
    with pytest.raises(AgentError, match="transports"):
        await agent.connect("sse", relay.client_url(), relay.client_token(),
                            transport="ServerSentEvents")
    assert await agent.connect("lp", relay.client_url(), relay.client_token(),
                               transport="LongPolling")


# -- with an app server -------------------------------------------------------------------------


class Chat(Hub):
    async def echo(self, value: object) -> object:
        return value

    async def whoami(self) -> dict[str, str | None]:
        return {"user": self.context.user_id, "connection": self.context.connection_id}

    async def join(self, group: str) -> None:
        await self.groups.add_to_group(self.context.connection_id, group)

    async def tell_group(self, group: str, text: str) -> None:
        await self.clients.group(group).send("notify", text)

    async def burst(self, count: int) -> int:
        """``count`` numbered broadcasts, one after the other."""
        for number in range(count):
            await self.clients.all.send("notify", number)
        return count


@pytest.fixture
async def app_server(relay: RelayProcess) -> AsyncIterator[HubServer]:
    """An app server for the relay's ``chat`` hub, in this test's trio loop; one server
    connection, so that what one hub method sends arrives in the order it was sent."""
    server = HubServer(ServiceOptions(connection_string=relay.connection_string,
                                      connection_count=1))
    server.map_hub("chat", Chat)
    async with server:
        yield server


async def test_hub_methods_of_an_app_server_answer_and_send(
        relay: RelayProcess, rest: Rest, node_agent: NodeAgent, app_server: HubServer,
        case: tuple[str, str]) -> None:
    ids = await connect(node_agent, relay, case, {"a": "alice", "b": "bob"})

    assert await node_agent.invoke("a", "whoami") == {"user": "alice", "connection": ids["a"]}
    value = {"list": [1, "two", None], "nested": {"x": 1.5}}
    assert await node_agent.invoke("b", "echo", value) == value
    with pytest.raises(AgentError, match="nothing"):
        await node_agent.invoke("a", "nothing")

    await node_agent.invoke("b", "join", "team")
    await node_agent.invoke("a", "tell_group", "team", "hello team")
    assert await barrier(node_agent, rest, ["a", "b"]) == {"a": [], "b": [["hello team"]]}


async def test_a_burst_of_a_thousand_messages_arrives_complete_and_in_order(
        relay: RelayProcess, rest: Rest, node_agent: NodeAgent, app_server: HubServer,
        case: tuple[str, str]) -> None:
    # Three clients: the app server's broadcasts go through the fan-out's shared frames.
    await connect(node_agent, relay, case, {"a": "alice", "b": "bob", "c": "carol"})
    count = 1000
    assert await node_agent.invoke("a", "burst", count) == count
    for name in ("a", "b", "c"):
        got = await node_agent.wait_messages(name, count, timeout=60)
        assert [m.args for m in got] == [[number] for number in range(count)], name
        node_agent.take(name)
    assert await barrier(node_agent, rest, ["a", "b", "c"]) == {"a": [], "b": [], "c": []}


async def test_a_relay_that_drains_tells_its_clients_to_reconnect(
        relay_factory: RelayFactory, node_agent_factory: NodeAgentFactory,
        case: tuple[str, str]) -> None:
    relay = await relay_factory()
    agent = await node_agent_factory(relay)
    await connect(agent, relay, case, {"a": "alice"})
    with trio.fail_after(30):
        await relay.stop()  # SIGTERM: the drain, then a clean exit
    error = await agent.wait_closed("a")
    assert error is not None and "shutting down" in error, error
