"""The WebSocket I/O shared by client and server connections: one poller, one flusher.

Theory of operation
-------------------
A ``Peer`` owns one accepted, upgraded TCP socket (its file descriptor only) and a sans-I/O
``WebSocketProtocol``. No task belongs to a connection, idle or busy:

* The relay's ``Poller`` is a single task that keeps every open connection's socket in one
  epoll set, waits (through trio) until that set is ready, and then reads each readable socket
  once with a non-blocking ``read()`` and hands the bytes to its peer (``receive``): the
  protocol parses them and the subclass handles the events (``_handle_events``); a read that
  is nothing but whole data messages, the common one, skips the events and goes to
  ``_handle_messages`` as a list of payloads (the fast path's ``unmask_messages``). A burst of
  messages on many connections is handled in one go, and what it queues leaves at the end of
  the batch, one ``write()`` per peer (one ``write()`` to an app server for a hundred clients'
  messages, say). After a full batch the poller only yields before the next one; otherwise it
  sleeps until something is ready.
* **Where the poller sleeps.** A round through trio's scheduler (``wait_readable`` on the epoll
  set: trio re-arms it with ``epoll_ctl``, waits in its own epoll set and switches tasks) costs
  about 10 us of CPU here, as much as the rest of a message's handling at a low rate. So when
  trio has nothing to run and no timer due, one poller per trio run (``_TrioIdle``) sleeps in
  its *own* epoll set, which also holds trio's epoll file descriptor: anything trio watches
  (the listening socket, an HTTP request, a thread's ``run_sync_soon``, a signal) wakes it,
  and it then yields to trio, as it does when trio's next timer is due or a task is runnable.
  This reads a few of trio's internals (the runner's run queue, timers and epoll set); where
  they are not there (another trio, another platform, a mock clock) the poller sleeps in trio
  as before.
* Outbound bytes are appended to one buffer (``_push``); they never wait for the socket. The
  first bytes put into an empty buffer ``mark`` the peer with the relay's ``Flusher``, a single
  task that, once the current task yields, writes every marked peer with one non-blocking
  ``write()`` each: one system call per peer per scheduling round however many frames were
  queued, and no task switch per peer. (Bytes queued by the poller's own batch are written by
  the poller at the end of the batch instead.)
* A socket that does not take everything makes its peer **blocked**: the poller also waits
  for it to become writable and then writes the rest (``writable``); meanwhile the flusher
  leaves the peer alone, so bytes always leave in order.
* When reading ends (EOF, a completed close handshake or a protocol error) what is still
  queued is sent before the socket is closed; a closing peer has ``close_timeout`` to finish,
  after which the relay's ticker drops it (``close_due``).

An idle connection therefore costs its objects and an epoll registration, not a task.

States: ``HANDSHAKE`` (not routable) -> ``OPEN`` -> ``CLOSING`` (close frame queued; the peer has
``close_timeout`` to answer before the socket is dropped) -> ``CLOSED`` (the socket is closed and
its file descriptor must never be used again).
"""

from __future__ import annotations

import enum
import logging
import math
import os
import select
from collections.abc import Callable, Iterable
from typing import Any

import trio

from .._accel import parse_frame_header
from ..protocol._websocket import CloseCode, Role, State, WebSocketProtocol
from ._stats import RelayStats

log = logging.getLogger("relaycore.relay")

_READ_SIZE = 65536
#: Ready sockets handled per wake-up of the poller; the rest wait for the next round, so the
#: flusher writes what the first ones queued without waiting for every socket of a big burst.
_POLL_BATCH = 256
_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_IN_OR_ERROR = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP
_OUT_OR_ERROR = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP


class ConnState(enum.IntEnum):
    HANDSHAKE = 0
    OPEN = 1
    CLOSING = 2
    CLOSED = 3


class Flusher:
    """Writes every peer that got bytes in this scheduling round, once each (see above)."""

    def __init__(self) -> None:
        #: Peers to write in the next round; ``fan_out`` appends to it directly, then wakes.
        self.dirty: list[Peer] = []
        #: True while the poller handles a batch: it flushes at the end of the batch itself,
        #: so the flusher task is not woken for what the batch queues.
        self.held = False
        self._lot = trio.lowlevel.ParkingLot()

    def mark(self, peer: Peer) -> None:
        self.dirty.append(peer)
        if self._lot and not self.held:
            self._lot.unpark()

    def wake(self) -> None:
        if self.dirty and self._lot and not self.held:
            self._lot.unpark()

    def flush_all(self, now: float) -> None:
        """Write every marked peer once (and any that writing them marks in turn)."""
        while self.dirty:
            dirty, self.dirty = self.dirty, []
            _write_out(dirty, now)

    async def run(self) -> None:
        while True:
            if not self.dirty:
                await self._lot.park()
                continue
            self.flush_all(trio.current_time())


#: The longest the poller sleeps in its own epoll set before looking at trio's state again.
_MAX_OWN_WAIT = 1.0
#: With more trio tasks than this (HTTP requests in flight, say), telling whether one of them
#: is runnable costs more than it saves: the poller sleeps in trio.
_MAX_TASKS_SCANNED = 64

#: The poller of this trio run that may sleep outside trio: only one may, because another
#: one's sockets are seen only through trio's epoll set, which only the first one watches.
_OWN_WAIT_OWNER: trio.lowlevel.RunVar[Poller | None] = trio.lowlevel.RunVar(
    "relaycore_poller_own_wait", default=None)


class _TrioIdle:
    """Lets the poller sleep outside trio's scheduler (see "Where the poller sleeps" above).

    ``timeout`` says how long it may sleep now, ``wait`` sleeps in an epoll set that holds the
    poller's own set and trio's. ``find`` returns ``None`` where trio's internals are not the
    ones this was written against (trio 0.35 on Linux; checked when the poller starts), and
    the poller sleeps in trio.
    """

    __slots__ = ("_runner", "_task", "_instruments", "_both", "_trio_fd")

    def __init__(self, runner: Any, task: Any, own_fd: int, trio_fd: int) -> None:
        self._runner = runner
        self._task = task
        self._instruments = len(runner.instruments)
        self._trio_fd = trio_fd
        # Both sets, neither holding the other: trio may still watch the poller's set (when
        # the poller sleeps in trio), which this set does not prevent.
        self._both = select.epoll()
        self._both.register(own_fd, _IN)
        self._both.register(trio_fd, _IN)

    @classmethod
    def find(cls, own_fd: int) -> _TrioIdle | None:
        try:
            from trio._core._run import GLOBAL_RUN_CONTEXT, SystemClock

            runner = GLOBAL_RUN_CONTEXT.runner
            task = trio.lowlevel.current_task()
            trio_fd = runner.io_manager._epoll.fileno()
            usable = (
                type(runner.clock) is SystemClock
                and not runner.is_guest
                and set(runner.instruments) <= {"_all"}
                and callable(runner.deadlines.next_deadline)
                and len(runner.runq) >= 0
                and len(runner.waiting_for_idle) >= 0
                and task in runner.tasks
                and task._next_send_fn is None  # running: trio cleared it before this step
            )
        except (ImportError, AttributeError, TypeError):
            return None
        if not usable or type(trio_fd) is not int:
            return None
        return cls(runner, task, own_fd, trio_fd)

    def timeout(self) -> float | None:
        """How long the poller may sleep outside trio now: ``0`` when trio has something to
        do first (a runnable task, a due timer, a cancellation of the poller), ``None`` when
        the poller should sleep in trio (an instrument, a ``wait_all_tasks_blocked``, too many
        tasks to look at)."""
        runner = self._runner
        if runner.runq:
            return 0.0
        if runner.waiting_for_idle or len(runner.instruments) != self._instruments:
            return None
        tasks = runner.tasks
        if len(tasks) > _MAX_TASKS_SCANNED:
            return None
        me = self._task
        for task in tasks:
            # Runnable: rescheduled and not yet stepped (in this batch of trio's, say).
            if task._next_send_fn is not None and task is not me:
                return 0.0
        if trio.current_effective_deadline() == -math.inf:
            return 0.0  # cancelled: trio delivers it at the next checkpoint
        wait: float = runner.clock.deadline_to_sleep_time(runner.deadlines.next_deadline())
        return min(wait, _MAX_OWN_WAIT) if wait > 0 else 0.0

    def wait(self, timeout: float) -> bool:
        """Sleep until the poller's set or trio's is ready, or ``timeout``; True when trio
        should run before the poller sleeps again (its set was ready or a timer is due)."""
        woke = self._both.poll(timeout, 2)
        return not woke or any(fd == self._trio_fd for fd, _ in woke)

    def close(self) -> None:
        self._both.close()


class Poller:
    """One epoll set for every open connection, served by one task (see above): the inbound
    twin of ``Flusher``, and the waiting room of connections whose socket is full."""

    def __init__(self, flusher: Flusher) -> None:
        self._epoll = select.epoll()
        self._peers: dict[int, Peer] = {}
        self._flusher = flusher

    def add(self, peer: Peer) -> None:
        self._peers[peer._fd] = peer
        self._epoll.register(peer._fd, _IN)

    def watch(self, peer: Peer, mask: int) -> None:
        """Wait for ``mask`` (``_IN``, ``_OUT``, both or nothing) on the peer's socket."""
        if self._peers.get(peer._fd) is peer:
            self._epoll.modify(peer._fd, mask)

    def remove(self, peer: Peer) -> None:
        if self._peers.get(peer._fd) is peer:
            del self._peers[peer._fd]
            try:
                self._epoll.unregister(peer._fd)
            except OSError:
                pass

    async def run(self) -> None:
        epoll = self._epoll
        peers = self._peers
        flusher = self._flusher
        idle = _TrioIdle.find(epoll.fileno()) if _OWN_WAIT_OWNER.get() is None else None
        if idle is not None:
            _OWN_WAIT_OWNER.set(self)
        ready: list[tuple[int, int]] = []
        try:
            while True:
                wait = None if idle is None else idle.timeout()
                trio_ready = False
                if wait is None:
                    if len(ready) < _POLL_BATCH:
                        # The last batch took everything that was ready: sleep in trio
                        # until something is.
                        await trio.lowlevel.wait_readable(epoll.fileno())
                    else:
                        await trio.lowlevel.checkpoint()  # more may be ready: only yield
                elif wait == 0:
                    await trio.lowlevel.checkpoint()  # trio has something to do first
                else:
                    trio_ready = idle.wait(wait)  # trio has nothing to do meanwhile
                ready = epoll.poll(0, _POLL_BATCH)
                now = trio.current_time()
                flusher.held = True
                try:
                    for fd, events in ready:
                        peer = peers.get(fd)
                        if peer is None:
                            continue
                        if events & _OUT_OR_ERROR and peer._blocked:
                            peer.writable(now)
                        if events & _IN_OR_ERROR and peer._reading:
                            peer.readable(now)
                finally:
                    flusher.held = False
                # What the batch queued leaves now, one write() per peer, without a task
                # switch to the flusher.
                flusher.flush_all(now)
                if trio_ready:
                    await trio.lowlevel.checkpoint()  # trio's I/O or timers: let it run
        finally:
            if idle is not None:
                idle.close()
                if _OWN_WAIT_OWNER.get() is self:
                    _OWN_WAIT_OWNER.set(None)
            # The relay is stopping (cancelled): drop every connection still open.
            for peer in list(peers.values()):
                peer.drop()
            peers.clear()
            epoll.close()


class PeerIO:
    """What every peer of one relay shares: the poller and flusher that move its bytes, how
    long a closing peer may take, the counters, and who to tell when a peer is gone."""

    __slots__ = ("poller", "flusher", "close_timeout", "stats", "forget")

    def __init__(self, poller: Poller, flusher: Flusher, close_timeout: float,
                 stats: RelayStats, forget: Callable[[Peer], None]) -> None:
        self.poller = poller
        self.flusher = flusher
        self.close_timeout = close_timeout
        self.stats = stats
        #: Called once when a peer's socket is closed (the relay's set of live peers).
        self.forget = forget


class Peer:
    """One upgraded WebSocket stream with an unbounded-in-time, buffered, coalescing writer."""

    __slots__ = ("io", "ws", "state", "created", "last_receive", "last_send",
                 "_out", "_sink", "_limit", "_fd", "_reading", "_blocked", "_head_left",
                 "_close_deadline")

    def __init__(self, io: PeerIO, *, max_message_size: int, send_limit: int,
                 now: float) -> None:
        self.io = io
        self.ws = WebSocketProtocol(Role.SERVER, max_message_size=max_message_size)
        self.state = ConnState.HANDSHAKE
        self.created = now
        self.last_receive = now
        self.last_send = now
        self._out = bytearray()
        #: What the flusher writes when this peer is marked: the peer itself (a client
        #: session, marked by the fan-out, names its transport here).
        self._sink = self
        #: Bytes ``_out`` may hold while the connection is not closing; past it,
        #: ``_overflow`` decides (whatever was queued: frames, pongs, error texts).
        self._limit = send_limit
        #: The socket, owned as a bare file descriptor once the connection starts.
        self._fd = -1
        #: Whether the socket is still read (until EOF, a close handshake or an error).
        self._reading = False
        #: Whether the socket did not take everything: the poller waits until it is writable,
        #: and the flusher leaves the peer alone meanwhile.
        self._blocked = False
        #: While blocked: how many bytes at the head of ``_out`` finish a frame that the
        #: socket took only part of (0 when ``_out`` starts with a whole frame). Everything
        #: after them is whole frames, which is what ``drop_backlog`` may discard.
        self._head_left = 0
        self._close_deadline = math.inf

    # -- outbound ------------------------------------------------------------------------------

    def _push(self, data: bytes) -> bool:
        """Queue bytes for the socket; True if they were. A connection that is not closing
        may hold at most ``_limit`` bytes: past it, ``_overflow`` closes it instead (a peer
        that never reads cannot make the relay hold more, be it frames or pongs)."""
        if not data:
            return True
        out = self._out
        if len(out) + len(data) > self._limit and self.state < ConnState.CLOSING:
            self._overflow(len(data))
            return False
        if not out:
            self.io.flusher.mark(self)
        out += data
        return True

    def flush(self, now: float) -> None:
        """Write what is queued with one non-blocking system call. What the socket does not
        accept waits until the poller sees the socket writable."""
        _write_out((self,), now)

    def _wait_writable(self, sent: int) -> None:
        """The socket took only ``sent`` bytes: keep the rest for when it is writable."""
        self._head_left = _frame_boundary(self._out, self._head_left, sent) - sent
        del self._out[:sent]
        self._blocked = True
        self.io.poller.watch(self, _IN | _OUT if self._reading else _OUT)

    def writable(self, now: float) -> None:
        """The poller saw the full socket writable again: write what waits. (A bug met here
        ends this connection, never the poller.)"""
        try:
            self._blocked = False
            self.flush(now)
            if not self._blocked:
                self._head_left = 0  # everything went: the buffer starts at a frame again
            if not self._blocked and self.state is not ConnState.CLOSED:
                self.io.poller.watch(self, _IN if self._reading else 0)
        except Exception:
            self._internal_error()

    def drop_backlog(self) -> int:
        """Discard the queued frames that the socket has not started on (the rest of a frame
        it took part of stays, so the stream stays well-formed); returns how many bytes went.
        What is queued after this (a Close, say) is the next thing the peer reads."""
        keep = self._head_left if self._blocked else 0
        dropped = len(self._out) - keep
        del self._out[keep:]
        return dropped

    def _send_close_frame(self, code: int, reason: str = "") -> None:
        if self.ws.state is State.OPEN:
            self.ws.send_close(code, reason[:120])
            self._push(self.ws.data_to_send())

    def _start_close_timer(self) -> None:
        """The peer has ``close_timeout`` from now to finish; then the ticker drops it."""
        self._close_deadline = min(
            self._close_deadline, trio.current_time() + self.io.close_timeout
        )

    def close_due(self, now: float) -> bool:
        """Drop the peer if its close timer has run out; True if it did."""
        if now < self._close_deadline:
            return False
        self.drop()
        return True

    # -- the connection's life ----------------------------------------------------------------

    def start(self, stream: trio.SocketStream, initial: bytes) -> None:
        """The upgrade is done: take the socket out of ``stream`` and read from now on
        (``initial``: bytes already read past the upgrade)."""
        self._fd = stream.socket.detach()
        self._reading = True
        self.io.poller.add(self)
        if initial:
            self.receive(initial, trio.current_time())

    def readable(self, now: float) -> None:
        """The poller saw the socket readable: read once and handle what came."""
        try:
            data = os.read(self._fd, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self.receive(data, now)

    def receive(self, data: bytes, now: float) -> None:
        """Handle bytes from the socket (``b""``: end of stream). A bug met while handling one
        connection's input ends that connection, never the poller."""
        if not self._reading:
            return
        ws = self.ws
        try:
            if not data:
                ws.receive_eof()
                ws.events_received()
                self._finish()
                return
            self.last_receive = now
            messages = ws.receive_messages(data, self._TEXT_MESSAGES)
            if messages is not None:
                # The common read, whole data messages: no events, no protocol output.
                self._handle_messages(messages)
                return
            ws.receive_data(data)
            self._handle_events(ws.events_received())
            if ws.error is not None:
                self._on_protocol_error(str(ws.error), ws.close_code)
            self._push(ws.data_to_send())
            if ws.close_expected():
                self._finish()
        except Exception:
            self._internal_error()

    def _internal_error(self) -> None:
        """A bug met while serving this connection: log it once, tell the peer (a close frame
        1011, written now, best effort) and drop the connection. Never the poller, never
        another connection."""
        self.io.stats.internal_errors += 1
        log.exception("dropping a connection after an internal error")
        try:
            if self._fd >= 0 and self.ws.state is State.OPEN:
                self.ws.send_close(CloseCode.INTERNAL_ERROR, "internal error in the relay")
                os.write(self._fd, bytes(self._out) + self.ws.data_to_send())
        except Exception:  # noqa: BLE001 - the goodbye is a courtesy; dropping is what counts
            pass
        self.drop()

    def _finish(self) -> None:
        """Reading is over: send what is still queued (within the close timer), then close."""
        self._reading = False
        if self.state is ConnState.CLOSED:
            return
        if not self._out:
            self.drop()
            return
        self._start_close_timer()
        self.io.poller.watch(self, _OUT if self._blocked else 0)

    def drop(self) -> None:
        """Close the socket now (what is queued is lost) and leave every table; idempotent."""
        if self.state is ConnState.CLOSED:
            return
        self._reading = False
        self.io.poller.remove(self)
        try:
            self._ended()
        finally:
            self.state = ConnState.CLOSED
            self._out.clear()
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            self.io.forget(self)

    # -- for subclasses ------------------------------------------------------------------------

    #: Whether text frames are data to this kind of peer (else the full path judges them).
    _TEXT_MESSAGES = True

    def _handle_events(self, events: list[Any]) -> None:
        raise NotImplementedError

    def _handle_messages(self, messages: list[bytes]) -> None:
        """Whole data messages that the fast path took (see ``receive_messages``): the same
        as their ``TextMessage``/``BinaryMessage`` events would have been."""
        raise NotImplementedError

    def _on_protocol_error(self, reason: str, code: int | None) -> None:
        """The peer broke the WebSocket protocol; the protocol has queued its close frame."""
        raise NotImplementedError

    def _overflow(self, size: int) -> None:
        """``size`` more bytes would pass the send limit: close the connection (after
        ``drop_backlog``, so that its close is the next thing it reads), count, log. Must
        leave the connection CLOSING or CLOSED."""
        raise NotImplementedError

    def _ended(self) -> None:
        """The connection is over (any reason): leave every table."""
        raise NotImplementedError

    def tick(self, now: float) -> None:
        """The relay's timer pass: check this connection's timers (handshake, keep-alive,
        timeouts)."""
        raise NotImplementedError


def _write_out(peers: Iterable[Any], now: float) -> None:
    """``Peer.flush`` for each of ``peers``, as one loop: a broadcast writes a thousand peers
    in a row, and the Python around each ``write()`` (a method call, its look-ups) had 14 %
    of py-spy's samples of the relay at 400k deliveries/s. One loop took 2-12 % off the CPU per
    delivery (bench/README.md, "What changed", item 12)."""
    write = os.write
    closed = ConnState.CLOSED
    for marked in peers:
        peer = marked._sink
        out = peer._out
        if not out or peer._blocked or peer.state is closed:
            continue
        try:
            sent = write(peer._fd, out)
        except BlockingIOError:
            sent = 0
        except OSError:  # the peer is gone (EPIPE, ECONNRESET)
            peer.drop()
            continue
        if sent == len(out):
            out.clear()
            peer.last_send = now
            if not peer._reading:
                peer.drop()  # reading was over and the last bytes are out
        else:
            peer._wait_writable(sent)


def _frame_boundary(out: bytearray, head_left: int, sent: int) -> int:
    """The first frame boundary in ``out`` at or after ``sent``, where ``out`` holds the
    ``head_left`` bytes that finish a partly written frame and then whole frames (server
    frames: never masked). Walks only the frames the socket took part of: slow sockets only."""
    pos = head_left
    while pos < sent:
        header = parse_frame_header(out, pos)
        if header is None:  # cannot be: the buffer holds whole frames
            raise ValueError(f"no whole frame header at offset {pos} of the send buffer")
        pos += header[4] + header[3]
    return pos


async def aclose_quietly(stream: trio.abc.AsyncResource) -> None:
    try:
        await stream.aclose()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
