"""Two regions end to end: two relays ("east" and "west", relay subprocesses), two app servers
(region_app.py processes on relaycore's server SDK, each primary to its own region's relay and
secondary to the other, configured by the ``Azure__SignalR__Endpoints__...`` environment keys)
and the official ``@microsoft/signalr`` client under Node.js, connected in both regions through
each app server's negotiate.

Where a client is: the ``whoami`` hub method answers from the app server the client is bound
to, and a relay binds clients only to app servers that have it as primary, so ``whoami``
names the region of the relay; the relay's REST API (``HEAD /connections/{id}``) confirms it.

* Failover and recovery, for three outages of the east relay: killed (SIGKILL, restarted on
  the same port), unreachable (the fault switch ``silence``: its server connections go quiet,
  new ones hang, as behind a blocked port; then ``none``), and dropping app servers (``drop``).
  The east app server's negotiate moves to the west relay within a few seconds, east clients
  come back through it (automatic reconnect) and new ones land there, and every broadcast of
  either app server reaches every connected client exactly once; once east is back, new
  clients go east again and those that moved stay west and still receive.
* An endpoint (a third relay) added to both app servers and removed again while both
  broadcast without pause: not offered before both are connected to it, not offered once
  its removal started, and no client misses a message while it is connected.

The SDK's timers are short here (``REGION_APP_OPTIONS``): a silent relay is given up after
``service_timeout`` = 3 s (the relays ping every 0.5 s), reconnects are retried every 0.25 s.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import trio

from .harness import (
    ADMIN_KEY,
    WAIT,
    NodeAgent,
    NodeAgentFactory,
    RelayFactory,
    RelayProcess,
    open_rest,
)
from .pods import PodFactory, PodProcess

pytestmark = pytest.mark.e2e

REGION_APP = Path(__file__).with_name("region_app.py")
SERVICE_TIMEOUT = 3.0
SDK_OPTIONS = {"connection_count": 2, "service_timeout": SERVICE_TIMEOUT,
               "handshake_timeout": 2.0, "retry_delay": 0.25, "scale_poll_interval": 0.2,
               "shutdown_timeout": 2.0}
RELAY_ENV = {"RELAYCORE_SERVER_KEEP_ALIVE_INTERVAL": "0.5"}
REGIONS = ("east", "west")
#: How soon the east app server must send new clients west: at once when the relay's sockets
#: close (kill, drop), after ``service_timeout`` of silence when it just goes quiet.
FAILOVER_WITHIN = {"kill": 3.0, "drop": 3.0, "silence": SERVICE_TIMEOUT + 3.0}


def other(region: str) -> str:
    return "west" if region == "east" else "east"


def app_env(region: str, relays: dict[str, RelayProcess]) -> dict[str, str]:
    """Primary: the app server's own region's relay; secondary: the other one."""
    return {
        f"Azure__SignalR__Endpoints__{region}": relays[region].connection_string,
        f"Azure__SignalR__Endpoints__{other(region)}__secondary":
            relays[other(region)].connection_string,
        "REGION_APP_OPTIONS": json.dumps(SDK_OPTIONS),
    }


@dataclass
class Regions:
    relays: dict[str, RelayProcess]
    apps: dict[str, PodProcess]
    agent: NodeAgent
    relay_factory: RelayFactory
    #: client name -> the region its app server is in (where it negotiates)
    clients: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return "\n".join([self.agent.describe(), *(a.describe() for a in self.apps.values()),
                          *(r.describe() for r in self.relays.values())])

    # -- negotiate ----------------------------------------------------------------------

    async def negotiated_port(self, app: str, region: str | None = None) -> int | None:
        """The relay port ``app``'s negotiate sends a client to (None: it answered 503)."""
        http = self.apps[app].http
        assert http is not None
        params = {"negotiateVersion": "1", **({"region": region} if region else {})}
        try:
            with trio.fail_after(WAIT):
                response = await http.post("/hubs/chat/negotiate", params=params)
        except (httpx.HTTPError, trio.TooSlowError) as exc:
            raise AssertionError(f"negotiate on {app} failed: {exc!r}\n{self.describe()}") from None
        if response.status_code == 503:
            return None
        assert response.status_code == 200, f"{response.status_code} {response.text}"
        return urlsplit(response.json()["url"]).port

    async def wait_negotiate_to(self, app: str, relay: str, timeout: float = WAIT,
                                region: str | None = None) -> float:
        """Until ``app``'s negotiate names ``relay`` five times in a row; returns how long
        that took."""
        port = self.relays[relay].port
        start = trio.current_time()
        last: list[int | None] = []
        try:
            with trio.fail_after(timeout):
                while last[-5:] != [port] * 5:
                    last.append(await self.negotiated_port(app, region))
                    if last[-1] != port:
                        await trio.sleep(0.05)
        except trio.TooSlowError:
            raise AssertionError(
                f"negotiate on {app} still named ports {last[-5:]}, not {relay} ({port}), "
                f"after {timeout:g} s\n{self.describe()}") from None
        return trio.current_time() - start

    # -- status ----------------------------------------------------------------------------

    async def wait_status(self, app: str, predicate: Callable[[dict[str, Any]], bool],
                          what: str, timeout: float = WAIT) -> dict[str, Any]:
        status: dict[str, Any] = {}
        try:
            with trio.fail_after(timeout):
                while not predicate(status := await self.apps[app].request("GET", "/status")):
                    await trio.sleep(0.05)
        except trio.TooSlowError:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; last "
                                 f"status {status}\n{self.describe()}") from None
        return status

    # -- clients ---------------------------------------------------------------------------

    async def connect(self, name: str, app: str, region: str | None = None,
                      **options: Any) -> str:
        """Connect client ``name`` through ``app``'s negotiate; returns the region of the
        app server it is bound to (``whoami``)."""
        url = self.apps[app].hub_url(user=name) + (f"&region={region}" if region else "")
        await self.agent.connect(name, url, None, **options)
        self.clients[name] = app
        return await self.where(name)

    async def where(self, name: str) -> str:
        who = await self.agent.invoke(name, "whoami")
        assert who["user"] == name and who["connection"] == self.agent.connection_ids[name], who
        return str(who["pod"])

    async def relay_of(self, name: str) -> str:
        """The one running relay that holds client ``name``'s connection (REST API)."""
        connection_id = self.agent.connection_ids[name]
        holders = []
        for region, relay in self.relays.items():
            if relay.stopped:
                continue
            async with open_rest(relay) as rest:
                status = (await rest.head(f"/connections/{connection_id}")).status_code
            assert status in (200, 404), status
            if status == 200:
                holders.append(region)
        assert len(holders) == 1, f"{name} ({connection_id}) is held by {holders}"
        return holders[0]

    async def expect_in(self, region: str, names: Iterable[str]) -> None:
        for name in names:
            assert (await self.where(name), await self.relay_of(name)) == (region, region), (
                f"{name} is not in {region}\n{self.describe()}")

    async def everyone_gets(self, text: str, recipients: Iterable[str]) -> None:
        """Each app server broadcasts ``text`` in turn; each recipient gets it exactly once
        from each, and nothing else."""
        recipients = list(recipients)
        for name in recipients:
            assert self.agent.take(name) == [], name
        for app in self.apps.values():
            answer = await app.post("/broadcast", text=text)
            assert answer["sent_by"] == app.name, answer
            for name in recipients:
                await self.agent.wait_for(
                    lambda name=name, app=app: any(m.args == [text, app.name]
                                                   for m in self.agent.messages.get(name, [])),
                    what=f"{text!r} from {app.name} on {name!r}")
        # The last one sent is in: anything else would have been received by now.
        for name in recipients:
            got = sorted(tuple(m.args) for m in self.agent.take(name))
            assert got == sorted((text, app) for app in self.apps), (
                f"{name} received {got}\n{self.describe()}")


@pytest.fixture
async def regions(relay_factory: RelayFactory, pod_factory: PodFactory,
                  node_agent_factory: NodeAgentFactory) -> Regions:
    relays = {region: await relay_factory(env=RELAY_ENV) for region in REGIONS}
    apps: dict[str, PodProcess] = {}

    async def start(region: str) -> None:
        apps[region] = await pod_factory(region, app=REGION_APP, env=app_env(region, relays))

    async with trio.open_nursery() as nursery:  # online (every endpoint) when started
        for region in REGIONS:
            nursery.start_soon(start, region)
    agent = await node_agent_factory(relays["east"])
    return Regions(relays, {r: apps[r] for r in REGIONS}, agent, relay_factory)


async def fault(relay: RelayProcess, mode: str) -> None:
    """``python -m relaycore fault --server-connections MODE``, as an operator rehearses."""
    result = await trio.run_process(
        [sys.executable, "-m", "relaycore", "fault", "--server-connections", mode,
         "--connection-string", relay.connection_string, "--admin-key", ADMIN_KEY],
        capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert json.loads(result.stdout) == {"serverConnections": mode}, result.stdout


@pytest.mark.parametrize("outage", ["kill", "silence", "drop"])
async def test_failover_to_the_other_region_and_back(regions: Regions, outage: str) -> None:
    agent = regions.agent
    east = regions.relays["east"]

    # Clients in both regions, each through its region's app server.
    for name, region in [("e1", "east"), ("e2", "east"), ("w1", "west"), ("w2", "west")]:
        assert await regions.connect(name, region, automaticReconnect=True) == region
    await regions.expect_in("east", ["e1", "e2"])
    await regions.expect_in("west", ["w1", "w2"])
    for region in REGIONS:
        await regions.wait_negotiate_to(region, region, timeout=5)
    await regions.everyone_gets("both regions up", ["e1", "e2", "w1", "w2"])

    # The outage.
    if outage == "kill":
        await east.crash()
    else:
        await fault(east, outage)

    # The east app server sends new clients west within a few seconds ...
    took = await regions.wait_negotiate_to("east", "west", timeout=FAILOVER_WITHIN[outage])
    status = await regions.apps["east"].request("GET", "/status")
    assert {e["name"]: e["online"] for e in status["endpoints"]} == {
        "east": False, "west": True}, status
    # ... the east clients lost their relay (or their app server there) and come back
    # through the east app server, to the west relay ...
    for name in ("e1", "e2"):
        await agent.wait_event(name, "reconnecting", timeout=WAIT)
        reconnected = await agent.wait_event(name, "reconnected", timeout=WAIT)
        agent.connection_ids[name] = reconnected["connectionId"]
    # ... new ones land there too ...
    assert await regions.connect("e3", "east", automaticReconnect=True) == "west"
    await regions.expect_in("west", ["e1", "e2", "e3", "w1", "w2"])
    # ... and both app servers still reach every connected client.
    await regions.everyone_gets("east is down", ["e1", "e2", "e3", "w1", "w2"])

    # East comes back (on the same port).
    if outage == "kill":
        regions.relays["east"] = await regions.relay_factory(
            env=RELAY_ENV, args=["--port", str(east.port)], access_key=east.access_key)
        assert regions.relays["east"].port == east.port
    else:
        await fault(east, "none")
    for app in regions.apps.values():
        await app.wait_online()  # every endpoint: the west app server's secondary too
    await regions.wait_negotiate_to("east", "east", timeout=5)
    # New clients go east again; those that moved stay west and still receive.
    assert await regions.connect("e4", "east", automaticReconnect=True) == "east"
    await regions.expect_in("east", ["e4"])
    await regions.expect_in("west", ["e1", "e2", "e3", "w1", "w2"])
    await regions.everyone_gets("east is back", ["e1", "e2", "e3", "e4", "w1", "w2"])

    # Only the east clients noticed anything, once each; none was closed for good.
    assert not agent.closed, agent.closed
    noticed = sorted((e["name"], e["event"]) for e in agent.events)
    assert noticed == [("e1", "reconnected"), ("e1", "reconnecting"),
                       ("e2", "reconnected"), ("e2", "reconnecting")], noticed
    print(f"{outage}: the east app server negotiated west after {took:.2f} s")


class Flow:
    """Each app server broadcasts ``"<app>:<n>"``, n = 0, 1, 2 ..., one after another (a
    steady flow, not a flood), until ``stop()``. A failed send fails the test."""

    def __init__(self, apps: dict[str, PodProcess]) -> None:
        self.apps = apps
        self.started = dict.fromkeys(apps, 0)
        self.completed = dict.fromkeys(apps, 0)
        self.stopping = False

    async def run(self, nursery: trio.Nursery) -> None:
        for app in self.apps:
            nursery.start_soon(self._send, app)

    async def _send(self, app: str) -> None:
        while not self.stopping:
            n = self.started[app]
            self.started[app] += 1
            await self.apps[app].post("/broadcast", text=f"{app}:{n}")
            self.completed[app] += 1
            await trio.sleep(0.02)

    def stop(self) -> None:
        self.stopping = True

    def marks(self) -> dict[str, int]:
        return dict(self.started)


async def wait_event(event: trio.Event, what: str, timeout: float = WAIT) -> None:
    try:
        with trio.fail_after(timeout):
            await event.wait()
    except trio.TooSlowError:
        raise AssertionError(f"timed out after {timeout:g} s waiting for {what}") from None


def numbers(agent: NodeAgent, name: str, app: str) -> list[int]:
    """The numbers client ``name`` got from ``app``, in the order received."""
    return [int(m.args[0].split(":")[1]) for m in agent.messages.get(name, [])
            if m.method == "notify" and m.args[1] == app]


async def test_endpoint_added_and_removed_while_messages_flow(regions: Regions) -> None:
    agent, apps = regions.agent, regions.apps
    flow = Flow(apps)

    async def got_all(names: Iterable[str], first: dict[str, int], last: dict[str, int],
                      what: str) -> None:
        """Until each client has every number from ``first`` to ``last`` (excluded) of
        each app server."""
        for name in names:
            for app in apps:
                wanted = set(range(first[app], last[app]))
                await agent.wait_for(
                    lambda name=name, app=app, wanted=wanted:
                        wanted <= set(numbers(agent, name, app)),
                    what=f"{name!r}: every number of {app} from {first[app]} to "
                         f"{last[app] - 1} ({what})")

    def more(count: int) -> dict[str, int]:
        return {app: n + count for app, n in flow.completed.items()}

    assert await regions.connect("e1", "east") == "east"
    assert await regions.connect("w1", "west") == "west"
    async with trio.open_nursery() as nursery:
        await flow.run(nursery)
        start = dict.fromkeys(apps, 0)
        await got_all(["e1", "w1"], start, {app: 10 for app in apps}, "the flow runs")

        # A third relay, "north", added at run time as a primary of both app servers. The
        # east app server connects to it at once but keeps it out of negotiate: the west app
        # server is not connected to it yet, and a client there would miss its messages.
        north = regions.relays["north"] = await regions.relay_factory(env=RELAY_ENV)
        added: dict[str, bool] = {}
        both_added = trio.Event()

        async def add(app: str) -> None:
            answer = await apps[app].post("/admin/endpoints", name="north",
                                          connection_string=north.connection_string)
            added[app] = answer["added"]
            if len(added) == 2:
                both_added.set()

        def north_is(state: str, online: bool | None = None) -> Callable[[dict], bool]:
            return lambda status: any(
                e["name"] == "north" and e["state"] == state
                and (online is None or e["online"] == online) for e in status["endpoints"])

        nursery.start_soon(add, "east")
        await regions.wait_status("east", north_is("staging", online=True),
                                  "north online but staging on the east app server")
        for _ in range(5):
            assert await regions.negotiated_port("east", region="north") == \
                regions.relays["east"].port
        assert added == {}
        nursery.start_soon(add, "west")
        await wait_event(both_added, "both app servers to add north")
        assert added == {"east": True, "west": True}
        for app in apps:
            await regions.wait_status(app, north_is("active", online=True), f"north on {app}")
            await regions.wait_negotiate_to(app, "north", region="north", timeout=5)

        # Two clients on north (asked for by the region parameter): its relay binds one to
        # each app server.
        bound = [await regions.connect("n1", "east", region="north"),
                 await regions.connect("n2", "west", region="north")]
        assert sorted(bound) == ["east", "west"], bound
        for name in ("n1", "n2"):
            assert await regions.relay_of(name) == "north"
        joined = flow.marks()
        await got_all(["n1", "n2"], joined, more(10), "on north")

        # North removed from both app servers while the flow goes on: no longer offered at
        # once, but each app server keeps sending there while it has clients there.
        removed: dict[str, bool] = {}
        both_removed = trio.Event()

        async def remove(app: str) -> None:
            answer = await apps[app].request("DELETE", "/admin/endpoints/north")
            removed[app] = answer["removed"]
            if len(removed) == 2:
                both_removed.set()

        for app in apps:
            nursery.start_soon(remove, app)
        for app in apps:
            await regions.wait_status(app, north_is("removing"), f"north removing on {app}")
            for _ in range(5):
                assert await regions.negotiated_port(app, region="north") == \
                    regions.relays[app].port
        removing = flow.marks()
        await got_all(["n1", "n2"], joined, more(10), "while north is being removed")
        assert removed == {}, "an app server gave up north while it had a client there"
        # The north clients leave once they have everything sent so far.
        leaving = dict(flow.completed)
        await got_all(["n1", "n2"], joined, leaving, "before leaving")
        for name in ("n1", "n2"):
            await agent.stop(name)
        await wait_event(both_removed, "both app servers to remove north")
        assert removed == {"east": True, "west": True}
        for app in apps:
            status = await apps[app].request("GET", "/status")
            assert [e["name"] for e in status["endpoints"]] == [app, other(app)], status

        # The flow goes on to the two regions; then it stops.
        await got_all(["e1", "w1"], start, more(10), "after the removal")
        flow.stop()
    assert flow.started == flow.completed

    # Nothing lost, nothing twice: e1 and w1 got every number of both app servers; n1 and
    # n2 every one sent while they were on north.
    await got_all(["e1", "w1"], start, flow.completed, "all of them")
    for app in apps:
        for name in ("e1", "w1"):
            assert sorted(numbers(agent, name, app)) == list(range(flow.completed[app])), name
        for name in ("n1", "n2"):
            got = sorted(numbers(agent, name, app))
            assert got == sorted(set(got)), f"{name} got a number of {app} twice"
            assert set(range(joined[app], leaving[app])) <= set(got), (name, app)
        print(f"{app} sent {flow.completed[app]} broadcasts; north was being removed from "
              f"number {removing[app]}")
    assert not agent.closed or set(agent.closed) == {"n1", "n2"}, agent.closed
