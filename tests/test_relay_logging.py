"""What the relay logs at the default level (INFO): one line per app server joining or leaving
a hub (not one per server connection), connection types by name, no WARNING for a planned
shutdown on either side, and nothing per upstream POST.

The relay runs in-process; app servers are the project's SDK (``HubServer``) on trio, and the
upstream is a small HTTP server in the test.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
import trio

from relaycore.relay import RelayConfig, serve_relay
from relaycore.sdk import Hub, HubServer, ServiceOptions
from relayhelpers import KEY, FakeUpstream, wait_for


class Chat(Hub):
    async def add(self, a, b):
        return a + b


class WeakServer(HubServer):
    weak_connections = True


def app_server(port: int, cls: type[HubServer] = HubServer, **overrides: Any) -> HubServer:
    settings: dict[str, Any] = dict(
        connection_string=f"Endpoint=http://127.0.0.1;Port={port};AccessKey={KEY};Version=1.0;",
        retry_delay=lambda n: 60)
    settings.update(overrides)
    server = cls(ServiceOptions(**settings))
    server.map_hub("chat", Chat)
    return server


def relay_lines(caplog, level: int = logging.INFO) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records
            if r.name.startswith("relaycore.relay") and r.levelno >= level]


def open_servers(relay, server: HubServer) -> int:
    return sum(s.server_id == server.server_id for s in relay.servers_of("chat"))


async def test_relay_logs_one_line_when_an_app_server_connects_and_one_when_it_stops(caplog):
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        relay = await nursery.start(serve_relay, RelayConfig(port=0, access_keys=[KEY]))
        async with app_server(relay.port) as server:
            await wait_for(lambda: open_servers(relay, server) == 5)
            assert relay_lines(caplog) == [
                ("INFO", f"app server {server.server_id} connected to hub chat (default)")]
            caplog.clear()
        await wait_for(lambda: open_servers(relay, server) == 0)
        await wait_for(lambda: relay_lines(caplog))
        assert relay_lines(caplog) == [
            ("INFO", f"app server {server.server_id} left hub chat (it shut down)")]
        nursery.cancel_scope.cancel()


async def test_relay_names_weak_connections_by_name(caplog):
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        relay = await nursery.start(serve_relay, RelayConfig(port=0, access_keys=[KEY]))
        async with app_server(relay.port, WeakServer, connection_count=2) as server:
            await wait_for(lambda: open_servers(relay, server) == 2)
            assert relay_lines(caplog) == [
                ("INFO", f"app server {server.server_id} connected to hub chat (weak)")]
        nursery.cancel_scope.cancel()


async def test_relay_draining_logs_each_app_server_leaving_at_info_without_warnings(caplog):
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        relay = await nursery.start(serve_relay, RelayConfig(port=0, access_keys=[KEY]))
        async with app_server(relay.port) as pod1, app_server(relay.port) as pod2:
            await wait_for(lambda: open_servers(relay, pod1) == open_servers(relay, pod2) == 5)
            caplog.clear()
            await relay.drain()
            await wait_for(lambda: len(relay_lines(caplog)) >= 2)
            assert sorted(relay_lines(caplog)) == sorted([
                ("INFO", f"app server {pod.server_id} left hub chat (The relay is shutting down.)")
                for pod in (pod1, pod2)])
        nursery.cancel_scope.cancel()


async def test_relay_logs_a_lost_app_server_once_as_a_warning_saying_why(caplog):
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        relay = await nursery.start(serve_relay, RelayConfig(port=0, access_keys=[KEY]))
        async with app_server(relay.port, connection_count=3) as server:
            await wait_for(lambda: open_servers(relay, server) == 3)
            caplog.clear()
            relay.inject_fault("drop")
            await wait_for(lambda: open_servers(relay, server) == 0)
            assert relay_lines(caplog, logging.INFO) == [
                ("WARNING", "fault injection: server connections -> drop"),
                ("WARNING", f"app server {server.server_id} disconnected from hub chat: the "
                            "connection dropped without a WebSocket close")]
        nursery.cancel_scope.cancel()


# -- upstream -------------------------------------------------------------------------------


async def test_upstream_posts_log_nothing_at_info_and_one_line_each_at_debug(nursery, connect,
                                                                             caplog):
    upstream = FakeUpstream()
    await nursery.start(upstream.serve)
    relay = await nursery.start(serve_relay, RelayConfig(
        port=0, access_keys=[KEY],
        upstreams=[f"http://127.0.0.1:{upstream.port}/{{hub}}/api/{{category}}/{{event}}"]))
    caplog.set_level(logging.INFO)
    await connect(relay, user="alice")
    await wait_for(lambda: relay.stats.upstream_events_sent == 1)
    assert len(upstream.requests) == 1
    assert [(r.name, r.getMessage()) for r in caplog.records] == []

    # At DEBUG, the relay's own line says what was posted; httpx's line stays out.
    caplog.clear()
    caplog.set_level(logging.DEBUG, logger="relaycore.relay.upstream")
    await connect(relay, user="bob")
    await wait_for(lambda: relay.stats.upstream_events_sent == 2)
    posts = [r.getMessage() for r in caplog.records]
    assert len(posts) == 1, posts
    assert posts[0].startswith(
        f"upstream POST http://127.0.0.1:{upstream.port}/chat/api/connections/connected: 200 in ")

    # The filter is only for the relay's POSTs: the process's other httpx requests still log.
    caplog.clear()
    async with httpx.AsyncClient() as http:
        await http.get(f"http://127.0.0.1:{upstream.port}/elsewhere")
    assert [r.name for r in caplog.records] == ["httpx"]
