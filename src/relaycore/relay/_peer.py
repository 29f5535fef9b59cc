"""The WebSocket I/O shared by client and server connections: a read-feed-flush loop.

Theory of operation
-------------------
A ``Peer`` owns one accepted, upgraded TCP stream and a sans-I/O ``WebSocketProtocol``.

* The **reader** (``run``) feeds received bytes to the protocol and hands the events to the
  subclass (``_handle_events``). It ends on EOF, on a completed close handshake, or on a
  WebSocket protocol error (``_on_protocol_error``).
* Outbound bytes are appended to one buffer (``_push``); they never wait for the socket. The
  first bytes put into an empty buffer ``mark`` the peer with the relay's ``Flusher``, a single
  task that, once the current task yields, writes every marked peer with one non-blocking
  ``write()`` each: one system call per peer per scheduling round however many frames were
  queued, and no task switch per peer.
* A **writer** task exists only while the peer is behind: it takes over what the socket did not
  accept at once and waits until the socket is writable. While it owns the send side the
  flusher leaves the peer alone, so bytes always leave in order. When the reader ends, what is
  still queued is sent before the stream is closed. An idle connection therefore costs one task
  (its reader) and no writer.

States: ``HANDSHAKE`` (not routable) -> ``OPEN`` -> ``CLOSING`` (close frame queued; the peer has
``close_timeout`` to answer before the whole connection is cancelled) -> ``CLOSED`` (the stream is
closed and its file descriptor must never be written again).
"""

from __future__ import annotations

import enum
import os
from typing import TYPE_CHECKING, Any

import trio

from ..protocol._websocket import Role, State, WebSocketProtocol

if TYPE_CHECKING:
    from ._relay import Relay

_READ_SIZE = 65536


class ConnState(enum.IntEnum):
    HANDSHAKE = 0
    OPEN = 1
    CLOSING = 2
    CLOSED = 3


class Flusher:
    """Writes every peer that got bytes in this scheduling round, once each (see above)."""

    def __init__(self) -> None:
        self._dirty: list[Peer] = []
        self._lot = trio.lowlevel.ParkingLot()

    def mark(self, peer: Peer) -> None:
        self._dirty.append(peer)
        if self._lot:
            self._lot.unpark()

    async def run(self) -> None:
        while True:
            if not self._dirty:
                await self._lot.park()
                continue
            dirty, self._dirty = self._dirty, []
            now = trio.current_time()
            for peer in dirty:
                peer.flush(now)


class Peer:
    """One upgraded WebSocket stream with an unbounded-in-time, buffered, coalescing writer."""

    __slots__ = ("relay", "stream", "ws", "state", "created", "last_receive", "last_send",
                 "_out", "_fd", "_scope", "_writing")

    def __init__(
        self, relay: Relay, stream: trio.SocketStream, *, max_message_size: int, now: float
    ) -> None:
        self.relay = relay
        self.stream = stream
        self.ws = WebSocketProtocol(Role.SERVER, max_message_size=max_message_size)
        self.state = ConnState.HANDSHAKE
        self.created = now
        self.last_receive = now
        self.last_send = now
        self._out = bytearray()
        self._fd = stream.socket.fileno()
        self._scope: trio.CancelScope | None = None
        #: Set while a writer task owns the socket's send side (the socket was full); it is
        #: the ``Event`` that task sets when it is done.
        self._writing: trio.Event | None = None

    # -- outbound ------------------------------------------------------------------------------

    def _push(self, data: bytes) -> None:
        """Queue bytes for the socket, whatever the state."""
        if data:
            if not self._out:
                self.relay.flusher.mark(self)
            self._out += data

    def flush(self, now: float) -> None:
        """Write what is queued with one non-blocking system call. What the socket does not
        accept is handed to a writer task that waits until the socket is writable; a
        connection only has such a task while it is behind."""
        out = self._out
        if not out or self._writing is not None or self.state is ConnState.CLOSED:
            return
        try:
            sent = os.write(self._fd, out)
        except OSError:  # EAGAIN, or a dead socket: the writer meets the error and ends it
            sent = 0
        if sent == len(out):
            out.clear()
            self.last_send = now
            return
        del out[:sent]
        self._writing = trio.Event()
        self.relay.spawn(self._write_rest)

    async def _write_rest(self) -> None:
        try:
            while self._out and self.state is not ConnState.CLOSED:
                data, self._out = self._out, bytearray()
                await self.stream.send_all(data)
                self.last_send = trio.current_time()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            if self._scope is not None:
                self._scope.cancel()
        finally:
            assert self._writing is not None
            self._writing.set()
            self._writing = None

    def _send_close_frame(self, code: int, reason: str = "") -> None:
        if self.ws.state is State.OPEN:
            self.ws.send_close(code, reason[:120])
            self._push(self.ws.data_to_send())

    def _start_close_timer(self) -> None:
        if self._scope is not None:
            self._scope.deadline = min(
                self._scope.deadline, trio.current_time() + self.relay.config.close_timeout
            )

    # -- the connection's life ----------------------------------------------------------------

    async def run(self, initial: bytes) -> None:
        """Read until the connection ends, then send what is still queued (within the close
        timer's deadline, when one is running) and close the stream."""
        try:
            with trio.CancelScope() as self._scope:
                await self._reader(initial)
            with trio.CancelScope(deadline=self._scope.deadline):
                if self._writing is not None:
                    await self._writing.wait()
                elif self._out:
                    # Own the send side (as a writer task would) so that the flusher cannot
                    # write in the middle of this last send.
                    self._writing = trio.Event()
                    await self._write_rest()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._ended()
            self.state = ConnState.CLOSED
            with trio.CancelScope(shield=True):
                await aclose_quietly(self.stream)

    async def _reader(self, initial: bytes) -> None:
        ws = self.ws
        data = initial
        while True:
            if data:
                self.last_receive = trio.current_time()
                ws.receive_data(data)
                self._handle_events(ws.events_received())
                if ws.error is not None:
                    self._on_protocol_error(str(ws.error), ws.close_code)
                self._push(ws.data_to_send())
                if ws.close_expected():
                    return
            try:
                data = await self.stream.receive_some(_READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                ws.receive_eof()
                ws.events_received()
                return

    # -- for subclasses ------------------------------------------------------------------------

    def _handle_events(self, events: list[Any]) -> None:
        raise NotImplementedError

    def _on_protocol_error(self, reason: str, code: int | None) -> None:
        """The peer broke the WebSocket protocol; the protocol has queued its close frame."""
        raise NotImplementedError

    def _ended(self) -> None:
        """The connection is over (any reason): leave every table."""
        raise NotImplementedError


async def aclose_quietly(stream: trio.abc.AsyncResource) -> None:
    try:
        await stream.aclose()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
