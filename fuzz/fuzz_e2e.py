"""End-to-end fuzzer: mutated requests and frames against a running relay, while a healthy
client counts a numbered stream.

    python fuzz/fuzz_e2e.py [--seconds 60] [--concurrency 6] [--seed N] [--json out.json]

It starts ``python -m relaycore serve --port <free> --access-key K`` and then, until the time
is up:

* a healthy client (trio-websocket, JSON hub protocol, hub ``healthy``, user ``h``) receives
  ``seq(n)`` invocations that a sender posts through the REST API one after the other;
* ``--concurrency`` fuzzing tasks open connection after connection, each sending one input:
  a mutated HTTP request (negotiate, the WebSocket upgrade, REST routes with their query
  values and bodies; half of them signed for the mutated URL, so that they get past the
  token check), mutated WebSocket frames and hub messages after a valid upgrade and
  handshake (JSON or MessagePack), or mutated service-protocol frames on a server connection.
  They use hub ``fuzz``, never the healthy client's.

At the end it checks that the healthy client received every number in order, stops the relay
with SIGTERM (it must drain and exit 0), and reports: inputs sent per kind, relay crashes
(the process ending on its own: must be 0), tracebacks in the relay's output (must be 0; for
each, the inputs sent in the second before it are written to ``fuzz/artifacts/``), and
whether the stream was complete. Exit status 0 only when all three hold.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from relaycore.protocol._auth import generate_access_token

HERE = Path(__file__).resolve().parent
VECTORS = HERE.parent / "tests" / "vectors"
KEY = "e2e-fuzz-access-key"
HOST = "127.0.0.1"
API = "api-version=2022-06-01"
RS = b"\x1e"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def token(audience: str, user: str | None = None) -> str:
    return generate_access_token(KEY, f"http://{HOST}{audience}", now=time.time(),
                                 lifetime=3600, user_id=user)


# --------------------------------------------------------------------------------------------
# Inputs


def load_seeds() -> dict[str, list[bytes]]:
    hub = json.loads((VECTORS / "hub-protocol.json").read_text(encoding="utf-8"))
    service = json.loads((VECTORS / "service-protocol.json").read_text(encoding="utf-8"))
    return {
        "json": [v["text"].encode() for v in hub["json"]],
        "messagepack": [bytes.fromhex(v["framed_hex"]) for v in hub["msgpack"]],
        "service": [bytes.fromhex(v["framed_hex"]) for v in service["vectors"]],
    }


def mutate(rng: random.Random, data: bytes, edits: int | None = None) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4) if edits is None else edits):
        at = rng.randint(0, len(out))
        op = rng.randrange(6)
        if op == 0 and out:
            out[rng.randrange(len(out))] = rng.randrange(256)
        elif op == 1:
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 6)))
        elif op == 2:
            del out[at:at + rng.randint(1, 12)]
        elif op == 3:
            del out[at:]
        elif op == 4:
            out[at:at] = rng.choice([b"\r\n", b"\x00", b"%", b"[", b"\xff\xfe", b"\x1e",
                                     b"9" * 40, b"\xc1", b"\x91" * 50, b"\xdd\xff\xff\xff\xff"])
        else:
            out[at:at] = out[at:at + rng.randint(1, 12)] * rng.randint(2, 20)
    return bytes(out)


PATHS = [
    "/api/hubs/fuzz/:send", "/api/hubs/fuzz/users/u/:send", "/api/hubs/fuzz/groups/g/:send",
    "/api/hubs/fuzz/connections/c/:send", "/api/hubs/fuzz/:closeConnections",
    "/api/hubs/fuzz/users/u/groups/g", "/api/hubs/fuzz/groups/g/users/u",
    "/api/hubs/fuzz/groups/g/connections/c", "/api/hubs/fuzz/users/u", "/api/hubs/fuzz/groups/g",
    "/api/hubs/fuzz/connections/c", "/api/hubs/fuzz/users/u/groups", "/api/v1/hubs/fuzz",
    "/api/v1/hubs/fuzz/users/u", "/api/health", "/api/admin/faults", "/client/negotiate",
    "/client/", "/server/", "/", "//[",
]
QUERIES = ["", API, f"{API}&ttl=30", f"{API}&ttl=" + "9" * 400, f"{API}&excluded=c&reason=x",
           f"{API}&application=app", "hub=fuzz", "hub=fuzz&negotiateVersion=1",
           "hub=fuzz&negotiateVersion=-1", "serverConnections=silence"]
BODIES = [b"", b'{"target":"t","arguments":[1,"x",null]}', b'{"Target":"t"}', b"[" * 3000,
          b"\x81\xa4json\xc4\x0b{\"type\":6}\x1e", b"\x81\xa4json\x91" + b"\x91" * 2000]


def http_request(rng: random.Random) -> bytes:
    """A request a browser, the SDK or an attacker could send, mutated."""
    path = rng.choice(PATHS)
    query = rng.choice(QUERIES)
    method = rng.choice(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS"])
    body = rng.choice(BODIES)
    if rng.random() < 0.5:  # structural mutations, then a valid signature for the result
        path = mutate(rng, path.encode(), 1).decode("latin-1") if rng.random() < 0.3 else path
        query = mutate(rng, query.encode(), 1).decode("latin-1") if rng.random() < 0.5 else query
        body = mutate(rng, body) if rng.random() < 0.5 else body
    target = f"{path}?{query}" if query else path
    audience = "/client/?hub=fuzz" if path.startswith(("/client", "/server")) else path
    headers = [f"Host: {rng.choice([HOST, 'localhost', '[', 'x:99999', HOST])}",
               f"Authorization: Bearer {token(audience, rng.choice([None, 'u']))}",
               f"Content-Type: {rng.choice(['application/json', 'application/x-msgpack'])}",
               f"Content-Length: {len(body)}"]
    if rng.random() < 0.3:
        headers.append(f"Origin: {rng.choice(['http://a.example', 'http://é.x', '*'])}")
    if rng.random() < 0.2:
        headers += ["Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 13",
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="]
    raw = (f"{method} {target} HTTP/1.1\r\n" + "".join(f"{h}\r\n" for h in headers)
           + "\r\n").encode("utf-8") + body
    if rng.random() < 0.5:  # byte-level mutations of the whole request
        raw = mutate(rng, raw)
    if rng.random() < 0.2:  # a second request on the same connection (keep-alive)
        raw = raw + http_request(rng)
    return raw


def ws_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0,
             mask: bytes | None = b"\x0f\xf0\x55\xaa", length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    head = bytearray([(0x80 if fin else 0) | (rsv << 4) | opcode])
    bit = 0x80 if mask is not None else 0
    if n < 126:
        head.append(bit | n)
    elif n < 1 << 16:
        head += bytes([bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + n.to_bytes(8, "big")
    if mask is None:
        return bytes(head) + payload
    return bytes(head) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def frames(rng: random.Random, payloads: list[bytes], text: bool) -> bytes:
    """Frames a client in that state could send: hub messages (mutated or not), fragments,
    pings, pongs, closes, odd opcodes and lengths, and now and then bytes mutated whole."""
    out = []
    for _ in range(rng.randint(1, 8)):
        payload = rng.choice(payloads)
        if rng.random() < 0.6:
            payload = mutate(rng, payload)
        kind = rng.random()
        if kind < 0.55:
            out.append(ws_frame(0x1 if text else 0x2, payload))
        elif kind < 0.7:
            cut = rng.randint(0, len(payload))
            out.append(ws_frame(0x1 if text else 0x2, payload[:cut], fin=False))
            for _ in range(rng.randint(0, 50)):
                out.append(ws_frame(0x0, b"", fin=False))
            out.append(ws_frame(0x0, payload[cut:]))
        elif kind < 0.85:
            out.append(ws_frame(rng.choice([0x9, 0xA]), payload[:125]))
        elif kind < 0.9:
            out.append(ws_frame(0x8, rng.choice([b"", b"\x03\xe8", b"\x03\xe8bye", b"\x00",
                                                 b"\x0b\xb8\xff"])))
        else:
            out.append(ws_frame(rng.randrange(16), payload[:200], fin=rng.random() < 0.8,
                                rsv=rng.choice([0, 0, 1, 4]),
                                mask=rng.choice([b"\x01\x02\x03\x04", None]),
                                length=rng.choice([None, 0, 126, 2**16, 2**63])))
    raw = b"".join(out)
    return mutate(rng, raw) if rng.random() < 0.2 else raw


UPGRADE = ("GET {path}?hub=fuzz&access_token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
           "Upgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


# --------------------------------------------------------------------------------------------
# The run


@dataclass
class Journal:
    """The inputs sent lately, to name the suspects of a traceback."""

    recent: deque[tuple[float, str, bytes]] = field(default_factory=lambda: deque(maxlen=5000))
    sent: Counter[str] = field(default_factory=Counter)
    #: Valid upgrades the relay refused or left unanswered (it should accept every one).
    refused_upgrades: int = 0

    def record(self, kind: str, data: bytes) -> None:
        self.recent.append((time.monotonic(), kind, data))
        self.sent[kind] += 1

    def since(self, moment: float) -> list[dict[str, str]]:
        return [{"kind": kind, "hex": data.hex()} for at, kind, data in self.recent
                if at >= moment]


async def exchange(port: int, data: bytes, *, read_for: float = 0.3) -> bytes:
    """Send ``data`` on a new connection, read for a moment, close."""
    stream = await trio.open_tcp_stream(HOST, port)
    received = bytearray()
    try:
        await stream.send_all(data)
        with trio.move_on_after(read_for):
            while len(received) < 1 << 20:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                received += chunk
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await stream.aclose()
    return bytes(received)


async def upgraded(port: int, path: str, access_token: str,
                   first: bytes) -> trio.SocketStream | None:
    """A connection past a valid upgrade, with ``first`` sent after the 101 (``None``: the
    relay refused or did not answer)."""
    stream = await trio.open_tcp_stream(HOST, port)
    await stream.send_all(UPGRADE.format(path=path, token=access_token).encode())
    head = b""
    with trio.move_on_after(5):
        while b"\r\n\r\n" not in head:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        await stream.aclose()
        return None
    await stream.send_all(first)
    return stream


async def fuzz_task(port: int, rng: random.Random, seeds: dict[str, list[bytes]],
                    journal: Journal, deadline: float, process: trio.Process) -> None:
    client_token = token("/client/?hub=fuzz", "u")
    server_token = token("/server/?hub=fuzz", "s")
    while trio.current_time() < deadline and process.returncode is None:
        kind = rng.choice(["http", "http", "client-json", "client-messagepack", "server"])
        try:
            if kind == "http":
                data = http_request(rng)
                journal.record(kind, data)
                await exchange(port, data, read_for=0.2)
                continue
            if kind == "server":
                handshake = ws_frame(0x2, seeds["service"][0])
                data = frames(rng, seeds["service"], text=False)
                path = "/server/"
                access_token = server_token
            else:
                protocol = kind.removeprefix("client-")
                request = json.dumps({"protocol": protocol, "version": 1}).encode() + RS
                if rng.random() < 0.1:
                    request = mutate(rng, request)
                handshake = ws_frame(0x1, request)
                data = frames(rng, seeds[protocol], text=protocol == "json")
                path = "/client/"
                access_token = client_token
            journal.record(kind, handshake + data)
            stream = await upgraded(port, path, access_token, handshake)
            if stream is None:
                journal.refused_upgrades += 1
                continue
            try:
                await stream.send_all(data)
                with trio.move_on_after(0.1):
                    while await stream.receive_some(65536):
                        pass
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            finally:
                await stream.aclose()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            await trio.sleep(0.05)  # refused while the relay sheds load (or it has ended)


@dataclass
class Stream:
    sent: int = 0
    received: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def healthy_client(port: int, stream: Stream, connected: trio.Event,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    url = (f"ws://{HOST}:{port}/client/?hub=healthy&access_token="
           f"{token('/client/?hub=healthy', 'h')}")
    try:
        await _healthy_client(url, stream, connected, task_status)
    except (ConnectionClosed, HandshakeError, OSError) as exc:
        stream.errors.append(f"the healthy client lost its connection: {exc!r}")


async def _healthy_client(url: str, stream: Stream, connected: trio.Event,
                          task_status: trio.TaskStatus[None]) -> None:
    async with open_websocket_url(url) as ws, trio.open_nursery() as nursery:
        await ws.send_message('{"protocol":"json","version":1}\x1e')
        reply = await ws.get_message()
        assert reply in ("{}\x1e", b"{}\x1e"), reply
        connected.set()
        task_status.started()
        nursery.start_soon(_keep_alive, ws)
        while True:
            message = await ws.get_message()
            text = message if isinstance(message, str) else message.decode()
            for record in text.split("\x1e")[:-1]:
                hub_message = json.loads(record)
                if hub_message.get("type") == 1 and hub_message.get("target") == "seq":
                    stream.received.append(hub_message["arguments"][0])
                elif hub_message.get("type") == 7:
                    stream.errors.append(f"the healthy client was closed: {record}")
                    nursery.cancel_scope.cancel()
                    return


async def _keep_alive(ws: Any) -> None:
    """Pings, as every SignalR client sends them (the relay closes a silent client)."""
    while True:
        await trio.sleep(5)
        await ws.send_message('{"type":6}\x1e')


async def sender(port: int, stream: Stream, deadline: float) -> None:
    path = "/api/hubs/healthy/users/h/:send"
    async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}", timeout=10) as http:
        while trio.current_time() < deadline:
            try:
                answer = await http.post(f"{path}?{API}",
                                         json={"target": "seq", "arguments": [stream.sent]},
                                         headers={"Authorization": f"Bearer {token(path)}"})
            except httpx.TransportError as exc:
                stream.errors.append(f"send {stream.sent}: {exc!r}")
                return
            if answer.status_code != 202:
                stream.errors.append(f"send {stream.sent}: {answer.status_code} {answer.text}")
                return
            stream.sent += 1
            await trio.sleep(0.01)


async def watch_log(log_path: Path, journal: Journal, found: list[dict[str, Any]]) -> None:
    """Each traceback the relay writes, with the inputs of the second before it."""
    seen = 0
    while True:
        text = log_path.read_text(errors="replace")
        while (at := text.find("Traceback", seen)) >= 0:
            seen = at + 1
            found.append({"log_excerpt": text[max(0, at - 300):at + 3000],
                          "suspects": journal.since(time.monotonic() - 1.0)})
        await trio.sleep(0.2)


async def run(seconds: float, concurrency: int, seed: int, artifacts: Path) -> dict[str, Any]:
    port = free_port()
    rng = random.Random(seed)
    seeds = load_seeds()
    journal = Journal()
    tracebacks: list[dict[str, Any]] = []
    stream = Stream()
    log_file = tempfile.NamedTemporaryFile(prefix="relay-e2e-fuzz-", suffix=".log", delete=False)
    log_path = Path(log_file.name)
    command = [sys.executable, "-m", "relaycore", "serve", "--host", HOST, "--port", str(port),
               f"--access-key={KEY}"]
    process = await trio.lowlevel.open_process(command, stdout=log_file, stderr=subprocess.STDOUT)
    crashed_with: int | None = None
    started = time.monotonic()
    try:
        async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}") as http:
            with trio.fail_after(30):
                while True:
                    try:
                        if (await http.get("/api/health")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if process.returncode is not None:
                        raise RuntimeError(f"the relay did not start:\n{log_path.read_text()}")
                    await trio.sleep(0.05)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_log, log_path, journal, tracebacks)
            connected = trio.Event()
            await nursery.start(healthy_client, port, stream, connected)
            deadline = trio.current_time() + seconds
            async with trio.open_nursery() as workers:
                workers.start_soon(sender, port, stream, deadline)
                for _ in range(concurrency):
                    workers.start_soon(fuzz_task, port, random.Random(rng.random()), seeds,
                                       journal, deadline, process)
            # Everything sent is on its way: wait for the stream to be complete.
            with trio.move_on_after(10):
                while len(stream.received) < stream.sent and not stream.errors:
                    await trio.sleep(0.05)
            await trio.sleep(0.5)  # the last tracebacks reach the log
            nursery.cancel_scope.cancel()
        if process.returncode is not None:
            crashed_with = process.returncode
        else:
            process.send_signal(signal.SIGTERM)
            with trio.move_on_after(20):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
                crashed_with = -9
            elif process.returncode != 0:
                crashed_with = process.returncode
    finally:
        if process.returncode is None:
            process.kill()
        log_file.close()
    log = log_path.read_text(errors="replace")
    complete = stream.received == list(range(stream.sent)) and not stream.errors
    artifacts.mkdir(parents=True, exist_ok=True)
    for n, found in enumerate(tracebacks):
        (artifacts / f"e2e-traceback-{seed}-{n}.json").write_text(json.dumps(found, indent=1))
    return {
        "seconds": round(time.monotonic() - started, 1),
        "seed": seed,
        "inputs": sum(journal.sent.values()),
        "inputs_by_kind": dict(sorted(journal.sent.items())),
        "refused_upgrades": journal.refused_upgrades,
        "relay_crashes": 0 if crashed_with is None else 1,
        "relay_exit_status": process.returncode,
        "tracebacks": log.count("Traceback"),
        "traceback_endings": sorted(Counter(traceback_endings(log)).items()),
        "error_lines": sum(1 for line in log.splitlines() if " ERROR " in line),
        "stream_sent": stream.sent,
        "stream_received": len(stream.received),
        "stream_complete_in_order": complete,
        "stream_errors": stream.errors,
        "relay_log": str(log_path),
    }


def traceback_endings(log: str) -> list[str]:
    """The exception line that ends each traceback in ``log`` (of a chained one, the last)."""
    endings = []
    lines = log.splitlines()
    for n, line in enumerate(lines):
        if not line.startswith("Traceback"):
            continue
        end = next((i for i in range(n + 1, len(lines)) if lines[i]
                    and not lines[i][0].isspace() and not lines[i].startswith("Traceback")), None)
        if end is None:
            continue
        following = next((lines[i] for i in range(end + 1, len(lines)) if lines[i]), "")
        if not following.startswith(("During handling", "The above exception")):
            endings.append(lines[end][:300])
    return endings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(4), "big"))
    parser.add_argument("--json", default="", help="also write the report to this file")
    parser.add_argument("--artifacts", default=str(HERE / "artifacts"))
    args = parser.parse_args(argv)
    report = trio.run(run, args.seconds, args.concurrency, args.seed, Path(args.artifacts))
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    ok = (report["relay_crashes"] == 0 and report["tracebacks"] == 0
          and report["stream_complete_in_order"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
