"""Stateful reconnect with the official ``@microsoft/signalr`` client (``withStatefulReconnect()``,
Node.js) and the real relay, through a TCP proxy the test cuts while numbered messages flow.

The client reaches the relay only through ``CuttableProxy``; cutting it closes both sockets of
every connection it carries without a WebSocket close frame, as a network that drops does. The
client then opens a new WebSocket with the same connection token and the relay resends what the
client had not acknowledged: the client must end with every number exactly once, in order, on
the same connection id, and the app server (relaycore's SDK, ``HubServer``, in this test's trio
loop) must see no disconnect. Past ``stateful_reconnect_buffer`` the client is closed with a
reason.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from relaycore.sdk import Hub, HubServer, ServiceOptions

from .harness import NodeAgent, NodeAgentFactory, RelayFactory, RelayProcess

pytestmark = pytest.mark.e2e

PROTOCOLS = ["json", "messagepack"]


class CuttableProxy:
    """A TCP proxy to the relay; ``cut`` ends every connection it carries, abruptly."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.accepted = 0
        self._live: list[tuple[trio.SocketStream, trio.SocketStream]] = []
        #: relay-side sockets of connections cut on the client's side only (kept open)
        self.held: list[trio.SocketStream] = []

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._carry, listeners)

    async def _carry(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        relay = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        pair = (client, relay)
        self._live.append(pair)
        try:
            async with client, trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, relay, nursery.cancel_scope)
                nursery.start_soon(self._pump, relay, client, nursery.cancel_scope)
        finally:
            self._live.remove(pair)
            if relay not in self.held:
                await relay.aclose()

    @staticmethod
    async def _pump(source: trio.SocketStream, sink: trio.SocketStream,
                    scope: trio.CancelScope) -> None:
        try:
            while data := await source.receive_some(65536):
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()

    def cut(self, *, silently: bool = False) -> int:
        """Close both sockets of every connection now (no close frame, no goodbye), or only
        the client's (``silently``: the relay's stays open and quiet, as behind a network
        that died without a word); returns how many connections were cut."""
        pairs = list(self._live)
        for client, relay in pairs:
            client.socket.close()
            if silently:
                self.held.append(relay)
            else:
                relay.socket.close()
        return len(pairs)


class Numbers(Hub):
    """The app server: counts its clients' disconnects and sends numbered messages."""

    disconnects: list[str] = []

    async def on_disconnected(self, error: BaseException | None) -> None:
        Numbers.disconnects.append(self.context.connection_id)

    async def count(self, start: int, end: int) -> int:
        for number in range(start, end):
            await self.clients.caller.send("notify", number)
            if number % 20 == 0:
                await trio.sleep(0.005)  # let the messages flow while the test cuts
        return end


@pytest.fixture(params=PROTOCOLS)
def protocol(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def relay(relay_factory: RelayFactory) -> RelayProcess:
    return await relay_factory(env={"RELAYCORE_STATEFUL_RECONNECT_WINDOW": "10"})


@pytest.fixture
async def proxy(relay: RelayProcess) -> AsyncIterator[CuttableProxy]:
    proxy = CuttableProxy(int(relay.endpoint.rsplit(":", 1)[1]))
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        yield proxy
        nursery.cancel_scope.cancel()
    for stream in proxy.held:
        await stream.aclose()


@pytest.fixture
async def app_server(relay: RelayProcess) -> AsyncIterator[HubServer]:
    Numbers.disconnects = []
    server = HubServer(ServiceOptions(connection_string=relay.connection_string,
                                      connection_count=1))
    server.map_hub("chat", Numbers)
    async with server:
        yield server


async def test_a_cut_connection_resumes_and_every_number_arrives_once_in_order(
        relay: RelayProcess, proxy: CuttableProxy, node_agent: NodeAgent,
        app_server: HubServer, protocol: str) -> None:
    url = f"http://127.0.0.1:{proxy.port}/client/?hub=chat"
    connection_id = await node_agent.connect("s", url, relay.client_token(user="alice"),
                                             protocol=protocol, statefulReconnect=True)
    total = 1500
    cuts = 0
    async with trio.open_nursery() as nursery:
        # The client's invocation is answered only once the app server has sent everything.
        nursery.start_soon(node_agent.send, "s", "count", 0, total)
        # Two cuts while the numbers flow: one the relay sees (its socket ends), one it does
        # not (the resumed WebSocket replaces a socket the relay still holds).
        for at, silently in ((200, False), (700, True)):
            await node_agent.wait_for(lambda at=at: len(node_agent.messages["s"]) >= at,
                                      what=f"{at} numbers")
            cuts += proxy.cut(silently=silently)
        got = await node_agent.wait_messages("s", total, timeout=60)
    assert cuts >= 2
    assert [m.args[0] for m in got] == list(range(total))
    # The relay let go of the socket it still held when the client resumed (long before any
    # timeout of its own): what it sends there ends.
    assert proxy.held
    with trio.fail_after(5):
        while True:
            try:
                if not await proxy.held[0].receive_some(65536):
                    break
            except trio.BrokenResourceError:
                break
    assert proxy.accepted >= 3  # negotiate and the first socket, then the resumed sockets
    assert await node_agent.state("s") == "Connected"
    assert [e for e in node_agent.events if e["name"] == "s"] == []  # no close, no reconnect
    assert node_agent.connection_ids["s"] == connection_id
    assert Numbers.disconnects == []
    # The same connection still works both ways after the resumes.
    node_agent.take("s")
    await node_agent.send("s", "count", total, total + 3)
    assert [m.args[0] for m in await node_agent.wait_messages("s", 3)] == [
        total, total + 1, total + 2]
    await node_agent.stop("s")
    with trio.fail_after(10):
        while Numbers.disconnects != [connection_id]:
            await trio.sleep(0.01)


async def test_past_the_buffer_bound_the_client_is_closed_with_a_reason(
        relay_factory: RelayFactory, node_agent_factory: NodeAgentFactory,
        protocol: str) -> None:
    relay = await relay_factory(env={"RELAYCORE_STATEFUL_RECONNECT_BUFFER": "2000"})
    agent = await node_agent_factory(relay)
    Numbers.disconnects = []
    server = HubServer(ServiceOptions(connection_string=relay.connection_string,
                                      connection_count=1))
    server.map_hub("chat", Numbers)
    async with server:
        await agent.connect("s", relay.client_url(), relay.client_token(user="alice"),
                            protocol=protocol, statefulReconnect=True)
        # Far more than 2000 bytes before the client's first Ack (a second later).
        await agent.send("s", "count", 0, 400)
        error = await agent.wait_closed("s")
    assert error is not None and "stateful reconnect buffer of 2000 bytes" in error, error
