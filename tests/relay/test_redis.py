"""Two relay nodes on one private ``redis-server`` (``relay/_redis.py``), in one trio process,
with real clients over sockets: whatever is done on node A reaches the clients of node B
exactly once, as if one node held them all, and nothing comes back to A. Then what Redis going
away does: the nodes keep serving their own clients, buffer within the bound or count what they
drop, and once Redis is back (empty) subscribe again and say again what they hold.
"""

from __future__ import annotations

import time
from typing import Any

import msgpack
import pytest
import trio
from relaysuite import Rest

from redisserver import RedisServer, needs_redis
from relaycore.relay import OutboundMessage, RelayConfig, serve_relay
from relaycore.relay._redis import RedisBackplane, node_name
from relayhelpers import KEY, wait_for

pytestmark = needs_redis

HUB = "chat"


@pytest.fixture
def redis(tmp_path):
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


def node_config(redis: RedisServer, **settings: Any) -> RelayConfig:
    return RelayConfig(port=0, access_keys=[KEY], redis=redis.url, cluster_name="test",
                       close_timeout=1, **settings)


async def start_node(nursery, redis: RedisServer, **settings: Any):
    return await nursery.start(serve_relay, node_config(redis, **settings))


@pytest.fixture
async def nodes(nursery, redis):
    a = await start_node(nursery, redis)
    b = await start_node(nursery, redis)
    await wait_for(lambda: a.backplane.nodes() == [b.backplane.node])
    return a, b


async def open_client(connect, node, user: str | None = None) -> tuple[Any, str]:
    """A client on ``node``, and its connection id (read from the node's table)."""
    shard = node.table.get(HUB)
    before = set(shard.connections) if shard else set()
    client = await connect(node, user=user)
    (connection_id,) = set(node.table.get(HUB).connections) - before
    return client, connection_id


async def received_until_end(client) -> list[tuple[str, list[Any]]]:
    """Every invocation the client gets until an ``end`` one."""
    got = []
    with trio.fail_after(5):
        while True:
            message = await client.next_message()
            if message.get("target") == "end":
                return got
            got.append((message.get("target"), message.get("arguments")))


async def end(rest: Rest) -> None:
    response = await rest.call("POST", f"/api/hubs/{HUB}/:send",
                               json_body={"target": "end", "arguments": []})
    assert response.status_code == 202


async def send(rest: Rest, path: str, n: int) -> None:
    response = await rest.call("POST", f"/api/hubs/{HUB}{path}:send",
                               json_body={"target": "n", "arguments": [n]})
    assert response.status_code == 202, response.text


def test_a_node_id_can_start_a_connection_id():
    node = node_name()
    assert "." not in node and " " not in node and node.count("-") >= 2
    backplane = RedisBackplane("redis://127.0.0.1:1", node="n1")
    assert backplane.connection_id_prefix == "n1."
    assert backplane.owner("n2.abc") == "n2"
    assert backplane.owner("n1.abc") is None and backplane.owner("plain") is None
    with pytest.raises(ValueError):
        RedisBackplane("redis://127.0.0.1:1", node="a.b")


async def test_every_send_on_one_node_reaches_the_clients_of_the_other_once_in_order(
        nodes, connect):
    a, b = nodes
    rest = Rest(a)
    here, here_id = await open_client(connect, a, "alice")
    alice, alice_id = await open_client(connect, b, "alice")
    bob, bob_id = await open_client(connect, b, "bob")
    assert alice_id.startswith(b.backplane.connection_id_prefix)
    for connection_id in (alice_id, bob_id):
        await rest.call("PUT", f"/api/hubs/{HUB}/groups/team/connections/{connection_id}")
    await wait_for(lambda: a.backplane.holds(HUB, "user", "bob")
                   and a.backplane.holds(HUB, "group", "team"))
    await send(rest, "/", 1)
    await send(rest, "/users/alice/", 2)
    await send(rest, f"/connections/{bob_id}/", 3)
    await send(rest, "/groups/team/", 4)
    assert a.ops.send_to_users(HUB, ["alice", "bob"], OutboundMessage.invocation("n", 5)) == 1
    assert a.ops.send_to_groups(HUB, ["team", "nobody"],
                                OutboundMessage.invocation("n", 6)) == 0
    assert a.ops.send_to_connections(HUB, [alice_id, here_id, bob_id],
                                     OutboundMessage.invocation("n", 7)) == 1
    assert a.ops.send_to_all(HUB, OutboundMessage.invocation("n", 8), [bob_id, here_id]) == 0
    assert a.ops.send_to_group(HUB, "team", OutboundMessage.invocation("n", 9), (),
                               ["alice"]) == 0
    await end(rest)
    numbers = {name: [args[0] for _, args in await received_until_end(client)]
               for name, client in (("here", here), ("alice", alice), ("bob", bob))}
    assert numbers == {"here": [1, 2, 5, 7], "alice": [1, 2, 4, 5, 6, 7, 8],
                       "bob": [1, 3, 4, 5, 6, 7, 9]}
    assert a.stats.backplane_received == 0  # nothing of its own came back
    assert b.stats.backplane_published == 0


async def test_a_message_goes_only_to_the_nodes_that_hold_a_target(nursery, redis, connect):
    a, b, c = [await start_node(nursery, redis) for _ in range(3)]
    await wait_for(lambda: len(a.backplane.nodes()) == 2 and len(c.backplane.nodes()) == 2)
    far, far_id = await open_client(connect, b, "bob")
    b.ops.add_connection_to_group(HUB, "g", far_id)
    carol, _ = await open_client(connect, c, "carol")  # a client of the hub, not bob's
    await wait_for(lambda: a.backplane.holds(HUB, "group", "g")
                   and a.backplane.holds(HUB, "user", "carol"))
    rest = Rest(a)
    await send(rest, "/users/bob/", 1)
    await send(rest, f"/connections/{far_id}/", 2)
    await send(rest, "/groups/g/", 3)
    await send(rest, "/users/nobody/", 4)
    await send(rest, "/groups/empty/", 5)
    await send(rest, "/", 6)
    assert [args for _, args in [await received_until_end_or_first(far) for _ in range(4)]] == [
        [1], [2], [3], [6]]
    assert await received_until_end_or_first(carol) == ("n", [6])
    assert c.stats.backplane_received == 1  # the broadcast only: it came after the others
    assert (a.stats.backplane_published, b.stats.backplane_received) == (6, 4)
    assert a.stats.backplane_unrouted == 0


async def test_a_group_join_answered_on_one_node_is_in_force_for_the_next_send(nodes, connect):
    a, b = nodes
    rest = Rest(a)
    far, far_id = await open_client(connect, b, "bob")
    await wait_for(lambda: a.backplane.holds(HUB, "connection", far_id))
    response = await rest.call("PUT", f"/api/hubs/{HUB}/groups/g/connections/{far_id}")
    assert response.status_code == 200
    await send(rest, "/groups/g/", 1)  # at once: B may not hear the group's channel yet
    response = await rest.call("DELETE", f"/api/hubs/{HUB}/groups/g/connections/{far_id}")
    assert response.status_code == 200
    await send(rest, "/groups/g/", 2)
    await end(rest)
    assert await received_until_end(far) == [("n", [1])]
    assert b.table.get(HUB).groups == {}


async def test_a_user_group_membership_reaches_the_users_connections_on_every_node(
        nodes, connect):
    a, b = nodes
    rest = Rest(a)
    bob1, _ = await open_client(connect, b, "bob")
    await wait_for(lambda: a.backplane.holds(HUB, "user", "bob"))
    response = await rest.call("PUT", f"/api/hubs/{HUB}/groups/fans/users/bob",
                               params={"ttl": "60"})
    assert response.is_success
    await send(rest, "/groups/fans/", 1)
    assert await received_until_end_or_first(bob1) == ("n", [1])
    # A later connection of bob, on either node, is in the group too (read from Redis).
    bob2, bob2_id = await open_client(connect, b, "bob")
    bob3, bob3_id = await open_client(connect, a, "bob")
    await wait_for(lambda: "fans" in b.ops.connection(HUB, bob2_id).groups)
    assert "fans" in a.ops.connection(HUB, bob3_id).groups
    await send(rest, "/groups/fans/", 2)
    response = await rest.call("DELETE", f"/api/hubs/{HUB}/groups/fans/users/bob")
    assert response.is_success
    await send(rest, "/groups/fans/", 3)
    await end(rest)
    assert [args for _, args in await received_until_end(bob1)] == [[2]]
    assert [args for _, args in await received_until_end(bob2)] == [[2]]
    assert [args for _, args in await received_until_end(bob3)] == [[2]]


async def test_a_users_first_connection_on_a_node_finds_its_memberships_in_redis(
        nodes, connect, redis):
    a, b = nodes
    rest = Rest(a)
    response = await rest.call("PUT", f"/api/hubs/{HUB}/groups/fans/users/dora",
                               params={"ttl": "60"})
    assert response.is_success
    await rest.call("PUT", f"/api/hubs/{HUB}/groups/gone/users/dora")
    await rest.call("DELETE", f"/api/hubs/{HUB}/groups/gone/users/dora")
    await wait_for(lambda: b"fans" in redis.command("HGETALL", "rc:test:chat:ug:dora"))
    # a membership whose time has passed (its expiry is a wall-clock time)
    redis.command("HSET", "rc:test:chat:ug:dora", "old", str(time.time() - 1))
    # B never heard of dora: its first connection of her reads the hash.
    dora, dora_id = await open_client(connect, b, "dora")
    await wait_for(lambda: b.ops.connection(HUB, dora_id).groups == {"fans"})
    assert b.ops.user_in_group(HUB, "fans", "dora")
    await send(rest, "/groups/fans/", 1)
    await end(rest)
    assert await received_until_end(dora) == [("n", [1])]


async def test_existence_checks_on_one_node_see_what_the_other_holds(nodes, connect):
    a, b = nodes
    rest = Rest(a)
    _, far_id = await open_client(connect, b, "bob")
    b.ops.add_connection_to_group(HUB, "far", far_id)
    await wait_for(lambda: a.backplane.holds(HUB, "group", "far"))
    for path, found in ((f"connections/{far_id}", 200), ("users/bob", 200), ("groups/far", 200),
                        (f"connections/{b.backplane.node}.nope", 404), ("users/nobody", 404),
                        ("groups/near", 404)):
        response = await rest.call("HEAD", f"/api/hubs/{HUB}/{path}")
        assert response.status_code == found, path


async def test_closes_on_one_node_close_the_clients_of_the_other(nodes, connect):
    a, b = nodes
    rest = Rest(a)
    one, one_id = await open_client(connect, b, "u1")
    two, _ = await open_client(connect, b, "u2")
    three, three_id = await open_client(connect, b, "u3")
    b.ops.add_connection_to_group(HUB, "g", three_id)
    await wait_for(lambda: a.backplane.holds(HUB, "connection", one_id)
                   and a.backplane.holds(HUB, "group", "g"))
    response = await rest.call("DELETE", f"/api/hubs/{HUB}/connections/{one_id}",
                               params={"reason": "moved"})
    assert response.status_code == 200
    response = await rest.call("POST", f"/api/hubs/{HUB}/users/u2/:closeConnections")
    assert response.status_code == 204
    response = await rest.call("POST", f"/api/hubs/{HUB}/groups/g/:closeConnections")
    assert response.status_code == 204
    for client in (one, two, three):
        with trio.fail_after(5):
            message = await client.next_message()
        assert message["type"] == 7 and message["allowReconnect"] is True
    await wait_for(lambda: b.table.get(HUB) is None)
    await wait_for(lambda: not a.backplane.holds(HUB, "connection", one_id))
    response = await rest.call("HEAD", f"/api/hubs/{HUB}/connections/{one_id}")
    assert response.status_code == 404


async def test_a_node_that_stops_is_forgotten_at_once(nursery, redis, connect):
    a = await start_node(nursery, redis)
    with trio.CancelScope() as b_scope:
        async with trio.open_nursery() as b_nursery:
            b = await start_node(b_nursery, redis)
            _, far_id = await open_client(connect, b, "bob")
            await wait_for(lambda: a.backplane.holds(HUB, "connection", far_id))
            b_scope.cancel()
    await wait_for(lambda: a.backplane.nodes() == [])
    assert not a.backplane.holds(HUB, "user", "bob")


async def test_a_node_that_dies_is_forgotten_when_its_heartbeat_expires(nursery, redis):
    a = await start_node(nursery, redis)
    a.backplane.heartbeat = 0.05
    ghost = "ghost-1-1"
    redis.command("SET", f"rc:test:alive:{ghost}", "1", "PX", "150")
    a.backplane._on_presence(b"p" + msgpack.packb(
        ["s", ghost, [[HUB, "user", "casper"]]]))
    assert a.backplane.holds(HUB, "user", "casper")
    await wait_for(lambda: a.stats.backplane_nodes_gone == 1)
    assert not a.backplane.holds(HUB, "user", "casper")


# -- Redis goes away ----------------------------------------------------------------------------


async def test_while_redis_restarts_the_nodes_serve_their_clients_then_rejoin(
        nursery, redis, connect):
    a = await start_node(nursery, redis, backplane_buffer_time=30)
    b = await start_node(nursery, redis, backplane_buffer_time=30)
    rest = Rest(a)
    here = await connect(a, "local", "alice")  # A's own client, of another hub
    far, far_id = await open_client(connect, b, "bob")
    b.ops.add_connection_to_group(HUB, "g", far_id)
    a.ops.add_user_to_group(HUB, "fans", "bob", ttl=600)
    await wait_for(lambda: a.backplane.holds(HUB, "group", "g")
                   and a.backplane.holds(HUB, "group", "fans"))
    redis.kill()
    await wait_for(lambda: not a.backplane.commands.connected
                   and not b.backplane.subscriber.connected)
    await send(rest, "/", 1)  # for B's client once Redis is back
    response = await rest.call("POST", "/api/hubs/local/:send",
                               json_body={"target": "n", "arguments": [0]})
    assert response.status_code == 202
    assert await received_until_end_or_first(here) == ("n", [0])  # A serves its own at once
    redis.start()
    await wait_for(lambda: b.stats.backplane_resubscribes >= 1
                   and a.stats.backplane_resubscribes >= 1)
    # Redis came back empty: the nodes said again what they hold and the memberships.
    await wait_for(lambda: a.backplane.holds(HUB, "group", "g"))
    await wait_for(lambda: b"fans" in redis.command("HGETALL", "rc:test:chat:ug:bob"))
    await send(rest, "/groups/g/", 2)
    await send(rest, "/groups/fans/", 3)
    await end(rest)
    got = [args for _, args in await received_until_end(far)]
    # The broadcast buffered on A was delivered, or (A's connection came back before B
    # subscribed again) counted as reaching fewer nodes than A knew held a connection (A
    # itself holds no connection of the hub: it is not one of the receivers Redis counts).
    assert got == [[1], [2], [3]] or (got == [[2], [3]] and a.stats.backplane_unrouted == 1)
    assert a.stats.backplane_dropped == 0 and a.stats.backplane_disconnects >= 2
    assert b.stats.backplane_disconnects >= 2


async def received_until_end_or_first(client) -> tuple[str, list[Any]]:
    with trio.fail_after(5):
        message = await client.next_message()
    return message["target"], message["arguments"]


async def test_past_the_buffers_time_what_could_not_be_published_is_counted(
        nursery, redis, connect):
    a = await start_node(nursery, redis, backplane_buffer_time=0.2)
    b = await start_node(nursery, redis)
    far, _ = await open_client(connect, b, "bob")
    await wait_for(lambda: a.backplane.holds(HUB, "user", "bob"))
    redis.kill()
    await wait_for(lambda: not a.backplane.commands.connected)
    assert a.ops.send_to_user(HUB, "bob", OutboundMessage.invocation("n", 1)) == 0
    assert a.ops.send_to_all(HUB, OutboundMessage.invocation("n", 2)) == 0
    await wait_for(lambda: a.stats.backplane_dropped == 2)
    redis.start()
    await wait_for(lambda: a.backplane.commands.connected and b.backplane.subscriber.connected
                   and a.backplane.holds(HUB, "user", "bob"))
    await end(Rest(a))
    assert await received_until_end(far) == []
    assert a.stats.backplane_published == 3


async def test_a_subscriber_cut_off_by_redis_is_counted_and_hears_again(nodes, connect):
    a, b = nodes
    far, _ = await open_client(connect, b, "bob")
    await wait_for(lambda: a.backplane.holds(HUB, "user", "bob"))
    # What Redis does to a subscriber past its output buffer limit (a stalled node).
    b.backplane.commands.send(("CLIENT", "KILL", "TYPE", "pubsub"))
    await wait_for(lambda: b.stats.backplane_resubscribes == 1)
    await wait_for(lambda: a.backplane.nodes() == [b.backplane.node]
                   and a.stats.backplane_resubscribes == 1)
    await b.backplane.subscriber.barrier()
    await send(Rest(a), "/users/bob/", 1)
    await end(Rest(a))
    assert await received_until_end(far) == [("n", [1])]


async def test_a_message_a_node_cannot_read_is_logged_and_the_node_carries_on(
        nodes, connect, redis, caplog):
    a, b = nodes
    far, _ = await open_client(connect, b, "bob")
    await wait_for(lambda: a.backplane.holds(HUB, "user", "bob"))
    inbox = f"rc:test:n:{b.backplane.node}"
    for garbage in ("o", "ox 1 chat\nnot a frame", "p\xc1", "?"):
        assert redis.command("PUBLISH", inbox, garbage) == b":1\r\n"
    await send(Rest(a), "/users/bob/", 1)
    assert await received_until_end_or_first(far) == ("n", [1])
    assert "could not be handled" in caplog.text


# -- settings -----------------------------------------------------------------------------------


def test_the_cluster_settings_come_from_the_file_the_environment_and_the_flags(tmp_path):
    from relaycore.__main__ import build_parser

    toml = tmp_path / "relay.toml"
    toml.write_text('redis = "unix:///run/r.sock?db=2"\ncluster_name = "blue"\n')
    config = RelayConfig.load(toml_path=str(toml), env={})
    assert (config.redis, config.cluster_name) == ("unix:///run/r.sock?db=2", "blue")
    config = RelayConfig.load(env={"RELAYCORE_REDIS": "redis://r:6379/1",
                                   "RELAYCORE_BACKPLANE_BUFFER_TIME": "0.5"})
    assert (config.redis, config.backplane_buffer_time) == ("redis://r:6379/1", 0.5)
    assert RelayConfig().redis is None  # one node, in memory
    args = build_parser().parse_args(["serve", "--redis", "redis://h/0", "--cluster-name", "c"])
    assert (args.redis, args.cluster_name) == ("redis://h/0", "c")
    for bad in ({"redis": "http://h"}, {"cluster_name": "a b"}, {"cluster_name": ""},
                {"backplane_buffer_time": -1}):
        with pytest.raises(ValueError):
            RelayConfig(**bad)


def test_a_relay_with_redis_in_its_settings_is_a_node_of_the_cluster():
    from relaycore.relay._relay import Relay

    relay = Relay(RelayConfig(redis="redis://127.0.0.1:1/0", cluster_name="blue"))
    assert isinstance(relay.backplane, RedisBackplane)
    assert relay.backplane.stats is relay.stats
    assert relay.ops.instance_id == relay.backplane.node
    assert relay.ops.new_connection_id().startswith(relay.backplane.node + ".")
    assert str(relay.backplane).startswith("blue on redis://127.0.0.1:1 as node ")
