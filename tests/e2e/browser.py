"""Headless Chromium for end-to-end tests, driven through the DevTools protocol.

``open_browser(nursery)`` starts Debian's Chromium with the flags this machine needs (no
sandbox, no background networking, a fresh profile) and a DevTools port; ``Browser.open(url)``
opens a page; ``Page.evaluate(js)`` runs JavaScript in it and ``Page.wait_for(js)`` polls an
expression until it is truthy, under a deadline. No WebDriver, no downloads: the DevTools
WebSocket is spoken with trio-websocket.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, connect_websocket_url

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-quic", "--remote-debugging-port=0", "--remote-allow-origins=*",
]


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Page:
    def __init__(self, browser: Browser, session_id: str) -> None:
        self.browser = browser
        self.session_id = session_id

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises are awaited)."""
        result = await self.browser.call("Runtime.evaluate", {
            "expression": expression, "returnByValue": True, "awaitPromise": True,
        }, session_id=self.session_id)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, *, timeout: float = 20, what: str = "") -> Any:
        """Poll ``expression`` until it is truthy (an exception, as while the page is still
        loading, counts as not yet); fails with the page's text after ``timeout``."""
        try:
            with trio.fail_after(timeout):
                while True:
                    with contextlib.suppress(AssertionError):
                        value = await self.evaluate(expression)
                        if value:
                            return value
                    await trio.sleep(0.05)
        except trio.TooSlowError:
            text = await self.evaluate("document.body ? document.body.innerText : ''")
            raise AssertionError(f"timed out waiting for {what or expression}; page shows:\n"
                                 f"{text}") from None


class Browser:
    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, Any] = {}

    async def _pump(self) -> None:
        while True:
            try:
                message = json.loads(await self.ws.get_message())
            except ConnectionClosed:
                return
            slot = self._waiting.get(message.get("id"))
            if slot is not None:
                slot["reply"] = message
                slot["event"].set()

    async def call(self, method: str, params: dict[str, Any] | None = None, *,
                   session_id: str | None = None) -> dict[str, Any]:
        call_id = next(self._ids)
        slot = {"event": trio.Event(), "reply": None}
        self._waiting[call_id] = slot
        request: dict[str, Any] = {"id": call_id, "method": method, "params": params or {}}
        if session_id:
            request["sessionId"] = session_id
        await self.ws.send_message(json.dumps(request))
        with trio.fail_after(20):
            await slot["event"].wait()
        del self._waiting[call_id]
        reply = slot["reply"]
        if "error" in reply:
            raise AssertionError(f"DevTools {method} failed: {reply['error']}")
        return reply["result"]

    async def open(self, url: str) -> Page:
        target = await self.call("Target.createTarget", {"url": url})
        attached = await self.call("Target.attachToTarget",
                                   {"targetId": target["targetId"], "flatten": True})
        return Page(self, attached["sessionId"])


@contextlib.asynccontextmanager
async def open_browser() -> AsyncIterator[Browser]:
    """A headless Chromium for the duration of the block."""
    path = chromium_path()
    if path is None:
        raise RuntimeError("Chromium is not installed (apt-get install chromium)")
    profile = Path(tempfile.mkdtemp(prefix="relaycore-chromium-"))
    with open(profile / "stderr.log", "wb") as stderr:
        process = await trio.lowlevel.open_process(
            [path, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        port_file = profile / "DevToolsActivePort"
        with trio.fail_after(30):
            while not port_file.exists() or len(port_file.read_text().splitlines()) < 2:
                if process.poll() is not None:
                    raise RuntimeError("Chromium exited: "
                                       + (profile / "stderr.log").read_text()[-2000:])
                await trio.sleep(0.05)
        port, ws_path = port_file.read_text().splitlines()[:2]
        async with trio.open_nursery() as nursery:
            ws = await connect_websocket_url(nursery, f"ws://127.0.0.1:{port}{ws_path}",
                                             max_message_size=16 << 20)
            browser = Browser(ws)
            nursery.start_soon(browser._pump)
            try:
                yield browser
            finally:
                with contextlib.suppress(Exception), trio.move_on_after(2):
                    await browser.call("Browser.close")
                with trio.move_on_after(2):
                    await ws.aclose()
                await ws._stream.aclose()
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if process.poll() is None:
                process.kill()
            await process.wait()
            shutil.rmtree(profile, ignore_errors=True)
