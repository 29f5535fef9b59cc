"""The two-pods example's page in headless Chromium: the page is served by pod 1 and connects
through pod 1's negotiate; it asks pod 2 (a cross-origin fetch, the "background work on another
pod") to notify its user.

With the shared relay the event from pod 2 is shown. With ``--no-relay`` (each pod serving its
hub through a private relay of its own) it is not, while an event from pod 1, asked after it, is:
the absence is proved against a positive control, not by waiting.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import AsyncIterator

import pytest

from .browser import Browser, Page, chromium_path, open_browser
from .harness import RelayProcess
from .pods import SIGNALR_JS, PodFactory, PodProcess, start_pods

pytestmark = pytest.mark.e2e

EVENTS = "[...document.querySelectorAll('#events li')].map(li => li.textContent)"


@pytest.fixture
async def chromium() -> AsyncIterator[Browser]:
    if chromium_path() is None or not SIGNALR_JS.is_file():
        if os.environ.get("CI"):
            pytest.fail("Chromium or the @microsoft/signalr browser bundle is missing")
        pytest.skip("Chromium (apt-get install chromium) or the npm packages are missing")
    async with open_browser() as browser:
        yield browser


async def open_page(chromium: Browser, pod1: PodProcess, pod2: PodProcess, user: str) -> Page:
    query = urllib.parse.urlencode({"user": user, "pod2": pod2.url})
    page = await chromium.open(f"{pod1.url}/?{query}")
    state = await page.wait_for(
        "(s => (s === 'connected' || s.startsWith('failed')) && s)"
        "(document.getElementById('state').textContent)",
        what="the page to connect through pod 1")
    assert state == "connected", state
    return page


async def ask(page: Page, pod: str) -> None:
    """What the button does: ``POST {pod}/notify/{user}`` from the page (awaited here)."""
    assert await page.evaluate(f"ask({pod!r})") is True, await page.evaluate(
        "document.getElementById('asked').textContent")


async def test_the_page_shows_the_event_sent_by_pod_2(
        relay: RelayProcess, pod_factory: PodFactory, chromium: Browser) -> None:
    pod1, pod2 = await start_pods(pod_factory, relay)
    page = await open_page(chromium, pod1, pod2, "alice")
    await ask(page, "pod 2")
    await page.wait_for(f"{EVENTS}.includes('pod 2: hello #1')", what="pod 2's event")
    await page.evaluate("document.getElementById('ask1').click()")  # the button, this time
    await page.wait_for(f"{EVENTS}.includes('pod 1: hello #2')", what="pod 1's event")
    assert await page.evaluate(EVENTS) == ["pod 2: hello #1", "pod 1: hello #2"]
    await pod1.wait_negotiations(1)  # the page negotiated once, with pod 1, and stayed


async def test_without_the_relay_the_event_from_pod_2_never_arrives(
        pod_factory: PodFactory, chromium: Browser) -> None:
    pod1 = await pod_factory("pod 1", no_relay=True)
    pod2 = await pod_factory("pod 2", no_relay=True)
    page = await open_page(chromium, pod1, pod2, "alice")
    await ask(page, "pod 2")  # pod 2 accepts and sends, to its own relay: nobody is there
    await ask(page, "pod 1")
    await page.wait_for(f"{EVENTS}.includes('pod 1: hello #2')", what="pod 1's event")
    assert await page.evaluate(EVENTS) == ["pod 1: hello #2"]
