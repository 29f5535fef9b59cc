"""``examples/serverless``: the FastAPI app (no server connections) run as its README says, with
the real relay's upstream pointed at it, driven by the official client under Node.js and by its
chat page in headless Chromium.

The client negotiates with the app (``/api/negotiate``), which redirects it to the relay with a
token from ``ServiceManager``; the relay tells the app of the client (upstream ``connected``),
and the client's ``broadcast(text)`` reaches the app as an upstream invocation, whose handler
sends to everyone through the management SDK and answers with the number of connections reached.
"""

from __future__ import annotations

import importlib.util
import os
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trio

from .browser import Browser, Page, chromium_path, open_browser
from .harness import WAIT, NodeAgentFactory, RelayFactory
from .pods import SIGNALR_JS
from .serverless import UPSTREAM_TEMPLATE, ServerlessApp, free_port

pytestmark = pytest.mark.e2e

TRANSPORTS = ["transient", "persistent"]
MESSAGES = "[...document.querySelectorAll('#messages li')].map(li => li.textContent)"

AppFactory = Callable[..., Awaitable[ServerlessApp]]


@pytest.fixture
async def app_factory(relay_factory: RelayFactory) -> AsyncIterator[AppFactory]:
    """``await app_factory("persistent")``: a relay whose upstream is the example app, and the
    app (online when returned). The app is stopped, insisting on a clean exit, at teardown."""
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        message = f"the serverless example needs {' and '.join(missing)}: pip install -e '.[dev]'"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    apps: list[ServerlessApp] = []
    async with trio.open_nursery() as nursery:

        async def start(transport: str = "transient") -> ServerlessApp:
            port = free_port()
            relay = await relay_factory(args=["--upstream", UPSTREAM_TEMPLATE.format(port=port)])
            app = ServerlessApp(relay, port, transport)
            apps.append(app)
            await app.start(nursery)
            return app

        try:
            yield start
            for app in apps:
                await app.stop()
        finally:
            for app in apps:
                await app.reap()


async def test_example_chat_round_trip_with_the_node_client(
        app_factory: AppFactory, node_agent_factory: NodeAgentFactory) -> None:
    app = await app_factory()
    node_agent = await node_agent_factory(app.relay)
    for name, user in (("alice", "alice"), ("bob", "bob")):
        # As the page does: withUrl("{app}/api?user=...") negotiates with the app, which
        # redirects to the relay.
        await node_agent.connect(name, f"{app.url}/api?user={user}", None,
                                 methods=["newMessage", "system"])
    await node_agent.wait_for(
        lambda: ("system", ["bob joined"]) in [(m.method, m.args)
                                               for m in node_agent.messages["alice"]],
        what="alice told that bob joined")
    result = await node_agent.invoke("alice", "broadcast", "hello from node")
    assert result == {"delivered": 2}
    for name in ("alice", "bob"):
        await node_agent.wait_for(
            lambda n=name: ("newMessage", ["alice", "hello from node"]) in [
                (m.method, m.args) for m in node_agent.messages.get(n, [])],
            what=f"the broadcast on {name}")
    await node_agent.stop("bob")
    await node_agent.wait_for(
        lambda: ("system", ["bob left"]) in [(m.method, m.args)
                                             for m in node_agent.messages["alice"]],
        what="alice told that bob left")
    events = await app.request("GET", "/events")
    assert [(e["event"], e["user"]) for e in events] == [
        ("connected", "alice"), ("connected", "bob"), ("broadcast", "alice"),
        ("disconnected", "bob")]


async def test_example_app_refuses_upstream_calls_without_a_valid_signature(
        app_factory: AppFactory) -> None:
    app = await app_factory()
    assert app.http is not None
    headers = {"X-ASRS-Connection-Id": "c1", "X-ASRS-Hub": "chat",
               "X-ASRS-Category": "connections", "X-ASRS-Event": "connected",
               "Content-Type": "application/json"}
    with trio.fail_after(WAIT):
        missing = await app.http.post("/upstream/chat/connections/connected", headers=headers,
                                      content=b'{"type":10}')
        forged = await app.http.post(
            "/upstream/chat/connections/connected", content=b'{"type":10}',
            headers={**headers, "X-ASRS-Signature": "sha256=" + "0" * 64})
    assert (missing.status_code, forged.status_code) == (401, 401)
    assert "X-ASRS-Signature" in forged.json()["message"]
    assert await app.request("GET", "/events") == []


# ---------------------------------------------------------------------------------------------
# The page in headless Chromium


@pytest.fixture
async def chromium() -> AsyncIterator[Browser]:
    if chromium_path() is None or not SIGNALR_JS.is_file():
        if os.environ.get("CI"):
            pytest.fail("Chromium or the @microsoft/signalr browser bundle is missing")
        pytest.skip("Chromium (apt-get install chromium) or the npm packages are missing")
    async with open_browser() as browser:
        yield browser


async def open_chat(chromium: Browser, app: ServerlessApp, user: str) -> Page:
    page = await chromium.open(f"{app.url}/?{urllib.parse.urlencode({'user': user})}")
    state = await page.wait_for(
        "(s => (s === 'connected' || s.startsWith('failed')) && s)"
        "(document.getElementById('state').textContent)", what=f"{user}'s page to connect")
    assert state == "connected", state
    return page


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_the_chat_page_round_trip(app_factory: AppFactory, chromium: Browser,
                                        transport: str) -> None:
    app = await app_factory(transport)
    alice = await open_chat(chromium, app, "alice")
    bob = await open_chat(chromium, app, "bob")
    await alice.wait_for(f"{MESSAGES}.includes('bob joined')", what="bob's arrival on alice's")

    # What a user does: type, press send.
    await alice.evaluate("document.getElementById('text').value = 'hello, bob'")
    await alice.evaluate("document.getElementById('send').click()")
    await alice.wait_for("document.getElementById('sent').textContent === 'delivered to 2'",
                         what="the invocation's result on alice's page")
    for page, who in ((alice, "alice"), (bob, "bob")):
        await page.wait_for(f"{MESSAGES}.includes('alice: hello, bob')",
                            what=f"the message on {who}'s page")
    assert await bob.evaluate(MESSAGES) == ["bob joined", "alice: hello, bob"]
    assert (await app.request("GET", "/status"))["transport"] == transport
