"""One client WebSocket connection: a read-feed-flush loop plus the relay's policies.

Theory of operation
-------------------
A ``ClientConnection`` is created after the WebSocket upgrade and runs two tasks:

* the **reader** feeds received bytes to the sans-I/O ``WebSocketProtocol``, completes the
  SignalR handshake (the first 0x1E-terminated JSON record), then parses hub messages (Close,
  Ping, invocations). It ends on EOF, on a close handshake, or on a protocol error.
* the **writer** sleeps until bytes are queued, then sends everything queued so far in one
  call. ``enqueue()`` never awaits, so a fan-out loop over thousands of connections queues the
  same frame everywhere in one scheduling round and each writer flushes it with one system call.

States: HANDSHAKE (not in the connection table) -> OPEN (in the table, receives fan-out) ->
CLOSING (out of the table, no more enqueues; the Close message and close frame are queued and
the peer has ``close_timeout`` to answer) -> CLOSED (TCP closed). Timers (handshake, keep-alive,
client timeout) are driven by the relay's ticker, which calls ``tick(now)``.

A send buffer holds at most ``send_buffer_limit`` bytes; a connection that falls further behind
is closed with a reason and counted (slow-consumer policy), never allowed to slow the others.
"""

from __future__ import annotations

import enum
import logging
import os
from typing import TYPE_CHECKING, Any

import trio

from ..protocol._errors import RemoteProtocolError
from ..protocol._hub import (
    CloseMessage,
    CompletionMessage,
    HandshakeRequest,
    InvocationMessage,
    PingMessage,
    StreamInvocationMessage,
    get_protocol,
    parse_handshake_request,
    write_handshake_response,
)
from ..protocol._websocket import (
    BinaryMessage,
    CloseCode,
    CloseReceived,
    Opcode,
    Role,
    State,
    TextMessage,
    WebSocketProtocol,
    frame,
)

if TYPE_CHECKING:
    from ._relay import Relay

log = logging.getLogger("relaycore.relay.client")

_READ_SIZE = 65536
#: Hub protocol versions a client may ask for (client-protocol §3.1: accept version <= 2;
#: 2 only turns on stateful reconnect, which the relay does not negotiate).
_MAX_HUB_VERSION = 2


class Flusher:
    """Writes every connection that got bytes in this scheduling round, once each.

    ``mark(conn)`` is called when a connection's empty buffer gets its first bytes; the
    flusher task wakes after the current task yields (so a fan-out loop has queued everything
    by then) and calls ``conn.flush()`` on each: one system call per recipient per round, and
    no task switch per recipient.
    """

    def __init__(self) -> None:
        self._dirty: list[ClientConnection] = []
        self._lot = trio.lowlevel.ParkingLot()

    def mark(self, conn: ClientConnection) -> None:
        self._dirty.append(conn)
        if self._lot:
            self._lot.unpark()

    async def run(self) -> None:
        while True:
            if not self._dirty:
                await self._lot.park()
                continue
            dirty, self._dirty = self._dirty, []
            now = trio.current_time()
            for conn in dirty:
                conn.flush(now)


class ConnState(enum.IntEnum):
    HANDSHAKE = 0
    OPEN = 1
    CLOSING = 2
    CLOSED = 3


class ClientConnection:
    """A SignalR client connected to a hub of this relay."""

    def __init__(
        self,
        relay: Relay,
        stream: trio.abc.Stream,
        *,
        connection_id: str,
        hub: str,
        claims: dict[str, Any],
        user_id: str | None,
        query: str,
        headers: dict[str, str],
        now: float,
    ) -> None:
        self.relay = relay
        self.stream = stream
        self.id = connection_id
        self.hub = hub
        self.claims = claims
        self.user_id = user_id
        self.query = query
        self.headers = headers
        self.groups: set[str] = set()
        self.protocol_name = ""
        self.protocol: Any = None
        self.state = ConnState.HANDSHAKE
        config = relay.config
        self.ws = WebSocketProtocol(Role.SERVER, max_message_size=config.max_message_size)
        self._limit = config.send_buffer_limit
        self._out = bytearray()
        self._lot = trio.lowlevel.ParkingLot()
        self._inbox = bytearray()  # hub bytes received but not yet parsed
        self.created = now
        self.last_receive = now
        self.last_send = now
        self.close_reason: str | None = None
        self._scope: trio.CancelScope | None = None
        self._writer_busy = False
        self._drain = False
        self._fd = stream.socket.fileno()  # type: ignore[attr-defined]

    # -- outbound ---------------------------------------------------------------------

    def enqueue(self, data: bytes) -> bool:
        """Queue a complete frame; False if the connection is not open or fell too far behind."""
        if self.state is not ConnState.OPEN:
            return False
        out = self._out
        if len(out) + len(data) > self._limit:
            self.relay.stats.slow_consumer_closes += 1
            log.warning("closing %s on hub %s: send buffer limit of %d bytes exceeded",
                        self.id, self.hub, self._limit)
            # What is queued stays (its head may be a frame already partly written); the Close
            # goes after it, and the close timer drops the socket if the client never reads.
            self.close(f"Connection closed: the send buffer limit of {self._limit} bytes was "
                       "exceeded (slow consumer).", code=CloseCode.POLICY_VIOLATION)
            return False
        if not out:
            self.relay.flusher.mark(self)
        out += data
        return True

    def _push(self, data: bytes) -> None:
        """Queue bytes whatever the state (handshake replies, pongs, close frames)."""
        if data:
            if not self._out:
                self.relay.flusher.mark(self)
            self._out += data

    def flush(self, now: float) -> None:
        """Write what is queued with one non-blocking system call (the flusher calls this once
        per scheduling round). What the socket does not take is left to the writer task,
        which waits until the socket is writable."""
        out = self._out
        if not out or self._writer_busy or self.state is ConnState.CLOSED:
            return
        try:
            sent = os.write(self._fd, out)
        except BlockingIOError:
            sent = 0
        except OSError:
            sent = 0  # the writer task meets the same error and ends the connection
        if sent == len(out):
            out.clear()
            self.last_send = now
            return
        del out[:sent]
        self._lot.unpark()

    def _hub_frame(self, message: Any) -> bytes:
        opcode = Opcode.BINARY if self.protocol_name == "messagepack" else Opcode.TEXT
        return frame(opcode, self.protocol.write(message))

    def close(self, reason: str | None = None, *, allow_reconnect: bool = False,
              code: int = CloseCode.NORMAL_CLOSURE) -> None:
        """Send a Close hub message (with ``reason`` as its error) and close the WebSocket."""
        if self.state >= ConnState.CLOSING:
            return
        self._leave_table()
        self.close_reason = reason
        if self.protocol is not None:
            self._push(self._hub_frame(CloseMessage(error=reason, allow_reconnect=allow_reconnect)))
        if self.ws.state is State.OPEN:
            self.ws.send_close(code, (reason or "")[:120])
            self._push(self.ws.data_to_send())
        self._start_close_timer()

    def _start_close_timer(self) -> None:
        if self._scope is not None:
            self._scope.deadline = min(self._scope.deadline,
                                       trio.current_time() + self.relay.config.close_timeout)

    def _leave_table(self) -> None:
        if self.state is ConnState.OPEN:
            self.relay._remove_connection(self)
        self.state = ConnState.CLOSING

    # -- timers -----------------------------------------------------------------------

    def tick(self, now: float) -> None:
        config = self.relay.config
        if self.state is ConnState.HANDSHAKE:
            if now - self.created > config.handshake_timeout:
                self._handshake_failed("Handshake was canceled.")
        elif self.state is ConnState.OPEN:
            if now - self.last_receive > config.client_timeout:
                self.close("Connection closed: the client sent nothing for "
                           f"{config.client_timeout:g} seconds (client timeout).")
            elif now - self.last_send >= config.keep_alive_interval and not self._out:
                self._push(self.relay.ping_frame(self.protocol_name))

    # -- the connection's life ----------------------------------------------------------

    async def run(self, initial: bytes) -> None:
        try:
            with trio.CancelScope() as self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer)
                    await self._reader(initial)
                    self._drain = True
                    if self._lot:
                        self._lot.unpark()
        finally:
            if self.state is ConnState.OPEN:
                self._leave_table()
            self.state = ConnState.CLOSED
            self.relay._forget(self)
            with trio.CancelScope(shield=True):
                await aclose_quietly(self.stream)

    async def _writer(self) -> None:
        """Sends what the flusher could not write at once (the socket was full), and the
        rest on close; while it holds bytes in flight the flusher leaves this connection be."""
        while True:
            if not self._out:
                if self._drain:
                    return
                await self._lot.park()
                continue
            data, self._out = self._out, bytearray()
            self._writer_busy = True
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                if self._scope is not None:
                    self._scope.cancel()
                return
            finally:
                self._writer_busy = False
            self.last_send = trio.current_time()

    async def _reader(self, initial: bytes) -> None:
        ws = self.ws
        data = initial
        while True:
            if data:
                self.last_receive = trio.current_time()
                ws.receive_data(data)
                self._handle_events(ws.events_received())
                if ws.error is not None:
                    self._fail_protocol(str(ws.error), ws.close_code)
                self._push(ws.data_to_send())
                if ws.close_expected():
                    return
            try:
                data = await self.stream.receive_some(_READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                ws.receive_eof()
                self.ws.events_received()
                return

    def _fail_protocol(self, reason: str, code: int | None) -> None:
        """The peer broke the WebSocket protocol; its close frame is already queued."""
        if self.state is ConnState.OPEN and self.protocol is not None:
            # The hub Close message must go out before the close frame the protocol queued.
            close_frame = self.ws.data_to_send()
            self._push(self._hub_frame(CloseMessage(error=f"Connection closed: {reason}")))
            self._push(close_frame)
        self._leave_table()
        self.close_reason = reason
        self.relay.stats.protocol_errors += 1
        log.info("connection %s on hub %s failed: %s (close code %s)", self.id, self.hub,
                 reason, code)
        self._start_close_timer()

    def _handle_events(self, events: list[Any]) -> None:
        for event in events:
            if isinstance(event, (TextMessage, BinaryMessage)):
                if self.state >= ConnState.CLOSING:
                    continue
                data = event.data.encode() if isinstance(event, TextMessage) else event.data
                self._inbox += data
                if self.state is ConnState.HANDSHAKE:
                    self._try_handshake()
                if self.state is ConnState.OPEN and self._inbox:
                    self._parse_hub_messages()
            elif isinstance(event, CloseReceived):
                if self.state is ConnState.OPEN:
                    self._leave_table()
                self.state = max(self.state, ConnState.CLOSING)

    # -- SignalR ----------------------------------------------------------------------

    def _handshake_failed(self, error: str) -> None:
        log.info("handshake of %s on hub %s failed: %s", self.id, self.hub, error)
        self.relay.stats.handshake_errors += 1
        self._push(frame(Opcode.TEXT, write_handshake_response(error)))
        self.state = ConnState.CLOSING
        if self.ws.state is State.OPEN:
            self.ws.send_close(CloseCode.NORMAL_CLOSURE)
            self._push(self.ws.data_to_send())
        self._start_close_timer()

    def _try_handshake(self) -> None:
        try:
            got = parse_handshake_request(self._inbox)
        except RemoteProtocolError as exc:
            self._handshake_failed(f"Invalid handshake request: {exc}")
            return
        if got is None:
            if len(self._inbox) > self.relay.config.max_message_size:
                self._handshake_failed("Handshake was canceled.")
            return
        request, consumed = got
        del self._inbox[:consumed]
        error = self._check_handshake(request)
        if error is not None:
            self._handshake_failed(error)
            return
        self.protocol_name = request.protocol.lower()
        self.protocol = get_protocol(self.protocol_name)
        opcode = Opcode.BINARY if self.protocol_name == "messagepack" else Opcode.TEXT
        self._push(frame(opcode, write_handshake_response(None)))
        self.relay._add_connection(self)

    def _check_handshake(self, request: HandshakeRequest) -> str | None:
        name = request.protocol.lower()
        try:
            get_protocol(name)
        except (KeyError, ValueError, RemoteProtocolError):
            return f"The protocol '{request.protocol}' is not supported."
        if not 1 <= request.version <= _MAX_HUB_VERSION:
            return (f"The server does not support version {request.version} of the "
                    f"'{request.protocol}' protocol.")
        return None

    def _parse_hub_messages(self) -> None:
        limit = self.relay.config.max_message_size
        try:
            messages, consumed = self.protocol.parse(self._inbox, limit)
        except RemoteProtocolError as exc:
            too_big = "exceed" in str(exc) or "limit" in str(exc)
            self._inbox.clear()
            self.relay.stats.protocol_errors += 1
            self.close(f"Connection closed with an error: {exc}",
                       code=CloseCode.MESSAGE_TOO_BIG if too_big
                       else CloseCode.INVALID_FRAME_PAYLOAD_DATA)
            return
        del self._inbox[:consumed]
        if len(self._inbox) > limit:
            self._inbox.clear()
            self.close(f"Connection closed with an error: a message exceeds the limit of "
                       f"{limit} bytes.", code=CloseCode.MESSAGE_TOO_BIG)
            return
        for message in messages:
            if isinstance(message, CloseMessage):
                self._leave_table()
                if self.ws.state is State.OPEN:
                    self.ws.send_close(CloseCode.NORMAL_CLOSURE)
                    self._push(self.ws.data_to_send())
                self._start_close_timer()
                return
            if isinstance(message, PingMessage):
                continue
            if isinstance(message, (InvocationMessage, StreamInvocationMessage)):
                self.relay._client_invocation(self, message)

    def reply(self, message: Any) -> None:
        """Send one hub message to this client (a completion, say)."""
        if self.state is ConnState.OPEN:
            self._push(self._hub_frame(message))

    def not_delivered(self, message: InvocationMessage | StreamInvocationMessage) -> None:
        if message.invocation_id is not None:
            self.reply(CompletionMessage(
                invocation_id=message.invocation_id,
                error=f"Invocation of '{message.target}' was not delivered: hub '{self.hub}' "
                      "has no app server connected and no upstream configured."))


async def aclose_quietly(stream: trio.abc.Stream) -> None:
    try:
        await stream.aclose()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
