"""The SDK's WebSocket writes in batches: with a writer running, the frames queued in one
scheduling round (a loop of sends, the answers to one read) go out in one write; without one,
each send writes its own frame. Masking keys come from the OS 4 KiB at a time."""

from __future__ import annotations

import anyio
import anyio.abc
import anyio.lowlevel
import pytest
from sdkhelpers import BACKENDS, run

from relaycore.protocol import BinaryMessage, Role, WebSocketProtocol
from relaycore.sdk import _websocket
from relaycore.sdk._websocket import WebSocketClosed, WebSocketConnection


class CountingStream(anyio.abc.ByteStream):
    """A byte stream that keeps each write apart (a write is one system call on a socket)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    async def send(self, item: bytes) -> None:
        await anyio.lowlevel.checkpoint()
        if self.closed:
            raise anyio.ClosedResourceError
        self.writes.append(bytes(item))

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        self.closed = True


def messages_in(writes: list[bytes]) -> list[bytes]:
    """The messages the writes carry, as the server reads them."""
    server = WebSocketProtocol(Role.SERVER)
    server.receive_data(b"".join(writes))
    return [e.data for e in server.events_received() if isinstance(e, BinaryMessage)]


def client(stream: CountingStream) -> WebSocketConnection:
    return WebSocketConnection(stream, WebSocketProtocol(Role.CLIENT, mask_key=lambda: b"abcd"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_loop_of_sends_with_a_writer_costs_one_write(backend):
    async def scenario():
        stream = CountingStream()
        ws = client(stream)
        async with anyio.create_task_group() as task_group:
            await task_group.start(ws.run_writer)
            for i in range(100):
                await ws.send(b"m%d" % i)
            ws.stop_writer()
        assert len(stream.writes) == 1
        assert messages_in(stream.writes) == [b"m%d" % i for i in range(100)]

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sends_of_several_tasks_in_one_round_share_a_write(backend):
    async def scenario():
        stream = CountingStream()
        ws = client(stream)

        async def sender(i: int) -> None:
            await ws.send(b"t%d" % i)

        async with anyio.create_task_group() as task_group:
            await task_group.start(ws.run_writer)
            async with anyio.create_task_group() as senders:
                for i in range(10):
                    senders.start_soon(sender, i)
            ws.stop_writer()
        assert len(stream.writes) == 1
        assert sorted(messages_in(stream.writes)) == sorted(b"t%d" % i for i in range(10))

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_a_writer_each_send_is_written_before_it_returns(backend):
    async def scenario():
        stream = CountingStream()
        ws = client(stream)
        for i in range(3):
            await ws.send(b"s%d" % i)
            assert messages_in(stream.writes) == [b"s%d" % j for j in range(i + 1)]
        assert len(stream.writes) == 3

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failed_write_ends_the_connection_for_later_sends(backend):
    async def scenario():
        stream = CountingStream()
        ws = client(stream)
        stream.closed = True
        async with anyio.create_task_group() as task_group:
            await task_group.start(ws.run_writer)
            await ws.send(b"lost")  # queued; the writer's write fails
        assert ws.closed
        with pytest.raises(WebSocketClosed):
            await ws.send(b"later")

    run(backend, scenario)


def test_masking_keys_are_read_from_the_os_a_pool_at_a_time(monkeypatch):
    reads: list[int] = []

    def urandom(n: int) -> bytes:
        reads.append(n)
        return bytes(range(256)) * (n // 256)

    monkeypatch.setattr(_websocket.os, "urandom", urandom)
    keys = _websocket._MaskKeys()
    drawn = [keys() for _ in range(2000)]
    assert all(len(key) == 4 for key in drawn)
    assert drawn[:2] == [bytes((0, 1, 2, 3)), bytes((4, 5, 6, 7))]
    assert reads == [4096, 4096]  # 1,024 keys per read
