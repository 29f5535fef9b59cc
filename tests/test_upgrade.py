"""The client side of the WebSocket opening handshake (``protocol._upgrade.ClientUpgrade``):
the request it writes and every kind of answer, fed in pieces, without an event loop."""

from __future__ import annotations

import pytest

from relaycore.protocol._errors import RemoteProtocolError
from relaycore.protocol._upgrade import ClientUpgrade, UpgradeAccepted, UpgradeRefused
from relaycore.protocol._websocket import accept_key

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
SWITCH = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          b"Sec-WebSocket-Accept: " + accept_key(KEY).encode() + b"\r\n\r\n")


def fed(answer: bytes, step: int) -> ClientUpgrade:
    upgrade = ClientUpgrade("relay:8080", "/client/?hub=chat", [("Authorization", "Bearer t")],
                            KEY)
    for start in range(0, len(answer), step):
        upgrade.receive_data(answer[start:start + step])
    return upgrade


def test_upgrade_request_names_the_key_the_version_and_the_callers_headers_once():
    upgrade = ClientUpgrade("relay:8080", "/server/?hub=chat", [("X-Asrs-Server-Id", "a")], KEY)
    request = upgrade.data_to_send()
    assert request.startswith(b"GET /server/?hub=chat HTTP/1.1\r\n")
    for line in (b"host: relay:8080", b"upgrade: websocket", b"sec-websocket-version: 13",
                 b"sec-websocket-key: " + KEY.lower().encode(), b"x-asrs-server-id: a"):
        assert line in request.lower()
    assert upgrade.data_to_send() == b""


@pytest.mark.parametrize("step", [1, 7, 1000])
def test_upgrade_switch_keeps_the_bytes_after_the_head(step):
    upgrade = fed(b"HTTP/1.1 100 Continue\r\n\r\n" + SWITCH + b"\x81\x02hi", step)
    assert upgrade.result == UpgradeAccepted(b"\x81\x02hi"[: len(upgrade.result.trailing)])
    assert b"\x81\x02hi".startswith(upgrade.result.trailing) and upgrade.status == 101


@pytest.mark.parametrize("step", [1, 5, 1000])
def test_upgrade_refusal_gives_its_status_and_body(step):
    body = b'{"code":"Unauthorized","message":"no token"}'
    head = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: %d\r\n\r\n" % len(body)
    upgrade = fed(head + body, step)
    assert upgrade.result == UpgradeRefused(401)
    assert bytes(upgrade.body) == body and upgrade.body_complete


def test_upgrade_refusal_body_cut_short_keeps_what_came():
    upgrade = fed(b"HTTP/1.1 503 Busy\r\nContent-Length: 100\r\n\r\nretry", 1000)
    assert upgrade.result == UpgradeRefused(503) and not upgrade.body_complete
    upgrade.receive_data(b"")
    assert bytes(upgrade.body) == b"retry" and upgrade.body_complete


@pytest.mark.parametrize(("answer", "words"), [
    (SWITCH.replace(accept_key(KEY).encode(), b"AAAA"), "Sec-WebSocket-Accept does not match"),
    (SWITCH.replace(b"Upgrade: websocket\r\n", b""), "no 'Upgrade: websocket'"),
    (b"SSH-2.0-OpenSSH\r\n\r\n", "is not HTTP/1.1"),
    (b"", "closed the connection before answering"),
])
def test_upgrade_bad_answers_raise_saying_what_was_wrong(answer, words):
    upgrade = ClientUpgrade("relay", "/", [], KEY)
    with pytest.raises(RemoteProtocolError, match=words):
        upgrade.receive_data(answer)
        upgrade.receive_data(b"")
