"""System calls and CPU per echo of S1's SDK app server (bench/sdk_app_server.py), counted with
``strace -c`` on every thread of the app server process during a fixed number of echoes.

The relay (a snapshot of the committed HEAD, CPU 0) and the app server run as in
``bench/run.py``'s S1; this process is the generator (CPU 1). For each backend: connect the
clients, warm up, then

* counted steps: ``strace -c`` attached to the app server for ``--echoes`` echoes at each of
  ``--strace-rates`` (strace stops the process at every system call, so the rates are low);
  the system calls it made per echo delivered, by name. At a low rate each echo is a read and
  a write of its own (what a batch costs); at higher rates several share them;
* ``--repeat`` steps without strace at the same rate: the relay's and the app server's CPU
  per echo (CPU-µs), median and range.

    python bench/sdk_syscalls.py                         # the working tree's committed HEAD
    python bench/sdk_syscalls.py --sdk-commit 70ff9e6    # the SDK as of an earlier commit
    python bench/sdk_syscalls.py --smoke                 # seconds (no strace when missing)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import run  # noqa: E402
from loadgen.adapters import SignalRAdapter  # noqa: E402
from loadgen.core import Generator  # noqa: E402
from loadgen.wsclient import default_backend  # noqa: E402


def parse_strace_summary(text: str) -> dict[str, int]:
    """``strace -c``'s table as {system call: calls} (the ``total`` row left out)."""
    calls: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 5 or not parts[0].replace(".", "", 1).isdigit():
            continue
        name = parts[-1]
        if name != "total":
            calls[name] = calls.get(name, 0) + int(parts[3])
    return calls


class Strace:
    """``strace -c`` attached to every thread of ``pid`` until ``stop()``."""

    def __init__(self, pid: int) -> None:
        self.out = Path(tempfile.mkstemp(prefix="sdk-strace-", suffix=".txt")[1])
        tids = sorted(os.listdir(f"/proc/{pid}/task"), key=int)
        argv = ["strace", "-c", "-o", str(self.out)]
        for tid in tids:
            argv += ["-p", tid]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> dict[str, int]:
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=30)
        text = self.out.read_text()
        self.out.unlink()
        if not text.strip():
            raise RuntimeError(f"strace wrote nothing: {err.decode(errors='replace')}")
        return parse_strace_summary(text)


async def measure(args: argparse.Namespace, relay: Any, backend: str) -> dict[str, Any]:
    app = run.AppServer(relay.port, backend, args.app_connections)
    try:
        adapter = SignalRAdapter(hub="echo")
        gen = Generator(adapter, relay.port, backend=default_backend())
        conns = await gen.connect(args.clients)
        n = len(conns)

        def send(i: int, text: str) -> None:
            adapter.send_echo(conns[i % n], text)

        async def step(rate: float, duration: float) -> dict[str, Any]:
            return await gen.run_step(send, rate=rate, duration=duration, payload=32,
                                      recipients=1, target_pid=relay.pid, grace=5.0,
                                      companions={"app": app.pid})

        await step(args.rate, 1.0)  # warm-up: imports, first calls, caches
        result: dict[str, Any] = {"backend": backend, "clients": n}
        result["strace"] = []
        for rate in args.strace_rates if shutil.which("strace") and not args.no_strace else ():
            trace = Strace(app.pid)
            await asyncio.sleep(1.0)  # strace attaches
            counted = await step(rate, args.echoes / rate)
            await asyncio.sleep(0.2)
            calls = trace.stop()
            delivered = counted["delivered"]
            result["strace"].append({
                "rate": rate, "echoes": delivered, "reach": counted["reach"],
                "p99_ms": counted["p99_ms"], "calls": calls,
                "per_echo": sum(calls.values()) / max(delivered, 1),
                "per_echo_by_call": {k: v / max(delivered, 1) for k, v in
                                     sorted(calls.items(), key=lambda kv: -kv[1])}})
        steps = [await step(args.rate, args.duration) for _ in range(args.repeat)]
        result["cpu_steps"] = [
            {k: s.get(k) for k in ("offered_deliveries_per_s", "delivered_per_s", "reach",
                                   "p99_ms", "target_cpu_s_per_1M_deliveries",
                                   "app_cpu_s_per_1M_deliveries", "app_cpu_percent",
                                   "app_user_cpu_s", "app_system_cpu_s",
                                   "generator_cpu_percent", "foreign_cpu_percent")}
            for s in steps]
        await gen.close_all()
        return result
    finally:
        app.stop()


def report(result: dict[str, Any]) -> None:
    print(f"  {result['backend']}: {result['clients']} clients")
    for traced in result.get("strace", ()):
        top = ", ".join(f"{name} {per:.2f}" for name, per in
                        list(traced["per_echo_by_call"].items())[:8])
        print(f"    system calls per echo at {traced['rate']:,.0f}/s under strace: "
              f"{traced['per_echo']:.2f} over {traced['echoes']} echoes (reach "
              f"{traced['reach']:.3f}): {top}")
    steps = result["cpu_steps"]
    for label, key in (("relay", "target_cpu_s_per_1M_deliveries"),
                       ("app server", "app_cpu_s_per_1M_deliveries")):
        values = [s[key] for s in steps if s.get(key) is not None]
        if values:
            print(f"    {label} CPU-µs per echo at {steps[0]['offered_deliveries_per_s']:,.0f}/s:"
                  f" {statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f}, "
                  f"{len(values)} steps)")
    p99 = [s["p99_ms"] for s in steps if s.get("p99_ms") is not None]
    if p99:
        print(f"    p99 {statistics.median(p99):.1f} ms, reach "
              f"{min(s['reach'] for s in steps):.4f}, other processes up to "
              f"{max(s['foreign_cpu_percent'] for s in steps):.0f}% of a core")


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    relay = run.Running(run.TARGETS["relaycore"])
    results = []
    try:
        for backend in args.backends:
            why = run.sdk_backend_missing(backend)
            if why:
                print(f"  skipped {backend}: {why}")
                continue
            result = await measure(args, relay, backend)
            report(result)
            results.append(result)
    finally:
        relay.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["uvloop", "trio"],
                        choices=["asyncio", "uvloop", "trio"])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--echoes", type=int, default=5000, help="echoes counted under strace")
    parser.add_argument("--strace-rates", type=float, nargs="+", default=[500.0, 2000.0],
                        help="echoes/s while strace counts (one counted step each)")
    parser.add_argument("--rate", type=float, default=2000.0, help="echoes/s of the CPU steps")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per CPU step")
    parser.add_argument("--repeat", type=int, default=3, help="CPU steps per backend")
    parser.add_argument("--app-connections", type=int, default=5)
    parser.add_argument("--sdk-commit", metavar="REV",
                        help="the SDK app server as of this commit (the relay: HEAD)")
    parser.add_argument("--no-strace", action="store_true")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--smoke", action="store_true", help="tiny counts, seconds")
    args = parser.parse_args()
    if args.smoke:
        args.clients, args.echoes, args.strace_rates = 10, 100, [200.0]
        args.rate, args.duration, args.repeat = 200.0, 0.3, 1
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})
    run.snapshot_relay()
    if args.sdk_commit:
        run._SDK_SNAPSHOT = run.snapshot_src(args.sdk_commit)
    print(f"S1 SDK app server: system calls and CPU per echo; SDK at "
          f"{args.sdk_commit or 'HEAD'}, relay at HEAD; app server on CPU {run.app_core()}, "
          f"relay CPU 0, generator CPU 1; {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    runner = run._uvloop()
    results = runner(main_async(args)) if runner else asyncio.run(main_async(args))
    if args.out:
        Path(args.out).write_text(json.dumps({"sdk_commit": args.sdk_commit, "args": vars(args),
                                              "results": results}, indent=1))


if __name__ == "__main__":
    main()
