"""One client connection: the SignalR handshake, then either an app server or the relay itself.

Theory of operation
-------------------
A ``ClientConnection`` is a ``Peer`` (see ``_peer``) created after the WebSocket upgrade. The
first 0x1E-terminated record it receives is the SignalR handshake request; the relay reads it
to learn the client's hub protocol, then one of two things happens:

* **Bound to an app server** (the hub has a live server connection that carries clients): the
  relay sends that server connection ``OpenConnection`` and forwards the client's bytes,
  beginning with the handshake request, as ``ConnectionData``, unchanged. The app server's hub
  answers the handshake; the client becomes OPEN (routable) when that answer is ``{}``.
* **Serverless** (no app server and the relay's mode allows it): the relay answers the
  handshake itself and parses the client's hub messages (Close, Ping, invocations, which get a
  completion error rather than silence).

HANDSHAKE -> OPEN (in the connection table) -> CLOSING (out of the table; a Close message and
close frame queued) -> CLOSED. Timers (handshake, keep-alive, client timeout) are driven by the
relay's ticker through ``tick(now)``. ``enqueue`` never awaits; a connection whose send buffer
passes ``send_buffer_limit`` is closed with a reason and counted (slow-consumer policy).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .._accel import encode_varint, split_records, split_varint_frames
from ..protocol._errors import RemoteProtocolError
from ..protocol._hub import (
    CloseMessage,
    CompletionMessage,
    InvocationMessage,
    StreamInvocationMessage,
    check_handshake_request,
    get_protocol,
    parse_handshake_request,
    parse_handshake_response,
    write_handshake_response,
)
from ..protocol._websocket import (
    BinaryMessage,
    CloseCode,
    CloseReceived,
    Opcode,
    TextMessage,
    frame,
)
from ._peer import ConnState, Peer

if TYPE_CHECKING:
    from ._relay import Relay
    from ._server import ServerConnection

log = logging.getLogger("relaycore.relay.client")

#: A whole WebSocket message that is one Ping hub message, as the official clients send it
#: (JSON ``{"type":6}`` + record separator; MessagePack ``[6]`` with its varint length).
_PINGS = frozenset({b'{"type":6}\x1e', b"\x02\x91\x06"})


class ClientConnection(Peer):
    """A SignalR client connected to a hub of this relay."""

    __slots__ = ("id", "hub", "claims", "user_id", "query", "headers", "groups",
                 "protocol_name", "protocol", "server", "close_reason", "data_prefix",
                 "_inbox")

    def __init__(
        self,
        relay: Relay,
        *,
        connection_id: str,
        hub: str,
        claims: dict[str, Any],
        user_id: str | None,
        query: str,
        headers: dict[str, str],
        now: float,
    ) -> None:
        super().__init__(relay, max_message_size=relay.config.max_message_size,
                         send_limit=relay.config.send_buffer_limit, now=now)
        self.id = connection_id
        self.hub = hub
        self.claims = claims
        self.user_id = user_id
        self.query = query
        self.headers = headers
        self.groups: set[str] = set()
        self.protocol_name = ""
        self.protocol: Any = None
        self.server: ServerConnection | None = None
        #: The start of every ``ConnectionData`` body for this client (set when bound).
        self.data_prefix = b""
        self.close_reason: str | None = None
        self._inbox = bytearray()  # bytes received but not yet handled

    # -- outbound ------------------------------------------------------------------------------

    def enqueue(self, data: bytes) -> bool:
        """Queue a complete frame; False if the connection is not open or fell too far behind."""
        if self.state is not ConnState.OPEN:
            return False
        return self._push(data)

    def _overflow(self, size: int) -> None:
        """The slow-consumer policy: the backlog goes (but the rest of a frame the socket
        took part of) so that the Close message and the close frame are the next things the
        client reads; the close timer drops the socket if it never reads again."""
        dropped = self.drop_backlog() + size
        stats = self.relay.stats
        stats.slow_consumer_closes += 1
        stats.slow_consumer_dropped_bytes += dropped
        log.warning(
            "closing %s on hub %s: send buffer limit of %d bytes exceeded; %d bytes of "
            "backlog dropped",
            self.id,
            self.hub,
            self._limit,
            dropped,
        )
        self.close(
            f"Connection closed: the send buffer limit of {self._limit} bytes was "
            "exceeded (slow consumer).",
            code=CloseCode.POLICY_VIOLATION,
        )

    def _frame(self, payload: bytes) -> bytes:
        return frame(Opcode.BINARY if self.protocol_name == "messagepack" else Opcode.TEXT, payload)

    def _hub_frame(self, message: Any) -> bytes:
        return self._frame(self.protocol.write(message))

    def reply(self, message: Any) -> None:
        """Send one hub message to this client (a completion, say)."""
        if self.state is ConnState.OPEN:
            self._push(self._hub_frame(message))

    def close(
        self,
        reason: str | None = None,
        *,
        allow_reconnect: bool = False,
        code: int = CloseCode.NORMAL_CLOSURE,
    ) -> None:
        """Send a Close hub message (with ``reason`` as its error) and close the WebSocket."""
        if self.state >= ConnState.CLOSING:
            return
        self._leave(reason)
        if self.protocol is not None:
            self._push(self._hub_frame(CloseMessage(error=reason, allow_reconnect=allow_reconnect)))
        self._send_close_frame(code, reason or "")
        self._start_close_timer()

    def close_from_server(self, error: str | None) -> None:
        """The app server ended this client; its hub has already sent the Close message."""
        if self.state >= ConnState.CLOSING:
            return
        self.server = None  # the server knows; do not tell it back
        self._leave(error)
        self._send_close_frame(CloseCode.NORMAL_CLOSURE)
        self._start_close_timer()

    def _leave(self, reason: str | None) -> None:
        """Leave the connection table and the app server (once)."""
        if self.state >= ConnState.CLOSING:
            return
        self.close_reason = reason
        if self.state is ConnState.OPEN:
            self.relay._remove_connection(self)
        self.state = ConnState.CLOSING
        if self.server is not None:
            self.server.client_closed(self, reason)
            self.server = None

    def _ended(self) -> None:
        self._leave(self.close_reason)
        self.relay._forget(self)

    # -- timers --------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        config = self.relay.config
        if self.state is ConnState.HANDSHAKE:
            if now - self.created > config.handshake_timeout:
                self._handshake_failed("Handshake was canceled.")
        elif self.state is ConnState.OPEN:
            if now - self.last_receive > config.client_timeout:
                self.close(
                    "Connection closed: the client sent nothing for "
                    f"{config.client_timeout:g} seconds (client timeout)."
                )
            elif now - self.last_send >= config.keep_alive_interval and not self._out:
                self._push(self.relay.ping_frame(self.protocol_name))

    # -- inbound -------------------------------------------------------------------------------

    def _on_protocol_error(self, reason: str, code: int | None) -> None:
        if self.state is ConnState.OPEN and self.protocol is not None:
            # The hub Close message must go out before the close frame the protocol queued.
            close_frame = self.ws.data_to_send()
            self._push(self._hub_frame(CloseMessage(error=f"Connection closed: {reason}")))
            self._push(close_frame)
        self._leave(reason)
        self.relay.stats.protocol_errors += 1
        log.info(
            "connection %s on hub %s failed: %s (close code %s)", self.id, self.hub, reason, code
        )
        self._start_close_timer()

    def _handle_events(self, events: list[Any]) -> None:
        for event in events:
            if isinstance(event, (TextMessage, BinaryMessage)):
                self._handle_messages(
                    [event.data.encode() if isinstance(event, TextMessage) else event.data]
                )
            elif isinstance(event, CloseReceived):
                self._leave(self.close_reason)

    def _handle_messages(self, messages: list[bytes]) -> None:
        server = self.server
        for data in messages:
            if self.state >= ConnState.CLOSING:
                return
            if server is not None and self.protocol is not None:
                server.client_data(self, data)
                continue
            if data in _PINGS and not self._inbox and self.state is ConnState.OPEN:
                continue  # a keep-alive ping, the most common message: nothing to do
            self._inbox += data
            if self.protocol is None:
                self._try_handshake()
                server = self.server
            if self.state is ConnState.OPEN and self._inbox and server is None:
                self._parse_hub_messages()

    # -- SignalR ----------------------------------------------------------------------------

    def _handshake_failed(self, error: str) -> None:
        log.info("handshake of %s on hub %s failed: %s", self.id, self.hub, error)
        self.relay.stats.handshake_errors += 1
        self._push(frame(Opcode.TEXT, write_handshake_response(error)))
        self._leave(error)
        self._send_close_frame(CloseCode.NORMAL_CLOSURE)
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
        # Versions up to MAX_HUB_PROTOCOL_VERSION, 0 included (what signalrcore sends); 2 only
        # turns on stateful reconnect, which the relay does not negotiate.
        error = check_handshake_request(request)
        if error is not None:
            self._handshake_failed(error)
            return
        self.protocol_name = request.protocol.lower()
        self.protocol = get_protocol(self.protocol_name)
        server = self.relay.choose_server(self.hub)
        if server is not None:
            # The app server's hub answers the handshake: forward it and what follows, as is.
            data, self._inbox = bytes(self._inbox), bytearray()
            self.server = server
            server.client_opened(self, data)
            return
        if not self.relay.serves_hubs_itself:
            self._handshake_failed(f"No app server is connected to hub '{self.hub}'.")
            return
        del self._inbox[:consumed]
        self.headers = {}  # only an app server is ever told them
        self._push(self._frame(write_handshake_response(None)))
        self.relay._add_connection(self)

    def server_data(self, payload: bytes) -> None:
        """Bytes from the app server's hub: framed hub messages, written as they are."""
        if self.state is ConnState.HANDSHAKE:
            try:
                answer = parse_handshake_response(payload)
            except RemoteProtocolError:
                answer = None
            self._push(self._frame(payload))
            if answer is not None and answer[0] is None:
                self.relay._add_connection(self)
            elif answer is not None:
                self.relay.stats.handshake_errors += 1
                self._leave(answer[0])
                self._send_close_frame(CloseCode.NORMAL_CLOSURE)
                self._start_close_timer()
        elif self.state is ConnState.OPEN:
            self.enqueue(self._frame(payload))

    def _parse_hub_messages(self) -> None:
        """Serverless: handle the client's complete hub messages (each kept as its raw bytes,
        which is what an upstream receives)."""
        limit = self.relay.config.max_message_size
        try:
            for body, message in self._split_messages(limit):
                if isinstance(message, CloseMessage):
                    self._leave(None)
                    self._send_close_frame(CloseCode.NORMAL_CLOSURE)
                    self._start_close_timer()
                    return
                if isinstance(message, (InvocationMessage, StreamInvocationMessage)):
                    self.relay._client_invocation(self, message, body)
        except (RemoteProtocolError, ValueError) as exc:
            too_big = "exceed" in str(exc)
            self._inbox.clear()
            self.relay.stats.protocol_errors += 1
            self.close(f"Connection closed with an error: {exc}",
                       code=CloseCode.MESSAGE_TOO_BIG if too_big
                       else CloseCode.INVALID_FRAME_PAYLOAD_DATA)

    def _split_messages(self, limit: int) -> list[tuple[bytes, Any]]:
        """The complete messages in the inbox as ``(unframed bytes, message)``; unknown
        message types are skipped. Raises for a malformed or oversized message."""
        if self.protocol_name == "json":
            bodies, consumed = split_records(self._inbox)
            if len(self._inbox) - consumed > limit:
                raise RemoteProtocolError(
                    f"a message exceeds the maximum message size of {limit} bytes")
            framed = [body + b"\x1e" for body in bodies]
        else:
            bodies, consumed = split_varint_frames(self._inbox, limit)
            framed = [encode_varint(len(body)) + body for body in bodies]
        del self._inbox[:consumed]
        out = []
        for body, data in zip(bodies, framed, strict=True):
            messages, _ = self.protocol.parse(data, limit)
            if messages:
                out.append((body, messages[0]))
        return out

    def send_framed(self, payload: bytes) -> None:
        """Send complete framed hub messages (an upstream's answer) to this client as is."""
        if self.state is ConnState.OPEN:
            self._push(self._frame(payload))

    def not_delivered(self, message: InvocationMessage | StreamInvocationMessage) -> None:
        if message.invocation_id is not None:
            self.reply(
                CompletionMessage(
                    invocation_id=message.invocation_id,
                    error=f"Invocation of '{_quoted(message.target)}' was not delivered: hub "
                    f"'{self.hub}' has no app server connected and no upstream configured.",
                )
            )


def _quoted(name: str, limit: int = 100) -> str:
    """A client-chosen name quoted back in an error, at most ``limit`` characters: a 60 KB
    method name is not repeated in every answer."""
    return name if len(name) <= limit else name[:limit] + "..."
