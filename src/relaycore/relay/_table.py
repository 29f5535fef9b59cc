"""The connection table: who is connected to which hub, as which user, in which groups.

Sharded by hub key (the wire hub name, ``{application}_{hub}`` lower-cased, as Azure does), so
two applications sharing one relay never see each other's connections. A shard holds the
connections of its hub, a user index (user id -> connections) and a group index (group ->
connections), plus user-group memberships that apply to a user's current and later
connections (REST "add user to group", with an optional TTL).

A connection is in a group directly (JoinGroup, "add connection to group") or through its
user's membership. When a membership ends (its TTL expires, the newest hundred push it out)
the user's connections that are in the group only through it leave the group; a connection
added to the group directly stays: the two are separate memberships, and ending one says
nothing about the other. ``ttl=0`` adds the current connections directly (no membership is
kept, so nothing ends). Removing the user from the group removes all of the user's
connections from it, directly added or not, as before.

Invariants: a connection is in ``connections`` from the end of its handshake until it is
removed; every connection in a user or group index is also in ``connections``; empty index
entries are deleted so that existence checks are O(1) dictionary look-ups; ``via_user`` holds
only groups the connection is in; every membership has an entry in its shard's expiry heap
(stale entries, of memberships renewed or removed since, are skipped when they come up).

A table may be given a ``watch(hub, kind, key, present)`` callable (a backplane's
``interest``): it is told when a shard's connection, user or group index gains a key or loses
its last entry for one, which is when the node starts or stops holding that connection, user
or group. Without one (a single node) the only cost is a test of ``None`` where an index entry
is created or deleted.

The table does no I/O; a ``Connection`` only needs ``id``, ``user_id``, ``protocol_name``,
``groups`` (a set of group names) and ``enqueue(frame_bytes)``. A shard also lists the hub's
app-server connections, so that a hub with servers but no clients yet is not pruned.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

#: Memberships without a TTL last at most one year, and a user keeps at most 100 of them
#: (service-protocol §12.3, "TTL rules").
USER_GROUP_DEFAULT_TTL = 365 * 24 * 3600.0
USER_GROUP_MAX_UNTIMED = 100

#: The expiry heap is rebuilt from the live memberships when it has grown to this many
#: entries and twice the number it had after the last rebuild (stale entries of renewed or
#: removed memberships otherwise wait out their TTL, a year for untimed ones).
_HEAP_COMPACT_MIN = 64


class Connection(Protocol):
    id: str
    user_id: str | None
    protocol_name: str
    groups: set[str]

    def enqueue(self, data: bytes) -> bool: ...


#: ``(hub, kind, key, present)``: the node started or stopped holding the connection
#: (``"connection"``), a connection of the user (``"user"``) or a member of the group
#: (``"group"``).
Watch = Callable[[str, str, str, bool], None]


class HubShard:
    __slots__ = ("key", "connections", "users", "groups", "user_groups", "servers",
                 "via_user", "_user_targets", "_expiries", "_compact_at", "watch")

    def __init__(self, key: str, watch: Watch | None = None) -> None:
        self.key = key
        self.watch = watch
        self.connections: dict[str, Connection] = {}
        self.users: dict[str, dict[str, Connection]] = {}
        self.groups: dict[str, dict[str, Connection]] = {}
        #: user id -> {group: expiry time}
        self.user_groups: dict[str, dict[str, float]] = {}
        #: connection id -> the groups it is in only through its user's membership
        self.via_user: dict[str, set[str]] = {}
        #: (expiry, user id, group) of every membership, soonest first
        self._expiries: list[tuple[float, str, str]] = []
        self._compact_at = _HEAP_COMPACT_MIN
        #: the app-server connections of this hub (service protocol), in arrival order
        self.servers: list[Any] = []
        #: user id -> tuple(users[user id].values()), made by ``user_targets`` and dropped
        #: whenever that user's connections change
        self._user_targets: dict[str, tuple[Connection, ...]] = {}

    def is_empty(self) -> bool:
        return not self.connections and not self.user_groups and not self.servers

    # -- membership -------------------------------------------------------------------

    def add(self, conn: Connection, now: float) -> None:
        self.connections[conn.id] = conn
        watch = self.watch
        if watch is not None:
            watch(self.key, "connection", conn.id, True)
        if conn.user_id is not None:
            members = self.users.get(conn.user_id)
            if members is None:
                members = self.users[conn.user_id] = {}
                if watch is not None:
                    watch(self.key, "user", conn.user_id, True)
            members[conn.id] = conn
            self._user_targets.pop(conn.user_id, None)
            for group in self.user_group_names(conn.user_id, now):
                self._join_via_user(conn, group)

    def remove(self, conn: Connection) -> None:
        if self.connections.pop(conn.id, None) is None:
            return
        watch = self.watch
        if conn.user_id is not None:
            if _discard(self.users, conn.user_id, conn.id) and watch is not None:
                watch(self.key, "user", conn.user_id, False)
            self._user_targets.pop(conn.user_id, None)
        for group in conn.groups:
            if _discard(self.groups, group, conn.id) and watch is not None:
                watch(self.key, "group", group, False)
        conn.groups.clear()
        self.via_user.pop(conn.id, None)
        if watch is not None:
            watch(self.key, "connection", conn.id, False)

    def _new_group(self, group: str) -> dict[str, Connection]:
        """The (empty) members of a group this shard had no member of until now."""
        members = self.groups[group] = {}
        if self.watch is not None:
            self.watch(self.key, "group", group, True)
        return members

    def join(self, conn: Connection, group: str) -> None:
        """Add ``conn`` to ``group`` directly (it stays when a user membership ends)."""
        (self.groups.get(group) or self._new_group(group))[conn.id] = conn
        conn.groups.add(group)
        _discard_set(self.via_user, conn.id, group)

    def _join_via_user(self, conn: Connection, group: str) -> None:
        if group in conn.groups:
            return  # already in it (directly, or through the same membership)
        (self.groups.get(group) or self._new_group(group))[conn.id] = conn
        conn.groups.add(group)
        self.via_user.setdefault(conn.id, set()).add(group)

    def leave(self, conn: Connection, group: str) -> bool:
        if group not in conn.groups:
            return False
        conn.groups.discard(group)
        if _discard(self.groups, group, conn.id) and self.watch is not None:
            self.watch(self.key, "group", group, False)
        _discard_set(self.via_user, conn.id, group)
        return True

    def leave_all(self, conn: Connection) -> None:
        for group in list(conn.groups):
            self.leave(conn, group)

    def user_group_names(self, user_id: str, now: float) -> list[str]:
        memberships = self.user_groups.get(user_id)
        if not memberships:
            return []
        for group in [g for g, expiry in memberships.items() if expiry <= now]:
            self._end_membership(user_id, group)
        return list(self.user_groups.get(user_id, ()))

    def add_user_to_group(self, user_id: str, group: str, ttl: float | None, now: float) -> None:
        """Add a user's current connections, and (unless ``ttl == 0``) its later ones, until
        the membership ends (``ttl`` seconds, a year without one)."""
        current = list(self.users.get(user_id, {}).values())
        if ttl == 0:
            for conn in current:
                self.join(conn, group)
            return
        for conn in current:
            self._join_via_user(conn, group)
        memberships = self.user_groups.setdefault(user_id, {})
        memberships.pop(group, None)  # re-insert so that it counts as the newest
        expiry = memberships[group] = now + (USER_GROUP_DEFAULT_TTL if ttl is None else ttl)
        self._push_expiry(expiry, user_id, group)
        if len(memberships) > USER_GROUP_MAX_UNTIMED:
            self._end_membership(user_id, next(iter(memberships)))

    def expire_user_groups(self, now: float) -> None:
        """End the memberships whose time has come (the relay's ticker calls this)."""
        heap = self._expiries
        while heap and heap[0][0] <= now:
            expiry, user_id, group = heapq.heappop(heap)
            if self.user_groups.get(user_id, {}).get(group) == expiry:
                self._end_membership(user_id, group)

    def next_expiry(self) -> float | None:
        """When the soonest membership ends (possibly a stale entry), or None."""
        return self._expiries[0][0] if self._expiries else None

    def _end_membership(self, user_id: str, group: str) -> None:
        """The user's membership of ``group`` ends: its connections that are in the group
        only through it leave; later ones no longer join."""
        memberships = self.user_groups.get(user_id)
        if memberships is None or memberships.pop(group, None) is None:
            return
        if not memberships:
            del self.user_groups[user_id]
        for conn in list(self.users.get(user_id, {}).values()):
            if group in self.via_user.get(conn.id, ()):
                self.leave(conn, group)

    def _push_expiry(self, expiry: float, user_id: str, group: str) -> None:
        heap = self._expiries
        heapq.heappush(heap, (expiry, user_id, group))
        if len(heap) >= self._compact_at:
            heap[:] = [(e, u, g) for u, groups in self.user_groups.items()
                       for g, e in groups.items()]
            heapq.heapify(heap)
            self._compact_at = max(_HEAP_COMPACT_MIN, 2 * len(heap))

    def remove_user_from_group(self, user_id: str, group: str) -> None:
        for conn in list(self.users.get(user_id, {}).values()):
            self.leave(conn, group)
        memberships = self.user_groups.get(user_id)
        if memberships is not None:
            memberships.pop(group, None)
            if not memberships:
                del self.user_groups[user_id]

    def remove_user_from_all_groups(self, user_id: str) -> None:
        for conn in list(self.users.get(user_id, {}).values()):
            self.leave_all(conn)
        self.user_groups.pop(user_id, None)

    def user_in_group(self, user_id: str, group: str, now: float) -> bool:
        if group in self.user_group_names(user_id, now):
            return True
        members = self.groups.get(group)
        if not members:
            return False
        return any(conn_id in members for conn_id in self.users.get(user_id, ()))

    # -- targets ----------------------------------------------------------------------

    def all_targets(self, excluded: Iterable[str] = ()) -> Iterator[Connection]:
        excluded_set = set(excluded)
        if not excluded_set:
            return iter(list(self.connections.values()))
        return (c for c in list(self.connections.values()) if c.id not in excluded_set)

    def group_targets(self, group: str, excluded: Iterable[str] = ()) -> Iterator[Connection]:
        members = self.groups.get(group)
        if not members:
            return iter(())
        excluded_set = set(excluded)
        return (c for c in list(members.values()) if c.id not in excluded_set)

    def user_targets(self, user_id: str) -> tuple[Connection, ...]:
        """A snapshot of the user's connections (usually one or two: a tuple takes the
        fan-out's few-targets path, which frames only for the protocols they use). Kept
        until the user's connections change: a send to a user among many then touches one
        small tuple rather than the user's dictionary (its object and its table)."""
        targets = self._user_targets.get(user_id)
        if targets is None:
            members = self.users.get(user_id)
            if not members:
                return ()
            targets = self._user_targets[user_id] = tuple(members.values())
        return targets


def _discard_set(index: dict[str, set[str]], key: str, item: str) -> None:
    members = index.get(key)
    if members is not None:
        members.discard(item)
        if not members:
            del index[key]


def _discard(index: dict[str, dict[str, Any]], key: str, conn_id: str) -> bool:
    """Take ``conn_id`` out of ``index[key]``; True when that left the key without members
    (and deleted it)."""
    members = index.get(key)
    if members is None:
        return False
    members.pop(conn_id, None)
    if not members:
        del index[key]
        return True
    return False


_EMPTY = HubShard("")


class ConnectionTable:
    """All hub shards of one relay node, keyed by wire hub name; ``watch`` is told what the
    node starts and stops holding (see the module docstring)."""

    def __init__(self, watch: Watch | None = None) -> None:
        self._shards: dict[str, HubShard] = {}
        self._watch = watch

    def shard(self, hub: str) -> HubShard:
        shard = self._shards.get(hub)
        if shard is None:
            shard = self._shards[hub] = HubShard(hub, self._watch)
        return shard

    def get(self, hub: str) -> HubShard | None:
        return self._shards.get(hub)

    def view(self, hub: str) -> HubShard:
        """The shard of ``hub`` for reading: an empty one when the hub has nothing (never
        mutate what this returns; use ``shard()``)."""
        return self._shards.get(hub) or _EMPTY

    def prune(self, hub: str) -> None:
        shard = self._shards.get(hub)
        if shard is not None and shard.is_empty():
            del self._shards[hub]

    def shards(self) -> list[HubShard]:
        return list(self._shards.values())

    def expire_user_groups(self, now: float) -> None:
        """End every user-group membership whose TTL has passed, in every hub, and drop the
        shards that leaves empty: one look at each shard's soonest expiry per tick (the
        relay's ticker calls this, so a membership ends at most one tick, a second, late)."""
        for key, shard in list(self._shards.items()):
            soonest = shard.next_expiry()
            if soonest is not None and soonest <= now:
                shard.expire_user_groups(now)
                if shard.is_empty():
                    del self._shards[key]

    def connection_count(self) -> int:
        return sum(len(s.connections) for s in self._shards.values())
