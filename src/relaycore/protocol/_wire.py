"""What the MessagePack hub protocol and the service protocol share on the wire.

Both cut a byte stream into frames of a varint length prefix and one MessagePack body
(HubProtocol.md "Binary encoding"; ``protocol/service-protocol.md`` §1), and both keep their
message lists as tuples in frozen dataclasses.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from .._accel import decode_varint
from ._errors import LocalProtocolError, RemoteProtocolError

#: The largest body a varint prefix may announce: at most 5 bytes, 2**31 - 1 (2GB - 1).
MAX_FRAME: Final = 0x7FFFFFFF


def as_tuple(value: Iterable[Any], what: str) -> tuple[Any, ...]:
    """``value`` as a tuple, for a frozen message's list field.

    Messages are frozen, so their sequences are too; this also makes a parsed message equal to
    one built by hand with a list. A string or a mapping where a list belongs is the caller's
    mistake, not a list of its characters or keys.
    """
    if type(value) is tuple:
        return value
    if isinstance(value, (str, bytes, bytearray, memoryview, Mapping)):
        raise LocalProtocolError(f"{what} must be a list or tuple, got {type(value).__name__}")
    return tuple(value)


def too_big(what: str, size: int, limit: int) -> RemoteProtocolError:
    """The error for a message of ``size`` bytes over a ``limit`` the receiver set."""
    return RemoteProtocolError(
        f"{what} of {size} bytes exceeds the maximum message size of {limit} bytes"
    )


def frames_before_error(
    stream: bytes | bytearray | memoryview, limit: int, what: str
) -> tuple[list[bytes], int, RemoteProtocolError]:
    """Why ``split_varint_frames(stream, limit)`` failed: ``(bodies, consumed, error)``.

    ``bodies`` are the whole frames before the bad one and ``consumed`` the bytes they take;
    ``error`` says what is wrong with the prefix at ``consumed``: not a varint of at most 5
    bytes, or announcing more than ``limit`` bytes (refused as soon as the prefix is there,
    before the body is buffered). ``what`` names the messages in the error. Failure is rare,
    so the prefixes are walked again here rather than checked twice on every frame.
    """
    bodies: list[bytes] = []
    pos = 0
    while True:
        try:
            got = decode_varint(stream, pos)
        except ValueError as exc:
            return bodies, pos, RemoteProtocolError(
                f"bad {what} length prefix at byte {pos}: {exc}; expected a varint of at most "
                "5 bytes announcing at most 2**31-1 bytes (messages bigger than 2GB are not "
                "supported)"
            )
        if got is None:  # pragma: no cover - split_varint_frames would not have failed
            return bodies, pos, RemoteProtocolError(f"bad {what} length prefix at byte {pos}")
        size, n = got
        if size > limit:
            return bodies, pos, too_big(what, size, limit)
        if len(stream) - pos - n < size:  # pragma: no cover - as above
            return bodies, pos, RemoteProtocolError(f"bad {what} length prefix at byte {pos}")
        bodies.append(bytes(stream[pos + n : pos + n + size]))
        pos += n + size
