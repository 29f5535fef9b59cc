"""Serverless mode end to end: the real relay with its upstream pointed at an
``UpstreamHandler`` (``relaycore.sdk.upstream``, run as the ASGI app it is), the official
``@microsoft/signalr`` client under Node.js, and the management SDK sending from the handlers.

* Connected, disconnected and invocation events arrive signed with the relay's key (the key of
  the upstream-signature vector in ``tests/vectors/service-protocol.json``), with the user,
  and the body of each kind; invocation results come back to the client, in JSON and
  MessagePack; a handler error or a missing handler becomes a completion error.
* The upstream down for 10 seconds: every connected and disconnected event of that time still
  arrives once it is back (the relay retries them), each exactly once and in order.
* The upstream answering 500, too slow, or refusing connections: the invocation gets a
  completion error and the client stays connected.
* A forged or missing signature is refused by the handler with 401.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import httpx
import pytest
import trio

from relaycore.protocol import upstream_signature
from relaycore.relay._http import Request, Response
from relaycore.sdk import HubException, ServiceHubContext, ServiceManager, ServiceOptions
from relaycore.sdk.upstream import UpstreamEvent, UpstreamHandler, verify_signature
from relayhelpers import load_vectors

from .harness import WAIT, AgentError, NodeAgent, NodeAgentFactory, RelayFactory, RelayProcess
from .serverless import UPSTREAM_TEMPLATE, UpstreamServer, free_port

pytestmark = pytest.mark.e2e

VECTOR = load_vectors("service-protocol.json")["related_vectors"]["upstream_signature"]
#: The relay signs with the vector's first key.
KEY = VECTOR["access_keys"][0]


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> UpstreamServer:
    server = UpstreamServer(UpstreamHandler(access_keys=[KEY]))
    await server.start(nursery)
    return server


@pytest.fixture(params=["json", "messagepack"])
def protocol(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def start_relay(relay_factory: RelayFactory, upstream_url: str,
                      **env: str) -> RelayProcess:
    return await relay_factory(args=["--upstream", upstream_url], access_key=KEY, env=env)


async def open_chat(relay: RelayProcess) -> tuple[ServiceManager, ServiceHubContext]:
    manager = ServiceManager(ServiceOptions(connection_string=relay.connection_string))
    return manager, await manager.create_hub_context("chat")


async def connect(agent: NodeAgent, chat: ServiceHubContext, name: str, user: str | None,
                  protocol: str = "json", methods: tuple[str, ...] = ("newMessage",)) -> str:
    redirect = await chat.negotiate(user_id=user)
    return await agent.connect(name, redirect.url, redirect.access_token, protocol=protocol,
                               methods=methods)


def hmac_signature(connection_id: str, key: str) -> str:
    """§13.3, as the vector was computed."""
    return "sha256=" + hmac.new(key.encode(), connection_id.encode(), hashlib.sha256).hexdigest()


# ---------------------------------------------------------------------------------------------


async def test_upstream_gets_signed_events_and_invocation_results_come_back(
        relay_factory: RelayFactory, node_agent_factory: NodeAgentFactory,
        upstream: UpstreamServer, protocol: str) -> None:
    # The vector, through the helper the app uses; the relay's key is its first key.
    assert verify_signature(VECTOR["connection_id"], VECTOR["header_value_example"], [KEY])
    assert upstream_signature(VECTOR["connection_id"], VECTOR["access_keys"]) == (
        VECTOR["header_value_example"])

    relay = await start_relay(relay_factory, upstream.url_template)
    agent = await node_agent_factory(relay)
    manager, chat = await open_chat(relay)
    handler = upstream.handler

    @handler.on_message("broadcast")
    async def broadcast(event: UpstreamEvent, text: str) -> dict[str, Any]:
        reached = await chat.clients.all.send("newMessage", event.user_id, text, report=True)
        return {"delivered": reached, "protocol": event.protocol}

    @handler.on_message("add")
    async def add(event: UpstreamEvent, a: int, b: int) -> int:
        return a + b

    @handler.on_message("refuse")
    async def refuse(event: UpstreamEvent) -> None:
        raise HubException("not today")

    try:
        ids = {"a": await connect(agent, chat, "a", "alice", protocol),
               "b": await connect(agent, chat, "b", "bob", protocol)}
        await upstream.wait_for(lambda: len(upstream.events("connected")) == 2,
                                what="two connected events")

        assert await agent.invoke("a", "broadcast", "hi all") == {"delivered": 2,
                                                                 "protocol": protocol}
        for name in ("a", "b"):
            messages = await agent.wait_messages(name, 1)
            assert [(m.method, m.args) for m in messages] == [("newMessage", ["alice", "hi all"])]
        assert await agent.invoke("b", "add", 2, 3) == 5
        with pytest.raises(AgentError, match="HubException: not today"):
            await agent.invoke("a", "refuse")
        with pytest.raises(AgentError, match="status code 404"):  # no handler for it
            await agent.invoke("a", "nothing")
        await agent.send("a", "broadcast", "no answer expected")  # non-blocking
        await agent.wait_messages("b", 2)
        assert await agent.state("a") == "Connected"

        await agent.stop("b")
        await upstream.wait_for(lambda: len(upstream.events("disconnected")) == 1,
                                what="b's disconnected event")
        # A call is recorded once answered: the last broadcast may still be finishing.
        await upstream.wait_for(lambda: len([c for c in upstream.calls
                                             if c.category == "messages"]) == 5,
                                what="the five invocations")
    finally:
        await manager.aclose()

    calls = upstream.calls
    assert [(c.event, c.connection_id, c.user_id) for c in calls if c.category == "connections"
            ] == [("connected", ids["a"], "alice"), ("connected", ids["b"], "bob"),
                  ("disconnected", ids["b"], "bob")]
    assert [c.event for c in calls if c.category == "messages"] == [
        "broadcast", "add", "refuse", "nothing", "broadcast"]
    for call in calls:
        assert call.signed_by([KEY]), call
        assert not call.signed_by(["another-key"]), call
        assert call.headers["x-asrs-signature"].lower() == hmac_signature(call.connection_id,
                                                                           KEY)
        assert call.headers["x-asrs-hub"] == "chat"
        assert call.status == (404 if call.event == "nothing" else 200), call
    assert json.loads(calls[0].body) == {"type": 10}
    assert json.loads(upstream.events("disconnected")[0].body)["type"] == 11
    content_type = "application/x-msgpack" if protocol == "messagepack" else "application/json"
    assert {c.headers["content-type"] for c in calls if c.category == "messages"} == {
        content_type}


async def test_upstream_down_for_10_seconds_still_receives_every_connection_event(
        relay_factory: RelayFactory, node_agent_factory: NodeAgentFactory,
        upstream: UpstreamServer, nursery: trio.Nursery) -> None:
    relay = await start_relay(relay_factory, upstream.url_template,
                              RELAYCORE_UPSTREAM_RETRY_MAX_DELAY="0.5")
    agent = await node_agent_factory(relay)
    manager, chat = await open_chat(relay)
    try:
        ids = {"c0": await connect(agent, chat, "c0", "u0")}
        await upstream.wait_for(lambda: len(upstream.events("connected")) == 1,
                                what="c0's connected event")

        await upstream.go_down()
        down_at = trio.current_time()
        for name in ("c1", "c2", "c3"):
            ids[name] = await connect(agent, chat, name, f"u{name[1]}")
        for name in ("c0", "c1"):
            await agent.stop(name)
        with trio.fail_after(WAIT):  # the relay saw them go (nothing else tells)
            while await chat.client_manager.user_exists("u0") or \
                    await chat.client_manager.user_exists("u1"):
                await trio.sleep(0.05)
        assert len(upstream.calls) == 1  # nothing got through while down
        await trio.sleep_until(down_at + 10)  # the outage itself, not a wait for a condition
        await upstream.start(nursery)

        await upstream.wait_for(
            lambda: len(upstream.events("connected")) == 4
            and len(upstream.events("disconnected")) == 2,
            what="every event of the outage", timeout=WAIT)
        for name in ("c2", "c3"):
            await agent.stop(name)
        await upstream.wait_for(lambda: len(upstream.events("disconnected")) == 4,
                                what="the last disconnected events")
    finally:
        await manager.aclose()

    per_connection: dict[str, list[str]] = {}
    for call in upstream.calls:
        per_connection.setdefault(call.connection_id, []).append(call.event)
        assert call.status == 200 and call.signed_by([KEY])
    assert per_connection == {ids[n]: ["connected", "disconnected"] for n in ids}, (
        upstream.describe())


@pytest.mark.parametrize("failure", ["500", "timeout", "refused"])
async def test_upstream_failure_gives_a_completion_error_and_the_client_stays_connected(
        relay_factory: RelayFactory, node_agent_factory: NodeAgentFactory,
        upstream: UpstreamServer, failure: str) -> None:
    release = trio.Event()

    async def script(request: Request) -> Response | None:
        if request.headers.get("x-asrs-category") != "messages":
            return None
        if failure == "500":
            return Response(500)
        await release.wait()  # longer than the relay's upstream timeout
        return None

    upstream.script = script
    url = (UPSTREAM_TEMPLATE.format(port=free_port()) if failure == "refused"
           else upstream.url_template)
    relay = await start_relay(relay_factory, url, RELAYCORE_UPSTREAM_TIMEOUT="1",
                              RELAYCORE_UPSTREAM_RETRY_MAX_DELAY="0.5")
    agent = await node_agent_factory(relay)
    manager, chat = await open_chat(relay)
    try:
        await connect(agent, chat, "a", "alice", methods=("newMessage",))
        expected = {"500": "Invocation failed, status code 500",
                    "timeout": "Invocation failed: the upstream could not be reached",
                    "refused": "Invocation failed: the upstream could not be reached"}[failure]
        with pytest.raises(AgentError, match=expected):
            await agent.invoke("a", "broadcast", "hello?")
        release.set()
        assert await agent.state("a") == "Connected"
        assert await chat.clients.user("alice").send("newMessage", "still", "here",
                                                     report=True) == 1
        assert [m.args for m in await agent.wait_messages("a", 1)] == [["still", "here"]]
    finally:
        release.set()
        await manager.aclose()


async def test_forged_or_missing_signature_is_refused_with_401(upstream: UpstreamServer) -> None:
    headers = {"X-ASRS-Connection-Id": "c1", "X-ASRS-Hub": "chat",
               "X-ASRS-Category": "connections", "X-ASRS-Event": "connected",
               "Content-Type": "application/json"}
    forged = {**headers, "X-ASRS-Signature": hmac_signature("c1", "not-the-key")}
    other_connection = {**headers, "X-ASRS-Signature": hmac_signature("c2", KEY)}
    valid = {**headers, "X-ASRS-Signature": hmac_signature("c1", KEY)}
    url = upstream.url_template.format(hub="chat", category="connections", event="connected")
    async with httpx.AsyncClient(timeout=WAIT) as http:
        with trio.fail_after(WAIT):
            answers = [await http.post(url, headers=h, content=b'{"type":10}')
                       for h in (headers, forged, other_connection, valid)]
    assert [a.status_code for a in answers] == [401, 401, 401, 200]
    for answer in answers[:3]:
        assert "X-ASRS-Signature" in answer.json()["message"]
