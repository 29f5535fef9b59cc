"""The long-polling transport of a client session: a send buffer that polls drain.

A client on long polling (client-protocol §2.4) holds no connection of its own: it polls with
``GET`` requests, each answered with everything queued for it (200), or with nothing once
``poll_timeout`` has passed (200, empty), or 204 once its connection is over; it sends with
``POST`` requests and ends with ``DELETE``. The front serves those requests (one poll waits in
the task of its HTTP connection) and hands them to this transport.

What the session queues (or the fan-out, through the shared buffer) waits in ``_out``, the hub
protocol's bytes as they are (``json+lp``, ``messagepack+lp``). A poll takes all of it. The
session's ``push`` wakes a waiting poll; the fan-out's C loop appends without a call, marking
the session with the flusher instead, and the flusher, before it writes a marked sink, reads
its ``_blocked``: here that is a property that is always true (there is no socket to write)
and that wakes the waiting poll. So the flusher skips a long-polling session, and a poll with
nothing to wait for answers at once.

Long polling keeps itself alive (ASP.NET Core's inherent keep-alive): neither side pings and
the session's client timeout does not apply; a client is alive while it polls. One that has
had no poll waiting for ``poll_idle_timeout`` is gone, and so is its connection. A newer poll
answers an older one still waiting with 204, as ASP.NET Core does. Closing (the session's
Close message queued) lets the next poll take what is left; the poll after it is answered 204
and the connection is forgotten, as is one whose client never polls again (``close_timeout``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import trio

from ._peer import ConnState, PeerIO

log = logging.getLogger("relaycore.relay")


class LongPollingTransport:
    """A client's long-polling connection, carrying the frames of ``session`` (see the
    module). It has what the ticker, the fan-out and the flusher read of a peer."""

    __slots__ = ("io", "session", "token", "state", "created", "last_receive", "last_send",
                 "_out", "_limit", "_clock", "_poll_timeout", "_idle_timeout",
                 "_close_deadline", "_waiting", "_polls", "_idle_since")

    #: The wire formats a session on this transport may use (the fan-out frames them).
    FORMATS = ("json+lp", "messagepack+lp")

    def __init__(self, io: PeerIO, session: Any, *, token: str, send_limit: int,
                 poll_timeout: float, idle_timeout: float, clock: Callable[[], float]) -> None:
        now = clock()
        self.io = io
        #: the ``_session.ClientSession`` (``_transport.SessionEnd``) whose frames this carries
        self.session = session
        #: the connection token its requests name (``id=``)
        self.token = token
        self.state = ConnState.HANDSHAKE
        self.created = now
        #: the last poll or message from the client
        self.last_receive = now
        #: the last bytes a poll took
        self.last_send = now
        self._out = bytearray()
        self._limit = send_limit
        self._clock = clock
        self._poll_timeout = poll_timeout
        self._idle_timeout = idle_timeout
        self._close_deadline = math.inf
        #: what wakes the poll that waits, if one does
        self._waiting: trio.Event | None = None
        #: how many polls have come: a poll that is not the newest is answered 204
        self._polls = 0
        #: since when no poll has waited (the first poll is answered at once)
        self._idle_since = now
        session.attach(self)

    # -- the session's transport ---------------------------------------------------------------

    def wire_format_for(self, protocol_name: str) -> str | None:
        return f"{protocol_name}+lp"

    def push(self, data: bytes) -> bool:
        """Queue bytes for the next poll. Past the send limit (a client that does not poll
        fast enough), the backlog goes and the session is closed as a slow consumer."""
        if not data:
            return True
        out = self._out
        if len(out) + len(data) > self._limit and self.state < ConnState.CLOSING:
            dropped = len(out) + len(data)
            out.clear()
            self.session.slow_consumer(dropped, self._limit)
            return False
        out += data
        self._wake()
        return True

    def close(self, code: int, reason: str = "") -> None:
        """The session is closing: the next poll takes what is left, the one after it is
        answered 204; a client that does not come back is dropped after ``close_timeout``."""
        self._close_deadline = min(self._close_deadline,
                                   self._clock() + self.io.close_timeout)
        self._wake()

    # -- what the flusher reads of a sink ------------------------------------------------------

    @property
    def _blocked(self) -> bool:
        """Never writable: a poll takes the bytes. The flusher asks this of a session the
        fan-out marked, so asking hands the new bytes to the waiting poll."""
        self._wake()
        return True

    # -- requests ------------------------------------------------------------------------------

    def receive_posted(self, body: bytes, now: float) -> None:
        """The body of one of the client's ``POST`` requests: its messages."""
        self.last_receive = now
        self.session.receive([body])

    async def poll(self) -> bytes | None:
        """One poll: what is queued (``b""`` when ``poll_timeout`` passed with nothing), or
        ``None`` for a 204 (the connection is over, or a newer poll took this one's place).
        Cancelled (the client went away), it answers nothing and the connection stays."""
        self._polls += 1
        number = self._polls
        self.last_receive = self._clock()
        self._wake()  # an older poll still waiting is answered 204
        if self.state is ConnState.CLOSED:
            return None
        if not self._out and self.state is not ConnState.CLOSING:
            wake = self._waiting = trio.Event()
            try:
                with trio.move_on_after(self._poll_timeout):
                    await wake.wait()
            finally:
                if self._waiting is wake:
                    self._waiting = None
                    self._idle_since = self._clock()
            if number != self._polls:
                return None
        return self._answer()

    def _answer(self) -> bytes | None:
        now = self._idle_since = self._clock()
        if self.state is ConnState.CLOSED:
            return None
        if self._out:
            data = bytes(self._out)
            self._out.clear()
            self.last_send = now
            return data
        if self.state is ConnState.CLOSING:
            self.drop()  # all was delivered: 204 says the connection is over
            return None
        return b""

    def _wake(self) -> None:
        if self._waiting is not None:
            self._waiting.set()

    # -- the connection's life ----------------------------------------------------------------

    def close_due(self, now: float) -> bool:
        """Drop the connection if its close timer has run out; True if it did."""
        if now < self._close_deadline:
            return False
        self.drop()
        return True

    def tick(self, now: float) -> None:
        """The relay's timer pass: the handshake timeout (the session's), and a client with
        no poll waiting for ``poll_idle_timeout`` is gone. The session's keep-alive and client
        timeout do not apply: polls are the keep-alive."""
        if self.state is ConnState.HANDSHAKE:
            self.session.tick(now)
        if self._waiting is None and now - self._idle_since > self._idle_timeout:
            log.info("connection %s on hub %s: no poll for %g seconds; it is gone",
                     self.session.id, self.session.hub, self._idle_timeout)
            self.drop()

    def drop(self) -> None:
        """The connection is over (any reason): a waiting poll is answered 204, the session
        leaves every table, the front forgets the token; idempotent."""
        if self.state is ConnState.CLOSED:
            return
        try:
            self.session.transport_ended()
        finally:
            self.state = ConnState.CLOSED
            self._out.clear()
            self._wake()
            self.io.forget(self)  # type: ignore[arg-type]

    def _internal_error(self) -> None:
        """A bug met while serving this connection: log it once and drop the connection."""
        self.io.stats.internal_errors += 1
        log.exception("dropping a long-polling connection after an internal error")
        self.drop()
