"""A client of a node where its hub has no app server is served by an app server of another
node (``RemoteServer`` on the client's node, ``ForwardedClient`` on the app server's): its
open, handshake, messages and close reach the app server through the other node's inbox, and
what the app server sends comes back; the app server closing it, or its node going away,
closes the client. Two relay nodes on one private ``redis-server``, a real client over a
socket, a recording app server.
"""

from __future__ import annotations

import pytest
import trio
from relayfakes import FakeServer
from test_redis import HUB, start_node
from trio_websocket import ConnectionClosed

from redisserver import RedisServer, needs_redis
from relaycore.protocol import _service as service
from relayhelpers import wait_for

pytestmark = needs_redis

RS = "\x1e"


@pytest.fixture
def redis(tmp_path):
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


async def app_on_a(nursery, redis):
    """Node A (which can be stopped) with an app server, and node B without one."""
    async def run_a(task_status=trio.TASK_STATUS_IGNORED):
        async with trio.open_nursery() as own:
            task_status.started((await start_node(own, redis), own.cancel_scope))

    a, a_scope = await nursery.start(run_a)
    b = await start_node(nursery, redis)
    await wait_for(lambda: a.backplane.nodes() == [b.backplane.node])
    app = FakeServer("app")
    a.ops.server_opened(app)
    await wait_for(lambda: b.backplane.holds(HUB, "server", ""))
    return a, b, app, a_scope


async def open_forwarded(connect, b, app):
    """A client of B whose handshake the app server on A answers; (client, its id, proxy)."""
    ws = await connect(b, user="bob", handshake=False)
    await ws.send_message('{"protocol":"json","version":1}' + RS)
    await wait_for(lambda: bool(app.events))
    (kind, client_id, handshake), = app.events
    assert kind == "opened" and b'"protocol":"json"' in handshake
    assert client_id.startswith(b.backplane.connection_id_prefix)
    proxy = app.clients[client_id]
    assert proxy.claims.get("asrs.s.uid") == "bob" or "bob" in str(proxy.claims)
    proxy.server_data(b"{}" + RS.encode())  # the app server's hub answers the handshake
    with trio.fail_after(5):
        assert await ws.get_message() == "{}" + RS
    return ws, client_id, proxy


async def test_a_client_is_served_by_an_app_server_of_another_node(nursery, redis, connect):
    a, b, app, _ = await app_on_a(nursery, redis)
    ws, client_id, proxy = await open_forwarded(connect, b, app)
    await ws.send_message('{"type":1,"target":"hi","arguments":[]}' + RS)
    await wait_for(lambda: len(app.events) == 2)
    assert app.events[1][:2] == ("data", client_id) and b'"hi"' in app.events[1][2]
    proxy.server_data(b'{"type":1,"target":"hello","arguments":[1]}' + RS.encode())
    with trio.fail_after(5):
        assert '"hello"' in await ws.get_message()
    await ws.aclose()
    await wait_for(lambda: app.events[-1][0] == "closed")
    assert app.events[-1][1] == client_id
    await wait_for(lambda: not a.ops.forwarded and not b.ops.served_elsewhere)


async def test_the_app_server_closing_a_forwarded_client_closes_it(nursery, redis, connect):
    a, b, app, _ = await app_on_a(nursery, redis)
    ws, _client_id, proxy = await open_forwarded(connect, b, app)
    proxy.close_from_server("bye")
    with pytest.raises(ConnectionClosed), trio.fail_after(5):
        while True:
            await ws.get_message()
    await wait_for(lambda: not a.ops.forwarded and not b.ops.served_elsewhere)


async def test_the_app_servers_node_going_away_closes_its_forwarded_clients(
        nursery, redis, connect):
    _a, b, app, a_scope = await app_on_a(nursery, redis)
    ws, _client_id, _proxy = await open_forwarded(connect, b, app)
    a_scope.cancel()  # A stops and says goodbye
    got = []
    with pytest.raises(ConnectionClosed), trio.fail_after(10):
        while True:
            got.append(await ws.get_message())
    assert any('"allowReconnect":true' in m for m in got), got
    assert not b.ops.served_elsewhere


async def test_a_forwarded_clients_app_server_answers_a_client_invocation(
        nursery, redis, connect):
    """A caller on B invokes B's client, which the app server on A serves: the app server is
    told (it owns the client), and its completion comes back to the caller on B."""
    a, b, app, _ = await app_on_a(nursery, redis)
    caller = FakeServer("caller", carries_clients=False)
    b.ops.server_opened(caller)
    _ws, client_id, _proxy = await open_forwarded(connect, b, app)
    b.ops.invocations.invoke(caller, service.ClientInvocationMessage(
        "inv1", client_id, "caller", {"json": b'{"type":1,"invocationId":"inv1",'
                                              b'"target":"ask","arguments":[]}' + RS.encode()}))
    await wait_for(lambda: any(isinstance(m, service.ClientInvocationMessage) for m in app.sent))
    done = service.ClientCompletionMessage("inv1", client_id, "caller", "json", b"{}")
    a.ops.invocations.complete(app, done)
    await wait_for(lambda: done in caller.sent)
    assert b.ops.invocations.pending == {}
