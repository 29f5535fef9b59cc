"""The official browser client (``@microsoft/signalr``'s browser bundle) in headless Chromium.

The page is served from another origin than the relay, so negotiate is a cross-origin request
with credentials (CORS), and the WebSocket carries the token in ``access_token`` as browsers
must. Each test reads the page's log through the DevTools protocol.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import AsyncIterator

import pytest
import trio

from relaycore.relay._http import HttpConnection, Response

from .browser import Page, chromium_path, open_browser
from .harness import NODE_DIR, RelayProcess, Rest

pytestmark = pytest.mark.e2e

BUNDLES = {
    "/signalr.js": NODE_DIR / "node_modules/@microsoft/signalr/dist/browser/signalr.js",
    "/signalr-protocol-msgpack.js": NODE_DIR / (
        "node_modules/@microsoft/signalr-protocol-msgpack/dist/browser/"
        "signalr-protocol-msgpack.js"),
}

PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>relaycore browser test</title></head>
<body><pre id="log"></pre>
<script src="/signalr.js"></script>
<script src="/signalr-protocol-msgpack.js"></script>
<script>
const params = new URLSearchParams(location.search);
const log = (line) => { document.getElementById("log").textContent += line + "\\n"; };
window.lines = () => document.getElementById("log").textContent.split("\\n");
(async () => {
  const options = { accessTokenFactory: () => params.get("token") };
  const transport = params.get("transport");
  if (transport) options.transport = signalR.HttpTransportType[transport];
  const builder = new signalR.HubConnectionBuilder()
    .withUrl(params.get("url"), options)
    .configureLogging(signalR.LogLevel.Warning);
  if (params.get("protocol") === "messagepack") {
    builder.withHubProtocol(new signalR.protocols.msgpack.MessagePackHubProtocol());
  }
  const connection = builder.build();
  window.connection = connection;
  connection.on("notify", (text) => log("notify:" + text));
  connection.onclose((error) => log("closed:" + (error ? error.message : "")));
  await connection.start();
  window.connectionId = connection.connectionId;
  log("connected:" + connection.connectionId);
})().catch((error) => log("error:" + error));
</script></body></html>
"""


class StaticSite:
    """Serves the test page and the client bundles from its own origin."""

    def __init__(self) -> None:
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        http = HttpConnection(stream, max_head=65536, max_body=1 << 16)
        async with stream:
            while True:
                request = await http.read_request()
                if request is None:
                    return
                if request.path == "/":
                    response = Response(200, PAGE, content_type="text/html; charset=utf-8")
                elif request.path in BUNDLES:
                    response = Response(200, BUNDLES[request.path].read_bytes(),
                                        content_type="text/javascript")
                else:
                    response = Response(404)
                await http.send_response(response)
                if not http.can_continue():
                    return


@pytest.fixture
async def browser() -> AsyncIterator[object]:
    if chromium_path() is None or not all(p.is_file() for p in BUNDLES.values()):
        if os.environ.get("CI"):
            pytest.fail("Chromium or the @microsoft/signalr bundles are missing")
        pytest.skip("Chromium (apt-get install chromium) or the npm packages are missing")
    async with open_browser() as chromium:
        yield chromium


@pytest.fixture
async def site(nursery) -> StaticSite:
    site = StaticSite()
    await nursery.start(site.serve)
    return site


async def open_page(browser, site: StaticSite, relay: RelayProcess, protocol: str,
                    user: str, transport: str = "") -> tuple[Page, str]:
    query = urllib.parse.urlencode({"url": relay.client_url("chat"),
                                    "token": relay.client_token("chat", user),
                                    "protocol": protocol, "transport": transport})
    page = await browser.open(f"http://127.0.0.1:{site.port}/?{query}")
    line = await page.wait_for(
        "window.lines().find(l => l.startsWith('connected:') || l.startsWith('error:'))",
        what="the browser client to connect")
    assert line.startswith("connected:"), line
    return page, line.split(":", 1)[1]


@pytest.mark.parametrize("protocol", ["json", "messagepack"])
async def test_browser_client_receives_rest_sends_and_a_close_with_reason(
        browser, site, relay: RelayProcess, rest: Rest, protocol):
    alice, alice_id = await open_page(browser, site, relay, protocol, "alice")
    bob, _ = await open_page(browser, site, relay, protocol, "bob")
    await rest.send_user("alice", "notify", "for alice")
    await rest.send_all("notify", "for everyone")
    await alice.wait_for("window.lines().includes('notify:for everyone')")
    await bob.wait_for("window.lines().includes('notify:for everyone')")
    assert "notify:for alice" in await alice.evaluate("window.lines()")
    assert "notify:for alice" not in await bob.evaluate("window.lines()")
    await rest.close_connection(alice_id, reason="bye from the server")
    closed = await alice.wait_for("window.lines().find(l => l.startsWith('closed:'))")
    assert "bye from the server" in closed


@pytest.mark.parametrize(("transport", "protocol"), [
    ("ServerSentEvents", "json"), ("LongPolling", "json"), ("LongPolling", "messagepack")])
async def test_browser_client_over_server_sent_events_and_long_polling(
        browser, site, relay: RelayProcess, rest: Rest, transport, protocol):
    """The same across origins on the HTTP transports: the event stream's GET carries the
    token in its query and needs CORS headers, the POSTs, polls and DELETE are preflighted."""
    alice, alice_id = await open_page(browser, site, relay, protocol, "alice", transport)
    bob, bob_id = await open_page(browser, site, relay, protocol, "bob", transport)
    await rest.send_user("alice", "notify", "for alice")
    await rest.send_all("notify", "for everyone")
    await alice.wait_for("window.lines().includes('notify:for everyone')")
    await bob.wait_for("window.lines().includes('notify:for everyone')")
    assert "notify:for alice" in await alice.evaluate("window.lines()")
    assert "notify:for alice" not in await bob.evaluate("window.lines()")
    await rest.close_connection(alice_id, reason="bye from the server")
    closed = await alice.wait_for("window.lines().find(l => l.startsWith('closed:'))")
    assert "bye from the server" in closed
    await rest.head(f"/connections/{bob_id}", expect=200)
    await bob.evaluate("window.connection.stop()")
    assert await bob.wait_for("window.lines().find(l => l.startsWith('closed:'))") == "closed:"
    await rest.wait_status("HEAD", f"/connections/{bob_id}", 404, timeout=5)
