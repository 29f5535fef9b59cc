"""One client session: the SignalR handshake, then either an app server or the relay itself.

Theory of operation
-------------------
A ``ClientSession`` is what a client is to the relay, whatever carries its bytes: its id, hub,
user, claims, groups, hub protocol, the app-server connection it is bound to, and its state.
A *transport* carries its frames (``_transport.WebSocketTransport`` today; Server-Sent Events
and long polling are transports too): it hands the session the client's whole messages
(``receive``), tells it when the client went away (``transport_ended``), and takes the frames
the session sends (``push``). The connection table and the fan-out see the session: it has the
fan-out's ``state``, ``wire_format`` (its hub protocol as its transport frames it) and ``_out``,
which *is* its transport's send buffer, so a broadcast appends to it directly.

The first 0x1E-terminated record the client sends is the SignalR handshake request; the session
reads it to learn the client's hub protocol, then one of two things happens:

* **Bound to an app server** (the hub has a live server connection that carries clients): the
  session sends that server connection ``OpenConnection`` and forwards the client's bytes,
  beginning with the handshake request, as ``ConnectionData``, unchanged. The app server's hub
  answers the handshake; the client becomes OPEN (routable) when that answer is ``{}``.
* **Serverless** (no app server and the relay's mode allows it): the relay answers the
  handshake itself and parses the client's hub messages (Close, Ping, invocations, which get a
  completion error rather than silence).

HANDSHAKE -> OPEN (in the connection table) -> CLOSING (out of the table; a Close message and
the transport's close queued) -> CLOSED. Timers (handshake, keep-alive, client timeout) are
driven by the relay's ticker through the transport's ``tick(now)``. Nothing here awaits; a
session whose transport buffer passes ``send_buffer_limit`` is closed with a reason and counted
(slow-consumer policy).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from .._accel import encode_varint, split_records, split_varint_frames
from ..protocol._errors import RemoteProtocolError
from ..protocol._handshake import HandshakeRefused, HandshakeResponseReader, HubHandshake
from ..protocol._hub import (
    CloseMessage,
    CompletionMessage,
    InvocationMessage,
    PingMessage,
    StreamInvocationMessage,
    get_protocol,
)
from ..protocol._websocket import CloseCode
from ._message import WIRE_FORMATS
from ._operations import Operations
from ._peer import ConnState

log = logging.getLogger("relaycore.relay.client")

#: A whole message that is one Ping hub message, as the official clients send it (JSON
#: ``{"type":6}`` + record separator; MessagePack ``[6]`` with its varint length).
_PINGS = frozenset({b'{"type":6}\x1e', b"\x02\x91\x06"})

#: The keep-alive Ping hub message per protocol, written once.
_PING_PAYLOADS = {name: get_protocol(name).write(PingMessage())
                  for name in ("json", "messagepack")}


class Transport(Protocol):
    """What a session needs of whatever carries its frames."""

    state: ConnState
    created: float
    last_receive: float
    last_send: float
    _out: bytearray

    def wire_format_for(self, protocol_name: str) -> str | None:
        """The fan-out's key for ``protocol_name`` as this transport frames it; None when
        this transport cannot carry that protocol (the handshake is refused)."""

    def push(self, data: bytes) -> bool:
        """Queue complete frames; False (and the session is closed) past the send limit."""

    def close(self, code: int, reason: str = "") -> None:
        """End the transport once what is queued is out (within the close timeout)."""


class ServerBinding(Protocol):
    """The app-server connection a session is bound to (``_server.ServerConnection``)."""

    server_id: str

    def client_opened(self, client: ClientSession, handshake: bytes) -> None: ...

    def client_data(self, client: ClientSession, data: bytes) -> None: ...

    def client_closed(self, client: ClientSession, error: str | None) -> None: ...


class ClientSession:
    """A SignalR client connected to a hub of this relay (see the module's docstring)."""

    __slots__ = ("ops", "transport", "id", "hub", "claims", "user_id", "query", "headers",
                 "groups", "protocol_name", "protocol", "wire_format", "server",
                 "close_reason", "data_prefix", "state", "_out", "_sink", "_inbox",
                 "_handshake", "_answer")

    def __init__(
        self,
        ops: Operations,
        *,
        connection_id: str,
        hub: str,
        claims: dict[str, Any],
        user_id: str | None,
        query: str,
        headers: dict[str, str],
    ) -> None:
        self.ops = ops
        self.transport: Any = None
        self.id = connection_id
        self.hub = hub
        self.claims = claims
        self.user_id = user_id
        self.query = query
        self.headers = headers
        self.groups: set[str] = set()
        self.protocol_name = ""
        self.protocol: Any = None
        self.wire_format = ""
        self.server: ServerBinding | None = None
        #: The start of every ``ConnectionData`` body for this client (set when bound).
        self.data_prefix = b""
        self.close_reason: str | None = None
        self.state = ConnState.HANDSHAKE
        self._out = bytearray()
        self._sink: Any = None
        self._inbox = bytearray()  # bytes received but not yet handled
        #: The client's handshake, until it is decided; then the app server's answer to it,
        #: until that has arrived (an open session keeps neither).
        self._handshake: HubHandshake | None = HubHandshake(ops.config.max_message_size)
        self._answer: HandshakeResponseReader | None = None

    def attach(self, transport: Transport) -> None:
        """Carry this session's frames on ``transport`` from now on."""
        self.transport = transport
        self._out = transport._out  # the fan-out appends to the transport's buffer
        self._sink = transport  # and the flusher writes the transport

    # -- outbound ------------------------------------------------------------------------------

    def _set_state(self, state: ConnState) -> None:
        self.state = state
        self.transport.state = state

    def enqueue(self, data: bytes) -> bool:
        """Queue a complete frame; False if the session is not open or fell too far behind."""
        if self.state is not ConnState.OPEN:
            return False
        return self.transport.push(data)

    def _send(self, payload: bytes, wire_format: str | None = None) -> bool:
        """Frame hub-protocol bytes for this session's transport and queue them."""
        return self.transport.push(WIRE_FORMATS[wire_format or self.wire_format][1](payload))

    def reply(self, message: Any) -> None:
        """Send one hub message to this client (a completion, say)."""
        if self.state is ConnState.OPEN:
            self._send(self.protocol.write(message))

    def send_framed(self, payload: bytes) -> None:
        """Send complete framed hub messages (an upstream's answer) to this client as is."""
        if self.state is ConnState.OPEN:
            self._send(payload)

    def slow_consumer(self, dropped: int, limit: int) -> None:
        """The transport's buffer would pass ``limit``: its backlog (``dropped`` bytes) is
        gone, so that the Close message and the close are the next things the client reads;
        the close timer drops the transport if the client never reads again."""
        stats = self.ops.stats
        stats.slow_consumer_closes += 1
        stats.slow_consumer_dropped_bytes += dropped
        log.warning(
            "closing %s on hub %s: send buffer limit of %d bytes exceeded; %d bytes of "
            "backlog dropped",
            self.id,
            self.hub,
            limit,
            dropped,
        )
        self.close(
            f"Connection closed: the send buffer limit of {limit} bytes was "
            "exceeded (slow consumer).",
            code=CloseCode.POLICY_VIOLATION,
        )

    def close(
        self,
        reason: str | None = None,
        *,
        allow_reconnect: bool = False,
        code: int = CloseCode.NORMAL_CLOSURE,
    ) -> None:
        """Send a Close hub message (with ``reason`` as its error) and close the transport.
        A client still waiting for its handshake answer reads the reason as that answer: a
        SignalR client takes its first record for the handshake response, and a hub message
        there would be an error of its own."""
        if self.state >= ConnState.CLOSING:
            return
        if self.state is ConnState.HANDSHAKE and self._handshake is not None:
            self._handshake_failed(reason or "The connection was closed.")
            return
        self._leave(reason)
        if self.protocol is not None:
            self._send(self.protocol.write(
                CloseMessage(error=reason, allow_reconnect=allow_reconnect)))
        self.transport.close(code, reason or "")

    def close_from_server(self, error: str | None) -> None:
        """The app server ended this client; its hub has already sent the Close message."""
        if self.state >= ConnState.CLOSING:
            return
        self._leave(error, tell_server=False)  # the server knows; do not tell it back
        self.transport.close(CloseCode.NORMAL_CLOSURE)

    def _leave(self, reason: str | None, *, tell_server: bool = True) -> None:
        """Leave the connection table and the app server (once). The session stays bound
        until the table has seen it go: a client of an app server is not a serverless one
        (no upstream event) even when its app server is what closed it."""
        if self.state >= ConnState.CLOSING:
            return
        self.close_reason = reason
        if self.state is ConnState.OPEN:
            self.ops.connection_closed(self, reason)
        self._set_state(ConnState.CLOSING)
        server, self.server = self.server, None
        if server is not None and tell_server:
            server.client_closed(self, reason)

    def _open(self) -> None:
        self.transport.state = ConnState.OPEN
        self.ops.connection_opened(self)

    # -- from the transport --------------------------------------------------------------------

    def transport_ended(self) -> None:
        """The transport is gone (closed, dropped, timed out): leave everything."""
        self._leave(self.close_reason)
        self.state = ConnState.CLOSED

    def transport_closing(self) -> None:
        """The client started to close its transport."""
        self._leave(self.close_reason)

    def transport_failed(self, reason: str, code: int | None) -> None:
        """The client broke its transport's protocol; the transport closes itself after the
        Close message this queues."""
        if self.state is ConnState.OPEN and self.protocol is not None:
            self._send(self.protocol.write(CloseMessage(error=f"Connection closed: {reason}")))
        self._leave(reason)
        self.ops.stats.protocol_errors += 1
        log.info(
            "connection %s on hub %s failed: %s (close code %s)", self.id, self.hub, reason, code
        )

    def tick(self, now: float) -> None:
        config = self.ops.config
        transport = self.transport
        if self.state is ConnState.HANDSHAKE:
            if now - transport.created > config.handshake_timeout:
                self._handshake_failed(cancel=True)
        elif self.state is ConnState.OPEN:
            if now - transport.last_receive > config.client_timeout:
                self.close(
                    "Connection closed: the client sent nothing for "
                    f"{config.client_timeout:g} seconds (client timeout)."
                )
            elif now - transport.last_send >= config.keep_alive_interval and not self._out:
                self._send(_PING_PAYLOADS[self.protocol_name])

    def receive(self, messages: list[bytes]) -> None:
        """Whole messages from the client (each one transport message)."""
        server = self.server
        for data in messages:
            if self.state >= ConnState.CLOSING:
                return
            if server is not None and self.protocol is not None:
                server.client_data(self, data)
                continue
            if data in _PINGS and not self._inbox and self.state is ConnState.OPEN:
                continue  # a keep-alive ping, the most common message: nothing to do
            if self.protocol is None:
                self._try_handshake(data)
                server = self.server
            else:
                self._inbox += data
            if self.state is ConnState.OPEN and self._inbox and server is None:
                self._parse_hub_messages()

    # -- SignalR -------------------------------------------------------------------------------

    def _handshake_failed(self, error: str | None = None, *, cancel: bool = False) -> None:
        """Answer the handshake with its refusal (the one it reached, ``error``, or the
        timeout's) and close."""
        handshake = self._handshake
        if handshake is None:  # the app server's answer did not come in time
            handshake = HubHandshake(self.ops.config.max_message_size)
            cancel = True
        if cancel:
            handshake.cancel()
        elif error is not None:
            handshake.refuse(error)
        refused = handshake.result
        assert isinstance(refused, HandshakeRefused)
        log.info("handshake of %s on hub %s failed: %s", self.id, self.hub, refused.error)
        self.ops.stats.handshake_errors += 1
        self._send(handshake.data_to_send(), self.transport.wire_format_for("json"))
        self._handshake = None
        self._leave(refused.error)
        self.transport.close(CloseCode.NORMAL_CLOSURE)

    def _try_handshake(self, data: bytes) -> None:
        handshake = self._handshake
        assert handshake is not None
        handshake.receive_data(data)
        accepted = handshake.result
        if accepted is None:
            return
        if isinstance(accepted, HandshakeRefused):
            self._handshake_failed()
            return
        wire_format = self.transport.wire_format_for(accepted.protocol)
        if wire_format is None:  # ASP.NET Core's words for Binary over Server-Sent Events
            self._handshake_failed(
                f"Cannot use the '{accepted.protocol}' protocol on the current transport. The "
                f"transport does not support '{accepted.hub_protocol.transfer_format}' "
                "transfer format.")
            return
        self.protocol_name = accepted.protocol
        self.protocol = accepted.hub_protocol
        self.wire_format = wire_format
        server = self.ops.choose_server(self.hub)
        if server is not None:
            # The app server's hub answers the handshake: forward it and what follows, as is.
            self.server = server
            self._answer = HandshakeResponseReader(self.ops.config.max_message_size)
            server.client_opened(self, accepted.request + accepted.rest)
            return
        if not self.ops.serves_hubs_itself:
            self._handshake_failed(f"No app server is connected to hub '{self.hub}'.")
            return
        self.headers = {}  # only an app server is ever told them
        self._send(handshake.data_to_send())
        self._handshake = None
        self._inbox += accepted.rest
        self._open()

    def server_data(self, payload: bytes) -> None:
        """Bytes from the app server's hub: framed hub messages, written as they are."""
        if self.state is ConnState.HANDSHAKE:
            answer = self._answer
            try:
                if answer is not None:
                    answer.receive_data(payload)
            except RemoteProtocolError:
                pass  # not an answer the relay can read: forwarded all the same
            self._send(payload)
            read = None if answer is None else answer.result
            if read is None:
                return
            self._handshake = self._answer = None
            if read.succeeded:
                self._open()
            else:
                self.ops.stats.handshake_errors += 1
                self._leave(read.error)
                self.transport.close(CloseCode.NORMAL_CLOSURE)
        elif self.state is ConnState.OPEN:
            self.enqueue(WIRE_FORMATS[self.wire_format][1](payload))

    def _parse_hub_messages(self) -> None:
        """Serverless: handle the client's complete hub messages (each kept as its raw bytes,
        which is what an upstream receives)."""
        limit = self.ops.config.max_message_size
        try:
            for body, message in self._split_messages(limit):
                if isinstance(message, CloseMessage):
                    self._leave(None)
                    self.transport.close(CloseCode.NORMAL_CLOSURE)
                    return
                if (isinstance(message, (InvocationMessage, StreamInvocationMessage))
                        and not self.ops.client_invocation(self, message, body)):
                    self.not_delivered(message)
        except (RemoteProtocolError, ValueError) as exc:
            too_big = "exceed" in str(exc)
            self._inbox.clear()
            self.ops.stats.protocol_errors += 1
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
