"""The relay node as a whole (``relay/_relay.py``): its ticker, its library API and its drain.

The ticker runs in memory under trio's autojump clock, over stand-in peers that record their
timer checks; the library API and the drain run end to end against real clients.
"""

from __future__ import annotations

import math

import trio
from relayfakes import HUB, FakeSession

from relaycore.relay import OutboundMessage, Relay, RelayConfig
from relaycore.relay._peer import ConnState


class TimedPeer:
    """What the ticker reads of a live connection, and what it calls."""

    def __init__(self, *, state: ConnState = ConnState.OPEN, last: float = 0.0,
                 fails: bool = False) -> None:
        self.state = state
        self._close_deadline = math.inf
        self.last_receive = self.last_send = last
        self.fails = fails
        self.ticks: list[float] = []
        #: when the ticker found its close timer run out (a real peer is dropped then)
        self.due: list[float] = []
        self.internal_errors = 0

    def close_due(self, now: float) -> bool:
        if now < self._close_deadline:
            return False
        self.due.append(now)
        return True

    def tick(self, now: float) -> None:
        self.ticks.append(now)
        if self.fails:
            raise RuntimeError("a bug in this connection's timers")

    def _internal_error(self) -> None:
        self.internal_errors += 1


async def run_ticker(relay: Relay, seconds: float) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay._ticker)
        await trio.sleep(seconds)
        nursery.cancel_scope.cancel()


async def test_the_ticker_checks_only_the_connections_whose_timers_may_be_due(autojump_clock):
    relay = Relay(RelayConfig(keep_alive_interval=3, client_timeout=30,
                              server_keep_alive_interval=3, server_timeout=30))
    start = trio.current_time()
    busy = TimedPeer(last=start + 100)  # it just sent and received (as far as 100 s on)
    handshaking = TimedPeer(state=ConnState.HANDSHAKE, last=start + 100)
    idle = TimedPeer(last=start)
    closing = TimedPeer(last=start + 100)
    closing._close_deadline = start + 1.5
    relay.front.live.update({busy, handshaking, idle, closing})
    await run_ticker(relay, 3.5)  # ticks at 1, 2 and 3 s
    assert busy.ticks == []
    assert len(handshaking.ticks) == 3
    assert [t - start for t in idle.ticks] == [3.0]  # keep-alive interval reached
    # Its close timer runs out at 1.5 s: from the next tick on it is dropped, not ticked.
    assert closing.ticks == [] and closing.due[0] - start == 2.0


async def test_a_bug_in_one_connections_timers_ends_only_that_connection(autojump_clock):
    relay = Relay(RelayConfig())
    broken = TimedPeer(state=ConnState.HANDSHAKE, fails=True)
    healthy = TimedPeer(state=ConnState.HANDSHAKE)
    relay.front.live.update({broken, healthy})
    await run_ticker(relay, 1.5)
    assert broken.internal_errors == 1 and healthy.internal_errors == 0
    assert len(healthy.ticks) == 1


async def test_the_ticker_ends_user_group_memberships_whose_ttl_ran_out(autojump_clock):
    relay = Relay(RelayConfig())
    session = FakeSession(relay.ops, "a", "alice").open()
    await relay.add_user_to_group(HUB, "team", "alice", ttl=2)
    assert session.groups == {"team"}
    await run_ticker(relay, 1.5)
    assert session.groups == {"team"}
    await run_ticker(relay, 1.5)
    assert session.groups == set()


async def test_library_methods_answer_as_the_operations_do():
    relay = Relay(RelayConfig())
    a = FakeSession(relay.ops, "a", "alice").open()
    assert await relay.connection_exists(HUB, "a") and not await relay.user_exists(HUB, "bob")
    assert await relay.add_connection_to_group(HUB, "g", "a")
    assert not await relay.add_connection_to_group(HUB, "g", "nope")
    assert await relay.group_exists(HUB, "g")
    assert await relay.send_to_connection(HUB, "a", OutboundMessage.invocation("t")) == 1
    assert await relay.remove_connection_from_all_groups(HUB, "a")
    assert a.groups == set()
    assert await relay.close_all_connections(HUB, "bye", excluded=iter(["x"])) == 1
    assert a.closes == [("bye", True)]


# -- end to end ---------------------------------------------------------------------------------


async def test_library_methods_match_the_rest_operations(relay, connect):
    a = await connect(relay, user="alice")
    b = await connect(relay, user="bob")
    assert await relay.user_exists("chat", "alice")
    await relay.add_user_to_group("chat", "team", "alice")
    assert await relay.user_in_group("chat", "team", "alice")
    reached = await relay.send_to_group("chat", "team", OutboundMessage.invocation("t", 1))
    assert reached == 1
    with trio.fail_after(3):
        assert (await a.next_message())["arguments"] == [1]
    assert await relay.send_to_all("chat", OutboundMessage.invocation("t", 2)) == 2
    with trio.fail_after(3):
        assert (await b.next_message())["arguments"] == [2]
    assert await relay.send_to_user("chat", "nobody", OutboundMessage.invocation("t")) == 0


async def test_drain_sends_close_with_allow_reconnect(relay, connect):
    client = await connect(relay)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay.drain)
        with trio.fail_after(3):
            message = await client.next_message()
    assert message["type"] == 7 and message["allowReconnect"] is True

