"""The real relay for the SDK's integration tests, and a small SignalR JSON client on anyio.

``relay_process`` starts ``python -m relaycore serve`` as a subprocess (so it runs beside an
asyncio test too). ``JsonHubClient`` is a SignalR client over the project's own
``WebSocketProtocol`` in client role: it negotiates through an app server's ASGI app, follows
the redirect to the relay, negotiates there and connects, like ``@microsoft/signalr`` does.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import anyio
import anyio.abc
import httpx
from sdkhelpers import KEY

from relaycore.sdk._websocket import WebSocketConnection, connect_websocket
from relayhelpers import ADMIN_KEY

RS = "\x1e"


@dataclass
class RelayProcess:
    port: int
    connection_string: str
    process: Any = None

    async def kill(self) -> None:
        """SIGKILL: the relay vanishes at once (the kernel closes its sockets)."""
        self.process.kill()
        await self.process.wait()


@contextlib.asynccontextmanager
async def relay_process(key: str = KEY, port: int = 0,
                        args: tuple[str, ...] = ()) -> AsyncIterator[RelayProcess]:
    """``python -m relaycore serve --port {port} {args}`` until the block ends (SIGTERM, then
    kill)."""
    process = await anyio.open_process(
        [sys.executable, "-m", "relaycore", "serve", "--port", str(port), f"--access-key={key}",
         f"--admin-key={ADMIN_KEY}", "--log-level", "WARNING", *args],
        stdout=subprocess.PIPE,
        stderr=None,
    )
    assert process.stdout is not None
    try:
        buffer = b""
        port = 0
        with anyio.fail_after(15):
            while b"connection string:" not in buffer:
                buffer += await process.stdout.receive()
        for line in buffer.decode().splitlines():
            if " listening on " in line:
                port = int(line.split(" listening on ")[1].split()[0].rsplit(":", 1)[1])
        assert port, buffer
        yield RelayProcess(
            port, f"Endpoint=http://127.0.0.1;Port={port};AccessKey={key};Version=1.0;", process
        )
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.terminate()
            with anyio.move_on_after(5) as scope:
                await process.wait()
            if scope.cancelled_caught:
                process.kill()
                await process.wait()
            await process.aclose()


async def negotiate_with_app(app: Any, hub: str = "chat", user: str | None = None) -> dict:
    """POST {mount}/{hub}/negotiate on an app server's ASGI app mounted at ``/hubs``."""
    transport = httpx.ASGITransport(app=app, root_path="/hubs")
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
        params = {"negotiateVersion": "1", **({"user": user} if user else {})}
        response = await http.post(f"/hubs/{hub}/negotiate", params=params,
                                   headers={"Origin": "http://page"})
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == "http://page"
    return response.json()


class JsonHubClient:
    """A SignalR client speaking JSON; answers ``answer(x)`` invocations with ``2 * x``."""

    def __init__(self, ws: WebSocketConnection, connection_id: str) -> None:
        self.ws = ws
        self.connection_id = connection_id
        self.received: list[dict] = []
        self._arrived = anyio.Event()
        self._ids = 0

    @classmethod
    async def connect(cls, redirect: dict, task_group: anyio.abc.TaskGroup) -> JsonHubClient:
        """Follow an app server's negotiate redirect to the relay and open the hub."""
        url, token = redirect["url"], redirect["accessToken"]
        parts = urlsplit(url)
        query = parts.query + "&negotiateVersion=1"
        negotiate_url = urlunsplit((parts.scheme, parts.netloc, parts.path + "negotiate",
                                    query, ""))
        async with httpx.AsyncClient() as http:
            response = await http.post(negotiate_url,
                                       headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200, response.text
        document = response.json()
        ws_query = parts.query + "&" + urlencode(
            {"id": document["connectionToken"], "access_token": token})
        ws_url = urlunsplit(("ws", parts.netloc, parts.path, ws_query, ""))
        ws = await connect_websocket(ws_url)
        client = cls(ws, document["connectionId"])
        await ws.send(json.dumps({"protocol": "json", "version": 1}) + RS)
        with anyio.fail_after(5):
            reply = await ws.receive()
        text = reply if isinstance(reply, str) else reply.decode()
        assert text.startswith("{}" + RS), text
        task_group.start_soon(client._read)
        return client

    async def _read(self) -> None:
        while True:
            try:
                data = await self.ws.receive()
            except ConnectionError:
                return
            text = data if isinstance(data, str) else data.decode()
            for record in text.split(RS):
                if not record:
                    continue
                message = json.loads(record)
                if message["type"] == 6:
                    continue
                if message["type"] == 1 and message.get("invocationId") \
                        and message["target"].lower() == "answer":
                    reply = {"type": 3, "invocationId": message["invocationId"],
                             "result": message["arguments"][0] * 2}
                    await self.ws.send(json.dumps(reply) + RS)
                    continue
                self.received.append(message)
                self._arrived.set()

    async def next(self, predicate: Any = None, timeout: float = 5) -> dict:
        """The first received message matching ``predicate`` (taken out of ``received``)."""
        with anyio.fail_after(timeout):
            while True:
                for index, message in enumerate(self.received):
                    if predicate is None or predicate(message):
                        del self.received[index]
                        return message
                self._arrived = anyio.Event()
                await self._arrived.wait()

    async def next_invocation(self, target: str, timeout: float = 5) -> list:
        message = await self.next(lambda m: m["type"] == 1 and m["target"] == target, timeout)
        return message["arguments"]

    async def invoke(self, target: str, *args: Any) -> dict:
        self._ids += 1
        invocation_id = str(self._ids)
        await self.ws.send(json.dumps({"type": 1, "invocationId": invocation_id,
                                       "target": target, "arguments": list(args)}) + RS)
        return await self.next(lambda m: m["type"] == 3 and m["invocationId"] == invocation_id)

    async def aclose(self) -> None:
        await self.ws.aclose()
