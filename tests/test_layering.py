"""The arrows of DESIGN.md, checked on the source: sans-I/O stays sans-I/O, drivers stay apart.

* ``protocol/`` and the fast path never import an I/O, clock, randomness or concurrency
  module; ``protocol/`` uses nothing of relaycore but itself and ``_accel``.
* ``sdk/`` and ``client/`` never import ``relay/``, and ``relay/`` never imports them.

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
