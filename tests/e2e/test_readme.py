"""The README's snippets, run as written against a real relay, so that they cannot rot.

Every fenced block of README.md follows a ``<!-- example: NAME -->`` line, and ``RUN_BY``
says which test below runs each NAME: a block without a marker, or with one no test runs,
fails ``test_every_readme_block_is_run``. The snippets name the ports of a developer's
machine (the relay of ``make run`` on 8080, the app server on 8000); the tests replace those,
and only those, with free ports of their own, and check that nothing else would need changing.
The ``python`` of the shell blocks is this interpreter (the README says they run in ``.venv``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from relaycore.relay._config import DEVELOPMENT_ACCESS_KEY

from .harness import WAIT, RelayFactory, RelayProcess, WatchedProcess, relay_env
from .test_trio_websocket import json_handshake, websocket

pytestmark = pytest.mark.e2e

README = Path(__file__).resolve().parents[2] / "README.md"

#: Which test runs each block of the README, by its marker.
RUN_BY = {
    "two-commands": "tests/test_docs.py (its make targets; running them here would recurse)",
    "token": "test_readme_token_and_rest_send_reach_a_client",
    "browser-client": "test_readme_browser_client_is_a_valid_module",
    "app-server": "test_readme_app_server_runs_and_answers_a_client",
    "app-server-run": "test_readme_app_server_runs_and_answers_a_client",
    "rest-send": "test_readme_token_and_rest_send_reach_a_client",
    "embedded-relay": "test_readme_embedded_relay_runs_and_ends",
    "python-client": "test_readme_python_client_calls_the_app_server",
}

_FENCE = re.compile(r"^```(\S*)\s*$")
_MARKER = re.compile(r"^<!-- example: ([\w-]+) -->$")
#: A developer's port in a snippet: anything like 8000-8099 left after the rewrite.
_FIXED_PORT = re.compile(r"\b80\d\d\b")


@dataclass(frozen=True)
class Block:
    name: str | None
    language: str
    code: str
    line: int  # of the opening fence, 1-based


def readme_blocks(text: str) -> list[Block]:
    """Every fenced block of ``text``, with the marker on the last non-blank line before it."""
    blocks: list[Block] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        fence = _FENCE.match(lines[index])
        if not fence:
            index += 1
            continue
        end = index + 1
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        assert end < len(lines), f"README.md:{index + 1}: a code block is never closed"
        before = [line for line in lines[:index] if line.strip()]
        marker = _MARKER.match(before[-1].strip()) if before else None
        blocks.append(Block(marker.group(1) if marker else None, fence.group(1),
                            "\n".join(lines[index + 1:end]) + "\n", index + 1))
        index = end + 1
    return blocks


def block(name: str) -> Block:
    found = [b for b in readme_blocks(README.read_text(encoding="utf-8")) if b.name == name]
    assert len(found) == 1, f"README.md has {len(found)} blocks marked {name!r}, expected one"
    return found[0]


def as_run_here(code: str, ports: Mapping[str, int]) -> str:
    """``code`` with the README's fixed ports replaced: ``ports`` maps each README port
    ("8080") to this test's. Replaces only ``127.0.0.1:PORT`` and ``port=PORT``, and fails if
    any port-like number is left (the snippet would need another change to run here)."""
    for old, new in ports.items():
        code = code.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}")
        code = code.replace(f"port={old}", f"port={new}")
    left = _FIXED_PORT.findall(code)
    assert not left, f"the snippet names ports this test does not rewrite: {left}\n{code}"
    return code


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def snippet_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a snippet: the developer's relay and SDK settings left out, and a
    ``python`` on PATH that is this interpreter (the README's ``.venv``)."""
    env = relay_env(None)
    for key in list(env):
        if key.lower().startswith("azure__signalr__"):
            del env[key]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    python = bin_dir / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


async def run_snippet(block: Block, code: str, tmp_path: Path) -> str:
    """Run a Python or shell block to its end; its stdout (exit status 0 insisted on)."""
    if block.language == "python":
        script = tmp_path / f"{block.name}.py"
        script.write_text(code)
        cmd = [sys.executable, str(script)]
    else:
        assert block.language == "sh", block
        cmd = ["sh", "-c", code]
    with trio.fail_after(WAIT * 2):
        done = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True,
                                      check=False, cwd=str(tmp_path), env=snippet_env(tmp_path))
    stdout, stderr = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, (f"README.md:{block.line} ({block.name}) exited with "
                                  f"{done.returncode}\n{code}\n--- stdout:\n{stdout}\n"
                                  f"--- stderr:\n{stderr}")
    return stdout


# ---------------------------------------------------------------------------------------------


def test_every_readme_block_is_run() -> None:
    blocks = readme_blocks(README.read_text(encoding="utf-8"))
    unmarked = [f"README.md:{b.line} ({b.language or 'no language'})" for b in blocks
                if b.name is None]
    assert not unmarked, (f"blocks without a '<!-- example: NAME -->' line before them: "
                          f"{unmarked}; add one and run the block in {__name__}")
    names = [b.name for b in blocks]
    assert sorted(names) == sorted(RUN_BY), (
        f"README.md's blocks {names} do not match the ones this module runs {sorted(RUN_BY)}")
    for b in blocks:
        assert b.language in ("sh", "python", "js"), f"README.md:{b.line}: {b.language!r}"
    # The one block not run here holds make commands only (tests/test_docs.py checks them).
    commands = [line.split("#")[0].strip() for line in block("two-commands").code.splitlines()]
    assert all(re.fullmatch(r"make [\w-]+", c) for c in commands if c), commands


async def test_readme_token_and_rest_send_reach_a_client(relay_factory: RelayFactory,
                                                         tmp_path: Path) -> None:
    relay = await relay_factory(access_key=DEVELOPMENT_ACCESS_KEY)

    # The token command, as written: no relay needed, the development key signs.
    token_block = block("token")
    printed = json.loads(await run_snippet(token_block, token_block.code, tmp_path))
    assert set(printed) == {"url", "accessToken"}, printed
    shown = re.search(r'"url": "([^"]+)"', token_block.code)
    assert shown is not None and printed["url"] == shown.group(1), printed

    # alice connects to the relay with that token (the audience ignores the port)...
    async with websocket(relay.ws_url("chat", printed["accessToken"])) as ws:
        records = await json_handshake(ws, relay)

        # ... and the REST snippet's send to alice reaches her.
        rest = block("rest-send")
        stdout = await run_snippet(rest, as_run_here(rest.code, {"8080": relay.port}), tmp_path)
        assert stdout.strip() == "202 {'recipients': 1}", stdout
        assert await records.next_not_ping() == {
            "type": 1, "target": "notify", "arguments": ["your report is ready"]}


async def test_readme_embedded_relay_runs_and_ends(tmp_path: Path) -> None:
    embedded = block("embedded-relay")
    stdout = await run_snippet(embedded, as_run_here(embedded.code, {}), tmp_path)
    lines = stdout.splitlines()
    assert re.fullmatch(r"give app servers: Endpoint=http://127\.0\.0\.1:\d+;AccessKey=secret;"
                        r"Version=1\.0;", lines[0]), stdout
    assert lines[1:] == ["reached 0 connections"], stdout


class SnippetProcess(WatchedProcess):
    """The app server of the README: its shell block run by ``sh`` in a session of its own
    (so that the whole group can be signalled), ready at uvicorn's "running on" line."""

    listening = re.compile(rb"Uvicorn running on http://([\d.]+):(\d+)")

    async def start(self, nursery: trio.Nursery, code: str, cwd: Path) -> None:
        await self._launch(nursery, ["sh", "-c", code], "uvicorn's 'running on' line",
                           cwd=str(cwd), start_new_session=True)

    def signal_group(self, signum: int) -> None:
        assert self.process is not None
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass

    async def stop(self) -> None:
        """SIGTERM to the group (uvicorn's graceful shutdown), then every process's output
        closed, a clean shutdown logged and no traceback."""
        self.stopped = True
        self.signal_group(signal.SIGTERM)
        await self._wait_last_output()
        assert any("Application shutdown complete" in line for line in self.lines), (
            f"the app server did not shut down its application\n{self.describe()}")
        assert not [line for line in self.lines if "Traceback" in line], (
            f"the app server logged a traceback\n{self.describe()}")


@pytest.fixture
async def snippet_processes() -> AsyncIterator[list[SnippetProcess]]:
    processes: list[SnippetProcess] = []
    try:
        yield processes
    finally:
        for process in processes:
            if process.process is not None:
                process.signal_group(signal.SIGKILL)


async def negotiate(app_url: str, relay: RelayProcess, app: SnippetProcess) -> dict[str, str]:
    """``POST /hubs/chat/negotiate?user=alice`` until it answers 200 (503 while the app's
    server connections come up)."""
    last: httpx.Response | None = None
    try:
        with trio.fail_after(WAIT):
            async with httpx.AsyncClient(timeout=WAIT) as http:
                while True:
                    last = await http.post(f"{app_url}/hubs/chat/negotiate",
                                           params={"user": "alice", "negotiateVersion": "1"})
                    if last.status_code != 503:
                        break
                    await trio.sleep(0.05)
    except trio.TooSlowError:
        raise AssertionError(f"negotiate still answered {last and last.status_code} after "
                             f"{WAIT:g} s\n{app.describe()}\n{relay.describe()}") from None
    assert last.status_code == 200, (last.status_code, last.text, app.describe())
    redirect: dict[str, str] = last.json()
    return redirect


async def test_readme_app_server_runs_and_answers_a_client(
        relay_factory: RelayFactory, tmp_path: Path,
        snippet_processes: list[SnippetProcess]) -> None:
    relay = await relay_factory(access_key=DEVELOPMENT_ACCESS_KEY)
    ports = {"8080": relay.port, "8000": free_port()}
    (tmp_path / "app.py").write_text(as_run_here(block("app-server").code, ports))
    run = as_run_here(block("app-server-run").code, ports)
    app = SnippetProcess("the README's app server", snippet_env(tmp_path))
    snippet_processes.append(app)
    async with trio.open_nursery() as nursery:
        await app.start(nursery, run, tmp_path)
        assert app.port == ports["8000"], app.describe()
        app_url = f"http://127.0.0.1:{app.port}"

        # A client does what @microsoft/signalr does: negotiate with the app, follow the
        # redirect to the relay, invoke the hub method; the app answers through the relay.
        redirect = await negotiate(app_url, relay, app)
        assert redirect["url"].startswith(f"{relay.endpoint}/client/?hub=chat"), redirect
        ws_url = "ws" + redirect["url"][len("http"):] + "&access_token=" + \
            redirect["accessToken"]
        async with websocket(ws_url) as ws:
            records = await json_handshake(ws, relay)
            await ws.send_message(json.dumps({"type": 1, "invocationId": "1",
                                              "target": "SendMessage",
                                              "arguments": ["hello"]}) + "\x1e")
            received = [await records.next_not_ping(), await records.next_not_ping()]
        assert {"type": 1, "target": "newMessage", "arguments": ["alice", "hello"]} in received, \
            received
        assert {"type": 3, "invocationId": "1", "result": "sent"} in received, received

        await app.stop()


async def test_readme_python_client_calls_the_app_server(
        relay_factory: RelayFactory, tmp_path: Path,
        snippet_processes: list[SnippetProcess]) -> None:
    relay = await relay_factory(access_key=DEVELOPMENT_ACCESS_KEY)
    ports = {"8080": relay.port, "8000": free_port()}
    (tmp_path / "app.py").write_text(as_run_here(block("app-server").code, ports))
    app = SnippetProcess("the README's app server", snippet_env(tmp_path))
    snippet_processes.append(app)
    async with trio.open_nursery() as nursery:
        await app.start(nursery, as_run_here(block("app-server-run").code, ports), tmp_path)
        await negotiate(f"http://127.0.0.1:{app.port}", relay, app)  # its hub is up

        # The Python client, as written: negotiate with the app, redirected to the relay,
        # SendMessage answered, and the hub's broadcast received first.
        client = block("python-client")
        stdout = await run_snippet(client, as_run_here(client.code, ports), tmp_path)
        assert stdout.splitlines() == ["alice says hello", "sent"], stdout

        await app.stop()


async def test_readme_browser_client_is_a_valid_module(tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        if os.environ.get("CI"):
            pytest.fail("node is missing (apt-get install nodejs)")
        pytest.skip("node is missing: cannot check the README's JavaScript")
    module = tmp_path / "client.mjs"
    module.write_text(block("browser-client").code)
    with trio.fail_after(WAIT):
        done = await trio.run_process([node, "--check", str(module)], capture_stdout=True,
                                      capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr.decode()
