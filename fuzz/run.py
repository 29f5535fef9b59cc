"""Run every harness of this folder for a bounded time, one after the other, and report the
inputs each executed: ``make fuzz`` (``FUZZ_SECONDS`` per harness, default 60).

    python fuzz/run.py [--seconds 60] [--only websocket,service] [--json results.json]

Each harness runs as ``python fuzz/fuzz_<name>.py fuzz/corpus/<name> -max_total_time=S``
after ``seed_corpus.py`` has written the seeds; a failing input is written to
``fuzz/artifacts/<name>-crash-<sha1>`` (replay it with ``python fuzz/fuzz_<name>.py <file>``).
Exit status 1 when any harness found a failing input.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SKIP = {"fuzz_e2e"}  # against a running relay: its own script, not a libFuzzer harness


def harnesses() -> list[str]:
    return sorted(p.stem.removeprefix("fuzz_") for p in HERE.glob("fuzz_*.py")
                  if p.stem not in SKIP)


def run_one(name: str, seconds: int) -> dict[str, object]:
    corpus = HERE / "corpus" / name
    artifacts = HERE / "artifacts"
    artifacts.mkdir(exist_ok=True)
    log_path = artifacts / f"{name}.log"
    command = [sys.executable, str(HERE / f"fuzz_{name}.py"), str(corpus),
               f"-max_total_time={seconds}", "-timeout=20", "-rss_limit_mb=4096",
               f"-artifact_prefix={artifacts}/{name}-", "-print_final_stats=1"]
    started = time.monotonic()
    with log_path.open("wb") as log:
        status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                                cwd=HERE, check=False).returncode
    output = log_path.read_text(errors="replace")
    done = re.search(r"Done (\d+) runs in (\d+) second", output)
    stats = re.search(r"stat::number_of_executed_units:\s*(\d+)", output)
    runs = int(done[1]) if done else int(stats[1]) if stats else 0
    crash = re.search(r"(?:Test unit written to|input written to) (\S+)", output)
    return {
        "harness": name,
        "inputs": runs,
        "seconds": round(time.monotonic() - started, 1),
        "status": status,
        "crash_input": crash[1] if crash else None,
        "log": str(log_path.relative_to(HERE.parent)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int,
                        default=int(os.environ.get("FUZZ_SECONDS", "60")))
    parser.add_argument("--only", default="", help="comma-separated harness names")
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or harnesses()
    unknown = sorted(set(names) - set(harnesses()))
    if unknown:
        parser.error(f"no harness {', '.join(unknown)}; expected some of {', '.join(harnesses())}")
    subprocess.run([sys.executable, str(HERE / "seed_corpus.py")], check=True,
                   stdout=subprocess.DEVNULL)
    print(f"fuzz: {len(names)} harness(es), {args.seconds} s each, Python "
          f"{sys.version.split()[0]}, RELAYCORE_NO_EXTENSIONS="
          f"{os.environ.get('RELAYCORE_NO_EXTENSIONS', '')!r}", flush=True)
    results = []
    for name in names:
        result = run_one(name, args.seconds)
        results.append(result)
        # Status 2: the harness had nothing to do here (fuzz_fastpath without the extension).
        verdict = ("CRASH " + str(result["crash_input"]) if result["status"] not in (0, 2)
                   else "skipped (see its log)" if result["status"] == 2 else "ok")
        print(f"  {name:<18} {result['inputs']:>11,} inputs in {result['seconds']:>6} s  "
              f"{verdict}", flush=True)
    total = sum(int(r["inputs"]) for r in results)  # type: ignore[call-overload]
    failed = [r for r in results if r["status"] not in (0, 2)]
    print(f"fuzz: {total:,} inputs in total, {len(failed)} harness(es) with a failing input")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
