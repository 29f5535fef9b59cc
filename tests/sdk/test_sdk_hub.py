"""Hub method discovery and matching, and the SDK's public surface."""

from __future__ import annotations

import importlib
import inspect
import types

import pytest

import relaycore.sdk as sdk
from relaycore.sdk import Hub, HubServer, ServiceOptions, hub_method
from relaycore.sdk._hub import HubMethodTable


class Shop(Hub):
    async def send_message(self, text):
        return text

    async def add_item(self, item, count=1):
        return count

    @hub_method("Checkout")
    async def pay_now(self):
        return "paid"

    @hub_method
    async def _internal_but_public(self):
        return 1

    async def stream_prices(self, n):
        yield n

    async def _private(self):
        pass

    def not_async(self):
        pass


class MoreShop(Shop):
    async def send_message(self, text, extra):  # overrides: one method, the subclass's
        return extra


@pytest.mark.parametrize("target", ["SendMessage", "sendMessage", "send_message", "SENDMESSAGE",
                                    "Send_Message"])
def test_method_names_match_case_insensitively_ignoring_underscores(target):
    method = HubMethodTable(Shop).find(target)
    assert method is not None and method.attribute == "send_message"


@pytest.mark.parametrize("target", ["_private", "private", "not_async", "notAsync", "on_connected",
                                    "OnDisconnected", "context", "payNow", "pay_now", "nothing"])
def test_private_sync_base_and_renamed_methods_are_not_hub_methods(target):
    assert HubMethodTable(Shop).find(target) is None


def test_explicit_names_answer_case_insensitively_only():
    table = HubMethodTable(Shop)
    assert table.find("checkout").attribute == "pay_now"
    assert table.find("CHECKOUT").name == "Checkout"
    assert table.find("_internal_but_public").attribute == "_internal_but_public"
    assert table.find("internalbutpublic") is None


def test_async_generators_are_streaming_methods():
    table = HubMethodTable(Shop)
    assert table.find("StreamPrices").streaming
    assert not table.find("AddItem").streaming


def test_subclass_overrides_are_found_once():
    method = HubMethodTable(MoreShop).find("SendMessage")
    method.bind(["a", "b"])
    with pytest.raises(TypeError):
        method.bind(["a"])
    methods = HubMethodTable(MoreShop).methods()
    assert len([m for m in methods if m.attribute == "send_message"]) == 1


def test_binding_checks_the_argument_count_with_defaults():
    method = HubMethodTable(Shop).find("add_item")
    method.bind(["x"])
    method.bind(["x", 2])
    for bad in ([], ["x", 2, 3]):
        with pytest.raises(TypeError):
            method.bind(bad)


def test_two_methods_answering_one_name_are_refused():
    class Clash(Hub):
        async def send_message(self):
            pass

        async def sendMessage(self):  # noqa: N802
            pass

    with pytest.raises(TypeError, match="both answer"):
        HubMethodTable(Clash)


def test_hub_method_on_a_sync_function_is_refused():
    class Bad(Hub):
        @hub_method("X")
        def x(self):
            pass

    with pytest.raises(TypeError, match="not an 'async def'"):
        HubMethodTable(Bad)


def test_map_hub_validates_names_and_classes():
    server = HubServer(ServiceOptions("Endpoint=http://a;AccessKey=k;Version=1.0"))
    server.map_hub("Shop", Shop)
    with pytest.raises(ValueError, match="already mapped"):
        server.map_hub("shop", Shop)
    with pytest.raises(ValueError, match="hub name"):
        server.map_hub("bad/name", Shop)
    with pytest.raises(TypeError, match="Hub subclass"):
        server.map_hub("other", object)  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="not mapped"):
        server.hub_context("missing")
    assert server.hubs == ["Shop"]


def test_sdk_all_lists_every_public_name_with_a_docstring():
    module = importlib.import_module("relaycore.sdk")
    assert len(module.__all__) == len(set(module.__all__))
    public = {name for name, value in vars(module).items()
              if not name.startswith("_") and not isinstance(value, types.ModuleType)
              and name != "annotations"}
    assert public == set(module.__all__)
    # Classes and functions; ``UserIdProvider`` is a type alias, documented where defined.
    exported = [getattr(module, name) for name in module.__all__]
    # (Python 3.10 says a parameterised alias such as Callable[...] is a class.)
    missing = [obj for obj in exported
               if (inspect.isclass(obj) or inspect.isfunction(obj))
               and not isinstance(obj, types.GenericAlias) and not obj.__doc__]
    assert not missing


def test_sdk_exports_the_names_of_the_issue():
    for name in ["EndpointType", "ServiceEndpoint", "ServiceOptions", "Hub", "HubException",
                 "HubServer", "hub_method", "ServiceUnavailableError", "AckTimeoutError"]:
        assert name in sdk.__all__
