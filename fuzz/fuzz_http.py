"""The relay's HTTP front (``relay._http.HttpConnection`` over h11): the loop that reads each
request on a connection and answers it.

Input: a flag byte, then the bytes a client sends. Flag bits 0-1: the head limit (64 B, 1 KiB,
16 KiB, 16 KiB); bit 2: the body limit (0 or 1 MiB); bits 3-7: how the bytes are cut into
reads. Expected: a ``Request``, ``None`` (the client closed) or ``HttpError`` (4xx, or 501 for
a transfer coding h11 does not implement); the answer to each, errors included, can be
written, whatever the previous request was (a HEAD once broke the next error's answer).
"""

from __future__ import annotations

from _harness import ScriptedStream, drive, instrumented, main, reads, split_flags

with instrumented("h11"):
    from relaycore.relay._http import HttpConnection, HttpError, Response

HEAD_LIMITS = (64, 1024, 16 << 10, 16 << 10)


def test_one_input(data: bytes) -> None:
    flags, raw = split_flags(data)
    stream = ScriptedStream(reads(raw, flags))
    http = HttpConnection(stream, max_head=HEAD_LIMITS[flags & 3],  # type: ignore[arg-type]
                          max_body=(1 << 20) if flags & 4 else 0)
    for _ in range(8):
        try:
            request = drive(http.read_request())
        except HttpError as err:
            assert 400 <= err.status < 500 or err.status == 501, err
            drive(http.send_response(Response.error(err), close=True))
            return
        if request is None or request.is_websocket_upgrade:
            return
        drive(http.send_response(Response.json(200, {"path": request.path})))
        if not http.can_continue():
            return


if __name__ == "__main__":
    main(test_one_input)
