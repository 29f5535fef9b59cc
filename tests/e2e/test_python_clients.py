"""The Python SignalR clients of PyPI against the real relay: ``signalrcore`` (threads, its own
WebSocket code) and ``pysignalr`` (asyncio, ``websockets`` and ``aiohttp``), each of which
relaycore did not write.

The app server is a pod of ``examples/two-pods`` (the SDK behind uvicorn, see pods.py): its
``Chat`` hub answers ``whoami`` and ``join``, and its HTTP endpoints send through the relay. A
client reaches the relay one of two ways:

* ``relay``: the relay's own negotiate (``/client/negotiate?hub=chat``) with a client token in
  the ``Authorization`` header, as a client handed the relay's URL by hand does. Neither client
  asks for negotiate version 1, so the relay answers version 0, and signalrcore then asks for
  hub protocol version 0 in its handshake (it sends the negotiate version).
* ``app``: the app server's negotiate (``/hubs/chat/negotiate``), whose Azure-style redirect
  (``url`` + ``accessToken``) both clients follow to the relay.

Each test connects, invokes ``whoami`` (answered by the pod through the relay), receives a
message the pod sends to the user, joins a group by a hub call and receives a group message,
and asserts every argument exactly. Both clients run outside trio: signalrcore in its own
threads, pysignalr in an asyncio loop on a thread of its own; their callbacks report to trio
through ``trio.from_thread`` and every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable
from typing import Any

import pytest
import trio
from pysignalr.client import SignalRClient
from pysignalr.protocol.json import JSONProtocol
from pysignalr.protocol.messagepack import MessagepackProtocol
from signalrcore.hub_connection_builder import HubConnectionBuilder
from signalrcore.types import HubProtocolEncoding

from .harness import WAIT, Changes, RelayProcess, open_rest
from .pods import PodProcess

pytestmark = pytest.mark.e2e

USER = "ada"
POD = "pod 1"


class ForeignClient:
    """What a client running outside trio saw: its state and the invocations it received,
    reported from its own threads; ``wait_for`` waits on them with a deadline."""

    def __init__(self, name: str, describe: Callable[[], str]) -> None:
        self.name = name
        self.opened = False
        self.closed = False
        self.received: list[tuple[str, list[Any]]] = []
        self.results: dict[str, Any] = {}
        self.errors: list[str] = []
        self._changes = Changes()
        self._token = trio.lowlevel.current_trio_token()
        self._describe = describe

    def report(self, change: Callable[[], None]) -> None:
        """From the client's thread: apply ``change`` in trio and wake the waiters."""
        def apply() -> None:
            change()
            self._changes.notify()
        try:
            trio.from_thread.run_sync(apply, trio_token=self._token)
        except trio.RunFinishedError:
            pass  # the test is over; a late callback has nobody to tell

    async def wait_for(self, predicate: Callable[[], bool], what: str) -> None:
        await self._changes.wait_for(
            predicate, what=f"{self.name}: {what}",
            describe=lambda: (f"received {self.received}, results {self.results}, errors "
                              f"{self.errors}, opened {self.opened}, closed {self.closed}\n"
                              f"{self._describe()}"))

    async def next_message(self, target: str) -> list[Any]:
        await self.wait_for(lambda: any(t == target for t, _ in self.received),
                            f"a '{target}' message")
        index = next(i for i, (t, _) in enumerate(self.received) if t == target)
        return self.received.pop(index)[1]


# ---------------------------------------------------------------------------------------------
# signalrcore: synchronous, its receive loop on a thread of its own


class SignalrcoreClient(ForeignClient):
    def __init__(self, url: str, *, token: str | None, binary: bool,
                 describe: Callable[[], str]) -> None:
        super().__init__("signalrcore", describe)
        options = {"access_token_factory": lambda: token} if token else None
        builder = HubConnectionBuilder().with_url(url, options=options)
        builder.configure_logging(logging.WARNING)
        if binary:
            builder.with_hub_protocol(HubProtocolEncoding.binary)
        self.hub = builder.build()
        self.hub.on_open(lambda: self.report(lambda: setattr(self, "opened", True)))
        self.hub.on_close(lambda: self.report(lambda: setattr(self, "closed", True)))
        self.hub.on_error(lambda m: self.report(lambda: self.errors.append(str(m.error))))
        for target in ("notify", "joined"):
            self.hub.on(target, self._on(target))

    def _on(self, target: str) -> Callable[[list[Any]], None]:
        return lambda args: self.report(lambda: self.received.append((target, list(args))))

    async def start(self) -> None:
        with trio.fail_after(WAIT):
            started = await trio.to_thread.run_sync(self.hub.start)
        assert started, "signalrcore's start() said no"
        # A refused handshake closes the connection (the reason is in signalrcore's log).
        await self.wait_for(lambda: self.opened or self.closed, "its handshake to be answered")
        assert self.opened, "signalrcore's handshake was refused (see its log above)"

    async def invoke(self, method: str, *args: Any) -> Any:
        def done(message: Any) -> None:
            self.report(lambda: self.results.__setitem__(message.invocation_id, message.result))
        with trio.fail_after(WAIT):
            sent = await trio.to_thread.run_sync(
                lambda: self.hub.send(method, list(args), on_invocation=done))
        invocation_id = sent.invocation_id
        await self.wait_for(lambda: invocation_id in self.results or bool(self.errors),
                            f"the completion of {method}")
        assert not self.errors, self.errors
        return self.results.pop(invocation_id)

    async def stop(self) -> None:
        with trio.fail_after(WAIT):
            await trio.to_thread.run_sync(self.hub.stop)
        await self.wait_for(lambda: self.closed, "its connection to close")


# ---------------------------------------------------------------------------------------------
# pysignalr: asyncio, run on a thread with its own event loop


class PysignalrClient(ForeignClient):
    def __init__(self, url: str, *, token: str | None, binary: bool,
                 describe: Callable[[], str]) -> None:
        super().__init__("pysignalr", describe)
        headers = {"Authorization": f"Bearer {token}"} if token else None
        protocol = MessagepackProtocol() if binary else JSONProtocol()
        self.client = SignalRClient(url, protocol=protocol, headers=headers, retry_count=0)
        self.client.on_open(self._opened)
        self.client.on_close(self._closed)
        self.client.on_error(self._error)
        for target in ("notify", "joined"):
            self.client.on(target, self._on(target))
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="pysignalr", daemon=True)
        self._runner: concurrent.futures.Future[None] | None = None
        self._ended: list[BaseException | None] = []

    async def _opened(self) -> None:
        self.report(lambda: setattr(self, "opened", True))

    async def _closed(self) -> None:
        self.report(lambda: setattr(self, "closed", True))

    async def _error(self, message: Any) -> None:
        self.report(lambda: self.errors.append(str(message.error)))

    def _on(self, target: str) -> Callable[[list[Any]], Any]:
        async def handler(args: list[Any]) -> None:
            self.report(lambda: self.received.append((target, list(args))))
        return handler

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def _on_run_ended(self, future: concurrent.futures.Future[None]) -> None:
        error = None if future.cancelled() else future.exception()
        self.report(lambda: self._ended.append(error))

    async def start(self) -> None:
        self._thread.start()
        self._runner = asyncio.run_coroutine_threadsafe(self.client.run(), self.loop)
        self._runner.add_done_callback(self._on_run_ended)
        await self.wait_for(lambda: self.opened or bool(self._ended),
                            "its handshake to be answered")
        assert self.opened, f"pysignalr's run() ended: {self._ended!r}"

    async def _call(self, coroutine: Any) -> Any:
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        with trio.fail_after(WAIT):
            return await trio.to_thread.run_sync(future.result)

    async def invoke(self, method: str, *args: Any) -> Any:
        key = f"{method}-{len(self.results)}-{id(args)}"

        async def done(message: Any) -> None:
            self.report(lambda: self.results.__setitem__(key, message.result))
        await self._call(self.client.send(method, list(args), on_invocation=done))
        await self.wait_for(lambda: key in self.results or bool(self.errors),
                            f"the completion of {method}")
        assert not self.errors, self.errors
        return self.results.pop(key)

    async def stop(self) -> None:
        assert self._runner is not None

        async def current_socket() -> Any:
            # pysignalr has no stop(): run() is cancelled, then the WebSocket it leaves open
            # is closed here (a normal close handshake), so that no socket is left behind.
            return self.client._transport._ws
        ws = await self._call(current_socket())
        self.loop.call_soon_threadsafe(self._runner.cancel)
        await self.wait_for(lambda: bool(self._ended), "its run() to end")
        if ws is not None:
            await self._call(ws.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        with trio.fail_after(WAIT):
            await trio.to_thread.run_sync(self._thread.join)
        self.loop.close()


CLIENTS = {"signalrcore": SignalrcoreClient, "pysignalr": PysignalrClient}


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client_name", "path", "binary"),
    [
        pytest.param("signalrcore", "relay", False, id="signalrcore-relay-json"),
        pytest.param("signalrcore", "app", True, id="signalrcore-app-messagepack"),
        pytest.param("pysignalr", "relay", True, id="pysignalr-relay-messagepack"),
        pytest.param("pysignalr", "app", False, id="pysignalr-app-json"),
    ],
)
async def test_python_client_connects_invokes_and_receives(
        relay_factory: Any, pod_factory: Any, client_name: str, path: str, binary: bool):
    # Pings every half second: signalrcore's stop() closes its socket under its reader thread,
    # which only wakes (and ends) when the next bytes arrive.
    relay: RelayProcess = await relay_factory(env={"RELAYCORE_KEEP_ALIVE_INTERVAL": "0.5"})
    pod: PodProcess = await pod_factory(POD, relay.connection_string)
    if path == "relay":
        url, token = relay.client_url("chat"), relay.client_token("chat", USER)
    else:
        url, token = pod.hub_url("chat", user=USER), None

    def describe() -> str:
        return f"{relay.describe()}\n{pod.describe()}"

    client = CLIENTS[client_name](url, token=token, binary=binary, describe=describe)
    await client.start()
    try:
        who = await client.invoke("whoami")
        assert set(who) == {"pod", "user", "connection"}
        assert (who["pod"], who["user"]) == (POD, USER)
        async with open_rest(relay) as rest:
            await rest.head(f"/connections/{who['connection']}", expect=200)

        await pod.post(f"/notify/{USER}", text="to ada, with ümlauts")
        assert await client.next_message("notify") == ["to ada, with ümlauts", POD]

        assert await client.invoke("join", "room-7") is None
        await pod.post("/groups/room-7/notify", text="to the room")
        assert await client.next_message("notify") == ["to the room", POD]
        assert client.received == []
    finally:
        await client.stop()
