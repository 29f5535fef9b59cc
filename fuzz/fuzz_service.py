"""The service protocol (``protocol._service``): what an app server sends on its connection.

Input: a flag byte, then the byte stream. Flag bit 0: the relay's raw ConnectionData/UserData
fast path on; bits 1-2: ``max_message_size`` (16 MiB, 1 KiB, 16, 1); bits 3-7: how the bytes
are cut into reads. Expected: messages, or ``RemoteProtocolError`` (and then the same error on
every later call); ``parse_message_body`` of the whole input likewise.
"""

from __future__ import annotations

from _harness import instrumented, main, reads, split_flags

with instrumented():
    from relaycore.protocol._errors import RemoteProtocolError
    from relaycore.protocol._service import (
        ServiceMessage,
        ServiceProtocolParser,
        parse_message_body,
    )

LIMITS = (16 << 20, 1024, 16, 1)
MESSAGE_TYPES = ServiceMessage.__args__


def test_one_input(data: bytes) -> None:
    flags, stream = split_flags(data)
    raw = bool(flags & 1)
    parser = ServiceProtocolParser(LIMITS[(flags >> 1) & 3], raw_connection_data=raw,
                                   raw_user_data=raw)
    failed: RemoteProtocolError | None = None
    for chunk in reads(stream, flags):
        try:
            parser.receive_data(chunk)
        except RemoteProtocolError as exc:
            assert failed is None or exc is failed, (failed, exc)
            failed = exc
        for item in parser.items_received():
            assert isinstance(item, MESSAGE_TYPES) or (raw and isinstance(item, tuple)), item
    if failed is None:
        try:
            parser.receive_eof()
        except RemoteProtocolError:
            pass
    try:
        message = parse_message_body(stream)
    except RemoteProtocolError:
        return
    assert message is None or isinstance(message, MESSAGE_TYPES)


if __name__ == "__main__":
    main(test_one_input)
