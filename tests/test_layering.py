"""The arrows of DESIGN.md, checked on the source: sans-I/O stays sans-I/O, drivers stay apart.

* ``protocol/`` and the fast path never import an I/O, clock, randomness or concurrency
  module; ``protocol/`` uses nothing of relaycore but itself and ``_accel``.
* ``sdk/`` and ``client/`` never import ``relay/``, and ``relay/`` never imports them.
* Inside ``relay/`` every module has a floor (``RELAY_FLOORS``) and imports only modules on
  lower floors: arrows point down, never sideways or up (an import under ``TYPE_CHECKING``
  is an arrow too). A new module of ``relay/`` fails the test until it is given a floor.

Imports are read from the AST (relative imports resolved), so a string that merely mentions a
module does not count. A directory that does not exist yet has no files to check.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "relaycore"

#: Modules whose presence would mean I/O, a clock, randomness or threads in the sans-I/O core.
#: ``os`` is forbidden outright: ``os.urandom`` is randomness and the rest is I/O.
FORBIDDEN_IN_SANS_IO = frozenset(
    {
        "trio",
        "anyio",
        "socket",
        "select",
        "selectors",
        "time",
        "random",
        "secrets",
        "asyncio",
        "threading",
        "os",
        "subprocess",
        "ssl",
    }
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module ``source`` imports, absolute; ``from a import b`` yields ``a`` and ``a.b``
    (``b`` may be a submodule)."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + (node.module.split(".") if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def imports_of(path: Path) -> set[str]:
    return imported_modules(
        path.read_text(encoding="utf-8"), module_name(path), path.name == "__init__.py"
    )


def is_under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def python_files(*relative: str) -> list[Path]:
    files: list[Path] = []
    for rel in relative:
        path = PACKAGE / rel
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(sorted(path.rglob("*.py")))
    return files


# The checker itself --------------------------------------------------------------------------


def test_imported_modules_resolves_absolute_relative_and_from_imports():
    source = "\n".join(
        [
            "import trio",
            "import os.path as p",
            "from os import urandom",
            "from ..relay import _hub",
            "from . import _errors",
            "from .._accel import apply_mask",
            "def f():\n    import time",
            "x = 'import socket'",
        ]
    )
    found = imported_modules(source, "relaycore.sdk._hub")
    assert {
        "trio",
        "os.path",
        "os",
        "os.urandom",
        "relaycore.relay",
        "relaycore.relay._hub",
        "relaycore.sdk._errors",
        "relaycore._accel",
        "time",
    } <= found
    assert "socket" not in found


def test_imported_modules_resolves_relative_imports_of_a_package_init():
    found = imported_modules(
        "from ._errors import X\nfrom .. import _accel", "relaycore.protocol", is_package=True
    )
    assert {"relaycore.protocol._errors", "relaycore._accel"} <= found


def test_layering_sees_the_modules_it_guards():
    # Guards against a wrong SRC path making every check vacuous.
    names = {module_name(p) for p in python_files("protocol", "_fastpath_py.py")}
    assert {"relaycore.protocol", "relaycore._fastpath_py"} <= names


# The rules -----------------------------------------------------------------------------------


def forbidden_sans_io_imports(path: Path) -> list[str]:
    return sorted(name for name in imports_of(path) if name.split(".")[0] in FORBIDDEN_IN_SANS_IO)


@pytest.mark.parametrize("rel", ["protocol", "_fastpath_py.py"])
def test_sans_io_modules_import_no_io_clock_randomness_or_threads(rel):
    violations = {
        str(path.relative_to(SRC)): bad
        for path in python_files(rel)
        if (bad := forbidden_sans_io_imports(path))
    }
    assert violations == {}


def test_fastpath_extension_source_imports_no_io_clock_randomness_or_threads():
    statement = re.compile(r"^\s*(?:from\s+([\w.]+)\s+c?import|c?import\s+([\w., ]+))", re.M)
    violations = {}
    for path in sorted(PACKAGE.glob("_fastpath*.p[yx][xd]")):
        names = set()
        for match in statement.finditer(path.read_text(encoding="utf-8")):
            if match.group(1):
                names.add(match.group(1))
            else:
                names.update(n.split(" as ")[0].strip() for n in match.group(2).split(","))
        bad = sorted(n for n in names if n.split(".")[0] in FORBIDDEN_IN_SANS_IO)
        if bad:
            violations[path.name] = bad
    assert violations == {}


def test_protocol_uses_nothing_of_relaycore_but_itself_and_accel():
    violations = {}
    for path in python_files("protocol"):
        bad = sorted(
            name
            for name in imports_of(path)
            if is_under(name, "relaycore")
            and not is_under(name, "relaycore.protocol")
            and not is_under(name, "relaycore._accel")
            and name != "relaycore"  # "from relaycore import _accel" yields "relaycore" too
        )
        if bad:
            violations[str(path.relative_to(SRC))] = bad
    assert violations == {}


def test_fastpath_twin_uses_nothing_of_relaycore():
    path = PACKAGE / "_fastpath_py.py"
    assert not {name for name in imports_of(path) if is_under(name, "relaycore")}


@pytest.mark.parametrize(
    ("importer", "forbidden"),
    [
        ("sdk", ("relaycore.relay",)),
        ("client", ("relaycore.relay",)),
        ("relay", ("relaycore.sdk", "relaycore.client")),
    ],
)
def test_drivers_never_import_each_other(importer, forbidden):
    violations = {}
    for path in python_files(importer):
        bad = sorted(name for name in imports_of(path) if any(is_under(name, f) for f in forbidden))
        if bad:
            violations[str(path.relative_to(SRC))] = bad
    assert violations == {}


# The floors of relay/ -------------------------------------------------------------------------

#: Each module of ``relay/`` and its floor (``relay/__init__.py`` is the package's face, on
#: top). A module may import only modules on lower floors.
RELAY_FLOORS: dict[str, int] = {
    # the counters, settings, table, HTTP/1.1, accept loop and the backplane's seam
    "_config": 1, "_stats": 1, "_table": 1, "_http": 1, "_accept": 1, "_backplane": 1,
    # the Redis client of the backplane
    "_resp": 1,
    # WebSocket I/O over raw file descriptors; tokens; the upstream webhooks
    "_peer": 2, "_tokens": 2, "_upstream": 2,
    # the Redis backplane
    "_redis": 2,
    # negotiated connection tokens that every node accepts
    "_negotiated": 2,
    # worker processes sharing one port (their listeners, and the supervisor of --workers)
    "_workers": 2,
    # the fan-out's messages; the transports of a session (WebSocket, Server-Sent Events,
    # long polling)
    "_message": 3, "_transport": 3, "_sse": 3, "_longpolling": 3,
    # every operation, once
    "_operations": 4,
    # the faces: client sessions, app-server connections, the REST API
    "_session": 5, "_server": 5, "_rest": 5,
    # the HTTP front: accepting, routing, negotiate, upgrade
    "_front": 6,
    # the composition root
    "_relay": 7,
    "": 8,
}


def relay_module(short: str) -> str:
    return f"relaycore.relay.{short}" if short else "relaycore.relay"


def imported_targets(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``source`` imports. ``from a import b`` names ``a.b`` when
    that is a module of ``known`` (``from . import _peer``), else ``a``."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - (node.level - 1)]
                                + (node.module.split(".") if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return found & known


def floor_violations(source: str, short: str) -> list[str]:
    """The imports of relay module ``short`` (its ``source``) on its own floor or above."""
    floors = {relay_module(name): floor for name, floor in RELAY_FLOORS.items()}
    module = relay_module(short)
    targets = imported_targets(source, module, short == "", set(floors))
    return sorted(name for name in targets
                  if name != module and floors[name] >= RELAY_FLOORS[short])


def test_imported_targets_names_submodules_and_counts_type_checking_imports():
    known = {relay_module(name) for name in RELAY_FLOORS}
    source = "\n".join([
        "from typing import TYPE_CHECKING",
        "from . import _peer",
        "from ._table import ConnectionTable",
        "import relaycore.relay._http",
        "if TYPE_CHECKING:",
        "    from ._session import ClientSession",
        "x = 'from ._relay import Relay'",
    ])
    assert imported_targets(source, "relaycore.relay._operations", False, known) == {
        "relaycore.relay._peer", "relaycore.relay._table", "relaycore.relay._http",
        "relaycore.relay._session"}
    assert imported_targets("from . import Relay", "relaycore.relay._peer", False, known) == {
        "relaycore.relay"}


def test_floor_violations_sees_arrows_sideways_and_up():
    assert floor_violations("from ._stats import RelayStats", "_peer") == []
    assert floor_violations("from ._tokens import RequestAuth", "_peer") == [
        "relaycore.relay._tokens"]
    assert floor_violations(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        "    from ._front import HttpFront\n", "_operations") == ["relaycore.relay._front"]
    assert floor_violations("from relaycore.relay import Relay", "_session") == [
        "relaycore.relay"]


def test_every_module_of_relay_has_a_floor():
    modules = {module_name(path) for path in python_files("relay")}
    placed = {relay_module(name) for name in RELAY_FLOORS}
    assert sorted(modules - placed) == [], "give each new module of relay/ its RELAY_FLOORS entry"
    assert sorted(placed - modules) == [], "RELAY_FLOORS names a module relay/ no longer has"


def test_relay_modules_import_only_modules_on_lower_floors():
    violations = {}
    for path in python_files("relay"):
        short = "" if path.name == "__init__.py" else path.stem
        if short not in RELAY_FLOORS:
            continue  # test_every_module_of_relay_has_a_floor names it
        bad = floor_violations(path.read_text(encoding="utf-8"), short)
        if bad:
            violations[str(path.relative_to(SRC))] = bad
    assert violations == {}
