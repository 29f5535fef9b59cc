"""Stateful reconnect, client side, against the scripted server (what the relay does not do on
cue; ``test_client_stateful_relay.py`` resumes through the real relay): asked for in
negotiate and the handshake, acks of what arrived, a dropped WebSocket resumed with the
unacknowledged messages replayed and the server's replays deduplicated, backpressure, and
what happens when a resume fails. The traces follow ``client-protocol.md`` §4.4 (the JS
client's ``MessageBuffer``)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from clienthelpers import run, wait_for
from fakehub import FakeHub

from relaycore.client import (
    HubConnection,
    HubConnectionBuilder,
    HubConnectionError,
    HubConnectionState,
    TransportError,
)
from relaycore.protocol import (
    AckMessage,
    CompletionMessage,
    InvocationMessage,
    PingMessage,
    SequenceMessage,
)

BACKENDS = ["asyncio", "trio"]


@contextlib.asynccontextmanager
async def stateful_hub() -> AsyncIterator[FakeHub]:
    async with anyio.create_task_group() as task_group:
        hub = await FakeHub().start(task_group)
        hub.stateful = True
        yield hub
        task_group.cancel_scope.cancel()


def stateful(hub: FakeHub, **options: Any) -> HubConnection:
    return HubConnection(hub.url, stateful_reconnect=True, **options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stateful_reconnect_is_asked_for_and_agreed_to_with_handshake_version_2(backend):
    async def scenario():
        async with stateful_hub() as hub:
            connection = (HubConnectionBuilder().with_url(hub.url)
                          .with_stateful_reconnect().build())
            async with connection:
                server = await hub.connection(0)
            assert hub.of("POST")[0].query["useStatefulReconnect"] == "true"
            assert server.handshake_version == 2

            # A server that does not agree: version 1, and a drop is a plain loss.
            hub.stateful = False
            connection = stateful(hub)
            closed: list[Any] = []
            connection.on_close(closed.append)
            await connection.start()
            server = await hub.connection(1)
            assert server.handshake_version == 1
            await server.drop()
            await wait_for(lambda: closed)
            assert isinstance(closed[0], TransportError)
            assert len(hub.connections) == 2

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_client_acks_what_it_processed_a_second_later(backend):
    async def scenario():
        async with stateful_hub() as hub:
            got: list[int] = []
            connection = stateful(hub)
            connection.on("n", got.append)
            async with connection:
                server = await hub.connection(0)
                await server.send(InvocationMessage("n", [1]), PingMessage(),
                                  InvocationMessage("n", [2]), InvocationMessage("n", [3]))
                ack = await server.next(AckMessage)
                assert ack.sequence_id == 3  # pings are not counted
                assert got == [1, 2, 3]
                assert server.of(AckMessage) == [ack]  # one ack for the three

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("protocol", ["json", "messagepack"])
def test_a_dropped_websocket_is_resumed_with_nothing_lost_and_nothing_twice(backend, protocol):
    async def scenario():
        async with stateful_hub() as hub:
            connection = stateful(hub, protocol=protocol)
            events: list[Any] = []
            connection.on_reconnecting(lambda error: events.append(("reconnecting", error)))
            connection.on_close(lambda error: events.append(("closed", error)))
            got: list[str] = []
            connection.on("notify", got.append)
            async with connection, anyio.create_task_group() as task_group:
                first = await hub.connection(0)
                connection_id = connection.connection_id
                results: list[Any] = []

                async def call() -> None:
                    results.append(await connection.invoke("slow"))  # trackable 1, id "0"

                task_group.start_soon(call)
                await first.next(InvocationMessage)
                await connection.send("fire", 1)                    # trackable 2
                await first.next(InvocationMessage)
                await first.send(AckMessage(1))                     # the server saw 1 only
                await first.send(InvocationMessage("notify", ["one"]))   # server's 1
                await wait_for(lambda: got == ["one"])
                await first.drop()

                # The same connection on a new WebSocket: no negotiate, no handshake.
                second = await hub.connection(1)
                assert second.request.query["id"] == first.request.query["id"]
                assert len(hub.of("POST")) == 1
                assert second.handshake_version is None
                assert await second.next(SequenceMessage) == SequenceMessage(2)
                replayed = await second.next(InvocationMessage)
                assert (replayed.target, replayed.arguments) == ("fire", (1,))
                assert second.of(InvocationMessage) == [replayed]  # not the acked "slow"

                # Ignored until the server's Sequence; then its replay of 1 is a duplicate.
                await second.send(InvocationMessage("notify", ["before the sequence"]),
                                  SequenceMessage(1),
                                  InvocationMessage("notify", ["one"]),
                                  CompletionMessage("0", result="slow done"),
                                  InvocationMessage("notify", ["two"]))
                await wait_for(lambda: results)
                await wait_for(lambda: got == ["one", "two"])
                assert results == ["slow done"]
                assert connection.connection_id == connection_id
                assert connection.state is HubConnectionState.CONNECTED
                ack = await second.next(AckMessage)
                assert ack.sequence_id == 3
            assert events == [("closed", None)]  # a resume is not a reconnect

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failed_resume_loses_the_connection_as_without_stateful_reconnect(backend):
    async def scenario():
        async with stateful_hub() as hub:
            connection = stateful(hub, reconnect=[0])
            reconnecting: list[Any] = []
            connection.on_reconnecting(reconnecting.append)
            async with connection, anyio.create_task_group() as task_group:
                first = await hub.connection(0)
                failures: list[BaseException] = []

                async def call() -> None:
                    try:
                        await connection.invoke("slow")
                    except HubConnectionError as exc:
                        failures.append(exc)

                task_group.start_soon(call)
                await first.next(InvocationMessage)
                hub.refuse_upgrade = 404   # the resume is refused ...
                await first.drop()
                await wait_for(lambda: reconnecting and failures)
                assert isinstance(reconnecting[0], TransportError)
                assert "Invocation canceled" in str(failures[0])
                hub.refuse_upgrade = None  # ... the reconnect that follows is not
                await wait_for(lambda: connection.state is HubConnectionState.CONNECTED)
                assert len(hub.of("POST")) == 2  # a new connection, negotiated
                assert connection.connection_id == "id-tok-2"

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sequence_beyond_what_arrived_ends_the_connection(backend):
    async def scenario():
        async with stateful_hub() as hub:
            connection = stateful(hub)
            closed: list[Any] = []
            connection.on_close(closed.append)
            await connection.start()
            first = await hub.connection(0)
            await first.send(InvocationMessage("x", []))  # one message arrived
            await first.drop()
            second = await hub.connection(1)
            await second.next(SequenceMessage)
            await second.send(SequenceMessage(5))
            await wait_for(lambda: closed)
            assert "Sequence ID greater than amount of messages we've received" in \
                str(closed[0])

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sends_wait_for_acks_once_the_buffer_is_full(backend):
    async def scenario():
        async with stateful_hub() as hub:
            connection = HubConnection(hub.url, stateful_reconnect=64)
            async with connection, anyio.create_task_group() as task_group:
                server = await hub.connection(0)
                sent = anyio.Event()

                async def send_big() -> None:
                    await connection.send("big", "x" * 100)
                    sent.set()

                task_group.start_soon(send_big)
                await server.next(InvocationMessage)   # sent at once ...
                with anyio.move_on_after(0.2):
                    await sent.wait()
                assert not sent.is_set()                 # ... but held until acked
                await server.send(AckMessage(1))
                with anyio.fail_after(5):
                    await sent.wait()

    run(backend, scenario)
