"""The machinery of the end-to-end tests (the fixtures in conftest.py use it).

* ``RelayProcess``: ``python -m relaycore serve --port 0`` with a random access key; the port
  is read from its "listening on" line; ``stop()`` sends SIGTERM and insists on exit status 0
  within a deadline and no traceback in the output, which is kept for failure messages.
* ``Rest``: an httpx client for the data-plane REST API (service-protocol §12) that signs each
  request with a fresh token whose audience is the request URL without the port.
* ``NodeAgent``: ``node/agent.js``, one Node process managing many named ``@microsoft/signalr``
  HubConnections through JSON lines (see the header of agent.js).

Every wait has a deadline (``trio.fail_after``) and fails with the state it was waiting on
plus the relay's and the agent's output; nothing sleeps in place of waiting for a condition.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio

from relaycore.protocol._auth import generate_access_token
from relayhelpers import ADMIN_KEY

E2E_DIR = Path(__file__).resolve().parent
NODE_DIR = E2E_DIR / "node"
AGENT_JS = NODE_DIR / "agent.js"
API_VERSION = "2022-06-01"

#: Default deadline of one wait (a relay start, a message, a REST call). Generous because the
#: machine is small and shared; a passing run never waits this long.
WAIT = 15.0
#: Query parameters the Azure SDK adds after signing a REST token (service-protocol §8.2).
_UNSIGNED_QUERY = {"excluded", "reason", "ttl"}

_LISTENING = re.compile(rb"listening on (\S+):(\d+)")


class Changes:
    """Something that changes over time and can be waited on, with a deadline."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait_for(self, predicate: Callable[[], bool], *, what: str,
                       describe: Callable[[], str], timeout: float = WAIT) -> None:
        try:
            with trio.fail_after(timeout):
                while not predicate():
                    await self._event.wait()
        except trio.TooSlowError:
            raise AssertionError(
                f"timed out after {timeout:g} s waiting for {what}\n{describe()}") from None


async def _pump_lines(stream: trio.abc.ReceiveStream, on_line: Callable[[bytes], None]) -> None:
    """Feed each line of ``stream`` to ``on_line`` until EOF (a last unterminated line too)."""
    buffer = bytearray()
    while True:
        try:
            chunk = await stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            chunk = b""
        if not chunk:
            if buffer:
                on_line(bytes(buffer))
            return
        buffer += chunk
        while True:
            end = buffer.find(b"\n")
            if end < 0:
                break
            line = bytes(buffer[:end])
            del buffer[:end + 1]
            on_line(line)


def _tail(lines: Sequence[str], count: int = 60) -> str:
    shown = lines[-count:]
    skipped = len(lines) - len(shown)
    return "\n".join(([f"... ({skipped} earlier lines)"] if skipped else []) + list(shown))


# ---------------------------------------------------------------------------------------------
# A server process watched by its output


class WatchedProcess:
    """A server subprocess whose stdout and stderr are read line by line (kept for failure
    messages) and whose listening address is read from the line ``listening`` matches."""

    #: Matches the line that gives the listening address: (host, port) groups.
    listening: re.Pattern[bytes]

    def __init__(self, label: str, env: Mapping[str, str]) -> None:
        self.label = label
        self.env = dict(env)
        self.host = "127.0.0.1"
        self.port = 0
        self.lines: list[str] = []  # stdout and stderr, interleaved as read
        self.changes = Changes()
        self.process: trio.Process | None = None
        self.stopped = False
        self._pumps_done = 0

    def output(self) -> str:
        return _tail(self.lines)

    def describe(self) -> str:
        state = "running"
        if self.process is not None and self.process.returncode is not None:
            state = f"exited with {self.process.returncode}"
        return f"--- {self.label} on port {self.port} ({state}); its output:\n{self.output()}"

    def _on_line(self, raw: bytes) -> None:
        self.lines.append(raw.decode("utf-8", "replace").rstrip("\r"))
        if not self.port:
            match = self.listening.search(raw)
            if match:
                self.host = match.group(1).decode()
                self.port = int(match.group(2))
        self.changes.notify()

    async def _pump(self, stream: trio.abc.ReceiveStream) -> None:
        await _pump_lines(stream, self._on_line)
        self._pumps_done += 1
        self.changes.notify()

    async def _watch_exit(self) -> None:
        assert self.process is not None
        await self.process.wait()
        self.changes.notify()

    async def _launch(self, nursery: trio.Nursery, cmd: Sequence[str], what: str,
                      **popen: Any) -> None:
        """Start ``cmd`` and wait (30 s at most) for its listening line, ``what``."""
        self.process = await trio.lowlevel.open_process(
            list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=self.env, **popen)
        assert self.process.stdout is not None and self.process.stderr is not None
        nursery.start_soon(self._pump, self.process.stdout)
        nursery.start_soon(self._pump, self.process.stderr)
        nursery.start_soon(self._watch_exit)
        process = self.process
        await self.changes.wait_for(
            lambda: bool(self.port) or process.returncode is not None,
            what=what, describe=self.describe, timeout=30)
        if not self.port:
            self.stopped = True  # nothing to stop; this is the failure to report
            raise AssertionError(f"{self.label} did not start\n{self.describe()}")

    async def _wait_last_output(self) -> None:
        """Let the pumps read the last lines before the output is judged."""
        await self.changes.wait_for(lambda: self._pumps_done == 2,
                                    what=f"{self.label}'s last output", describe=self.describe)


# ---------------------------------------------------------------------------------------------
# The relay


class RelayProcess(WatchedProcess):
    """A ``python -m relaycore serve`` subprocess."""

    listening = _LISTENING

    def __init__(self, access_key: str, env: Mapping[str, str]) -> None:
        super().__init__("relay", env)
        self.access_key = access_key

    # -- addresses and tokens --------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def connection_string(self) -> str:
        return f"Endpoint={self.endpoint};AccessKey={self.access_key};Version=1.0;"

    def client_url(self, hub: str = "chat") -> str:
        """What an Azure negotiate redirect hands a client (``url``)."""
        return f"{self.endpoint}/client/?hub={hub}"

    def ws_url(self, hub: str = "chat", token: str | None = None) -> str:
        url = f"ws://{self.host}:{self.port}/client/?hub={hub}"
        return url if token is None else f"{url}&access_token={token}"

    def client_token(self, hub: str = "chat", user: str | None = None, *,
                     lifetime: float = 3600.0, key: str | None = None,
                     now: float | None = None) -> str:
        """A client token as the app server's negotiate mints it (audience without port)."""
        return generate_access_token(
            key or self.access_key, f"http://{self.host}/client/?hub={hub}",
            now=time.time() if now is None else now, lifetime=lifetime, user_id=user)

    # -- life --------------------------------------------------------------------------------

    async def start(self, nursery: trio.Nursery, args: Sequence[str]) -> None:
        # "--access-key=KEY": a random key may begin with "-", which argparse would take for
        # an option.
        cmd = [sys.executable, "-m", "relaycore", "serve", "--host", "127.0.0.1", "--port", "0",
               f"--access-key={self.access_key}", *args]
        await self._launch(nursery, cmd, "the relay's 'listening on' line")

    async def stop(self, timeout: float = WAIT) -> None:
        """SIGTERM (a graceful drain), then insist on a clean exit within ``timeout``."""
        process = self.process
        if process is None or self.stopped:
            return
        self.stopped = True
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        try:
            with trio.fail_after(timeout):
                await process.wait()
        except trio.TooSlowError:
            process.kill()
            with trio.move_on_after(5):
                await process.wait()
            raise AssertionError(
                f"the relay did not exit within {timeout:g} s of SIGTERM\n{self.describe()}"
            ) from None
        await self._wait_last_output()
        assert process.returncode == 0, (
            f"the relay exited with status {process.returncode} after SIGTERM\n{self.describe()}")
        tracebacks = [line for line in self.lines if "Traceback" in line]
        assert not tracebacks, f"the relay logged a traceback\n{self.describe()}"

    def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()

    async def crash(self, timeout: float = WAIT) -> None:
        """SIGKILL, as a crash (the kernel closes its sockets), and wait until it is dead; its
        teardown then does not insist on a clean exit."""
        process = self.process
        assert process is not None
        self.stopped = True
        self.kill()
        await self.changes.wait_for(lambda: process.returncode is not None,
                                    what="the killed relay to exit", describe=self.describe,
                                    timeout=timeout)


def relay_env(overrides: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    # Settings of the developer's shell must not leak into the relay under test (the access
    # key and port come from the command line; the extension switches are kept on purpose,
    # so that the suite exercises the relay with the fast path it was asked to use).
    keep = {"RELAYCORE_NO_EXTENSIONS", "RELAYCORE_REQUIRE_EXTENSIONS",
            "RELAYCORE_BUILD_EXTENSION"}
    for key in list(env):
        if key.startswith("RELAYCORE_") and key not in keep:
            del env[key]
    env["PYTHONUNBUFFERED"] = "1"
    env["RELAYCORE_ADMIN_KEY"] = ADMIN_KEY  # the fault switch (tests/e2e/test_regions.py)
    env.update(overrides or {})
    return env


RelayFactory = Callable[..., Awaitable[RelayProcess]]








# ---------------------------------------------------------------------------------------------
# REST


class _SignEachRequest(httpx.Auth):
    """Sign every request as the Management SDK does: ``aud`` is the request URL without the
    port, its query less the parameters added after signing (service-protocol §8.2, §12.1)."""

    def __init__(self, access_key: str) -> None:
        self.access_key = access_key

    def auth_flow(self, request: httpx.Request):  # type: ignore[no-untyped-def]
        raw_path, _, query = request.url.raw_path.decode("ascii").partition("?")
        signed = "&".join(part for part in query.split("&")
                          if part and part.split("=", 1)[0].lower() not in _UNSIGNED_QUERY)
        audience = f"{request.url.scheme}://{request.url.host}{raw_path}"
        if signed:
            audience += f"?{signed}"
        token = generate_access_token(self.access_key, audience, now=time.time(), lifetime=300)
        request.headers["Authorization"] = f"Bearer {token}"
        yield request


class Rest:
    """The data-plane REST API of one hub, 2022-06-01 paths. Each method returns the
    ``httpx.Response`` after checking its status against ``expect`` (None: no check)."""

    def __init__(self, client: httpx.AsyncClient, relay: RelayProcess, hub: str = "chat") -> None:
        self.client = client
        self.relay = relay
        self.hub_name = hub

    def hub(self, name: str) -> Rest:
        return Rest(self.client, self.relay, name)

    async def request(self, method: str, path: str, *, params: Iterable[tuple[str, str]] = (),
                      expect: int | None = None, json_body: Any = None,
                      content: bytes | None = None, headers: Mapping[str, str] | None = None,
                      hub_path: bool = True, api_version: bool = True) -> httpx.Response:
        """``path`` is under ``/api/hubs/{hub}`` unless ``hub_path`` is false (then it is the
        whole path, e.g. a v1 route, which ``api_version=False`` leaves unversioned)."""
        url = f"/api/hubs/{self.hub_name}{path}" if hub_path else path
        query = [("api-version", API_VERSION), *params] if api_version else list(params)
        with trio.fail_after(WAIT):
            response = await self.client.request(method, url, params=query, json=json_body,
                                                 content=content, headers=headers)
        if expect is not None and response.status_code != expect:
            raise AssertionError(
                f"{method} {response.request.url} answered {response.status_code} "
                f"(expected {expect}): {response.text!r}\n{self.relay.describe()}")
        return response

    # -- sends ----------------------------------------------------------------------------

    async def send_all(self, target: str, *args: Any, excluded: Sequence[str] = (),
                       expect: int | None = 202) -> httpx.Response:
        return await self.request("POST", "/:send", params=[("excluded", c) for c in excluded],
                                  json_body={"target": target, "arguments": list(args)},
                                  expect=expect)

    async def send_user(self, user: str, target: str, *args: Any,
                        expect: int | None = 202) -> httpx.Response:
        return await self.request("POST", f"/users/{user}/:send",
                                  json_body={"target": target, "arguments": list(args)},
                                  expect=expect)

    async def send_connection(self, connection_id: str, target: str, *args: Any,
                              expect: int | None = 202) -> httpx.Response:
        return await self.request("POST", f"/connections/{connection_id}/:send",
                                  json_body={"target": target, "arguments": list(args)},
                                  expect=expect)

    async def send_group(self, group: str, target: str, *args: Any,
                         excluded: Sequence[str] = (), expect: int | None = 202) -> httpx.Response:
        return await self.request("POST", f"/groups/{group}/:send",
                                  params=[("excluded", c) for c in excluded],
                                  json_body={"target": target, "arguments": list(args)},
                                  expect=expect)

    async def send_payloads(self, path: str, body: bytes,
                            content_type: str = "application/x-msgpack",
                            expect: int | None = 202) -> httpx.Response:
        """A MessagePack payload-map body (service-protocol §12.2) to ``path`` (``/:send``...)."""
        return await self.request("POST", path, content=body,
                                  headers={"Content-Type": content_type}, expect=expect)

    # -- groups ---------------------------------------------------------------------------

    async def add_to_group(self, group: str, connection_id: str,
                           expect: int | None = 200) -> httpx.Response:
        return await self.request("PUT", f"/groups/{group}/connections/{connection_id}",
                                  expect=expect)

    async def remove_from_group(self, group: str, connection_id: str,
                                expect: int | None = 200) -> httpx.Response:
        return await self.request("DELETE", f"/groups/{group}/connections/{connection_id}",
                                  expect=expect)

    async def add_user_to_group(self, user: str, group: str, ttl: int | None = None,
                                expect: int | None = 200) -> httpx.Response:
        params = [] if ttl is None else [("ttl", str(ttl))]
        return await self.request("PUT", f"/users/{user}/groups/{group}", params=params,
                                  expect=expect)

    async def remove_user_from_group(self, user: str, group: str,
                                     expect: int | None = 204) -> httpx.Response:
        return await self.request("DELETE", f"/users/{user}/groups/{group}", expect=expect)

    # -- closing --------------------------------------------------------------------------

    async def close_connection(self, connection_id: str, reason: str | None = None,
                               expect: int | None = 200) -> httpx.Response:
        params = [] if reason is None else [("reason", reason)]
        return await self.request("DELETE", f"/connections/{connection_id}", params=params,
                                  expect=expect)

    async def close_all(self, reason: str | None = None, excluded: Sequence[str] = (),
                        expect: int | None = 204) -> httpx.Response:
        return await self.request("POST", "/:closeConnections",
                                  params=_close_params(reason, excluded), expect=expect)

    async def close_user(self, user: str, reason: str | None = None,
                         excluded: Sequence[str] = (), expect: int | None = 204) -> httpx.Response:
        return await self.request("POST", f"/users/{user}/:closeConnections",
                                  params=_close_params(reason, excluded), expect=expect)

    async def close_group(self, group: str, reason: str | None = None,
                          excluded: Sequence[str] = (), expect: int | None = 204) -> httpx.Response:
        return await self.request("POST", f"/groups/{group}/:closeConnections",
                                  params=_close_params(reason, excluded), expect=expect)

    # -- existence checks (HEAD) ----------------------------------------------------------

    async def head(self, path: str, expect: int | None = None) -> httpx.Response:
        return await self.request("HEAD", path, expect=expect)

    async def wait_status(self, method: str, path: str, status: int,
                          timeout: float = WAIT) -> httpx.Response:
        """Ask again until the answer is ``status``: for a state the relay reaches after a
        peer's action that nothing acknowledges (``HubConnection.stop()`` resolves without
        waiting for the relay to read the Close message)."""
        last: httpx.Response | None = None
        try:
            with trio.fail_after(timeout):
                while True:
                    last = await self.request(method, path)
                    if last.status_code == status:
                        return last
                    await trio.sleep(0.02)
        except trio.TooSlowError:
            raise AssertionError(
                f"{method} {path} still answered {last.status_code if last else None} "
                f"(waiting for {status}) after {timeout:g} s\n{self.relay.describe()}") from None


@contextlib.asynccontextmanager
async def open_rest(relay: RelayProcess, hub: str = "chat") -> AsyncIterator[Rest]:
    """A signed REST client for ``relay`` (the ``rest`` fixture, for any relay)."""
    async with httpx.AsyncClient(base_url=relay.endpoint, auth=_SignEachRequest(relay.access_key),
                                 timeout=WAIT) as client:
        yield Rest(client, relay, hub)


def _close_params(reason: str | None, excluded: Sequence[str]) -> list[tuple[str, str]]:
    params = [("excluded", c) for c in excluded]
    if reason is not None:
        params.append(("reason", reason))
    return params





# ---------------------------------------------------------------------------------------------
# The Node.js agent


class AgentError(Exception):
    """A command the agent answered with ``ok: false``; ``str()`` is the client's error."""


@dataclass(frozen=True)
class Received:
    method: str
    args: list[Any]


def from_agent(value: Any) -> Any:
    """Turn the agent's ``{"$bytes": base64}`` back into ``bytes``, recursively."""
    if isinstance(value, list):
        return [from_agent(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"$bytes"}:
            return base64.b64decode(value["$bytes"])
        return {k: from_agent(v) for k, v in value.items()}
    return value


def to_agent(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, (list, tuple)):
        return [to_agent(v) for v in value]
    if isinstance(value, dict):
        return {k: to_agent(v) for k, v in value.items()}
    return value


class NodeAgent:
    """``agent.js`` in a subprocess: named ``@microsoft/signalr`` HubConnections."""

    def __init__(self, process: trio.Process, relay: RelayProcess | None) -> None:
        self.process = process
        self.relay = relay
        self.changes = Changes()
        self.stderr: list[str] = []
        self.stdout_junk: list[str] = []
        self.ready: dict[str, Any] | None = None
        self.eof = False
        #: what each named connection received, in order; ``take()`` empties it
        self.messages: dict[str, list[Received]] = {}
        #: name -> the error ``onclose`` was given (None for a clean close)
        self.closed: dict[str, str | None] = {}
        self.connection_ids: dict[str, str] = {}
        #: every event but messages, in order (closed, reconnecting, reconnected)
        self.events: list[dict[str, Any]] = []
        self._next_id = 0
        self._replies: dict[int, dict[str, Any]] = {}
        self._send_lock = trio.Lock()  # commands may be sent from several tasks at once

    # -- plumbing -----------------------------------------------------------------------

    def describe(self) -> str:
        received = repr({n: [(m.method, m.args) for m in ms] for n, ms in self.messages.items()})
        if len(received) > 4000:
            received = received[:4000] + "... (cut)"
        parts = [f"--- agent state: closed={self.closed!r}, events={self.events[-20:]!r}, "
                 f"not yet taken={received}"]
        if self.eof:
            parts.append(f"--- the agent exited (status {self.process.returncode})")
        if self.stdout_junk:
            parts.append("--- agent stdout that was not JSON:\n" + _tail(self.stdout_junk, 20))
        parts.append("--- agent stderr:\n" + (_tail(self.stderr, 40) or "(empty)"))
        if self.relay is not None:
            parts.append(self.relay.describe())
        return "\n".join(parts)

    def _on_stdout(self, raw: bytes) -> None:
        try:
            msg = json.loads(raw)
        except ValueError:
            self.stdout_junk.append(raw.decode("utf-8", "replace"))
            return
        event = msg.get("event")
        if event == "message":
            self.messages.setdefault(msg["name"], []).append(
                Received(msg["method"], from_agent(msg["args"])))
        elif event == "closed":
            self.closed[msg["name"]] = msg["error"]
            self.events.append(msg)
        elif event in ("reconnecting", "reconnected"):
            self.events.append(msg)
        elif event == "ready":
            self.ready = msg
        elif "id" in msg:
            self._replies[msg["id"]] = msg
        self.changes.notify()

    def _on_stderr(self, raw: bytes) -> None:
        self.stderr.append(raw.decode("utf-8", "replace"))

    async def _pump_stdout(self) -> None:
        assert self.process.stdout is not None
        await _pump_lines(self.process.stdout, self._on_stdout)
        self.eof = True
        self.changes.notify()

    async def _pump_stderr(self) -> None:
        assert self.process.stderr is not None
        await _pump_lines(self.process.stderr, self._on_stderr)

    async def wait_for(self, predicate: Callable[[], bool], what: str,
                       timeout: float = WAIT) -> None:
        """Wait until ``predicate()`` is true; fail after ``timeout`` or if the agent died."""
        def done() -> bool:
            return predicate() or self.eof
        await self.changes.wait_for(done, what=what, describe=self.describe, timeout=timeout)
        if not predicate():
            raise AssertionError(f"the agent exited while waiting for {what}\n{self.describe()}")

    async def request(self, cmd: str, timeout: float = WAIT, **fields: Any) -> dict[str, Any]:
        """Send one command and return its reply; raise ``AgentError`` if it failed."""
        self._next_id += 1
        request_id = self._next_id
        line = json.dumps({"id": request_id, "cmd": cmd, **fields}) + "\n"
        assert self.process.stdin is not None
        with trio.fail_after(WAIT):
            async with self._send_lock:
                await self.process.stdin.send_all(line.encode())
        await self.wait_for(lambda: request_id in self._replies,
                            what=f"the agent's answer to {cmd} {fields.get('name', '')}",
                            timeout=timeout)
        reply = self._replies.pop(request_id)
        if not reply.get("ok"):
            raise AgentError(reply.get("error"))
        return reply

    # -- commands -----------------------------------------------------------------------

    async def connect(self, name: str, url: str, token: str | None, *,
                      protocol: str = "json", methods: Sequence[str] = ("notify",),
                      **options: Any) -> str:
        """Start a HubConnection (WebSockets); returns its connectionId (``""`` when the
        client has none, as with ``skipNegotiation``)."""
        self.messages.setdefault(name, [])
        reply = await self.request("connect", name=name, url=url, token=token,
                                   protocol=protocol, methods=list(methods), **options)
        self.connection_ids[name] = reply.get("connectionId") or ""
        return self.connection_ids[name]

    async def stop(self, name: str) -> None:
        await self.request("stop", name=name)

    async def invoke(self, name: str, method: str, *args: Any) -> Any:
        reply = await self.request("invoke", name=name, method=method, args=to_agent(list(args)))
        return from_agent(reply["result"])

    async def send(self, name: str, method: str, *args: Any) -> None:
        await self.request("send", name=name, method=method, args=to_agent(list(args)))

    async def state(self, name: str) -> str:
        return str((await self.request("state", name=name))["state"])

    # -- what was received --------------------------------------------------------------

    def take(self, name: str) -> list[Received]:
        """Everything ``name`` received since the last ``take``."""
        got = self.messages.get(name, [])
        self.messages[name] = []
        return got

    async def wait_messages(self, name: str, count: int, timeout: float = WAIT) -> list[Received]:
        await self.wait_for(lambda: len(self.messages.get(name, [])) >= count,
                            what=f"{count} message(s) on connection {name!r}", timeout=timeout)
        return list(self.messages[name])

    async def wait_event(self, name: str, event: str, timeout: float = WAIT) -> dict[str, Any]:
        """Wait for the first ``event`` (``reconnecting``, ``reconnected``, ``closed``) of
        ``name`` and return it."""
        def found() -> dict[str, Any] | None:
            return next((e for e in self.events
                         if e["name"] == name and e["event"] == event), None)
        await self.wait_for(lambda: found() is not None, what=f"{event} of {name!r}",
                            timeout=timeout)
        result = found()
        assert result is not None
        return result

    async def wait_closed(self, name: str, timeout: float = WAIT) -> str | None:
        """Wait for ``onclose`` of ``name``; returns the error it was given (None if none)."""
        await self.wait_for(lambda: name in self.closed,
                            what=f"onclose of connection {name!r}", timeout=timeout)
        return self.closed[name]

    def live(self) -> list[str]:
        """Names of the connections that were opened and not closed."""
        return [n for n in self.connection_ids if n not in self.closed]

    async def exit(self) -> None:
        if self.eof or self.process.returncode is not None:
            return
        try:
            await self.request("exit", timeout=WAIT)
        except (AgentError, AssertionError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        with trio.move_on_after(WAIT):
            await self.process.wait()
        if self.process.returncode is None:
            self.process.kill()


NodeAgentFactory = Callable[..., Awaitable[NodeAgent]]


def node_problem() -> str | None:
    node = shutil.which("node")
    if node is None:
        return "node (Node.js 20+) is not on PATH"
    try:
        version = subprocess.run([node, "--version"], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`node --version` failed: {exc}"
    major = int(re.match(r"v?(\d+)", version).group(1)) if re.match(r"v?(\d+)", version) else 0
    if major < 20:
        return f"Node.js 20+ is needed, found {version}"
    for package in ("@microsoft/signalr", "@microsoft/signalr-protocol-msgpack"):
        if not (NODE_DIR / "node_modules" / package / "package.json").is_file():
            return (f"{package} is not installed in {NODE_DIR / 'node_modules'}; run "
                    "`npm ci --prefix tests/e2e/node`")
    return None
