"""What the SDK logs about its server connections: one line per event of an endpoint, not one
per server connection (``_connection``, "What is logged").

The real relay runs in-process (trio); the log is captured and its lines counted.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from sdkhelpers import KEY, connection_string, wait_for

from relaycore.relay import RelayConfig, serve_relay
from relaycore.sdk import Hub, HubServer, ServiceOptions


class Chat(Hub):
    async def add(self, a, b):
        return a + b


def app_server(port: int, **overrides: Any) -> HubServer:
    settings: dict[str, Any] = dict(connection_string=connection_string(port))
    settings.update(overrides)
    server = HubServer(ServiceOptions(**settings))
    server.map_hub("chat", Chat)
    return server


def sdk_lines(caplog, level: int = logging.INFO) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records
            if r.name == "relaycore.sdk" and r.levelno >= level]


def slots(server: HubServer) -> list:
    return server._dispatcher("chat").containers[0].connections


async def test_sdk_connecting_five_server_connections_logs_one_line_and_stopping_one(caplog):
    caplog.set_level(logging.DEBUG, logger="relaycore.sdk")
    async with trio.open_nursery() as nursery:
        relay = await nursery.start(serve_relay, RelayConfig(port=0, access_keys=[KEY]))
        async with app_server(relay.port) as server:
            assert all(c.connected for c in slots(server))
            endpoint = server.endpoints[0]
            assert sdk_lines(caplog) == [(
                "INFO", f"app server {server.server_id} connected to hub chat on {endpoint}: "
                        "5 server connections (default)")]
            caplog.clear()
        nursery.cancel_scope.cancel()
    assert sdk_lines(caplog) == [
        ("INFO", f"app server {server.server_id} stopped: 5 server connections closed")]


async def test_sdk_relay_draining_logs_one_info_line_and_no_warning(caplog):
    caplog.set_level(logging.DEBUG, logger="relaycore.sdk")
    async with trio.open_nursery() as nursery:
        relay = await nursery.start(serve_relay, RelayConfig(port=0, access_keys=[KEY]))
        # Two quick retries, then a long wait: the reconnects the draining relay refuses
        # (503) are seen, and the ERROR threshold is not reached within the test.
        server = app_server(relay.port, retry_delay=lambda n: 0.05 if n < 2 else 60)
        async with server:
            caplog.clear()
            await relay.drain()
            await wait_for(lambda: all(c.failures >= 3 for c in slots(server)))
            assert sdk_lines(caplog) == [(
                "INFO", f"hub chat: the server connections to {server.endpoints[0]} were closed "
                        "by the service (WebSocket closed with code 1001: The relay is shutting "
                        "down.); reconnecting")]
        nursery.cancel_scope.cancel()
    assert not sdk_lines(caplog, logging.WARNING)


async def test_sdk_relay_lost_logs_one_warning_with_why(caplog):
    caplog.set_level(logging.DEBUG, logger="relaycore.sdk")
    async with trio.open_nursery() as nursery:
        relay = await nursery.start(serve_relay, RelayConfig(port=0, access_keys=[KEY]))
        server = app_server(relay.port, retry_delay=lambda n: 0.05 if n < 1 else 60)
        async with server:
            caplog.clear()
            relay.inject_fault("drop")  # every server connection vanishes without a goodbye
            await wait_for(lambda: all(c.failures >= 2 for c in slots(server)))
            lines = sdk_lines(caplog)
            assert lines == [(
                "WARNING", f"hub chat: the server connections to {server.endpoints[0]} were "
                           "lost (WebSocket closed with code 1006); reconnecting")], lines
        nursery.cancel_scope.cancel()
