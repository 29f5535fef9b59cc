"""A private ``redis-server`` for the backplane's tests: started in the test's temporary folder,
killed and started again at will, never the machine's shared Redis.

It listens on a Unix socket (the same path after a restart, so clients find it again), and on
a free TCP port when asked. Nothing is saved to disk: a restart comes back empty, as a Redis
without persistence does after a crash.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server")

#: Skips without redis-server, except under CI (which installs it), where the test then fails.
needs_redis = pytest.mark.skipif(
    REDIS_SERVER is None and not os.environ.get("CI"),
    reason="redis-server is not installed (Debian: apt-get install redis-server; .ci/run "
           "installs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    def __init__(self, folder: Path, *, tcp: bool = False) -> None:
        self.folder = folder
        self.socket_path = str(folder / "redis.sock")
        self.port = free_port() if tcp else 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"unix://{self.socket_path}"

    def start(self, *extra: str) -> RedisServer:
        assert REDIS_SERVER is not None, "redis-server is not installed"
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
             "--unixsocket", self.socket_path, "--save", "", "--appendonly", "no",
             "--dir", str(self.folder), "--loglevel", "warning", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self._answers():
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start in 10 s")
            time.sleep(0.01)
        return self

    def _answers(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(1)
                s.connect(self.socket_path)
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """One command over a plain socket; the raw reply (for checks from a test)."""
        request = b"".join(
            [f"*{len(args)}\r\n".encode()]
            + [f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args])
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(self.socket_path)
            s.sendall(request)
            return s.recv(65536)

    def kill(self) -> None:
        """SIGKILL: no goodbye to the clients, nothing saved."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None
