"""The open-loop generator: connections, a constant offered rate, deliveries and latency.

Every message the generator sends is a text ``@B{step:03d}{t_us:015d}~xxxx...`` of the chosen
payload size, where ``t_us`` is the time (``perf_counter``, microseconds) at which the open-loop
schedule said it should leave, not when it actually left: a generator that falls behind shows
up as latency, not as a gentler load (no coordinated omission). Whatever envelope a server puts
around it (a SignalR invocation, a Socket.IO event, nothing), the receiving connection finds the
marker ``@B{step}`` in the first bytes of a frame: one delivery of this step. Frames of an
earlier step (late stragglers) are counted apart and never credited to the current one.

One connection in ``sample_every`` also records latency, two of them per delivery:

* the latency (``p50_ms``/``p99_ms``/``max_ms``): when the bytes arrived at that client's socket
  (the kernel's receive time, ``SO_TIMESTAMPNS``; these connections are
  ``wsclient.StampedConnection``) minus the due time. This is what a client that reads its one
  socket at once would see.
* the read latency (``read_p50_ms``/``read_p99_ms``): when this process's callback saw the frame
  minus the due time. One process holding a thousand subscribers reads them one after the other
  per broadcast; kept to show how much of the latency is the generator's own read-out (measured
  here: under 0.3 ms at 10 broadcasts/s, 2-4 ms at 50-100, as the server's write-out of the
  same broadcast takes longer than the generator's read-out on its own core).

Where the kernel gives no receive time (not Linux) both are the read latency, and
``latency_clock`` says so.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from .wsclient import SourceAddresses, open_connection

_perf_ns = time.perf_counter_ns
MARK = b"@B"
MARK_SCAN = 160  # the marker sits in the first bytes of a frame, after the envelope


def now_us() -> int:
    return _perf_ns() // 1000


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process (all its threads) from ``/proc``: what it ran
    itself and what the kernel did for it (system calls; on loopback, also the receiving
    side's TCP work, done on the sender's core)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads) from ``/proc``."""
    return sum(cpu_split(pid))


_OWN_PID = os.getpid()


def foreign_cpu(exclude: set[int]) -> dict[int, int]:
    """CPU ticks used so far by each process of the machine but ``exclude`` and this one: the
    other work sharing the two cores (other people's test runs), which a step's figures must be
    read against. ``foreign_cpu_seconds(before, after)`` turns two snapshots into seconds."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        if pid == _OWN_PID or pid in exclude:
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        out[pid] = int(fields[11]) + int(fields[12])
    return out


def foreign_cpu_seconds(before: dict[int, int], after: dict[int, int]) -> float:
    ticks = sum(max(0, t - before.get(pid, 0)) for pid, t in after.items())
    return ticks / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Meter:
    """The sink of every measured connection: counts deliveries of the current step."""

    def __init__(self, adapter: Any) -> None:
        self.adapter = adapter
        self.step = 0
        self.marker = MARK + b"000"
        self.count = 0
        self.stale = 0
        self.frames = 0
        #: µs from due time to socket arrival (read time where a frame came without a stamp)
        self.latencies: list[int] = []
        #: µs from due time to this process's callback (includes the generator's read-out)
        self.read_latencies: list[int] = []
        self.stamped = 0  # how many of ``latencies`` are socket arrival times
        self.closed = 0

    def begin(self, step: int) -> None:
        self.step = step
        self.marker = MARK + b"%03d" % (step % 1000)
        self.count = 0
        self.stale = 0
        self.latencies = []
        self.read_latencies = []
        self.stamped = 0

    def on_frame(self, conn: Any, payload: bytes) -> None:
        self.frames += 1
        i = payload.find(self.marker, 0, MARK_SCAN)
        if i >= 0:
            self.count += 1
            if conn.sampled:
                due = int(payload[i + 5:i + 20])
                read = _perf_ns() // 1000 - due
                self.read_latencies.append(read)
                arrival = conn.arrival_ns
                if arrival is None:
                    self.latencies.append(read)
                else:
                    self.latencies.append(arrival // 1000 - due)
                    self.stamped += 1
            return
        if payload.find(MARK, 0, MARK_SCAN) >= 0:
            self.stale += 1
            return
        self.adapter.on_other(conn, payload)

    def on_closed(self, conn: Any) -> None:
        self.closed += 1
        self.adapter.on_closed(conn)


class QuietSink:
    """The sink of connections that are not measured (churn): handshakes and pings only."""

    def __init__(self, adapter: Any) -> None:
        self.adapter = adapter

    def on_frame(self, conn: Any, payload: bytes) -> None:
        if payload.find(MARK, 0, MARK_SCAN) < 0:
            self.adapter.on_other(conn, payload)

    def on_closed(self, conn: Any) -> None:
        self.adapter.on_closed(conn)


def message_text(step: int, due_us: int, size: int) -> str:
    head = f"@B{step % 1000:03d}{due_us:015d}~"
    return head + "x" * max(0, size - len(head))


def percentile(sorted_values: list[int], p: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(p * len(sorted_values)))] / 1000.0


ARRIVAL_CLOCK = "socket arrival (SO_TIMESTAMPNS)"
READ_CLOCK = "generator read"


def latency_clock(stamped: int, samples: int) -> str | None:
    """What a step's ``p50_ms``/``p99_ms``/``max_ms`` were measured at."""
    if not samples:
        return None
    if stamped == samples:
        return ARRIVAL_CLOCK
    if not stamped:
        return READ_CLOCK
    return f"{ARRIVAL_CLOCK} for {stamped} of {samples} samples, {READ_CLOCK} for the rest"


async def _schedule(send: Callable[[int, str], None], rate: float, count: int, step: int,
                    start_us: int, payload: int) -> float:
    """The open-loop schedule: message ``i`` is due at ``start + i / rate``; whatever is due is
    sent at once. Returns how late (s) the most overdue message left."""
    start = start_us / 1e6
    sent = 0
    behind_max = 0.0
    while sent < count:
        now = time.perf_counter()
        due = min(count, int((now - start) * rate) + 1) if now >= start else 0
        if due > sent:
            behind_max = max(behind_max, now - (start + sent / rate))
        while sent < due:
            send(sent, message_text(step, start_us + int(sent * 1e6 / rate), payload))
            sent += 1
        delay = start + sent / rate - time.perf_counter()
        if sent < count:
            await asyncio.sleep(max(delay, 0.001))  # libuv timers tick in whole ms
    return behind_max


class PublisherThread:
    """A second event loop, in its own thread, for the publisher: the main loop spends whole
    milliseconds reading a burst of a thousand sockets, and a publish timer on that loop would
    leave late (a generator artefact the latency would show). With a short GIL switch interval
    the publisher thread gets the interpreter within ~0.2 ms of its timer."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop
        ready = threading.Event()

        def main() -> None:
            try:
                import uvloop
                self.loop = uvloop.new_event_loop()
            except ImportError:
                self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            ready.set()
            self.loop.run_forever()

        self._thread = threading.Thread(target=main, name="publisher", daemon=True)
        self._thread.start()
        ready.wait()
        self._old_interval = sys.getswitchinterval()
        sys.setswitchinterval(0.0002)

    async def run(self, coro: Any) -> Any:
        """Run ``coro`` on the publisher loop and wait for it from the caller's loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def close(self) -> None:
        sys.setswitchinterval(self._old_interval)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


class Generator:
    """Holds the measured connections to one target and runs open-loop steps against it."""

    def __init__(self, adapter: Any, port: int, *, backend: str, host: str = "127.0.0.1",
                 sources: SourceAddresses | None = None) -> None:
        self.adapter = adapter
        self.host = host
        self.port = port
        self.backend = backend
        self.sources = sources or SourceAddresses()
        self.meter = Meter(adapter)
        self.quiet = QuietSink(adapter)
        self.conns: list[Any] = []
        self._step = 0
        self._keepalive: asyncio.Task[None] | None = None

    # -- connections ---------------------------------------------------------------------------

    async def open_one(self, *, room: str | None = None, user: str | None = None,
                       sampled: bool = False, measured: bool = True) -> Any:
        path, headers = self.adapter.sub_path(room=room, user=user)
        conn = await open_connection(self.backend, self.meter if measured else self.quiet,
                                     self.host, self.port, path, source=self.sources(),
                                     sampled=sampled, headers=headers)
        await self.adapter.after_open(conn)
        return conn

    async def connect(self, count: int, *, room_of: Callable[[int], str | None] | None = None,
                      user_of: Callable[[int], str | None] | None = None,
                      sample_every: int = 10, concurrency: int = 64,
                      timeout: float = 300.0) -> list[Any]:
        """Open ``count`` more measured connections, ``concurrency`` at a time."""
        start = len(self.conns)
        conns: list[Any] = [None] * count
        next_index = 0

        async def worker() -> None:
            nonlocal next_index
            while next_index < count:
                i = next_index
                next_index += 1
                n = start + i
                for attempt in range(5):
                    try:
                        conns[i] = await self.open_one(
                            room=room_of(n) if room_of else None,
                            user=user_of(n) if user_of else None,
                            sampled=n % sample_every == 0)
                        break
                    except (OSError, ConnectionError, asyncio.TimeoutError):
                        if attempt == 4:
                            raise
                        await asyncio.sleep(0.2 * (attempt + 1))

        await asyncio.wait_for(
            asyncio.gather(*(worker() for _ in range(min(concurrency, count)))), timeout)
        self.conns.extend(conns)
        if self._keepalive is None and self.adapter.needs_keepalive:
            self._keepalive = asyncio.get_running_loop().create_task(self._keep_alive())
        return conns

    async def _keep_alive(self) -> None:
        """Send each connection the adapter's keep-alive every ``keepalive_interval`` seconds,
        spread evenly over the interval."""
        interval = self.adapter.keepalive_interval
        slices = 20
        k = 0
        while True:
            await asyncio.sleep(interval / slices)
            conns = self.conns
            for conn in conns[k % slices::slices]:
                if not conn.closed:
                    self.adapter.keepalive(conn)
            k += 1

    async def close_from(self, index: int) -> None:
        """Abort the connections from ``index`` on (the newest ones) and keep the others."""
        for conn in self.conns[index:]:
            conn.abort()
        del self.conns[index:]
        await asyncio.sleep(0.05)

    async def close_all(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        await self.close_from(0)

    # -- steps ---------------------------------------------------------------------------------

    def new_step(self) -> int:
        self._step += 1
        return self._step

    async def run_step(self, send: Callable[[int, str], None], *, rate: float, duration: float,
                       payload: int, recipients: int, target_pid: int, grace: float = 3.0,
                       label: dict[str, Any] | None = None,
                       during: Callable[[], Any] | None = None,
                       thread: PublisherThread | None = None,
                       companions: dict[str, int] | None = None) -> dict[str, Any]:
        """Send ``rate * duration`` messages on an open-loop schedule, each reaching
        ``recipients`` measured connections; wait up to ``grace`` s for the stragglers.
        ``companions`` names other processes of the target (S1's app server) whose CPU is
        measured over the same interval (``{name}_cpu_s`` ...) and not counted as foreign."""
        companions = companions or {}
        ours = {target_pid, *companions.values()}
        step = self.new_step()
        meter = self.meter
        meter.begin(step)
        # The cyclic collector's full passes over 15k connections' objects stall the loop for
        # tens of ms (seen as p99); collect now, freeze what lives on, and pause it for the step.
        gc.collect()
        gc.freeze()
        gc.disable()
        count = max(1, int(rate * duration))
        expected = count * recipients
        loop = asyncio.get_running_loop()
        side = loop.create_task(during()) if during is not None else None
        (tuser0, tsys0), gcpu0 = cpu_split(target_pid), time.process_time()
        side0 = {name: cpu_split(pid) for name, pid in companions.items()}
        fcpu0 = foreign_cpu(ours)
        start_us = now_us() + 2000
        start = start_us / 1e6
        schedule = _schedule(send, rate, count, step, start_us, payload)
        behind_max = await (thread.run(schedule) if thread is not None else schedule)
        sent_end = time.perf_counter()
        deadline = sent_end + grace
        while meter.count < expected and time.perf_counter() < deadline:
            await asyncio.sleep(0.002)
        done = time.perf_counter()
        delivered = meter.count
        tuser, tsys = cpu_split(target_pid)
        side1 = {name: cpu_split(pid) for name, pid in companions.items()}
        tuser, tsys = tuser - tuser0, tsys - tsys0
        tcpu = tuser + tsys
        gcpu = time.process_time() - gcpu0
        fcpu = foreign_cpu_seconds(fcpu0, foreign_cpu(ours))
        elapsed = max(done - start, duration)
        latencies = sorted(meter.latencies)
        read_latencies = sorted(meter.read_latencies)
        clock = latency_clock(meter.stamped, len(latencies))
        if side is not None:
            side.cancel()
            try:
                await side
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - reported by its owner
                pass
        # let stragglers of this step drain before the next one starts
        quiet_since, frames = time.perf_counter(), meter.frames
        while time.perf_counter() - quiet_since < 0.25 and time.perf_counter() - done < 10:
            await asyncio.sleep(0.05)
            if meter.frames != frames:
                quiet_since, frames = time.perf_counter(), meter.frames
        gc.enable()
        gen_cpu = 100 * gcpu / (done - start)
        side: dict[str, Any] = {}
        for name in companions:
            user, system = (side1[name][i] - side0[name][i] for i in (0, 1))
            side[f"{name}_cpu_s"] = user + system
            side[f"{name}_user_cpu_s"] = user
            side[f"{name}_system_cpu_s"] = system
            side[f"{name}_cpu_percent"] = 100 * (user + system) / elapsed
            side[f"{name}_cpu_s_per_1M_deliveries"] = ((user + system) / delivered * 1e6
                                                       if delivered else None)
        return {
            **(label or {}),
            "offered_msgs_per_s": rate,
            "offered_deliveries_per_s": rate * recipients,
            "messages": count,
            "expected": expected,
            "delivered": delivered,
            "delivered_per_s": delivered / elapsed,
            "reach": delivered / expected,
            "late_after_grace": meter.count - delivered,
            "p50_ms": percentile(latencies, 0.50),
            "p99_ms": percentile(latencies, 0.99),
            "max_ms": latencies[-1] / 1000.0 if latencies else None,
            "latency_samples": len(latencies),
            "latency_clock": clock,
            "read_p50_ms": percentile(read_latencies, 0.50),
            "read_p99_ms": percentile(read_latencies, 0.99),
            "read_max_ms": read_latencies[-1] / 1000.0 if read_latencies else None,
            "publisher_behind_max_ms": behind_max * 1000,
            "target_cpu_s": tcpu,
            "target_cpu_percent": 100 * tcpu / elapsed,
            "target_cpu_s_per_1M_deliveries": tcpu / delivered * 1e6 if delivered else None,
            "target_user_cpu_s": tuser,
            "target_system_cpu_s": tsys,
            "target_rss_bytes": rss_bytes(target_pid),
            "generator_cpu_percent": gen_cpu,
            "generator_bound": gen_cpu > 80.0,
            "foreign_cpu_percent": 100 * fcpu / (done - start),
            **side,
        }
