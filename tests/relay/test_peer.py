"""The relay's poller sleeping outside trio's scheduler (``relay/_peer.py``, "Where the poller
sleeps"): whatever trio watches, its timers and a cancellation still reach their tasks while
the poller sleeps in its own epoll set, a second poller of the same run sleeps in trio, and a
run whose internals it cannot read (a mock clock) gets the plain trio sleep.

The poller's own longest sleep is raised to ten minutes here. Every wait is bounded by
``soon()``, 20 s, which fails even when what was awaited arrives at that very moment (as it
would if only the end of the poller's sleep, capped by that same deadline, had noticed it).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import trio
import trio.testing

from relaycore.relay import _peer
from relaycore.relay._peer import Flusher, Poller


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
