"""The public surface: each package's ``__all__`` lists exactly what it re-exports."""

from __future__ import annotations

import importlib
import types

import pytest

PACKAGES = ["relaycore", "relaycore.protocol", "relaycore.relay", "relaycore.client"]


@pytest.mark.parametrize("name", PACKAGES)
def test_package_all_names_exist_and_are_unique(name):
    module = importlib.import_module(name)
    assert len(module.__all__) == len(set(module.__all__))
    for public in module.__all__:
        assert hasattr(module, public), f"{name}.__all__ lists missing {public!r}"


@pytest.mark.parametrize("name", PACKAGES)
def test_package_public_names_are_all_listed(name):
    module = importlib.import_module(name)
    public = {
        attr for attr, value in vars(module).items()
        if not attr.startswith("_") and not isinstance(value, types.ModuleType)
        and attr != "annotations"
    }
    assert public <= set(module.__all__), f"not in {name}.__all__: {public - set(module.__all__)}"


@pytest.mark.parametrize("name", ["relaycore.protocol", "relaycore.relay", "relaycore.client"])
def test_exported_classes_and_functions_have_docstrings(name):
    module = importlib.import_module(name)
    # Classes and functions: a type alias (``RetryPolicy = Callable[...]``) is documented by
    # the comment beside it (on Python 3.10 isinstance says a subscripted generic is a type).
    missing = [p for p in module.__all__
               if isinstance(getattr(module, p), (type, types.FunctionType))
               and not isinstance(getattr(module, p), types.GenericAlias)
               and not getattr(module, p).__doc__]
    assert not missing, f"exported without a docstring: {missing}"
