"""A hub message to fan out, encoded and framed once per wire format.

A *wire format* is a hub protocol as one transport frames it: ``json`` (WebSocket text
frames), ``messagepack`` (WebSocket binary frames), ``json+sse`` (Server-Sent Events in the
chunks of a streamed response), ``json+lp`` and ``messagepack+lp`` (long-poll bodies: the hub
protocol's bytes as they are); each client session names its own in ``wire_format``.
``OutboundMessage.frame(wire_format)`` returns the complete frame for clients of that format,
computed on first use and then shared by every target: encode once, write many. A format
other than the WebSocket ones is framed only while a transport that may use it is open
(``hold_formats``), so that a relay without such clients does no more work per message.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from .._accel import queue_frame
from ..protocol._handshake import HUB_PROTOCOL_OPCODES
from ..protocol._hub import get_protocol
from ..protocol._websocket import Opcode, frame
from ._peer import ConnState, Flusher


def _websocket(opcode: Opcode) -> Callable[[bytes], bytes]:
    return lambda payload: frame(opcode, payload)


def server_sent_event(payload: bytes) -> bytes:
    """``payload`` as one Server-Sent Event in one chunk of a chunked response body.

    The event is ASP.NET Core's (``ServerSentEventsMessageFormatter``): every line of the
    payload (split on LF, a CR before it dropped) becomes ``data: <line>`` + CRLF, and a blank
    line ends the event; JSON has no raw line breaks, so a hub message is one ``data:`` line.
    The response is chunked, as Kestrel streams it, so that its end (``0`` CRLF CRLF) says the
    server closed the stream on purpose; each chunk is one whole event.

    >>> server_sent_event(b'{"type":6}\\x1e')
    b'15\\r\\ndata: {"type":6}\\x1e\\r\\n\\r\\n\\r\\n'
    """
    if b"\n" in payload:
        lines = [line[:-1] if line.endswith(b"\r") else line for line in payload.split(b"\n")]
        event = b"".join([b"data: " + line + b"\r\n" for line in lines]) + b"\r\n"
    else:
        event = b"data: " + payload + b"\r\n\r\n"
    return b"%x\r\n%b\r\n" % (len(event), event)


def _as_is(payload: bytes) -> bytes:
    return payload


#: Wire format -> (hub protocol, how a payload of it is framed). Over WebSockets a format is
#: its hub protocol's name: JSON travels in text frames, MessagePack in binary ones
#: (``HUB_PROTOCOL_OPCODES``; client-protocol §2.1). Server-Sent Events carry JSON only, one
#: event per write (§2.3); a long poll's body is the hub protocol's bytes, nothing around
#: them (§2.4).
WIRE_FORMATS: dict[str, tuple[str, Callable[[bytes], bytes]]] = {
    **{name: (name, _websocket(opcode)) for name, opcode in HUB_PROTOCOL_OPCODES.items()},
    "json+sse": ("json", server_sent_event),
    **{f"{name}+lp": (name, _as_is) for name in HUB_PROTOCOL_OPCODES},
}
#: The formats every fan-out frames: the WebSocket ones, whoever is connected.
_ALWAYS_FRAMED = tuple(HUB_PROTOCOL_OPCODES)
#: How many open transports of this process may use each other format (``hold_formats``).
_holders: dict[str, int] = {}
#: What ``fan_out`` frames a message for: the WebSocket formats, and the others while a
#: transport that may use them is open. A connection whose format has no frame would be
#: skipped without a word, so a transport holds its formats from before its session can
#: take one until after it has left every table.
_framed: tuple[str, ...] = _ALWAYS_FRAMED


def hold_formats(names: Iterable[str]) -> None:
    """A transport that may carry ``names`` is open: frame fan-outs for them too."""
    global _framed
    for name in names:
        _holders[name] = _holders.get(name, 0) + 1
    _framed = _ALWAYS_FRAMED + tuple(name for name in WIRE_FORMATS if _holders.get(name))


def release_formats(names: Iterable[str]) -> None:
    """The transport that held ``names`` is gone (once per ``hold_formats``)."""
    global _framed
    for name in names:
        _holders[name] -= 1
    _framed = _ALWAYS_FRAMED + tuple(name for name in WIRE_FORMATS if _holders.get(name))

#: Not framed yet (``None`` in a frame cache means "no payload for that protocol").
_UNSEEN = object()


class OutboundMessage:
    """Either an invocation ``target(*arguments)`` or a payload map from an app server.

    A payload map (``{"json": framed bytes, "messagepack": framed bytes}``) is forwarded as
    is: the relay picks the entry for each client's protocol and never re-encodes it.
    """

    __slots__ = ("target", "arguments", "payloads", "_frames")

    def __init__(
        self,
        target: str | None = None,
        arguments: Sequence[Any] = (),
        *,
        payloads: Mapping[str, bytes] | None = None,
    ) -> None:
        if (target is None) == (payloads is None):
            raise ValueError("give either a target or a payload map")
        self.target = target
        self.arguments = list(arguments)
        self.payloads = {k.lower(): bytes(v) for k, v in (payloads or {}).items()}
        self._frames: dict[str, bytes | None] = {}

    @classmethod
    def invocation(cls, target: str, *arguments: Any) -> OutboundMessage:
        return cls(target, arguments)

    def payload(self, protocol_name: str) -> bytes | None:
        """The framed hub message for ``protocol_name``, or ``None`` if there is none."""
        if self.target is None:
            return self.payloads.get(protocol_name)
        return get_protocol(protocol_name).write_invocation(self.target, self.arguments)

    def payload_map(self) -> dict[str, bytes]:
        """The message as an app server sends it: hub protocol -> framed hub message (what
        the service protocol's data messages carry, and so what another node receives)."""
        if self.target is None:
            return self.payloads
        return {name: get_protocol(name).write_invocation(self.target, self.arguments)
                for name in ("json", "messagepack")}

    def frame(self, wire_format: str) -> bytes | None:
        """The complete frame for clients of ``wire_format``, or ``None`` if there is none."""
        data = self._frames.get(wire_format, _UNSEEN)
        if data is not _UNSEEN:
            return data  # type: ignore[return-value]
        protocol_name, framing = WIRE_FORMATS[wire_format]
        # An event holds the bytes a long poll takes: the two share one encoding. (The
        # WebSocket formats encode their own, so that they pay for nothing else.)
        payload = (self.frame("json+lp") if framing is server_sent_event
                   else self.payload(protocol_name))
        data = None if payload is None else framing(payload)
        self._frames[wire_format] = data
        return data


def fan_out(targets: Iterable[Any], message: OutboundMessage, flusher: Flusher,
            limit: int) -> int:
    """Queue ``message`` on every open target connection; returns how many accepted it.

    Never awaits. The per-recipient loop is the fast path's ``queue_frame``: it appends the
    shared frame to each open connection's send buffer and lists the buffers that were empty
    with the flusher, which sends everything queued in this scheduling round with one
    ``write()`` per connection. Connections that would pass ``limit`` get nothing and go
    through ``enqueue``, which closes them as slow consumers. The message is framed for the
    formats in use (``_framed``), so a relay without HTTP transports frames it as before.
    """
    if isinstance(targets, (tuple, list)) and len(targets) <= 2:
        return _fan_out_few(targets, message)
    frames = {name: message.frame(name) for name in _framed}
    delivered, over = queue_frame(targets, frames, ConnState.OPEN, limit, flusher.dirty)
    flusher.wake()
    for conn in over:
        conn.enqueue(frames[conn.wire_format])
    return delivered


def _fan_out_few(targets: Sequence[Any], message: OutboundMessage) -> int:
    """One or two targets: encode only for the formats they use."""
    delivered = 0
    for conn in targets:
        data = message.frame(conn.wire_format)
        if data is not None and conn.enqueue(data):
            delivered += 1
    return delivered


def queue_payloads(targets: Sequence[Any], payloads: Mapping[str, bytes]) -> int:
    """Queue an app server's payload map on a few targets (a user's connections): each is
    framed once per wire format in a row of targets that use it. The keys must already be the
    lower-case protocol names (the service parser's raw ``UserData`` guarantees it); a
    target whose protocol has no entry gets nothing. Returns how many accepted it."""
    delivered = 0
    name = framed = None
    for conn in targets:
        if conn.wire_format != name:
            protocol_name, framing = WIRE_FORMATS[conn.wire_format]
            payload = payloads.get(protocol_name)
            if payload is None:
                continue
            name = conn.wire_format
            framed = framing(payload)
        if conn.enqueue(framed):
            delivered += 1
    return delivered
