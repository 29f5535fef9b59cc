"""The MessagePack hub protocol (``protocol._hub.MessagePackHubProtocol.parse``).

Input: a flag byte (bits 0-1: ``max_message_size`` none, 1 MiB, 16, 0), then the bytes a
client sends after its handshake (varint length prefixes and MessagePack arrays). Expected:
messages, or ``RemoteProtocolError``.
"""

from __future__ import annotations

from _harness import instrumented, main, split_flags

with instrumented():
    from relaycore.protocol._errors import RemoteProtocolError
    from relaycore.protocol._hub import MessagePackHubProtocol

LIMITS = (None, 1 << 20, 16, 1)
PROTOCOL = MessagePackHubProtocol()


def test_one_input(data: bytes) -> None:
    flags, stream = split_flags(data)
    try:
        messages, consumed = PROTOCOL.parse(stream, LIMITS[flags & 3])
    except RemoteProtocolError:
        return
    assert 0 <= consumed <= len(stream)
    assert all(type(m).__name__.endswith("Message") for m in messages)


if __name__ == "__main__":
    main(test_one_input)
