"""Fixtures shared by the in-process relay tests."""

from __future__ import annotations

import json

import pytest
import trio
from trio_websocket import connect_websocket_url

from relayhelpers import RS, Client, client_token


@pytest.fixture
async def connect(nursery):
    """Open a SignalR client (handshake done) whose socket lives as long as the test."""
    opened = []

    async def connect(relay, hub="chat", user=None, *, protocol="json", handshake=True):
        url = (f"ws://127.0.0.1:{relay.port}/client/?hub={hub}"
               f"&access_token={client_token(hub, user)}")
        ws = await connect_websocket_url(nursery, url)
        opened.append(ws)
        if not handshake:
            return ws
        await ws.send_message(json.dumps({"protocol": protocol, "version": 1}) + RS)
        with trio.fail_after(3):
            reply = await ws.get_message()
        assert reply in ("{}" + RS, b"{}" + RS.encode())
        return Client(ws)

    yield connect
    for ws in opened:
        with trio.move_on_after(1):
            await ws.aclose()
        await ws._stream.aclose()
