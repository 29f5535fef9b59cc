"""What ships: the relay image's build context (``.dockerignore``), the project metadata, and
the wheel, which is tagged for one CPython ABI only when it holds the compiled extension."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = [REPO / "deploy" / "Dockerfile", REPO / "deploy" / "two-region" / "app.Dockerfile"]


# -- .dockerignore ---------------------------------------------------------------------------
#
# Docker's rules, as its documentation gives them: each line is a pattern relative to the
# context root (Go's filepath.Match: ``*`` and ``?`` stop at ``/``), ``**`` matches any number
# of directories including none, a pattern that matches a directory excludes what is under it,
# ``!`` re-includes, and the last pattern that matches a path decides.

def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out.append(pattern[i:end + 1])
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def dockerignore(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((negate, _pattern_regex(pattern)))
    return rules


def excluded(rules: list[tuple[bool, re.Pattern[str]]], path: str) -> bool:
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]  # parents, then path
    verdict = False
    for negate, regex in rules:
        if any(regex.fullmatch(candidate) for candidate in candidates):
            verdict = not negate
    return verdict


def test_the_dockerignore_reading_follows_dockers_rules():
    rules = dockerignore("*.so\n**/*.pyc\nbuild\ndocs/*\n!docs/keep.md\n")
    assert excluded(rules, "a.so") and not excluded(rules, "src/a.so")  # * stays at the root
    assert excluded(rules, "x.pyc") and excluded(rules, "src/pkg/x.pyc")
    assert excluded(rules, "build/lib/x.py") and not excluded(rules, "src/build/x.py")
    assert excluded(rules, "docs/a.md") and not excluded(rules, "docs/keep.md")


def copied_sources(dockerfile: Path) -> list[str]:
    """The context paths a Dockerfile's COPY lines take (not those from another stage)."""
    sources = []
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from=") for w in words):
            sources += [w for w in words[1:-1] if not w.startswith("--")]
    return sources


def test_dockerignore_keeps_the_virtualenv_host_builds_and_caches_out_of_the_context():
    rules = dockerignore((REPO / ".dockerignore").read_text())
    for path in (".venv/bin/python", "bench/.venv-peers/bin/python",
                 "src/relaycore/_fastpath.cpython-311-x86_64-linux-gnu.so",
                 "src/relaycore/_fastpath.c", "src/relaycore/__pycache__/_accel.cpython-311.pyc",
                 ".git/HEAD", "build/lib/relaycore/__init__.py", "dist/relaycore.whl",
                 "src/relaycore.egg-info/PKG-INFO", "tests/e2e/node/node_modules/ws/index.js",
                 "examples/two-pods/node_modules/x.js", ".pytest_cache/v/cache",
                 ".hypothesis/examples/x", ".mypy_cache/3.11/x.json", ".ruff_cache/x",
                 "bench/results/run.json"):
        assert excluded(rules, path), f".dockerignore lets {path} into the build context"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerignore_keeps_every_path_a_dockerfile_copies(dockerfile):
    # The root .dockerignore is the one every builder reads for a root context (BuildKit
    # prefers app.Dockerfile.dockerignore for the app image; the classic builder does not).
    rules = dockerignore((REPO / ".dockerignore").read_text())
    sources = copied_sources(dockerfile)
    assert sources
    for source in sources:
        assert (REPO / source).exists(), f"{dockerfile.name} copies {source}, which is missing"
        assert not excluded(rules, source), f".dockerignore drops {source}"
        if (REPO / source).is_dir():
            shipped = [p for p in (REPO / source).rglob("*")
                       if p.is_file() and "__pycache__" not in p.parts
                       and p.suffix in (".py", ".pyx", ".pyi", ".typed", ".json", ".md")]
            assert shipped
            for path in shipped:
                relative = path.relative_to(REPO).as_posix()
                assert not excluded(rules, relative), f".dockerignore drops {relative}"


# -- metadata --------------------------------------------------------------------------------

def test_license_is_an_spdx_expression_with_a_backend_that_reads_it():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"  # a table is deprecated by setuptools 77
    floor = next(r for r in project["build-system"]["requires"] if r.startswith("setuptools"))
    assert tuple(int(n) for n in re.search(r">=([\d.]+)", floor).group(1).split(".")) >= (77,)


# -- the wheel -------------------------------------------------------------------------------

def build_wheel(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """``pip wheel`` of a copy of the project, offline (the backend of the test environment:
    the ``dev`` extra holds setuptools>=77 and Cython). The copy keeps the host's compiled
    extension beside the sources, as a developer's checkout has it."""
    source = tmp_path / "project"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "src", source / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path / "wheels"
    environ = {k: v for k, v in os.environ.items() if k not in ("CC", "RELAYCORE_BUILD_EXTENSION")}
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
         "--no-cache-dir", "--disable-pip-version-check", "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=300, env={**environ, **env})
    return result, out


@pytest.mark.parametrize(
    "env",
    [{"RELAYCORE_BUILD_EXTENSION": "no"}, {"CC": "false"}],
    ids=["build-disabled", "no-compiler"],
)
def test_wheel_without_the_extension_is_pure_python(tmp_path, env):
    result, out = build_wheel(tmp_path, **env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "SetuptoolsDeprecationWarning" not in result.stdout + result.stderr
    (wheel,) = out.glob("*.whl")
    assert wheel.name == "relaycore-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read("relaycore-0.1.0.dist-info/WHEEL").decode()
    assert "Root-Is-Purelib: true" in metadata
    assert "relaycore/_fastpath_py.py" in names
    assert not [n for n in names if n.endswith((".so", ".pyd", ".c"))], names


def test_required_extension_that_cannot_compile_fails_the_build(tmp_path):
    result, out = build_wheel(tmp_path, CC="false", RELAYCORE_BUILD_EXTENSION="yes")
    assert result.returncode != 0
    assert not list(out.glob("*.whl"))
