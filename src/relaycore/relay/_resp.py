"""A small Redis client on trio, for the backplane: RESP2 parsed by ``hiredis.Reader``.

Theory of operation
-------------------
The backplane needs two things of Redis, and this module gives each its own connection:

* ``RedisCommands``: one **auto-pipelined** connection for every command, PUBLISH first among
  them. ``send`` packs a command into the connection's buffer and returns at once (it never
  awaits: the relay's operations are synchronous); one writer task writes whatever has
  gathered in one ``send_all`` each time it runs, so the commands of one scheduler round go
  out as one batch, as the flusher writes the clients' buffers. Replies come back in order and
  go to each command's handler (or to the task awaiting ``call``, for control commands).
* ``RedisSubscriber``: the SUBSCRIBE connection. It keeps the set of channels it should be
  subscribed to, so that a new connection subscribes them all again; ``barrier`` answers once
  Redis has processed every (un)subscription sent before it (a PING answered in subscribed
  mode), which is how a node knows a subscription is in force.

Both reconnect on their own, with a backoff from 50 ms to 2 s, and probe an idle connection
with a PING every ``ping_interval``: one unanswered for ``ping_timeout`` means Redis (or a
proxy between) stopped talking, and the connection is dropped and opened again. While the
command connection is down, commands wait in its buffer up to ``buffer_limit`` bytes and
``buffer_time`` seconds; past either they are dropped, and each dropped command's handler is
called with ``Dropped`` so that its owner counts it. Commands that were written when the
connection broke may or may not have run: their handlers get ``RedisUnavailable``.

A handler is a callable of one argument: the reply (``bytes``, ``int``, a list, None), a
``RedisError`` for an error reply, or one of the exceptions above. It runs in the reader task
and must not block.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
import trio

log = logging.getLogger("relaycore.redis")

#: A command argument: hiredis packs bytes, str (UTF-8), int and float.
Arg = bytes | str | int | float
Handler = Callable[[Any], None]

#: Reconnection backoff: first pause, longest pause.
_BACKOFF_FIRST = 0.05
_BACKOFF_MAX = 2.0
#: Channels per SUBSCRIBE command when a whole set is subscribed again.
_SUBSCRIBE_BATCH = 500


class RedisError(Exception):
    """Redis answered a command with an error reply."""


class RedisUnavailable(ConnectionError):
    """The connection was lost, or is down: the command may or may not have run."""


#: What ends one connection (and opens the next).
_BROKEN = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, hiredis.ProtocolError,
           RedisError)


class Dropped(RedisUnavailable):
    """The command waited in the buffer past its bound while Redis was unreachable; it was
    never sent."""


@dataclass(frozen=True)
class RedisAddress:
    """Where Redis is: ``redis://[[user]:password@]host[:port][/db]`` or
    ``unix://[[user]:password@]/path/to/socket[?db=N]``."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> RedisAddress:
        parts = urlsplit(url)
        user = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else None
        try:
            if parts.scheme == "redis":
                if not parts.hostname:
                    raise ValueError("no host")
                db_text = parts.path.strip("/")
                return cls(host=parts.hostname, port=parts.port or 6379,
                           db=int(db_text) if db_text else 0, username=user, password=password)
            if parts.scheme == "unix":
                if not parts.path:
                    raise ValueError("no socket path")
                db_values = parse_qs(parts.query).get("db", ["0"])
                return cls(path=parts.path, db=int(db_values[0]), username=user,
                           password=password)
        except ValueError as exc:
            raise ValueError(f"{url!r} is not a Redis URL ({exc}); expected "
                             "redis://host:port/db or unix:///path/to/socket") from None
        raise ValueError(f"{url!r} is not a Redis URL; expected redis://host:port/db or "
                         "unix:///path/to/socket")

    def __str__(self) -> str:
        where = f"unix://{self.path}" if self.path else f"redis://{self.host}:{self.port}"
        return f"{where}/{self.db}" if self.db else where

    async def connect(self) -> trio.abc.Stream:
        if self.path is not None:
            return await trio.open_unix_socket(self.path)
        return await trio.open_tcp_stream(self.host, self.port)

    def greeting(self) -> list[tuple[Arg, ...]]:
        """The commands a new connection sends first (authentication, database)."""
        commands: list[tuple[Arg, ...]] = []
        if self.password is not None:
            commands.append(("AUTH", self.username, self.password) if self.username
                            else ("AUTH", self.password))
        if self.db:
            commands.append(("SELECT", self.db))
        return commands


def pack(args: Sequence[Arg]) -> bytes:
    """One command in RESP."""
    return hiredis.pack_command(tuple(args))  # type: ignore[no-any-return]


class _Slot:
    """The reply of a command someone awaits (``call``)."""

    __slots__ = ("event", "value")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.value: Any = None

    def __call__(self, value: Any) -> None:
        self.value = value
        self.event.set()

    async def wait(self) -> Any:
        await self.event.wait()
        if isinstance(self.value, Exception):
            raise self.value
        return self.value


def _reply(value: Any) -> Any:
    """hiredis hands an error reply as a ``hiredis.ReplyError`` value: ours is RedisError."""
    if isinstance(value, hiredis.ReplyError):
        return RedisError(str(value))
    return value


def _deliver(handler: Handler | None, value: Any) -> None:
    if handler is None:
        if isinstance(value, RedisError):
            log.warning("redis refused a command: %s", value)
        return
    try:
        handler(value)
    except Exception:  # one handler's bug must not end the connection
        log.exception("a redis reply handler failed")


class _Link:
    """One connection to Redis, opened again whenever it breaks (see the module docstring)."""

    name = "redis"

    def __init__(self, address: RedisAddress | str, *, ping_interval: float = 1.0,
                 ping_timeout: float = 5.0) -> None:
        self.address = address if isinstance(address, RedisAddress) else RedisAddress.parse(
            address)
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.connected = False
        #: How many times a connection was opened, and lost.
        self.connects = 0
        self.losses = 0
        #: Packed commands not written yet, and their handlers in the same order.
        self._out = bytearray()
        self._queued: collections.deque[Handler | None] = collections.deque()
        #: Handlers of the commands written whose replies have not come yet.
        self._sent: collections.deque[Handler | None] = collections.deque()
        self._wake = trio.Event()
        self._ping_since: float | None = None
        self._up = trio.Event()
        self._said_unreachable = False

    def _queue(self, data: bytes, handler: Handler | None) -> None:
        self._out += data
        self._queued.append(handler)
        self._wake.set()

    async def wait_connected(self) -> None:
        await self._up.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Keep a connection open until cancelled; ``started`` at once (the first connection
        may take a while, or never come)."""
        task_status.started()
        pause = _BACKOFF_FIRST
        while True:
            try:
                with trio.fail_after(self.ping_timeout):
                    stream = await self.address.connect()
            except (OSError, trio.TooSlowError) as exc:
                self._waiting(exc)
                await trio.sleep(pause)
                pause = min(pause * 2, _BACKOFF_MAX)
                continue
            opened = trio.current_time()
            async with stream:
                error = await self._serve(stream)
            self._lost(error)
            if trio.current_time() - opened > _BACKOFF_MAX:
                pause = _BACKOFF_FIRST  # it had worked a while: try again soon
            await trio.sleep(pause)
            pause = min(pause * 2, _BACKOFF_MAX)

    async def _serve(self, stream: trio.abc.Stream) -> BaseException:
        """Use one connection until it breaks; returns why it ended."""
        reader = hiredis.Reader()
        ended: list[BaseException] = []

        async def until_broken(task: Callable[..., Awaitable[None]], *args: Any) -> None:
            try:
                await task(*args)
                ended.append(RedisUnavailable("Redis closed the connection"))
            except _BROKEN as exc:
                ended.append(exc)
            nursery.cancel_scope.cancel()

        try:
            await self._greet(stream, reader)
        except (*_BROKEN, trio.TooSlowError) as exc:
            return exc
        self.connected = True
        self.connects += 1
        self._said_unreachable = False
        self._up.set()
        log.info("%s connection to %s open", self.name, self.address)
        self._opened()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(until_broken, self._write, stream)
            nursery.start_soon(until_broken, self._probe)
            nursery.start_soon(until_broken, self._read, stream, reader)
        return ended[0]

    async def _greet(self, stream: trio.abc.Stream, reader: hiredis.Reader) -> None:
        greeting = self.address.greeting()
        if not greeting:
            return
        await stream.send_all(b"".join(pack(c) for c in greeting))
        left = len(greeting)
        with trio.fail_after(self.ping_timeout):
            while left:
                data = await stream.receive_some(65536)
                if not data:
                    raise RedisUnavailable("Redis closed the connection while greeting")
                reader.feed(data)
                while left and (value := reader.gets()) is not False:
                    left -= 1
                    if isinstance(value, hiredis.ReplyError):
                        raise RedisError(f"Redis refused {greeting[0][0]}: {value}")

    async def _write(self, stream: trio.abc.Stream) -> None:
        while True:
            if not self._out:
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            data, self._out = self._out, bytearray()
            self._sent.extend(self._queued)
            self._queued.clear()
            await stream.send_all(data)

    async def _read(self, stream: trio.abc.Stream, reader: hiredis.Reader) -> None:
        while True:
            data = await stream.receive_some(1 << 16)
            if not data:
                return
            reader.feed(data)
            while (value := reader.gets()) is not False:
                self._received(value)

    async def _probe(self) -> None:
        """PING when idle; a PING unanswered for ``ping_timeout`` ends the connection."""
        while True:
            await trio.sleep(self.ping_interval)
            since = self._ping_since
            if since is None:
                self._ping_since = trio.current_time()
                self._ping()
            elif trio.current_time() - since > self.ping_timeout:
                raise RedisUnavailable(f"Redis did not answer a PING in {self.ping_timeout} s")

    def _ping(self) -> None:
        """Send the probe's PING; its answer goes to ``_ponged``."""
        self._queue(pack(("PING",)), self._ponged)

    def _ponged(self, value: Any) -> None:
        self._ping_since = None

    def _received(self, value: Any) -> None:
        _deliver(self._sent.popleft(), _reply(value))

    def _opened(self) -> None:
        """A connection is open (before its tasks start)."""

    def _waiting(self, exc: BaseException) -> None:
        """A connection attempt failed; called before each pause."""
        if not self._said_unreachable:
            self._said_unreachable = True
            log.warning("%s: cannot reach Redis at %s (%s); trying again", self.name,
                        self.address, exc)

    def _lost(self, exc: BaseException) -> None:
        was = self.connected
        self.connected = False
        self._up = trio.Event()
        self._ping_since = None
        if was:
            self.losses += 1
            log.warning("%s connection to %s lost (%s); reconnecting", self.name,
                        self.address, exc or type(exc).__name__)
        failed, self._sent = self._sent, collections.deque()
        for handler in failed:
            _deliver(handler, RedisUnavailable(f"the connection to Redis was lost ({exc})"))


class RedisCommands(_Link):
    """The auto-pipelined command connection (see the module docstring)."""

    name = "redis commands"

    def __init__(self, address: RedisAddress | str, *, buffer_limit: int = 1 << 20,
                 buffer_time: float = 2.0, on_connect: Callable[[], None] | None = None,
                 ping_interval: float = 1.0, ping_timeout: float = 5.0) -> None:
        super().__init__(address, ping_interval=ping_interval, ping_timeout=ping_timeout)
        self.buffer_limit = buffer_limit
        self.buffer_time = buffer_time
        #: Called each time a connection opens, before anything is written: what the owner
        #: must say again on a new connection (Redis may have restarted empty) goes after
        #: what waited in the buffer, or before it with ``send_first``.
        self.on_connect = on_connect
        #: Since when the connection is down (None while it is up).
        self.down_since: float | None = None
        #: Commands dropped for the buffer's bound.
        self.dropped = 0

    def send(self, args: Sequence[Arg], handler: Handler | None = None) -> bool:
        """Queue one command; never awaits. False when Redis is unreachable and the buffer is
        full: the command is dropped (its handler is not called)."""
        data = pack(args)
        if not self.connected and len(self._out) + len(data) > self.buffer_limit:
            self.dropped += 1
            return False
        self._queue(data, handler)
        return True

    def send_first(self, args: Sequence[Arg], handler: Handler | None = None) -> None:
        """Queue one command ahead of what waits in the buffer: for ``on_connect``, before the
        connection writes anything."""
        self._out[0:0] = pack(args)
        self._queued.appendleft(handler)
        self._wake.set()

    def publish(self, channel: bytes, message: bytes, handler: Handler | None = None) -> bool:
        """``send`` of ``PUBLISH channel message``, packed here (the hot path's command)."""
        data = b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (
            len(channel), channel, len(message), message)
        if not self.connected and len(self._out) + len(data) > self.buffer_limit:
            self.dropped += 1
            return False
        self._out += data
        self._queued.append(handler)
        self._wake.set()
        return True

    async def call(self, *args: Arg) -> Any:
        """Send one command and wait for its reply; raises ``RedisError`` for an error reply,
        ``RedisUnavailable`` when Redis is not reachable."""
        slot = _Slot()
        if not self.send(args, slot):
            raise Dropped("Redis is unreachable and the command buffer is full")
        return await slot.wait()

    async def call_many(self, commands: Iterable[Sequence[Arg]]) -> list[Any]:
        """Send several commands in one batch and wait for all their replies (error replies
        are returned as ``RedisError`` values, in their places)."""
        slots = []
        for command in commands:
            slot = _Slot()
            if not self.send(command, slot):
                raise Dropped("Redis is unreachable and the command buffer is full")
            slots.append(slot)
        out = []
        for slot in slots:
            await slot.event.wait()
            if isinstance(slot.value, RedisUnavailable):
                raise slot.value
            out.append(slot.value)
        return out

    def _opened(self) -> None:
        self.down_since = None
        if self.on_connect is not None:
            self.on_connect()

    def _lost(self, exc: BaseException) -> None:
        super()._lost(exc)
        if self.down_since is None:
            self.down_since = trio.current_time()

    def _waiting(self, exc: BaseException) -> None:
        super()._waiting(exc)
        if self.down_since is None:
            self.down_since = trio.current_time()
        elif self._out and trio.current_time() - self.down_since > self.buffer_time:
            self.drop_buffer()

    def drop_buffer(self) -> None:
        """Drop every command waiting to be written (Redis has been away too long)."""
        waiting, self._queued = self._queued, collections.deque()
        self._out = bytearray()
        self.dropped += len(waiting)
        log.warning("redis unreachable for %.1f s: %d commands dropped",
                    trio.current_time() - (self.down_since or math.inf), len(waiting))
        for handler in waiting:
            _deliver(handler, Dropped("Redis was unreachable past the buffer's bound"))


class RedisSubscriber(_Link):
    """The SUBSCRIBE connection (see the module docstring)."""

    name = "redis subscriber"

    def __init__(self, address: RedisAddress | str,
                 on_message: Callable[[bytes, bytes], None], *,
                 on_subscribed: Callable[[], Awaitable[None]] | None = None,
                 ping_interval: float = 1.0, ping_timeout: float = 5.0) -> None:
        super().__init__(address, ping_interval=ping_interval, ping_timeout=ping_timeout)
        self.on_message = on_message
        #: Run (as a task of the connection) each time a connection has subscribed every
        #: channel again.
        self.on_subscribed = on_subscribed
        #: The channels this connection is (or is about to be) subscribed to, and those Redis
        #: has confirmed on this connection.
        self.channels: set[bytes] = set()
        self.confirmed: set[bytes] = set()
        #: Waiting ``barrier`` calls, answered by the PINGs' pongs in order.
        self._barriers: collections.deque[Handler | None] = collections.deque()

    def subscribe(self, *channels: bytes) -> None:
        new = [c for c in channels if c not in self.channels]
        if new:
            self.channels.update(new)
            if self.connected:
                self._queue(pack(("SUBSCRIBE", *new)), None)

    def unsubscribe(self, *channels: bytes) -> None:
        gone = [c for c in channels if c in self.channels]
        if gone:
            self.channels.difference_update(gone)
            if self.connected:
                self._queue(pack(("UNSUBSCRIBE", *gone)), None)

    async def barrier(self) -> None:
        """Return once Redis has processed every (un)subscription sent before this call;
        raises ``RedisUnavailable`` when the connection is down or breaks first."""
        if not self.connected:
            raise RedisUnavailable("the subscriber connection is down")
        slot = _Slot()
        self._queue(pack(("PING",)), None)
        self._barriers.append(slot)
        await slot.wait()

    def _ping(self) -> None:
        # the PING of the probe is answered like a barrier's: keep the two in one order
        self._queue(pack(("PING",)), None)
        self._barriers.append(self._ponged)

    def _opened(self) -> None:
        channels = sorted(self.channels)
        for start in range(0, len(channels), _SUBSCRIBE_BATCH):
            self._queue(pack(("SUBSCRIBE", *channels[start:start + _SUBSCRIBE_BATCH])), None)

    async def _write(self, stream: trio.abc.Stream) -> None:
        if self.on_subscribed is not None:
            # runs beside the writer, as a task of this connection: it may await barrier()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._run_on_subscribed)
                await super()._write(stream)
        else:
            await super()._write(stream)

    async def _run_on_subscribed(self) -> None:
        assert self.on_subscribed is not None
        try:
            await self.on_subscribed()
        except RedisUnavailable:
            pass  # the connection broke meanwhile; the next one runs it again

    def _received(self, value: Any) -> None:
        if type(value) is list and value:
            kind = value[0]
            if kind == b"message":
                try:
                    self.on_message(value[1], value[2])
                except Exception:
                    log.exception("a backplane message could not be handled")
                return
            if kind == b"pong":
                _deliver(self._barriers.popleft(), None)
                return
            if kind == b"subscribe":
                self.confirmed.add(value[1])
                return
            if kind == b"unsubscribe":
                self.confirmed.discard(value[1])
                return
        if value == b"PONG":  # PING before any subscription
            _deliver(self._barriers.popleft(), None)
            return
        if isinstance(value, hiredis.ReplyError):
            log.warning("redis refused a subscription command: %s", value)
            return
        log.warning("unexpected message on the redis subscriber connection: %r", value)

    def _lost(self, exc: BaseException) -> None:
        super()._lost(exc)
        self.confirmed.clear()
        waiting, self._barriers = self._barriers, collections.deque()
        for handler in waiting:
            _deliver(handler, RedisUnavailable("the subscriber connection was lost"))


async def call_once(address: RedisAddress | str, *commands: Sequence[Arg],
                    timeout: float = 1.0) -> list[Any]:
    """Send a few commands on a connection of their own and return their replies (a goodbye
    when the long-lived connections are being cancelled); raises ``RedisUnavailable`` or
    ``trio.TooSlowError``."""
    if not isinstance(address, RedisAddress):
        address = RedisAddress.parse(address)
    greeting = address.greeting()
    with trio.fail_after(timeout):
        try:
            stream = await address.connect()
        except OSError as exc:
            raise RedisUnavailable(f"cannot reach Redis at {address}: {exc}") from None
        async with stream:
            await stream.send_all(b"".join(pack(c) for c in (*greeting, *commands)))
            reader = hiredis.Reader()
            replies: list[Any] = []
            while len(replies) < len(greeting) + len(commands):
                data = await stream.receive_some(1 << 16)
                if not data:
                    raise RedisUnavailable("Redis closed the connection")
                reader.feed(data)
                while (value := reader.gets()) is not False:
                    replies.append(_reply(value))
    return replies[len(greeting):]
