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

A client that negotiated stateful reconnect is a ``StatefulSession`` (at the end of this
module): the same, plus its own send buffer with numbered frames, so that its connection
survives a dropped WebSocket; every other session pays nothing for it.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from typing import Any, Protocol

from .._accel import encode_varint, parse_frame_header, split_records, split_varint_frames
from ..protocol._errors import RemoteProtocolError
from ..protocol._handshake import (
    HandshakeAccepted,
    HandshakeRefused,
    HandshakeResponseReader,
    HubHandshake,
)
from ..protocol._hub import (
    AckMessage,
    CloseMessage,
    CompletionMessage,
    InvocationMessage,
    PingMessage,
    SequenceMessage,
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
        request, rest = self._accepted(accepted)
        server = self.ops.choose_server(self.hub)
        if server is not None:
            # The app server's hub answers the handshake: forward it and what follows, as is.
            self.server = server
            self._answer = HandshakeResponseReader(self.ops.config.max_message_size)
            server.client_opened(self, request + rest)
            return
        if not self.ops.serves_hubs_itself:
            self._handshake_failed(f"No app server is connected to hub '{self.hub}'.")
            return
        self.headers = {}  # only an app server is ever told them
        self._send(handshake.data_to_send())
        self._handshake = None
        self._inbox += rest
        self._open()

    def _accepted(self, accepted: HandshakeAccepted) -> tuple[bytes, bytes]:
        """The handshake request an app server is given and the hub messages that followed
        it, once the client's protocol is settled: as they came (a stateful session asks the
        app server for version 1 and counts those messages)."""
        return accepted.request, accepted.rest

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


# -- stateful reconnect ------------------------------------------------------------------------

#: Hub message types a stateful reconnect numbers (client-protocol §4.4: invocations, stream
#: items, completions, stream invocations, cancellations); pings, Close, Ack and Sequence are
#: not counted, not kept and not resent.
_TRACKABLE = frozenset({1, 2, 3, 4, 5})
_ACK = 8
_SEQUENCE = 9
#: MessagePack integer heads that may hold a message type: (width, signed).
_MSGPACK_INTS = {0xcc: (1, False), 0xcd: (2, False), 0xce: (4, False), 0xcf: (8, False),
                 0xd0: (1, True), 0xd1: (2, True), 0xd2: (4, True), 0xd3: (8, True)}


def _json_type(record: bytes) -> int | None:
    """The ``type`` of a JSON hub message (without its separator); None if it has none. The
    writers of this relay, the SDK and ASP.NET put ``type`` first: read without parsing."""
    if record.startswith(b'{"type":'):
        end = 8
        while end < len(record) and 48 <= record[end] <= 57:
            end += 1
        if end > 8 and record[end:end + 1] in (b",", b"}"):
            return int(record[8:end])
    try:
        value = json.loads(record)
    except ValueError:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    return kind if type(kind) is int else None


def _msgpack_type(body: bytes) -> int | None:
    """The type of a MessagePack hub message (its array's first element; without its varint
    prefix); None if it is not an array that starts with an integer."""
    if not body:
        return None
    head = body[0]
    pos = 1 if 0x90 <= head <= 0x9F else 3 if head == 0xDC else 5 if head == 0xDD else 0
    if not pos or pos >= len(body):
        return None
    kind = body[pos]
    if kind <= 0x7F:
        return kind
    width = _MSGPACK_INTS.get(kind)
    if width is None or pos + 1 + width[0] > len(body):
        return None
    return int.from_bytes(body[pos + 1:pos + 1 + width[0]], "big", signed=width[1])


def _trackable_count(payload: bytes, json_protocol: bool) -> int:
    """How many trackable hub messages one framed payload (one WebSocket message) holds."""
    if json_protocol:
        return sum(1 for record in payload.split(b"\x1e")
                   if record and _json_type(record) in _TRACKABLE)
    try:
        bodies, _ = split_varint_frames(payload, len(payload))
    except ValueError:
        return 0
    return sum(1 for body in bodies if _msgpack_type(body) in _TRACKABLE)


class _Released:
    """The session of a WebSocket that a resumed one replaced: what it reports is no longer
    news to anyone (its client is on the new WebSocket)."""

    def receive(self, messages: list[bytes]) -> None:
        pass

    def transport_closing(self) -> None:
        pass

    def transport_failed(self, reason: str, code: int | None) -> None:
        pass

    def transport_ended(self) -> None:
        pass

    def slow_consumer(self, dropped: int, limit: int) -> None:
        pass

    def tick(self, now: float) -> None:
        pass


_RELEASED = _Released()


class _Detached:
    """The transport of a stateful session between two WebSockets: it takes nothing (the
    replay buffer holds what the client must get) and the flusher skips it."""

    __slots__ = ("state", "created", "last_receive", "last_send", "_out", "_blocked", "since")

    def __init__(self, since: float) -> None:
        self.state = ConnState.CLOSED
        self.created = self.last_receive = self.last_send = self.since = since
        self._out = bytearray()
        self._blocked = False

    def wire_format_for(self, protocol_name: str) -> str:
        return protocol_name

    def push(self, data: bytes) -> bool:
        return True

    def close(self, code: int, reason: str = "") -> None:
        pass


class StatefulSession(ClientSession):
    """A client that asked for stateful reconnect (negotiate's ``useStatefulReconnect``, then
    hub protocol version 2 in its handshake; WebSockets only), as ASP.NET Core 8 serves it.

    Until the handshake turns it on it is a plain session. Then the trackable messages each
    way are numbered by counting (client-protocol §4.4). Outbound, ``_out`` is the session's
    own staging buffer: the fan-out's C loop appends to it and marks the session as for any
    session, and ``_sink``, which the flusher reads, is a property that moves the staged
    frames to the transport and keeps those with trackable messages, numbered, until the
    client's ``Ack`` (within ``stateful_reconnect_buffer`` bytes: past it the client is closed
    with a reason). Every other send drains the staging buffer first, so frames leave in the
    order they were queued. Inbound, the client's ``Ack`` and ``Sequence`` are consumed here
    (an app server sees a version 1 client, as behind Azure's service), the messages it
    resends after a resume are dropped when already seen, and the relay acknowledges what it
    received after each batch.

    When the WebSocket ends without a close frame the session stays open and bound (in the
    table, sends kept) for ``stateful_reconnect_window``; a WebSocket with the same connection
    token (``resume``) replaces the transport, whether or not the old one is known to be dead,
    and gets ``Sequence`` and every unacknowledged frame, in order.
    """

    __slots__ = ("_replay", "_replay_bytes", "_sent_seq", "_in_seq", "_in_done", "_in_acked")

    def __init__(self, ops: Operations, **kwargs: Any) -> None:
        super().__init__(ops, **kwargs)
        #: (first id, last id, frame) of every frame sent with trackable messages not yet
        #: acknowledged; None until the handshake turns stateful reconnect on
        self._replay: deque[tuple[int, int, bytes]] | None = None
        self._replay_bytes = 0
        self._sent_seq = 0  # the id of the last trackable message sent
        self._in_seq = 0  # the id of the last trackable message received
        self._in_done = 0  # the highest id handled (never lowered: resent ones are dropped)
        self._in_acked = 0  # the highest id acknowledged to the client

    @property
    def _sink(self) -> Any:
        """What the flusher writes for this session: its transport, once the staged frames
        are there (see the class docstring)."""
        staged = self._out
        if staged and self._replay is not None:
            data = bytes(staged)
            staged.clear()
            self._put(data)
        return self.transport

    @_sink.setter
    def _sink(self, value: Any) -> None:
        pass  # always the transport (ClientSession.attach names it)

    def attach(self, transport: Transport) -> None:
        if self.transport is None:  # a resumed WebSocket takes over in ``resume``
            super().attach(transport)

    def _accepted(self, accepted: HandshakeAccepted) -> tuple[bytes, bytes]:
        if accepted.version < 2:
            return accepted.request, accepted.rest  # the client turned it off
        self._replay = deque()
        self._out = bytearray()  # staging, no longer the transport's buffer
        request = json.dumps({"protocol": accepted.protocol, "version": 1},
                             separators=(",", ":")).encode() + b"\x1e"
        return request, self._inbound(accepted.rest)

    @property
    def stateful(self) -> bool:
        """Whether the handshake turned stateful reconnect on."""
        return self._replay is not None

    # -- outbound ------------------------------------------------------------------------------

    def enqueue(self, data: bytes) -> bool:
        if self.state is not ConnState.OPEN:
            return False
        if self._replay is None:
            return bool(self.transport.push(data))
        return self._emit(data)

    def _send(self, payload: bytes, wire_format: str | None = None) -> bool:
        data = WIRE_FORMATS[wire_format or self.wire_format][1](payload)
        if self._replay is None:
            return bool(self.transport.push(data))
        return self._emit(data)

    def _drain(self) -> None:
        """Move the staged frames (the fan-out's) to the transport and the replay buffer."""
        data = bytes(self._out)
        self._out.clear()
        self._put(data)

    def _emit(self, data: bytes) -> bool:
        """Queue frames on the transport after what is staged."""
        if self._out:
            self._drain()
        return self._put(data)

    def _put(self, data: bytes) -> bool:
        """Queue frames on the transport and keep the trackable ones."""
        pushed: bool = self.transport.push(data)
        if self.state < ConnState.CLOSING and self._replay is not None:
            self._record(data)
        return pushed

    def _record(self, data: bytes) -> None:
        """Number the trackable messages in ``data`` (whole WebSocket frames) and keep the
        frames that hold any."""
        replay = self._replay
        assert replay is not None
        json_protocol = self.protocol_name == "json"
        pos, size = 0, len(data)
        while pos < size:
            header = parse_frame_header(data, pos)
            if header is None:
                raise ValueError(f"no whole frame at offset {pos} of a stateful session's send")
            start = pos + header[4]
            end = start + header[3]
            # One message in the frame, as the fan-out and the relay's own sends have it:
            # its type is read in place; anything else is split.
            if json_protocol:
                if (data.startswith(b'{"type":', start) and data[start + 9] in b",}"
                        and data.find(b"\x1e", start, end) == end - 1):
                    count = 1 if 49 <= data[start + 8] <= 53 else 0
                else:
                    count = _trackable_count(data[start:end], True)
            elif (end - start > 2 and data[start] == end - start - 1
                    and 0x91 <= data[start + 1] <= 0x9F and data[start + 2] < 0x80):
                count = 1 if 1 <= data[start + 2] <= 5 else 0
            else:
                count = _trackable_count(data[start:end], False)
            if count:
                first = self._sent_seq + 1
                self._sent_seq += count
                replay.append((first, self._sent_seq,
                               data if pos == 0 and end == size else data[pos:end]))
                self._replay_bytes += end - pos
            pos = end
        limit = self.ops.config.stateful_reconnect_buffer
        if self._replay_bytes > limit:
            unacked = self._replay_bytes
            replay.clear()
            self._replay_bytes = 0
            log.warning("closing %s on hub %s: %d bytes not acknowledged, past the stateful "
                        "reconnect buffer of %d bytes", self.id, self.hub, unacked, limit)
            self.close(f"Connection closed: {unacked} bytes sent were not acknowledged, past "
                       f"the stateful reconnect buffer of {limit} bytes.",
                       code=CloseCode.POLICY_VIOLATION)

    # -- inbound -------------------------------------------------------------------------------

    def receive(self, messages: list[bytes]) -> None:
        if self._replay is None:
            super().receive(messages)
            return
        kept = [data for data in map(self._inbound, messages) if data]
        if kept:
            super().receive(kept)
        if self._in_done > self._in_acked and self.state is ConnState.OPEN:
            self._in_acked = self._in_done
            self._send(self.protocol.write(AckMessage(sequence_id=self._in_done)))

    def _inbound(self, data: bytes) -> bytes:
        """One message from the client without its Ack and Sequence (handled here) and the
        trackable messages already handled before a resume."""
        if data in _PINGS or not data:
            return data
        json_protocol = self.protocol_name == "json"
        if json_protocol:
            records = data.split(b"\x1e")
            tail = records.pop()  # not a whole record: left to the session as it is
        else:
            try:
                records, consumed = split_varint_frames(data, self.ops.config.max_message_size)
            except ValueError:
                return data  # the session reports it
            tail = data[consumed:]
        kept: list[bytes] = []
        changed = False
        for body in records:
            kind = _json_type(body) if json_protocol else _msgpack_type(body)
            if kind in _TRACKABLE:
                self._in_seq += 1
                if self._in_seq <= self._in_done:
                    changed = True  # resent after a resume, handled before it
                    continue
                self._in_done = self._in_seq
            elif kind == _ACK or kind == _SEQUENCE:
                changed = True
                if not self._bookkeeping(body + b"\x1e" if json_protocol
                                         else encode_varint(len(body)) + body):
                    return b""
                continue
            kept.append(body)
        if not changed:
            return data
        if json_protocol:
            return b"".join(body + b"\x1e" for body in kept) + tail
        return b"".join(encode_varint(len(body)) + body for body in kept) + tail

    def _bookkeeping(self, framed: bytes) -> bool:
        """The client's Ack or Sequence; False if it ended the connection."""
        try:
            messages, _ = self.protocol.parse(framed, self.ops.config.max_message_size)
        except (RemoteProtocolError, ValueError):
            messages = []
        message = messages[0] if messages else None
        if isinstance(message, AckMessage):
            replay = self._replay
            assert replay is not None
            while replay and replay[0][1] <= message.sequence_id:
                self._replay_bytes -= len(replay.popleft()[2])
        elif isinstance(message, SequenceMessage):
            if message.sequence_id > self._in_done + 1:
                self.close("Connection closed with an error: Sequence ID greater than amount "
                           "of messages we've received.",
                           code=CloseCode.PROTOCOL_ERROR)
                return False
            self._in_seq = message.sequence_id - 1
        return True

    # -- the transport's life ------------------------------------------------------------------

    def transport_ended(self) -> None:
        """A WebSocket that ended without a close frame (a dropped network): the client may
        resume within the window; everything else is as for any session."""
        if self._replay is not None and self.state is ConnState.OPEN:
            if self._out:
                self._drain()  # the staged frames join what is resent
            self.transport = _Detached(self.ops.now())
            return
        super().transport_ended()

    def can_resume(self) -> bool:
        return self._replay is not None and self.state is ConnState.OPEN

    def resume(self, transport: Transport) -> None:
        """A new WebSocket with this client's connection token has started: it replaces the
        transport (the old one may not know yet that it died) and gets ``Sequence`` with the
        id of the first message it is sent again, then every unacknowledged frame, in order
        (frames the client had already got are dropped by it, by their ids)."""
        if not self.can_resume():
            transport.session = _RELEASED  # type: ignore[attr-defined]
            transport.close(CloseCode.NORMAL_CLOSURE, "the connection is over")
            return
        if self._out:
            self._drain()
        old = self.transport
        self.transport = transport
        if not isinstance(old, _Detached):
            old.session = _RELEASED
            old.drop()
        transport.state = ConnState.OPEN
        replay = self._replay
        assert replay is not None
        first = replay[0][0] if replay else self._sent_seq + 1
        transport.push(WIRE_FORMATS[self.wire_format][1](
            self.protocol.write(SequenceMessage(sequence_id=first))))
        for _, _, frame in list(replay):
            if not transport.push(frame):
                return  # past the transport's own limit: it closed the session
        log.info("connection %s on hub %s resumed: %d unacknowledged messages sent again",
                 self.id, self.hub, self._sent_seq - first + 1)

    def resume_over(self, now: float) -> bool:
        """Whether this session can no longer be resumed (it is over, or its window passed:
        then it ends here, and its app server is told)."""
        transport = self.transport
        window = self.ops.config.stateful_reconnect_window
        if (isinstance(transport, _Detached) and self.state is ConnState.OPEN
                and now - transport.since > window):
            self._leave("Connection closed: the client did not reconnect within "
                        f"{window:g} seconds.")
        if isinstance(transport, _Detached) and self.state is ConnState.CLOSING:
            self.state = ConnState.CLOSED
        return self.state >= ConnState.CLOSING
