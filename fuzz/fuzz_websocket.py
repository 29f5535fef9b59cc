"""WebSocket framing (``protocol._websocket.WebSocketProtocol``), server and client roles.

Input: a flag byte, then the bytes a peer sends after the upgrade. Flag bit 0: the role
(0 server, reading masked frames; 1 client); bits 1-2: ``max_message_size`` (1 MiB, none,
5 bytes, 0); bits 3-7: how the bytes are cut into reads. Expected: events, or ``.error`` set
with a Close queued; never an exception. In the server role ``receive_messages`` (the relay's
shortcut) must agree with ``receive_data`` whenever it answers.
"""

from __future__ import annotations

from _harness import instrumented, main, reads, split_flags

with instrumented():
    from relaycore.protocol._errors import RemoteProtocolError
    from relaycore.protocol._websocket import (
        BinaryMessage,
        CloseReceived,
        Ping,
        Pong,
        Role,
        State,
        TextMessage,
        WebSocketProtocol,
    )

LIMITS = (1 << 20, None, 5, 0)
EVENTS = (TextMessage, BinaryMessage, Ping, Pong, CloseReceived)


def _mask() -> bytes:
    return b"\x01\x02\x03\x04"


def test_one_input(data: bytes) -> None:
    flags, stream = split_flags(data)
    role = Role.CLIENT if flags & 1 else Role.SERVER
    limit = LIMITS[(flags >> 1) & 3]
    ws = WebSocketProtocol(role, max_message_size=limit,
                           mask_key=_mask if role is Role.CLIENT else None)
    events = []
    for chunk in reads(stream, flags):
        ws.receive_data(chunk)
        events += ws.events_received()
        assert isinstance(ws.data_to_send(), bytes)
    assert all(isinstance(event, EVENTS) for event in events)
    if ws.error is not None:
        assert isinstance(ws.error, RemoteProtocolError)
        assert ws.close_expected()
    ws.receive_eof()
    assert ws.state is State.CLOSED

    if role is Role.SERVER:
        text = bool(flags & 0x80)
        shortcut = WebSocketProtocol(Role.SERVER, max_message_size=limit).receive_messages(
            stream, text)
        if shortcut is not None:
            whole = WebSocketProtocol(Role.SERVER, max_message_size=limit)
            whole.receive_data(stream)
            got = whole.events_received()
            assert whole.error is None and whole.state is State.OPEN
            assert text or not any(isinstance(e, TextMessage) for e in got)
            assert shortcut == [e.data.encode("utf-8") if isinstance(e, TextMessage) else e.data
                                for e in got], (shortcut, got)


if __name__ == "__main__":
    main(test_one_input)
