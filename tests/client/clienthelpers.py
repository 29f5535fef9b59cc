"""The real relay for the client's tests, on every backend the client runs on.

The relay runs on trio: under trio it runs in-process (``serve_relay``), under asyncio and
uvloop as a subprocess (``python -m relaycore serve``), as the SDK's tests do. Either way the
test sees a ``RelayUnderTest``: its port, the client URL of a hub, its connection string for
app servers, REST sends, and ``crash``/``restart`` (every socket dropped at once, then a new
relay on the same port).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest

from relayhelpers import KEY, client_token, rest_token

#: Every scenario runs on each: asyncio, asyncio with uvloop's loop, trio.
BACKENDS = ["asyncio", "uvloop", "trio"]
API = {"api-version": "2022-06-01"}


def run(backend: str, scenario: Callable[[], Awaitable[None]], timeout: float = 20) -> None:
    """Run ``scenario`` on ``backend`` (a name of ``BACKENDS``) under a deadline."""

    async def main() -> None:
        with anyio.fail_after(timeout):
            await scenario()

    if backend == "uvloop":
        pytest.importorskip("uvloop")
        anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})
    else:
        anyio.run(main, backend=backend)


async def wait_for(predicate: Callable[[], bool], timeout: float = 5) -> None:
    """Wait until ``predicate()`` holds (polling; the deadline fails the test)."""
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)


class RelayUnderTest:
    """One relay: in-process under trio, a subprocess otherwise (see the module doc)."""

    def __init__(self, backend: str, task_group: anyio.abc.TaskGroup,
                 settings: dict[str, Any]) -> None:
        self.in_process = backend == "trio"
        self.task_group = task_group
        self.settings = settings
        self.port = 0
        self._scope: anyio.CancelScope | None = None
        self._process: anyio.abc.Process | None = None

    def client_url(self, hub: str = "chat") -> str:
        """The hub URL a client negotiates with."""
        return f"http://127.0.0.1:{self.port}/client/?hub={hub}"

    def token_factory(self, hub: str = "chat", user: str | None = None) -> Callable[[], str]:
        return lambda: client_token(hub, user)

    @property
    def connection_string(self) -> str:
        return f"Endpoint=http://127.0.0.1;Port={self.port};AccessKey={KEY};Version=1.0;"

    async def rest(self, method: str, path: str, json: Any = None,
                   params: dict[str, str] | None = None) -> httpx.Response:
        """A signed REST call to ``/api/hubs/chat{path}``-style ``path``."""
        async with httpx.AsyncClient() as http:
            return await http.request(
                method, f"http://127.0.0.1:{self.port}{path}", json=json,
                params={**API, **(params or {})},
                headers={"Authorization": f"Bearer {rest_token(path)}"})

    async def send(self, path: str, target: str, *args: Any) -> None:
        """``POST {path}/:send``: ``target(*args)`` to whoever ``path`` names."""
        response = await self.rest("POST", f"{path}/:send",
                                   json={"target": target, "arguments": list(args)})
        assert response.status_code == 202, response.text

    async def start(self, port: int = 0) -> None:
        if self.in_process:
            await self.task_group.start(self._serve_in_process, port)
        else:
            await self._start_process(port)

    async def _serve_in_process(self, port: int, *, task_status: Any) -> None:
        import trio

        from relaycore.relay import RelayConfig, serve_relay

        config = RelayConfig(port=port, host="127.0.0.1", access_keys=[KEY], **self.settings)
        with anyio.CancelScope() as self._scope:
            async with trio.open_nursery() as nursery:
                relay = await nursery.start(serve_relay, config)
                self.port = relay.port
                task_status.started()

    async def _start_process(self, port: int) -> None:
        env = {key: value for key, value in os.environ.items()
               if not key.startswith("RELAYCORE_")
               or key in ("RELAYCORE_NO_EXTENSIONS", "RELAYCORE_REQUIRE_EXTENSIONS")}
        env.update({f"RELAYCORE_{name.upper()}": str(value)
                    for name, value in self.settings.items()})
        process = await anyio.open_process(
            [sys.executable, "-m", "relaycore", "serve", "--port", str(port),
             f"--access-key={KEY}", "--log-level", "WARNING"],
            stdout=subprocess.PIPE, stderr=None, env=env)
        self._process = process
        assert process.stdout is not None
        buffer = b""
        with anyio.fail_after(15):
            while b"connection string:" not in buffer:
                chunk = await process.stdout.receive()
                assert chunk, f"the relay exited: {buffer.decode()}"
                buffer += chunk
        for line in buffer.decode().splitlines():
            if " listening on " in line:
                self.port = int(line.split(" listening on ")[1].split()[0].rsplit(":", 1)[1])
        assert self.port, buffer
        # Keep the pipe drained: a relay that writes to a full pipe would block.
        self.task_group.start_soon(_drain, process.stdout)

    async def crash(self) -> None:
        """Every socket of the relay dropped at once, without a Close message."""
        if self.in_process:
            assert self._scope is not None
            self._scope.cancel()
            self._scope = None
        else:
            assert self._process is not None
            self._process.kill()
            await self._process.wait()
            await self._process.aclose()
            self._process = None

    async def restart(self) -> None:
        """A new relay on the same port."""
        await self.start(self.port)

    async def stop(self) -> None:
        if self.in_process:
            if self._scope is not None:
                self._scope.cancel()
            return
        process = self._process
        if process is None:
            return
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.terminate()
            with anyio.move_on_after(5) as timer:
                await process.wait()
            if timer.cancelled_caught:
                process.kill()
                await process.wait()
            await process.aclose()


async def _drain(stream: anyio.abc.ByteReceiveStream) -> None:
    with contextlib.suppress(anyio.EndOfStream, anyio.ClosedResourceError,
                             anyio.BrokenResourceError):
        while True:
            await stream.receive()


@contextlib.asynccontextmanager
async def open_relay(backend: str, **settings: Any) -> AsyncIterator[RelayUnderTest]:
    """The relay of ``backend``'s kind with ``settings`` (``RelayConfig`` field names), for
    the block; then stopped, and the block's tasks with it."""
    async with anyio.create_task_group() as task_group:
        relay = RelayUnderTest(backend, task_group, settings)
        await relay.start()
        try:
            yield relay
        finally:
            await relay.stop()
            task_group.cancel_scope.cancel()
