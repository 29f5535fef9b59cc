"""Fixtures of the socket-driven relay tests of this folder (the in-memory ones need none)."""

from __future__ import annotations

import pytest
from relaysuite import Rest

from relaycore.relay import RelayConfig, serve_relay
from relayhelpers import KEY


@pytest.fixture
async def relay(nursery):
    """A relay on a free port with short timers and small limits."""
    config = RelayConfig(port=0, access_keys=[KEY], keep_alive_interval=0.3, client_timeout=3,
                         handshake_timeout=1, max_message_size=4096, max_request_body=2048,
                         close_timeout=1)
    return await nursery.start(serve_relay, config)


@pytest.fixture
def rest(relay):
    return Rest(relay)
