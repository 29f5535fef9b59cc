"""The end-to-end fuzzer (``fuzz/fuzz_e2e.py``) in a short run: mutated requests and frames
against a real ``python -m relaycore serve`` while a healthy client counts a numbered stream.

The relay must not end, the healthy client's stream must arrive whole and in order, and the
relay must log no traceback (the first run of this fuzzer found one: the 400 answer to
``HEAD //[ HTTP/1.1`` had a body h11 refused). ``make fuzz`` and ``fuzz/README.md`` cover the
long runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def test_fuzz_e2e_short_run_keeps_the_relay_up_and_the_healthy_stream_whole(
    tmp_path: Path,
) -> None:
    report_path = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "fuzz" / "fuzz_e2e.py"), "--seconds", "8",
         "--concurrency", "3", "--seed", "15", "--json", str(report_path),
         "--artifacts", str(tmp_path / "artifacts")],
        capture_output=True, text=True, timeout=120, check=False)
    assert report_path.exists(), result.stdout + result.stderr
    report = json.loads(report_path.read_text())
    assert report["inputs"] > 100, report
    assert set(report["inputs_by_kind"]) == {"http", "client-json", "client-messagepack",
                                             "server"}, report
    assert report["relay_crashes"] == 0, report
    assert report["relay_exit_status"] == 0, report
    assert report["stream_sent"] > 10, report
    assert report["stream_complete_in_order"], report
    assert report["tracebacks"] == 0, (
        f"tracebacks in the relay's log {report['relay_log']}: {report['traceback_endings']}")
