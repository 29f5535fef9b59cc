"""Loopback fan-out: broadcasts to N connected SignalR clients, end to end, side by side through
the REST API and through an app server's server connection (the service protocol).

The relay runs as a real subprocess (``python -m relaycore serve``) pinned to CPU 0; this load
generator runs on CPU 1 with its own WebSocket client (relaycore's sans-I/O protocol in the
client role over trio sockets). Each broadcast carries the send time; every client records the
latency of every delivery. Open loop: broadcasts go out at a constant offered rate whatever the
relay does, and what never arrives counts against "reach".

    python bench/fanout.py                 # 1,000 clients, a few rates, JSON in bench/results/
    python bench/fanout.py --smoke         # seconds, tiny counts (CI)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from relaycore import __version__
from relaycore._accel import ACCELERATED
from relaycore.protocol import (
    BroadcastDataMessage,
    ConnectionType,
    JsonHubProtocol,
    Role,
    ServiceHandshakeRequest,
    ServicePing,
    TextMessage,
    WebSocketProtocol,
    write_service_message,
)
from relaycore.protocol._auth import generate_access_token

KEY = "bench-access-key-0123456789abcdefgh"
HUB = "bench"
ROOT = Path(__file__).resolve().parent


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def start_relay() -> tuple[subprocess.Popen[str], int]:
    cmd = [sys.executable, "-m", "relaycore", "serve", "--port", "0", "--access-key", KEY,
           "--log-level", "WARNING"]
    if shutil.which("taskset") and os.cpu_count() and os.cpu_count() > 1:
        cmd = ["taskset", "-c", "0", *cmd]
    env = {**os.environ, "RELAYCORE_SEND_BUFFER_LIMIT": str(64 << 20)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        match = re.search(r"listening on .*:(\d+)", line)
        if match:
            return proc, int(match.group(1))
    raise RuntimeError("the relay exited before it listened")


class Receiver:
    """One client. Every receiver counts invocations in the raw bytes (server frames are not
    masked, so the JSON is visible); one in ``SAMPLE_EVERY`` also decodes them for latency."""

    __slots__ = ("stream", "ws", "latencies", "sampled")

    def __init__(self, stream: trio.SocketStream, sampled: bool) -> None:
        self.stream = stream
        self.ws = WebSocketProtocol(Role.CLIENT, mask_key=lambda: os.urandom(4))
        self.latencies: list[float] = []
        self.sampled = sampled

    async def run(self, expected: int, done: trio.Event, counter: list[int]) -> None:
        ws = self.ws
        while True:
            data = await self.stream.receive_some(65536)
            if not data:
                return
            counter[0] += data.count(b'"type":1')
            if counter[0] >= expected:
                done.set()
            if not self.sampled:
                continue
            ws.receive_data(data)
            now = time.perf_counter()
            for event in ws.events_received():
                if not isinstance(event, TextMessage):
                    continue
                for record in event.data.split("\x1e")[:-1]:
                    if '"type":1' in record:
                        self.latencies.append(now - json.loads(record)["arguments"][0])


SAMPLE_EVERY = 10


async def keep_alive(receivers: list[Receiver]) -> None:
    """Ping from every client as SignalR clients do (every 15 s by default; here every 5 s):
    the relay closes a client that sends nothing for its client timeout (30 s), and the slow
    REST steps alone take longer than that."""
    ping = '{"type":6}\x1e'
    while True:
        await trio.sleep(5.0)
        for r in receivers:
            r.ws.send_text(ping)
            with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
                await r.stream.send_all(r.ws.data_to_send())


async def open_client(port: int, token: str, sampled: bool) -> Receiver:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(
        (f"GET /client/?hub={HUB}&access_token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
         "Upgrade: websocket\r\nConnection: Upgrade\r\n"
         "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
         ).encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += await stream.receive_some(4096)
    assert head.startswith(b"HTTP/1.1 101"), head[:100]
    receiver = Receiver(stream, sampled)
    receiver.ws.send_text('{"protocol":"json","version":1}\x1e')
    await stream.send_all(receiver.ws.data_to_send())
    rest = head.split(b"\r\n\r\n", 1)[1]
    while True:
        if rest:
            receiver.ws.receive_data(rest)
            if any(isinstance(e, TextMessage) and e.data.startswith("{}")
                   for e in receiver.ws.events_received()):
                return receiver
        rest = await stream.receive_some(4096)


class RestPublisher:
    """Broadcasts through the REST API (``POST /api/hubs/{hub}/:send``), one request each."""

    name = "rest"

    def __init__(self, port: int) -> None:
        path = f"/api/hubs/{HUB}/:send"
        token = generate_access_token(KEY, f"http://127.0.0.1{path}", now=time.time())
        self.url = f"http://127.0.0.1:{port}{path}?api-version=2022-06-01"
        self.http = httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"})

    async def publish(self, arguments: list[object]) -> None:
        await self.http.post(self.url, json={"target": "t", "arguments": arguments})

    async def aclose(self) -> None:
        await self.http.aclose()


class ServerPublisher:
    """Broadcasts as an app server does: ``BroadcastData`` on a (Weak) server connection."""

    name = "server"

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WebSocketProtocol(Role.CLIENT, mask_key=lambda: os.urandom(4))
        self._sending = trio.Lock()  # the keep-alive and the publisher share the stream

    @classmethod
    async def open(cls, port: int, nursery: trio.Nursery) -> ServerPublisher:
        token = generate_access_token(KEY, f"http://127.0.0.1/server/?hub={HUB}",
                                      now=time.time(), user_id="bench-server")
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(
            (f"GET /server/?hub={HUB} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
             f"Upgrade: websocket\r\nConnection: Upgrade\r\nAuthorization: Bearer {token}\r\n"
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
             ).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(4096)
        assert head.startswith(b"HTTP/1.1 101"), head[:100]
        publisher = cls(stream)
        publisher.ws.send_binary(write_service_message(
            ServiceHandshakeRequest(connection_type=ConnectionType.WEAK)))
        await stream.send_all(publisher.ws.data_to_send())
        nursery.start_soon(publisher._drain)
        nursery.start_soon(publisher._keep_alive)
        return publisher

    async def _keep_alive(self) -> None:
        # An app server pings: the relay closes a server connection that is silent for its
        # server timeout (30 s), longer than the REST steps take before this one is used.
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            while True:
                await trio.sleep(5.0)
                await self._send(write_service_message(ServicePing()))

    async def _send(self, message: bytes) -> None:
        async with self._sending:
            self.ws.send_binary(message)
            await self.stream.send_all(self.ws.data_to_send())

    async def _drain(self) -> None:
        # The relay's pings (and the handshake answer) must be read, or its buffer fills.
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            while await self.stream.receive_some(65536):
                pass

    async def publish(self, arguments: list[object]) -> None:
        payload = JSON.write_invocation("t", arguments)
        await self._send(write_service_message(BroadcastDataMessage({"json": payload})))

    async def aclose(self) -> None:
        await self.stream.aclose()


JSON = JsonHubProtocol()


async def run_step(port: int, receivers: list[Receiver], publisher: RestPublisher |
                   ServerPublisher, rate: float, duration: float, payload: int,
                   relay_pid: int) -> dict[str, object]:
    count = max(1, int(rate * duration))
    expected = count * len(receivers)
    done = trio.Event()
    counter = [0]
    for r in receivers:
        r.latencies.clear()
    filler = "x" * payload
    relay_cpu0, gen_cpu0 = cpu_seconds(relay_pid), time.process_time()
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for r in receivers:
            nursery.start_soon(r.run, expected, done, counter)
        for i in range(count):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await trio.sleep(delay)
            await publisher.publish([time.perf_counter(), filler])
        with trio.move_on_after(max(5.0, duration)):
            await done.wait()
        elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    relay_cpu = cpu_seconds(relay_pid) - relay_cpu0
    gen_cpu = time.process_time() - gen_cpu0
    lat = sorted(x for r in receivers for x in r.latencies)
    delivered = counter[0]

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")

    return {
        "path": publisher.name,
        "offered_broadcasts_per_s": rate,
        "offered_deliveries_per_s": rate * len(receivers),
        "delivered_per_s": delivered / elapsed,
        "reach": delivered / expected,
        "p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": lat[-1] * 1000 if lat else None,
        "latency_samples": len(lat),
        "relay_cpu_s_per_1M_deliveries": relay_cpu / delivered * 1e6 if delivered else None,
        "relay_rss_bytes": rss_bytes(relay_pid),
        "generator_cpu_percent": 100 * gen_cpu / elapsed,
        "generator_bound": gen_cpu / elapsed > 0.8,
    }


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    proc, port = start_relay()
    try:
        token = generate_access_token(KEY, f"http://127.0.0.1/client/?hub={HUB}",
                                      now=time.time())
        receivers = []
        for i in range(args.clients):
            receivers.append(await open_client(port, token, i % SAMPLE_EVERY == 0))
        steps = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_alive, receivers)
            publishers = {"rest": RestPublisher(port),
                          "server": await ServerPublisher.open(port, nursery)}
            for via in args.via:
                for rate in args.rates:
                    step = await run_step(port, receivers, publishers[via], rate, args.duration,
                                          args.payload, proc.pid)
                    steps.append(step)
                    report(len(receivers), step)
            for publisher in publishers.values():
                await publisher.aclose()
            nursery.cancel_scope.cancel()
        for r in receivers:
            await r.stream.aclose()
        return {"clients": len(receivers), "payload_bytes": args.payload, "steps": steps}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def report(clients: int, step: dict[str, Any]) -> None:
    print(f"  {step['path']:>6}, {clients} clients, {step['offered_broadcasts_per_s']:>6g} "
          "broadcasts/s: "
                  f"{step['delivered_per_s']:>9.0f} deliveries/s, reach {step['reach']:.3f}, "
                  f"p50 {step['p50_ms']:.1f} ms, p99 {step['p99_ms']:.1f} ms, "
                  f"relay {step['relay_cpu_s_per_1M_deliveries'] or 0:.1f} CPU-s/1M, "
                  f"generator {step['generator_cpu_percent']:.0f}% CPU"
                  f"{' (GENERATOR-BOUND)' if step['generator_bound'] else ''}", flush=True)


def facts() -> dict[str, object]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=ROOT, check=False).stdout.strip()
    except OSError:
        commit = ""
    return {"commit": commit or "unknown", "relaycore": __version__,
            "python": platform.python_version(), "accelerated": ACCELERATED,
            "cores": os.cpu_count(), "date": datetime.date.today().isoformat()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rates", type=float, nargs="+", default=[50, 100, 200])
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--payload", type=int, default=32)
    parser.add_argument("--via", nargs="+", choices=["rest", "server"], default=["rest", "server"],
                        help="publish through the REST API, an app server's server connection, "
                             "or both (side by side)")
    parser.add_argument("--smoke", action="store_true", help="tiny counts, no result file")
    args = parser.parse_args()
    if args.smoke:
        args.clients, args.rates, args.duration = 20, [20], 0.5
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})
    info = facts()
    print(f"fan-out benchmark: commit {info['commit']}, Python {info['python']}, "
          f"accelerated={info['accelerated']}, {info['cores']} cores")
    result = {**info, "scenario": "REST broadcast fan-out", **trio.run(main_async, args)}
    if not args.smoke:
        out = ROOT / "results" / f"{info['date']}-{info['commit']}-fanout.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"written {out.relative_to(ROOT.parent)}")


if __name__ == "__main__":
    main()
