"""The long-polling transport of a client session (``relay/_longpolling.py``): a send buffer
that polls drain, in memory.

The transport has no socket: the tests call ``poll`` (in trio, where a poll waits),
``receive_posted`` and ``tick`` as the front and the ticker do, with the operations' clock set
by hand. What a poll returns is the body of its answer (``None``: a 204).
"""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing
from relayfakes import HUB, Clock, RecordingPoller, make_ops, records

from relaycore.protocol._hub import InvocationMessage, MessagePackHubProtocol
from relaycore.relay import OutboundMessage, RelayConfig
from relaycore.relay._longpolling import LongPollingTransport
from relaycore.relay._message import fan_out, hold_formats, release_formats
from relaycore.relay._peer import ConnState, PeerIO
from relaycore.relay._session import ClientSession

HANDSHAKE = b'{"protocol":"json","version":1}\x1e'


def _invocation(number: int) -> InvocationMessage:
    return InvocationMessage(target="n", arguments=[number])


class Polled:
    """A session on a ``LongPollingTransport``, its clock at 0."""

    def __init__(self, *, send_limit: int = 1 << 20, poll_timeout: float = 90.0,
                 idle_timeout: float = 15.0, close_timeout: float = 5.0,
                 user: str | None = "alice", **settings: object) -> None:
        self.clock = Clock(0.0)
        self.ops = make_ops(RelayConfig(send_buffer_limit=send_limit, **settings),  # type: ignore[arg-type]
                            clock=self.clock)
        self.forgotten: list[object] = []
        io = PeerIO(RecordingPoller(), self.ops.flusher, close_timeout,  # type: ignore[arg-type]
                    self.ops.stats, self.forgotten.append)
        self.session = ClientSession(self.ops, connection_id="c1", hub=HUB, claims={},
                                     user_id=user, query="", headers={})
        self.transport = LongPollingTransport(
            io, self.session, token="t1", send_limit=send_limit, poll_timeout=poll_timeout,
            idle_timeout=idle_timeout, clock=self.clock)

    def post(self, data: bytes, now: float | None = None) -> None:
        self.transport.receive_posted(data, self.clock.now if now is None else now)

    async def poll(self) -> bytes | None:
        with trio.fail_after(120):  # the autojump clock's seconds: a poll never hangs a test
            return await self.transport.poll()

    async def opened(self, handshake: bytes = HANDSHAKE) -> Polled:
        self.post(handshake)
        assert await self.poll() == b"{}\x1e"
        assert self.session.state is ConnState.OPEN
        return self

    def table_ids(self) -> set[str]:
        shard = self.ops.table.get(HUB)
        return set(shard.connections) if shard else set()


async def poll_in_background(nursery: trio.Nursery, polled: Polled) -> list[bytes | None]:
    """Start a poll and wait until it waits; its answer lands in the returned list."""
    answers: list[bytes | None] = []

    async def poll() -> None:
        answers.append(await polled.transport.poll())

    nursery.start_soon(poll)
    await trio.testing.wait_all_tasks_blocked()
    assert not answers, "the poll did not wait"
    return answers


# -- polls --------------------------------------------------------------------------------------


async def test_the_handshake_comes_by_post_and_its_answer_by_the_next_poll():
    polled = Polled()
    assert polled.transport.wire_format_for("json") == "json+lp"
    await polled.opened()
    assert polled.session.wire_format == "json+lp"
    assert polled.table_ids() == {"c1"}


async def test_a_poll_takes_everything_queued_at_once_as_the_protocols_bytes():
    polled = await Polled().opened()
    for number in range(3):
        polled.session.reply(_invocation(number))
    body = await polled.poll()
    assert body is not None
    assert [m["arguments"] for m in records(body)] == [[0], [1], [2]]
    assert polled.transport._out == b""


async def test_a_waiting_poll_is_answered_by_the_next_send(nursery):
    polled = await Polled().opened()
    answers = await poll_in_background(nursery, polled)
    polled.session.reply(_invocation(7))
    await trio.testing.wait_all_tasks_blocked()
    assert [records(body) for body in answers] == [[{"type": 1, "target": "n",
                                                     "arguments": [7]}]]


async def test_a_poll_with_nothing_to_take_is_answered_empty_after_the_poll_timeout(
        autojump_clock):
    polled = await Polled(poll_timeout=90).opened()
    started = trio.current_time()
    assert await polled.poll() == b""
    assert trio.current_time() - started == pytest.approx(90)
    assert polled.session.state is ConnState.OPEN


async def test_a_newer_poll_answers_the_one_still_waiting_with_204(nursery):
    polled = await Polled().opened()
    older = await poll_in_background(nursery, polled)
    newer = await poll_in_background(nursery, polled)
    assert older == [None]
    polled.session.reply(_invocation(1))
    await trio.testing.wait_all_tasks_blocked()
    assert len(newer) == 1 and records(newer[0]) == [
        {"type": 1, "target": "n", "arguments": [1]}]


async def test_a_fan_out_wakes_the_waiting_poll_through_the_flusher(nursery):
    """The fan-out's C loop appends to the shared buffer without calling the transport; the
    flusher, asking whether the marked sink can be written, wakes the poll instead."""
    hold_formats(LongPollingTransport.FORMATS)
    try:
        polls = [await Polled(user=f"u{i}").opened() for i in range(3)]
        waiting = [await poll_in_background(nursery, p) for p in polls]
        sessions = [p.session for p in polls]
        flusher = polls[0].ops.flusher
        assert fan_out(sessions, OutboundMessage.invocation("all", 1), flusher, 1 << 20) == 3
        assert flusher.dirty == sessions
        await trio.testing.wait_all_tasks_blocked()
        assert waiting == [[], [], []]  # nothing written yet: the flusher has not run
        flusher.flush_all(0.0)
        await trio.testing.wait_all_tasks_blocked()
        for answers in waiting:
            assert [records(body) for body in answers] == [
                [{"type": 1, "target": "all", "arguments": [1]}]]
    finally:
        release_formats(LongPollingTransport.FORMATS)


async def test_messagepack_travels_as_the_protocols_own_bytes():
    polled = Polled()
    polled.post(b'{"protocol":"messagepack","version":1}\x1e')
    assert await polled.poll() == b"{}\x1e"
    assert polled.session.wire_format == "messagepack+lp"
    polled.session.reply(_invocation(5))
    body = await polled.poll()
    assert body == MessagePackHubProtocol().write(_invocation(5))


# -- the client's messages ----------------------------------------------------------------------


async def test_posted_messages_reach_the_session_and_count_as_life():
    polled = await Polled(service_mode="serverless").opened()
    polled.post(b'{"type":1,"invocationId":"1","target":"Send","arguments":[]}\x1e{"type":6}\x1e',
                now=4.0)
    assert polled.transport.last_receive == 4.0
    completion = records(await polled.poll())
    assert completion[0]["invocationId"] == "1" and "not delivered" in completion[0]["error"]


# -- the end ------------------------------------------------------------------------------------


async def test_a_closed_session_gives_the_next_poll_its_close_and_the_one_after_a_204():
    polled = await Polled().opened()
    polled.session.close("kicked")
    assert polled.table_ids() == set()  # forgotten at once
    assert records(await polled.poll()) == [{"type": 7, "error": "kicked"}]
    assert polled.transport.state is ConnState.CLOSING
    assert await polled.poll() is None
    assert polled.transport.state is ConnState.CLOSED
    assert polled.forgotten == [polled.transport]
    assert await polled.poll() is None  # and so is any poll after it


async def test_a_close_answers_a_waiting_poll_at_once(nursery):
    polled = await Polled().opened()
    answers = await poll_in_background(nursery, polled)
    polled.session.close("bye")
    await trio.testing.wait_all_tasks_blocked()
    assert [records(body) for body in answers] == [[{"type": 7, "error": "bye"}]]


async def test_a_closed_connection_whose_client_never_polls_again_is_dropped_in_time():
    polled = await Polled(close_timeout=5).opened()
    polled.clock.now = 10.0
    polled.session.close("bye")
    assert not polled.transport.close_due(14.9)
    assert polled.transport.close_due(15.0)
    assert polled.forgotten == [polled.transport]


async def test_drop_answers_a_waiting_poll_204_and_the_session_leaves(nursery):
    polled = await Polled().opened()
    answers = await poll_in_background(nursery, polled)
    polled.transport.drop()  # a DELETE
    await trio.testing.wait_all_tasks_blocked()
    assert answers == [None]
    assert polled.table_ids() == set()
    assert polled.session.state is ConnState.CLOSED
    polled.transport.drop()
    assert polled.forgotten == [polled.transport]  # once


async def test_a_client_with_no_poll_waiting_for_the_idle_timeout_is_gone():
    polled = await Polled(idle_timeout=15).opened()  # its last poll ended at 0
    polled.transport.tick(15.0)
    assert polled.transport.state is ConnState.OPEN
    polled.transport.tick(15.1)
    assert polled.transport.state is ConnState.CLOSED
    assert polled.table_ids() == set()


async def test_a_waiting_poll_keeps_its_client_alive_past_the_idle_timeout(nursery):
    polled = await Polled(idle_timeout=15).opened()
    await poll_in_background(nursery, polled)
    polled.transport.tick(1000.0)
    assert polled.transport.state is ConnState.OPEN
    # Long polling keeps itself alive: no ping, no client timeout, however long it is quiet.
    assert polled.transport._out == b""


async def test_the_handshake_timeout_still_applies():
    polled = Polled(handshake_timeout=2)
    polled.transport.tick(2.5)
    answer = await polled.poll()
    assert json.loads(answer.rstrip(b"\x1e")) == {"error": "Handshake was canceled."}
    assert polled.transport.state is ConnState.CLOSING


async def test_past_the_send_limit_the_backlog_goes_and_the_close_comes_first():
    polled = await Polled(send_limit=300).opened()
    for number in range(10):
        polled.session.reply(_invocation(number))
    got = records(await polled.poll())
    assert got[-1]["type"] == 7 and "send buffer limit of 300 bytes" in got[-1]["error"]
    assert polled.ops.stats.slow_consumer_closes == 1
    assert polled.table_ids() == set()


async def test_the_flusher_never_writes_a_long_polling_sink():
    polled = await Polled().opened()
    polled.session.reply(_invocation(1))
    flusher = polled.ops.flusher
    flusher.dirty.append(polled.session)
    flusher.flush_all(0.0)  # no socket: a write would fail; the bytes stay for the poll
    assert records(await polled.poll())[0]["arguments"] == [1]
