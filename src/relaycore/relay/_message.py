"""A hub message to fan out, encoded once per wire format and framed once.

A *wire format* is a hub protocol as one transport frames it: today ``json`` (WebSocket text
frames) and ``messagepack`` (WebSocket binary frames); each client session names its own in
``wire_format``. ``OutboundMessage.frame(wire_format)`` returns the complete frame for clients
of that format, computed on first use and then shared by every target: encode once, write
many. A transport that frames differently (Server-Sent Events, say) adds its format to
``WIRE_FORMATS``.
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


#: Wire format -> (hub protocol, how a payload of it is framed). Over WebSockets a format is
#: its hub protocol's name: JSON travels in text frames, MessagePack in binary ones
#: (``HUB_PROTOCOL_OPCODES``; client-protocol §2.1).
WIRE_FORMATS: dict[str, tuple[str, Callable[[bytes], bytes]]] = {
    name: (name, _websocket(opcode)) for name, opcode in HUB_PROTOCOL_OPCODES.items()
}
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
        payload = self.payload(protocol_name)
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
    through ``enqueue``, which closes them as slow consumers.
    """
    if isinstance(targets, (tuple, list)) and len(targets) <= 2:
        return _fan_out_few(targets, message)
    frames = {name: message.frame(name) for name in WIRE_FORMATS}
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
