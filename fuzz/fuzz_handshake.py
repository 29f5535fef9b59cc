"""The hub protocol handshake (``protocol._hub``): the client's request, as the relay reads
it, and the server's response, as the SDK's client reads it.

Input: the bytes of the first record. Expected: ``None`` (no separator yet), a request (and a
verdict on it: ``None`` or the .NET error text), or ``RemoteProtocolError``.
"""

from __future__ import annotations

from _harness import instrumented, main

with instrumented():
    from relaycore.protocol._errors import RemoteProtocolError
    from relaycore.protocol._hub import (
        HandshakeRequest,
        check_handshake_request,
        parse_handshake_request,
        parse_handshake_response,
    )


def test_one_input(data: bytes) -> None:
    try:
        found = parse_handshake_request(data)
    except RemoteProtocolError:
        pass
    else:
        if found is not None:
            request, consumed = found
            assert isinstance(request, HandshakeRequest) and 0 < consumed <= len(data)
            verdict = check_handshake_request(request)
            assert verdict is None or isinstance(verdict, str)
    try:
        reply = parse_handshake_response(data)
    except RemoteProtocolError:
        return
    assert reply is None or reply[0] is None or isinstance(reply[0], str)


if __name__ == "__main__":
    main(test_one_input)
