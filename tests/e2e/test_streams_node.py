"""Streams both ways through the real relay, between the official ``@microsoft/signalr`` client
under Node.js (``node/streams.js``) and an app server on relaycore's server SDK (in this
process, under trio), in JSON and in MessagePack (client-protocol §5).

* Upload: 1,000 numbered items through ``invoke`` (summed), ``send`` (collected) and
  ``stream`` (echoed back doubled); a subject the client fails; stream counts that do not
  match the method ("Client sent N stream(s), Hub method expects M.").
* A method that stops reading: past ``stream_buffer_capacity`` items its stream fails, and
  the client is told why.
* Beside them, a download stream and a client result (``clients.caller.invoke``).
* Cancellation: disposing of an echo's subscription cancels the hub method, and the items the
  client sends after it are dropped; a client that stops mid-upload fails the method's stream.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
import trio

from relaycore.sdk import Hub, HubException, HubServer, ServiceOptions

from .harness import NODE_DIR, WAIT, RelayProcess

pytestmark = pytest.mark.e2e

STREAMS_JS = NODE_DIR / "streams.js"
COUNT = 1000


class Streams(Hub):
    """Records what its upload methods saw in ``record`` (set by the test's factory)."""

    record: dict[str, Any]

    async def sum(self, items: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
        count = total = 0
        in_order = True
        async for item in items:
            count += 1
            total += item["n"]
            in_order = in_order and item == {"n": count, "label": f"item {count}"}
        return {"count": count, "total": total, "inOrder": in_order}

    async def collect(self, name: str, items: AsyncIterator[int]) -> None:
        got: list[int] = []
        try:
            async for item in items:
                got.append(item)
        except HubException as exc:
            self.record[name] = {"error": str(exc), "items": got}
        else:
            self.record[name] = {"items": got}

    async def echo(self, items: AsyncIterator[int], factor: int) -> AsyncIterator[int]:
        try:
            async for item in items:
                yield item * factor
        except anyio.get_cancelled_exc_class():
            self.record["echo"] = "cancelled"
            raise

    async def stall(self, items: AsyncIterator[int]) -> int:
        """Reads one item, then asks the client for a result: its answer comes after all its
        items, which overflow the buffer meanwhile."""
        first = await anext(items)
        await self.clients.caller.invoke("answer", first, timeout=WAIT)
        return sum([item async for item in items])

    async def count(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    async def plain(self, value: int) -> int:
        return value

    async def ask_caller(self, value: int) -> Any:
        return await self.clients.caller.invoke("answer", value, timeout=WAIT)


@pytest.fixture
async def app(relay: RelayProcess) -> AsyncIterator[dict[str, Any]]:
    """An SDK app server serving ``Streams`` as hub "streams" through ``relay``; yields the
    dict its hub methods record into."""
    record: dict[str, Any] = {}

    def make() -> Streams:
        hub = Streams()
        hub.record = record
        return hub

    server = HubServer(ServiceOptions(connection_string=relay.connection_string,
                                      connection_count=2))
    server.map_hub("streams", Streams, factory=make)
    async with server:
        with trio.fail_after(WAIT):
            await server.wait_online("streams")
        yield record


async def play(node: str, relay: RelayProcess, scenario: str, protocol: str) -> dict[str, Any]:
    """Run ``streams.js`` for ``scenario``; its JSON answer (a failure shows its output)."""
    args = {"url": relay.client_url("streams"), "token": relay.client_token("streams"),
            "protocol": protocol, "scenario": scenario, "count": COUNT,
            "flood": Streams.stream_buffer_capacity + 100}
    with trio.fail_after(3 * WAIT):
        done = await trio.run_process([node, str(STREAMS_JS), json.dumps(args)],
                                      capture_stdout=True, capture_stderr=True, check=False,
                                      cwd=str(NODE_DIR), stdin=subprocess.DEVNULL)
    output = done.stdout.decode(errors="replace")
    problem = (f"streams.js {scenario} ({protocol}) exited with {done.returncode}\n"
               f"stdout: {output}\nstderr: {done.stderr.decode(errors='replace')}\n"
               f"{relay.describe()}")
    assert done.returncode == 0, problem
    answer: dict[str, Any] = json.loads(output.splitlines()[-1])
    assert answer["ok"], problem
    return answer


async def until(predicate: Any, what: str) -> None:
    """Poll ``predicate`` (state of this process's app server) until it holds."""
    with trio.move_on_after(WAIT):
        while not predicate():
            await trio.sleep(0.01)
    assert predicate(), f"timed out waiting for {what}"


@pytest.mark.parametrize("protocol", ["json", "messagepack"])
async def test_uploads_downloads_and_client_results(
        relay: RelayProcess, app: dict[str, Any], node_available: str, protocol: str) -> None:
    got = await play(node_available, relay, "upload", protocol)
    numbers = list(range(1, COUNT + 1))
    assert got["sum"] == {"count": COUNT, "total": sum(numbers), "inOrder": True}
    assert got["echo"] == [2 * n for n in numbers]
    await until(lambda: "sent" in app, "the sent upload to be collected")
    assert app["sent"] == {"items": numbers}
    assert got["failed"] == ("An unexpected error occurred invoking 'Sum' on the server. "
                             "HubException: the file is gone")
    assert got["noStream"] == "Client sent 0 stream(s), Hub method expects 1."
    assert got["extraStream"] == "Client sent 1 stream(s), Hub method expects 0."
    capacity = Streams.stream_buffer_capacity
    assert re.fullmatch(
        "An unexpected error occurred invoking 'Stall' on the server. HubException: Stream "
        rf"'\d+' was sent more than {capacity} items ahead of the hub method reading it.",
        got["flooded"]), got["flooded"]
    assert got["count"] == [0, 1, 2, 3, 4]
    assert got["asked"] == 42


@pytest.mark.parametrize("protocol", ["json", "messagepack"])
async def test_disposing_of_an_echo_cancels_the_method(
        relay: RelayProcess, app: dict[str, Any], node_available: str, protocol: str) -> None:
    got = await play(node_available, relay, "cancel", protocol)
    assert got["echoes"] == list(range(1, 11))
    assert got["after"] == 7
    await until(lambda: "echo" in app, "the echo to be cancelled")
    assert app["echo"] == "cancelled"


@pytest.mark.parametrize("protocol", ["json", "messagepack"])
async def test_a_client_that_stops_mid_upload_fails_the_stream(
        relay: RelayProcess, app: dict[str, Any], node_available: str, protocol: str) -> None:
    got = await play(node_available, relay, "stop", protocol)
    assert got["plain"] == 1
    await until(lambda: "unfinished" in app, "the unfinished upload to fail")
    assert app["unfinished"] == {"error": "The client disconnected before the stream ended.",
                                 "items": list(range(1, 11))}
