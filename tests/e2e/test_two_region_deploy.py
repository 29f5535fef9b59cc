"""The two-region compose topology (``deploy/two-region/compose.yaml``) run without Docker: two
relay subprocesses and two app servers that are the example's ``examples/two-pods/app.py`` (the
app image's program), each given the environment its service has in the compose file, with
the compose host names mapped to this machine (``relay-east:8080`` -> ``localhost:<port>``,
the published ``localhost:8081`` -> ``127.0.0.1:<port>``). Clients are the official
``@microsoft/signalr`` client under Node.js.

So the app servers sign tokens for ``localhost`` while browsers come to ``127.0.0.1``: this
proves the compose file's ``ClientEndpoint`` and ``RELAYCORE_PUBLIC_ENDPOINT`` arrangement
(without the latter the relay would answer 401). Then the README's failover rehearsal:
``python -m relaycore fault --server-connections drop`` on the east relay moves app-east's
clients and new ones west, ``none`` brings new ones back east.
"""

from __future__ import annotations

import itertools
import json
import re
import socket
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import trio

from .harness import WAIT, NodeAgent, NodeAgentFactory, RelayFactory, RelayProcess
from .pods import PodFactory, PodProcess

pytestmark = pytest.mark.e2e
yaml = pytest.importorskip("yaml", reason="reads the compose file: pip install pyyaml")

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "deploy" / "two-region" / "compose.yaml"
README = REPO / "deploy" / "two-region" / "README.md"
KEYS = {"EAST_ACCESS_KEY": "e2e-east-key-0123456789abcdefghijklmnopq",
        "WEST_ACCESS_KEY": "e2e-west-key-0123456789abcdefghijklmnopq",
        "ADMIN_KEY": "e2e-admin-key-0123456789abcdefghijklmnop"}
REGIONS = ("east", "west")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def compose_environment(ports: dict[str, int]) -> dict[str, dict[str, str]]:
    """Each service's environment from compose.yaml: interpolated with the test keys, the
    compose host names and published ports mapped to the relays' local ports."""
    text = re.sub(r"\$\{([A-Z_]+)[^}]*\}", lambda m: KEYS[m.group(1)], COMPOSE.read_text())
    services = yaml.safe_load(text)["services"]
    published = {f"localhost:{p.split(':')[0]}": name for name, s in services.items()
                 for p in s.get("ports", []) if name.startswith("relay-")}

    def local(value: str) -> str:
        for region in REGIONS:
            value = value.replace(f"relay-{region}:8080", f"localhost:{ports[region]}")
        for address, name in published.items():
            value = value.replace(address, f"127.0.0.1:{ports[name.split('-')[1]]}")
        return value

    return {name: {k: local(str(v)) for k, v in s.get("environment", {}).items()}
            for name, s in services.items()}


async def negotiated(app: PodProcess) -> str:
    """``host:port`` of the relay URL ``app``'s negotiate hands a client."""
    assert app.http is not None
    with trio.fail_after(WAIT):
        response = await app.http.post("/hubs/chat/negotiate", params={"negotiateVersion": 1})
    assert response.status_code == 200, response.text
    return urlsplit(response.json()["url"]).netloc


async def wait_negotiated(app: PodProcess, relay: RelayProcess, timeout: float) -> None:
    want = f"127.0.0.1:{relay.port}"
    last = ""
    try:
        with trio.fail_after(timeout):
            while (last := await negotiated(app)) != want:
                await trio.sleep(0.05)
    except trio.TooSlowError:
        raise AssertionError(f"{app.name} still negotiates {last}, not {want}, after "
                             f"{timeout:g} s\n{app.describe()}") from None


async def fault(connection_string: str, mode: str) -> None:
    result = await trio.run_process(
        [sys.executable, "-m", "relaycore", "fault", "--server-connections", mode,
         "--connection-string", connection_string, "--admin-key", KEYS["ADMIN_KEY"]],
        capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert json.loads(result.stdout) == {"serverConnections": mode}


async def heard(agent: NodeAgent, app: PodProcess, name: str) -> None:
    """Until a broadcast of ``app`` reaches ``name``: app.py tells whether *some* endpoint is
    online, not whether its connections to every relay are up, so ask the way a user would
    (probes, which ``everyone_gets`` ignores)."""
    try:
        with trio.fail_after(20):
            for attempt in itertools.count():
                text = f"probe {attempt}"
                await app.post("/broadcast", text=text)
                with trio.move_on_after(0.5):
                    await agent.wait_for(lambda text=text: any(
                        m.args == [text, app.name] for m in agent.messages.get(name, [])),
                        f"{text} on {name}")
                    return
    except trio.TooSlowError:
        raise AssertionError(f"{name} never heard from {app.name}\n{app.describe()}\n"
                             f"{agent.describe()}") from None


async def everyone_gets(agent: NodeAgent, apps: list[PodProcess], names: list[str],
                        text: str) -> None:
    """Each app server broadcasts ``text``; each client gets it once from each."""
    for app in apps:
        await app.post("/broadcast", text=text)

    def got(name: str) -> list[tuple[str, str]]:
        return sorted(tuple(m.args) for m in agent.messages.get(name, [])
                      if not m.args[0].startswith("probe"))

    for name in names:
        await agent.wait_for(lambda name=name: len(got(name)) >= len(apps),
                             what=f"{text!r} on {name}")
        assert got(name) == sorted((text, app.name) for app in apps), (name, got(name))
        agent.take(name)


async def test_compose_topology_with_the_example_app_and_a_rehearsed_failover(
        relay_factory: RelayFactory, pod_factory: PodFactory,
        node_agent_factory: NodeAgentFactory) -> None:
    ports = {region: free_port() for region in REGIONS}
    env = compose_environment(ports)
    relays: dict[str, RelayProcess] = {}
    for region in REGIONS:
        service = env[f"relay-{region}"]
        relays[region] = await relay_factory(
            env={"RELAYCORE_PUBLIC_ENDPOINT": service["RELAYCORE_PUBLIC_ENDPOINT"],
                 "RELAYCORE_ADMIN_KEY": service["RELAYCORE_ADMIN_KEY"]},
            args=["--port", str(ports[region])], access_key=service["RELAYCORE_ACCESS_KEY"])
    apps = {region: await pod_factory(f"app-{region}", env=env[f"app-{region}"])
            for region in REGIONS}
    agent = await node_agent_factory(relays["east"])

    # Each region's clients land on its own relay (tokens signed for "localhost", the
    # browser at 127.0.0.1: the relay takes its public endpoint's host).
    for region in REGIONS:
        assert await negotiated(apps[region]) == f"127.0.0.1:{relays[region].port}"
    for name, region in (("alice", "east"), ("bob", "west")):
        await agent.connect(name, apps[region].hub_url(user=name), None,
                            automaticReconnect=True)
        assert (await agent.invoke(name, "whoami"))["pod"] == f"app-{region}"
    for app in apps.values():
        for name in ("alice", "bob"):
            await heard(agent, app, name)
    await everyone_gets(agent, list(apps.values()), ["alice", "bob"], "both up")

    # The README's rehearsal, on the east relay's published port (mapped).
    (east_string,) = set(re.findall(r'EAST="(Endpoint=[^"]+)"', README.read_text()))
    east_string = east_string.replace("$EAST_ACCESS_KEY", KEYS["EAST_ACCESS_KEY"]).replace(
        "localhost:8081", f"localhost:{ports['east']}")
    await fault(east_string, "drop")
    await wait_negotiated(apps["east"], relays["west"], timeout=3)
    agent.connection_ids["alice"] = (await agent.wait_event("alice", "reconnected"))[
        "connectionId"]
    await agent.connect("carol", apps["east"].hub_url(user="carol"), None)
    for name in ("alice", "carol"):
        assert (await agent.invoke(name, "whoami"))["pod"] == "app-west", name
    await everyone_gets(agent, list(apps.values()), ["alice", "bob", "carol"], "east dropped")

    # Healed: app-east reconnects (the SDK's default backoff: 1, 2, 4 ... s) and sends new
    # clients east again; alice stays west.
    await fault(east_string, "none")
    await wait_negotiated(apps["east"], relays["east"], timeout=20)
    await agent.connect("dave", apps["east"].hub_url(user="dave"), None)
    assert (await agent.invoke("dave", "whoami"))["pod"] == "app-east"
    assert (await agent.invoke("alice", "whoami"))["pod"] == "app-west"
    # app-west's secondary connections to east are back too: dave hears from both.
    await heard(agent, apps["west"], "dave")
    await everyone_gets(agent, list(apps.values()), ["alice", "bob", "carol", "dave"],
                        "east healed")
    assert not agent.closed, agent.closed

