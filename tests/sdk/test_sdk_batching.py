"""The SDK's WebSocket writes in batches: with a writer running, the frames queued in one
scheduling round (a loop of sends, the answers to one read) go out in one write; without one,
each send writes its own frame. Masking keys come from the OS 4 KiB at a time."""

from __future__ import annotations

import socket

import anyio
import anyio.abc
import anyio.lowlevel
import h11
import pytest
from sdkhelpers import BACKENDS, run, wait_for
from test_sdk_websocket import one_shot_server

from relaycore.protocol import BinaryMessage, Role, WebSocketProtocol, accept_key
from relaycore.sdk import _websocket
from relaycore.sdk._websocket import WebSocketClosed, WebSocketConnection, connect_websocket


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


@pytest.mark.parametrize("backend", BACKENDS)
def test_writes_past_a_full_socket_buffer_arrive_whole_and_in_order(backend):
    """A write on the socket's descriptor that the kernel takes only in part goes on through
    the stream (which waits for room); later writes queue behind it."""
    count, size = 120, 40_000  # several MB: more than the socket buffers hold
    reading = anyio.Event()
    received: list[bytes] = []

    async def handler(stream, conn, headers):
        # Small kernel buffers (no autotuning), so that the client's writes fill them.
        stream.extra(anyio.abc.SocketAttribute.raw_socket).setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        await stream.send(conn.send(h11.InformationalResponse(status_code=101, headers=[
            ("upgrade", "websocket"), ("connection", "Upgrade"),
            ("sec-websocket-accept", accept_key(headers["sec-websocket-key"]))])))
        await reading.wait()  # the client fills the buffers first
        server = WebSocketProtocol(Role.SERVER, max_message_size=None)
        while len(received) < count:
            server.receive_data(await stream.receive())
            received.extend(e.data for e in server.events_received()
                            if isinstance(e, BinaryMessage))

    async def scenario():
        async with anyio.create_task_group() as servers:
            port = await one_shot_server(servers, handler)
            ws = await connect_websocket(f"ws://127.0.0.1:{port}/")
            ws._stream.extra(anyio.abc.SocketAttribute.raw_socket).setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)

            async def sender() -> None:
                for i in range(count):
                    await ws.send(bytes([i]) * size)
                ws.stop_writer()

            async with anyio.create_task_group() as task_group:
                await task_group.start(ws.run_writer)
                task_group.start_soon(sender)
                # The socket is full and the sender waits for the write, then the server reads.
                await wait_for(lambda: ws._written is not None)
                reading.set()
        await ws.aclose()
        assert received == [bytes([i]) * size for i in range(count)]

    run(backend, scenario, timeout=60)
