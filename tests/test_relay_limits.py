"""What a peer can make the relay hold before the WebSocket upgrade is bounded: time per
request (slowloris), HTTP connections at once, sockets at once, and file descriptors."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time

import pytest
import trio

from relaycore.relay import OutboundMessage, RelayConfig, serve_relay
from relayhelpers import KEY, client_token, wait_for

HEALTH = b"GET /api/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


async def read_all(stream: trio.SocketStream, timeout: float = 5) -> bytes:
    received = bytearray()
    with trio.fail_after(timeout):
        while chunk := await stream.receive_some(65536):
            received += chunk
    return bytes(received)


async def health(port: int) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(HEALTH)
    answer = await read_all(stream)
    await stream.aclose()
    return answer


async def test_a_slow_sender_gets_408_and_an_idle_connection_is_closed(nursery):
    relay = await nursery.start(serve_relay, RelayConfig(port=0, access_keys=[KEY],
                                                         request_timeout=0.5))
    slow = await trio.open_tcp_stream("127.0.0.1", relay.port)
    idle = await trio.open_tcp_stream("127.0.0.1", relay.port)
    await slow.send_all(b"GET /api/health HTTP/1.1\r\nHo")  # ... and nothing more
    answer = await read_all(slow)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert "0.5 seconds" in json.loads(answer.split(b"\r\n\r\n", 1)[1])["message"]
    assert await read_all(idle) == b""  # closed without a word: it asked nothing
    assert relay.stats.request_timeouts == 2
    assert (await health(relay.port)).startswith(b"HTTP/1.1 200 ")
    await slow.aclose()
    await idle.aclose()


async def test_many_silent_connections_make_room_for_new_clients(nursery, connect):
    relay = await nursery.start(serve_relay, RelayConfig(port=0, access_keys=[KEY],
                                                         max_http_connections=20))
    silent = []
    for _ in range(60):
        silent.append(await trio.open_tcp_stream("127.0.0.1", relay.port))
        await silent[-1].send_all(b"GET / HTTP/1.1\r\n")  # a head that never ends
    await wait_for(lambda: relay.stats.http_evictions >= 40)
    assert len(relay.front._http) <= 20
    # New clients and health checks are served all the same.
    assert (await health(relay.port)).startswith(b"HTTP/1.1 200 ")
    client = await connect(relay, "chat", "alice")
    assert await relay.send_to_user("chat", "alice", OutboundMessage.invocation("n", 1)) == 1
    with trio.fail_after(3):
        assert (await client.next_message())["arguments"] == [1]
    for stream in silent:
        await stream.aclose()


async def test_past_max_connections_an_upgrade_is_a_503_but_health_is_answered(nursery, connect):
    relay = await nursery.start(serve_relay, RelayConfig(port=0, access_keys=[KEY],
                                                         max_connections=3))
    for user in ("a", "b", "c"):
        await connect(relay, "chat", user)
    stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
    await stream.send_all(
        (f"GET /client/?hub=chat&access_token={client_token('chat', 'd')} HTTP/1.1\r\n"
         "Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
         ).encode())
    answer = await read_all(stream)
    await stream.aclose()
    assert answer.startswith(b"HTTP/1.1 503 ")
    assert "limit of 3 connections" in json.loads(answer.split(b"\r\n\r\n", 1)[1])["message"]
    assert relay.stats.connections_refused == 1
    assert (await health(relay.port)).startswith(b"HTTP/1.1 200 ")


def test_out_of_file_descriptors_the_relay_refuses_with_503_and_logs_once(tmp_path):
    """A relay process whose open-file limit is tiny: the excess connections are answered 503
    at once (the spare descriptor), one log line reports it, and no traceback is written."""
    env = {**os.environ, "RELAYCORE_MAX_CONNECTIONS": "100000"}

    def tiny_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    stderr = tmp_path / "stderr"
    with open(stderr, "w") as err:
        relay = subprocess.Popen(
            [sys.executable, "-m", "relaycore", "serve", "--port", str(port), "--access-key",
             KEY], stdout=subprocess.PIPE, stderr=err, text=True, env=env,
            preexec_fn=tiny_limit)
    held: list[socket.socket] = []
    try:
        line = relay.stdout.readline()
        assert "listening on" in line, line
        refused = 0
        deadline = time.monotonic() + 30
        while refused < 5 and time.monotonic() < deadline:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            held.append(s)
            s.settimeout(0.05)
            try:
                data = s.recv(65536)
            except TimeoutError:
                continue  # accepted and waiting for its request: it holds a descriptor
            if data.startswith(b"HTTP/1.1 503 "):
                assert b"out of file descriptors" in data
                refused += 1
        assert refused == 5
        for s in held:
            s.close()
        held.clear()
        # Descriptors are back: served again.
        deadline = time.monotonic() + 10
        while True:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(HEALTH)
                if s.recv(65536).startswith(b"HTTP/1.1 200 "):
                    break
            assert time.monotonic() < deadline
    finally:
        for s in held:
            s.close()
        relay.send_signal(signal.SIGINT)
        relay.wait(timeout=10)
        relay.stdout.close()
    log = stderr.read_text()
    assert "Traceback" not in log
    assert log.count("out of file descriptors") == 1, log


@pytest.mark.skipif(resource.getrlimit(resource.RLIMIT_NOFILE)[1] <= 256,
                    reason="the hard open-file limit leaves nothing to raise")
def test_serve_raises_its_open_file_limit_to_the_hard_limit_and_says_so():
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    relay = subprocess.Popen([sys.executable, "-m", "relaycore", "serve", "--port", str(port)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=low_soft_limit)
    try:
        lines = [relay.stdout.readline() for _ in range(3)]
    finally:
        relay.send_signal(signal.SIGINT)
        relay.communicate(timeout=10)
    shown = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    assert f"open files: 256 -> {shown}" in "".join(lines), lines


async def test_a_busy_keep_alive_connection_is_not_taken_for_a_slow_one(nursery):
    relay = await nursery.start(serve_relay, RelayConfig(port=0, access_keys=[KEY],
                                                         max_http_connections=10))
    busy = await trio.open_tcp_stream("127.0.0.1", relay.port)  # the oldest connection
    silent = []

    async def ask() -> None:
        await busy.send_all(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in answer:
                chunk = await busy.receive_some(4096)
                assert chunk, "the relay closed a keep-alive connection that was in use"
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 ")

    await ask()
    for n in range(40):
        silent.append(await trio.open_tcp_stream("127.0.0.1", relay.port))
        await silent[-1].send_all(b"GET / HTTP/1.1\r\n")
        if n % 5 == 4:
            await wait_for(lambda: len(relay.front._http) <= 10)
            await ask()
    assert relay.stats.http_evictions >= 30
    for stream in [busy, *silent]:
        await stream.aclose()
