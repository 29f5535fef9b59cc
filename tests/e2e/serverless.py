"""Serverless machinery for the end-to-end tests: an upstream webhook receiver in the test's
trio loop, a management-SDK barrier for the Node agent, and ``examples/serverless/app.py`` as a
process.

* ``UpstreamServer``: HTTP through the relay's own h11 front, then ``UpstreamHandler`` of
  ``relaycore.sdk.upstream`` called as the ASGI app it is, so that signatures are checked and
  invocations answered exactly as in a FastAPI app. Every request is recorded with the status
  it got. It can go down (its port refuses connections) and come back on the same port, or
  answer with a scripted status or delay instead of the handler.
* ``settle``: what each Node connection received, proved without sleeping (a marker broadcast
  through the management SDK, then everything each connection got before it).
* ``ServerlessApp``: the example as its README runs it (``python app.py --port N``), a
  ``PodProcess`` with another command line.
"""

from __future__ import annotations

import dataclasses
import itertools
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import httpx
import trio

from relaycore.relay._http import HttpConnection, Request, Response
from relaycore.sdk import ServiceHubContext
from relaycore.sdk.upstream import UpstreamHandler, verify_signature

from .harness import WAIT, Changes, NodeAgent, RelayProcess, relay_env
from .pods import REPO, SIGNALR_JS, PodProcess

SERVERLESS_DIR = REPO / "examples" / "serverless"
SERVERLESS_APP = SERVERLESS_DIR / "app.py"
#: The relay's upstream URL template for a receiver on ``port``.
UPSTREAM_TEMPLATE = "http://127.0.0.1:{port}/upstream/{{hub}}/{{category}}/{{event}}"


def free_port() -> int:
    """A port nothing listens on now (for a process that must be told its port before it
    starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# The upstream receiver


@dataclasses.dataclass(frozen=True)
class Upcall:
    """One upstream request as received, and the status it was answered."""

    event: str
    category: str
    connection_id: str
    user_id: str | None
    headers: Mapping[str, str]
    body: bytes
    status: int

    def signed_by(self, keys: Sequence[str]) -> bool:
        return verify_signature(self.connection_id, self.headers.get("x-asrs-signature"), keys)


class UpstreamServer:
    """An upstream webhook receiver (see the module doc)."""

    def __init__(self, handler: UpstreamHandler) -> None:
        self.handler = handler
        self.port = 0
        self.calls: list[Upcall] = []
        self.changes = Changes()
        #: Answer a request with this instead of the handler (``None``: the handler's answer).
        self.script: Callable[[Request], Awaitable[Response | None]] | None = None
        self._scope: trio.CancelScope | None = None
        self._down = trio.Event()

    @property
    def url_template(self) -> str:
        return UPSTREAM_TEMPLATE.format(port=self.port)

    async def start(self, nursery: trio.Nursery) -> None:
        await nursery.start(self._serve)

    async def _serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                     ) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        self._down = trio.Event()
        try:
            with trio.CancelScope() as self._scope:
                task_status.started()
                await trio.serve_listeners(self._handle, listeners)
        finally:
            for listener in listeners:
                await listener.aclose()
            self._down.set()

    async def go_down(self) -> None:
        """Stop listening and drop every open connection: the relay's requests are refused."""
        assert self._scope is not None
        self._scope.cancel()
        with trio.fail_after(WAIT):
            await self._down.wait()

    def events(self, event: str | None = None) -> list[Upcall]:
        return [c for c in self.calls if event is None or c.event == event]

    async def wait_for(self, predicate: Callable[[], bool], what: str,
                       timeout: float = WAIT) -> None:
        await self.changes.wait_for(predicate, what=what, timeout=timeout,
                                    describe=lambda: f"upstream calls: {self.describe()}")

    def describe(self) -> str:
        return repr([(c.event, c.connection_id, c.status) for c in self.calls][-40:])

    async def _handle(self, stream: trio.abc.Stream) -> None:
        http = HttpConnection(stream, max_head=65536, max_body=16 << 20)
        async with stream:
            while True:
                try:
                    request = await http.read_request()
                except Exception:  # noqa: BLE001 - a torn connection during go_down
                    return
                if request is None:
                    return
                response = await self._answer(request)
                self.calls.append(Upcall(
                    request.headers.get("x-asrs-event", ""),
                    request.headers.get("x-asrs-category", ""),
                    request.headers.get("x-asrs-connection-id", ""),
                    request.headers.get("x-asrs-user-id"),
                    dict(request.headers), request.body, response.status))
                self.changes.notify()
                await http.send_response(response)
                if not http.can_continue():
                    return

    async def _answer(self, request: Request) -> Response:
        if self.script is not None:
            scripted = await self.script(request)
            if scripted is not None:
                return scripted
        return await asgi_call(self.handler, request)


async def asgi_call(app: Callable[..., Awaitable[None]], request: Request) -> Response:
    """Run one HTTP request through an ASGI app (enough of the spec for UpstreamHandler)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": request.method, "path": request.path,
             "raw_path": request.target.split("?")[0].encode(),
             "query_string": request.raw_query.encode(), "root_path": "", "scheme": "http",
             "headers": [(k.encode("latin-1"), v.encode("latin-1"))
                         for k, v in request.headers.items()]}
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await trio.sleep_forever()
        sent = True
        return {"type": "http.request", "body": request.body, "more_body": False}

    answer: dict[str, Any] = {"status": 500, "headers": [], "body": b""}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
            answer["headers"] = [(k.decode("latin-1"), v.decode("latin-1"))
                                 for k, v in message.get("headers", [])]
        elif message["type"] == "http.response.body":
            answer["body"] += message.get("body", b"")

    await app(scope, receive, send)
    headers = [(k, v) for k, v in answer["headers"] if k.lower() != "content-length"]
    content_type = next((v for k, v in headers if k.lower() == "content-type"), None)
    headers = [(k, v) for k, v in headers if k.lower() != "content-type"]
    return Response(answer["status"], answer["body"], headers, content_type)


# ---------------------------------------------------------------------------------------------
# What the Node connections received

_marks = itertools.count(1)


async def settle(agent: NodeAgent, hub: ServiceHubContext, names: Sequence[str] | None = None,
                 ) -> dict[str, list[tuple[str, list[Any]]]]:
    """Broadcast a marker through ``hub`` (after the calls under test, on the same transport,
    so after them on every connection), wait until each of ``names`` (default: every live
    connection) has it, and return ``(method, args)`` of what each received before it."""
    names = agent.live() if names is None else list(names)
    mark = f"mark-{next(_marks)}"
    await hub.clients.all.send("mark", mark)

    def has_mark(name: str) -> bool:
        return any(m.method == "mark" and m.args == [mark] for m in agent.messages.get(name, []))

    await agent.wait_for(lambda: all(has_mark(n) for n in names),
                         what=f"the marker {mark!r} on {names}")
    got: dict[str, list[tuple[str, list[Any]]]] = {}
    for name in names:
        messages = agent.take(name)
        index = next(i for i, m in enumerate(messages) if m.method == "mark" and m.args == [mark])
        assert index == len(messages) - 1, f"{name} received after the marker: {messages}"
        got[name] = [(m.method, m.args) for m in messages[:index]]
    return got


# ---------------------------------------------------------------------------------------------
# The example app


class ServerlessApp(PodProcess):
    """``examples/serverless/app.py --port {port}`` (a uvicorn process): negotiate on
    ``/api/negotiate``, upstream on ``/upstream``, the page on ``/``."""

    def __init__(self, relay: RelayProcess, port: int, transport: str = "transient") -> None:
        env = {k: v for k, v in relay_env(None).items() if not k.lower().startswith("azure__")}
        env["Azure__SignalR__ConnectionString"] = relay.connection_string
        env["SERVERLESS_SIGNALR_JS"] = str(SIGNALR_JS)
        env["SERVERLESS_TRANSPORT"] = transport
        super().__init__("serverless app", env)
        #: The relay whose upstream is this app.
        self.relay = relay
        self.wanted_port = port

    async def start(self, nursery: trio.Nursery, *, no_relay: bool = False) -> None:
        cmd = [sys.executable, str(SERVERLESS_APP), "--port", str(self.wanted_port)]
        self.process = await trio.lowlevel.open_process(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=self.env, cwd=str(SERVERLESS_DIR), start_new_session=True)
        assert self.process.stdout is not None and self.process.stderr is not None
        nursery.start_soon(self._pump, self.process.stdout)
        nursery.start_soon(self._pump, self.process.stderr)
        nursery.start_soon(self._watch_exit)
        process = self.process
        await self.changes.wait_for(
            lambda: bool(self.port) or process.returncode is not None,
            what="the app's 'Uvicorn running on' line", describe=self.describe, timeout=30)
        if not self.port:
            raise AssertionError(f"the serverless app did not start\n{self.describe()}")
        self.http = httpx.AsyncClient(base_url=self.url, timeout=WAIT)
        await self.wait_online()

