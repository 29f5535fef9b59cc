"""relaycore side by side with the relays people would pick instead, on one machine, in one run.

Each target (relaycore, uWS.js, node ``ws``, node ``socket.io``, python ``websockets``,
python-socketio on uvicorn) runs as its own process pinned to CPU 0 (``taskset -c 0``); this
process is the load generator (``bench/loadgen``: open loop, uvloop, picows) pinned to CPU 1.
Scenarios (see bench/README.md, "Side by side"):

* S1 echo (relaycore: client -> relay -> app server -> relay -> client; the app server is a
  minimal one inside the generator, or relaycore's server SDK in its own process on asyncio +
  uvloop or trio, with its CPU per echo beside the relay's)
* S2 broadcast to 1,000 subscribers, 32 B and 2 KB, a ladder of offered rates: the highest rate
  with p99 <= 10 ms and reach 1.0
* S3 small groups (5,000 connections, groups of 10)
* S4 send to one connection (relaycore: and to one user) at 1,000, 15,000 and 1,000 connections
* S5 15,000 idle connections with keep-alive: RSS per connection, idle CPU
* S6 1,000 connects + 1,000 disconnects per second during S2
* S8 relaycore's broadcast through the REST API beside the server connection

    python bench/peers/setup.sh            # once: node peers (npm ci), python peers, picows
    python bench/run.py                    # everything, three runs, bench/results/<date>-<commit>.*
    python bench/run.py --smoke            # seconds, tiny counts, whatever peers are installed
    python bench/run.py --targets relaycore uws --scenarios S2 --runs 1
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from loadgen.adapters import (  # noqa: E402
    ACCESS_KEY,
    RawAdapter,
    RestPublisher,
    ServiceConnection,
    SignalRAdapter,
    SocketIOAdapter,
)
from loadgen.core import (  # noqa: E402
    ARRIVAL_CLOCK,
    READ_CLOCK,
    Generator,
    PublisherThread,
    cpu_seconds,
    rss_bytes,
)
from loadgen.wsclient import default_backend  # noqa: E402

from relaycore import __version__ as RELAYCORE_VERSION  # noqa: E402
from relaycore._accel import ACCELERATED  # noqa: E402
from relaycore.protocol import ConnectionDataMessage, ConnectionType, write_service_message  # noqa: E402,I001

PEERS = BENCH / "peers"
PEERS_VENV = BENCH / ".venv-peers" / "bin" / "python"
P99_BOUND_MS = 10.0
CAPACITY_P99_MS = 50.0  # "capacity": the highest rate delivered whole with p99 under this
SEND_BUFFER_LIMIT = 16 << 20  # the same per-connection send buffer everywhere it is a setting

# -- targets ----------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    adapter: str  # signalr | raw | socketio
    argv: Callable[[], list[str]]
    check: Callable[[], str | None]  # None when it can run, else why not
    version: Callable[[], str]
    env: dict[str, str] = field(default_factory=dict)


def _node_package_version(package: str) -> str:
    try:
        data = json.loads((PEERS / "node_modules" / package / "package.json").read_text())
        return f"{package} {data['version']}, node {_node_version()}"
    except OSError:
        return "not installed"


def _node_version() -> str:
    node = shutil.which("node")
    if not node:
        return "?"
    return subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()


def _node_check(package: str) -> Callable[[], str | None]:
    def check() -> str | None:
        if not shutil.which("node"):
            return "node is not installed"
        if not (PEERS / "node_modules" / package).is_dir():
            return f"bench/peers/node_modules/{package} missing (run bench/peers/setup.sh)"
        return None
    return check


def _py_peer_check(module: str) -> Callable[[], str | None]:
    def check() -> str | None:
        if not PEERS_VENV.exists():
            return "bench/.venv-peers missing (run bench/peers/setup.sh)"
        ok = subprocess.run([str(PEERS_VENV), "-c", f"import {module}"], capture_output=True)
        return None if ok.returncode == 0 else f"{module} not importable in bench/.venv-peers"
    return check


def _py_peer_version(*dists: str) -> Callable[[], str]:
    def version() -> str:
        code = ("import importlib.metadata as m, platform; print(', '.join("
                f"d + ' ' + m.version(d) for d in {list(dists)!r}) + ', CPython ' + "
                "platform.python_version())")
        out = subprocess.run([str(PEERS_VENV), "-c", code], capture_output=True, text=True)
        return out.stdout.strip() or "?"
    return version


_SNAPSHOT: Path | None = None
#: Where S1's SDK app server imports relaycore from (``--sdk-commit``; else the relay's).
_SDK_SNAPSHOT: Path | None = None


def snapshot_relay(commit: str = "HEAD") -> str:
    """Copy the committed relay (``git archive HEAD src``, plus the built extension) to a
    temporary directory and run it from there: other people edit ``src/`` while a long run
    goes on, and every start of the relay must measure the same commit. ``commit`` names an
    earlier one for before/after figures (the extension built from the working tree is
    used when that commit's ``_fastpath.pyx`` is the same; otherwise its own is built)."""
    global _SNAPSHOT
    _SNAPSHOT = snapshot_src(commit)
    return str(_SNAPSHOT)


def snapshot_src(commit: str) -> Path:
    """``src/`` as of ``commit`` in a temporary directory (see ``snapshot_relay``)."""
    import tempfile
    root = BENCH.parent
    import atexit
    dest = Path(tempfile.mkdtemp(prefix="relaycore-bench-"))
    atexit.register(shutil.rmtree, dest, True)
    archive = subprocess.run(["git", "archive", commit, "src/relaycore", "setup.py", "README.md",
                              "pyproject.toml"], cwd=root, capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    source = "src/relaycore/_fastpath.pyx"
    if (dest / source).read_bytes() == (root / source).read_bytes():
        for built in (root / "src" / "relaycore").glob("_fastpath*.so"):
            shutil.copy2(built, dest / "src" / "relaycore" / built.name)
    else:
        # That commit's fast path is not the working tree's: build its own extension, so
        # that a before/after pair measures each side's C code.
        subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=dest,
                       env={**os.environ, "RELAYCORE_BUILD_EXTENSION": "yes"}, check=True,
                       stdout=subprocess.DEVNULL)
    return dest / "src"


def _relay_argv() -> list[str]:
    variant = os.environ.get("BENCH_RELAY_VARIANT", "none")
    prefix = ([str(BENCH / "profile" / "relay_variant.py"), variant] if variant != "none"
              else ["-m", "relaycore"])
    return [sys.executable, *prefix, "serve", "--port", "0", "--access-key", ACCESS_KEY,
            "--log-level", "WARNING"]


TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("relaycore", "signalr",
           _relay_argv,
           lambda: None,
           lambda: f"relaycore {RELAYCORE_VERSION} (accelerated={ACCELERATED}), CPython "
                   f"{platform.python_version()}",
           env={"RELAYCORE_SEND_BUFFER_LIMIT": str(SEND_BUFFER_LIMIT)}),
    Target("uws", "raw", lambda: ["node", str(PEERS / "uws_server.js"), "0"],
           _node_check("@trufflesuite/uws-js-unofficial"),
           lambda: _node_package_version("@trufflesuite/uws-js-unofficial"),
           env={"BENCH_SEND_BUFFER_LIMIT": str(SEND_BUFFER_LIMIT)}),
    Target("ws", "raw", lambda: ["node", str(PEERS / "ws_server.js"), "0"],
           _node_check("ws"), lambda: _node_package_version("ws")),
    Target("socket.io", "socketio", lambda: ["node", str(PEERS / "socketio_server.js"), "0"],
           _node_check("socket.io"), lambda: _node_package_version("socket.io")),
    Target("websockets", "raw",
           lambda: [str(PEERS_VENV), str(PEERS / "websockets_server.py"), "0"],
           _py_peer_check("websockets"), _py_peer_version("websockets")),
    Target("python-socketio", "socketio",
           lambda: [str(PEERS_VENV), str(PEERS / "socketio_server.py"), "0"],
           _py_peer_check("socketio, uvicorn"),
           _py_peer_version("python-socketio", "python-engineio", "uvicorn", "uvloop",
                            "websockets")),
]}
#: The order of the targets in the tables (as they are listed above).
_TARGET_ORDER = {name: i for i, name in enumerate(TARGETS)}


class Running:
    """A target process pinned to CPU 0."""

    def __init__(self, target: Target) -> None:
        self.target = target
        argv = target.argv()
        env = {**os.environ, **target.env}
        if target.name == "relaycore" and _SNAPSHOT is not None:
            env["PYTHONPATH"] = str(_SNAPSHOT)
        if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
            argv = ["taskset", "-c", "0", *argv]
        self.log = open(f"/tmp/relaycore-bench-{target.name}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env, cwd=BENCH)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 30
        self.port = 0
        for line in self.proc.stdout:
            match = re.search(r"listening on \S*:(\d+)", line)
            if match:
                self.port = int(match.group(1))
                break
            if time.monotonic() > deadline:
                break
        if not self.port:
            self.stop()
            raise RuntimeError(f"{target.name} did not start (see {self.log.name})")
        self.pid = self.proc.pid
        self.spy: subprocess.Popen[bytes] | None = None
        profile = os.environ.get("BENCH_RELAY_PROFILE")
        if profile and target.name == "relaycore":
            # py-spy's raw samples of the relay for as long as it runs, for profiling (the
            # sampler shares the relay's CPU: not for figures).
            self.spy = subprocess.Popen(
                [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(self.pid),
                 "--rate", "200", "--nonblocking", "--format", "raw", "--output", profile],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        _stop_process(self.proc, self.spy, self.log, grace=10)


def _stop_process(proc: subprocess.Popen[Any], spy: subprocess.Popen[bytes] | None,
                  log: Any, grace: float) -> None:
    """Stop a benchmarked process: its py-spy first (it writes its file on SIGINT), then the
    process (SIGTERM, SIGKILL after ``grace`` seconds), then close its log."""
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=30)
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log.close()


#: S1's app servers for relaycore: the minimal one inside the generator ("loadgen"), and
#: relaycore's server SDK (bench/sdk_app_server.py) in its own process on each backend.
APP_SERVERS = {"loadgen": "app server", "sdk-uvloop": "SDK uvloop", "sdk-asyncio": "SDK asyncio",
               "sdk-trio": "SDK trio"}


def app_core() -> int | None:
    """The CPU S1's SDK app server is pinned to: a core of its own from three cores on (the
    relay has CPU 0, the generator CPU 1); with two it shares the generator's (CPU 1), so its
    capacity there is a floor; ``None`` on one core (no pinning)."""
    cores = os.cpu_count() or 1
    if cores < 2 or not shutil.which("taskset"):
        return None
    return 2 if cores > 2 else 1


class AppServer:
    """S1's SDK app server (bench/sdk_app_server.py) connected to the relay at ``port``."""

    def __init__(self, port: int, backend: str, connections: int) -> None:
        argv = [sys.executable, str(BENCH / "sdk_app_server.py"), "--port", str(port),
                "--backend", backend, "--connections", str(connections)]
        core = app_core()
        if core is not None:
            argv = ["taskset", "-c", str(core), *argv]
        env = dict(os.environ)
        source = _SDK_SNAPSHOT or _SNAPSHOT
        if source is not None:
            env["PYTHONPATH"] = str(source)
        self.log = open(f"/tmp/relaycore-bench-sdk-{backend}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env, cwd=BENCH)
        assert self.proc.stdout is not None
        import select
        ready, _, _ = select.select([self.proc.stdout], [], [], 60.0)
        # "ready" once its connections are up
        line = self.proc.stdout.readline() if ready else ""
        if line.strip() != "ready":
            self.stop()
            raise RuntimeError(f"the SDK app server did not start (see {self.log.name})")
        self.pid = self.proc.pid
        self.spy: subprocess.Popen[bytes] | None = None
        profile = os.environ.get("BENCH_SDK_PROFILE")
        if profile:
            # py-spy's raw samples of the app server while it runs (BENCH_RELAY_PROFILE's twin)
            spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            self.spy = subprocess.Popen(
                [spy, "record", "--pid", str(self.pid), "--rate", "200", "--nonblocking",
                 "--format", "raw", "--output", f"{profile}.{backend}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        _stop_process(self.proc, self.spy, self.log, grace=15)


def sdk_backend_missing(backend: str) -> str | None:
    """Why S1's SDK app server cannot run on ``backend`` here (``None``: it can)."""
    if backend == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            return "uvloop is not installed"
    return None


def adapter_for(target: Target, hub: str = "bench") -> Any:
    if target.adapter == "signalr":
        return SignalRAdapter(hub=hub)
    return RawAdapter() if target.adapter == "raw" else SocketIOAdapter()


# -- scenario helpers -------------------------------------------------------------------------


def passes(step: dict[str, Any]) -> bool:
    return (step["reach"] >= 1.0 and step["p99_ms"] is not None
            and step["p99_ms"] <= P99_BOUND_MS)


def show(step: dict[str, Any]) -> None:
    """One line per step; p50/p99/max at the sockets' arrival, and the p99 at the generator's
    read (which includes its own read-out of the other sockets) beside it."""
    p99 = step["p99_ms"]
    read = step.get("read_p99_ms")
    print(f"    {step['target']:>15} {step['scenario']:<4} {step.get('variant', ''):<12}"
          f"{step['payload']:>5} B {step['offered_deliveries_per_s']:>9,.0f}/s offered "
          f"{step['delivered_per_s']:>9,.0f}/s delivered  reach {step['reach']:.4f}  "
          f"p50 {step['p50_ms'] or 0:7.2f}  p99 {p99 if p99 is not None else float('nan'):7.2f}"
          f" (read p99 {read if read is not None else float('nan'):5.1f})"
          f"  max {step['max_ms'] or 0:7.1f} ms  target {step['target_cpu_percent']:3.0f}% "
          f"{step['target_cpu_s_per_1M_deliveries'] or 0:5.2f} CPU-s/1M  "
          + (f"+ app {step['app_cpu_percent']:3.0f}% "
             f"{step['app_cpu_s_per_1M_deliveries'] or 0:5.2f} CPU-s/1M  "
             if "app_cpu_s" in step else "")
          + f"gen {step['generator_cpu_percent']:3.0f}% "
          f"(late {step['publisher_behind_max_ms']:.0f} ms)"
          f" other {step['foreign_cpu_percent']:3.0f}%"
          f"{' GEN-BOUND' if step['generator_bound'] else ''}"
          f"{'' if passes(step) else '  (fails p99/reach)'}", flush=True)


async def ladder(ctx: Context, gen: Generator, send: Callable[[int, str], None],
                 rates: list[float], *, recipients: int, payload: int, pid: int,
                 label: dict[str, Any], threaded: bool = True,
                 companions: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """Steps of increasing offered deliveries/s until two in a row fail p99/reach
    (``companions``: other processes of the target, measured beside it)."""
    steps = []
    fails = 0
    for deliveries in rates:
        for attempt in range(ctx.args.retries + 1):
            step = await gen.run_step(send, rate=deliveries / recipients, duration=ctx.duration,
                                      payload=payload, recipients=recipients, target_pid=pid,
                                      label={**label, "payload": payload}, grace=ctx.grace,
                                      thread=ctx.thread if threaded else None,
                                      companions=companions)
            step["disturbed"] = step["foreign_cpu_percent"] > ctx.args.foreign_limit
            step["attempts"] = attempt + 1
            if not step["disturbed"] or passes(step):
                break
            print(f"    (other processes used {step['foreign_cpu_percent']:.0f}% of a core "
                  "during the step: measuring it again)", flush=True)
            await quiet(ctx)
        step["pass"] = passes(step)
        steps.append(step)
        show(step)
        # go on past the p99 bound while the target still delivers: the capacity at reach 1.0
        # is reported too; stop once it loses messages or queues for long
        overloaded = step["reach"] < 1.0 or (step["p99_ms"] or 1e9) > ctx.args.stop_p99
        fails = fails + 1 if overloaded else 0
        if fails >= ctx.args.max_fails or step["reach"] < 0.5:
            break
    return steps


async def quiet(ctx: Context, exclude: set[int] | None = None, limit: float = 60.0) -> None:
    """Wait (at most ``limit`` s) for a second in which other processes use less than
    ``--foreign-limit`` % of a core."""
    from loadgen.core import foreign_cpu, foreign_cpu_seconds
    deadline = time.perf_counter() + limit
    while time.perf_counter() < deadline:
        f0, t0 = foreign_cpu(exclude or set()), time.perf_counter()
        await asyncio.sleep(1.0)
        share = 100 * foreign_cpu_seconds(f0, foreign_cpu(exclude or set())) / (
            time.perf_counter() - t0)
        if share < ctx.args.foreign_limit:
            return


async def wait_until(condition: Callable[[], bool], limit: float) -> None:
    """Poll ``condition`` every 10 ms until it holds; fail after ``limit`` seconds."""
    deadline = time.perf_counter() + limit
    while not condition():
        if time.perf_counter() > deadline:
            raise TimeoutError(f"condition not met within {limit:.0f} s")
        await asyncio.sleep(0.01)


async def settle(pid: int, percent: float = 5.0, limit: float = 30.0) -> None:
    """Wait (at most ``limit`` s) for half a second in which the target uses less than
    ``percent`` % of a core, e.g. until it has finished closing connections."""
    deadline = time.perf_counter() + limit
    while time.perf_counter() < deadline:
        cpu0, t0 = cpu_seconds(pid), time.perf_counter()
        await asyncio.sleep(0.5)
        if 100 * (cpu_seconds(pid) - cpu0) / (time.perf_counter() - t0) < percent:
            return


@dataclass
class Context:
    args: argparse.Namespace
    backend: str
    duration: float
    grace: float
    run: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)
    #: the publishers' own event loop (see loadgen.core.PublisherThread)
    thread: Any = None

    async def open_publisher(self, adapter: Any, port: int) -> Any:
        return await self.thread.run(adapter.open_publisher(port, self.backend))

    async def close_publisher(self, pub: Any) -> None:
        await self.thread.run(pub.aclose())

    def scale(self, full: int, smoke: int) -> int:
        return smoke if self.args.smoke else full


# -- scenarios --------------------------------------------------------------------------------


async def s2_broadcast(ctx: Context, target: Target, running: Running) -> None:
    """S2 (and S8 for relaycore): broadcast to 1,000 subscribers."""
    n = ctx.scale(1000, 20)

    async def body(r: Running) -> None:
        adapter = adapter_for(target)
        gen = Generator(adapter, r.port, backend=ctx.backend)
        rss0 = rss_bytes(r.pid)
        await gen.connect(n)
        await asyncio.sleep(0.5)
        rss1 = rss_bytes(r.pid)
        publishers = {"server": await ctx.open_publisher(adapter, r.port)}
        if target.name == "relaycore" and "S8" in ctx.args.scenarios:
            publishers["rest"] = await ctx.thread.run(RestPublisher(r.port, "bench").start())
        label = {"scenario": "S2", "target": target.name, "run": ctx.run, "subscribers": n,
                 "rss_per_connection": (rss1 - rss0) / n}
        for payload in ctx.args.payloads:
            for via, pub in publishers.items():
                if via == "rest":
                    rates = ctx.args.rest_rates
                    lab = {**label, "scenario": "S8", "variant": "rest"}
                else:
                    rates = ctx.args.rates
                    lab = {**label, "variant": "server" if target.name == "relaycore" else ""}
                ctx.records += await ladder(
                    ctx, gen, lambda i, t, pub=pub: pub.publish("all", t),
                    [x * n / 1000 for x in rates], recipients=n, payload=payload,
                    pid=r.pid, label=lab)
        for pub in publishers.values():
            await ctx.close_publisher(pub)
        await gen.close_all()

    await body(running)


async def s1_echo(ctx: Context, target: Target, running: Running) -> None:
    """S1: echo. relaycore: client -> relay -> app server (service protocol) -> relay ->
    client, once per app server of ``--app-servers`` (the minimal one inside the generator,
    relaycore's server SDK in a process of its own); peers: the server sends the message back
    to its sender."""
    n = ctx.scale(1000, 20)
    apps = ctx.args.app_servers if target.name == "relaycore" else [None]

    async def body(r: Running, app_server: str | None) -> None:
        adapter = adapter_for(target, hub="echo")
        app = sdk = None
        if app_server == "loadgen":
            app = await ServiceConnection.open(r.port, ctx.backend, hub="echo",
                                               connection_type=ConnectionType.DEFAULT,
                                               echo=True)
        elif app_server is not None:
            sdk = AppServer(r.port, app_server.removeprefix("sdk-"), ctx.args.app_connections)
        try:
            gen = Generator(adapter, r.port, backend=ctx.backend)
            conns = await gen.connect(n)
            label = {"scenario": "S1", "target": target.name, "run": ctx.run, "clients": n,
                     "variant": APP_SERVERS.get(app_server or "", "")}
            if sdk is not None:
                label["app_core"] = app_core()
                label["sdk_commit"] = ctx.args.sdk_commit
            rates = ctx.args.sdk_echo_rates if sdk is not None else ctx.args.echo_rates
            for payload in ctx.args.payloads:
                ctx.records += await ladder(
                    ctx, gen, lambda i, t: adapter.send_echo(conns[i % n], t),
                    rates, recipients=1, payload=payload, pid=r.pid,
                    label=label, threaded=False,
                    companions={"app": sdk.pid} if sdk is not None else None)
            await gen.close_all()
        finally:
            if app is not None:
                await app.aclose()
            if sdk is not None:
                sdk.stop()

    for app_server in apps:
        why = sdk_backend_missing(app_server.removeprefix("sdk-")) if app_server else None
        if why is not None:
            print(f"    skipped S1 with the {APP_SERVERS[app_server]} app server: {why}",
                  flush=True)
            continue
        await body(running, app_server)


async def s3_groups(ctx: Context, target: Target, running: Running) -> None:
    """S3: 5,000 connections in groups of 10; each message goes to one group."""
    n = ctx.scale(5000, 40)
    size = 10
    groups = n // size

    async def body(r: Running) -> None:
        adapter = adapter_for(target, hub="groups")
        gen = Generator(adapter, r.port, backend=ctx.backend)
        if target.name == "relaycore":
            await gen.connect(n, user_of=lambda i: f"u{i}")
        else:
            await gen.connect(n, room_of=lambda i: f"g{i // size}")
        pub = await ctx.open_publisher(adapter, r.port)
        if target.name == "relaycore":
            await ctx.thread.run(pub.join_users([(f"u{i}", f"g{i // size}") for i in range(n)]))
        label = {"scenario": "S3", "target": target.name, "run": ctx.run, "connections": n,
                 "group_size": size}
        for payload in ctx.args.payloads:
            ctx.records += await ladder(
                ctx, gen, lambda i, t: pub.publish(f"g{i % groups}", t), ctx.args.group_rates,
                recipients=size, payload=payload, pid=r.pid, label=label)
        await ctx.close_publisher(pub)
        await gen.close_all()

    await body(running)


async def s4_targeted(ctx: Context, target: Target, running: Running) -> None:
    """S4: one message to one connection among 1,000 and then among 15,000, the same rate.
    relaycore: ``ConnectionData`` from the app server the client is bound to, and ``UserData``
    to a user; a peer: its publisher sends to a room that holds just that connection (each
    connection joins a room of its own), the nearest thing these servers have to an address.
    The peers show what 15,000 open sockets cost per delivery in the kernel and the hardware,
    whatever the server's own data structures."""
    small, large = ctx.scale(1000, 20), ctx.scale(15000, 60)
    # 1,000, then 15,000, then back to 1,000: the ratio of each run compares the 15,000 step
    # with the mean of the two 1,000 steps around it, which cancels the drift of a shared VM
    # over the minute between them (single steps here move by 10-30 %).
    sizes = [small, large, small]
    relaycore = target.name == "relaycore"

    async def body(r: Running) -> None:
        adapter = adapter_for(target, hub="direct")
        if relaycore:
            app = await ServiceConnection.open(r.port, ctx.backend, hub="direct",
                                               connection_type=ConnectionType.DEFAULT, echo=True)
        else:
            pub = await adapter.open_publisher(r.port, ctx.backend)
        gen = Generator(adapter, r.port, backend=ctx.backend)
        for visit, total in enumerate(sizes):
            if total < len(gen.conns):
                await gen.close_from(total)
                if relaycore:  # the app server hears of each close (CloseConnection)
                    await wait_until(lambda n=total: len(app.clients) <= n, 60.0)
                await settle(r.pid)
            elif relaycore:
                await gen.connect(total - len(gen.conns), user_of=lambda i: f"u{i}",
                                  sample_every=max(1, total // 100))
            else:
                await gen.connect(total - len(gen.conns), room_of=lambda i: f"c{i}",
                                  sample_every=max(1, total // 100))
            ids = list(app.clients) if relaycore else []
            users = [f"u{i}" for i in range(total)]

            def to_connection(i: int, text: str, ids: list[str] = ids) -> None:
                app.conn.send_binary(write_service_message(ConnectionDataMessage(
                    ids[(i * 7919) % len(ids)],
                    b'{"type":1,"target":"t","arguments":["%s"]}\x1e' % text.encode())))

            def to_user(i: int, text: str, users: list[str] = users) -> None:
                app.send_to_user(users[(i * 7919) % len(users)], text)

            def to_room(i: int, text: str, total: int = total) -> None:
                pub.publish(f"c{(i * 7919) % total}", text)

            # What the target burns with these connections open and nothing sent (keep-alive,
            # timers), so that the routing cost per delivery can be told apart from it.
            # Steps three times as long as the others': the figure compared is a ratio of two
            # CPU readings in 10 ms ticks, and a 10 % bound needs them steady.
            duration = 3 * ctx.duration
            await asyncio.sleep(0.5)
            cpu0, t0 = cpu_seconds(r.pid), time.perf_counter()
            await asyncio.sleep(duration)
            idle_cpu = (cpu_seconds(r.pid) - cpu0) / (time.perf_counter() - t0)
            variants = ((("connection", to_connection), ("user", to_user)) if relaycore
                        else (("connection", to_room),))
            for variant, send in variants:
                label = {"scenario": "S4", "target": target.name, "run": ctx.run,
                         "connections": total, "visit": visit,
                         "variant": f"{variant} @{total}"}
                step = await gen.run_step(send, rate=ctx.args.direct_rate, duration=duration,
                                          payload=32, recipients=1, target_pid=r.pid,
                                          label={**label, "payload": 32}, grace=ctx.grace)
                elapsed = step["target_cpu_s"] / max(step["target_cpu_percent"] / 100, 1e-9)
                step["idle_cpu_percent"] = 100 * idle_cpu
                step["marginal_cpu_s_per_1M_deliveries"] = (
                    (step["target_cpu_s"] - idle_cpu * elapsed) / step["delivered"] * 1e6
                    if step["delivered"] else None)
                step["pass"] = passes(step)
                show(step)
                ctx.records.append(step)
        await gen.close_all()
        if relaycore:
            await app.aclose()
        else:
            await pub.aclose()

    await body(running)


async def s5_idle(ctx: Context, target: Target, running: Running) -> None:
    """S5: 15,000 idle connections with keep-alive on: RSS per connection and idle CPU."""
    n = ctx.scale(15000, 50)
    idle = ctx.args.idle_seconds

    async def body(r: Running) -> None:
        adapter = adapter_for(target, hub="idle")
        gen = Generator(adapter, r.port, backend=ctx.backend)
        await asyncio.sleep(0.5)
        rss0 = rss_bytes(r.pid)
        t0 = time.perf_counter()
        await gen.connect(n, sample_every=n + 1, concurrency=128)
        connect_s = time.perf_counter() - t0
        await asyncio.sleep(1.0)
        cpu0, g0, t1 = cpu_seconds(r.pid), time.process_time(), time.perf_counter()
        await asyncio.sleep(idle)
        elapsed = time.perf_counter() - t1
        cpu = cpu_seconds(r.pid) - cpu0
        rss1 = rss_bytes(r.pid)
        alive = sum(1 for c in gen.conns if not c.closed)
        record = {"scenario": "S5", "target": target.name, "run": ctx.run, "connections": n,
                  "alive_after_idle": alive, "connect_seconds": connect_s,
                  "connects_per_s": n / connect_s, "idle_seconds": elapsed,
                  "rss_before_bytes": rss0, "rss_after_bytes": rss1,
                  "rss_per_connection": (rss1 - rss0) / n,
                  "idle_cpu_percent": 100 * cpu / elapsed,
                  "generator_cpu_percent": 100 * (time.process_time() - g0) / elapsed}
        print(f"    {target.name:>15} S5   {n} idle connections ({n / connect_s:,.0f} "
              f"connects/s): RSS {record['rss_per_connection']:,.0f} B/connection, idle CPU "
              f"{record['idle_cpu_percent']:.2f}% of a core, {alive} alive after {elapsed:.0f} s",
              flush=True)
        ctx.records.append(record)
        await gen.close_all()

    await body(running)


async def s6_churn(ctx: Context, target: Target, running: Running) -> None:
    """S6: S2 (1,000 subscribers, 32 B) while 1,000 other clients per second connect and
    disconnect (each stays ``churn_life`` s)."""
    n = ctx.scale(1000, 20)
    per_s = ctx.scale(1000, 20)

    async def body(r: Running) -> None:
        adapter = adapter_for(target)
        gen = Generator(adapter, r.port, backend=ctx.backend)
        await gen.connect(n)
        pub = await ctx.open_publisher(adapter, r.port)
        stats: dict[str, Any] = {"opened": 0, "failed": 0}
        errors: dict[str, int] = {}

        async def one() -> None:
            try:
                conn = await gen.open_one(measured=False)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                stats["failed"] += 1
                if not errors:
                    import traceback
                    traceback.print_exc()
                errors[repr(exc)[:120]] = errors.get(repr(exc)[:120], 0) + 1
                return
            stats["opened"] += 1
            await asyncio.sleep(ctx.args.churn_life)
            conn.close()

        async def churn() -> None:
            tasks = set()
            start = time.perf_counter()
            started = 0
            try:
                while True:
                    due = int((time.perf_counter() - start) * per_s)
                    while started < due:
                        task = asyncio.get_running_loop().create_task(one())
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                        started += 1
                    await asyncio.sleep(0.005)
            finally:
                for task in tasks:
                    task.cancel()

        for rate in ctx.args.churn_rates:
            stats.update(opened=0, failed=0)
            label = {"scenario": "S6", "target": target.name, "run": ctx.run, "subscribers": n,
                     "payload": 32, "churn_per_s_offered": per_s}
            step = await gen.run_step(lambda i, t: pub.publish("all", t), rate=rate / 1000,
                                      duration=ctx.duration, payload=32, recipients=n,
                                      target_pid=r.pid, label=label, grace=ctx.grace,
                                      during=churn, thread=ctx.thread)
            step["pass"] = passes(step)
            step["churn_connects"] = stats["opened"]
            step["churn_failed"] = stats["failed"]
            step["churn_per_s"] = stats["opened"] / ctx.duration
            step["churn_errors"] = dict(errors)
            show(step)
            print(f"      churn: {stats['opened']} connects ({stats['opened'] / ctx.duration:,.0f}"
                  f"/s), {stats['failed']} failed", flush=True)
            ctx.records.append(step)
        await ctx.close_publisher(pub)
        await gen.close_all()

    await body(running)


SCENARIOS = {"S1": s1_echo, "S2": s2_broadcast, "S3": s3_groups, "S4": s4_targeted,
             "S5": s5_idle, "S6": s6_churn}


# -- summary ----------------------------------------------------------------------------------


def _median_spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def capacity_ok(step: dict[str, Any]) -> bool:
    return (step["reach"] >= 1.0 and step["p99_ms"] is not None
            and step["p99_ms"] <= CAPACITY_P99_MS)


def best_of_ladders(records: list[dict[str, Any]], scenario: str,
                    ok: Callable[[dict[str, Any]], bool] = passes) -> dict[tuple, dict[str, Any]]:
    """Per (target, variant, payload): each run's highest passing offered rate (and the step
    there), then median and spread over the runs."""
    runs: dict[tuple, dict[int, list[dict[str, Any]]]] = {}
    for rec in records:
        if rec.get("scenario") != scenario or "offered_deliveries_per_s" not in rec:
            continue
        key = (rec["target"], rec.get("variant", ""), rec["payload"])
        runs.setdefault(key, {}).setdefault(rec["run"], []).append(rec)
    out = {}
    for key, by_run in runs.items():
        bests = []
        for steps in by_run.values():
            steps = sorted(steps, key=lambda s: s["offered_deliveries_per_s"])
            good = [s for s in steps if ok(s)]
            best = good[-1] if good else None
            above = [s for s in steps if best is None
                     or s["offered_deliveries_per_s"] > best["offered_deliveries_per_s"]]
            bound = bool((best and best["generator_bound"])
                         or (above and above[0]["generator_bound"]))
            bests.append((best["offered_deliveries_per_s"] if best else 0.0, best, bound,
                          not above))
        values = [b[0] for b in bests]
        median, low, high = _median_spread(values)
        mid = sorted(bests, key=lambda b: b[0])[len(bests) // 2]
        out[key] = {"median": median, "low": low, "high": high, "step": mid[1],
                    "generator_bound": any(b[2] for b in bests),
                    "ladder_top_passed": any(b[3] for b in bests), "runs": len(bests)}
    return out


def _rate(v: float) -> str:
    return f"{v / 1000:,.0f}k" if v >= 10000 else f"{v:,.0f}"


def _fmt_best(b: dict[str, Any]) -> str:
    text = _rate(b["median"])
    if b["runs"] > 1:
        text += f" ({_rate(b['low'])}–{_rate(b['high'])})"
    if b["ladder_top_passed"]:
        text += " ≥"
    if b["generator_bound"]:
        text += " †"
    return text


def latency_note(records: list[dict[str, Any]], scenarios: tuple[str, ...]) -> str:
    """The footnote saying which latency a table's p50/p99 are: the subscribers' socket
    arrival (where the generator recorded it) or the generator's read (older result files)."""
    clocks = {r.get("latency_clock") or READ_CLOCK for r in records
              if r.get("scenario") in scenarios and r.get("p99_ms") is not None}
    if not clocks:
        return ""
    if clocks == {ARRIVAL_CLOCK}:
        return ("Latency (p50, p99): from a message's due time to its arrival at the "
                "receiving client's socket (the kernel's receive time, SO_TIMESTAMPNS, on the "
                "sampled connections), which leaves out the generator's own read-out of its "
                "other sockets; the p99 at the generator's read is in the JSON (read_p99_ms).")
    if clocks == {READ_CLOCK}:
        return ("Latency (p50, p99): from a message's due time to the generator's read of it, "
                "which includes the generator's own read-out of its other sockets (no socket "
                "arrival times in this run).")
    return ("Latency (p50, p99): from a message's due time to its arrival at the receiving "
            "client's socket (SO_TIMESTAMPNS) where the generator had it, else to the "
            "generator's read (latency_clock in the JSON says which, per step; read_p99_ms is "
            "the read p99).")


def s1_cpu_table(records: list[dict[str, Any]]) -> list[str]:
    """S1's CPU per echo at each offered rate a target held (reach 1.0, p99 ≤ 50 ms): the
    relay's and the app server's (relaycore through the SDK), the target's own (a peer echoes
    in its one process); medians over runs, CPU-µs per echo (CPU-s per 1M)."""
    steps = [r for r in records if r.get("scenario") == "S1" and "offered_deliveries_per_s" in r
             and r.get("target_cpu_s_per_1M_deliveries") is not None and capacity_ok(r)]
    if not steps:
        return []
    rates = sorted({r["offered_deliveries_per_s"] for r in steps})
    cells: dict[tuple, dict[float, list[dict[str, Any]]]] = {}
    for r in steps:
        variant = r.get("variant", "")
        order = list(APP_SERVERS.values())
        key = (r["payload"], _TARGET_ORDER.get(r["target"], 99), r["target"],
               order.index(variant) if variant in order else len(order), variant)
        cells.setdefault(key, {}).setdefault(r["offered_deliveries_per_s"], []).append(r)

    def cell(rs: list[dict[str, Any]]) -> str:
        relay = statistics.median(x["target_cpu_s_per_1M_deliveries"] for x in rs)
        apps = [x["app_cpu_s_per_1M_deliveries"] for x in rs
                if x.get("app_cpu_s_per_1M_deliveries") is not None]
        if not apps:
            return f"{relay:.1f}"
        app = statistics.median(apps)
        return f"{relay:.1f} + {app:.1f} = {relay + app:.1f}"

    core = next((r.get("app_core") for r in steps if r.get("app_core") is not None), None)
    lines = ["### S1: CPU per echo, relay + app server (CPU-µs per echo)", "",
             "| target | variant | payload | " + " | ".join(f"{_rate(x)}/s" for x in rates)
             + " |", "|---|---|---:|" + "---:|" * len(rates)]
    for (payload, _, target, _, variant), by_rate in sorted(cells.items()):
        lines.append(f"| {target} | {variant} | {payload} B | "
                     + " | ".join(cell(by_rate[x]) if x in by_rate else "–" for x in rates)
                     + " |")
    lines += ["", "At each offered rate the target held (reach 1.0, p99 ≤ 50 ms), median over "
              "runs. relaycore through the SDK: the relay's CPU + the SDK app server's = the "
              "total; the \"app server\" variant's app server runs inside the generator and is "
              "not counted; a peer echoes in its one process. Cores: the relay on CPU 0, the "
              "generator on CPU 1, the SDK app server on CPU "
              f"{core if core is not None else '(not pinned)'}"
              + (" (shared with the generator: its capacity is a floor)." if core == 1 else "."),
              ""]
    return lines


def markdown(facts: dict[str, Any], records: list[dict[str, Any]]) -> str:
    lines = [f"Commit `{facts['commit']}`, {facts['date']}, {facts['machine']}; generator: "
             f"{facts['generator']}; S2/S8: {facts['runs']} run(s), other scenarios: "
             f"{facts['other_runs']} run(s); median (lowest–highest) over runs.", ""]
    lines += ["Versions: " + "; ".join(f"{k}: {v}" for k, v in facts["versions"].items()), ""]
    legend = ("† generator-bound: the generator was above 80 % CPU at the best passing step or "
              "the first failing one, so the figure is a floor for the target. "
              "≥: the highest offered rate passed (the ladder ended before the target failed).")

    for scenario, title, unit in (
            ("S2", "S2: broadcast to 1,000 subscribers", "deliveries/s"),
            ("S8", "S8: relaycore broadcast through the REST API beside the server connection "
                   "(1,000 subscribers)", "deliveries/s"),
            ("S1", "S1: echo, 1,000 clients", "echoes/s"),
            ("S3", "S3: small groups, 5,000 connections in groups of 10", "deliveries/s")):
        strict = best_of_ladders(records, scenario)
        cap = best_of_ladders(records, scenario, capacity_ok)
        if scenario == "S8":  # the server-connection rows of S2, for the comparison
            strict.update({k: v for k, v in best_of_ladders(records, "S2").items()
                           if k[0] == "relaycore"})
            cap.update({k: v for k, v in best_of_ladders(records, "S2", capacity_ok).items()
                        if k[0] == "relaycore"})
        if not cap:
            continue
        low = {}
        for rec in records:
            if rec.get("scenario") in (scenario, "S2" if scenario == "S8" else scenario) and \
                    rec.get("p99_ms") is not None and "offered_deliveries_per_s" in rec:
                key = (rec["target"], rec.get("variant", ""), rec["payload"])
                if key in cap and (key not in low or rec["offered_deliveries_per_s"]
                                   < low[key]["offered_deliveries_per_s"]):
                    low[key] = rec
        units_col = scenario in ("S1", "S2")
        lines += [f"### {title}", "",
                  f"| target | variant | payload | {unit} with p99 ≤ {P99_BOUND_MS:g} ms | "
                  f"capacity: {unit} with p99 ≤ {CAPACITY_P99_MS:g} ms | p99 there | target "
                  "CPU-s per 1M there | relaycore ÷ target (capacity) | lowest rate: p99 |"
                  + (" Azure units per core |" if units_col else "")
                  + (" RSS per connection |" if scenario == "S2" else ""),
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if units_col else "")
                  + ("---:|" if scenario == "S2" else "")]
        for key, c in sorted(cap.items(), key=lambda kv: (kv[0][2], -kv[1]["median"])):
            target, variant, payload = key
            st = strict.get(key)
            rel = next((v for (t, var, p), v in cap.items() if t == "relaycore" and p == payload
                        and var in ("server", "app server", "")), None)
            ratio = (f"{rel['median'] / c['median']:.2f}×" if rel and c["median"]
                     and target != "relaycore" else ("n/a (peer 0)" if target != "relaycore"
                                                     and rel else ""))
            step = c["step"] or {}
            p99 = step.get("p99_ms")
            cpu = step.get("target_cpu_s_per_1M_deliveries")
            lo = low.get(key)
            lo_text = (f"{_rate(lo['offered_deliveries_per_s'])}/s: {lo['p99_ms']:.1f} ms"
                       if lo else "–")
            row = (f"| {target} | {variant} | {payload} B | {_fmt_best(st) if st else '–'} | "
                   f"{_fmt_best(c)} | {f'{p99:.1f} ms' if p99 is not None else '–'} | "
                   f"{f'{cpu:.2f}' if cpu else '–'} | {ratio} | {lo_text} |")
            if units_col:
                per = 2000 if scenario == "S2" else 1000
                row += (f" {c['median'] / per:,.0f} |" if scenario == "S1" or payload >= 2048
                        else " |")
            if scenario == "S2":
                rss = next((r.get("rss_per_connection") for r in records
                            if r.get("scenario") == "S2" and r["target"] == target
                            and r.get("rss_per_connection")), None)
                row += f" {rss / 1024:,.1f} KB |" if rss else " – |"
            lines.append(row)
        lines += ["", legend + (" Azure units per core: deliveries/s ÷ 2,000 at 2 KB." if
                                scenario == "S2" else " Azure units per core: echoes/s ÷ 1,000."
                                if scenario == "S1" else "")
                  + " " + latency_note(records, (scenario, "S2") if scenario == "S8"
                                       else (scenario,)), ""]

    lines += s1_cpu_table(records)

    s4 = [r for r in records if r.get("scenario") == "S4"]
    if s4:
        lines += ["### S4: send to one connection (relaycore: or one user) among 1,000 and "
                  "15,000 (32 B, same offered rate)", "",
                  "| target | variant | connections | offered/s | delivered/s | reach | p99 | "
                  "target CPU-s per 1M deliveries | of which user / system | target idle CPU "
                  "with these connections | the same minus idle (routing cost) | 15,000 ÷ 1,000 "
                  "(routing cost, per run), and µs added per delivery | generator CPU |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for r in s4:
            groups.setdefault((_TARGET_ORDER.get(r["target"], 99), r["target"],
                               r["variant"].split(" @")[0], r["connections"]), []).append(r)

        def med(k: str, rs: list[dict[str, Any]]) -> float:
            vals = [x[k] for x in rs if x.get(k) is not None]
            return statistics.median(vals) if vals else float("nan")

        def growth(name: str, variant: str, total: int) -> str:
            """Median (lowest-highest) over runs of each run's routing cost at ``total``
            divided by the mean of its routing costs at the smallest size (the steps before
            and after the large one), and the median of the same difference in CPU-µs per
            delivery (what the larger table adds, comparable across servers)."""
            sizes = sorted({t for (_, n, v, t) in groups if (n, v) == (name, variant)})
            if total == sizes[0]:
                return ""
            ratios, added = [], []
            for rec in groups[(_TARGET_ORDER.get(name, 99), name, variant, total)]:
                base = [x["marginal_cpu_s_per_1M_deliveries"] for x in groups[
                    (_TARGET_ORDER.get(name, 99), name, variant, sizes[0])]
                    if x["run"] == rec["run"] and x.get("marginal_cpu_s_per_1M_deliveries")]
                cost = rec.get("marginal_cpu_s_per_1M_deliveries")
                if base and cost:
                    mean = statistics.fmean(base)
                    ratios.append(cost / mean)
                    added.append(cost - mean)
            if not ratios:
                return "–"
            mid, lo, hi = _median_spread(ratios)
            return f"{mid:.2f}× ({lo:.2f}–{hi:.2f}), {statistics.median(added):+.1f} µs"

        for (_, name, variant, total), rs in sorted(groups.items()):
            per = 1e6 / max(med("delivered", rs), 1)
            routing = med("marginal_cpu_s_per_1M_deliveries", rs)
            lines.append(f"| {name} | {variant} | {total:,} | "
                         f"{med('offered_deliveries_per_s', rs):,.0f} | "
                         f"{med('delivered_per_s', rs):,.0f} | {med('reach', rs):.4f} | "
                         f"{med('p99_ms', rs):.1f} ms | "
                         f"{med('target_cpu_s_per_1M_deliveries', rs):.2f} | "
                         f"{med('target_user_cpu_s', rs) * per:.1f} / "
                         f"{med('target_system_cpu_s', rs) * per:.1f} | "
                         f"{med('idle_cpu_percent', rs):.1f} % | {routing:.2f} | "
                         f"{growth(name, variant, total)} | "
                         f"{med('generator_cpu_percent', rs):.0f} % |")
        lines += ["", "Rows: medians over runs (the 1,000 row over the steps before and after "
                  "the 15,000 one). 15,000 ÷ 1,000: each run's routing cost among 15,000 over "
                  "the mean of its own 1,000 steps; median (lowest–highest) over runs; then "
                  "the median over runs of the difference (CPU-s per 1M deliveries, that is "
                  "CPU-µs per delivery), which the kernel's share makes comparable across "
                  "servers: each pays the same loopback write to one cold socket among "
                  "15,000.",
                  "", latency_note(records, ("S4",)), ""]

    s5 = [r for r in records if r.get("scenario") == "S5"]
    if s5:
        lines += ["### S5: idle connections with keep-alive", "",
                  "| target | connections | RSS per connection | idle CPU (% of a core) | "
                  "connects/s while opening | relaycore ÷ target (RSS) | Azure units per core |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        by_target: dict[str, list[dict[str, Any]]] = {}
        for r in s5:
            by_target.setdefault(r["target"], []).append(r)
        meds = {t: statistics.median(x["rss_per_connection"] for x in rs)
                for t, rs in by_target.items()}
        for t, rs in sorted(by_target.items(), key=lambda kv: meds[kv[0]]):
            rss = [x["rss_per_connection"] for x in rs]
            cpu = [x["idle_cpu_percent"] for x in rs]
            m, lo, hi = _median_spread(rss)
            ratio = (f"{meds['relaycore'] / m:.2f}×" if "relaycore" in meds and t != "relaycore"
                     else "")
            lines.append(f"| {t} | {rs[0]['connections']:,} | {m / 1024:.1f} KB "
                         f"({lo / 1024:.1f}–{hi / 1024:.1f}) | {statistics.median(cpu):.2f} % | "
                         f"{statistics.median(x['connects_per_s'] for x in rs):,.0f} | {ratio} | "
                         f"{rs[0]['connections'] / 1000:,.0f} |")
        lines.append("")

    s6 = [r for r in records if r.get("scenario") == "S6"]
    if s6:
        lines += ["### S6: S2 (1,000 subscribers, 32 B) during connect/disconnect churn", "",
                  "| target | offered deliveries/s | churn connects/s | reach | p50 | p99 | "
                  "target CPU | generator CPU |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        groups6: dict[tuple, list[dict[str, Any]]] = {}
        for r in s6:
            groups6.setdefault((r["target"], r["offered_deliveries_per_s"]), []).append(r)
        for (t, offered), rs in sorted(groups6.items()):
            def med6(k: str, rs: list[dict[str, Any]] = rs) -> float:
                vals = [x[k] for x in rs if x.get(k) is not None]
                return statistics.median(vals) if vals else float("nan")
            lines.append(f"| {t} | {offered:,.0f} | {med6('churn_per_s'):,.0f} | "
                         f"{med6('reach'):.4f} | {med6('p50_ms'):.1f} ms | {med6('p99_ms'):.1f} ms "
                         f"| {med6('target_cpu_percent'):.0f} % | "
                         f"{med6('generator_cpu_percent'):.0f} % |")
        lines += ["", latency_note(records, ("S6",)), ""]
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, cwd=BENCH, check=False).stdout.strip()
    # what the relay runs: its own code, the protocol and the fast path (not the SDK)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                            "../src/relaycore/relay", "../src/relaycore/protocol",
                            "../src/relaycore/_accel.py", "../src/relaycore/_fastpath.pyx",
                            "../src/relaycore/__main__.py"],
                           capture_output=True, text=True, cwd=BENCH, check=False).stdout.strip()
    return (out or "unknown") + ("-dirty-src" if dirty else "")


def machine() -> str:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({model}), Linux {platform.release()}"


async def main_async(args: argparse.Namespace, targets: list[Target]) -> list[dict[str, Any]]:
    ctx = Context(args, backend=args.backend, duration=args.duration, grace=args.grace,
                  thread=PublisherThread())
    shared = [x for x in args.scenarios if x not in ("S5", "S8")]
    other_runs = args.runs if args.other_runs is None else args.other_runs
    for run in range(1, max(args.runs, other_runs) + 1):
        ctx.run = run
        for target in targets:
            # S5 measures RSS growth, so it gets a fresh process; the rest share one
            now = [x for x in shared if run <= (args.runs if x == "S2" else other_runs)]
            for group in ([now] if now else []) + ([["S5"]] if "S5" in args.scenarios
                                                   and run <= other_runs else []):
                if not args.smoke:
                    await quiet(ctx, limit=30.0)
                running = Running(target)
                try:
                    await asyncio.sleep(0.3)
                    for scenario in group:
                        print(f"== run {run}: {scenario} against {target.name}",
                              flush=True)
                        try:
                            await SCENARIOS[scenario](ctx, target, running)
                        except Exception as exc:  # noqa: BLE001 - one failure must not stop all
                            if args.smoke:
                                raise
                            print(f"    {target.name} {scenario} failed: {exc!r}", flush=True)
                            ctx.records.append({"scenario": scenario, "target": target.name,
                                                "run": run, "error": repr(exc)})
                finally:
                    running.stop()
    ctx.thread.close()
    return ctx.records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny counts, seconds; relaycore and whatever peers are installed")
    parser.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    parser.add_argument("--scenarios", nargs="+", default=["S2", "S8", "S1", "S3", "S4", "S5",
                                                           "S6"],
                        choices=["S1", "S2", "S3", "S4", "S5", "S6", "S8"])
    parser.add_argument("--runs", type=int, default=3, help="runs of S2 (and S8)")
    parser.add_argument("--other-runs", type=int,
                        help="runs of the other scenarios (default: --runs)")
    parser.add_argument("--payloads", type=int, nargs="+", default=[32, 2048])
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per step")
    parser.add_argument("--grace", type=float, default=2.0,
                        help="seconds after a step's last send before what is missing is lost")
    parser.add_argument("--rates", type=float, nargs="+",
                        default=[10e3, 25e3, 50e3, 100e3, 200e3, 300e3, 400e3, 600e3],
                        help="S2 offered deliveries/s (at 1,000 subscribers)")
    parser.add_argument("--rest-rates", type=float, nargs="+", default=[25e3, 50e3, 100e3, 200e3],
                        help="S8 REST offered deliveries/s")
    parser.add_argument("--echo-rates", type=float, nargs="+",
                        default=[5e3, 10e3, 20e3, 30e3, 40e3, 50e3, 60e3, 80e3])
    parser.add_argument("--app-servers", nargs="+", choices=list(APP_SERVERS),
                        default=["loadgen", "sdk-uvloop", "sdk-trio"],
                        help="S1's app servers for relaycore (see APP_SERVERS)")
    parser.add_argument("--sdk-echo-rates", type=float, nargs="+",
                        default=[2e3, 5e3, 10e3, 15e3, 20e3, 30e3, 40e3, 50e3, 60e3],
                        help="S1 offered echoes/s through the SDK app server")
    parser.add_argument("--app-connections", type=int, default=5,
                        help="server connections of S1's SDK app server (the SDK's default)")
    parser.add_argument("--sdk-commit", metavar="REV",
                        help="run S1's SDK app server as of an earlier commit (before/after)")
    parser.add_argument("--group-rates", type=float, nargs="+",
                        default=[25e3, 50e3, 100e3, 200e3, 300e3])
    parser.add_argument("--direct-rate", type=float, default=10e3,
                        help="S4 sends per second (each to one connection or user)")
    parser.add_argument("--churn-rates", type=float, nargs="+", default=[50e3],
                        help="S6 offered broadcast deliveries/s during churn")
    parser.add_argument("--churn-life", type=float, default=0.5,
                        help="S6 seconds each churning client stays connected")
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--foreign-limit", type=float, default=15.0,
                        help="a failing step during which other processes used more than this "
                             "%% of a core is measured again (--retries times)")
    parser.add_argument("--retries", type=int, default=2)
    parser.add_argument("--max-fails", type=int, default=2,
                        help="end a ladder after this many overloaded steps in a row")
    parser.add_argument("--stop-p99", type=float, default=100.0,
                        help="a step with a p99 above this (ms), or reach below 1, is overloaded")
    parser.add_argument("--relay-variant", choices=["none", "gc-off", "gc-tuned"],
                        default="none", help="run relaycore through bench/profile/"
                        "relay_variant.py (what a proposed change would buy)")
    parser.add_argument("--working-tree", action="store_true",
                        help="run the relay from the working tree instead of a snapshot of "
                             "the committed HEAD")
    parser.add_argument("--relay-commit", metavar="REV",
                        help="run the relay as of an earlier commit (before/after figures)")
    parser.add_argument("--backend", choices=["picows", "own"], default=default_backend())
    parser.add_argument("--out", help="result file stem (default bench/results/<date>-<commit>)")
    parser.add_argument("--report", help="rebuild the Markdown tables from a result JSON file")
    args = parser.parse_args()

    if args.report:
        data = json.loads(Path(args.report).read_text())
        table = markdown(data, data["records"])
        Path(args.report).with_suffix(".md").write_text(table + "\n")
        print(table)
        return
    if args.smoke:
        args.runs = 1
        args.duration, args.grace, args.idle_seconds = 0.3, 2.0, 0.3
        args.rates = [20000]
        args.rest_rates = [10000]
        args.echo_rates = [500]
        args.sdk_echo_rates = [500]
        args.group_rates = [1000]
        args.direct_rate = 200
        args.churn_rates = [20000]
        args.churn_life = 0.1
    os.environ["BENCH_RELAY_VARIANT"] = args.relay_variant
    if args.sdk_commit:
        global _SDK_SNAPSHOT
        _SDK_SNAPSHOT = snapshot_src(args.sdk_commit)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})

    targets, skipped = [], {}
    for name in args.targets:
        why = TARGETS[name].check()
        if why is None:
            targets.append(TARGETS[name])
        else:
            skipped[name] = why
    commit = git_commit()
    if args.relay_commit:
        snapshot_relay(args.relay_commit)
        commit = subprocess.run(["git", "rev-parse", "--short", args.relay_commit],
                                cwd=BENCH.parent, capture_output=True, text=True,
                                check=True).stdout.strip()
    elif not args.working_tree:
        snapshot_relay()
        commit = commit.replace("-dirty-src", "")
    facts = {"commit": commit, "date": datetime.date.today().isoformat(), "machine": machine(),
             "generator": f"loadgen on {'uvloop' if _uvloop() else 'asyncio'} + "
                          f"{args.backend}, CPython {platform.python_version()}, pinned to CPU 1;"
                          " targets pinned to CPU 0",
             "runs": args.runs,
             "other_runs": args.runs if args.other_runs is None else args.other_runs,
             "accelerated": ACCELERATED,
             "versions": {t.name: t.version() for t in targets},
             "skipped": skipped, "command": " ".join(["python", "bench/run.py", *sys.argv[1:]]),
             "p99_bound_ms": P99_BOUND_MS, "relay_variant": args.relay_variant,
             "sdk_commit": args.sdk_commit, "sdk_app_core": app_core(),
             "send_buffer_limit": SEND_BUFFER_LIMIT}
    print(f"relaycore side-by-side benchmark: commit {commit}, {facts['machine']}, "
          f"Python {platform.python_version()}, accelerated={ACCELERATED}, "
          f"generator {facts['generator']}", flush=True)
    for name, version in facts["versions"].items():
        print(f"  {name}: {version}")
    for name, why in skipped.items():
        print(f"  SKIPPED {name}: {why}")
    runner = _uvloop()
    if runner is not None:
        records = runner(main_async(args, targets))
    else:
        records = asyncio.run(main_async(args, targets))
    table = markdown(facts, records)
    print()
    print(table)
    if args.smoke:
        errors = [r for r in records if "error" in r]
        if skipped:
            print(f"smoke: skipped {', '.join(skipped)} (not installed)")
        sys.exit(1 if errors else 0)
    stem = Path(args.out) if args.out else BENCH / "results" / f"{facts['date']}-{commit}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({**facts, "records": records}, indent=1))
    stem.with_suffix(".md").write_text(table + "\n")
    print(f"written {stem.with_suffix('.json')} and .md")


def _uvloop() -> Any:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.run


if __name__ == "__main__":
    main()
