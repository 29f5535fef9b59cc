"""Endpoints at run time, against fake services: status events and ``online``, metrics from
pings, adding (staging) and removing (draining) endpoints, ``set_endpoints`` and the watched
configuration file."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import anyio
import pytest
from sdkhelpers import BACKENDS, FakeService, run, sent_to, wait_for

from relaycore.protocol import (
    CloseConnectionMessage,
    ConnectionDataMessage,
    OpenConnectionMessage,
    ServicePing,
)
from relaycore.sdk import (
    EndpointMetrics,
    EndpointStatusEvent,
    EndpointType,
    Hub,
    HubServer,
    HubServiceEndpoint,
    ServiceEndpoint,
    ServiceOptions,
)

HANDSHAKE = b'{"protocol":"json","version":1}\x1e'
FAST: dict[str, Any] = dict(connection_count=1, retry_delay=lambda n: 0.05,
                            scale_poll_interval=0.05, shutdown_timeout=1)


class Chat(Hub):
    async def ping(self):
        return "pong"


def make_server(*endpoints: ServiceEndpoint, **overrides: Any) -> HubServer:
    server = HubServer(ServiceOptions(endpoints=list(endpoints), **{**FAST, **overrides}))
    server.map_hub("chat", Chat)
    return server


def names(server: HubServer) -> list[str]:
    return [e.name for e in server.hub_endpoints("chat")]


async def offered(server: HubServer, times: int = 30) -> set[int]:
    """The ports negotiate sends clients to, over ``times`` tries."""
    ports = set()
    for _ in range(times):
        doc = await server.negotiate("chat")
        ports.add(int(doc["url"].split(":")[2].split("/")[0]))
    return ports


# --- status -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_status_events_follow_the_connections_and_online_is_always_current(backend):
    seen: list[tuple[str, bool, bool]] = []

    def on_status(event: EndpointStatusEvent) -> None:
        # Called the moment it changes: the endpoint already says so.
        seen.append((event.endpoint.name, event.online, event.endpoint.online))

    async def scenario():
        async with anyio.create_task_group() as tg:
            a = await FakeService().start(tg)
            b = await FakeService().start(tg)
            server = make_server(ServiceEndpoint(a.connection_string, name="a"),
                                 ServiceEndpoint(b.connection_string, EndpointType.SECONDARY,
                                                 "b"),
                                 on_endpoint_status=on_status)
            events = server.endpoint_events()
            async with server:
                await server.wait_online()
                assert sorted(seen) == [("a", True, True), ("b", True, True)]
                endpoint_b = server.hub_endpoints("chat")[1]
                assert isinstance(endpoint_b, HubServiceEndpoint) and endpoint_b.online
                assert endpoint_b.hub == "chat" and endpoint_b.type is EndpointType.SECONDARY
                assert endpoint_b == ServiceEndpoint(b.connection_string,
                                                     EndpointType.SECONDARY, "b")
                b.handshake_error = "maintenance"
                await b.connections[0].drop()
                await wait_for(lambda: len(seen) == 3)
                assert seen[2] == ("b", False, False) and not endpoint_b.online
                assert server.online_endpoints("chat") == [server.hub_endpoints("chat")[0]]
                b.handshake_error = None
                await wait_for(lambda: len(seen) == 4)
                assert seen[3] == ("b", True, True) and endpoint_b.online
            # The iterator got the same, and ends with the server (offline on the way out).
            got = [(e.hub, e.endpoint.name, e.online) async for e in events]
            assert got[:4] == [("chat", n, o) for n, o, _ in seen[:4]]
            assert sorted(got[4:]) == [("chat", "a", False), ("chat", "b", False)]
            tg.cancel_scope.cancel()

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_iterator_closed_early_stops_receiving_and_a_failing_callback_is_logged(backend,
                                                                                     caplog):
    def on_status(event):
        raise RuntimeError("bad callback")

    async def scenario():
        async with anyio.create_task_group() as tg:
            a = await FakeService().start(tg)
            server = make_server(ServiceEndpoint(a.connection_string), on_endpoint_status=on_status)
            async with server.endpoint_events() as events:
                async with server:
                    assert (await events.__anext__()).online
                    events.close()
                assert [e async for e in events] == []    # not the offline one at exit
            assert server._listeners == []
            assert [e async for e in server.endpoint_events()] == []  # stopped: ends at once
            tg.cancel_scope.cancel()

    run(backend, scenario)
    assert "the on_endpoint_status callback failed" in caplog.text


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_async_status_callback_is_refused_with_a_hint(backend, caplog):
    async def on_status(event):
        pass

    async def scenario():
        async with anyio.create_task_group() as tg:
            a = await FakeService().start(tg)
            async with make_server(ServiceEndpoint(a.connection_string),
                                   on_endpoint_status=on_status):
                pass
            tg.cancel_scope.cancel()

    run(backend, scenario)
    assert "iterate HubServer.endpoint_events() from a task" in caplog.text


@pytest.mark.parametrize("backend", BACKENDS)
def test_metrics_come_from_any_ping_of_the_service(backend):
    async def scenario():
        async with anyio.create_task_group() as tg:
            a = await FakeService().start(tg)
            a.metrics = {"clientcount": 7, "servercount": 3, "capacity": 100}
            server = make_server(ServiceEndpoint(a.connection_string), status_interval=0.05)
            async with server:
                (endpoint,) = server.hub_endpoints("chat")
                assert endpoint.metrics == EndpointMetrics()
                await wait_for(lambda: endpoint.metrics == EndpointMetrics(7, 3, 100))
                # A ping with only some keys changes only those.
                a.metrics = {}
                await a.connections[0].send(ServicePing.of(clientcount=9))
                await wait_for(lambda: endpoint.metrics == EndpointMetrics(9, 3, 100))
            tg.cancel_scope.cancel()

    run(backend, scenario)


# --- adding -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_added_endpoint_gets_messages_at_once_but_clients_only_once_staged(backend):
    async def scenario():
        async with anyio.create_task_group() as tg:
            a = await FakeService().start(tg)
            b = await FakeService().start(tg)
            b.servers = ["another-app-server"]   # not every app server is on it yet
            server = make_server(ServiceEndpoint(a.connection_string, name="a"))
            async with server:
                result: list[bool] = []

                async def add():
                    result.append(await server.add_endpoint(
                        ServiceEndpoint(b.connection_string, name="b")))

                tg.start_soon(add)
                await b.wait_connections(1)
                await wait_for(lambda: b.servers_pings >= 2 and a.servers_pings >= 2)
                # Staging: routed (messages reach it), not offered to clients.
                assert names(server) == ["a", "b"]
                assert [e.name for e in server.endpoints] == ["a", "b"]
                assert await offered(server) == {a.port}
                await server.hub_context("chat").clients.all.send("during staging")
                assert await sent_to(b, server, 1) == ["BroadcastDataMessage"]
                assert result == []
                b.servers = None                      # now the lists agree
                await wait_for(lambda: result == [True])
                assert await offered(server) == {a.port, b.port}
            tg.cancel_scope.cancel()

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_staging_waits_for_every_hubs_connections(backend):
    class Other(Hub):
        pass

    async def scenario():
        async with anyio.create_task_group() as tg:
            a = await FakeService().start(tg)
            b = await FakeService().start(tg)
            server = make_server(ServiceEndpoint(a.connection_string, name="a"),
                                 connection_count=2)
            server.map_hub("other", Other)
            async with server:
                added = await server.add_endpoint(ServiceEndpoint(b.connection_string, name="b"))
                assert added
                hubs = sorted(c.query["hub"] for c in b.open_connections())
                assert hubs == ["chat", "chat", "other", "other"]
                assert all(c.online for c in server._dispatcher("other").containers)
            tg.cancel_scope.cancel()

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_staging_that_times_out_logs_an_error_and_offers_the_endpoint_anyway(backend, caplog):
    async def scenario():
        async with anyio.create_task_group() as tg:
            a = await FakeService().start(tg)
            b = await FakeService().start(tg)
            b.servers = ["never-matches"]
            server = make_server(ServiceEndpoint(a.connection_string, name="a"),
                                 server_scale_timeout=0.5)
            async with server:
                assert not await server.add_endpoint(
                    ServiceEndpoint(b.connection_string, name="b"))
                assert await offered(server) == {a.port, b.port}
            tg.cancel_scope.cancel()

    with caplog.at_level(logging.INFO, "relaycore.sdk"):
        run(backend, scenario)
    assert "staging did not finish within server_scale_timeout (0.5 s)" in caplog.text
    assert "the servers of hub chat on it to match" in caplog.text


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_and_remove_refuse_what_does_not_fit(backend):
    async def scenario():
        async with anyio.create_task_group() as tg:
            a = await FakeService().start(tg)
            b = await FakeService().start(tg)
            server = make_server(ServiceEndpoint(a.connection_string, name="a"),
                                 ServiceEndpoint(b.connection_string, EndpointType.SECONDARY,
                                                 "b"))
            async with server:
                with pytest.raises(ValueError, match="already configured"):
                    await server.add_endpoint(ServiceEndpoint(a.connection_string, name="x"))
                with pytest.raises(ValueError, match="no endpoint is named 'c'"):
                    await server.remove_endpoint("c")
                with pytest.raises(ValueError, match="at least one primary endpoint must remain"):
                    await server.remove_endpoint("a")
                with pytest.raises(ValueError, match="no primary endpoint"):
                    await server.set_endpoints([server.endpoints[1]])
                assert names(server) == ["a", "b"]
            with pytest.raises(RuntimeError, match="has stopped"):
                await server.remove_endpoint("b")
            tg.cancel_scope.cancel()

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_endpoints_changed_before_start_take_effect_at_start(backend):
    async def scenario():
        async with anyio.create_task_group() as tg:
            a = await FakeService().start(tg)
            b = await FakeService().start(tg)
            c = await FakeService().start(tg)
            server = make_server(ServiceEndpoint(a.connection_string, name="a"),
                                 ServiceEndpoint(b.connection_string, name="b"))
            assert await server.add_endpoint(c.connection_string)
            assert await server.remove_endpoint("b")
            async with server:
                assert names(server) == ["a", ""]
                await server.wait_online()
                assert await offered(server) == {a.port, c.port}
                assert b.attempts == []
            tg.cancel_scope.cancel()

    run(backend, scenario)


# --- removing -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_removed_endpoint_gets_no_new_clients_but_messages_until_its_clients_left(backend):
    async def scenario():
        async with anyio.create_task_group() as tg:
            a = await FakeService().start(tg)
            b = await FakeService().start(tg)
            server = make_server(ServiceEndpoint(a.connection_string, name="a"),
                                 ServiceEndpoint(b.connection_string, name="b"),
                                 connection_count=2)
            async with server:
                holder, other = await b.wait_connections(2)
                # A client of ours on b.
                await holder.send(OpenConnectionMessage("c1", {}, protocol="json"),
                                  ConnectionDataMessage("c1", HANDSHAKE))
                await holder.client_data("c1")
                result: list[bool] = []

                async def remove():
                    result.append(await server.remove_endpoint("b"))

                tg.start_soon(remove)
                await wait_for(lambda: b.fins == ["fin:0", "fin:0"])
                # At once: not offered, not in the configured list, still routed.
                assert await offered(server) == {a.port}
                assert [e.name for e in server.endpoints] == ["a"]
                assert names(server) == ["a", "b"]
                await server.hub_context("chat").clients.all.send("still there")
                assert "BroadcastDataMessage" in await sent_to(b, server, 1)
                # A connection that reconnects while draining says fin again.
                await other.drop()
                await wait_for(lambda: b.fins == ["fin:0"] * 3)
                # The relay says it has no client of ours left, but c1 is still running here.
                polls = b.status_pings
                await wait_for(lambda: b.status_pings >= polls + 4)
                assert result == [] and len(b.open_connections()) == 2
                await holder.send(CloseConnectionMessage("c1"))
                await wait_for(lambda: result == [True])
                await wait_for(lambda: not b.open_connections())
                assert names(server) == ["a"]
            tg.cancel_scope.cancel()

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_removal_waits_until_the_relay_has_no_client_of_ours(backend):
    async def scenario():
        async with anyio.create_task_group() as tg:
            a = await FakeService().start(tg)
            b = await FakeService().start(tg)
            b.status = "1"
            server = make_server(ServiceEndpoint(a.connection_string, name="a"),
                                 ServiceEndpoint(b.connection_string, name="b"))
            async with server:
                await b.wait_connections(1)
                result: list[bool] = []

                async def remove():
                    result.append(await server.remove_endpoint("b"))

                tg.start_soon(remove)
                polls = b.status_pings
                await wait_for(lambda: b.status_pings >= polls + 3)
                assert result == [] and len(b.open_connections()) == 1
                b.status = "0"
                await wait_for(lambda: result == [True])
                await wait_for(lambda: not b.open_connections())
            tg.cancel_scope.cancel()

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_removal_that_times_out_logs_an_error_and_closes_anyway(backend, caplog):
    async def scenario():
        async with anyio.create_task_group() as tg:
            a = await FakeService().start(tg)
            b = await FakeService().start(tg)
            b.status = "1"
            server = make_server(ServiceEndpoint(a.connection_string, name="a"),
                                 ServiceEndpoint(b.connection_string, name="b"),
                                 server_scale_timeout=0.5)
            async with server:
                await server.wait_online()
                assert not await server.remove_endpoint(server.endpoints[1])
                await wait_for(lambda: not b.open_connections())
                assert names(server) == ["a"]
            tg.cancel_scope.cancel()

    run(backend, scenario)
    assert "clients still connected after server_scale_timeout (0.5 s)" in caplog.text


# --- set_endpoints and the configuration file ---------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_set_endpoints_adds_removes_and_renames_in_place(backend):
    async def scenario():
        async with anyio.create_task_group() as tg:
            a = await FakeService().start(tg)
            b = await FakeService().start(tg)
            c = await FakeService().start(tg)
            server = make_server(ServiceEndpoint(a.connection_string, name="a"),
                                 ServiceEndpoint(b.connection_string, name="b"))
            async with server:
                await server.wait_online()
                container_a = server._dispatcher("chat").containers[0]
                assert await server.set_endpoints([
                    ServiceEndpoint(a.connection_string, EndpointType.SECONDARY, "a2"),
                    ServiceEndpoint(c.connection_string, name="c"),
                ])
                assert names(server) == ["a2", "c"]
                assert [e.type for e in server.endpoints] == [EndpointType.SECONDARY,
                                                              EndpointType.PRIMARY]
                # Renamed in place: same connections, now offered as a secondary.
                assert server._dispatcher("chat").containers[0] is container_a
                assert a.connected_count == 1
                assert await offered(server) == {c.port}
                await wait_for(lambda: not b.open_connections())
            tg.cancel_scope.cancel()

    run(backend, scenario)


def write_config(path: Path, endpoints: dict[str, str]) -> None:
    if path.suffix == ".json":
        text = json.dumps({"Azure": {"SignalR": {"Endpoints": endpoints}}})
    else:
        text = "[Azure.SignalR.Endpoints]\n" + "".join(
            f'"{name}" = "{value}"\n' for name, value in endpoints.items())
    path.write_text(text)


@pytest.mark.parametrize("suffix", [".json", ".toml"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_config_file_changes_add_and_remove_endpoints_and_bad_files_are_ignored(
        backend, suffix, tmp_path, caplog):
    path = tmp_path / f"relay{suffix}"

    async def scenario():
        async with anyio.create_task_group() as tg:
            a = await FakeService().start(tg)
            b = await FakeService().start(tg)
            write_config(path, {"a": a.connection_string})
            options = ServiceOptions.from_file(path, config_reload_interval=0.05, **FAST)
            assert options.config_file == str(path)
            server = HubServer(options)
            server.map_hub("chat", Chat)
            async with server:
                assert names(server) == ["a"]
                write_config(path, {"a": a.connection_string, "b:secondary": b.connection_string})
                await wait_for(lambda: names(server) == ["a", "b"]
                               and server._dispatcher("chat").containers[1].state == "active")
                assert server.endpoints[1].type is EndpointType.SECONDARY
                path.write_text(path.read_text().replace("b:secondary", "b:tertiary"))
                await wait_for(lambda: "role 'tertiary' is invalid" in caplog.text)
                assert names(server) == ["a", "b"]
                write_config(path, {"a": a.connection_string})
                await wait_for(lambda: names(server) == ["a"])
                await wait_for(lambda: not b.open_connections())
            tg.cancel_scope.cancel()

    run(backend, scenario)
    assert "configuration not reloaded" in caplog.text


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_endpoint_returns_when_the_server_stops_during_staging(backend):
    async def scenario():
        async with anyio.create_task_group() as tg:
            a = await FakeService().start(tg)
            b = await FakeService().start(tg)
            b.reject_status = 503                 # its connections never come up
            server = make_server(ServiceEndpoint(a.connection_string, name="a"))
            result: list[bool] = []
            async with server:

                async def add():
                    result.append(await server.add_endpoint(
                        ServiceEndpoint(b.connection_string, name="b")))

                tg.start_soon(add)
                await wait_for(lambda: len(b.attempts) >= 2)
            await wait_for(lambda: result == [False], timeout=2)
            tg.cancel_scope.cancel()

    run(backend, scenario)
