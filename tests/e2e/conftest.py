"""End-to-end fixtures: the real relay as a subprocess (``relay``, ``relay_factory``), a signed
REST client (``rest``) and a Node.js agent driving the official ``@microsoft/signalr`` client
(``node_agent``), and the pods of ``examples/two-pods`` as app server processes
(``pod_factory``, see pods.py). The agent's tests are skipped when ``node`` or the npm packages
are missing, unless ``CI`` is set, when that is a failure. See harness.py for the machinery.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import pytest
import trio

from .harness import (
    AGENT_JS,
    NODE_DIR,
    NodeAgent,
    NodeAgentFactory,
    RelayFactory,
    RelayProcess,
    Rest,
    node_problem,
    open_rest,
    relay_env,
)
from .pods import APP, PodFactory, PodProcess, pod_env


@pytest.fixture
async def relay_factory() -> AsyncIterator[RelayFactory]:
    """``await relay_factory(env={"RELAYCORE_KEEP_ALIVE_INTERVAL": "0.5"}, args=[...],
    access_key=...)``: start a relay (``args`` come after ``--port 0``, so ``--port`` there
    wins). Every relay started is stopped, and must exit cleanly, at teardown."""
    relays: list[RelayProcess] = []
    async with trio.open_nursery() as nursery:

        async def start(env: Mapping[str, str] | None = None, args: Sequence[str] = (),
                        access_key: str | None = None) -> RelayProcess:
            relay = RelayProcess(access_key or secrets.token_urlsafe(32), relay_env(env))
            relays.append(relay)
            await relay.start(nursery, args)
            return relay

        try:
            yield start
            for relay in relays:
                await relay.stop()
        finally:
            for relay in relays:
                relay.kill()


@pytest.fixture
async def relay(relay_factory: RelayFactory) -> RelayProcess:
    return await relay_factory()


@pytest.fixture
async def rest(relay: RelayProcess) -> AsyncIterator[Rest]:
    async with open_rest(relay) as client:
        yield client


@pytest.fixture(scope="session")
def node_available() -> str:
    """The ``node`` executable; skip (fail under CI) when Node.js or the packages are missing."""
    problem = node_problem()
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(f"end-to-end tests need Node.js and the npm packages: {problem}")
        pytest.skip(problem)
    node = shutil.which("node")
    assert node is not None
    return node


@pytest.fixture
async def node_agent_factory(node_available: str) -> AsyncIterator[NodeAgentFactory]:
    """``await node_agent_factory(relay)``: another agent process (``relay`` is only named in
    its failure messages). Every agent is told to exit, or killed, at teardown."""
    agents: list[NodeAgent] = []
    async with trio.open_nursery() as nursery:

        async def start(relay: RelayProcess | None = None) -> NodeAgent:
            process = await trio.lowlevel.open_process(
                [node_available, str(AGENT_JS)], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(NODE_DIR))
            agent = NodeAgent(process, relay)
            agents.append(agent)
            nursery.start_soon(agent._pump_stdout)
            nursery.start_soon(agent._pump_stderr)
            await agent.wait_for(lambda: agent.ready is not None, what="the agent to start",
                                 timeout=30)
            return agent

        try:
            yield start
            for agent in agents:
                await agent.exit()
        finally:
            for agent in agents:
                if agent.process.returncode is None:
                    agent.process.kill()


@pytest.fixture
async def node_agent(node_agent_factory: NodeAgentFactory, relay: RelayProcess) -> NodeAgent:
    return await node_agent_factory(relay)


@pytest.fixture
async def pod_factory() -> AsyncIterator[PodFactory]:
    """``await pod_factory("pod 1", relay.connection_string)`` or ``await pod_factory("pod 2",
    no_relay=True)``: a pod of ``examples/two-pods`` (see pods.py), online when returned.
    ``app=`` runs another script with the same command line (region_app.py), ``env=`` adds
    to its environment.
    Every pod is stopped (SIGTERM, clean exit insisted on) at teardown, unless it was killed.
    Skipped (failed under CI) without fastapi and uvicorn (the dev extra)."""
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        message = f"the two-pods example needs {' and '.join(missing)}: pip install -e '.[dev]'"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    pods: list[PodProcess] = []
    async with trio.open_nursery() as nursery:

        async def start(name: str, connection_string: str | None = None, *,
                        no_relay: bool = False, app: Path | None = None,
                        env: Mapping[str, str] | None = None) -> PodProcess:
            pod = PodProcess(name, {**pod_env(connection_string), **(env or {})}, app or APP)
            pods.append(pod)
            await pod.start(nursery, no_relay=no_relay)
            return pod

        try:
            yield start
            for pod in pods:
                await pod.stop()
        finally:
            for pod in pods:
                await pod.reap()
