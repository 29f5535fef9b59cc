"""What every benchmark run states about itself, and the fast path's py/c ratios.

The header names the commit, the Python, whether ``relaycore._accel`` is ACCELERATED and the
cores this process may use; the same facts go into ``--benchmark-json`` output's machine_info.
After pytest-benchmark's tables, groups holding both a ``py`` and a ``c`` run get one line each:
the ratio of the medians (how many times faster the extension is).
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

import relaycore._accel

_RATIOS = pytest.StashKey[list[tuple[str, float, float]]]()


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def _facts() -> dict[str, Any]:
    return {
        "commit": _commit(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "accelerated": relaycore._accel.ACCELERATED,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_count": os.cpu_count(),
    }


def pytest_report_header(config: pytest.Config) -> str:
    facts = _facts()
    return (
        f"relaycore bench: commit {facts['commit']}, {facts['python']}, "
        f"ACCELERATED={facts['accelerated']}, cores {facts['cores']} of {facts['cpu_count']}"
    )


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine_info["relaycore"] = _facts()


@pytest.hookimpl(wrapper=True)
def pytest_benchmark_group_stats(
    config: pytest.Config, benchmarks: list[Any], group_by: str
) -> Generator[None, Any, Any]:
    groups = yield
    ratios = []
    for group, members in groups:
        medians = {bench["params"].get("impl"): bench["median"] for bench in members}
        if medians.get("py") and medians.get("c"):
            ratios.append((str(group), medians["py"], medians["c"]))
    config.stash[_RATIOS] = ratios
    return groups


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    ratios = config.stash.get(_RATIOS, [])
    if not ratios:
        return
    terminalreporter.section("fast path: py / c (ratio of medians)")
    width = max(len(group) for group, _, _ in ratios)
    terminalreporter.write_line(f"{'case':<{width}}  {'py':>10}  {'c':>10}  {'py/c':>8}")
    for group, py, c in ratios:
        terminalreporter.write_line(
            f"{group:<{width}}  {py * 1e9:>8.0f}ns  {c * 1e9:>8.0f}ns  {py / c:>7.1f}x"
        )
