"""Streams through the server SDK against a fake service: uploads (``streamIds``, the client's
StreamItems and Completions feeding a hub method's ``AsyncIterator`` parameter) in JSON and
MessagePack, their errors, cancellation and overflow; download streams and client results
beside them; the upload example of docs/streaming.md run as written. Every test runs under
asyncio, uvloop and trio."""

from __future__ import annotations

import re
import typing
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from sdkhelpers import BACKENDS, RS, FakeService, run, wait_for

from relaycore.protocol import (
    CancelInvocationMessage,
    ClientInvocationMessage,
    CloseConnectionMessage,
    CompletionMessage,
    ConnectionDataMessage,
    InvocationMessage,
    JsonHubProtocol,
    MessagePackHubProtocol,
    OpenConnectionMessage,
    StreamInvocationMessage,
    StreamItemMessage,
)
from relaycore.sdk import Hub, HubException, HubServer, ServiceOptions
from relaycore.sdk._hub import HubMethodTable

if typing.TYPE_CHECKING:  # names the SDK cannot evaluate in annotations
    from collections.abc import Iterator as UnseenIterator
    from decimal import Decimal as Unseen

DOC = Path(__file__).resolve().parents[2] / "docs" / "streaming.md"
PROTOCOLS = ["json", "messagepack"]

#: What the hub methods saw, for the tests to read.
seen: list[Any] = []
#: Set by a test to let ``hold`` read its stream.
release: list[anyio.Event] = []


class Uploads(Hub):
    stream_buffer_capacity = 16

    async def sum(self, items: AsyncIterator[int]) -> int:
        return sum([item async for item in items])

    async def tag(self, prefix: str, items: typing.AsyncIterable[str], suffix: str = "!") -> str:
        return prefix + "".join([item async for item in items]) + suffix

    async def pair(self, left: AsyncIterable[int], right: AsyncIterator[int]) -> list[list[int]]:
        return [[item async for item in left], [item async for item in right]]

    async def record(self, items: AsyncIterator[Any]) -> None:
        try:
            seen.append(("items", [item async for item in items]))
        except HubException as exc:
            seen.append(("error", str(exc)))

    async def first(self, items: AsyncIterator[int]) -> int:
        async for item in items:
            return item
        return -1

    async def hold(self, items: AsyncIterator[int]) -> list[int]:
        await release[0].wait()
        got = []
        try:
            async for item in items:
                got.append(item)
        except HubException as exc:
            seen.append(("error", str(exc), got))
            raise
        return got

    async def echo(self, items: AsyncIterator[int], times: int) -> AsyncIterator[int]:
        try:
            async for item in items:
                yield item * times
        finally:
            seen.append("echo ended")

    async def count(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    async def plain(self, value: int) -> int:
        return value

    async def ask_caller(self, question: int) -> Any:
        return await self.clients.caller.invoke("answer", question, timeout=5)


@pytest.fixture(autouse=True)
def _clear() -> None:
    seen.clear()
    release.clear()


class Client:
    """One logical client on a fake server connection, speaking ``protocol``."""

    def __init__(self, conn: Any, protocol: str, connection_id: str = "c1") -> None:
        self.conn = conn
        self.connection_id = connection_id
        self.protocol = JsonHubProtocol() if protocol == "json" else MessagePackHubProtocol()
        self.buffer = bytearray()
        self.received: list[Any] = []

    async def open(self) -> Client:
        await self.conn.send(OpenConnectionMessage(self.connection_id, {}, protocol=
                                                   self.protocol.name))
        handshake = f'{{"protocol":"{self.protocol.name}","version":1}}'.encode() + RS
        await self.conn.send(ConnectionDataMessage(self.connection_id, handshake))
        assert await self.conn.client_data(self.connection_id) == b"{}" + RS
        return self

    async def send(self, *messages: Any) -> None:
        """All ``messages`` in one ConnectionData, as a batch from the service may be."""
        data = b"".join(self.protocol.write(m) for m in messages)
        await self.conn.send(ConnectionDataMessage(self.connection_id, data))

    async def next(self, predicate: Any) -> Any:
        """The first message received matching ``predicate`` (taken out of ``received``)."""
        while True:
            for index, message in enumerate(self.received):
                if predicate(message):
                    return self.received.pop(index)
            self.buffer += await self.conn.client_data(self.connection_id)
            messages, consumed = self.protocol.parse(self.buffer, 1 << 20)
            del self.buffer[:consumed]
            self.received += messages

    async def completion(self, invocation_id: str) -> CompletionMessage:
        return await self.next(lambda m: isinstance(m, CompletionMessage)
                               and m.invocation_id == invocation_id)

    async def upload(self, stream_id: str, items: Any, error: str | None = None) -> None:
        await self.send(*[StreamItemMessage(stream_id, item) for item in items],
                        CompletionMessage(stream_id, error=error))

    async def call(self, target: str, *args: Any, streams: tuple[str, ...] = ("0",),
                   invocation_id: str = "1") -> CompletionMessage:
        await self.send(InvocationMessage(target, args, invocation_id=invocation_id,
                                          stream_ids=streams))
        return await self.completion(invocation_id)


async def serving(scenario: Any, hub: type[Hub] = Uploads) -> None:
    """Run ``scenario(conn)`` with a HubServer on one fake server connection."""
    async with anyio.create_task_group() as tg:
        service = await FakeService().start(tg)
        server = HubServer(ServiceOptions(connection_string=service.connection_string,
                                          connection_count=1, retry_delay=lambda n: 0.05))
        server.map_hub("chat", hub)
        async with server:
            conn = (await service.wait_connections(1))[0]
            await scenario(conn)
        tg.cancel_scope.cancel()


# --- which parameters take streams, and how the arguments fill the others -------------------


def test_async_iterator_and_iterable_parameters_take_streams() -> None:
    table = HubMethodTable(Uploads)
    assert table.find("sum").uploads == ("items",)
    assert table.find("tag").uploads == ("items",)
    assert table.find("pair").uploads == ("left", "right")
    assert table.find("echo").uploads == ("items",)  # a streaming method may take uploads
    assert table.find("count").uploads == ()
    assert table.find("plain").uploads == ()


def test_annotations_that_cannot_be_evaluated_are_read_from_their_text() -> None:
    class Hidden(Hub):
        async def upload(self, a: AsyncIterator[Unseen], b: typing.AsyncIterable[Unseen],
                         c: list[Unseen], d: UnseenIterator) -> None:
            pass

    assert HubMethodTable(Hidden).find("upload").uploads == ("a", "b")


def test_streams_fill_their_parameters_and_arguments_the_others_in_order() -> None:
    tag = HubMethodTable(Uploads).find("tag")
    assert tag.bind(["<"], ["S"]) == (["<", "S"], {})
    assert tag.bind(["<", "?"], ["S"]) == (["<", "S", "?"], {})
    with pytest.raises(TypeError):
        tag.bind([], ["S"])  # prefix has no value
    with pytest.raises(TypeError):
        tag.bind(["<", "?", "extra"], ["S"])

    class Defaults(Hub):
        async def upload(self, size: int = 0, items: AsyncIterator[int] | None = None) -> None:
            pass

    class Later(Hub):
        async def upload(self, size: int = 0, *, items: AsyncIterator[int]) -> None:
            pass

    # Arguments ran out before the stream's parameter: it goes by name.
    assert HubMethodTable(Later).find("upload").bind([], ["S"]) == ([], {"items": "S"})
    # ``AsyncIterator[int] | None`` is not an upload: the stream is not bound to it.
    assert HubMethodTable(Defaults).find("upload").uploads == ()


@pytest.mark.parametrize("capacity", [0, -1, 2.5, "10"])
def test_the_buffer_capacity_is_checked_when_the_hub_is_mapped(capacity: Any) -> None:
    class Odd(Hub):
        stream_buffer_capacity = capacity

    with pytest.raises(ValueError, match="Odd.stream_buffer_capacity must be an integer >= 1"):
        HubMethodTable(Odd)


# --- uploads ----------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_uploaded_stream_of_1000_items_is_summed(backend: str, protocol: str) -> None:
    async def scenario(conn: Any) -> None:
        client = await Client(conn, protocol).open()
        # The invocation and its first items in one batch, then items in batches of five.
        await client.send(InvocationMessage("Sum", (), invocation_id="1", stream_ids=("0",)),
                          *[StreamItemMessage("0", i) for i in range(5)])
        for start in range(5, 1000, 5):
            await client.send(*[StreamItemMessage("0", i) for i in range(start, start + 5)])
        await client.send(CompletionMessage("0"))
        assert (await client.completion("1")).result == sum(range(1000))

    run(backend, lambda: serving(scenario))


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_streams_and_arguments_reach_their_parameters(backend: str, protocol: str) -> None:
    async def scenario(conn: Any) -> None:
        client = await Client(conn, protocol).open()
        await client.send(InvocationMessage("tag", ("<",), invocation_id="1", stream_ids=("0",)))
        await client.upload("0", ["a", "b"])
        assert (await client.completion("1")).result == "<ab!"
        await client.send(InvocationMessage("pair", (), invocation_id="2",
                                            stream_ids=("3", "4")))
        # Interleaved items of two streams, the second finished first.
        await client.send(StreamItemMessage("3", 1), StreamItemMessage("4", 10),
                          StreamItemMessage("3", 2), CompletionMessage("4"))
        await client.upload("3", [3])
        assert (await client.completion("2")).result == [[1, 2, 3], [10]]

    run(backend, lambda: serving(scenario))


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_upload_with_a_non_blocking_invocation(backend: str) -> None:
    async def scenario(conn: Any) -> None:
        client = await Client(conn, "json").open()
        await client.send(InvocationMessage("record", (), stream_ids=("0",)))
        await client.upload("0", [1, {"x": None}, "three"])
        await wait_for(lambda: bool(seen))
        assert seen == [("items", [1, {"x": None}, "three"])]

    run(backend, lambda: serving(scenario))


@pytest.mark.parametrize("backend", BACKENDS)
def test_stream_count_must_match_the_methods_stream_parameters(backend: str) -> None:
    async def scenario(conn: Any) -> None:
        client = await Client(conn, "json").open()
        assert (await client.call("plain", 1)).error == \
            "Client sent 1 stream(s), Hub method expects 0."
        assert (await client.call("pair", streams=("1",), invocation_id="2")).error == \
            "Client sent 1 stream(s), Hub method expects 2."
        assert (await client.call("sum", streams=(), invocation_id="3")).error == \
            "Client sent 0 stream(s), Hub method expects 1."
        await client.send(StreamInvocationMessage("4", "count", (2,), stream_ids=("5",)))
        assert (await client.completion("4")).error == \
            "Client sent 1 stream(s), Hub method expects 0."
        assert (await client.call("nothing", invocation_id="6")).error == \
            "Unknown hub method 'nothing'"
        assert (await client.call("sum", streams=("7", "7"), invocation_id="8")).error == \
            "Client sent 2 stream(s), Hub method expects 1."
        assert (await client.call("tag", streams=("9",), invocation_id="10")).error == \
            "Failed to invoke 'tag' due to an error on the server."
        # The items of the refused streams are dropped; the client carries on.
        await client.upload("0", [1, 2])
        await client.upload("9", ["x"])
        assert (await client.call("plain", 7, streams=(), invocation_id="11")).result == 7

    run(backend, lambda: serving(scenario))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stream_id_still_open_cannot_be_used_again(backend: str) -> None:
    async def scenario(conn: Any) -> None:
        client = await Client(conn, "json").open()
        await client.send(InvocationMessage("sum", (), invocation_id="1", stream_ids=("0",)))
        reused = await client.call("sum", invocation_id="2")
        assert reused.error == "Failed to invoke 'sum': its stream ids ['0'] repeat one " \
            "another or a stream still open."
        await client.upload("0", [1, 2])
        assert (await client.completion("1")).result == 3

    run(backend, lambda: serving(scenario))


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stream_the_client_ends_with_an_error_raises_in_the_method(backend: str,
                                                                     protocol: str) -> None:
    async def scenario(conn: Any) -> None:
        client = await Client(conn, protocol).open()
        await client.send(InvocationMessage("record", (), invocation_id="1", stream_ids=("0",)))
        await client.upload("0", [1, 2], error="Error: the file is gone")
        assert (await client.completion("1")).error is None
        assert seen == [("error", "Error: the file is gone")]
        # Uncaught, it is the method's error; a HubException's text reaches the client.
        await client.send(InvocationMessage("sum", (), invocation_id="2", stream_ids=("3",)))
        await client.upload("3", [1], error="Error: stop")
        assert (await client.completion("2")).error == \
            "An unexpected error occurred invoking 'sum' on the server. HubException: Error: stop"

    run(backend, lambda: serving(scenario))


@pytest.mark.parametrize("backend", BACKENDS)
def test_items_after_the_method_returned_are_dropped(backend: str) -> None:
    async def scenario(conn: Any) -> None:
        client = await Client(conn, "json").open()
        await client.send(InvocationMessage("first", (), invocation_id="1", stream_ids=("0",)))
        await client.send(StreamItemMessage("0", 5))
        assert (await client.completion("1")).result == 5
        await client.upload("0", [6, 7])
        assert (await client.call("plain", 1, streams=(), invocation_id="2")).result == 1

    run(backend, lambda: serving(scenario))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_method_that_falls_behind_fails_its_stream_without_holding_up_others(
        backend: str) -> None:
    async def scenario(conn: Any) -> None:
        release.append(anyio.Event())
        slow = await Client(conn, "json", "slow").open()
        other = await Client(conn, "json", "other").open()
        await slow.send(InvocationMessage("hold", (), invocation_id="1", stream_ids=("0",)))
        for item in range(40):  # capacity 16: the 17th item fails the stream
            await slow.send(StreamItemMessage("0", item))
        # The server connection's reader went on: another client is served meanwhile.
        assert (await other.call("plain", 3, streams=())).result == 3
        release[0].set()
        error = "Stream '0' was sent more than 16 items ahead of the hub method reading it."
        assert (await slow.completion("1")).error == \
            f"An unexpected error occurred invoking 'hold' on the server. HubException: {error}"
        assert seen == [("error", error, [])]
        await slow.send(CompletionMessage("0"))  # too late: ignored
        assert (await slow.call("plain", 4, streams=(), invocation_id="2")).result == 4

    run(backend, lambda: serving(scenario))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_method_that_keeps_up_reads_more_than_its_buffer_holds(backend: str) -> None:
    async def scenario(conn: Any) -> None:
        client = await Client(conn, "json").open()
        await client.send(InvocationMessage("sum", (), invocation_id="1", stream_ids=("0",)))
        # 200 ConnectionData of one item each, written at once: 12 times the capacity.
        data = [client.protocol.write(StreamItemMessage("0", 1)) for _ in range(200)]
        await conn.send(*[ConnectionDataMessage("c1", d) for d in data])
        await client.send(CompletionMessage("0"))
        assert (await client.completion("1")).result == 200

    run(backend, lambda: serving(scenario))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_client_that_leaves_mid_stream_fails_its_streams(backend: str) -> None:
    async def scenario(conn: Any) -> None:
        client = await Client(conn, "json").open()
        await client.send(InvocationMessage("record", (), invocation_id="1", stream_ids=("0",)))
        await client.send(StreamItemMessage("0", 1))
        await conn.send(CloseConnectionMessage("c1", "gone"))
        await wait_for(lambda: bool(seen))
        assert seen == [("error", "The client disconnected before the stream ended.")]

    run(backend, lambda: serving(scenario))


# --- uploads into streaming methods, download streams, client results -------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_streaming_method_echoes_an_upload_until_cancelled(backend: str,
                                                             protocol: str) -> None:
    async def scenario(conn: Any) -> None:
        client = await Client(conn, protocol).open()
        await client.send(StreamInvocationMessage("1", "echo", (3,), stream_ids=("0",)))
        for item in range(3):
            await client.send(StreamItemMessage("0", item))
            echoed = await client.next(lambda m: isinstance(m, StreamItemMessage))
            assert (echoed.invocation_id, echoed.item) == ("1", item * 3)
        await client.send(CancelInvocationMessage("1"))
        await wait_for(lambda: seen == ["echo ended"])
        # The stream's later items are dropped, and nothing more comes for the invocation.
        await client.upload("0", [9])
        assert (await client.call("plain", 1, streams=(), invocation_id="2")).result == 1
        assert client.received == []

    run(backend, lambda: serving(scenario))


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_streaming_method_echo_ends_with_the_upload(backend: str, protocol: str) -> None:
    async def scenario(conn: Any) -> None:
        client = await Client(conn, protocol).open()
        await client.send(StreamInvocationMessage("1", "echo", (2,), stream_ids=("0",)))
        echoed = []
        for start in range(0, 100, 10):  # ten at once (within the capacity), then their echoes
            await client.send(*[StreamItemMessage("0", i) for i in range(start, start + 10)])
            for _ in range(10):
                echoed.append(await client.next(lambda m: isinstance(m, StreamItemMessage)))
        await client.send(CompletionMessage("0"))
        done = await client.completion("1")
        assert done.error is None and not done.has_result
        assert [(m.invocation_id, m.item) for m in echoed] == [("1", i * 2) for i in range(100)]

    run(backend, lambda: serving(scenario))


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_download_streams_and_client_results_beside_uploads(backend: str, protocol: str) -> None:
    async def scenario(conn: Any) -> None:
        client = await Client(conn, protocol).open()
        await client.send(StreamInvocationMessage("1", "count", (3,)),
                          InvocationMessage("ask_caller", (21,), invocation_id="2"))
        # A client result goes out as ClientInvocation, which the service unwraps.
        wrapped = await conn.next(ClientInvocationMessage)
        (ask,), _ = client.protocol.parse(wrapped.payloads[protocol], 1 << 20)
        assert (ask.target, ask.arguments) == ("answer", (21,))
        await client.send(CompletionMessage(ask.invocation_id, result=42))
        assert (await client.completion("2")).result == 42
        await client.completion("1")
        assert [m.item for m in client.received if isinstance(m, StreamItemMessage)] == [0, 1, 2]

    run(backend, lambda: serving(scenario))


# --- docs/streaming.md ------------------------------------------------------------------------


def doc_example(name: str) -> dict[str, Any]:
    """Run the code block after ``<!-- example: {name} -->`` in docs/streaming.md."""
    text = DOC.read_text(encoding="utf-8")
    match = re.search(rf"<!-- example: {name} -->\s*```python\n(.*?)```", text, re.S)
    assert match, f"no example {name!r} in {DOC}"
    namespace: dict[str, Any] = {"__name__": "streaming_doc"}
    exec(compile(match.group(1), str(DOC), "exec"), namespace)
    return namespace


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_docs_upload_example_runs(backend: str) -> None:
    hub = doc_example("upload-hub")["Files"]

    async def scenario(conn: Any) -> None:
        client = await Client(conn, "messagepack").open()
        await client.send(InvocationMessage("Upload", ("notes.txt",), invocation_id="1",
                                            stream_ids=("0",)))
        await client.upload("0", [b"hello ", b"world"])
        assert (await client.completion("1")).result == {"name": "notes.txt", "size": 11}
        await client.send(StreamInvocationMessage("2", "Shout", (), stream_ids=("3",)))
        await client.upload("3", ["a", "b"])
        await client.completion("2")
        assert [m.item for m in client.received if isinstance(m, StreamItemMessage)] == \
            ["A", "B"]

    run(backend, lambda: serving(scenario, hub))
