"""The WebSocket I/O every peer shares (``relay/_peer.py``): the poller, the flusher, and a
peer's buffered writer.

The poller sleeping outside trio's scheduler ("Where the poller sleeps"): whatever trio
watches, its timers and a cancellation still reach their tasks while the poller sleeps in its
own epoll set, a second poller of the same run sleeps in trio, and a run whose internals it
cannot read (a mock clock) gets the plain trio sleep. The poller's own longest sleep is raised
to ten minutes here. Every wait is bounded by ``soon()``, 20 s, which fails even when what was
awaited arrives at that very moment (as it would if only the end of the poller's sleep, capped
by that same deadline, had noticed it).

A peer's writer is driven without a socket: a pipe stands for it (``write()`` takes what fits,
the rest waits until the poller says it is writable), or no file descriptor at all. Last, a
real client that stops reading gets everything in order once it reads again.
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import trio
import trio.testing
from relayfakes import RecordingPoller

from relaycore.protocol._websocket import Opcode, frame
from relaycore.relay import OutboundMessage, RelayConfig, _peer, serve_relay
from relaycore.relay._peer import ConnState, Flusher, Peer, PeerIO, Poller, _frame_boundary
from relaycore.relay._stats import RelayStats
from relayhelpers import KEY, wait_for


class FakePeer:
    """What the poller reads of a peer: its socket, and where readable bytes go."""

    def __init__(self, sock: socket.socket) -> None:
        self._fd = sock.fileno()
        self._reading = True
        self._blocked = False
        self.got = bytearray()
        self.arrived = trio.Event()

    def readable(self, now: float) -> None:
        self.got += _peer.os.read(self._fd, 100)
        self.arrived.set()

    def drop(self) -> None:  # the poller drops what is still open when it stops
        self._reading = False


def watched_pair(poller: Poller) -> tuple[FakePeer, socket.socket, socket.socket]:
    """A socket pair whose first end the poller watches (``Poller.add`` reads only the peer's
    file descriptor, so a fake peer will do); the test writes to the second end."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    peer = FakePeer(ours)
    poller.add(peer)  # type: ignore[arg-type]
    return peer, ours, theirs


@contextmanager
def soon() -> Iterator[None]:
    with trio.move_on_after(20) as scope:
        yield
    assert not scope.cancel_called, "not within 20 s"


@pytest.fixture(autouse=True)
def long_own_sleep(monkeypatch):
    monkeypatch.setattr(_peer, "_MAX_OWN_WAIT", 600.0)


def send_once_sleeping(sock: socket.socket, data: bytes, entered: threading.Event) -> None:
    """From a thread: send ``data`` once the poller has gone to sleep in its own set (after
    the calling task, which runs now, yields: the poller cannot run before)."""
    entered.clear()

    def go() -> None:
        entered.wait(30)
        sock.send(data)
    threading.Thread(target=go, daemon=True).start()


@pytest.fixture
def sleeps(monkeypatch):
    """Set when the poller enters its own epoll wait (the wrapped ``_TrioIdle.wait``)."""
    entered = threading.Event()
    original = _peer._TrioIdle.wait

    def wait(self, timeout):
        entered.set()
        return original(self, timeout)

    monkeypatch.setattr(_peer._TrioIdle, "wait", wait)
    return entered


async def test_trio_io_and_timers_reach_their_tasks_while_the_poller_sleeps_outside(
        nursery, sleeps):
    poller = Poller(Flusher())
    nursery.start_soon(poller.run)
    ours, theirs = socket.socketpair()
    mine = trio.socket.from_stdlib_socket(ours)
    # trio watches this socket; a thread writes to the other end while the poller sleeps in
    # its own set (nothing in this task yields to trio meanwhile: only trio's epoll set, which
    # the poller's sleep includes, can wake it in time).
    send_once_sleeping(theirs, b"through trio", sleeps)
    got = b""
    with soon():
        got = await mine.recv(100)
    assert got == b"through trio"
    assert _peer._OWN_WAIT_OWNER.get() is poller
    sleeps.clear()
    with soon():
        await trio.sleep(0.05)  # a timer: the poller's sleep ends at trio's next deadline
    assert sleeps.is_set()  # and the poller did sleep outside trio in between
    mine.close()
    theirs.close()


async def test_the_pollers_own_sockets_are_read_while_it_sleeps_outside(nursery, sleeps):
    poller = Poller(Flusher())
    nursery.start_soon(poller.run)
    peer, ours, theirs = watched_pair(poller)
    send_once_sleeping(theirs, b"direct", sleeps)
    with soon():
        await peer.arrived.wait()
    assert peer.got == b"direct"
    ours.close()
    theirs.close()


async def test_a_second_poller_sleeps_in_trio_and_is_woken_through_the_first(nursery, sleeps):
    first, second = Poller(Flusher()), Poller(Flusher())
    nursery.start_soon(first.run)
    await trio.sleep(0)  # the first one starts first
    nursery.start_soon(second.run)
    peer, ours, theirs = watched_pair(second)
    await trio.sleep(0)  # the second one has started
    assert _peer._OWN_WAIT_OWNER.get() is first  # one owner per run
    send_once_sleeping(theirs, b"second", sleeps)
    with soon():
        await peer.arrived.wait()  # trio's set holds the second's, the first's sleep holds trio's
    assert peer.got == b"second"
    ours.close()
    theirs.close()


async def test_cancelling_the_poller_while_it_sleeps_outside_ends_it_at_once(sleeps):
    poller = Poller(Flusher())
    with trio.fail_after(20):
        async with trio.open_nursery() as inner:
            inner.start_soon(poller.run)
            with trio.fail_after(20):
                while not sleeps.is_set():
                    await trio.sleep(0.001)
            inner.cancel_scope.cancel()  # without the check it would sleep ten minutes
    assert _peer._OWN_WAIT_OWNER.get() is None  # and it gave the place up


def test_a_mock_clock_keeps_the_poller_sleeping_in_trio():
    async def main() -> bytes:
        poller = Poller(Flusher())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poller.run)
            peer, ours, theirs = watched_pair(poller)
            await trio.testing.wait_all_tasks_blocked()
            assert _peer._OWN_WAIT_OWNER.get() is None
            theirs.send(b"mock")
            with trio.fail_after(20):
                await peer.arrived.wait()
            nursery.cancel_scope.cancel()
        ours.close()
        theirs.close()
        return bytes(peer.got)

    assert trio.run(main, clock=trio.testing.MockClock()) == b"mock"


# -- a peer's writer ----------------------------------------------------------------------------


class PlainPeer(Peer):
    """A peer whose hooks only count: what the writer does is all there is to see."""

    def __init__(self, *, send_limit: int = 1 << 20, fd: int = -1) -> None:
        self.flusher = Flusher()
        self.poller = RecordingPoller()
        self.forgotten: list[Peer] = []
        io = PeerIO(self.poller, self.flusher, 5.0, RelayStats(),  # type: ignore[arg-type]
                    self.forgotten.append)
        super().__init__(io, max_message_size=1 << 20, send_limit=send_limit, now=0.0)
        self.overflows: list[int] = []
        self.ended = 0
        self._fd = fd
        self._reading = True
        self.poller.add(self)

    def _overflow(self, size: int) -> None:
        self.overflows.append(size)
        self.state = ConnState.CLOSING

    def _ended(self) -> None:
        self.ended += 1


def test_the_first_bytes_queued_mark_the_peer_for_the_flusher_once():
    peer = PlainPeer()
    assert peer._push(b"ab") and peer._push(b"cd")
    assert peer.flusher.dirty == [peer] and bytes(peer._out) == b"abcd"


def test_past_its_send_limit_a_peer_queues_nothing_and_overflows_until_it_is_closing():
    peer = PlainPeer(send_limit=10)
    assert peer._push(b"12345678")
    assert not peer._push(b"xyz")
    assert peer.overflows == [3] and bytes(peer._out) == b"12345678"
    assert peer._push(b"close frame")  # a closing peer's goodbye is not limited


def test_a_peer_whose_socket_is_gone_is_dropped_once_by_the_flusher():
    peer = PlainPeer(fd=-1)  # writing fails as for a reset connection
    peer._push(b"data")
    peer.flusher.flush_all(1.0)
    assert peer.state is ConnState.CLOSED and peer.ended == 1
    assert peer.forgotten == [peer] and peer not in peer.poller.watching
    assert not peer._out
    peer.drop()
    assert peer.ended == 1 and peer.forgotten == [peer]


@pytest.fixture
def pipe():
    """A pipe whose write end a ``PlainPeer`` owns (and closes when it is dropped)."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    peer = PlainPeer(fd=write_end)
    yield read_end, peer
    os.close(read_end)
    if peer._fd >= 0:
        os.close(peer._fd)


def drain(read_end: int) -> bytes:
    os.set_blocking(read_end, False)
    got = bytearray()
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(read_end, 1 << 16):
            got += chunk
    return bytes(got)


def test_a_flush_writes_everything_queued_in_one_go(pipe):
    read_end, peer = pipe
    frames = [frame(Opcode.TEXT, b"%d" % i) for i in range(3)]
    for data in frames:
        peer._push(data)
    peer.flusher.flush_all(7.0)
    assert drain(read_end) == b"".join(frames)
    assert not peer._out and peer.last_send == 7.0 and peer.state is not ConnState.CLOSED


def test_a_full_socket_keeps_the_rest_in_order_until_it_is_writable_again(pipe):
    read_end, peer = pipe
    frames = [frame(Opcode.BINARY, bytes([i]) * 30000) for i in range(8)]  # more than fits
    for data in frames:
        peer._push(data)
    peer.flush(1.0)
    assert peer._blocked and peer._out
    assert peer.poller.watching[peer] == _peer._IN | _peer._OUT
    # Blocked, the flusher leaves the peer alone; bytes queued meanwhile wait behind.
    late = frame(Opcode.TEXT, b"late")
    peer._push(late)
    peer.flusher.flush_all(2.0)
    # The head of the buffer finishes the frame the pipe took part of.
    written = drain(read_end)
    assert _frame_boundary(bytearray(written) + peer._out, 0, len(written)) == (
        len(written) + peer._head_left)
    while peer._blocked:
        peer.writable(3.0)
        written += drain(read_end)
    assert written == b"".join(frames) + late
    assert peer.poller.watching[peer] == _peer._IN and peer._head_left == 0


async def test_a_peer_that_stopped_reading_is_closed_once_its_last_bytes_are_out(pipe):
    read_end, peer = pipe
    peer._push(b"goodbye")
    peer._finish()  # reading is over (an EOF, say): the rest goes first
    assert peer.state is not ConnState.CLOSED
    peer.flusher.flush_all(1.0)
    assert drain(read_end) == b"goodbye"
    assert peer.state is ConnState.CLOSED and peer.ended == 1 and peer._fd == -1


def test_drop_backlog_keeps_the_rest_of_a_frame_the_socket_took_part_of():
    peer = PlainPeer()
    peer._push(b"0123456789")
    assert peer.drop_backlog() == 10 and not peer._out
    peer._push(b"0123456789")
    peer._blocked, peer._head_left = True, 4
    assert peer.drop_backlog() == 6 and bytes(peer._out) == b"0123"


def test_frame_boundary_finds_the_end_of_the_frame_the_socket_took_part_of() -> None:
    frames = [frame(Opcode.TEXT, b"a" * n) for n in (10, 200, 70000, 5)]
    out = bytearray(b"".join(frames))
    ends = [sum(len(f) for f in frames[:i + 1]) for i in range(len(frames))]
    assert _frame_boundary(out, 0, 0) == 0
    assert _frame_boundary(out, 0, 1) == ends[0]
    assert _frame_boundary(out, 0, ends[0]) == ends[0]
    assert _frame_boundary(out, 0, ends[0] + 1) == ends[1]
    assert _frame_boundary(out, 0, ends[2] - 1) == ends[2]
    # The buffer starts with the last 7 bytes of a frame already partly written.
    tail = bytearray(b"1234567") + out
    assert _frame_boundary(tail, 7, 3) == 7
    assert _frame_boundary(tail, 7, 8) == 7 + ends[0]



# -- end to end ---------------------------------------------------------------------------------


async def test_a_client_that_stops_reading_gets_everything_in_order_when_it_reads_again(
        nursery, connect):
    # Far more than the socket buffers hold, under the send buffer limit: the relay keeps the
    # rest, waits until the socket is writable again, and loses or reorders nothing.
    config = RelayConfig(port=0, access_keys=[KEY], send_buffer_limit=64 << 20)
    relay = await nursery.start(serve_relay, config)
    client = await connect(relay, user="reader")  # reads only when asked (queue of one)
    conn = next(iter(relay.table.get("chat").connections.values()))
    payload = "z" * 60000
    count = 400  # 24 MB
    for i in range(count):
        await relay.send_to_user("chat", "reader", OutboundMessage.invocation("n", i, payload))
    await wait_for(lambda: conn.transport._blocked)  # the socket refused part of it
    with trio.fail_after(30):
        for i in range(count):
            message = await client.next_message()
            assert message["arguments"] == [i, payload]
    await wait_for(lambda: not conn.transport._blocked and not conn._out)
    assert await relay.user_exists("chat", "reader")

