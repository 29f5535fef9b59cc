"""A negotiate answered by node A and the WebSocket that follows accepted by node B (two nodes
on one private ``redis-server``, real sockets): B holds the client under the id A gave it, and
an operation on that id through A reaches it on B.
"""

from __future__ import annotations

import json

import httpx
import pytest
import trio
from test_redis import HUB, start_node
from trio_websocket import connect_websocket_url

from redisserver import RedisServer, needs_redis
from relaycore.relay import OutboundMessage
from relayhelpers import RS, Client, client_token, wait_for

pytestmark = needs_redis


@pytest.fixture
def redis(tmp_path):
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


async def test_a_client_negotiated_on_one_node_is_held_by_another_under_its_id(
        nursery, redis):
    a = await start_node(nursery, redis)
    b = await start_node(nursery, redis)
    await wait_for(lambda: a.backplane.nodes() == [b.backplane.node])
    async with httpx.AsyncClient() as http:
        answer = await http.post(
            f"http://127.0.0.1:{a.port}/client/negotiate?hub={HUB}&negotiateVersion=1",
            headers={"Authorization": f"Bearer {client_token(HUB, 'bob')}"})
    body = answer.json()
    connection_id, token = body["connectionId"], body["connectionToken"]
    assert connection_id.startswith(a.backplane.connection_id_prefix)
    ws = await connect_websocket_url(
        nursery, f"ws://127.0.0.1:{b.port}/client/?hub={HUB}&id={token}"
                 f"&access_token={client_token(HUB, 'bob')}")
    try:
        await ws.send_message(json.dumps({"protocol": "json", "version": 1}) + RS)
        with trio.fail_after(5):
            assert await ws.get_message() == "{}" + RS
        assert b.ops.connection(HUB, connection_id) is not None
        assert a.ops.connection(HUB, connection_id) is None
        await wait_for(lambda: a.backplane.holds(HUB, "connection", connection_id))
        a.ops.send_to_connection(HUB, connection_id, OutboundMessage.invocation("n", 1))
        assert a.ops.add_connection_to_group(HUB, "team", connection_id)
        await wait_for(lambda: "team" in b.ops.connection(HUB, connection_id).groups)
        client = Client(ws)
        with trio.fail_after(5):
            message = await client.next_message()
        assert (message["target"], message["arguments"]) == ("n", [1])
        # The token was spent on B: a second WebSocket with it is refused there.
        async with httpx.AsyncClient() as http:
            again = await http.get(
                f"http://127.0.0.1:{b.port}/client/?hub={HUB}&id={token}",
                headers={"Authorization": f"Bearer {client_token(HUB, 'bob')}",
                         "Accept": "text/event-stream"})
        assert again.status_code == 404
    finally:
        await ws.aclose()
