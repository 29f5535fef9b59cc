"""The two-pod story end to end: the real relay, two real app server processes (the pods of
``examples/two-pods``, FastAPI on uvicorn, using relaycore's server SDK) and the official
``@microsoft/signalr`` client under Node.js, in JSON and in MessagePack.

Every client is given pod 1's hub URL; its negotiate redirects it to the relay, which binds it
to a server connection of pod 1 or pod 2 (spread: the server with the fewest clients). The
``whoami`` hub method answers from the pod the client is bound to, which is how the tests see
the binding. Sends are made by the pods' HTTP endpoints (``hub_context("chat")``), mostly from
pod 2, one at a time (each waited for by its recipients). Absence of a message is proved by a
later marker message that every client receives.
"""

from __future__ import annotations

import pytest

from .harness import NodeAgent, Received, RelayProcess
from .pods import PodFactory, PodProcess, start_pods

pytestmark = pytest.mark.e2e

PROTOCOLS = ["json", "messagepack"]


@pytest.fixture
async def pods(relay: RelayProcess, pod_factory: PodFactory) -> tuple[PodProcess, PodProcess]:
    return await start_pods(pod_factory, relay)


def notify(text: str, pod: str) -> Received:
    return Received("notify", [text, pod])


async def connect_all(agent: NodeAgent, pod: PodProcess, users: dict[str, str], protocol: str,
                      **options: object) -> dict[str, str]:
    """Connect each named client as its user through ``pod``; returns name -> serving pod."""
    served: dict[str, str] = {}
    for name, user in users.items():
        connection_id = await agent.connect(name, pod.hub_url(user=user), None,
                                            protocol=protocol, **options)
        assert connection_id, f"{name} got no connection id"
        who = await agent.invoke(name, "whoami")
        assert who["user"] == user and who["connection"] == connection_id, who
        served[name] = who["pod"]
    return served


async def deliver(agent: NodeAgent, pod: PodProcess, path: str, text: str,
                  recipients: list[str]) -> None:
    """``pod`` sends ``text`` (``POST path``); wait until each recipient has it. One send at
    a time: a pod may write two sends on two server connections, whose order the relay
    need not keep."""
    seen = {name: len(agent.messages.get(name, [])) for name in recipients}
    answer = await pod.post(path, text=text)
    assert answer["sent_by"] == pod.name, answer
    expected = notify(text, pod.name)
    for name in recipients:
        await agent.wait_for(
            lambda name=name: expected in agent.messages.get(name, [])[seen[name]:],
            what=f"{expected} on {name!r}")


async def expect_exactly(agent: NodeAgent, expected: dict[str, list[Received]]) -> None:
    """Each client received exactly ``expected`` (in order), the last of which is a marker
    that every client gets: nothing else can still be on its way."""
    for name, messages in expected.items():
        await agent.wait_messages(name, len(messages))
    for name, messages in expected.items():
        assert agent.take(name) == messages, f"{name}\n{agent.describe()}"


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_sends_from_pod_2_reach_clients_that_negotiated_with_pod_1(
        pods: tuple[PodProcess, PodProcess], node_agent: NodeAgent, protocol: str) -> None:
    pod1, pod2 = pods
    users = {"alice": "alice", "alice2": "alice", "bob": "bob", "carol": "carol"}
    served = await connect_all(node_agent, pod1, users, protocol)
    # The relay spreads the clients of pod 1's negotiate over both pods' server connections.
    assert set(served.values()) == {"pod 1", "pod 2"}, served
    ids = node_agent.connection_ids

    await pod1.wait_negotiations(len(users))
    assert pod2.negotiations() == 0

    # Group membership set on both pods: bob joins through a hub method (on the pod bob is
    # bound to), alice is added by pod 1's hub context.
    assert await node_agent.invoke("bob", "join", "room") is None
    await pod1.request("PUT", f"/groups/room/connections/{ids['alice']}")

    # From pod 2: one connection, one user (both of alice's connections), one group, everyone.
    await deliver(node_agent, pod2, f"/connections/{ids['alice']}/notify", "to a connection",
                  ["alice"])
    await deliver(node_agent, pod2, "/notify/alice", "to a user", ["alice", "alice2"])
    await deliver(node_agent, pod2, "/groups/room/notify", "to a group", ["alice", "bob"])
    await deliver(node_agent, pod2, "/broadcast", "to everyone", list(users))
    everyone = notify("to everyone", "pod 2")
    await expect_exactly(node_agent, {
        "alice": [notify("to a connection", "pod 2"), notify("to a user", "pod 2"),
                  notify("to a group", "pod 2"), everyone],
        "alice2": [notify("to a user", "pod 2"), everyone],
        "bob": [notify("to a group", "pod 2"), everyone],
        "carol": [everyone],
    })

    # Membership changed on pod 2 is seen by pod 1, and a hub method's on either pod.
    await pod2.request("DELETE", f"/groups/room/connections/{ids['bob']}")
    assert await node_agent.invoke("carol", "join", "room") is None
    await deliver(node_agent, pod1, "/groups/room/notify", "room again", ["alice", "carol"])
    await deliver(node_agent, pod1, "/broadcast", "marker", list(users))
    marker = notify("marker", "pod 1")
    await expect_exactly(node_agent, {
        "alice": [notify("room again", "pod 1"), marker],
        "alice2": [marker],
        "bob": [marker],
        "carol": [notify("room again", "pod 1"), marker],
    })


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_killing_a_pod_sends_its_clients_through_the_other_pod(
        pods: tuple[PodProcess, PodProcess], node_agent: NodeAgent, protocol: str) -> None:
    pod1, pod2 = pods
    users = {f"c{i}": f"user{i}" for i in range(4)}
    served = await connect_all(node_agent, pod1, users, protocol, automaticReconnect=True)
    on_pod2 = sorted(name for name, pod in served.items() if pod == "pod 2")
    on_pod1 = sorted(name for name, pod in served.items() if pod == "pod 1")
    assert on_pod1 and on_pod2, served

    pod2.kill()
    await pod2.wait_exit()

    # The relay closes pod 2's clients with allowReconnect (else the client would close, not
    # reconnect); they negotiate with pod 1 again and are bound to pod 1.
    for name in on_pod2:
        reconnecting = await node_agent.wait_event(name, "reconnecting")
        # The client's words for a Close message with an error: not a dropped socket.
        assert reconnecting["error"].startswith("Server returned an error on close"), reconnecting
        reconnected = await node_agent.wait_event(name, "reconnected")
        node_agent.connection_ids[name] = reconnected["connectionId"]
    await pod1.wait_negotiations(len(users) + len(on_pod2))
    for name, user in users.items():
        who = await node_agent.invoke(name, "whoami")
        assert who == {"pod": "pod 1", "user": user,
                       "connection": node_agent.connection_ids[name]}, who

    # Every client is reachable again, by connection and by user, from the remaining pod.
    for name, user in users.items():
        await deliver(node_agent, pod1, f"/connections/{node_agent.connection_ids[name]}/notify",
                      "conn", [name])
        await deliver(node_agent, pod1, f"/notify/{user}", "user", [name])
    await deliver(node_agent, pod1, "/broadcast", "marker", list(users))
    await expect_exactly(node_agent, {
        name: [notify("conn", "pod 1"), notify("user", "pod 1"), notify("marker", "pod 1")]
        for name in users})
    # Pod 1's clients never noticed.
    noticed = [e for e in node_agent.events if e["name"] in on_pod1]
    assert noticed == [], noticed
    assert not node_agent.closed, node_agent.closed
