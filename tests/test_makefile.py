"""The Makefile's entry points that a newcomer meets first: `make test` names what is missing."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAKE = shutil.which("make")

pytestmark = pytest.mark.skipif(MAKE is None, reason="make is not installed")


def prereqs(tmp_path: Path, tools: list[str]) -> subprocess.CompletedProcess[str]:
    """`make prereqs` with a PATH that holds only stand-ins for ``tools``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in tools:
        stand_in = bin_dir / tool
        stand_in.write_text("#!/bin/sh\nexit 0\n")
        stand_in.chmod(0o755)
    assert MAKE is not None
    return subprocess.run([MAKE, "-s", "-C", str(ROOT), "prereqs"], env={"PATH": str(bin_dir)},
                          capture_output=True, text=True, timeout=30)


def test_make_prereqs_without_chromium_names_its_package_and_fails(tmp_path: Path) -> None:
    result = prereqs(tmp_path, ["node", "npm", "gcc"])
    assert result.returncode != 0
    assert "make test needs: chromium (Debian: apt-get install chromium;" in result.stderr


def test_make_prereqs_names_every_missing_tool(tmp_path: Path) -> None:
    result = prereqs(tmp_path, [])
    assert result.returncode != 0
    assert "make test needs: nodejs npm gcc chromium" in result.stderr


def test_make_prereqs_with_every_tool_passes_quietly(tmp_path: Path) -> None:
    result = prereqs(tmp_path, ["node", "npm", "gcc", "chromium"])
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_make_test_checks_prereqs_first() -> None:
    rule = next(line for line in (ROOT / "Makefile").read_text().splitlines()
                if line.startswith("test:"))
    assert rule.split(":", 1)[1].split()[0] == "prereqs"
