"""An app server whose access key the relay does not accept fails loudly, once.

The real relay runs in-process (trio) with key A; the app server is configured with key B, so
every server-connection upgrade is answered 401 with the relay's reason. The SDK logs that
reason once at WARNING, once at ERROR after ``_ERROR_AFTER`` failed attempts in a row, then at
most one ERROR per ``_REMIND_EVERY`` (not one line per attempt); its negotiate answers 503 with
a body that says the connections are refused and why. A corrected key brings it up again.
"""

from __future__ import annotations

import logging
from itertools import pairwise
from typing import Any

import httpx
import pytest
import trio
from sdkhelpers import connection_string, wait_for

from relaycore.relay import RelayConfig, serve_relay
from relaycore.sdk import (
    Hub,
    HubServer,
    ServiceEndpoint,
    ServiceOptions,
    ServiceUnavailableError,
    _connection,
)

KEY_A = "relay-key-A-0123456789abcdef"
KEY_B = "wrong-key-B-0123456789abcdef"


class Chat(Hub):
    async def add(self, a, b):
        return a + b


def app_server(port: int, key: str, **overrides: Any) -> HubServer:
    settings: dict[str, Any] = dict(connection_string=connection_string(port, key),
                                    connection_count=2, retry_delay=lambda n: 0.01)
    settings.update(overrides)
    server = HubServer(ServiceOptions(**settings))
    server.map_hub("chat", Chat)
    return server


def sdk_records(caplog, level: int = logging.WARNING) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "relaycore.sdk" and r.levelno >= level]


def failures(server: HubServer) -> list[int]:
    return [c.failures for c in server._dispatcher("chat").containers[0].connections]


async def negotiate(server: HubServer) -> httpx.Response:
    transport = httpx.ASGITransport(app=server.asgi(), root_path="/hubs")
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
        return await http.post("/hubs/chat/negotiate", params={"negotiateVersion": "1"})


async def test_wrong_access_key_warns_once_then_errors_once_with_the_relays_401_reason(caplog):
    caplog.set_level(logging.DEBUG, logger="relaycore.sdk")
    async with trio.open_nursery() as nursery:
        relay = await nursery.start(serve_relay, RelayConfig(port=0, access_keys=[KEY_A]))
        async with app_server(relay.port, KEY_B) as server:
            # Every slot fails again and again: far past the ERROR threshold (5 in a row).
            await wait_for(lambda: min(failures(server)) >= 15)
            assert server.online_endpoints("chat") == []
        nursery.cancel_scope.cancel()
    loud = sdk_records(caplog)
    assert [r.levelname for r in loud] == ["WARNING", "ERROR"], [r.getMessage() for r in loud]
    warning, error = (r.getMessage() for r in loud)
    for message in (warning, error):
        assert f"the relay at http://127.0.0.1:{relay.port} refuses this app server's " \
               "connections: HTTP 401 Unauthorized.bad_signature: The access token's " \
               "signature (HS256) does not match" in message, message
        assert "check the access key (AccessKey in the connection string)" in message
    assert "(5 failed attempts in a row); still retrying" in error
    # Stopping is one INFO line, and nothing louder.
    assert [r.getMessage() for r in sdk_records(caplog, logging.INFO) if r.levelno == logging.INFO
            ] == [f"app server {server.server_id} stopped: 0 server connections closed"]


async def test_wrong_access_key_repeats_its_error_at_most_once_per_interval(caplog, monkeypatch):
    monkeypatch.setattr(_connection, "_REMIND_EVERY", 0.5, raising=False)
    caplog.set_level(logging.INFO, logger="relaycore.sdk")
    async with trio.open_nursery() as nursery:
        relay = await nursery.start(serve_relay, RelayConfig(port=0, access_keys=[KEY_A]))
        async with app_server(relay.port, KEY_B):
            await wait_for(lambda: len(sdk_records(caplog, logging.ERROR)) >= 3)
        nursery.cancel_scope.cancel()
    errors = sdk_records(caplog, logging.ERROR)
    gaps = [later.created - earlier.created for earlier, later in pairwise(errors)]
    assert all(gap >= 0.5 for gap in gaps), gaps
    assert len(sdk_records(caplog)) == len(errors) + 1  # and the one WARNING


async def test_negotiate_with_a_refused_key_answers_503_saying_why(caplog):
    async with trio.open_nursery() as nursery:
        relay = await nursery.start(serve_relay, RelayConfig(port=0, access_keys=[KEY_A]))
        async with app_server(relay.port, KEY_B) as server:
            response = await negotiate(server)
            assert response.status_code == 503
            error = response.json()["error"]
            assert error.startswith(
                f"the relay at http://127.0.0.1:{relay.port} refuses this app server's "
                "connections: HTTP 401 Unauthorized.bad_signature: "), error
            assert error.endswith("; check the access key (AccessKey in the connection string)")
            assert "not connected yet" not in error
            with pytest.raises(ServiceUnavailableError, match="refuses this app server's"):
                await server.negotiate("chat")
            with pytest.raises(ServiceUnavailableError, match="HTTP 401"):
                await server.hub_context("chat").clients.all.send("hello")
        nursery.cancel_scope.cancel()


async def test_corrected_key_connects_and_says_after_how_many_failures(caplog):
    caplog.set_level(logging.INFO, logger="relaycore.sdk")
    async with trio.open_nursery() as nursery:
        relay = await nursery.start(serve_relay, RelayConfig(port=0, access_keys=[KEY_A]))
        async with app_server(relay.port, KEY_B) as server:
            await wait_for(lambda: sdk_records(caplog))
            await server.set_endpoints([ServiceEndpoint(connection_string(relay.port, KEY_A))])
            with trio.fail_after(5):
                await server.wait_online("chat")
            await wait_for(lambda: any("connected to hub chat" in r.getMessage()
                                       for r in caplog.records))
            assert (await negotiate(server)).status_code == 200
        nursery.cancel_scope.cancel()
    connected = [r.getMessage() for r in caplog.records if "connected to hub" in r.getMessage()]
    assert len(connected) == 1, connected
    assert connected[0].startswith(f"app server {server.server_id} connected to hub chat on ")
    assert ": 2 server connections (default), after " in connected[0]
    assert connected[0].endswith(" failed attempts")
