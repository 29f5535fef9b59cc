"""Stateful reconnect's bookkeeping (``client-protocol.md`` §4.4; the JS client's
``MessageBuffer``): what was sent and not yet acknowledged, what was received and processed.

Only *trackable* messages count (Invocation, StreamItem, Completion, StreamInvocation,
CancelInvocation); neither side numbers them on the wire, each counts them from 1.

Sending: each trackable message is kept, with its number, until the server's Ack covers it.
Once the kept bytes reach ``size``, a sender waits (after sending) until acks make room.

Receiving: each trackable message takes the next number; one at or below the highest
processed is a duplicate that the server replayed after a resume, and is dropped. One second
after something new was processed, the client acks the highest number (one timer, not
repeated without new messages).

Resuming after the transport dropped: everything received is ignored until the server's
Sequence, which says which number its next message has (a number beyond what was received is
an error); the client starts its own side with a Sequence naming its oldest unacknowledged
message (or the next number when none is kept) and sends every kept message again, in order.
"""

from __future__ import annotations

from collections import deque
from typing import Final

import anyio

from ..protocol import (
    CancelInvocationMessage,
    CompletionMessage,
    HubMessage,
    InvocationMessage,
    SequenceMessage,
    StreamInvocationMessage,
    StreamItemMessage,
)
from ._errors import HubConnectionError

__all__ = ["ACK_DELAY", "DEFAULT_BUFFER_SIZE", "MessageBuffer", "is_trackable"]

#: The JS client's default for ``withStatefulReconnect({ bufferSize })``, in bytes.
DEFAULT_BUFFER_SIZE: Final = 100_000
#: Seconds between receiving something new and acking it (the JS client's timer).
ACK_DELAY: Final = 1.0

_TRACKABLE: Final = (InvocationMessage, StreamItemMessage, CompletionMessage,
                     StreamInvocationMessage, CancelInvocationMessage)


def is_trackable(message: HubMessage) -> bool:
    """Whether ``message`` is numbered, kept and replayed (types 1 to 5)."""
    return isinstance(message, _TRACKABLE)


class MessageBuffer:
    """One logical connection's stateful-reconnect state (see the module doc)."""

    def __init__(self, size: int = DEFAULT_BUFFER_SIZE) -> None:
        self.size = size
        #: Kept messages: (number, bytes), oldest first.
        self._kept: deque[tuple[int, bytes]] = deque()
        self._kept_bytes = 0
        self._sent_count = 0
        self._room: anyio.Event | None = None
        self._ended: BaseException | None = None
        #: The number the next trackable message received takes.
        self._next_received = 1
        #: The highest number processed, never lowered.
        self.latest_received = 0
        #: Since when something new was processed and not acked (``None``: nothing).
        self.ack_since: float | None = None
        self._waiting_for_sequence = False

    # -- sending --------------------------------------------------------------------------

    def keep(self, data: bytes) -> None:
        """Keep a trackable message about to be sent."""
        self._sent_count += 1
        self._kept.append((self._sent_count, data))
        self._kept_bytes += len(data)

    @property
    def full(self) -> bool:
        return self._kept_bytes >= self.size

    async def room(self) -> None:
        """Wait until the kept bytes are under ``size`` again (the server's acks); raises
        what ``end`` was given once the connection ended."""
        while self.full:
            if self._ended is not None:
                raise self._ended
            if self._room is None:
                self._room = anyio.Event()
            await self._room.wait()

    def end(self, error: BaseException) -> None:
        """The connection ended for good: senders waiting for room get ``error``."""
        self._ended = error
        if self._room is not None:
            self._room.set()
            self._room = None

    def acknowledged(self, sequence_id: int) -> None:
        """The server's Ack: every kept message numbered ``sequence_id`` or lower arrived."""
        while self._kept and self._kept[0][0] <= sequence_id:
            self._kept_bytes -= len(self._kept.popleft()[1])
        if not self.full and self._room is not None:
            self._room.set()
            self._room = None

    def replay_from(self) -> int:
        """The number of the Sequence that starts a resumed connection."""
        return self._kept[0][0] if self._kept else self._sent_count + 1

    def kept(self, index: int) -> bytes | None:
        """The ``index``-th kept message (``None`` past the last), for the replay: messages
        kept during the replay are replayed too."""
        return self._kept[index][1] if index < len(self._kept) else None

    # -- receiving ------------------------------------------------------------------------

    def disconnected(self) -> None:
        """The transport dropped: ignore everything until the server's Sequence."""
        self._waiting_for_sequence = True

    def should_process(self, message: HubMessage, now: float) -> bool:
        """Whether a received message is new (and, for a trackable one, count it)."""
        if self._waiting_for_sequence:
            if not isinstance(message, SequenceMessage):
                return False
            self._waiting_for_sequence = False
            return True
        if not is_trackable(message):
            return True
        number = self._next_received
        self._next_received += 1
        if number <= self.latest_received:
            if number == self.latest_received:
                # The server replays what it has not seen acked: ack it again.
                self.ack_since = self.ack_since if self.ack_since is not None else now
            return False
        self.latest_received = number
        if self.ack_since is None:
            self.ack_since = now
        return True

    def sequence(self, sequence_id: int) -> None:
        """The server's Sequence: its next trackable message has number ``sequence_id``."""
        if sequence_id > self._next_received:
            raise HubConnectionError(
                "Sequence ID greater than amount of messages we've received: the server "
                f"resumes at {sequence_id}, {self._next_received - 1} arrived.")
        self._next_received = sequence_id
