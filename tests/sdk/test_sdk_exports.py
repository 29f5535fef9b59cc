"""The SDK's public surface: ``__all__`` lists exactly what it re-exports, each documented."""

from __future__ import annotations

import types

import relaycore.sdk as sdk


def test_sdk_all_names_exist_are_unique_and_listed():
    assert len(sdk.__all__) == len(set(sdk.__all__))
    for name in sdk.__all__:
        assert hasattr(sdk, name), f"relaycore.sdk.__all__ lists missing {name!r}"
    public = {name for name, value in vars(sdk).items()
              if not name.startswith("_") and not isinstance(value, types.ModuleType)
              and name != "annotations"}
    assert public <= set(sdk.__all__), f"not in __all__: {public - set(sdk.__all__)}"


def test_sdk_exports_have_docstrings():
    # Classes and functions; type aliases (UserIdProvider) are documented where defined.
    # (Python 3.10 says a parameterised alias such as Callable[...] is an instance of type.)
    missing = [name for name in sdk.__all__
               if isinstance(getattr(sdk, name), (type, types.FunctionType))
               and not isinstance(getattr(sdk, name), types.GenericAlias)
               and not getattr(sdk, name).__doc__]
    assert not missing, f"exported without a docstring: {missing}"


def test_endpoint_names_are_exported():
    for name in ("EndpointRouter", "EndpointMetrics", "EndpointStatusEvent", "EndpointEvents",
                 "HubServiceEndpoint", "NegotiateRequest", "NegotiateError"):
        assert name in sdk.__all__
