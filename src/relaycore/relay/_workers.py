"""Several worker processes on one port: ``python -m relaycore serve --workers N``.

One relay process runs on one core (trio, one thread). To use every core of a machine, the
command starts N workers, each a ``python -m relaycore serve`` node of one cluster, and each
binds its own listener to the same port with ``SO_REUSEPORT``: the kernel spreads new TCP
connections over the workers, and each worker accepts and holds its own sockets (no socket is
passed between processes, no process sits on the data path). The workers are one endpoint
through Redis, as nodes on several machines are (docs/cluster.md): the ``--redis`` given, or
else a private ``redis-server`` that the command starts on a Unix socket in a temporary folder
and stops when it ends. A negotiate and the connection that follows may land on different
workers: the negotiated token is signed and any worker accepts it (``_negotiated``).

The supervisor (this module, run by the command) holds a socket bound to the port, without
listening, from start to end: it reserves the port (``--port 0`` picks one for every worker)
and keeps it while a worker restarts. A worker that dies is started again (at once, then
after a growing pause if it keeps dying within seconds); a worker that fails before it has
ever listened stops the command (a bad setting would fail every time). Each worker's output is
the supervisor's, each line prefixed with ``[worker i]``. SIGINT or SIGTERM to the supervisor
is passed to every worker, which drains; then the private Redis stops (each runs in a session
of its own, so that a terminal's Ctrl-C reaches the supervisor alone, which stops them in
order). A worker reads its
stdin, a pipe from the supervisor, and drains when it ends: a supervisor killed outright does
not leave workers behind, nor (on Linux) its private Redis.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import trio

#: What ``--workers`` accepts besides a count: one worker per core.
AUTO = ("auto", "0")
#: The listen backlog of each worker (the kernel caps it at ``net.core.somaxconn``).
_BACKLOG = 65535
#: The pause before a worker that died is started again, doubled while it keeps dying soon.
_FIRST_PAUSE, _LONGEST_PAUSE, _SOON = 0.1, 5.0, 10.0


def worker_count(text: str) -> int:
    """``--workers``'s count: a positive number, or ``auto`` (or 0) for the usable cores."""
    if text.strip().lower() in AUTO:
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            return os.cpu_count() or 1
    count = int(text)
    if count < 1:
        raise ValueError(f"{count} is not a number of workers (1 or more, or auto)")
    return count


#: an address to listen on: family, socket type, protocol, socket address
_Address = tuple[int, int, int, Any]


def _addresses(host: str, port: int) -> list[_Address]:
    """Where to listen: every address ``host`` names (all of them when empty), once each."""
    found = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    unique: dict[Any, _Address] = {}
    for family, kind, proto, _name, address in found:
        unique.setdefault(address, (family, kind, proto, address))
    return list(unique.values())


def _shared_socket(family: int, kind: int, proto: int) -> socket.socket:
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    return sock


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with ``SO_REUSEPORT``, not listening: it keeps the
    port for the workers (its number, when ``port`` is 0) and takes no connection."""
    family, kind, proto, address = _addresses(host, port)[0]
    sock = _shared_socket(family, kind, proto)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


async def reuse_port_listeners(host: str, port: int) -> list[trio.SocketListener]:
    """Listeners on ``host:port`` that other processes may share (``SO_REUSEPORT``): what
    each worker accepts on."""
    listeners: list[trio.SocketListener] = []
    try:
        for family, kind, proto, address in _addresses(host, port):
            sock = trio.socket.from_stdlib_socket(_shared_socket(family, kind, proto))
            try:
                await sock.bind(address)
                sock.listen(_BACKLOG)
            except OSError:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
    except OSError:
        for listener in listeners:
            await listener.aclose()
        raise
    return listeners


async def watch_supervisor() -> None:
    """In a worker: return when the supervisor is gone (the worker's stdin, a pipe from it,
    ends)."""
    stream = trio.lowlevel.FdStream(os.dup(0))
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        while await stream.receive_some(4096):
            pass
    await stream.aclose()


def _die_with_parent() -> None:
    """In a child, before it runs its program: be sent SIGTERM when the parent dies (Linux's
    ``PR_SET_PDEATHSIG``; elsewhere nothing), so that a supervisor killed outright does not
    leave its private Redis behind."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class PrivateRedis:
    """A ``redis-server`` of this command alone: a Unix socket in a temporary folder, nothing
    saved; stopped, and its folder removed, when the command ends."""

    def __init__(self, server: str) -> None:
        self.server = server
        self.folder = tempfile.mkdtemp(prefix="relaycore-redis-")
        self.path = os.path.join(self.folder, "redis.sock")
        self.url = f"unix://{self.path}"
        self.process: trio.Process | None = None

    async def start(self, timeout: float = 10.0) -> None:
        self.process = await trio.lowlevel.open_process(
            [self.server, "--port", "0", "--unixsocket", self.path, "--unixsocketperm", "700",
             "--save", "", "--appendonly", "no", "--dir", self.folder, "--loglevel", "warning"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=_die_with_parent)
        with trio.fail_after(timeout):
            while not await self._answers():
                if self.process.returncode is not None:
                    raise RuntimeError(f"redis-server exited with {self.process.returncode}")
                await trio.sleep(0.02)

    async def _answers(self) -> bool:
        try:
            stream = await trio.open_unix_socket(self.path)
        except OSError:
            return False
        async with stream:
            await stream.send_all(b"PING\r\n")
            return (await stream.receive_some(16)).startswith(b"+PONG")

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            with trio.move_on_after(5):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


class Supervisor:
    """Starts ``count`` workers (``command`` each), starts again one that dies, and stops them
    all on SIGINT or SIGTERM (see the module's docstring)."""

    def __init__(self, command: Sequence[str], count: int, say: Callable[[str], None]) -> None:
        self.command = list(command)
        self.count = count
        self.say = say
        self.processes: dict[int, trio.Process] = {}
        self.listening: set[int] = set()
        self.stopping = False
        #: why the command ends unsuccessfully (a worker that never started), if it does
        self.failure: str | None = None
        self._all_listening = trio.Event()
        #: what waits for every worker to listen (a stop ends the wait)
        self._waiting = trio.CancelScope()

    async def run(self, ready: Callable[[], None]) -> int:
        """Run until a signal (0) or a worker that cannot start (2); ``ready`` is called once
        every worker listens."""
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stop_on, signals)
                async with trio.open_nursery() as workers:
                    for index in range(1, self.count + 1):
                        workers.start_soon(self._keep_running, index)
                    with self._waiting:
                        await self._all_listening.wait()
                        ready()
                nursery.cancel_scope.cancel()
        return 2 if self.failure else 0

    async def _stop_on(self, signals: AsyncIterator[int]) -> None:
        async for _ in signals:
            self.stop()

    def stop(self) -> None:
        """Ask every worker to drain and end; none is started again."""
        if self.stopping:
            return
        self.stopping = True
        self._waiting.cancel()
        for process in self.processes.values():
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)

    async def _keep_running(self, index: int) -> None:
        pause = _FIRST_PAUSE
        while not self.stopping:
            started = trio.current_time()
            process = await trio.lowlevel.open_process(
                self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, start_new_session=True)
            self.processes[index] = process
            if self.stopping:  # a signal while it was being started
                process.send_signal(signal.SIGTERM)
            self.say(f"relaycore: worker {index} started (pid {process.pid})")
            assert process.stdout is not None
            await self._relay_output(index, process.stdout)
            status = await process.wait()
            if process.stdin is not None:
                await process.stdin.aclose()
            if self.stopping:
                if status != 0:
                    self.say(f"relaycore: worker {index} exited with status {status}")
                return
            if index not in self.listening:
                self.failure = f"worker {index} exited with status {status} before it listened"
                self.say(f"relaycore: {self.failure}; stopping")
                self.stop()
                return
            self.say(f"relaycore: worker {index} (pid {process.pid}) exited with status "
                     f"{status}; starting it again")
            if trio.current_time() - started > _SOON:
                pause = _FIRST_PAUSE
            await trio.sleep(pause)
            pause = min(pause * 2, _LONGEST_PAUSE)

    async def _relay_output(self, index: int, stream: trio.abc.ReceiveStream) -> None:
        """Print the worker's lines as the supervisor's, until its output ends."""
        pending = b""
        prefix = f"[worker {index}] "
        while chunk := await stream.receive_some(65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                line = raw.decode("utf-8", "replace").rstrip("\r")
                self.say(prefix + line)
                if index not in self.listening and " listening on " in line:
                    self.listening.add(index)
                    if len(self.listening) == self.count:
                        self._all_listening.set()
        if pending:
            self.say(prefix + pending.decode("utf-8", "replace"))


def worker_command(argv: Sequence[str], port: int, redis: str) -> list[str]:
    """A worker's command: the supervisor's own arguments, then what makes it a worker (the
    last occurrence of an option wins)."""
    return [sys.executable, "-m", "relaycore", *argv, "--worker", "--port", str(port),
            "--redis", redis]
