"""The JSON hub protocol (``protocol._hub.JsonHubProtocol.parse``).

Input: a flag byte (bits 0-1: ``max_message_size`` none, 1 MiB, 16, 0), then the text a
client sends after its handshake. Expected: messages, or ``RemoteProtocolError``. Every record
before ``consumed`` is complete, and what was read writes back to a record that reads the same.
"""

from __future__ import annotations

from _harness import instrumented, main, split_flags

with instrumented():
    from relaycore.protocol._errors import RemoteProtocolError
    from relaycore.protocol._hub import JsonHubProtocol

LIMITS = (None, 1 << 20, 16, 1)
PROTOCOL = JsonHubProtocol()


def test_one_input(data: bytes) -> None:
    flags, text = split_flags(data)
    try:
        messages, consumed = PROTOCOL.parse(text, LIMITS[flags & 3])
    except RemoteProtocolError:
        return
    assert 0 <= consumed <= len(text)
    assert b"\x1e" not in text[consumed:]
    for message in messages:
        assert PROTOCOL.parse(PROTOCOL.write(message))[0] == [message], message


if __name__ == "__main__":
    main(test_one_input)
