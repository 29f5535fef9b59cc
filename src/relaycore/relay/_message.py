"""A hub message to fan out, encoded once per hub protocol and framed once.

``OutboundMessage.frame(protocol_name)`` returns the complete WebSocket frame (header and
payload) for clients of that protocol, computed on first use and then shared by every target:
encode once, write many.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .._accel import queue_frame
from ..protocol._hub import get_protocol
from ..protocol._websocket import Opcode, frame
from ._peer import ConnState, Flusher

#: WebSocket opcode per hub protocol: JSON travels in text frames, MessagePack in binary ones
#: (client-protocol §2.1: .NET sends all MessagePack output as binary frames).
_OPCODES = {"json": Opcode.TEXT, "messagepack": Opcode.BINARY}
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

    def frame(self, protocol_name: str) -> bytes | None:
        data = self._frames.get(protocol_name, _UNSEEN)
        if data is not _UNSEEN:
            return data  # type: ignore[return-value]
        payload = self.payload(protocol_name)
        data = None if payload is None else frame(_OPCODES[protocol_name], payload)
        self._frames[protocol_name] = data
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
    frames = {name: message.frame(name) for name in _OPCODES}
    delivered, over = queue_frame(targets, frames, ConnState.OPEN, limit, flusher.dirty)
    flusher.wake()
    for conn in over:
        conn.enqueue(frames[conn.protocol_name])
    return delivered


def _fan_out_few(targets: Sequence[Any], message: OutboundMessage) -> int:
    """One or two targets: encode only for the protocols they use."""
    delivered = 0
    for conn in targets:
        data = message.frame(conn.protocol_name)
        if data is not None and conn.enqueue(data):
            delivered += 1
    return delivered


def queue_payloads(targets: Sequence[Any], payloads: Mapping[str, bytes]) -> int:
    """Queue an app server's payload map on a few targets (a user's connections): each is
    framed once per protocol in a row of targets that use it. The keys must already be the
    lower-case protocol names (the service parser's raw ``UserData`` guarantees it); a
    target whose protocol has no entry gets nothing. Returns how many accepted it."""
    delivered = 0
    name = framed = None
    for conn in targets:
        if conn.protocol_name != name:
            payload = payloads.get(conn.protocol_name)
            if payload is None:
                continue
            name = conn.protocol_name
            framed = frame(_OPCODES[name], payload)
        if conn.enqueue(framed):
            delivered += 1
    return delivered
