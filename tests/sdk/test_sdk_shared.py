"""The helpers the SDK's modules share: the checks of what app code passes (``_hub``), the ASGI
lifespan (``_asgi``, for the negotiate app and the upstream handler), and a server's one life
(``_scaling.Lifetime``, also a ``ServiceManager``'s)."""

from __future__ import annotations

import anyio
import pytest
from sdkhelpers import BACKENDS, run

from relaycore.sdk._asgi import serve_lifespan
from relaycore.sdk._hub import check_method, checked_group, checked_id, checked_ids
from relaycore.sdk._scaling import Lifetime
from relaycore.sdk.upstream import UpstreamHandler

# Checks -----------------------------------------------------------------------------------------


def test_check_method_takes_a_non_empty_string_only():
    check_method("newMessage")
    for bad in ("", None, 3):
        with pytest.raises(ValueError, match="method must be a non-empty string"):
            check_method(bad)  # type: ignore[arg-type]


def test_checked_ids_returns_a_tuple_in_order_of_any_iterable():
    assert checked_ids(["b", "a", "b"], "user_ids") == ("b", "a", "b")
    assert checked_ids(iter(("c1",)), "connection_ids") == ("c1",)
    assert checked_ids([], "excluded") == ()


def test_checked_ids_refuses_one_string_and_empty_or_non_string_ids_naming_them():
    with pytest.raises(TypeError, match="user_ids must be a list of strings, not one string"):
        checked_ids("alice", "user_ids")
    with pytest.raises(ValueError, match="excluded must hold non-empty strings, got ''"):
        checked_ids(["a", ""], "excluded")
    with pytest.raises(ValueError, match="got 7"):
        checked_ids(["a", 7], "excluded")  # type: ignore[list-item]


def test_checked_id_checks_one_id():
    assert checked_id("c1", "connection_id") == "c1"
    with pytest.raises(ValueError, match="connection_id must hold non-empty strings"):
        checked_id("", "connection_id")


def test_checked_group_takes_valid_group_names_only():
    assert checked_group("room 1") == "room 1"
    for bad in ("", "   ", "x" * 1025, None):
        with pytest.raises(ValueError, match="group name .* is invalid"):
            checked_group(bad)  # type: ignore[arg-type]


# The ASGI lifespan --------------------------------------------------------------------------------


async def _lifespan_answers(app) -> list[str]:
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[str] = []

    async def receive():
        return incoming.pop(0)

    async def send(message):
        sent.append(message["type"])

    await app({"type": "lifespan"}, receive, send)
    return sent


@pytest.mark.parametrize("backend", BACKENDS)
def test_serve_lifespan_acknowledges_startup_and_shutdown_then_returns(backend):
    async def scenario():
        async def app(scope, receive, send):
            await serve_lifespan(receive, send)

        assert await _lifespan_answers(app) == [
            "lifespan.startup.complete", "lifespan.shutdown.complete"]

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_upstream_handler_acknowledges_the_lifespan(backend):
    async def scenario():
        handler = UpstreamHandler(access_keys=["k"])
        assert await _lifespan_answers(handler) == [
            "lifespan.startup.complete", "lifespan.shutdown.complete"]

    run(backend, scenario)


# A server's one life ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_lifetime_begins_once_with_its_task_group_running(backend):
    async def scenario():
        life = Lifetime()
        assert not (life.entered or life.running or life.stopped)
        task_group = await life.begin("runs once")
        try:
            assert life.task_group is task_group
            assert life.entered and life.running and not life.stopped
            with pytest.raises(RuntimeError, match="^runs once$"):
                await life.begin("runs once")
            ran = anyio.Event()

            async def task() -> None:
                ran.set()

            task_group.start_soon(task)
            await ran.wait()
        finally:
            life.running = False
            await task_group.__aexit__(None, None, None)
        assert life.stopped

    run(backend, scenario)
