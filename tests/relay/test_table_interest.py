"""What the connection table tells a backplane (``watch``, its ``interest``): when this node
starts and stops holding a connection, a user or a group; a single node's table has no watch
and tells nobody.
"""

from __future__ import annotations

from relayfakes import HUB, RecordingBackplane, make_ops, open_sessions

from relaycore.relay._table import ConnectionTable


def test_a_table_without_a_watch_has_shards_without_one():
    assert ConnectionTable().shard(HUB).watch is None
    assert make_ops().table.shard(HUB).watch is None  # LocalBackplane: nothing to tell


def test_the_first_and_last_connection_user_and_group_member_are_told():
    backplane = RecordingBackplane()
    ops = make_ops(backplane=backplane)
    a1, a2 = open_sessions(ops, ("a1", "alice"), ("a2", "alice"))
    ops.add_connection_to_group(HUB, "g", "a1")
    ops.add_connection_to_group(HUB, "g", "a2")  # not the first member: nothing new
    ops.add_user_to_group(HUB, "h", "alice")
    assert backplane.interests == [
        (HUB, "connection", "a1", True), (HUB, "user", "alice", True),
        (HUB, "connection", "a2", True),
        (HUB, "group", "g", True), (HUB, "group", "h", True)]
    backplane.interests.clear()
    ops.remove_connection_from_group(HUB, "g", "a1")
    a1.close()
    assert backplane.interests == [(HUB, "connection", "a1", False)]
    a2.close()
    assert sorted(backplane.interests[1:]) == [
        (HUB, "connection", "a2", False), (HUB, "group", "g", False),
        (HUB, "group", "h", False), (HUB, "user", "alice", False)]


def test_a_user_membership_that_ends_takes_the_group_away():
    backplane = RecordingBackplane()
    ops = make_ops(backplane=backplane)
    open_sessions(ops, ("a", "alice"))
    ops.add_user_to_group(HUB, "team", "alice", ttl=5)
    backplane.interests.clear()
    ops.expire(ops.now() + 6)
    assert backplane.interests == [(HUB, "group", "team", False)]
