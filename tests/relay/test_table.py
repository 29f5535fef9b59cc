"""The connection table: user and group indexes, user-group memberships, pruning."""

from __future__ import annotations

import dataclasses

from relaycore.relay._table import USER_GROUP_MAX_UNTIMED, ConnectionTable, HubShard


@dataclasses.dataclass(eq=False)
class FakeConnection:
    id: str
    user_id: str | None = None
    protocol_name: str = "json"
    groups: set[str] = dataclasses.field(default_factory=set)
    received: list[bytes] = dataclasses.field(default_factory=list)

    def enqueue(self, data: bytes) -> bool:
        self.received.append(data)
        return True


def ids(conns):
    return sorted(c.id for c in conns)


def test_shard_add_indexes_user_and_remove_cleans_every_index():
    shard = HubShard("chat")
    a, b = FakeConnection("a", "alice"), FakeConnection("b", "alice")
    shard.add(a, now=0)
    shard.add(b, now=0)
    shard.join(a, "g")
    assert ids(shard.user_targets("alice")) == ["a", "b"]
    shard.remove(a)
    shard.remove(b)
    assert shard.connections == {} and shard.users == {} and shard.groups == {}
    assert a.groups == set()


def test_shard_user_targets_follow_each_connect_and_disconnect_of_the_user():
    shard = HubShard("chat")
    a, b, c = FakeConnection("a", "alice"), FakeConnection("b", "alice"), FakeConnection("c", "bob")
    shard.add(a, now=0)
    shard.add(c, now=0)
    assert ids(shard.user_targets("alice")) == ["a"]  # kept from here on
    assert shard.user_targets("alice") is shard.user_targets("alice")
    shard.add(b, now=0)
    assert ids(shard.user_targets("alice")) == ["a", "b"]
    shard.remove(a)
    assert ids(shard.user_targets("alice")) == ["b"]
    assert ids(shard.user_targets("bob")) == ["c"]  # another user's change left it alone
    shard.remove(b)
    assert shard.user_targets("alice") == ()
    assert shard.user_targets("nobody") == ()
    shard.add(a, now=0)  # the same user back after leaving
    assert ids(shard.user_targets("alice")) == ["a"]
    shard.remove(a)
    shard.remove(c)
    assert shard._user_targets == {}  # nothing kept for users who are gone


def test_shard_group_targets_with_excluded_skip_only_those():
    shard = HubShard("chat")
    conns = [FakeConnection(str(i)) for i in range(4)]
    for c in conns:
        shard.add(c, now=0)
        shard.join(c, "g")
    assert ids(shard.group_targets("g", excluded=["1", "3"])) == ["0", "2"]
    assert ids(shard.all_targets(excluded=["0"])) == ["1", "2", "3"]
    assert list(shard.group_targets("missing")) == []


def test_shard_leave_last_member_deletes_the_group():
    shard = HubShard("chat")
    a = FakeConnection("a")
    shard.add(a, now=0)
    shard.join(a, "g")
    assert shard.leave(a, "g") is True
    assert "g" not in shard.groups
    assert shard.leave(a, "g") is False


def test_user_group_membership_applies_to_current_and_later_connections():
    shard = HubShard("chat")
    first = FakeConnection("first", "bob")
    shard.add(first, now=0)
    shard.add_user_to_group("bob", "g", ttl=None, now=0)
    later = FakeConnection("later", "bob")
    shard.add(later, now=1)
    assert ids(shard.group_targets("g")) == ["first", "later"]
    assert shard.user_in_group("bob", "g", now=1)


def test_user_group_membership_with_ttl_zero_covers_only_current_connections():
    shard = HubShard("chat")
    shard.add(FakeConnection("now", "bob"), now=0)
    shard.add_user_to_group("bob", "g", ttl=0, now=0)
    shard.add(FakeConnection("later", "bob"), now=1)
    assert ids(shard.group_targets("g")) == ["now"]


def test_user_group_membership_expires_after_its_ttl():
    shard = HubShard("chat")
    shard.add_user_to_group("bob", "g", ttl=10, now=0)
    assert shard.user_in_group("bob", "g", now=5)
    assert not shard.user_in_group("bob", "g", now=11)
    shard.add(FakeConnection("late", "bob"), now=12)
    assert list(shard.group_targets("g")) == []
    assert "bob" not in shard.user_groups


def test_remove_user_from_group_removes_connections_and_future_membership():
    shard = HubShard("chat")
    shard.add(FakeConnection("a", "bob"), now=0)
    shard.add_user_to_group("bob", "g", ttl=None, now=0)
    shard.remove_user_from_group("bob", "g")
    shard.add(FakeConnection("b", "bob"), now=1)
    assert list(shard.group_targets("g")) == []
    assert not shard.user_in_group("bob", "g", now=1)


def test_remove_user_from_all_groups_leaves_no_membership():
    shard = HubShard("chat")
    a = FakeConnection("a", "bob")
    shard.add(a, now=0)
    shard.add_user_to_group("bob", "g1", ttl=None, now=0)
    shard.join(a, "g2")
    shard.remove_user_from_all_groups("bob")
    assert shard.groups == {} and a.groups == set() and shard.user_groups == {}


def test_user_group_memberships_keep_only_the_newest_hundred():
    shard = HubShard("chat")
    for i in range(USER_GROUP_MAX_UNTIMED + 5):
        shard.add_user_to_group("bob", f"g{i}", ttl=None, now=i)
    names = shard.user_group_names("bob", now=1000)
    assert len(names) == USER_GROUP_MAX_UNTIMED
    assert "g0" not in names and f"g{USER_GROUP_MAX_UNTIMED + 4}" in names


def test_table_prune_drops_only_empty_shards():
    table = ConnectionTable()
    shard = table.shard("a_chat")
    conn = FakeConnection("x")
    shard.add(conn, now=0)
    table.prune("a_chat")
    assert table.get("a_chat") is shard
    shard.remove(conn)
    table.prune("a_chat")
    assert table.get("a_chat") is None
    assert table.connection_count() == 0


# -- user-group memberships end for the user's current connections too (issue 14) ------------


def test_expired_user_group_membership_removes_the_users_current_connections():
    table = ConnectionTable()
    shard = table.shard("chat")
    a, b = FakeConnection("a", "bob"), FakeConnection("b", "bob")
    shard.add(a, now=0)
    shard.add_user_to_group("bob", "g", ttl=10, now=0)
    shard.add(b, now=5)  # a later connection joins through the membership too
    assert ids(shard.group_targets("g")) == ["a", "b"]
    table.expire_user_groups(now=9.9)
    assert ids(shard.group_targets("g")) == ["a", "b"]
    table.expire_user_groups(now=10)
    assert list(shard.group_targets("g")) == []
    assert shard.groups == {} and a.groups == set() and b.groups == set()
    assert shard.user_groups == {} and shard.via_user == {}
    assert not shard.user_in_group("bob", "g", now=10)


def test_expired_membership_keeps_a_connection_added_to_the_group_directly():
    shard = HubShard("chat")
    direct, through_user = FakeConnection("direct", "bob"), FakeConnection("user", "bob")
    shard.add(direct, now=0)
    shard.add(through_user, now=0)
    shard.join(direct, "g")
    shard.add_user_to_group("bob", "g", ttl=10, now=1)
    shard.expire_user_groups(now=11)
    assert ids(shard.group_targets("g")) == ["direct"]


def test_direct_join_after_the_user_joined_outlives_the_membership():
    shard = HubShard("chat")
    conn = FakeConnection("a", "bob")
    shard.add(conn, now=0)
    shard.add_user_to_group("bob", "g", ttl=10, now=0)
    shard.join(conn, "g")
    shard.expire_user_groups(now=20)
    assert ids(shard.group_targets("g")) == ["a"]


def test_renewed_membership_expires_at_its_new_time_only():
    shard = HubShard("chat")
    conn = FakeConnection("a", "bob")
    shard.add(conn, now=0)
    shard.add_user_to_group("bob", "g", ttl=10, now=0)
    shard.add_user_to_group("bob", "g", ttl=10, now=8)
    shard.expire_user_groups(now=12)  # the first expiry is stale
    assert ids(shard.group_targets("g")) == ["a"]
    shard.expire_user_groups(now=18)
    assert list(shard.group_targets("g")) == []


def test_ttl_zero_joins_are_direct_and_never_expire():
    shard = HubShard("chat")
    conn = FakeConnection("a", "bob")
    shard.add(conn, now=0)
    shard.add_user_to_group("bob", "g", ttl=0, now=0)
    shard.expire_user_groups(now=10**9)
    assert ids(shard.group_targets("g")) == ["a"]


def test_membership_pushed_out_by_the_newest_hundred_removes_its_connections():
    shard = HubShard("chat")
    conn = FakeConnection("a", "bob")
    shard.add(conn, now=0)
    for i in range(USER_GROUP_MAX_UNTIMED + 1):
        shard.add_user_to_group("bob", f"g{i}", ttl=None, now=i)
    assert "g0" not in conn.groups and f"g{USER_GROUP_MAX_UNTIMED}" in conn.groups
    assert len(conn.groups) == USER_GROUP_MAX_UNTIMED


def test_expiry_of_a_membership_found_when_a_connection_opens_removes_the_others():
    shard = HubShard("chat")
    early = FakeConnection("early", "bob")
    shard.add(early, now=0)
    shard.add_user_to_group("bob", "g", ttl=10, now=0)
    shard.add(FakeConnection("late", "bob"), now=11)  # before any tick noticed the expiry
    assert list(shard.group_targets("g")) == []


def test_table_expiry_drops_the_shard_it_leaves_empty():
    table = ConnectionTable()
    table.shard("chat").add_user_to_group("bob", "g", ttl=5, now=0)
    table.expire_user_groups(now=5)
    assert table.get("chat") is None


def test_expiry_heap_stays_bounded_when_memberships_churn():
    shard = HubShard("chat")
    for i in range(10_000):
        shard.add_user_to_group("bob", "g", ttl=None, now=i)
        shard.remove_user_from_group("bob", "g")
    assert len(shard._expiries) < 200
