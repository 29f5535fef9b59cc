"""The client through the real relay to a hub of relaycore's server SDK: invocations and their
errors, a burst of a thousand messages, server-to-client and client-to-server streams, client
results, and the negotiate redirect of an app server behind uvicorn."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from clienthelpers import BACKENDS, RelayUnderTest, open_relay, run, wait_for

from relaycore.client import HubConnection, HubConnectionBuilder, HubException
from relaycore.sdk import Hub, HubServer, ServiceOptions
from relaycore.sdk import HubException as ServerHubException

PROTOCOLS = ["json", "messagepack"]
#: Every transport with every hub protocol it carries (an event stream is text only).
TRANSPORTS = [("WebSockets", "json"), ("WebSockets", "messagepack"),
              ("ServerSentEvents", "json"), ("LongPolling", "json"),
              ("LongPolling", "messagepack")]
APP_SERVER = Path(__file__).resolve().parent / "appserver.py"


class Chat(Hub):
    #: What the streaming method saw: how many items it produced, and whether it was stopped.
    produced: list[int] = []
    stopped: list[bool] = []

    async def add(self, a, b):
        return a + b

    async def refuse(self):
        raise ServerHubException("no")

    async def whoami(self):
        return {"user": self.context.user_id, "connection": self.context.connection_id}

    async def burst(self, count):
        for number in range(count):
            await self.clients.caller.send("number", number)
        return count

    async def counter(self, count):
        try:
            for number in range(count):
                Chat.produced.append(number)
                yield number
                await anyio.sleep(0.01)
        except BaseException:
            Chat.stopped.append(True)
            raise

    async def total(self, items: AsyncIterator[int]) -> int:
        return sum([item async for item in items])

    async def ask(self, x):
        return await self.clients.caller.invoke("answer", x, timeout=5)


@contextlib.asynccontextmanager
async def hub_server(relay: RelayUnderTest) -> AsyncIterator[HubServer]:
    server = HubServer(ServiceOptions(connection_string=relay.connection_string,
                                      connection_count=1))
    server.map_hub("chat", Chat)
    async with server:
        yield server


def connect(relay: RelayUnderTest, protocol: str, transport: str = "WebSockets",
            user: str = "alice") -> HubConnection:
    return (HubConnectionBuilder()
            .with_url(relay.client_url(), access_token_factory=relay.token_factory(user=user),
                      transport=transport)
            .with_hub_protocol(protocol)
            .build())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("transport", "protocol"), TRANSPORTS)
def test_invoke_reaches_the_app_servers_hub_and_returns_its_result_or_error(
        backend, transport, protocol):
    async def scenario():
        async with open_relay(backend) as relay, hub_server(relay):
            async with connect(relay, protocol, transport) as connection:
                assert await connection.invoke("add", 2, 3) == 5
                assert await connection.invoke("whoami") == {
                    "user": "alice", "connection": connection.connection_id}
                with pytest.raises(HubException) as caught:
                    await connection.invoke("refuse")
                assert caught.value.error.endswith("HubException: no")
                with pytest.raises(HubException, match=r"^Unknown hub method 'nope'$"):
                    await connection.invoke("nope")
                await connection.send("add", 1, 1)  # no answer comes back for a send
                assert await connection.invoke("add", "a", "b") == "ab"

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("transport", "protocol"), TRANSPORTS)
def test_a_burst_of_a_thousand_numbered_messages_arrives_complete_and_in_order(
        backend, transport, protocol):
    async def scenario():
        async with open_relay(backend) as relay, hub_server(relay):
            connection = connect(relay, protocol, transport)
            numbers: list[int] = []
            connection.on("number", numbers.append)
            async with connection:
                assert await connection.invoke("burst", 1000) == 1000
                await wait_for(lambda: len(numbers) >= 1000)
            assert numbers == list(range(1000))

    run(backend, scenario, timeout=30)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("transport", "protocol"), TRANSPORTS)
def test_streams_flow_both_ways_and_a_consumer_stopping_early_stops_the_hub(
        backend, transport, protocol):
    async def scenario():
        Chat.produced.clear()
        Chat.stopped.clear()
        async with open_relay(backend) as relay, hub_server(relay):
            async with connect(relay, protocol, transport) as connection:
                assert [n async for n in connection.stream("counter", 4)] == [0, 1, 2, 3]
                assert Chat.stopped == []

                Chat.produced.clear()
                async with connection.stream("counter", 1000) as counter:
                    async for number in counter:
                        if number == 2:
                            break
                await wait_for(lambda: Chat.stopped)
                assert len(Chat.produced) < 1000

                async def items():
                    for number in range(1, 11):
                        yield number

                assert await connection.invoke("total", items()) == 55

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("transport", "protocol"), TRANSPORTS[1:4])
def test_a_handlers_return_value_answers_the_hubs_client_invocation(
        backend, transport, protocol):
    async def scenario():
        async with open_relay(backend) as relay, hub_server(relay):
            connection = connect(relay, protocol, transport)

            async def answer(x):
                if x < 0:
                    raise ValueError(f"{x} is negative")
                await anyio.sleep(0)
                return 2 * x

            connection.on("answer", answer)
            async with connection:
                assert await connection.invoke("ask", 21) == 42
                with pytest.raises(HubException, match="ValueError: -1 is negative"):
                    await connection.invoke("ask", -1)
                connection.off("answer")
                with pytest.raises(HubException, match="Client didn't provide a result."):
                    await connection.invoke("ask", 1)

    run(backend, scenario)


@contextlib.asynccontextmanager
async def app_server(relay: RelayUnderTest) -> AsyncIterator[str]:
    """``appserver.py`` under uvicorn, as its own process; yields its base URL."""
    process = await anyio.open_process(
        [sys.executable, str(APP_SERVER), relay.connection_string],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert process.stderr is not None
        output = b""
        with anyio.fail_after(15):
            while not (found := re.search(rb"Uvicorn running on (http://[\d.]+:\d+)", output)):
                chunk = await process.stderr.receive()
                assert chunk, output.decode()
                output += chunk
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(_drain, process.stderr)
            yield found.group(1).decode()
            task_group.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.terminate()
            with anyio.move_on_after(5) as timer:
                await process.wait()
            if timer.cancelled_caught:
                process.kill()
                await process.wait()
            await process.aclose()


async def _drain(stream: Any) -> None:
    with contextlib.suppress(anyio.EndOfStream, anyio.ClosedResourceError,
                             anyio.BrokenResourceError):
        while True:
            await stream.receive()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_app_servers_negotiate_redirects_the_client_to_the_relay(backend, protocol):
    async def scenario():
        async with open_relay(backend) as relay, app_server(relay) as base:
            connection = HubConnection(f"{base}/hubs/chat?user=hana", protocol=protocol,
                                       reconnect=[0])
            async with connection:
                who = await connection.invoke("whoami")
                assert who == {"user": "hana", "connection": connection.connection_id}
                assert await connection.invoke("echo", {"bytes": b"\x00\x01"} if
                                               protocol == "messagepack" else [1, "x"]) == (
                    {"bytes": b"\x00\x01"} if protocol == "messagepack" else [1, "x"])
                # A reconnect negotiates with the app server again (a new redirect).
                reconnected: list[str | None] = []
                connection.on_reconnected(reconnected.append)
                await relay.rest("DELETE",
                                 f"/api/hubs/chat/connections/{connection.connection_id}")
                await wait_for(lambda: reconnected, timeout=10)
                assert (await connection.invoke("whoami"))["user"] == "hana"

    run(backend, scenario, timeout=40)
