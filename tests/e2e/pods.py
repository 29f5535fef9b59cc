"""The app servers of the two-pod story as real processes: ``examples/two-pods/app.py`` run as
its README says (``python app.py --name "pod 1" --port 0 [--no-relay]``, uvicorn inside).

``PodProcess`` reads the port from uvicorn's "running on" line, waits until the pod's server
connections are up (``GET /status``), talks to the pod's HTTP endpoints with httpx, and stops
it with SIGTERM, insisting on exit status 0 and no traceback, or kills it with SIGKILL. Each pod
runs in a session of its own, so that its private relay (``--no-relay``) can be reaped with it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import trio

from .harness import NODE_DIR, WAIT, RelayProcess, WatchedProcess, relay_env

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_DIR = REPO / "examples" / "two-pods"
APP = EXAMPLE_DIR / "app.py"
SIGNALR_JS = NODE_DIR / "node_modules/@microsoft/signalr/dist/browser/signalr.js"

_RUNNING = re.compile(rb"Uvicorn running on http://([\d.]+):(\d+)")


class PodProcess(WatchedProcess):
    """One pod (a uvicorn process serving the example app)."""

    listening = _RUNNING

    def __init__(self, name: str, env: Mapping[str, str], app: Path = APP) -> None:
        super().__init__(name, env)
        self.name = name
        #: The app server script (another than the example's: a test-only one, same CLI).
        self.app = app
        self.http: httpx.AsyncClient | None = None
        self.killed = False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def hub_url(self, hub: str = "chat", user: str | None = None) -> str:
        """What the client is given: the app's hub URL (negotiate is ``{this}/negotiate``)."""
        url = f"{self.url}/hubs/{hub}"
        return url if user is None else f"{url}?user={user}"

    # -- life --------------------------------------------------------------------------------

    async def start(self, nursery: trio.Nursery, *, no_relay: bool = False) -> None:
        cmd = [sys.executable, str(self.app), "--name", self.name, "--port", "0"]
        if no_relay:
            cmd.append("--no-relay")
        await self._launch(nursery, cmd, f"{self.name}'s 'Uvicorn running on' line",
                           cwd=str(self.app.parent), start_new_session=True)
        self.http = httpx.AsyncClient(base_url=self.url, timeout=WAIT)
        await self.wait_online()

    async def wait_online(self, timeout: float = WAIT) -> None:
        """Until ``GET /status`` says the pod's server connections are up."""
        try:
            with trio.fail_after(timeout):
                while not (await self.request("GET", "/status"))["online"]:
                    await trio.sleep(0.05)
        except trio.TooSlowError:
            raise AssertionError(
                f"{self.name} did not come online within {timeout:g} s\n{self.describe()}"
            ) from None

    async def request(self, method: str, path: str, **params: Any) -> Any:
        """An HTTP request to the pod; its JSON answer (anything but 200 fails the test)."""
        assert self.http is not None
        try:
            with trio.fail_after(WAIT):
                response = await self.http.request(method, path, params=params)
        except (httpx.HTTPError, trio.TooSlowError) as exc:
            raise AssertionError(f"{method} {path} on {self.name} failed: {exc!r}\n"
                                 f"{self.describe()}") from None
        if response.status_code != 200:
            raise AssertionError(f"{method} {path} on {self.name} answered "
                                 f"{response.status_code}: {response.text}\n{self.describe()}")
        return response.json()

    async def post(self, path: str, **params: Any) -> Any:
        return await self.request("POST", path, **params)

    def kill(self) -> None:
        """SIGKILL: the pod dies without a word to the relay (its sockets are just closed)."""
        assert self.process is not None
        self.killed = True
        self.process.kill()

    async def wait_exit(self, timeout: float = WAIT) -> None:
        process = self.process
        assert process is not None
        await self.changes.wait_for(lambda: process.returncode is not None,
                                    what=f"{self.name} to exit", describe=self.describe,
                                    timeout=timeout)

    async def stop(self, timeout: float = WAIT) -> None:
        """SIGTERM (uvicorn's graceful shutdown: the HubServer says goodbye to the relay, a
        private relay is stopped), then insist on a clean exit."""
        process = self.process
        if process is None or self.stopped:
            return
        self.stopped = True
        if self.http is not None:
            await self.http.aclose()
        if self.killed:
            return
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        try:
            with trio.fail_after(timeout):
                await process.wait()
        except trio.TooSlowError:
            raise AssertionError(
                f"{self.name} did not exit within {timeout:g} s of SIGTERM\n{self.describe()}"
            ) from None
        await self._wait_last_output()
        # uvicorn re-raises the signal it handled once shut down: -SIGTERM is its clean exit.
        assert process.returncode in (0, -signal.SIGTERM), (
            f"{self.name} exited with status {process.returncode}\n{self.describe()}")
        assert any("Application shutdown complete" in line for line in self.lines), (
            f"{self.name} did not shut down its application\n{self.describe()}")
        tracebacks = [line for line in self.lines if "Traceback" in line]
        assert not tracebacks, f"{self.name} logged a traceback\n{self.describe()}"

    def negotiations(self) -> int:
        """How many negotiate requests the pod answered (from uvicorn's access log)."""
        return sum('"POST /hubs/chat/negotiate' in line and " 200" in line for line in self.lines)

    async def wait_negotiations(self, count: int) -> None:
        """Until the access log shows ``count`` negotiations, then insist on exactly that."""
        await self.changes.wait_for(lambda: self.negotiations() >= count,
                                    what=f"{count} negotiations on {self.name}",
                                    describe=self.describe)
        assert self.negotiations() == count, self.describe()

    async def reap(self) -> None:
        """Teardown, whatever happened: SIGKILL to what is left of the pod's session (the pod,
        its private relay), then wait for the pod (shielded, bounded)."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with trio.CancelScope(shield=True), trio.move_on_after(WAIT):
            await self.process.wait()
        if self.http is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(WAIT):
                await self.http.aclose()


PodFactory = Callable[..., Awaitable[PodProcess]]


async def start_pods(pod_factory: PodFactory, relay: RelayProcess
                     ) -> tuple[PodProcess, PodProcess]:
    """"pod 1" and "pod 2", both connected to ``relay``, started side by side."""
    pods: dict[str, PodProcess] = {}

    async def start(name: str) -> None:
        pods[name] = await pod_factory(name, relay.connection_string)

    async with trio.open_nursery() as nursery:
        for name in ("pod 1", "pod 2"):
            nursery.start_soon(start, name)
    return pods["pod 1"], pods["pod 2"]


def pod_env(connection_string: str | None) -> dict[str, str]:
    """The relay's test environment, less the developer's Azure settings, plus the pod's."""
    env = {k: v for k, v in relay_env(None).items() if not k.lower().startswith("azure__")}
    env.pop("POD_NAME", None)
    env.pop("TWO_PODS_NO_RELAY", None)
    env["TWO_PODS_SIGNALR_JS"] = str(SIGNALR_JS)
    if connection_string is not None:
        env["Azure__SignalR__ConnectionString"] = connection_string
    return env
