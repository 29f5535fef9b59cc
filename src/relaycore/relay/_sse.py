"""The Server-Sent Events transport of a client session: a write-only ``Peer``.

A client on Server-Sent Events (client-protocol §2.3) opens one streamed ``GET`` response and
sends its messages with ``POST`` requests. Once the front has written the response's head and
its first chunk (a ``:`` comment line, which makes browsers fire ``open``), the socket is this
peer's, as an upgraded WebSocket is a ``WebSocketTransport``'s: a file descriptor in the
poller's epoll set and no task. What the session (or the fan-out, through the shared buffer)
queues is already framed as events in chunks of the chunked body (``_message.WIRE_FORMATS``
``json+sse``), so the flusher writes it as it is, like any peer's frames. The client sends
nothing on this socket: its end (the client closed its ``EventSource``) is the session's end,
and anything else it sends is ignored. The front hands the session the bodies of the client's
``POST`` requests (``receive_posted``), which also keep the session's client timeout at bay.
The first of them may come while the head is still on its way (the client sends its handshake
as soon as it has read the head): what the session queues then waits (``_blocked``) until
``start``.

Only the JSON hub protocol travels in events (their ``data:`` lines are text):
``wire_format_for`` has no format for MessagePack, so its handshake is refused with ASP.NET
Core's words. Closing ends the body (its last chunk) after the queued Close message, and the
socket is closed once that is out (within ``close_timeout``).
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from ._peer import _IN, _OUT, ConnState, Peer, PeerIO

log = logging.getLogger("relaycore.relay")

#: The last chunk of a chunked body: the stream ends here, on purpose.
END_OF_STREAM = b"0\r\n\r\n"

#: The head of the event stream, as ASP.NET Core writes it (``ServerSentEventsServerTransport``:
#: no caching, no compression) plus ``X-Accel-Buffering: no``, which tells a proxy such as
#: nginx not to hold events back (Kestrel turns its own buffering off; a proxy cannot know).
RESPONSE_HEADERS = (
    ("Content-Type", "text/event-stream"),
    ("Cache-Control", "no-cache,no-store"),
    ("Pragma", "no-cache"),
    ("Content-Encoding", "identity"),
    ("X-Accel-Buffering", "no"),
)

#: The first chunk: a comment line, so that a browser's ``EventSource`` fires ``open`` before
#: the first event (ASP.NET Core writes it for Firefox).
FIRST_CHUNK = b":\r\n"


class ServerSentEventsTransport(Peer):
    """A client's event stream, carrying the frames of ``session`` (see the module)."""

    __slots__ = ("session", "token", "_streaming")

    #: The wire formats a session on this transport may use (the fan-out frames them).
    FORMATS = ("json+sse",)

    def __init__(self, io: PeerIO, session: Any, *, token: str, send_limit: int,
                 now: float) -> None:
        # The WebSocket protocol a Peer carries is never used here: nothing is read.
        super().__init__(io, max_message_size=1, send_limit=send_limit, now=now)
        #: the ``_session.ClientSession`` (``_transport.SessionEnd``) whose frames this carries
        self.session = session
        #: the connection token its requests name (``id=``)
        self.token = token
        #: whether the body goes on (until ``close`` queues its last chunk)
        self._streaming = True
        # Nothing is written before the front has written the head (``start``): the client's
        # first POST may come while the head is on its way, and its answer waits.
        self._blocked = True
        session.attach(self)

    def wire_format_for(self, protocol_name: str) -> str | None:
        return "json+sse" if protocol_name == "json" else None

    def push(self, data: bytes) -> bool:
        return self._push(data)

    def receive_posted(self, body: bytes, now: float) -> None:
        """The body of one of the client's ``POST`` requests: its messages."""
        self.last_receive = now
        self.session.receive([body])

    def close(self, code: int, reason: str = "") -> None:
        """End the body after what is queued; the socket closes once it is out."""
        if not self._streaming or self.state is ConnState.CLOSED:
            return
        self._streaming = False
        self._push(END_OF_STREAM)
        if self._reading:  # else not started yet: ``start`` stops reading at once
            self._stop_reading()
        self._start_close_timer()

    def _stop_reading(self) -> None:
        """What is queued is the last of it: the flusher drops the peer once it is out."""
        self._reading = False
        self.io.poller.watch(self, _OUT if self._blocked else 0)

    def start(self, stream: trio.SocketStream, initial: bytes) -> None:
        """The head is out: the socket is this peer's, and what waited goes out now."""
        super().start(stream, initial)
        self._blocked = False
        if not self._streaming:
            self._stop_reading()  # closed while the head was on its way
        if self._out:
            self.io.flusher.mark(self)

    # -- the Peer's hooks ----------------------------------------------------------------------

    def receive(self, data: bytes, now: float) -> None:
        """The client sends nothing on an event stream but its end: a closed ``EventSource``
        is a client gone (what it sends before that is dropped, unread)."""
        if self._reading and not data:
            self.drop()

    def _wait_writable(self, sent: int) -> None:
        self._head_left = _chunk_boundary(self._out, self._head_left, sent) - sent
        del self._out[:sent]
        self._blocked = True
        self.io.poller.watch(self, _IN | _OUT if self._reading else _OUT)

    def _overflow(self, size: int) -> None:
        self.session.slow_consumer(self.drop_backlog() + size, self._limit)

    def _internal_error(self) -> None:
        # A Peer's goodbye is a WebSocket close frame, which an event stream has no room for.
        self.io.stats.internal_errors += 1
        log.exception("dropping an event stream after an internal error")
        self.drop()

    def _ended(self) -> None:
        self.session.transport_ended()

    def tick(self, now: float) -> None:
        self.session.tick(now)


def _chunk_boundary(out: bytearray, head_left: int, sent: int) -> int:
    """The first chunk boundary in ``out`` at or after ``sent``, where ``out`` holds the
    ``head_left`` bytes that finish a partly written chunk and then whole chunks (``size`` in
    hex, CRLF, the data, CRLF). The twin of ``_peer._frame_boundary`` for a chunked body."""
    pos = head_left
    while pos < sent:
        line_end = out.find(b"\r\n", pos)
        if line_end < 0:  # cannot be: the buffer holds whole chunks
            raise ValueError(f"no whole chunk header at offset {pos} of the send buffer")
        pos = line_end + 2 + int(out[pos:line_end], 16) + 2
    return pos
