"""The SDK's modules stand in layers: none imports, even for type checking only, a module that
imports it back (a lower one declares a protocol of what it needs from above instead)."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import relaycore.sdk
from relaycore.sdk._connection import Channel, ServiceConnection
from relaycore.sdk._restclient import RestChannel

SDK = Path(relaycore.sdk.__file__).parent


def sdk_imports(path: Path) -> set[str]:
    """The SDK modules ``path`` imports (relative imports of the package, by module name)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module)
            else:
                found.update(alias.name for alias in node.names)
    return found


def test_the_sdk_modules_import_each_other_without_a_circle():
    graph = {
        path.stem: sdk_imports(path) for path in SDK.glob("*.py") if path.stem != "__init__"
    }
    assert {"_connection", "_dispatcher", "_server"} <= graph.keys()  # the right folder
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as exc:
        raise AssertionError(f"an import circle in relaycore.sdk: {exc.args[1]}") from None
    # Server connections stand below the clients they carry and the hub that dispatches.
    assert order.index("_connection") < order.index("_client") < order.index("_dispatcher")


def test_server_connections_and_rest_channels_declare_the_channel_they_are():
    assert Channel in ServiceConnection.__mro__
    assert Channel in RestChannel.__mro__
