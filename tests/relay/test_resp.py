"""The backplane's Redis client (``relay/_resp.py``) against a private ``redis-server``: commands
answered in order from a pipelined connection, subscriptions in force after ``barrier``, and
what a lost Redis does: commands wait within the buffer's bound then are dropped and counted,
written ones fail, both connections come back by themselves and subscribe again.
"""

from __future__ import annotations

import functools

import pytest
import trio

from redisserver import RedisServer, needs_redis
from relaycore.relay._resp import (
    Dropped,
    RedisAddress,
    RedisCommands,
    RedisError,
    RedisSubscriber,
    RedisUnavailable,
)
from relayhelpers import wait_for

pytestmark = needs_redis


@pytest.fixture
def redis(tmp_path):
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def redis_tcp(tmp_path):
    server = RedisServer(tmp_path, tcp=True).start()
    yield server
    server.stop()


async def start_commands(nursery, url, **kwargs) -> RedisCommands:
    commands = RedisCommands(url, **kwargs)
    await nursery.start(commands.run)
    with trio.fail_after(5):
        await commands.wait_connected()
    return commands


async def start_subscriber(nursery, url, **kwargs) -> tuple[RedisSubscriber, list]:
    got: list[tuple[bytes, bytes]] = []
    subscriber = RedisSubscriber(url, lambda channel, data: got.append((channel, data)),
                                 **kwargs)
    await nursery.start(subscriber.run)
    with trio.fail_after(5):
        await subscriber.wait_connected()
    return subscriber, got


def test_a_redis_url_names_a_host_and_port_or_a_socket_and_a_database():
    assert RedisAddress.parse("redis://10.0.0.5:6380/2") == RedisAddress("10.0.0.5", 6380, db=2)
    assert RedisAddress.parse("redis://:s%40cret@cache") == RedisAddress(
        "cache", 6379, password="s@cret")
    assert RedisAddress.parse("redis://me:pw@cache/1").greeting() == [
        ("AUTH", "me", "pw"), ("SELECT", 1)]
    assert RedisAddress.parse("unix:///run/redis.sock?db=3") == RedisAddress(
        path="/run/redis.sock", db=3)
    assert str(RedisAddress.parse("redis://h:1/0")) == "redis://h:1"
    for bad in ("http://h", "redis://", "redis://h/x", "unix://"):
        with pytest.raises(ValueError, match="Redis URL"):
            RedisAddress.parse(bad)


async def test_commands_are_answered_in_order_and_an_error_reply_raises(nursery, redis_tcp):
    commands = await start_commands(nursery, redis_tcp.url)
    assert await commands.call("SET", "k", "v") == b"OK"
    assert await commands.call("GET", "k") == b"v"
    with pytest.raises(RedisError, match="WRONGTYPE"):
        await commands.call("HGET", "k", "f")
    replies = await commands.call_many([("INCR", "n"), ("INCR", "k"), ("INCR", "n")])
    assert replies[0] == 1 and isinstance(replies[1], RedisError) and replies[2] == 2


async def test_sends_from_one_round_go_out_in_one_batch_and_every_reply_comes(nursery, redis):
    commands = await start_commands(nursery, redis.url)
    subscriber, got = await start_subscriber(nursery, redis.url)
    subscriber.subscribe(b"ch")
    await subscriber.barrier()
    receivers: list[int] = []
    for i in range(1000):  # no await: the writer task sends them when this task yields
        assert commands.send(("PUBLISH", "ch", str(i)), receivers.append)
    assert len(commands._out) > 1000 * 20  # all waiting in the buffer, none written yet
    await wait_for(lambda: len(got) == 1000)
    assert [int(data) for _, data in got] == list(range(1000))
    assert receivers == [1] * 1000


async def test_a_subscription_is_in_force_after_barrier_and_ends_with_unsubscribe(nursery, redis):
    commands = await start_commands(nursery, redis.url)
    subscriber, got = await start_subscriber(nursery, redis.url)
    await subscriber.barrier()  # answered before any subscription too
    subscriber.subscribe(b"a", b"b")
    await subscriber.barrier()
    assert await commands.call("PUBLISH", "a", "1") == 1
    subscriber.unsubscribe(b"a")
    await subscriber.barrier()
    assert await commands.call("PUBLISH", "a", "2") == 0
    assert await commands.call("PUBLISH", "b", "3") == 1
    await wait_for(lambda: len(got) == 2)
    assert got == [(b"a", b"1"), (b"b", b"3")]
    assert subscriber.channels == {b"b"}


async def test_after_a_redis_restart_both_connections_return_and_subscribe_again(
        nursery, redis):
    subscribed = []

    async def on_subscribed() -> None:
        subscribed.append(trio.current_time())

    commands = await start_commands(nursery, redis.url, buffer_time=30)
    subscriber, got = await start_subscriber(nursery, redis.url, on_subscribed=on_subscribed)
    subscriber.subscribe(b"ch")
    await subscriber.barrier()
    await wait_for(lambda: len(subscribed) == 1)
    redis.kill()
    await wait_for(lambda: not commands.connected and not subscriber.connected)
    # While Redis is away a command waits in the buffer; a call fails only if it was written.
    replies: list = []
    assert commands.send(("PUBLISH", "ch", "while-down"), replies.append)
    with pytest.raises(RedisUnavailable):
        await subscriber.barrier()
    redis.start()
    await wait_for(lambda: commands.connected and subscriber.connected)
    await wait_for(lambda: len(subscribed) == 2)  # subscribed again, then told
    await wait_for(lambda: len(replies) == 1)
    assert await commands.call("PUBLISH", "ch", "after") == 1
    await wait_for(lambda: (b"ch", b"after") in got)
    assert (commands.losses, subscriber.losses) == (1, 1)
    assert (commands.connects, subscriber.connects) == (2, 2)


async def test_commands_written_when_the_connection_breaks_fail_as_unavailable(nursery, redis):
    commands = await start_commands(nursery, redis.url)
    outcomes: list = []
    # BLPOP holds the connection's later replies behind it until Redis dies.
    commands.send(("BLPOP", "never", "0"), outcomes.append)
    commands.send(("PING",), outcomes.append)
    await wait_for(lambda: not commands._out)
    redis.kill()
    await wait_for(lambda: len(outcomes) == 2)
    assert all(isinstance(o, RedisUnavailable) and not isinstance(o, Dropped)
               for o in outcomes)


async def test_while_redis_is_away_the_buffer_holds_within_its_size_and_time(nursery, redis):
    commands = await start_commands(nursery, redis.url, buffer_limit=200, buffer_time=0.3)
    redis.kill()
    await wait_for(lambda: not commands.connected)
    outcomes: list = []
    sent = [commands.send(("PUBLISH", "ch", "x" * 50), outcomes.append) for _ in range(5)]
    assert sent == [True, True, False, False, False]  # about 80 bytes each, 200 at most
    assert commands.dropped == 3
    await wait_for(lambda: len(outcomes) == 2, timeout=10)
    assert all(isinstance(o, Dropped) for o in outcomes)
    assert commands.dropped == 5
    redis.start()
    await wait_for(lambda: commands.connected)
    assert await commands.call("PING") == b"PONG"


async def test_a_connection_that_answers_nothing_is_dropped_and_opened_again(nursery):
    accepted: list = []

    async def silent(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        await trio.sleep_forever()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, silent, 0,
                                                      host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    commands = RedisCommands(f"redis://127.0.0.1:{port}", ping_interval=0.05,
                             ping_timeout=0.2)
    await nursery.start(commands.run)
    await wait_for(lambda: commands.losses >= 1 and len(accepted) >= 2)


async def test_a_password_and_a_database_in_the_url_are_used(nursery, tmp_path):
    server = RedisServer(tmp_path, tcp=True).start("--requirepass", "s3cret")
    try:
        commands = await start_commands(nursery, f"redis://:s3cret@127.0.0.1:{server.port}/3")
        assert b" db=3 " in await commands.call("CLIENT", "INFO")
        wrong = RedisCommands(f"redis://:nope@127.0.0.1:{server.port}/0")
        nursery.start_soon(wrong.run)
        with trio.move_on_after(0.5):
            await wrong.wait_connected()
        assert not wrong.connected  # refused at its greeting, and trying again
    finally:
        server.stop()


async def test_a_subscriber_that_redis_disconnects_subscribes_again(nursery, redis):
    commands = await start_commands(nursery, redis.url)
    subscriber, got = await start_subscriber(nursery, redis.url)
    subscriber.subscribe(b"ch")
    await subscriber.barrier()
    # what Redis does to a subscriber past its output buffer limit
    assert redis.command("CLIENT", "KILL", "TYPE", "pubsub").startswith(b":1")
    await wait_for(lambda: subscriber.connects == 2 and subscriber.connected)
    await subscriber.barrier()
    assert await commands.call("PUBLISH", "ch", "again") == 1
    await wait_for(lambda: got == [(b"ch", b"again")])
    assert subscriber.losses == 1


async def test_what_on_connect_sends_first_goes_before_the_buffer(nursery, redis):
    commands = RedisCommands(redis.url)
    replies: list = []
    commands.on_connect = lambda: commands.send_first(("SET", "k", "first"), replies.append)
    commands.send(("GET", "k"), replies.append)  # buffered before the connection opens
    await nursery.start(commands.run)
    await wait_for(lambda: len(replies) == 2)
    assert replies == [b"OK", b"first"]
