"""Client results across relay nodes on one private ``redis-server``: an app server connected
to node A invokes a client of node B; the client gets it, its owner app server (on B) is told,
and the completion comes back to the caller on A. Every other end reaches the caller too: the
client leaving, and node B going away, fail the invocation at once rather than leave it
waiting ten minutes; a caller's own cleanup on A reaches B.
"""

from __future__ import annotations

import pytest
import trio
from relayfakes import FakeServer
from test_redis import HUB, open_client, start_node

from redisserver import RedisServer, needs_redis
from relaycore.protocol import _service as service
from relayhelpers import wait_for

pytestmark = needs_redis

#: What the caller asks the client, as the JSON hub protocol writes it.
INVOCATION = b'{"type":1,"invocationId":"inv1","target":"ask","arguments":[]}\x1e'


@pytest.fixture
def redis(tmp_path):
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


def invocation(connection_id: str, invocation_id: str = "inv1"
               ) -> service.ClientInvocationMessage:
    return service.ClientInvocationMessage(invocation_id, connection_id, "caller",
                                           {"json": INVOCATION})


async def two_nodes(nursery, redis):
    """Nodes A (with the caller app server) and B (with the client's owner app server)."""
    async def run_b(task_status=trio.TASK_STATUS_IGNORED):
        async with trio.open_nursery() as own:  # B alone can be stopped
            task_status.started((await start_node(own, redis), own.cancel_scope))

    a = await start_node(nursery, redis)
    b, b_scope = await nursery.start(run_b)
    await wait_for(lambda: a.backplane.nodes() == [b.backplane.node])
    # neither takes clients: B's client is served by B itself (the test names its owner)
    caller = FakeServer("caller", carries_clients=False)
    owner = FakeServer("owner", carries_clients=False)
    a.ops.server_opened(caller)
    b.ops.server_opened(owner)
    return a, b, caller, owner, b_scope


async def test_a_caller_on_one_node_gets_the_result_of_a_client_on_another(
        nursery, redis, connect):
    a, b, caller, owner, _ = await two_nodes(nursery, redis)
    client, client_id = await open_client(connect, b, "bob")
    await wait_for(lambda: a.backplane.holds(HUB, "connection", client_id))
    b.ops.connection(HUB, client_id).server = owner  # as if the owner app server took it
    a.ops.invocations.invoke(caller, invocation(client_id))
    with trio.fail_after(5):
        message = await client.next_message()
    assert (message["target"], message["invocationId"]) == ("ask", "inv1")
    # The client's owner app server is told, so that it routes the client's completion.
    await wait_for(lambda: any(isinstance(m, service.ClientInvocationMessage) for m in owner.sent))
    assert "inv1" in a.ops.invocations.pending and "inv1" in b.ops.invocations.pending
    done = service.ClientCompletionMessage("inv1", client_id, "caller", "json",
                                           b'{"type":3,"invocationId":"inv1","result":42}\x1e')
    b.ops.invocations.complete(owner, done)
    await wait_for(lambda: done in caller.sent)
    assert a.ops.invocations.pending == {} and b.ops.invocations.pending == {}
    assert b.backplane._invoked_by == {}


async def test_a_client_that_leaves_its_node_fails_the_invocations_of_a_remote_caller(
        nursery, redis, connect):
    a, b, caller, _owner, _ = await two_nodes(nursery, redis)
    client, client_id = await open_client(connect, b, "bob")
    await wait_for(lambda: a.backplane.holds(HUB, "connection", client_id))
    a.ops.invocations.invoke(caller, invocation(client_id))
    await wait_for(lambda: "inv1" in b.ops.invocations.pending)
    await client.ws.aclose()
    await wait_for(lambda: any(isinstance(m, service.ErrorCompletionMessage) for m in caller.sent))
    (error,) = caller.sent
    assert error.invocation_id == "inv1" and "disconnected" in error.error
    assert a.ops.invocations.pending == {}


async def test_a_node_that_goes_away_fails_the_invocations_waiting_on_its_clients(
        nursery, redis, connect):
    a, b, caller, _owner, b_scope = await two_nodes(nursery, redis)
    _client, client_id = await open_client(connect, b, "bob")
    await wait_for(lambda: a.backplane.holds(HUB, "connection", client_id))
    a.ops.invocations.invoke(caller, invocation(client_id))
    await wait_for(lambda: "inv1" in b.ops.invocations.pending)
    b_scope.cancel()  # B stops and says goodbye
    await wait_for(lambda: bool(caller.sent))
    (error,) = caller.sent
    assert isinstance(error, service.ErrorCompletionMessage)
    assert error.invocation_id == "inv1" and "went away" in error.error
    assert a.ops.invocations.pending == {}


async def test_a_callers_cleanup_on_its_node_reaches_the_clients_node(nursery, redis, connect):
    a, b, caller, _owner, _ = await two_nodes(nursery, redis)
    _client, client_id = await open_client(connect, b, "bob")
    await wait_for(lambda: a.backplane.holds(HUB, "connection", client_id))
    a.ops.invocations.invoke(caller, invocation(client_id))
    await wait_for(lambda: "inv1" in b.ops.invocations.pending)
    a.ops.invocations.complete(caller, service.ClientCompletionMessage(
        "inv1", client_id, "caller", "json", b"{}"))
    await wait_for(lambda: b.ops.invocations.pending == {})
    assert a.ops.invocations.pending == {} and caller.sent == []


async def test_an_invocation_for_a_client_no_node_holds_fails_at_once(nursery, redis):
    a, _b, caller, _owner, _ = await two_nodes(nursery, redis)
    a.ops.invocations.invoke(caller, invocation("nobody.xyz"))
    (error,) = caller.sent
    assert "does not exist" in error.error and a.ops.invocations.pending == {}
