"""``relaycore.client`` with stateful reconnect against the real relay (in-process under trio,
a subprocess under asyncio), through a small TCP proxy the test cuts: the client resumes the
same connection on a new WebSocket and gets every message once, in order."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.abc
import pytest
from clienthelpers import open_relay, run, wait_for

from relaycore.client import HubConnectionBuilder, HubConnectionState


class Proxy:
    """A TCP proxy to ``port``; ``cut`` closes every connection it carries, both sides, with
    no WebSocket close frame (a network that drops)."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.port = 0
        self._streams: list[anyio.abc.SocketStream] = []

    async def _carry(self, client: anyio.abc.SocketStream) -> None:
        async with client, await anyio.connect_tcp("127.0.0.1", self.target) as relay:
            self._streams += [client, relay]
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(self._pump, client, relay, task_group.cancel_scope)
                task_group.start_soon(self._pump, relay, client, task_group.cancel_scope)

    @staticmethod
    async def _pump(source: anyio.abc.SocketStream, sink: anyio.abc.SocketStream,
                    scope: anyio.CancelScope) -> None:
        with contextlib.suppress(anyio.EndOfStream, anyio.ClosedResourceError,
                                 anyio.BrokenResourceError, OSError):
            while True:
                await sink.send(await source.receive())
        scope.cancel()

    async def cut(self) -> None:
        streams, self._streams = self._streams, []
        for stream in streams:
            await stream.aclose()


@contextlib.asynccontextmanager
async def open_proxy(port: int) -> AsyncIterator[Proxy]:
    proxy = Proxy(port)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    proxy.port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as task_group:
        task_group.start_soon(listener.serve, proxy._carry)
        yield proxy
        task_group.cancel_scope.cancel()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_cut_socket_is_resumed_and_every_message_arrives_once_in_order(backend):
    async def scenario():
        async with open_relay(backend) as relay, open_proxy(relay.port) as proxy:
            connection = (HubConnectionBuilder()
                          .with_url(f"http://127.0.0.1:{proxy.port}/client/?hub=chat",
                                    access_token_factory=relay.token_factory(user="kim"))
                          .with_stateful_reconnect()
                          .build())
            got: list[Any] = []
            connection.on("notify", got.append)
            async with connection:
                connection_id = connection.connection_id
                for number in range(50):
                    await relay.send("/api/hubs/chat/users/kim", "notify", number)
                await wait_for(lambda: len(got) >= 20)
                await proxy.cut()
                for number in range(50, 100):
                    await relay.send("/api/hubs/chat/users/kim", "notify", number)
                await wait_for(lambda: len(got) >= 100, timeout=10)
                assert got == list(range(100))
                assert connection.connection_id == connection_id
                assert connection.state is HubConnectionState.CONNECTED
                response = await relay.rest("HEAD", f"/api/hubs/chat/connections/{connection_id}")
                assert response.status_code == 200

    run(backend, scenario)
