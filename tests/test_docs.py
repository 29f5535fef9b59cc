"""The documents name only what exists: ``make`` targets of the Makefile, flags of ``python -m
relaycore serve | token | fault``, ``RELAYCORE_*`` variables the relay reads, files of the
repository, the Python version ``pyproject.toml`` claims, and every setting of ``RelayConfig``
in the example file of docs/configuration.md.

Names are taken from code only (fenced blocks and inline code spans), and flags only where a
relaycore command is named in the same span or command line, so that prose ("make the ...")
and other programs' flags (pytest's ``-m``, kubectl's ``--replicas``) are not mistaken for
ours. A flag spelled alone in a span (``--capacity``) is one of relaycore's in README.md and
docs/, and one of relaycore's or the example's own in an example's README.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from relaycore.__main__ import build_parser
from relaycore.relay import RelayConfig
from relaycore.relay._config import _from_env

REPO = Path(__file__).resolve().parents[1]

DOCS = sorted({
    REPO / "README.md",
    *REPO.glob("docs/*.md"),
    *REPO.glob("examples/*/README.md"),
    *REPO.glob("deploy/**/README.md"),
    REPO / "tests/e2e/README.md",
    REPO / "bench/README.md",
})

_FENCE = re.compile(r"^ {0,3}```.*?^ {0,3}```[ \t]*$", re.M | re.S)
_SPAN = re.compile(r"`([^`\n]+(?:\n[^`\n]+)*)`")
_RELAYCORE = re.compile(r"\brelaycore\s+(serve|token|fault)\b")
_FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
#: Where a shell command ends: a pipe, a list, a comment, the end of a subshell.
_COMMAND_END = re.compile(r"\s(?:\||;|&&|\|\||#)\s|\)")
_ENV = re.compile(r"\bRELAYCORE_[A-Z0-9_]*[A-Z0-9]\b")


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def code_contexts(text: str) -> Iterator[tuple[str, str]]:
    """(kind, code): ``"line"`` for each command line of a fenced block (``\\``-continued
    lines joined), ``"span"`` for each inline code span of the prose (line breaks as spaces)."""
    for block in _FENCE.finditer(text):
        body = block.group(0).split("\n")[1:-1]
        yield from (("line", line) for line in "\n".join(body).replace("\\\n", " ").split("\n"))
    prose = _FENCE.sub("", text)
    for span in _SPAN.finditer(prose):
        yield "span", " ".join(span.group(1).split())


def makefile_targets() -> set[str]:
    targets: set[str] = set()
    for line in (REPO / "Makefile").read_text(encoding="utf-8").splitlines():
        match = re.match(r"([A-Za-z0-9_-][A-Za-z0-9_ \t-]*?)[ \t]*::?(?!=)", line)
        if match:
            targets.update(match.group(1).split())
    return targets


def named_make_targets(code: str) -> list[str]:
    """Targets of ``make`` commands at a command position of ``code``."""
    names: list[str] = []
    for match in re.finditer(r"(?:^|&&|;|\|\||\$ )\s*make((?:\s+[^\s#;&|]+)*)", code):
        names += [word for word in match.group(1).split()
                  if not word.startswith("-") and "=" not in word]
    return names


def cli_flags() -> dict[str, set[str]]:
    """Option strings of each subcommand of ``python -m relaycore``."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: {option for action in sub._actions for option in action.option_strings}
            for name, sub in commands.choices.items()}


def example_flags(doc: Path) -> set[str]:
    """Flags of the example's own program (``add_argument("--...")`` in its app.py)."""
    app = doc.parent / "app.py"
    if doc.parent.parent != REPO / "examples" or not app.is_file():
        return set()
    return set(re.findall(r"add_argument\(\s*\"(--[a-z][a-z0-9-]*)\"", app.read_text()))


def variables_read() -> set[str]:
    """The relay's settings as environment variables, ``RELAYCORE_<FIELD>``."""
    return {f"RELAYCORE_{f.name.upper()}" for f in dataclasses.fields(RelayConfig)}


def read_elsewhere(name: str) -> bool:
    """``name`` is taken by the relay's environment parser as an alias (``RELAYCORE_ACCESS_KEY``
    for ``access_keys``), or passed over by it and read by other code: the extension switches
    (``_accel.py``, ``setup.py``, the tests)."""
    try:
        if _from_env({name: "x"}):
            return True
    except ValueError:
        return False
    readers = [*REPO.glob("src/relaycore/**/*.py"), REPO / "setup.py", *REPO.glob("tests/**/*.py")]
    return any(name in path.read_text(encoding="utf-8") for path in readers
               if path.name != "_config.py" and path != Path(__file__).resolve())


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_every_make_target_named_exists(doc: Path) -> None:
    targets = makefile_targets()
    missing = sorted({name for _, code in code_contexts(doc.read_text(encoding="utf-8"))
                      for name in named_make_targets(code) if name not in targets})
    assert not missing, f"{rel(doc)} names make targets the Makefile lacks: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_every_relaycore_flag_named_exists(doc: Path) -> None:
    flags = cli_flags()
    everyone = set().union(*flags.values())
    standalone_ok: set[str] | None = None  # None: spans of flags alone are not ours to check
    if doc == REPO / "README.md" or doc.parent == REPO / "docs":
        standalone_ok = everyone
    elif doc.parent.parent == REPO / "examples":
        standalone_ok = everyone | example_flags(doc)
    wrong: list[str] = []
    for kind, code in code_contexts(doc.read_text(encoding="utf-8")):
        command = _RELAYCORE.search(code)
        if command:
            rest = code[command.end():]
            end = _COMMAND_END.search(rest)
            named = _FLAG.findall(rest[:end.start()] if end else rest)
            wrong += [f"relaycore {command.group(1)} {flag}" for flag in named
                      if flag not in flags[command.group(1)]]
        elif kind == "span" and code.startswith("--") and standalone_ok is not None:
            flag = _FLAG.match(code)
            if flag and flag.group(1) not in standalone_ok:
                wrong.append(flag.group(1))
    assert not wrong, f"{rel(doc)} names flags relaycore does not have: {wrong}"


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_every_relaycore_variable_named_is_read(doc: Path) -> None:
    known = variables_read()
    named = set(_ENV.findall(doc.read_text(encoding="utf-8")))
    unread = sorted(name for name in named if name not in known and not read_elsewhere(name))
    assert not unread, f"{rel(doc)} names variables nothing reads: {unread}"


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_every_repository_path_named_exists(doc: Path) -> None:
    """A span that looks like a relative path (``tests/e2e/README.md``, ``examples/two-pods/``)
    and starts at a folder of the repository (or of the document) names something there."""
    missing = []
    for kind, code in code_contexts(doc.read_text(encoding="utf-8")):
        if kind != "span" or not re.fullmatch(r"[\w.-]+(/[\w.*-]+)+/?", code):
            continue
        first = code.split("/")[0]
        for base in (REPO, doc.parent):
            if (base / first).exists():
                if not list(base.glob(code.rstrip("/"))):
                    missing.append(code)
                break
    assert not missing, f"{rel(doc)} names paths that do not exist: {missing}"


def test_readme_claims_the_python_version_of_pyproject() -> None:
    claimed = re.search(r'requires-python\s*=\s*">=\s*(3\.\d+)"',
                        (REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert claimed is not None, "pyproject.toml has no requires-python = \">=3.N\""
    said = re.findall(r"Python (3\.\d+)(?:\+| or later)", (REPO / "README.md").read_text())
    assert said and set(said) == {claimed.group(1)}, (
        f"README.md says Python {said}, pyproject.toml requires >= {claimed.group(1)}")


def test_configuration_example_names_every_setting_with_its_default(tmp_path: Path) -> None:
    """docs/configuration.md's TOML file loads, names every ``RelayConfig`` field, and gives
    each its default value, except the settings it shows an example of."""
    text = (REPO / "docs/configuration.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```toml\n(.*?)^```", text, re.M | re.S)
    assert len(blocks) == 1, "docs/configuration.md should have one TOML example"
    example = tmp_path / "relay.toml"
    example.write_text(blocks[0])
    loaded = RelayConfig.load(toml_path=str(example), env={})
    written = set(re.findall(r"^([a-z_]+)\s*=", blocks[0], re.M))
    written |= {"access_keys"} if "access_keys" in written or "access_key" in written else set()
    written |= {"upstreams"} if "[[relay.upstream]]" in blocks[0] else set()
    fields = {f.name for f in dataclasses.fields(RelayConfig)}
    assert not fields - written, f"settings missing from the example: {sorted(fields - written)}"
    examples = {"host", "port", "access_keys", "public_endpoint", "upstreams", "admin_key",
                "redis"}
    default = RelayConfig()
    differ = {name: (getattr(loaded, name), getattr(default, name)) for name in fields - examples
              if getattr(loaded, name) != getattr(default, name)}
    assert not differ, f"(documented, default) values that differ: {differ}"
