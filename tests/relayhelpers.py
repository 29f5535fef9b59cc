"""Helpers shared by the relay's in-process tests (imported by them and by conftest.py)."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from relaycore.protocol._auth import generate_access_token
from relaycore.relay._http import HttpConnection, Response

KEY = "test-access-key-for-the-relay-suite"


#: The byte vectors the tests assert, kept in the repository (``tests/vectors/README.md`` says
#: where each came from).
VECTORS_DIR = Path(__file__).resolve().parent / "vectors"


def load_vectors(name: str) -> dict[str, Any]:
    """One file of ``tests/vectors/``, parsed."""
    return json.loads((VECTORS_DIR / name).read_text(encoding="utf-8"))
RS = "\x1e"


def client_token(hub: str, user: str | None = None, *, key: str = KEY, lifetime: float = 600,
                 host: str = "127.0.0.1") -> str:
    return generate_access_token(key, f"http://{host}/client/?hub={hub}", now=time.time(),
                                 lifetime=lifetime, user_id=user)


def rest_token(path: str, key: str = KEY) -> str:
    return generate_access_token(key, f"http://127.0.0.1{path}", now=time.time())


#: The key of the relays' admin API (fault injection) in tests; never an access key.
ADMIN_KEY = "test-admin-key-of-the-relay-suite"


def admin_token(path: str = "/api/admin/faults") -> str:
    return rest_token(path, ADMIN_KEY)


class Client:
    """A SignalR client over trio-websocket speaking the JSON hub protocol."""

    def __init__(self, ws):
        self.ws = ws

    async def next_message(self) -> dict:
        """The next hub message that is not a Ping."""
        while True:
            data = await self.ws.get_message()
            text = data if isinstance(data, str) else data.decode()
            for record in text.split(RS)[:-1]:
                message = json.loads(record)
                if message.get("type") != 6:
                    return message


async def wait_for(predicate, timeout=5):
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)


async def open_stalled_client(port: int, user: str, hub: str = "chat") -> trio.SocketStream:
    """A raw client that upgrades, sends its JSON handshake in the same write and then reads
    nothing: its receive buffer is small, so the relay's writes back up quickly."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    handshake = ('{"protocol":"json","version":1}' + RS).encode()
    await stream.send_all(
        (f"GET /client/?hub={hub}&access_token={client_token(hub, user)} HTTP/1.1\r\n"
         "Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
         ).encode()
        # one masked text frame, all-zero mask (the payload reads as is); under 126 bytes
        + bytes([0x81, 0x80 | len(handshake)]) + b"\0\0\0\0" + handshake)
    return stream


class FakeUpstream:
    """An upstream (a serverless app's webhook endpoint) on relaycore's own h11 front: it
    records every request and answers what the test says (200 by default)."""

    def __init__(self) -> None:
        self.requests: list = []
        self.answer: Callable[[object], Response] = lambda request: Response(200)
        self.port = 0

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream) -> None:
        http = HttpConnection(stream, max_head=65536, max_body=1 << 20)
        # A relay that stops while its keep-alive connection is open may reset it.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._serve(http, stream)

    async def _serve(self, http: HttpConnection, stream) -> None:
        async with stream:
            while True:
                request = await http.read_request()
                if request is None:
                    return
                self.requests.append(request)
                await http.send_response(self.answer(request))
                if not http.can_continue():
                    return

    def events(self, event: str | None = None) -> list:
        return [r for r in self.requests
                if event is None or r.headers.get("x-asrs-event") == event]
