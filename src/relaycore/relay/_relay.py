"""The relay node as a whole: builds its parts, wires them, and runs their tasks.

``serve_relay(config, task_status=...)`` runs a relay inside the caller's trio nursery and
hands back the running ``Relay``; its public async methods are the operations of the REST API,
for programs that host relaycore as their transport layer::

    async with trio.open_nursery() as nursery:
        relay = await nursery.start(serve_relay, RelayConfig(port=0))
        await relay.send_to_all("chat", OutboundMessage.invocation("notify", "hello"))

The parts, from the top down (each one only calls the ones below it):

* the faces: ``HttpFront`` (accepting, routing, negotiate, upgrade; it holds the REST API),
  ``ClientSession`` over a ``WebSocketTransport``, ``ServerConnection``, ``Upstream``;
* ``Operations``: every operation, once, against the table and the fan-out; it hands what
  other nodes may need to the ``Backplane`` (``LocalBackplane``: this node is the endpoint;
  ``RedisBackplane`` when ``config.redis`` is set: every node on that Redis is one endpoint);
* the connection table, the fan-out, and the I/O every peer shares: ``Poller``, ``Flusher``.

This class owns what spans them: the ticker (timers of every peer, expiries), the drain, and
the clock.
"""

from __future__ import annotations

import gc
import logging
import secrets
from collections.abc import Collection, Iterable
from typing import Any

import trio

from ..protocol._auth import TokenValidator
from ._accept import serve_accept
from ._backplane import Backplane, LocalBackplane
from ._config import RelayConfig, parse_rules
from ._front import HttpFront
from ._message import OutboundMessage
from ._operations import Operations
from ._peer import ConnState, Flusher, Poller
from ._server import ServerConnection
from ._stats import RelayStats
from ._tokens import RequestAuth
from ._upstream import Upstream
from ._workers import reuse_port_listeners

log = logging.getLogger("relaycore.relay")

#: Connections whose timers are checked between two checkpoints of the ticker.
_TICK_SLICE = 1000


def redis_backplane(config: RelayConfig, stats: RelayStats) -> Backplane:
    """The backplane of a node of a cluster on Redis (``config.redis``); the Redis client is
    imported only then (``hiredis``, the ``redis`` extra)."""
    try:
        from ._redis import RedisBackplane
    except ImportError as exc:
        raise RuntimeError(f"redis: the Redis backplane needs hiredis ({exc}); install it with "
                           "pip install 'relaycore[redis]'") from None
    return RedisBackplane.from_config(config, stats)


class Relay:
    """A running relay node. Create it with ``serve_relay``; use its methods from trio code."""

    def __init__(self, config: RelayConfig, backplane: Backplane | None = None) -> None:
        self.config = config
        self.stats = RelayStats()
        self.port: int = config.port
        self.flusher = Flusher()
        self.poller = Poller(self.flusher)
        if backplane is None and config.redis is not None:
            backplane = redis_backplane(config, self.stats)
        self.backplane: Backplane = backplane or LocalBackplane()
        self.ops = Operations(config, self.stats, self.flusher, self.backplane, self.now)
        #: this node's id, as ``Asrs-Instance-Id`` tells app servers (service-protocol §6.2)
        self.ops.instance_id = getattr(self.backplane, "node", None) or secrets.token_hex(8)
        self.upstream = Upstream(config, self.stats, parse_rules(config.upstreams))
        self.ops.serverless = self.upstream
        self.auth = RequestAuth(
            TokenValidator(config.access_keys, clock_skew=config.token_clock_skew),
            self.stats, lambda: self.endpoint)
        self.front = HttpFront(config, self.ops, self.auth, self.poller, self.flusher)
        #: the connection table and pending client invocations, for reading (tests, tools)
        self.table = self.ops.table
        self.invocations = self.ops.invocations

    # -- what the parts are, for programs and tests -------------------------------------------

    @property
    def endpoint(self) -> str:
        return self.config.endpoint_url(self.port)

    @property
    def connection_string(self) -> str:
        return self.config.connection_string(self.port)

    @property
    def fault_mode(self) -> str:
        return self.front.fault_mode

    def now(self) -> float:
        return trio.current_time()

    def inject_fault(self, mode: str) -> None:
        """Make server connections fail as in an outage, to rehearse failover: ``refuse``
        new ones (503), ``drop`` the existing ones too (no goodbye), or go ``silence``
        (existing ones get and send nothing; new ones hang), or ``none`` to heal."""
        self.front.inject_fault(mode)

    def servers_of(self, hub: str) -> list[Any]:
        return self.ops.servers_of(hub)

    def choose_server(self, hub: str) -> Any:
        return self.ops.choose_server(hub)

    async def handle_stream(self, stream: trio.SocketStream) -> None:
        """Serve one accepted TCP connection (what the listeners run)."""
        await self.front.handle_stream(stream)

    # -- the operations, for programs that host the relay -------------------------------------

    async def send_to_all(self, hub: str, message: OutboundMessage,
                          excluded: Collection[str] = ()) -> int:
        """Send to every connection of ``hub`` but ``excluded``; returns the number reached."""
        return self.ops.send_to_all(hub, message, excluded)

    async def send_to_user(self, hub: str, user_id: str, message: OutboundMessage) -> int:
        return self.ops.send_to_user(hub, user_id, message)

    async def send_to_connection(self, hub: str, connection_id: str,
                                 message: OutboundMessage) -> int:
        return self.ops.send_to_connection(hub, connection_id, message)

    async def send_to_group(self, hub: str, group: str, message: OutboundMessage,
                            excluded: Collection[str] = ()) -> int:
        return self.ops.send_to_group(hub, group, message, excluded)

    async def add_connection_to_group(self, hub: str, group: str, connection_id: str) -> bool:
        """False when the connection does not exist."""
        return self.ops.add_connection_to_group(hub, group, connection_id)

    async def remove_connection_from_group(self, hub: str, group: str,
                                           connection_id: str) -> bool:
        return self.ops.remove_connection_from_group(hub, group, connection_id)

    async def remove_connection_from_all_groups(self, hub: str, connection_id: str) -> bool:
        return self.ops.remove_connection_from_group(hub, None, connection_id)

    async def add_user_to_group(self, hub: str, group: str, user_id: str,
                                ttl: float | None = None) -> None:
        """Add the user's connections, and unless ``ttl == 0`` its later ones, for ``ttl`` s."""
        self.ops.add_user_to_group(hub, group, user_id, ttl)

    async def remove_user_from_group(self, hub: str, group: str, user_id: str) -> None:
        self.ops.remove_user_from_group(hub, group, user_id)

    async def remove_user_from_all_groups(self, hub: str, user_id: str) -> None:
        self.ops.remove_user_from_group(hub, None, user_id)

    async def connection_exists(self, hub: str, connection_id: str) -> bool:
        return self.ops.connection_exists(hub, connection_id)

    async def user_exists(self, hub: str, user_id: str) -> bool:
        return self.ops.user_exists(hub, user_id)

    async def group_exists(self, hub: str, group: str) -> bool:
        return self.ops.group_exists(hub, group)

    async def user_in_group(self, hub: str, group: str, user_id: str) -> bool:
        return self.ops.user_in_group(hub, group, user_id)

    async def close_connection(self, hub: str, connection_id: str,
                               reason: str | None = None) -> bool:
        return self.ops.close_connection(hub, connection_id, reason)

    async def close_all_connections(self, hub: str, reason: str | None = None,
                                    excluded: Iterable[str] = ()) -> int:
        return self.ops.close_all_connections(hub, reason, list(excluded))

    async def close_user_connections(self, hub: str, user_id: str, reason: str | None = None,
                                     excluded: Iterable[str] = ()) -> int:
        return self.ops.close_user_connections(hub, user_id, reason, list(excluded))

    async def close_group_connections(self, hub: str, group: str, reason: str | None = None,
                                      excluded: Iterable[str] = ()) -> int:
        return self.ops.close_group_connections(hub, group, reason, list(excluded))

    # -- background ----------------------------------------------------------------------------

    async def _ticker(self) -> None:
        config = self.config
        interval = min(1.0, config.keep_alive_interval / 3, config.client_timeout / 3,
                       config.handshake_timeout / 3, config.negotiate_timeout / 3,
                       config.server_keep_alive_interval / 3, config.server_timeout / 3,
                       config.close_timeout / 3)
        # A connection needs its tick() only when one of these holds (a superset of what the
        # client and server timers check): most open connections are skipped by one
        # comparison chain instead of two method calls.
        quiet = min(config.client_timeout, config.server_timeout)
        idle = min(config.keep_alive_interval, config.server_keep_alive_interval)
        is_open = ConnState.OPEN
        frozen_at = 0
        while True:
            await trio.sleep(interval)
            now = self.now()
            live = list(self.front.live)
            for start in range(0, len(live), _TICK_SLICE):
                if start:
                    # Let other tasks run between slices: one pass over 15k connections
                    # would otherwise hold the loop (and every message) for milliseconds.
                    await trio.lowlevel.checkpoint()
                    now = self.now()
                for conn in [c for c in live[start:start + _TICK_SLICE]
                             if c.state is not is_open or c._close_deadline <= now
                             or now - c.last_receive > quiet or now - c.last_send >= idle]:
                    try:
                        if not conn.close_due(now):
                            conn.tick(now)
                    except Exception:  # a bug in one connection's timers ends only it
                        conn._internal_error()
            if self.config.tune_gc and len(live) > 2 * frozen_at + 1000:
                # The connections' long-lived objects leave the collector's generations, so
                # collections stop rescanning them (idle CPU, latency spikes at scale).
                gc.freeze()
                frozen_at = len(live)
            self.front.expire(now)
            self.ops.expire(now)

    async def drain(self, reason: str = "The relay is shutting down.",
                    timeout: float | None = None) -> None:
        """Stop accepting clients, send every client a Close message with ``allowReconnect``
        (so it reconnects, to another node if there is one) and wait until all have gone or
        ``timeout`` (default: ``close_timeout``) has passed."""
        self.ops.draining = True
        for peer in self.front.client_transports():
            peer.session.close(reason, allow_reconnect=True)
        await self.front.clients_gone(self.config.close_timeout if timeout is None else timeout)
        for peer in list(self.front.live):
            if isinstance(peer, ServerConnection):
                peer.fail(reason)


async def serve_relay(
    config: RelayConfig,
    *,
    task_status: trio.TaskStatus[Relay] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a relay until cancelled; ``task_status.started`` gets the running ``Relay``.

    Cancellation drops the sockets at once; call ``await relay.drain()`` first for a graceful
    stop in which every client is told to reconnect (``python -m relaycore serve`` does so on
    SIGINT and SIGTERM).
    """
    relay = Relay(config)
    if config.reuse_port:
        listeners = await reuse_port_listeners(config.host, config.port)
    else:
        listeners = await trio.open_tcp_listeners(config.port, host=config.host or None)
    relay.port = listeners[0].socket.getsockname()[1]
    front = relay.front
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay._ticker)
        nursery.start_soon(relay.flusher.run)
        nursery.start_soon(relay.poller.run)
        await nursery.start(relay.upstream.run)
        await nursery.start(relay.backplane.run, relay.ops.apply)
        for listener in listeners:
            nursery.start_soon(serve_accept, listener, front.handle_stream, front.admit,
                               front.refused)
        task_status.started(relay)
