"""REST routes, negotiate and their query values, as the relay routes a parsed request
(``HttpFront.route``: the REST API of ``relay._rest``, ``/client/negotiate``, the 404s).

Input: a flag byte, then one or more HTTP requests. Flag bit 0: sign each request with a valid
token for its URL (as the SDK does), so that routing reaches the operations and their query
values (``ttl``, ``excluded``, ``api-version``, ``application``) and bodies; without it the
token is whatever the request carries. Expected: a response, or ``HttpError`` that is not a
500; nothing logged at ERROR. A relay with no connections serves the inputs; it is replaced
every 1,000 inputs so that the groups the inputs create do not pile up.
"""

from __future__ import annotations

import logging
import time
from urllib.parse import urlsplit

from _harness import ScriptedStream, drive, instrumented, main, split_flags

with instrumented():
    from relaycore.protocol._auth import generate_access_token, wire_hub_name
    from relaycore.relay import Relay, RelayConfig
    from relaycore.relay._http import HttpConnection, HttpError, Request, Response

KEY = "fuzz-access-key"
_state: dict[str, object] = {"relay": None, "served": 0}


class _FailOnError(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        raise AssertionError(f"logged at {record.levelname}: {record.getMessage()}")


logging.getLogger("relaycore").addHandler(_FailOnError(logging.ERROR))
logging.getLogger("relaycore").setLevel(logging.ERROR)
logging.raiseExceptions = True


def relay() -> Relay:
    if _state["relay"] is None or _state["served"] >= 1000:  # type: ignore[operator]
        fresh = Relay(RelayConfig(port=0, access_keys=[KEY]))
        fresh.ops.now = lambda: 1000.0  # type: ignore[method-assign]  # no trio clock here
        _state["relay"], _state["served"] = fresh, 0
    _state["served"] += 1  # type: ignore[operator]
    return _state["relay"]  # type: ignore[return-value]


def sign(request: Request) -> None:
    """A token for this request's URL, as the SDK or a client's negotiate would carry."""
    if request.path.rstrip("/") == "/client/negotiate":
        try:
            hub = wire_hub_name(request.arg("hub") or "", request.arg("application"))
        except ValueError:
            return
        audience = f"http://127.0.0.1/client/?hub={hub}"
    else:
        audience = f"http://127.0.0.1{urlsplit(request.target).path}"
    token = generate_access_token(KEY, audience, now=time.time(), user_id="u")
    request.headers["authorization"] = f"Bearer {token}"


def test_one_input(data: bytes) -> None:
    flags, raw = split_flags(data)
    node = relay()
    http = HttpConnection(ScriptedStream([raw]), max_head=node.config.max_request_head,  # type: ignore[arg-type]
                          max_body=node.config.max_request_body)
    for _ in range(4):
        try:
            request = drive(http.read_request())
            if request is None or request.is_websocket_upgrade:
                return
            if flags & 1:
                sign(request)
            response = drive(node.front.route(request))
        except HttpError as err:
            assert err.status != 500, err
            drive(http.send_response(Response.error(err), close=True))
            return
        drive(http.send_response(response))
        if not http.can_continue():
            return


if __name__ == "__main__":
    main(test_one_input)
