"""The management SDK against the real relay (``python -m relaycore serve`` subprocesses):
every call of a hub context, over both transports and under asyncio and trio.

The same scenario body runs over TRANSIENT (REST) and PERSISTENT (Weak server connections) and
asserts exactly what each client received: switching transports changes nothing a client sees.
Clients are SignalR JSON clients (``JsonHubClient``) that connect with a ``negotiate()`` token.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import anyio
import httpx
import pytest
from relayclient import JsonHubClient, relay_process
from sdkhelpers import KEY, run, wait_for

import relaycore.sdk._restclient as restclient
from relaycore.protocol import TokenValidator, generate_access_token
from relaycore.sdk import (
    EndpointType,
    RetryOptions,
    ServiceEndpoint,
    ServiceHubContext,
    ServiceInvalidArgumentError,
    ServiceManager,
    ServiceNotFoundError,
    ServiceOptions,
    ServiceUnauthorizedError,
    ServiceUnavailableError,
    TransportType,
)
from relayhelpers import ADMIN_KEY

BACKENDS = ["asyncio", "trio"]
TRANSPORTS = [TransportType.TRANSIENT, TransportType.PERSISTENT]
_marks = itertools.count(1)


def manager_for(connection_string: str | None = None, transport=TransportType.TRANSIENT,
                **options: Any) -> ServiceManager:
    settings: dict[str, Any] = dict(connection_string=connection_string, connection_count=1,
                                    retry_delay=lambda n: 0.1, shutdown_timeout=2)
    settings.update(options)
    return ServiceManager(ServiceOptions(**settings), transport=transport,
                          retry=RetryOptions(delay=0.05, budget=5))


async def connect(chat: ServiceHubContext, tg: Any, user: str | None = None) -> JsonHubClient:
    """A client connected with the redirect ``negotiate()`` gave."""
    return await JsonHubClient.connect((await chat.negotiate(user_id=user)).to_dict(), tg)


async def settle(chat: ServiceHubContext, clients: dict[str, JsonHubClient]
                 ) -> dict[str, list[tuple[str, list]]]:
    """What each client received since the last call: a marker is broadcast after the calls
    (same transport, so after them on every connection) and everything before it is taken."""
    mark = next(_marks)
    await chat.clients.all.send("mark", mark)
    got = {}
    for name, client in clients.items():
        await client.next(lambda m: m.get("target") == "mark" and m["arguments"] == [mark])
        got[name] = [(m["target"], m["arguments"]) for m in client.received if m["type"] == 1]
        client.received.clear()
    return got


def only(received: dict[str, list], names: str, message: tuple[str, list]) -> dict[str, list]:
    """The expected ``settle()`` result: ``message`` for ``names``, nothing for the others."""
    return {n: [message] if n in names.split() else [] for n in received}


async def closed_with(client: JsonHubClient) -> dict:
    """The Close message the client got."""
    return await client.next(lambda m: m["type"] == 7)


# --------------------------------------------------------------------------------------------
# Every call, the same body over both transports


async def every_call(transport: TransportType) -> None:
    async with relay_process() as relay, anyio.create_task_group() as tg:
        async with manager_for(relay.connection_string, transport) as manager:
            chat = await manager.create_hub_context("chat")
            c = {"a1": await connect(chat, tg, "alice"), "a2": await connect(chat, tg, "alice"),
                 "b": await connect(chat, tg, "bob"), "anon": await connect(chat, tg)}
            ids = {name: client.connection_id for name, client in c.items()}

            # Sends, each with the number of connections it reached.
            assert await chat.clients.all.send("m", 1, report=True) == 4
            assert await settle(chat, c) == only(c, "a1 a2 b anon", ("m", [1]))
            assert await chat.clients.all_except([ids["b"]]).send("m", 2, report=True) == 3
            assert await settle(chat, c) == only(c, "a1 a2 anon", ("m", [2]))
            assert await chat.clients.client(ids["a1"]).send("m", 3, report=True) == 1
            assert await chat.clients.client("no-such-connection").send("m", 0, report=True) == 0
            assert await settle(chat, c) == only(c, "a1", ("m", [3]))
            assert await chat.clients.clients([ids["a2"], ids["b"]]).send("m", 4, report=True) == 2
            assert await settle(chat, c) == only(c, "a2 b", ("m", [4]))
            assert await chat.clients.user("alice").send("m", 5, report=True) == 2
            assert await settle(chat, c) == only(c, "a1 a2", ("m", [5]))
            assert await chat.clients.users(["alice", "bob"]).send("m", {"x": [6]},
                                                                   report=True) == 3
            assert await settle(chat, c) == only(c, "a1 a2 b", ("m", [{"x": [6]}]))
            assert await chat.clients.user("nobody").send("m", 7, report=True) == 0  # offline
            assert await chat.clients.user("alice").send("m", 8) is None  # not asked
            assert await settle(chat, c) == only(c, "a1 a2", ("m", [8]))

            # Connections in groups.
            await chat.groups.add_to_group(ids["a1"], "g1")
            await chat.groups.add_to_group(ids["b"], "g1")
            await chat.groups.add_to_group(ids["anon"], "g2")
            await chat.groups.add_to_group("no-such-connection", "g1")  # not an error
            assert await chat.client_manager.group_exists("g1")
            assert not await chat.client_manager.group_exists("g3")
            assert await chat.clients.group("g1").send("m", 9, report=True) == 2
            assert await settle(chat, c) == only(c, "a1 b", ("m", [9]))
            assert await chat.clients.group_except("g1", [ids["b"]]).send("m", 10,
                                                                          report=True) == 1
            assert await settle(chat, c) == only(c, "a1", ("m", [10]))
            assert await chat.clients.groups(["g1", "g2"]).send("m", 11, report=True) == 3
            assert await settle(chat, c) == only(c, "a1 b anon", ("m", [11]))
            await chat.groups.remove_from_group(ids["b"], "g1")
            await chat.groups.remove_from_group("no-such-connection", "g1")
            await chat.clients.group("g1").send("m", 12)
            assert await settle(chat, c) == only(c, "a1", ("m", [12]))

            # Users in groups: current and later connections, TTL, removal.
            await chat.user_groups.add_to_group("alice", "vip")
            assert await chat.user_groups.is_user_in_group("alice", "vip")
            assert not await chat.user_groups.is_user_in_group("bob", "vip")
            assert await chat.clients.group("vip").send("m", 13, report=True) == 2
            assert await settle(chat, c) == only(c, "a1 a2", ("m", [13]))
            c["a3"] = await connect(chat, tg, "alice")  # a later connection joins too
            ids["a3"] = c["a3"].connection_id
            assert await chat.clients.group("vip").send("m", 14, report=True) == 3
            assert await settle(chat, c) == only(c, "a1 a2 a3", ("m", [14]))
            await chat.user_groups.remove_from_group("alice", "vip")
            assert not await chat.user_groups.is_user_in_group("alice", "vip")
            assert await chat.clients.group("vip").send("m", 15, report=True) == 0
            await chat.user_groups.add_to_group("bob", "now", ttl=0)  # current connections only
            await chat.user_groups.add_to_group("bob", "later", ttl=600)
            c["b2"] = await connect(chat, tg, "bob")
            ids["b2"] = c["b2"].connection_id
            assert await chat.clients.group("now").send("m", 16, report=True) == 1
            assert await chat.clients.group("later").send("m", 17, report=True) == 2
            expected = only(c, "", ("m", []))
            expected.update(b=[("m", [16]), ("m", [17])], b2=[("m", [17])])
            assert await settle(chat, c) == expected
            await chat.user_groups.remove_from_all_groups("bob")
            assert not await chat.user_groups.is_user_in_group("bob", "later")
            assert await chat.clients.group("later").send("m", 18, report=True) == 0

            # Existence checks.
            manage = chat.client_manager
            assert await manage.connection_exists(ids["a1"])
            assert not await manage.connection_exists("no-such-connection")
            assert await manage.user_exists("alice")
            assert not await manage.user_exists("nobody")

            # Closing: one connection, a user's (but one), a group's, everyone (but one).
            await manage.close_connection(ids["anon"], reason="bye anon")
            assert (await closed_with(c.pop("anon")))["error"] == "bye anon"
            await manage.close_connection("no-such-connection", reason="nobody")  # no error
            assert not await manage.connection_exists(ids["anon"])
            await manage.close_user_connections("alice", reason="alice out",
                                                excluded=[ids["a3"]])
            for name in ("a1", "a2"):
                assert (await closed_with(c.pop(name)))["error"] == "alice out"
            assert await manage.user_exists("alice")  # a3 is left
            await chat.groups.add_to_group(ids["b2"], "doomed")
            await manage.close_group_connections("doomed", reason="group closed")
            assert (await closed_with(c.pop("b2")))["error"] == "group closed"
            assert await settle(chat, c) == {"a3": [], "b": []}
            await manage.close_connections(reason="maintenance", excluded=[ids["b"]])
            assert (await closed_with(c.pop("a3")))["error"] == "maintenance"
            assert await chat.clients.all.send("m", 19, report=True) == 1
            assert await settle(chat, c) == {"b": [("m", [19])]}
            await manage.close_connections()
            await closed_with(c.pop("b"))
            assert not await manage.user_exists("bob")
            tg.cancel_scope.cancel()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transport", TRANSPORTS, ids=lambda t: t.name.lower())
def test_manager_every_call_has_the_same_effect_over_either_transport(backend, transport):
    run(backend, lambda: every_call(transport), timeout=60)


# --------------------------------------------------------------------------------------------
# Negotiate and endpoints


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transport", TRANSPORTS, ids=lambda t: t.name.lower())
def test_manager_negotiate_signs_for_the_endpoint_the_router_picks(backend, transport):
    async def scenario():
        async with relay_process() as east, relay_process() as west, \
                anyio.create_task_group() as tg:
            endpoints = [ServiceEndpoint(east.connection_string, name="east"),
                         ServiceEndpoint(west.connection_string, EndpointType.SECONDARY,
                                         name="west")]
            async with manager_for(transport=transport, endpoints=endpoints) as manager:
                chat = await manager.create_hub_context("Chat")
                redirect = await chat.negotiate(user_id="alice", claims={"role": "admin"},
                                                lifetime=60)
                assert redirect.url == f"http://127.0.0.1:{east.port}/client/?hub=chat"
                claims = TokenValidator([KEY]).validate(
                    redirect.access_token, audiences=["http://127.0.0.1/client/?hub=chat"],
                    now=time.time())
                assert claims["asrs.s.uid"] == "alice" and claims["role"] == "admin"
                assert claims["exp"] - claims["iat"] == 60
                assert claims["asrs.s.secn"] == "2"

                listed = await chat.list_endpoints()
                assert [(e.name, e.type, e.online) for e in listed] == [
                    ("east", EndpointType.PRIMARY, True), ("west", EndpointType.SECONDARY, True)]
                every = [n.to_dict() for n in await chat.negotiate_all(user_id="bob")]
                assert [(d["name"], d["endpointType"], d["online"]) for d in every] == [
                    ("east", "Primary", True), ("west", "Secondary", True)]
                assert [d["connectionInfo"]["url"].split("/")[2] for d in every] == [
                    f"127.0.0.1:{east.port}", f"127.0.0.1:{west.port}"]

                # One client on each relay: a send reaches both, counted over both.
                on_east = await JsonHubClient.connect(every[0]["connectionInfo"], tg)
                on_west = await JsonHubClient.connect(every[1]["connectionInfo"], tg)
                assert await chat.clients.user("bob").send("m", 1, report=True) == 2
                assert await on_east.next_invocation("m") == [1]
                assert await on_west.next_invocation("m") == [1]

                # A context limited to some endpoints sends and negotiates there only.
                west_only = chat.with_endpoints(["west"])
                assert await west_only.clients.all.send("m", 2, report=True) == 1
                assert await on_west.next_invocation("m") == [2]
                assert (await west_only.negotiate()).url.startswith(
                    f"http://127.0.0.1:{west.port}/")
                assert [e.name for e in await west_only.list_endpoints()] == ["west"]
                assert await chat.clients.all.send("m", 3, report=True) == 2
                assert await on_east.next_invocation("m") == [3]  # 2 never came to east
                with pytest.raises(ValueError, match="not an endpoint"):
                    chat.with_endpoints(["north"])
                await on_east.aclose()
                await on_west.aclose()
                tg.cancel_scope.cancel()

    run(backend, scenario, timeout=40)


@pytest.mark.parametrize("backend", BACKENDS)
def test_manager_negotiate_fails_over_to_the_secondary_when_the_primary_is_down(backend):
    async def scenario():
        async with relay_process() as east, relay_process() as west:
            endpoints = [ServiceEndpoint(east.connection_string, name="east"),
                         ServiceEndpoint(west.connection_string, EndpointType.SECONDARY,
                                         name="west")]
            async with manager_for(endpoints=endpoints) as manager:
                chat = await manager.create_hub_context("chat")
                await east.kill()
                await manager.check_health()
                assert [(e.name, e.online) for e in await chat.list_endpoints()] == [
                    ("east", False), ("west", True)]
                assert (await chat.negotiate()).url.startswith(f"http://127.0.0.1:{west.port}/")
                assert await chat.clients.all.send("m", report=True) == 0  # west only
                assert [n.online for n in await chat.negotiate_all()] == [False, True]

    run(backend, scenario, timeout=30)


# --------------------------------------------------------------------------------------------
# The relay's refusals become the matching exceptions


@pytest.mark.parametrize("backend", BACKENDS)
def test_manager_raises_the_exception_matching_each_refusal_of_the_relay(backend, monkeypatch):
    # A small body limit: a body that fits in the socket buffers is read whole by the client
    # before the relay closes (with a body of megabytes the client gets a reset instead of the
    # 413, as the relay does not drain what it refused: see docs/serverless.md).
    monkeypatch.setenv("RELAYCORE_MAX_REQUEST_BODY", "4096")

    async def scenario():
        async with relay_process(args=("--log-level", "ERROR")) as relay:
            async with manager_for(relay.connection_string) as manager:
                chat = await manager.create_hub_context("chat")

                # Oversized body: 413 with the relay's reason.
                with pytest.raises(ServiceInvalidArgumentError) as caught:
                    await chat.clients.all.send("m", "x" * 5000)
                assert caught.value.status == 413
                assert "send to all failed" in str(caught.value)
                assert "exceeds the limit" in caught.value.reason

                # A hub name the relay refuses (the SDK checks names itself, so the request is
                # made through the transport directly): 400 and the relay's reason.
                endpoint = manager.endpoints[0]
                request = restclient._Request("HEAD", "/users/u", "check whether user exists",
                                              expected_404="Warning.User.NotExisted")
                with pytest.raises(ServiceInvalidArgumentError) as caught:
                    await manager._client.call(endpoint, "1bad", request)
                assert caught.value.status == 400

                # An expired token: every token of the manager is signed two hours ago.
                real_time = time.time
                monkeypatch.setattr(restclient, "_now", lambda: real_time() - 7200)
                with pytest.raises(ServiceUnauthorizedError, match="expired") as caught:
                    await chat.client_manager.user_exists("alice")
                assert caught.value.status == 401
                assert "check whether user 'alice' exists failed" in str(caught.value)
                monkeypatch.undo()

            # The wrong access key.
            wrong = relay.connection_string.replace(KEY, "not-the-key")
            async with manager_for(wrong) as manager:
                chat = await manager.create_hub_context("chat")
                with pytest.raises(ServiceUnauthorizedError, match="signature"):
                    await chat.clients.user("alice").send("m")

            # An unknown route (the SDK makes none, so the request is made directly): 404
            # without the x-ms-error-code a call expects.
            async with manager_for(relay.connection_string) as manager:
                request = restclient._Request("POST", "/nowhere/:send", "send nowhere",
                                              send=True, body=b"\x80")
                with pytest.raises(ServiceNotFoundError, match="no REST API route") as caught:
                    await manager._client.call(manager.endpoints[0], "chat", request)
                assert caught.value.status == 404 and caught.value.code == "NotFound"

            # An endpoint URL with a path the relay does not serve fails its health probe.
            moved = f"Endpoint=http://127.0.0.1:{relay.port}/nowhere;AccessKey={KEY};Version=1.0;"
            async with manager_for(moved) as manager:
                chat = await manager.create_hub_context("chat")
                with pytest.raises(ServiceUnavailableError, match="no endpoint is online"):
                    await chat.groups.add_to_group("c1", "g")

    run(backend, scenario, timeout=30)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transport", TRANSPORTS, ids=lambda t: t.name.lower())
def test_manager_without_an_online_endpoint_says_so(backend, transport):
    async def scenario():
        async with relay_process() as relay:
            async with manager_for(relay.connection_string, transport) as manager:
                chat = await manager.create_hub_context("chat")
                assert await chat.clients.all.send("m", report=True) == 0
                await relay.kill()
                if transport is TransportType.TRANSIENT:
                    await manager.check_health()
                else:
                    await wait_for(lambda: not manager._weak["chat"].online_endpoints("chat"))
                with pytest.raises(ServiceUnavailableError, match="no endpoint is online"):
                    await chat.clients.all.send("m")
                with pytest.raises(ServiceUnavailableError, match="no endpoint is online"):
                    await chat.negotiate()

    run(backend, scenario, timeout=30)


async def _fault(relay: Any, mode: str) -> None:
    path = "/api/admin/faults"
    token = generate_access_token(ADMIN_KEY, f"http://127.0.0.1{path}", now=time.time())
    async with httpx.AsyncClient() as http:
        response = await http.put(f"http://127.0.0.1:{relay.port}{path}",
                                  params={"serverConnections": mode},
                                  headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("backend", BACKENDS)
def test_persistent_manager_reconnects_after_its_connections_are_dropped(backend):
    async def scenario():
        async with relay_process() as relay, anyio.create_task_group() as tg:
            async with manager_for(relay.connection_string, TransportType.PERSISTENT) as manager:
                chat = await manager.create_hub_context("chat")
                client = await connect(chat, tg, "alice")
                server = manager._weak["chat"]
                await _fault(relay, "drop")
                await wait_for(lambda: not server.online_endpoints("chat"))
                with pytest.raises(ServiceUnavailableError):
                    await chat.clients.user("alice").send("m", 1)
                await _fault(relay, "none")
                await wait_for(lambda: bool(server.online_endpoints("chat")))
                await chat.clients.user("alice").send("m", 2)
                assert await client.next_invocation("m") == [2]
                await client.aclose()
                tg.cancel_scope.cancel()

    run(backend, scenario, timeout=30)


# --------------------------------------------------------------------------------------------
# Lifetime


@pytest.mark.parametrize("backend", BACKENDS)
def test_transient_manager_works_without_async_with_and_refuses_calls_once_closed(backend):
    async def scenario():
        async with relay_process() as relay:
            manager = manager_for(relay.connection_string)
            chat = await manager.create_hub_context("chat")
            assert await chat.clients.all.send("m", report=True) == 0
            await manager.aclose()
            with pytest.raises(RuntimeError, match="closed"):
                await chat.clients.all.send("m")
            with pytest.raises(RuntimeError, match="closed"):
                await manager.create_hub_context("chat")

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_persistent_manager_needs_async_with(backend):
    async def scenario():
        manager = manager_for("Endpoint=http://127.0.0.1:9;AccessKey=k;Version=1.0;",
                              TransportType.PERSISTENT)
        with pytest.raises(RuntimeError, match="async with"):
            await manager.create_hub_context("chat")
        await manager.aclose()

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_persistent_manager_connections_are_weak_and_never_carry_clients(backend):
    """A client of a hub whose only server connections are the manager's is served by the
    relay itself (serverless): its invocation is answered there, not bound to the manager."""
    async def scenario():
        async with relay_process() as relay, anyio.create_task_group() as tg:
            async with manager_for(relay.connection_string, TransportType.PERSISTENT,
                                   connection_count=2) as manager:
                chat = await manager.create_hub_context("chat")
                server = manager._weak["chat"]
                connections = server._dispatcher("chat").containers[0].connections
                assert [c.connection_type.name for c in connections] == ["WEAK", "WEAK"]
                client = await connect(chat, tg, "alice")
                reply = await client.invoke("anything")
                assert "error" in reply  # no upstream configured: a completion error
                assert not server._dispatcher("chat").local_clients
                await client.aclose()
                tg.cancel_scope.cancel()

    run(backend, scenario)


def test_closing_connections_looks_the_same_to_clients_over_either_transport():
    async def scenario():
        async with relay_process() as relay, anyio.create_task_group() as tg:
            seen: dict[TransportType, list[dict]] = {}
            for transport in TRANSPORTS:
                async with manager_for(relay.connection_string, transport) as manager:
                    chat = await manager.create_hub_context("chat")
                    manage = chat.client_manager
                    seen[transport] = []
                    for kind in ("one", "user", "group", "all"):
                        client = await connect(chat, tg, "u")
                        await chat.groups.add_to_group(client.connection_id, "g")
                        if kind == "one":
                            await manage.close_connection(client.connection_id, "r")
                        elif kind == "user":
                            await manage.close_user_connections("u", "r")
                        elif kind == "group":
                            await manage.close_group_connections("g", "r")
                        else:
                            await manage.close_connections("r")
                        seen[transport].append(await closed_with(client))
            tg.cancel_scope.cancel()
        assert seen[TransportType.PERSISTENT] == seen[TransportType.TRANSIENT]

    run("trio", scenario)
