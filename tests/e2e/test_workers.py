"""``python -m relaycore serve --workers 2`` as one endpoint, with real processes: two workers
on one port (each a cluster node, on the private ``redis-server`` the command starts),
connections spread over both, a negotiate answered by one worker and the WebSocket that
follows accepted by the other, a REST send through one worker reaching clients of both, and a
killed worker started again.

Which worker answered is read from the connection id, whose first part names the node:
negotiate names the worker that answered it, and the worker that accepted a WebSocket is the
one whose name makes an id that the REST API's existence check finds.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
from collections.abc import AsyncIterator

import httpx
import pytest
import trio

from redisserver import needs_redis

from .harness import WAIT, Received, RelayProcess, open_rest
from .test_trio_websocket import websocket

pytestmark = [pytest.mark.e2e, needs_redis]

RS = "\x1e"
_STARTED = re.compile(r"relaycore: worker (\d+) started \(pid (\d+)\)")


async def start_workers(relay_factory, *args: str) -> RelayProcess:
    relay = await relay_factory(args=["--workers", "2", *args],
                                access_key=secrets.token_urlsafe(32))
    await relay.changes.wait_for(
        lambda: any(" workers listening on " in line for line in relay.lines),
        what="both workers to listen", describe=relay.describe, timeout=WAIT)
    assert any("started a private redis-server" in line for line in relay.lines)
    return relay


async def negotiate(relay: RelayProcess, user: str) -> tuple[str, str]:
    """(connection id, connection token) of a negotiate on a TCP connection of its own (so
    that the kernel may hand it to either worker)."""
    async with httpx.AsyncClient(timeout=WAIT) as http:
        answer = await http.post(
            f"{relay.endpoint}/client/negotiate?hub=chat&negotiateVersion=1",
            headers={"Authorization": f"Bearer {relay.client_token(user=user)}"})
    answer.raise_for_status()
    body = answer.json()
    # Server-Sent Events and long polling would need each request on the same worker.
    assert [t["transport"] for t in body["availableTransports"]] == ["WebSockets"]
    return body["connectionId"], body["connectionToken"]


def node_of(connection_id: str) -> str:
    return connection_id.rpartition(".")[0]


async def nodes_of_negotiates(relay: RelayProcess, count: int) -> set[str]:
    return {node_of((await negotiate(relay, "probe"))[0]) for _ in range(count)}


@contextlib.asynccontextmanager
async def client(relay: RelayProcess, token: str, user: str) -> AsyncIterator[object]:
    """A WebSocket client of the negotiated ``token``, past its JSON handshake."""
    url = relay.ws_url(token=relay.client_token(user=user)) + f"&id={token}"
    async with websocket(url) as ws:
        await ws.send_message(json.dumps({"protocol": "json", "version": 1}) + RS)
        with trio.fail_after(WAIT):
            assert await ws.get_message() == "{}" + RS
        yield ws


async def next_invocation(ws) -> dict:
    with trio.fail_after(WAIT):
        while True:
            for record in (await ws.get_message()).split(RS):
                if record and json.loads(record).get("type") == 1:
                    return json.loads(record)


def workers_of_nodes(relay: RelayProcess) -> dict[str, str]:
    """node id -> the worker (its index) that is that node, from the workers' start lines."""
    found = {}
    for line in relay.lines:
        if match := re.match(r"\[worker (\d+)\] cluster: .* as node (\S+) ", line):
            found[match.group(2)] = match.group(1)
    return found


async def holder(relay: RelayProcess, connection_id: str) -> str:
    """The worker that holds the connection (its DEBUG line says it opened it)."""
    opened = f"connection {connection_id} opened"
    await relay.changes.wait_for(lambda: any(opened in line for line in relay.lines),
                                 what=f"{connection_id} to open", describe=relay.describe,
                                 timeout=WAIT)
    line = next(line for line in relay.lines if opened in line)
    match = re.match(r"\[worker (\d+)\]", line)
    assert match, line
    return match.group(1)


async def test_two_workers_share_the_port_and_act_as_one_endpoint(relay_factory):
    relay = await start_workers(relay_factory, "--log-level", "DEBUG")
    nodes = await nodes_of_negotiates(relay, 24)
    assert len(nodes) == 2, nodes  # the kernel spread the negotiates over both workers
    worker_of = workers_of_nodes(relay)
    async with open_rest(relay) as rest, contextlib.AsyncExitStack() as stack:
        clients: list[tuple[object, str, str]] = []  # (client, its connection id, its worker)
        crossed = None  # a client negotiated on one worker and accepted by the other
        for attempt in range(40):
            connection_id, token = await negotiate(relay, f"user{attempt}")
            ws = await stack.enter_async_context(client(relay, token, f"user{attempt}"))
            worker = await holder(relay, connection_id)
            clients.append((ws, connection_id, worker))
            if worker != worker_of[node_of(connection_id)] and crossed is None:
                crossed = clients[-1]
            if len({w for _, _, w in clients}) == 2 and crossed is not None:
                break
        assert len({w for _, _, w in clients}) == 2 and crossed is not None
        # The client keeps the id negotiate gave it, though another worker holds it.
        with trio.fail_after(WAIT):
            while (await rest.request("HEAD", f"/connections/{crossed[1]}")).status_code != 200:
                await trio.sleep(0.02)
        # A send to everyone through one worker reaches the clients of both; a send to the
        # connection that crossed reaches it by that id, from either worker.
        await rest.send_all("hello", 1)
        await rest.send_connection(crossed[1], "just-you", 2)
        for ws, _, _ in clients:
            assert (await next_invocation(ws))["arguments"] == [1]
        assert (await next_invocation(crossed[0]))["arguments"] == [2]
    assert not any("Traceback" in line for line in relay.lines), relay.describe()


async def test_a_killed_worker_is_started_again(relay_factory):
    relay = await start_workers(relay_factory)
    (index, pid), *_ = [(m.group(1), int(m.group(2)))
                        for line in relay.lines if (m := _STARTED.search(line))]
    os.kill(pid, signal.SIGKILL)
    again = f"relaycore: worker {index} (pid {pid}) exited with status -9; starting it again"

    def restarted() -> bool:
        return again in relay.lines and any(
            (m := _STARTED.search(line)) and m.group(1) == index and int(m.group(2)) != pid
            for line in relay.lines[relay.lines.index(again):])

    await relay.changes.wait_for(restarted, what="the worker to be started again",
                                 describe=relay.describe, timeout=WAIT)
    listening = f"[worker {index}] relaycore "

    await relay.changes.wait_for(
        lambda: sum(line.startswith(listening) and " listening on " in line
                    for line in relay.lines) == 2,
        what="the new worker to listen", describe=relay.describe, timeout=WAIT)
    # Both workers answer again (the new one under a new node name).
    nodes: set[str] = set()
    with trio.fail_after(WAIT):
        while len(nodes) < 2:
            nodes |= await nodes_of_negotiates(relay, 8)
    assert len(nodes) == 2


async def test_an_app_server_serves_the_clients_of_both_workers(
        relay_factory, pod_factory, node_agent_factory):
    """A pod's server connections and the official client's negotiate and WebSocket land on
    either worker: every client is served, whichever worker holds it, under the id it was
    given."""
    relay = await start_workers(relay_factory, "--log-level", "DEBUG")
    pod = await pod_factory("pod 1", relay.connection_string)
    agent = await node_agent_factory(relay)
    workers: set[str] = set()
    names: list[str] = []
    for n in range(30):  # until both workers hold clients (each lands on either)
        name = f"user{n}"
        connection_id = await agent.connect(name, pod.hub_url(user=name), None,
                                            protocol="json")
        who = await agent.invoke(name, "whoami")
        assert who == {**who, "user": name, "pod": "pod 1", "connection": connection_id}, who
        names.append(name)
        workers.add(await holder(relay, connection_id))
        if len(workers) == 2:
            break
    assert len(workers) == 2, workers
    answer = await pod.post("/broadcast", text="to all")
    assert answer == {"sent_by": "pod 1", "to": "everyone"}, answer
    expected = Received("notify", ["to all", "pod 1"])
    for name in names:
        await agent.wait_for(lambda name=name: expected in agent.messages.get(name, []),
                             what=f"the broadcast on {name}")
