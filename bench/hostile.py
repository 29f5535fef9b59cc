"""Hostile peers against a real relay: each attack leaves the relay's memory under a stated bound
while a healthy client keeps receiving.

The relay runs as a real subprocess (``python -m relaycore serve``, from a snapshot of the
committed HEAD) pinned to CPU 0; this process, pinned to CPU 1, is the attackers, a healthy
SignalR client (relaycore's sans-I/O WebSocket in the client role, JSON hub protocol) and a
REST publisher that broadcasts a numbered tick to the hub every 100 ms. A thread samples the
relay's ``VmRSS`` every 50 ms (and its open descriptors every 500 ms). The attacks run one
after the other, each from its own connections:

1. ``pings``: a client with a tiny receive buffer sends masked pings (125-byte payloads) and
   never reads, up to 1 GB; the relay answers each with a pong it must queue.
2. ``continuations``: a non-final text frame, then masked empty continuation frames (6 bytes
   on the wire, nothing in the message), 256 MB of them.
3. ``slowloris``: 2,000 connections, each a partial request head and then one byte every few
   seconds; a closed one is opened again after a second, for 45 s.
4. ``appserver``: an app server (service protocol) that stops reading while a client bound to
   it sends messages: the relay queues them for the app server.

For each: the relay's RSS before, its peak during (and until the healthy client has received
everything), the bound stated for it, the ticks the healthy client received during and after
the attack against those sent, and what the relay logged (the relay has no stats endpoint).

    python bench/hostile.py                      # full size, JSON in bench/results/
    python bench/hostile.py --smoke              # each attack with tiny numbers, ~20 s (CI)
    python bench/hostile.py --attacks pings slowloris --ping-mb 64
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio
from fanout import facts  # noqa: E402 - bench/ is this script's folder on sys.path

from relaycore._accel import apply_mask, encode_frame_header
from relaycore.protocol import (
    BinaryMessage,
    ConnectionDataMessage,
    ConnectionType,
    Opcode,
    OpenConnectionMessage,
    Pong,
    Role,
    ServiceHandshakeRequest,
    ServiceHandshakeResponse,
    ServicePing,
    ServiceProtocolParser,
    TextMessage,
    WebSocketProtocol,
    generate_access_token,
    write_service_message,
)
from relaycore.relay import RelayConfig

KEY = "hostile-bench-access-key-0123456789abcdef"
HUB = "chat"
RS = "\x1e"
ROOT = Path(__file__).resolve().parent
MiB = 1 << 20
#: Every bound is the relay's RSS before the attack, plus what the attack may legitimately
#: make it hold (a limit of the relay's configuration), plus this for everything else:
#: read buffers, the allocator's slack, the log, the healthy client's ticks.
MARGIN = 16 * MiB
#: What one HTTP connection not yet upgraded costs the relay besides its request head: its
#: trio task and cancel scope, the socket, the h11 parser. Stated, not measured.
PER_HTTP_CONNECTION = 16 << 10
#: The settings the smoke run gives the relay, so that every limit is reached in seconds.
SMOKE_SETTINGS = {
    "send_buffer_limit": 256 << 10,
    "server_send_buffer_limit": 1 * MiB,
    "request_timeout": 1.5,
    "max_http_connections": 20,
    "close_timeout": 1.0,
}
UPGRADE = ("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
           "Connection: Upgrade\r\n{extra}Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           "Sec-WebSocket-Version: 13\r\n\r\n")


def now() -> float:
    return time.monotonic()


# -- the relay and what it shows from outside ---------------------------------------------


def snapshot_relay() -> str:
    """The committed ``src/relaycore`` (``git archive HEAD``) plus the built extension, in a
    temporary directory: other people edit ``src/`` while a run goes on, and the figures are
    those of the commit printed."""
    dest = Path(tempfile.mkdtemp(prefix="relaycore-hostile-"))
    atexit.register(shutil.rmtree, dest, True)
    archive = subprocess.run(["git", "archive", "HEAD", "src/relaycore"], cwd=ROOT.parent,
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    for built in (ROOT.parent / "src" / "relaycore").glob("_fastpath*.so"):
        shutil.copy2(built, dest / "src" / "relaycore" / built.name)
    return str(dest / "src")


class Relay:
    """``python -m relaycore serve`` as a subprocess; every line it writes is kept with the
    time it arrived (its log is on stderr)."""

    def __init__(self, settings: dict[str, Any], pythonpath: str | None) -> None:
        cmd = [sys.executable, "-m", "relaycore", "serve", "--port", "0", "--access-key", KEY,
               "--log-level", "INFO"]
        if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
            cmd = ["taskset", "-c", "0", *cmd]
        env = {**os.environ, **{f"RELAYCORE_{k.upper()}": str(v) for k, v in settings.items()}}
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self.port = 0
        for line in self.proc.stdout:
            self._keep(line)
            match = re.search(r"listening on .*:(\d+)", line)
            if match:
                self.port = int(match.group(1))
                self.banner = line.strip()
                break
        if not self.port:
            raise RuntimeError("the relay exited before it listened:\n"
                               + self.proc.stderr.read())
        for pipe in (self.proc.stdout, self.proc.stderr):
            threading.Thread(target=self._read, args=(pipe,), daemon=True).start()

    @property
    def pid(self) -> int:
        # Under taskset the Popen is taskset, which execs the relay: same pid.
        return self.proc.pid

    def _keep(self, line: str) -> None:
        with self._lock:
            self.lines.append((now(), line.rstrip("\n")))

    def _read(self, pipe: Any) -> None:
        for line in pipe:
            self._keep(line)

    def lines_between(self, t0: float, t1: float) -> list[str]:
        with self._lock:
            return [line for t, line in self.lines if t0 <= t <= t1]

    def first_line_after(self, t0: float, pattern: str) -> tuple[float, str] | None:
        with self._lock:
            for t, line in self.lines:
                if t >= t0 and re.search(pattern, line):
                    return t, line
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def read_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Sampler(threading.Thread):
    """The relay's RSS every 50 ms and its open descriptors every 500 ms, with their times."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.rss: list[tuple[float, int]] = []
        self.fds: list[tuple[float, int]] = []
        self._stop = threading.Event()

    def run(self) -> None:
        n = 0
        while not self._stop.is_set():
            try:
                self.rss.append((now(), read_rss(self.pid)))
                if n % 10 == 0:
                    self.fds.append((now(), len(os.listdir(f"/proc/{self.pid}/fd"))))
            except OSError:  # the relay exited
                return
            n += 1
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()

    def current(self) -> int:
        return self.rss[-1][1] if self.rss else read_rss(self.pid)

    @staticmethod
    def _peak(series: list[tuple[float, int]], t0: float, t1: float) -> int:
        return max((v for t, v in list(series) if t0 <= t <= t1), default=0)

    def peak_rss(self, t0: float, t1: float) -> int:
        return self._peak(self.rss, t0, t1)

    def peak_fds(self, t0: float, t1: float) -> int:
        return self._peak(self.fds, t0, t1)


# -- peers --------------------------------------------------------------------------------


def client_token(user: str) -> str:
    return generate_access_token(KEY, f"http://127.0.0.1/client/?hub={HUB}", now=time.time(),
                                 user_id=user)


def masked_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    mask = os.urandom(4)
    return encode_frame_header(opcode, len(payload), fin=fin, mask=mask) + apply_mask(payload,
                                                                                       mask)


async def tcp_connect(port: int, *, rcvbuf: int | None = None,
                      source: str | None = None) -> trio.SocketStream:
    """A TCP connection to the relay; a receive buffer set before the connect (so that the
    window it advertises is small from the start) and a source address if asked."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, rcvbuf)
        if source is not None:
            await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def read_head(stream: trio.SocketStream) -> tuple[bytes, bytes]:
    """The HTTP response head and whatever came after it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise ConnectionError(f"the relay closed before answering: {data[:200]!r}")
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    return head, rest


async def open_hub_client(port: int, user: str, *, rcvbuf: int | None = None,
                          ) -> tuple[trio.SocketStream, WebSocketProtocol]:
    """A client upgraded to a WebSocket on ``/client/`` with its JSON hub handshake answered."""
    stream = await tcp_connect(port, rcvbuf=rcvbuf)
    path = f"/client/?hub={HUB}&access_token={client_token(user)}"
    ws = WebSocketProtocol(Role.CLIENT, max_message_size=None, mask_key=lambda: os.urandom(4))
    ws.send_text('{"protocol":"json","version":1}' + RS)
    await stream.send_all(UPGRADE.format(path=path, extra="").encode() + ws.data_to_send())
    head, rest = await read_head(stream)
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"upgrade refused: {head[:200]!r}")
    while True:
        if rest:
            ws.receive_data(rest)
            for event in ws.events_received():
                if isinstance(event, TextMessage) and event.data.startswith("{"):
                    if event.data.startswith("{}"):
                        return stream, ws
                    raise ConnectionError(f"handshake refused: {event.data[:200]}")
        rest = await stream.receive_some(65536)
        if not rest:
            raise ConnectionError("the relay closed during the hub handshake")


class HealthyClient:
    """The client that must keep receiving: it counts the ticks (REST broadcasts, numbered)
    and pings the hub every 5 s as SignalR clients do (the relay closes a client silent for
    30 s)."""

    def __init__(self, stream: trio.SocketStream, ws: WebSocketProtocol) -> None:
        self.stream = stream
        self.ws = ws
        self.received: dict[int, float] = {}
        self.closed_because: str | None = None
        self._sending = trio.Lock()

    @classmethod
    async def open(cls, port: int) -> HealthyClient:
        return cls(*await open_hub_client(port, "healthy"))

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keep_alive)
            try:
                await self._receive()
            finally:
                nursery.cancel_scope.cancel()

    async def _flush(self) -> None:
        async with self._sending:
            out = self.ws.data_to_send()
            if out:
                await self.stream.send_all(out)

    async def _keep_alive(self) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while True:
                await trio.sleep(5)
                self.ws.send_text('{"type":6}' + RS)
                await self._flush()

    async def _receive(self) -> None:
        try:
            while True:
                data = await self.stream.receive_some(65536)
                if not data:
                    self.closed_because = "the relay closed the socket"
                    return
                self.ws.receive_data(data)
                arrived = now()
                for event in self.ws.events_received():
                    if not isinstance(event, TextMessage):
                        continue
                    for record in event.data.split(RS)[:-1]:
                        if '"tick"' in record:
                            self.received.setdefault(json.loads(record)["arguments"][0], arrived)
                        elif '"type":7' in record:
                            self.closed_because = f"Close message: {record[:200]}"
                await self._flush()  # pongs to the relay's pings, if it sends any
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.closed_because = f"socket error: {exc!r}"


class Publisher:
    """Broadcasts ``tick(n)`` to the hub through the REST API every 100 ms (one request at a
    time, keep-alive). A request that fails is tried again on a new connection, twice; what
    still fails is not counted as sent. A tick's latency runs from the start of the request
    that succeeded (its connect included, when the relay had closed the keep-alive one) to
    its arrival at the healthy client."""

    def __init__(self, port: int) -> None:
        path = f"/api/hubs/{HUB}/:send"
        token = generate_access_token(KEY, f"http://127.0.0.1{path}", now=time.time())
        self.url = f"http://127.0.0.1:{port}{path}?api-version=2022-06-01"
        self.http = httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"},
                                      timeout=10.0)
        self.sent: list[tuple[int, float]] = []  # (n, when the request went out), 202 only
        self.took: dict[int, float] = {}  # n -> seconds from that request to its 202
        self.failures: list[tuple[float, str]] = []
        self.retries: list[float] = []
        self.paused = False

    async def _post(self, n: int) -> None:
        for attempt in range(3):
            started = now()
            try:
                response = await self.http.post(self.url, json={"target": "tick",
                                                                "arguments": [n]})
            except httpx.HTTPError as exc:
                reason = repr(exc)
            else:
                if response.status_code == 202:
                    self.sent.append((n, started))
                    self.took[n] = now() - started
                    return
                reason = f"HTTP {response.status_code}: {response.text[:200]}"
            if attempt < 2:
                self.retries.append(started)
        self.failures.append((now(), reason))

    async def run(self) -> None:
        n = 0
        next_due = now()
        while True:
            next_due += 0.1
            if not self.paused:
                await self._post(n)
                n += 1
            await trio.sleep(max(0.0, next_due - now()))

    async def aclose(self) -> None:
        await self.http.aclose()


# -- the attacks ----------------------------------------------------------------------------


@dataclass
class Context:
    args: argparse.Namespace
    relay: Relay
    config: RelayConfig
    #: What the running attack had sent (bytes) and when: read against the time of the relay's
    #: log line that gives its verdict.
    timeline: list[tuple[float, int]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    def sent(self, total: int) -> None:
        self.timeline.append((now(), total))


async def when_logged(ctx: Context, t0: float, pattern: str,
                      timeout: float = 3.0) -> dict[str, Any] | None:
    """The relay's first log line matching ``pattern`` since ``t0`` (waiting ``timeout`` for
    it: the line may still be in the pipe), and when it came."""
    with trio.move_on_after(timeout):
        while (found := ctx.relay.first_line_after(t0, pattern)) is None:
            await trio.sleep(0.05)
    if found is None:
        return None
    # What the attack had sent when the line arrived (it takes a few ms through the pipe:
    # the figure is a little high, never low).
    sent = max((n for t, n in ctx.timeline if t <= found[0]), default=0)
    return {"after_s": round(found[0] - t0, 2), "sent_by_then": sent, "line": found[1][:300]}


async def attack_pings(ctx: Context) -> dict[str, Any]:
    limit = ctx.args.ping_mb * MiB
    stream, _ = await open_hub_client(ctx.relay.port, "pinger", rcvbuf=4096)
    one = masked_frame(Opcode.PING, b"p" * 125)
    block = one * 500
    pattern = r"send buffer limit of \d+ bytes exceeded"
    t0 = now()
    ctx.timeline = []
    sent = 0
    outcome = f"sent the whole {ctx.args.ping_mb} MB"
    try:
        while sent < limit:
            await stream.send_all(block)
            sent += len(block)
            ctx.sent(sent)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        outcome = f"socket broke ({type(exc.__cause__ or exc).__name__})"
    logged = await when_logged(ctx, t0, pattern)
    await stream.aclose()
    return {"frame_bytes": len(one), "sent_bytes": sent, "pings": sent // len(one),
            "outcome": outcome, "relay_closed": logged,
            "sent_when_logged": logged["sent_by_then"] if logged else None}


async def attack_continuations(ctx: Context) -> dict[str, Any]:
    limit = ctx.args.continuation_mb * MiB
    stream, ws = await open_hub_client(ctx.relay.port, "fragments")
    empty = masked_frame(Opcode.CONTINUATION, b"", fin=False)
    block = empty * (65536 // len(empty))
    t0 = now()
    ctx.timeline = []
    sent = 0
    outcome = f"sent the whole {ctx.args.continuation_mb} MB"
    served_after = False
    try:
        # A hub ping cut in two, with the flood between its halves.
        await stream.send_all(masked_frame(Opcode.TEXT, b'{"type":', fin=False))
        while sent < limit:
            await stream.send_all(block)
            sent += len(block)
        flood_s = now() - t0
        await stream.send_all(masked_frame(Opcode.CONTINUATION, b"6}" + RS.encode())
                              + masked_frame(Opcode.PING, b"still there?"))
        # Is the connection still served? Its pong says so (ticks arrived meanwhile too).
        with trio.move_on_after(30):
            while not served_after:
                data = await stream.receive_some(65536)
                if not data:
                    outcome = "the relay closed the connection"
                    break
                ws.receive_data(data)
                served_after = any(isinstance(e, Pong) and e.payload == b"still there?"
                                   for e in ws.events_received())
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        outcome = f"socket broke ({type(exc.__cause__ or exc).__name__})"
        flood_s = now() - t0
    await stream.aclose()
    return {"sent_bytes": sent, "frames": sent // len(empty), "flood_s": round(flood_s, 1),
            "frames_per_s": round(sent / len(empty) / flood_s) if flood_s else None,
            "outcome": outcome, "connection_served_after": served_after,
            "relay_closed": await when_logged(ctx, t0, r"connection .* failed", 0.5)}


async def attack_slowloris(ctx: Context) -> dict[str, Any]:
    """``--slowloris`` connections, each a partial request head and then one byte of a header
    every ``--dribble`` seconds; one the relay closes is opened again after
    ``--reconnect`` seconds, until ``--slowloris-s`` have passed. The churn opens tens of
    thousands of connections in a full run, so they come from 16 source addresses
    (127.0.0.2-17) to keep clear of the ephemeral ports' limit."""
    args = ctx.args
    counts = {"opened": 0, "answered_408": 0, "answered_other": 0, "closed_silently": 0,
              "connect_errors": 0}
    open_now = [0]
    most_open = [0]
    head = f"GET /client/?hub={HUB} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()
    drip = b"X-a: b\r\n"
    end = now() + args.slowloris_s

    async def one(i: int) -> None:
        source = f"127.0.0.{2 + i % 16}"
        while now() < end:
            try:
                stream = await tcp_connect(ctx.relay.port, source=source)
            except OSError:
                counts["connect_errors"] += 1
                await trio.sleep(args.reconnect)
                continue
            counts["opened"] += 1
            open_now[0] += 1
            most_open[0] = max(most_open[0], open_now[0])
            try:
                await stream.send_all(head)
                k = 0
                while now() < end:
                    with trio.move_on_after(args.dribble):
                        data = await stream.receive_some(4096)
                        key = ("answered_408" if data.startswith(b"HTTP/1.1 408") else
                               "answered_other" if data else "closed_silently")
                        counts[key] += 1
                        if key == "answered_other":
                            ctx.notes.setdefault("slowloris_other", data[:200].decode("latin-1"))
                        break
                    await stream.send_all(drip[k % len(drip):k % len(drip) + 1])
                    k += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                counts["closed_silently"] += 1
            finally:
                open_now[0] -= 1
                await stream.aclose()
            await trio.sleep(args.reconnect)

    newcomer: dict[str, Any] = {}

    async def new_client_midway() -> None:
        # Can a new client get in while the attack holds the relay's HTTP slots?
        await trio.sleep(args.slowloris_s / 2)
        started = now()
        try:
            with trio.fail_after(30):
                stream, _ = await open_hub_client(ctx.relay.port, "newcomer")
            await stream.aclose()
            newcomer["connected_in_ms"] = round((now() - started) * 1000, 1)
        except (OSError, ConnectionError, trio.TooSlowError) as exc:
            newcomer["error"] = repr(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(new_client_midway)
        for i in range(args.slowloris):
            nursery.start_soon(one, i)
            if i % 100 == 99:
                await trio.sleep(0)
    return {**counts, "connections": args.slowloris, "most_open_at_once": most_open[0],
            "new_client_midway": newcomer, **ctx.notes}


class RawAppServer:
    """One server connection written with relaycore's sans-I/O pieces: upgrade, service
    handshake, then only what the attack wants."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WebSocketProtocol(Role.CLIENT, max_message_size=None,
                                    mask_key=lambda: os.urandom(4))
        self.parser = ServiceProtocolParser()
        self.inbox: list[Any] = []

    @classmethod
    async def open(cls, port: int) -> RawAppServer:
        token = generate_access_token(KEY, f"http://127.0.0.1/server/?hub={HUB}",
                                      now=time.time(), user_id="hostile-server")
        # A small receive buffer: once it stops reading, the relay's queue fills, not the
        # kernel's.
        stream = await tcp_connect(port, rcvbuf=4096)
        await stream.send_all(UPGRADE.format(
            path=f"/server/?hub={HUB}",
            extra=f"Authorization: Bearer {token}\r\nX-ASRS-Server-Id: hostile-server\r\n",
        ).encode())
        head, rest = await read_head(stream)
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(f"server upgrade refused: {head[:200]!r}")
        server = cls(stream)
        if rest:
            server._feed(rest)
        await server.send(ServiceHandshakeRequest(connection_type=ConnectionType.DEFAULT))
        answer = await server.next(ServiceHandshakeResponse)
        if not answer.succeeded:
            raise ConnectionError(f"service handshake refused: {answer}")
        return server

    def _feed(self, data: bytes) -> None:
        self.ws.receive_data(data)
        for event in self.ws.events_received():
            if isinstance(event, BinaryMessage):
                self.parser.receive_data(event.data)
                self.inbox.extend(self.parser.messages_received())

    async def send(self, *messages: Any) -> None:
        for message in messages:
            self.ws.send_binary(write_service_message(message))
        await self.stream.send_all(self.ws.data_to_send())

    async def next(self, kind: type) -> Any:
        with trio.fail_after(10):
            while True:
                for i, message in enumerate(self.inbox):
                    if isinstance(message, kind):
                        return self.inbox.pop(i)
                data = await self.stream.receive_some(65536)
                if not data:
                    raise ConnectionError("the relay closed the server connection")
                self._feed(data)
                out = self.ws.data_to_send()
                if out:
                    await self.stream.send_all(out)


async def attack_appserver(ctx: Context) -> dict[str, Any]:
    limit = ctx.args.appserver_mb * MiB
    server = await RawAppServer.open(ctx.relay.port)
    # The client is bound to this app server: its handshake arrives as ConnectionData and
    # the app server answers it.
    client = await tcp_connect(ctx.relay.port)
    ws = WebSocketProtocol(Role.CLIENT, max_message_size=None, mask_key=lambda: os.urandom(4))
    ws.send_text('{"protocol":"json","version":1}' + RS)
    path = f"/client/?hub={HUB}&access_token={client_token('bound')}"
    await client.send_all(UPGRADE.format(path=path, extra="").encode() + ws.data_to_send())
    opened = await server.next(OpenConnectionMessage)
    await server.next(ConnectionDataMessage)
    await server.send(ConnectionDataMessage(opened.connection_id, b"{}" + RS.encode()))
    head, rest = await read_head(client)
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"client upgrade refused: {head[:200]!r}")
    # From here on the app server reads nothing (it still pings: it is alive, only slow).
    payload = json.dumps({"type": 1, "target": "Echo", "arguments": ["x" * 60000]}) + RS
    ws.send_text(payload)
    message = ws.data_to_send()  # the same masked frame each time is fine for the relay
    pattern = r"app server .* did not read"
    t0 = now()
    ctx.timeline = []
    sent = 0
    told: list[str] = []
    outcome = f"sent the whole {ctx.args.appserver_mb} MB"

    async def server_pings() -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while True:
                await trio.sleep(5)
                await server.send(ServicePing())

    async def client_reads() -> None:
        data = rest
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while True:
                if data:
                    ws.receive_data(data)
                    for event in ws.events_received():
                        if isinstance(event, TextMessage) and '"type":7' in event.data:
                            told.append(event.data[:300])
                data = await client.receive_some(65536)
                if not data:
                    return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server_pings)
        nursery.start_soon(client_reads)
        try:
            while sent < limit and not told and ctx.relay.first_line_after(t0, pattern) is None:
                await client.send_all(message)
                sent += len(message)
                ctx.sent(sent)
            if told or sent < limit:
                outcome = "the relay closed the app server and told the client"
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            outcome = f"client socket broke ({type(exc.__cause__ or exc).__name__})"
        logged = await when_logged(ctx, t0, pattern)
        with trio.move_on_after(10):  # the client's Close message, if it is on its way
            while not told:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    await client.aclose()
    await server.stream.aclose()
    dropped = re.search(r"\((\d+) dropped\)", logged["line"]) if logged else None
    return {"message_bytes": len(message), "sent_bytes": sent,
            "messages": sent // len(message), "outcome": outcome, "relay_closed": logged,
            "sent_when_logged": logged["sent_by_then"] if logged else None,
            "dropped_bytes": int(dropped.group(1)) if dropped else None,
            "client_told": told[0] if told else None}


# -- running one attack ---------------------------------------------------------------------


@dataclass
class Attack:
    name: str
    run: Callable[[Context], Awaitable[dict[str, Any]]]
    #: What the relay may hold for it by its configuration, and how that was worked out.
    allowance: Callable[[RelayConfig], tuple[int, str]]


ATTACKS = [
    Attack("pings", attack_pings,
           lambda c: (c.send_buffer_limit, f"send_buffer_limit {c.send_buffer_limit}")),
    Attack("continuations", attack_continuations,
           lambda c: (c.max_message_size, f"max_message_size {c.max_message_size}")),
    Attack("slowloris", attack_slowloris,
           lambda c: (c.max_http_connections * (c.max_request_head + PER_HTTP_CONNECTION),
                      f"max_http_connections {c.max_http_connections} x (max_request_head "
                      f"{c.max_request_head} + {PER_HTTP_CONNECTION})")),
    Attack("appserver", attack_appserver,
           lambda c: (c.server_send_buffer_limit + c.max_message_size,
                      f"server_send_buffer_limit {c.server_send_buffer_limit} + "
                      f"max_message_size {c.max_message_size}")),
]


async def wait_received(healthy: HealthyClient, wanted: list[int], timeout: float) -> None:
    with trio.move_on_after(timeout):
        while not all(n in healthy.received for n in wanted):
            if healthy.closed_because:
                return
            await trio.sleep(0.05)


async def run_attack(ctx: Context, attack: Attack, healthy: HealthyClient,
                     publisher: Publisher, sampler: Sampler) -> dict[str, Any]:
    await trio.sleep(ctx.args.settle)  # let what the previous attack left settle
    before = sampler.current()
    allowance, how = attack.allowance(ctx.config)
    bound = before + allowance + MARGIN
    t0 = now()
    cpu0 = cpu_seconds(ctx.relay.pid)
    print(f"  {attack.name}: RSS before {before / MiB:.1f} MiB ...", flush=True)
    try:
        detail = await attack.run(ctx)
    except (OSError, ConnectionError) as exc:
        detail = {"error": repr(exc)}
    t_end = now()
    cpu = cpu_seconds(ctx.relay.pid) - cpu0
    # After: a few more ticks, then everything sent must arrive.
    await trio.sleep(ctx.args.after)
    t_after = now()
    during = [n for n, t in publisher.sent if t0 <= t < t_end]
    after = [n for n, t in publisher.sent if t_end <= t < t_after]
    await wait_received(healthy, during + after, 15.0)
    t1 = now()
    received = healthy.received
    sent_at = dict(publisher.sent)
    latencies = [received[n] - sent_at[n] for n in during if n in received]
    posts = [publisher.took[n] for n in during]
    peak = sampler.peak_rss(t0, t1)
    log = ctx.relay.lines_between(t0, t1)
    return {
        "attack": attack.name,
        **detail,
        "duration_s": round(t_end - t0, 1),
        "relay_cpu_s": round(cpu, 1),
        "rss_before": before,
        "rss_peak": peak,
        "rss_after": sampler.current(),
        "bound": bound,
        "bound_is": f"RSS before + {how} + margin {MARGIN}",
        "within_bound": peak <= bound,
        "relay_fds_peak": sampler.peak_fds(t0, t1),
        "ticks_during": len(during),
        "ticks_during_received": sum(n in received for n in during),
        "ticks_after": len(after),
        "ticks_after_received": sum(n in received for n in after),
        "tick_latency_max_ms": round(max(latencies) * 1000, 1) if latencies else None,
        "rest_request_max_ms": round(max(posts) * 1000, 1) if posts else None,
        "publish_failures": sum(t0 <= t < t_after for t, _ in publisher.failures),
        "publish_retries": sum(t0 <= t < t_after for t in publisher.retries),
        "healthy_closed": healthy.closed_because,
        "relay_log": summarise_log(log),
    }


LOG_KINDS = {
    "slow consumer closed": r"send buffer limit of \d+ bytes exceeded",
    "app server not reading closed": r"did not read",
    "connection failed": r"connection .* failed",
    "app server connected": r"app server .* connected",
    "tracebacks": r"^Traceback",
    "out of file descriptors": r"out of file descriptors",
}


def summarise_log(lines: list[str]) -> dict[str, Any]:
    counts = {kind: sum(bool(re.search(p, line)) for line in lines)
              for kind, p in LOG_KINDS.items()}
    return {"lines": len(lines), **{k: v for k, v in counts.items() if v},
            "first_lines": [line[:300] for line in lines[:5]]}


# -- the run --------------------------------------------------------------------------------


async def main_async(args: argparse.Namespace, relay: Relay,
                     config: RelayConfig) -> list[dict[str, Any]]:
    ctx = Context(args, relay, config)
    sampler = Sampler(relay.pid)
    sampler.start()
    results = []
    try:
        async with trio.open_nursery() as nursery:
            healthy = await HealthyClient.open(relay.port)
            nursery.start_soon(healthy.run)
            publisher = Publisher(relay.port)
            nursery.start_soon(publisher.run)
            for attack in ATTACKS:
                if attack.name not in args.attacks:
                    continue
                if healthy.closed_because:  # say so, and go on with a new one
                    print(f"  the healthy client was closed: {healthy.closed_because}")
                    healthy = await HealthyClient.open(relay.port)
                    nursery.start_soon(healthy.run)
                result = await run_attack(ctx, attack, healthy, publisher, sampler)
                results.append(result)
                print(line_for(result), flush=True)
            await publisher.aclose()
            nursery.cancel_scope.cancel()
    finally:
        sampler.stop()
    return results


def mb(n: int | None) -> str:
    return "-" if n is None else f"{n / MiB:,.1f} MiB"


def what_was_sent(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"error: {r['error']}"
    if r["attack"] == "pings":
        logged = r.get("sent_when_logged")
        return (f"{mb(r['sent_bytes'])} ({r['pings']:,} pings); relay closed it after "
                f"{mb(logged) if logged is not None else '(not logged)'} sent; {r['outcome']}")
    if r["attack"] == "continuations":
        return (f"{mb(r['sent_bytes'])} = {r['frames']:,} empty frames in {r['flood_s']} s "
                f"({r['frames_per_s'] or 0:,}/s); served after: "
                f"{'yes' if r['connection_served_after'] else 'NO'}; {r['outcome']}")
    if r["attack"] == "slowloris":
        return (f"{r['connections']:,} for {r['duration_s']} s: {r['opened']:,} opened "
                f"(at most {r['most_open_at_once']:,} at once), {r['answered_408']:,} got 408, "
                f"{r['closed_silently']:,} closed silently, {r['answered_other']} other, "
                f"{r['connect_errors']} connect errors; relay fds peak {r['relay_fds_peak']:,}; "
                f"a new client midway: {r['new_client_midway']}")
    logged = r.get("sent_when_logged")
    return (f"{mb(r['sent_bytes'])} ({r['messages']:,} messages of {r['message_bytes']:,} B); "
            f"relay closed it after {mb(logged) if logged is not None else '(not logged)'} "
            f"sent, {mb(r['dropped_bytes'])} dropped; client told: "
            f"{'yes' if r['client_told'] else 'no'}")


def line_for(r: dict[str, Any]) -> str:
    return (f"  {r['attack']}: {what_was_sent(r)}\n"
            f"    relay CPU {r['relay_cpu_s']} s in {r['duration_s']} s\n"
            f"    RSS {mb(r['rss_before'])} -> peak {mb(r['rss_peak'])} (after: "
            f"{mb(r['rss_after'])}), bound {mb(r['bound'])}: "
            f"{'within' if r['within_bound'] else 'OVER'}; healthy client "
            f"{r['ticks_during_received']}/{r['ticks_during']} during, "
            f"{r['ticks_after_received']}/{r['ticks_after']} after, max latency "
            f"{r['tick_latency_max_ms']} ms (longest REST request {r['rest_request_max_ms']} "
            f"ms); publish failures {r['publish_failures']}, retries "
            f"{r['publish_retries']}; relay log {r['relay_log']['lines']} lines "
            f"{ {k: v for k, v in r['relay_log'].items() if k not in ('lines', 'first_lines')} }")


def table(results: list[dict[str, Any]]) -> str:
    rows = ["| attack | RSS before | peak RSS | RSS after | bound | within | healthy during | "
            "after | max tick latency |", "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in results:
        rows.append(
            f"| {r['attack']} | {mb(r['rss_before'])} | {mb(r['rss_peak'])} | "
            f"{mb(r['rss_after'])} | {mb(r['bound'])} "
            f"| {'yes' if r['within_bound'] else 'NO'} | "
            f"{r['ticks_during_received']}/{r['ticks_during']} | "
            f"{r['ticks_after_received']}/{r['ticks_after']} | {r['tick_latency_max_ms']} ms |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", nargs="+", choices=[a.name for a in ATTACKS],
                        default=[a.name for a in ATTACKS])
    parser.add_argument("--ping-mb", type=int, default=1024,
                        help="pings to send at most, in MB (the relay should stop it sooner)")
    parser.add_argument("--continuation-mb", type=int, default=256,
                        help="empty continuation frames to send, in MB (6 bytes each)")
    parser.add_argument("--slowloris", type=int, default=2000, help="connections at once")
    parser.add_argument("--slowloris-s", type=float, default=45.0,
                        help="how long they are kept open (reopened when closed)")
    parser.add_argument("--dribble", type=float, default=3.0,
                        help="seconds between the bytes a slowloris connection sends")
    parser.add_argument("--reconnect", type=float, default=1.0,
                        help="seconds before a closed slowloris connection is opened again")
    parser.add_argument("--appserver-mb", type=int, default=512,
                        help="client messages to send at most through the app server that "
                             "stops reading, in MB (the relay should close it sooner)")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds before each attack (what the last one left settles)")
    parser.add_argument("--after", type=float, default=2.0,
                        help="seconds of ticks after each attack")
    parser.add_argument("--working-tree", action="store_true",
                        help="run the relay from src/ as it is, not from a snapshot of HEAD")
    parser.add_argument("--tag", default="",
                        help="added to the result file's name (a run with other numbers)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny numbers and small relay limits, seconds (CI); no result file")
    args = parser.parse_args()
    settings: dict[str, Any] = {}
    if args.smoke:
        settings = dict(SMOKE_SETTINGS)
        args.ping_mb, args.continuation_mb, args.appserver_mb = 64, 2, 64
        args.slowloris, args.slowloris_s, args.dribble, args.reconnect = 40, 3.0, 0.5, 0.2
        args.settle, args.after = 0.3, 1.0
    config = RelayConfig(access_keys=[KEY], **settings)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:  # the slowloris connections are this process's descriptors too
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})
    info = facts()
    print(f"hostile peers: commit {info['commit']}, Python {info['python']}, "
          f"accelerated={info['accelerated']}, {info['cores']} cores"
          f"{', smoke' if args.smoke else ''}")
    relay = Relay(settings, None if args.working_tree else snapshot_relay())
    print(f"  relay: {relay.banner} ({'working tree' if args.working_tree else 'HEAD'}); "
          f"send_buffer_limit {config.send_buffer_limit}, server_send_buffer_limit "
          f"{config.server_send_buffer_limit}, max_message_size {config.max_message_size}, "
          f"request_timeout {config.request_timeout:g} s, max_http_connections "
          f"{config.max_http_connections}, RSS at start {mb(read_rss(relay.pid))}", flush=True)
    try:
        results = trio.run(main_async, args, relay, config)
    finally:
        relay.stop()
    tracebacks = sum(line.startswith("Traceback") for _, line in relay.lines)
    print()
    print(table(results))
    print(f"\nrelay: {tracebacks} tracebacks in its log, exit code {relay.proc.returncode}")
    failed = [r["attack"] for r in results
              if not r["within_bound"] or r["ticks_during_received"] < r["ticks_during"]
              or r["ticks_after_received"] < r["ticks_after"]]
    if failed:
        print(f"NOT BOUNDED OR NOT DELIVERED: {', '.join(failed)}")
    if not args.smoke:
        result = {**info, "scenario": "hostile peers", "settings": {
            k: getattr(config, k) for k in ("send_buffer_limit", "server_send_buffer_limit",
                                            "max_message_size", "request_timeout",
                                            "max_http_connections", "max_request_head",
                                            "close_timeout")},
            "margin": MARGIN, "per_http_connection": PER_HTTP_CONNECTION,
            "arguments": {k: v for k, v in vars(args).items() if k != "smoke"},
            "relay_tracebacks": tracebacks, "attacks": results}
        tag = f"-{args.tag}" if args.tag else ""
        out = ROOT / "results" / f"{info['date']}-{info['commit']}-hostile{tag}.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"written {out.relative_to(ROOT.parent)}")


if __name__ == "__main__":
    main()
