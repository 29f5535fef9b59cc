"""The WebSocket transport of a client session: a ``Peer`` that carries one session's frames.

The session (``_session.ClientSession``) holds everything SignalR; this class only moves its
bytes: whole WebSocket data messages go to ``session.receive``, a close or a broken stream to
the session's ``transport_*`` methods, and the frames the session (or the fan-out, through the
shared buffer) queues go out through the poller and flusher like every peer's. Hub protocols
map onto WebSocket frames one to one: the wire format of a hub protocol is its name (JSON in
text frames, MessagePack in binary ones: ``_message.WIRE_FORMATS``). ``ResumedTransport`` is
the WebSocket a stateful-reconnect session resumes on.
"""

from __future__ import annotations

from typing import Any, Protocol

import trio

from ..protocol._websocket import BinaryMessage, CloseReceived, TextMessage
from ._peer import Peer, PeerIO


class SessionEnd(Protocol):
    """What the transport tells its session (``_session.ClientSession``)."""

    def receive(self, messages: list[bytes]) -> None: ...

    def transport_closing(self) -> None: ...

    def transport_failed(self, reason: str, code: int | None) -> None: ...

    def transport_ended(self) -> None: ...

    def slow_consumer(self, dropped: int, limit: int) -> None: ...

    def tick(self, now: float) -> None: ...


class WebSocketTransport(Peer):
    """An upgraded client WebSocket, carrying the frames of ``session``."""

    __slots__ = ("session",)

    def __init__(self, io: PeerIO, session: Any, *, max_message_size: int, send_limit: int,
                 now: float) -> None:
        super().__init__(io, max_message_size=max_message_size, send_limit=send_limit,
                         now=now)
        self.session: SessionEnd = session
        session.attach(self)

    def wire_format_for(self, protocol_name: str) -> str:
        return protocol_name

    def push(self, data: bytes) -> bool:
        return self._push(data)

    def close(self, code: int, reason: str = "") -> None:
        self._send_close_frame(code, reason)
        self._start_close_timer()

    # -- the Peer's hooks ----------------------------------------------------------------------

    def _handle_messages(self, messages: list[bytes]) -> None:
        self.session.receive(messages)

    def _handle_events(self, events: list[Any]) -> None:
        for event in events:
            if isinstance(event, TextMessage):
                self.session.receive([event.data.encode()])
            elif isinstance(event, BinaryMessage):
                self.session.receive([event.data])
            elif isinstance(event, CloseReceived):
                self.session.transport_closing()

    def _on_protocol_error(self, reason: str, code: int | None) -> None:
        # The session's Close message must go out before the close frame the protocol queued.
        close_frame = self.ws.data_to_send()
        self.session.transport_failed(reason, code)
        self._push(close_frame)
        self._start_close_timer()

    def _overflow(self, size: int) -> None:
        self.session.slow_consumer(self.drop_backlog() + size, self._limit)

    def _ended(self) -> None:
        self.session.transport_ended()

    def tick(self, now: float) -> None:
        self.session.tick(now)


class ResumedTransport(WebSocketTransport):
    """The WebSocket a stateful session resumes on (``_session.StatefulSession``: the same
    connection token, within its window). It takes the session over only once its socket is
    the poller's, so that what the session sends meanwhile goes to a transport that can write
    it; then it reads what the client sent with its upgrade (the client's Sequence, say)."""

    __slots__ = ()

    def start(self, stream: trio.SocketStream, initial: bytes) -> None:
        super().start(stream, b"")
        self.session.resume(self)  # type: ignore[attr-defined]
        if initial:
            self.receive(initial, trio.current_time())
