"""The Redis backplane: every relay node on the same Redis (and cluster name) is one endpoint.

Theory of operation
-------------------
A node applies each operation to its own connections first (``_operations``), then hands it
here; this module publishes it, as the service-protocol message that encodes it, only where a
node may need it, and applies what the other nodes publish (``receive``, which is
``Operations.apply``). Nothing on that path awaits: ``publish`` packs a PUBLISH into the
command connection's buffer, whose writer sends each scheduler round's commands as one batch
(``_resp``).

**Who hears what.** All names start with ``rc:{cluster}:``.

* ``n:{node}``, a node's inbox, for what concerns one node: an operation on a connection
  (send, group join or leave, close, a client invocation) goes to the inbox of the node that
  holds it, as the directory says (a client whose negotiate and transport reached different
  nodes keeps the id the first gave it), else of the node the id names (``{node}.{random}``);
  a send to several connections, to each holder's inbox with its own ids. A client served by
  an app server of another node has its traffic carried between the two nodes' inboxes.
* ``{hub}:all``: broadcasts and "close every connection", heard by the nodes that hold a
  connection of the hub.
* ``{hub}:u:{user}`` and ``{hub}:g:{group}``: sends, closes and user-group changes for a user
  or a group, heard by the nodes that hold a connection of that user or a member of that
  group. A node subscribes while it holds one (the connection table tells it, ``interest``)
  and unsubscribes when the last one leaves, so a message reaches only nodes with a target.
  A send to several users or groups is one message published on each of their channels; a
  node that hears it twice applies it once.
* ``presence``: what each node holds (below).

Every message carries its origin node and a sequence number the origin increases for every
operation. A node skips its own messages, and any message whose number is not above the last
one it applied from that origin: Redis delivers one publisher's messages to one subscriber in
order, whatever their channels, so a second copy always comes after the first.

**How a node knows who holds what** (``holds``: existence checks, and whether an operation on a
connection of another node is published at all). Each node keeps a directory of what every
other node holds: its connections, users and groups, learned from ``presence``. When a node
starts or stops holding something it publishes the change there (in batches, one message per
scheduler round); a node that (re)subscribes publishes ``hello``, and every other node answers
with its whole state in the newcomer's inbox; a node whose command connection (re)opens
publishes its whole state, since changes it buffered may have been dropped. The answer to
``holds`` is then a dictionary look-up, with no round trip on the hot path. What it costs: every
connection opened or closed anywhere, and every user or group gained or lost by a node, is one
entry of a message that every node receives, and each node holds an entry per (node,
connection), (node, user) and (node, group) of the cluster. For a few nodes of tens of
thousands of connections each this is small (tens of bytes per connection, a few messages a
second per thousand connections that come and go); for many nodes with heavy churn, connection
existence could instead be asked of the owner named in the id.

A node's own changes are published only once the subscriptions they imply are in force (a
PING answered on the subscriber connection): a node that learns that another holds a group, a
user or a connection of a hub can publish to its channel and be heard. For the short time
between a join sent to another node and that node's presence saying it holds the group, sends
to the group also go to that node's inbox (the sequence number drops the second copy): a group
join answered here is in force for the next send from here.

**User-group memberships** (a user's current and later connections, with a TTL) live in a
Redis hash per user, ``{hub}:ug:{user}`` (group -> expiry, wall-clock), written with the notice
on the user's channel. A node that gets its first connection of a user reads the hash, once the
user's channel is subscribed, holding back what arrives on that channel meanwhile. Each node
keeps the memberships it has seen and writes them again when its command connection reopens
(a Redis that restarted empty forgets nothing that a node still knows).

**Liveness.** Each node refreshes ``alive:{node}`` (expiring after three heartbeats); every
heartbeat it asks for the keys of the nodes it knows and forgets a node whose key is gone
(``backplane_nodes_gone``). A node that stops cleanly says ``bye`` at once.

**Faults.** While Redis is unreachable the node serves its own clients as before; publishes
wait in the command buffer (``backplane_buffer_limit`` bytes, ``backplane_buffer_time``
seconds), then are dropped and counted (``backplane_dropped``); those Redis may not have run are
counted too (``backplane_publish_failed``). When Redis is back both connections reopen, every
channel is subscribed again (``backplane_resubscribes``), and the node says again all it holds
and the memberships it knows. A subscriber that stops hearing Redis is found by its PING probe
and reconnected.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import re
import socket
import time
from collections.abc import Callable, Collection, Iterable
from typing import Any

import msgpack
import trio

from .._accel import split_varint_frames
from ..protocol import _service as service
from ._backplane import Holding, Receiver
from ._config import RelayConfig
from ._resp import Dropped, RedisCommands, RedisError, RedisSubscriber, RedisUnavailable, call_once
from ._stats import RelayStats
from ._table import USER_GROUP_DEFAULT_TTL

log = logging.getLogger("relaycore.redis")

#: How long sends to a group also go to the inbox of a node asked to put a member in it,
#: at most (until that node's presence says it holds the group).
_PENDING_FOR = 5.0
#: At start, how long to wait for the other nodes' state before serving.
_HEAR_OTHERS_FOR = 1.0

Entry = tuple[str, str, str]  # (hub, kind, key)


class _Published:
    """What a PUBLISH of an operation reached, counted: fewer nodes than expected (one gone,
    or not subscribed again yet after Redis came back), dropped, or maybe not run.

    Redis counts this node among the receivers when it hears the channel too. It surely did
    when the node's subscription was confirmed before the PUBLISH was queued and still is when
    the reply comes: only then is this node expected as well (a subscription that came about
    meanwhile may or may not have been in force)."""

    __slots__ = ("stats", "expected", "channel", "subscriber", "mine")

    def __init__(self, stats: RelayStats, expected: int, channel: bytes,
                 subscriber: RedisSubscriber) -> None:
        self.stats = stats
        self.expected = expected
        self.channel = channel
        self.subscriber = subscriber
        self.mine = channel in subscriber.confirmed

    def __call__(self, value: Any) -> None:
        if type(value) is int:
            if value < self.expected + (self.mine and self.channel in self.subscriber.confirmed):
                self.stats.backplane_unrouted += 1
        elif isinstance(value, Dropped):
            self.stats.backplane_dropped += 1
        elif isinstance(value, (RedisUnavailable, RedisError)):
            self.stats.backplane_publish_failed += 1


def node_name() -> str:
    """This process's node id: host, process id and start time (base 36 milliseconds), in
    characters that a connection id may carry (no ``.``, which ends the node's part)."""
    host = re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname())[:24].strip("-") or "node"
    millis = int(time.time() * 1000)
    epoch = ""
    while millis:
        millis, digit = divmod(millis, 36)
        epoch = "0123456789abcdefghijklmnopqrstuvwxyz"[digit] + epoch
    return f"{host}-{os.getpid()}-{epoch}"


class RedisBackplane:
    """The nodes on one Redis are one endpoint (see the module docstring)."""

    publishes = True

    def __init__(self, url: str, *, cluster: str = "relaycore", stats: RelayStats | None = None,
                 node: str | None = None, buffer_limit: int = 1 << 20,
                 buffer_time: float = 2.0, heartbeat: float = 2.0,
                 ping_interval: float = 1.0, ping_timeout: float = 5.0,
                 join_timeout: float = 5.0) -> None:
        self.node = node or node_name()
        if "." in self.node or " " in self.node:
            raise ValueError(f"a node id has no '.' or space: {self.node!r}")
        self.cluster = cluster
        self.url = url
        self.connection_id_prefix = self.node + "."
        self.stats = stats if stats is not None else RelayStats()
        self.heartbeat = heartbeat
        self.join_timeout = join_timeout
        self._node_b = self.node.encode()
        self._prefix = f"rc:{cluster}:".encode()
        self.inbox = self._inbox_of(self.node)
        self._presence = self._prefix + b"presence"
        self.commands = RedisCommands(url, buffer_limit=buffer_limit, buffer_time=buffer_time,
                                      on_connect=self._commands_opened,
                                      ping_interval=ping_interval, ping_timeout=ping_timeout)
        self.subscriber = RedisSubscriber(url, self._on_message, on_subscribed=self._subscribed,
                                          ping_interval=ping_interval, ping_timeout=ping_timeout)
        self._receive: Receiver | None = None
        self.on_node_gone: Callable[[str, set[str]], None] | None = None
        #: invocation id -> the node whose app server invoked a client of this node (where
        #: the invocation's end goes)
        self._invoked_by: dict[str, str] = {}
        self._seq = 0
        #: origin node -> the sequence number of the last operation applied from it
        self._last_seq: dict[bytes, int] = {}
        #: what this node holds, and how many connections of each hub
        self._held: set[Entry] = set()
        self._hub_connections: collections.Counter[str] = collections.Counter()
        #: the directory: what the other nodes hold, both ways
        self._remote: dict[Entry, set[str]] = {}
        self._of_node: dict[str, set[Entry]] = {}
        #: hub -> {other node: how many connections of the hub it holds}
        self._hub_nodes: dict[str, collections.Counter[str]] = {}
        self._node_heard = trio.Event()
        #: (hub, group) -> {node asked to put a member in it: until when}
        self._pending: dict[tuple[str, str], dict[str, float]] = {}
        #: presence changes not published yet: (present, hub, kind, key)
        self._deltas: list[tuple[bool, str, str, str]] = []
        self._deltas_wake = trio.Event()
        #: (hub, user) -> {group: wall-clock expiry}: the memberships this node has seen
        self._memberships: dict[tuple[str, str], dict[str, float]] = {}
        #: users whose memberships are to be read, and (by their channel) what arrived on
        #: that channel while they are read
        self._loads: list[tuple[str, str]] = []
        self._loads_wake = trio.Event()
        self._loading: dict[bytes, list[tuple[str, Any]]] = {}
        self._joined = trio.Event()
        self._losses_seen = 0

    def __str__(self) -> str:
        return (f"{self.cluster} on {self.commands.address} as node {self.node} "
                f"({len(self._of_node)} other nodes)")

    @classmethod
    def from_config(cls, config: RelayConfig, stats: RelayStats) -> RedisBackplane:
        assert config.redis is not None
        return cls(config.redis, cluster=config.cluster_name, stats=stats,
                   buffer_limit=config.backplane_buffer_limit,
                   buffer_time=config.backplane_buffer_time)

    # -- names ---------------------------------------------------------------------------------

    def _inbox_of(self, node: str) -> bytes:
        return self._prefix + b"n:" + node.encode()

    def _channel(self, hub: str, kind: str, key: str) -> bytes:
        """``{hub}:u:{user}`` or ``{hub}:g:{group}`` (hub names hold no ``:``)."""
        return self._prefix + f"{hub}:{kind}:{key}".encode()

    def _all(self, hub: str) -> bytes:
        return self._prefix + f"{hub}:all".encode()

    def _memberships_key(self, hub: str, user: str) -> bytes:
        return self._prefix + f"{hub}:ug:{user}".encode()

    def _alive_key(self, node: str) -> bytes:
        return self._prefix + b"alive:" + node.encode()

    def owner(self, connection_id: str) -> str | None:
        """The node a connection id names, when it is another node."""
        node, dot, _ = connection_id.partition(".")
        return node if dot and node != self.node else None

    # -- what the operations ask ---------------------------------------------------------------

    def holds(self, hub: str, kind: Holding, key: str) -> bool:
        return bool(self._remote.get((hub, kind, key)))

    def holders(self, hub: str, kind: Holding, key: str) -> Collection[str]:
        return self._remote.get((hub, kind, key), ())

    def nodes(self) -> list[str]:
        """The other nodes this node knows of."""
        return sorted(self._of_node)

    def interest(self, hub: str, kind: Holding, key: str, present: bool) -> None:
        entry = (hub, kind, key)
        if present:
            self._held.add(entry)
        else:
            self._held.discard(entry)
        self._deltas.append((present, hub, kind, key))
        self._deltas_wake.set()
        if kind == "server":  # only the directory's: no channel
            return
        if kind == "connection":
            count = self._hub_connections[hub] + (1 if present else -1)
            if count > 0:
                self._hub_connections[hub] = count
                if count == 1 and present:
                    self.subscriber.subscribe(self._all(hub))
            else:
                del self._hub_connections[hub]
                self.subscriber.unsubscribe(self._all(hub))
            return
        channel = self._channel(hub, "u" if kind == "user" else "g", key)
        if present:
            self.subscriber.subscribe(channel)
            if kind == "user":
                self._load_memberships(hub, key)
        else:
            self.subscriber.unsubscribe(channel)
            if kind == "user":
                self._loading.pop(channel, None)

    # -- publishing ----------------------------------------------------------------------------

    def publish(self, hub: str, operation: Any) -> None:
        route = _ROUTES.get(type(operation))
        if route is None:
            raise TypeError(f"{type(operation).__name__} is not an operation the backplane "
                            "carries")
        self._seq += 1
        self.stats.backplane_published += 1
        route(self, hub, operation)

    def send_to_node(self, node: str, hub: str, operation: Any) -> None:
        self._seq += 1
        self.stats.backplane_published += 1
        self._send(self._inbox_of(node), self._frame(hub, operation), 1)

    def _frame(self, hub: str, operation: Any) -> bytes:
        return b"o%s %d %s\n%s" % (self._node_b, self._seq, hub.encode(),
                                   service.write_message(operation))

    def _send(self, channel: bytes, frame: bytes, expected: int) -> None:
        """PUBLISH ``frame``; ``expected``: how many nodes the directory says hear ``channel``
        (a reply of fewer is counted as ``backplane_unrouted``)."""
        if not self.commands.publish(channel, frame, _Published(self.stats, expected, channel,
                                                                self.subscriber)):
            self.stats.backplane_dropped += 1

    def _to_all(self, hub: str, operation: Any) -> None:
        self._send(self._all(hub), self._frame(hub, operation), len(self._hub_nodes.get(hub, ())))

    def _to_user(self, hub: str, operation: Any) -> None:
        user = operation.user_id
        self._send(self._channel(hub, "u", user), self._frame(hub, operation),
                   len(self._remote.get((hub, "user", user), ())))

    def _to_users(self, hub: str, operation: Any, users: Iterable[str]) -> None:
        frame = self._frame(hub, operation)
        for user in dict.fromkeys(users):
            self._send(self._channel(hub, "u", user), frame,
                       len(self._remote.get((hub, "user", user), ())))

    def _to_groups(self, hub: str, operation: Any, groups: Iterable[str]) -> None:
        frame = self._frame(hub, operation)
        groups = list(dict.fromkeys(groups))
        for group in groups:
            self._send(self._channel(hub, "g", group), frame,
                       len(self._remote.get((hub, "group", group), ())))
        if self._pending:
            for node in self._joining(hub, groups):
                self._send(self._inbox_of(node), frame, 1)

    def _joining(self, hub: str, groups: list[str]) -> set[str]:
        """The nodes asked to put a member in one of ``groups`` that do not say yet that they
        hold it (they may not hear its channel yet)."""
        now = trio.current_time()
        nodes: set[str] = set()
        for group in groups:
            waiting = self._pending.get((hub, group))
            if not waiting:
                continue
            holders = self._remote.get((hub, "group", group), ())
            for node, until in list(waiting.items()):
                if until < now or node in holders:
                    del waiting[node]
                else:
                    nodes.add(node)
            if not waiting:
                del self._pending[(hub, group)]
        return nodes

    def _expect(self, hub: str, group: str, nodes: Iterable[str]) -> None:
        until = trio.current_time() + _PENDING_FOR
        for node in nodes:
            self._pending.setdefault((hub, group), {})[node] = until

    def _holder(self, hub: str, connection_id: str) -> str | None:
        """The other node that holds a connection: as its presence says (a client whose
        negotiate and transport reached different nodes keeps the id the first one gave),
        else the node its id names."""
        holders = self._remote.get((hub, "connection", connection_id))
        if holders:
            return next(iter(holders))
        return self.owner(connection_id)

    def _to_owner(self, hub: str, operation: Any) -> None:
        owner = self._holder(hub, operation.connection_id)
        if owner is not None:
            self._send(self._inbox_of(owner), self._frame(hub, operation), 1)
            if type(operation) is service.JoinGroupMessage:
                self._expect(hub, operation.group_name, (owner,))

    def _to_owners(self, hub: str, operation: service.MultiConnectionDataMessage) -> None:
        by_owner: dict[str, list[str]] = {}
        for connection_id in operation.connection_ids:
            owner = self._holder(hub, connection_id)
            if owner is not None:
                by_owner.setdefault(owner, []).append(connection_id)
        for owner, ids in by_owner.items():
            self._send(self._inbox_of(owner), self._frame(
                hub, service.MultiConnectionDataMessage(ids, operation.payloads)), 1)

    def _to_invocation_end(self, hub: str, operation: Any) -> None:
        """A client invocation's completion (or error): to the client's node, from the
        caller's (a cleanup); or from the client's node to the caller's."""
        node = self._invoked_by.pop(operation.invocation_id, None)  # the caller's node
        if node is None:
            node = self._holder(hub, operation.connection_id)
        if node is None:
            self.stats.backplane_unrouted += 1
            return
        self._send(self._inbox_of(node), self._frame(hub, operation), 1)

    def _user_group_change(self, hub: str, operation: Any) -> None:
        user, group = operation.user_id, operation.group_name
        key = self._memberships_key(hub, user)
        if type(operation) is service.UserJoinGroupMessage:
            if operation.ttl != 0:  # 0: the user's current connections only, nothing kept
                seconds = USER_GROUP_DEFAULT_TTL if operation.ttl is None else operation.ttl
                self._write_membership(hub, user, group, time.time() + seconds)
            self._expect(hub, group, self._remote.get((hub, "user", user), ()))
        elif group is None:
            self._memberships.pop((hub, user), None)
            self.commands.send((b"DEL", key))
        else:
            self._memberships.get((hub, user), {}).pop(group, None)
            self.commands.send((b"HDEL", key, group))
        self._to_user(hub, operation)

    def _write_membership(self, hub: str, user: str, group: str, expiry: float) -> None:
        self._record_membership(hub, user, group, expiry)
        key = self._memberships_key(hub, user)
        seconds = max(1, math.ceil(expiry - time.time()))
        self.commands.send((b"HSET", key, group, repr(expiry)))
        # the hash lives as long as its longest membership (HEXPIRE needs Redis 7.4)
        self.commands.send((b"EXPIRE", key, seconds, b"NX"))
        self.commands.send((b"EXPIRE", key, seconds, b"GT"))

    def _record_membership(self, hub: str, user: str, group: str, expiry: float) -> None:
        self._memberships.setdefault((hub, user), {})[group] = expiry

    # -- receiving -----------------------------------------------------------------------------

    def _on_message(self, channel: bytes, data: bytes) -> None:
        kind = data[:1]
        if kind == b"o":
            self._on_operation(channel, data)
        elif kind == b"p":
            self._on_presence(data)

    def _on_operation(self, channel: bytes, data: bytes) -> None:
        end = data.index(b"\n")
        origin, seq_text, hub_b = data[1:end].split(b" ", 2)
        if origin == self._node_b:
            return
        seq = int(seq_text)
        if seq <= self._last_seq.get(origin, 0):
            return  # a second copy (a send to several users or groups)
        self._last_seq[origin] = seq
        bodies, _ = split_varint_frames(memoryview(data)[end + 1:])
        message = service.parse_message_body(bodies[0])
        hub = hub_b.decode()
        if type(message) is service.ClientInvocationMessage:
            self._invoked_by[message.invocation_id] = origin.decode()
        if self._loading:
            waiting = self._loading.get(channel)
            if waiting is not None:
                waiting.append((hub, message))
                return
        self._apply(hub, message)

    def _apply(self, hub: str, message: Any) -> None:
        kind = type(message)
        if kind is service.UserJoinGroupMessage and message.ttl != 0:
            seconds = USER_GROUP_DEFAULT_TTL if message.ttl is None else message.ttl
            self._record_membership(hub, message.user_id, message.group_name,
                                    time.time() + seconds)
        elif kind is service.UserLeaveGroupMessage:
            if message.group_name is None:
                self._memberships.pop((hub, message.user_id), None)
            else:
                self._memberships.get((hub, message.user_id), {}).pop(message.group_name, None)
        self.stats.backplane_received += 1
        assert self._receive is not None
        try:
            self._receive(hub, message)
        except Exception:
            log.exception("an operation from another node failed here: %r", message)

    # -- presence ------------------------------------------------------------------------------

    def _presence_message(self, kind: str, payload: Any = None) -> bytes:
        return b"p" + msgpack.packb([kind, self.node, payload])

    def _snapshot(self) -> bytes:
        return self._presence_message("s", [list(entry) for entry in self._held])

    def _on_presence(self, data: bytes) -> None:
        kind, origin, payload = msgpack.unpackb(data[1:], use_list=False)
        if origin == self.node:
            return
        if kind == "d":
            for present, hub, what, key in payload:
                self._set_remote(origin, (hub, what, key), present)
        elif kind == "s":
            self._forget_node(origin, gone=False)
            self._of_node[origin] = set()
            for hub, what, key in payload:
                self._set_remote(origin, (hub, what, key), True)
        elif kind == "hello":
            self._of_node.setdefault(origin, set())
            self.commands.send((b"PUBLISH", self._inbox_of(origin), self._snapshot()))
        elif kind == "bye":
            log.info("node %s left the cluster", origin)
            self._forget_node(origin)
        self._node_heard.set()

    def _set_remote(self, node: str, entry: Entry, present: bool) -> None:
        held = self._of_node.setdefault(node, set())
        if entry[1] == "connection" and (entry in held) != present:
            counts = self._hub_nodes.setdefault(entry[0], collections.Counter())
            counts[node] += 1 if present else -1
            if counts[node] <= 0:
                del counts[node]
                if not counts:
                    del self._hub_nodes[entry[0]]
        if present:
            held.add(entry)
            self._remote.setdefault(entry, set()).add(node)
            if entry[1] == "group" and self._pending:
                waiting = self._pending.get((entry[0], entry[2]))
                if waiting is not None:
                    waiting.pop(node, None)
        else:
            held.discard(entry)
            holders = self._remote.get(entry)
            if holders is not None:
                holders.discard(node)
                if not holders:
                    del self._remote[entry]

    def _forget_node(self, node: str, *, gone: bool = True) -> None:
        """Forget what ``node`` held: it is ``gone``, or about to say all it holds again."""
        held = list(self._of_node.get(node, ()))
        for entry in held:
            self._set_remote(node, entry, False)
        self._of_node.pop(node, None)
        for waiting in self._pending.values():
            waiting.pop(node, None)
        if not gone:
            return
        if self._invoked_by:
            for invocation_id in [i for i, n in self._invoked_by.items() if n == node]:
                del self._invoked_by[invocation_id]
        if self.on_node_gone is not None:
            self.on_node_gone(node, {key for _hub, kind, key in held if kind == "connection"})

    async def _tell_presence(self) -> None:
        """Publish this node's changes in batches, each once the subscriptions it implies are
        in force."""
        while True:
            if not self._deltas:
                self._deltas_wake = trio.Event()
                await self._deltas_wake.wait()
                continue
            batch, self._deltas = self._deltas, []
            if any(present for present, _, _, _ in batch):  # new subscriptions, maybe
                try:
                    await self.subscriber.barrier()
                except RedisUnavailable:
                    continue  # the state said after the next subscription includes these
            self.commands.send((b"PUBLISH", self._presence, self._presence_message(
                "d", [list(delta) for delta in batch])))

    # -- user-group memberships ----------------------------------------------------------------

    def _load_memberships(self, hub: str, user: str) -> None:
        self._loading.setdefault(self._channel(hub, "u", user), [])
        self._loads.append((hub, user))
        self._loads_wake.set()

    async def _read_memberships(self) -> None:
        """Read the memberships of the users this node just got a first connection of."""
        while True:
            if not self._loads:
                self._loads_wake = trio.Event()
                await self._loads_wake.wait()
                continue
            batch, self._loads = list(dict.fromkeys(self._loads)), []
            try:
                await self.subscriber.barrier()
                replies = await self.commands.call_many(
                    [(b"HGETALL", self._memberships_key(hub, user)) for hub, user in batch])
            except RedisUnavailable:
                replies = [None] * len(batch)  # read again after the next subscription
            now = time.time()
            for (hub, user), reply in zip(batch, replies, strict=True):
                channel = self._channel(hub, "u", user)
                waiting = self._loading.pop(channel, [])
                if (hub, "user", user) not in self._held:
                    continue  # the user's last connection left meanwhile
                if isinstance(reply, list):
                    for group, expiry in zip(reply[::2], reply[1::2], strict=True):
                        left = float(expiry) - now
                        if left > 0:
                            self._record_membership(hub, user, group.decode(), float(expiry))
                            self._call(hub, service.UserJoinGroupMessage(
                                user, group.decode(), left))  # type: ignore[arg-type]
                for message_hub, message in waiting:
                    self._apply(message_hub, message)
                if (hub, user) in self._loads:  # to be read again: hold back meanwhile
                    self._loading[channel] = []

    def _call(self, hub: str, message: Any) -> None:
        assert self._receive is not None
        try:
            self._receive(hub, message)
        except Exception:
            log.exception("a user-group membership could not be applied: %r", message)

    # -- connections come and go ---------------------------------------------------------------

    def _commands_opened(self) -> None:
        """A command connection opened (Redis may have restarted empty): say again that this
        node is alive, the memberships it knows, and all it holds."""
        lost = self.commands.losses + self.subscriber.losses
        self.stats.backplane_disconnects += lost - self._losses_seen
        self._losses_seen = lost
        self._say_alive(first=True)  # before the buffered messages that name this node
        now = time.time()
        for (hub, user), groups in list(self._memberships.items()):
            for group, expiry in list(groups.items()):
                if expiry <= now:
                    del groups[group]
                else:
                    self._write_membership(hub, user, group, expiry)
            if not groups:
                del self._memberships[(hub, user)]
        self.commands.send((b"PUBLISH", self._presence, self._snapshot()))

    async def _subscribed(self) -> None:
        """The subscriber connection subscribed (again) every channel: ask the others for
        their state (this node may have missed changes), say this node's, read the
        memberships of its users again."""
        if self.subscriber.connects > 1:
            self.stats.backplane_resubscribes += 1
        lost = self.commands.losses + self.subscriber.losses
        self.stats.backplane_disconnects += lost - self._losses_seen
        self._losses_seen = lost
        await self.subscriber.barrier()
        self.commands.send((b"PUBLISH", self._presence, self._presence_message("hello")))
        self.commands.send((b"PUBLISH", self._presence, self._snapshot()))
        for hub, kind, key in list(self._held):
            if kind == "user":
                self._load_memberships(hub, key)
        if not self._joined.is_set():
            await self._hear_the_others()
            self._joined.set()

    async def _hear_the_others(self) -> None:
        """At start: wait (a little) until every node subscribed to presence has answered."""
        try:
            reply = await self.commands.call(b"PUBSUB", b"NUMSUB", self._presence)
        except (RedisUnavailable, RedisError):
            return
        others = int(reply[1]) - 1
        with trio.move_on_after(_HEAR_OTHERS_FOR):
            while len(self._of_node) < others:
                self._node_heard = trio.Event()
                await self._node_heard.wait()

    def _say_alive(self, first: bool = False) -> None:
        command = (b"SET", self._alive_key(self.node),
                   f"host={socket.gethostname()} pid={os.getpid()}", b"PX",
                   int(self.heartbeat * 3000))
        if first:
            self.commands.send_first(command)
        else:
            self.commands.send(command)

    async def _check_nodes(self) -> None:
        """Every heartbeat: refresh this node's key, and forget the nodes whose key expired."""
        while True:
            await trio.sleep(self.heartbeat)
            if not self.commands.connected:
                continue
            self._say_alive()
            others = list(self._of_node)
            if not others:
                continue
            try:
                alive = await self.commands.call(b"MGET", *map(self._alive_key, others))
            except (RedisUnavailable, RedisError):
                continue
            for node, key in zip(others, alive, strict=True):
                if key is None and node in self._of_node:
                    log.warning("node %s stopped answering: forgetting what it held", node)
                    self.stats.backplane_nodes_gone += 1
                    self._forget_node(node)

    # -- running -------------------------------------------------------------------------------

    async def run(self, receive: Receiver, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Join the cluster (at most ``join_timeout``: after that the node serves its own
        clients and joins when Redis answers) and carry operations until cancelled; then say
        goodbye."""
        self._receive = receive
        self.subscriber.subscribe(self.inbox, self._presence)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.commands.run)
                await nursery.start(self.subscriber.run)
                nursery.start_soon(self._tell_presence)
                nursery.start_soon(self._read_memberships)
                nursery.start_soon(self._check_nodes)
                with trio.move_on_after(self.join_timeout):
                    await self._joined.wait()
                if self._joined.is_set():
                    log.info("node %s joined cluster %r on %s (%d other nodes)", self.node,
                             self.cluster, self.commands.address, len(self._of_node))
                else:
                    log.warning("node %s has not reached Redis at %s yet: serving its own "
                                "clients, joining cluster %r when it answers", self.node,
                                self.commands.address, self.cluster)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await self._leave()

    async def _leave(self) -> None:
        try:
            await call_once(self.commands.address,
                            (b"PUBLISH", self._presence, self._presence_message("bye")),
                            (b"DEL", self._alive_key(self.node)), timeout=0.5)
        except (RedisUnavailable, RedisError, trio.TooSlowError):
            pass  # the others forget this node when its key expires


#: Where each operation the operations layer publishes goes.
_ROUTES: dict[type, Callable[[RedisBackplane, str, Any], None]] = {
    service.BroadcastDataMessage: RedisBackplane._to_all,
    service.CloseConnectionsWithAckMessage: RedisBackplane._to_all,
    service.MultiConnectionDataMessage: RedisBackplane._to_owners,
    service.UserDataMessage: RedisBackplane._to_user,
    service.CloseUserConnectionsWithAckMessage: RedisBackplane._to_user,
    service.MultiUserDataMessage: lambda b, h, m: b._to_users(h, m, m.user_ids),
    service.GroupBroadcastDataMessage: lambda b, h, m: b._to_groups(h, m, (m.group_name,)),
    service.CloseGroupConnectionsWithAckMessage: lambda b, h, m: b._to_groups(
        h, m, (m.group_name,)),
    service.MultiGroupBroadcastDataMessage: lambda b, h, m: b._to_groups(h, m, m.group_names),
    service.JoinGroupMessage: RedisBackplane._to_owner,
    service.LeaveGroupMessage: RedisBackplane._to_owner,
    service.CloseConnectionWithAckMessage: RedisBackplane._to_owner,
    service.UserJoinGroupMessage: RedisBackplane._user_group_change,
    service.UserLeaveGroupMessage: RedisBackplane._user_group_change,
    service.ClientInvocationMessage: RedisBackplane._to_owner,
    service.ClientCompletionMessage: RedisBackplane._to_invocation_end,
    service.ErrorCompletionMessage: RedisBackplane._to_invocation_end,
}
