"""The backplane seam (``relay/_backplane.py``): what the operations hand to other nodes.

Each operation, applied here, publishes the service-protocol message that encodes it, and only
when another node may hold a target: a ``RecordingBackplane`` keeps what is published and says
what the other nodes hold. ``publish=False`` and ``apply`` (an operation from another node)
publish nothing. Two ``Operations`` wired by an in-memory backplane (``LinkedBackplane``: what
one node publishes the other applies) deliver what is done on one node to the sessions of the
other, and nothing comes back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import trio
from relayfakes import HUB, FakeSession, RecordingBackplane, make_ops, open_sessions, two_nodes

from relaycore.protocol._service import (
    BroadcastDataMessage,
    CheckConnectionExistenceWithAckMessage,
    CheckGroupExistenceWithAckMessage,
    CheckUserExistenceWithAckMessage,
    CheckUserInGroupWithAckMessage,
    CloseConnectionMessage,
    CloseConnectionsWithAckMessage,
    CloseConnectionWithAckMessage,
    CloseGroupConnectionsWithAckMessage,
    CloseUserConnectionsWithAckMessage,
    GroupBroadcastDataMessage,
    JoinGroupMessage,
    JoinGroupWithAckMessage,
    LeaveGroupMessage,
    LeaveGroupWithAckMessage,
    MultiConnectionDataMessage,
    MultiGroupBroadcastDataMessage,
    MultiUserDataMessage,
    UserDataMessage,
    UserJoinGroupMessage,
    UserJoinGroupWithAckMessage,
    UserLeaveGroupMessage,
    UserLeaveGroupWithAckMessage,
)
from relaycore.relay import OutboundMessage
from relaycore.relay._backplane import LocalBackplane
from relaycore.relay._operations import OPERATION_MESSAGES

MESSAGE = OutboundMessage.invocation("notify", 1)
P = MESSAGE.payload_map()


def test_a_single_node_publishes_nothing_and_knows_of_no_other_node():
    local = LocalBackplane()
    assert local.publishes is False
    assert not local.holds(HUB, "connection", "anything")
    with pytest.raises(RuntimeError):
        local.publish(HUB, BroadcastDataMessage(P))


async def test_a_single_nodes_backplane_starts_at_once_with_nothing_to_carry():
    received: list = []
    async with trio.open_nursery() as nursery:
        await nursery.start(LocalBackplane().run, lambda hub, message: received.append(message))
    assert received == []


def test_every_operation_runs_on_a_single_node_without_publishing():
    # LocalBackplane.publish raises: a single node must not even build the messages.
    ops = make_ops()
    open_sessions(ops, ("a", "alice"))
    for call, _, _ in PUBLISHES:
        call(ops)
    for message, _ in PERFORMED:
        ops.perform(HUB, message)


# -- what each operation publishes --------------------------------------------------------------


@pytest.fixture
def backplane():
    return RecordingBackplane()


@pytest.fixture
def ops(backplane):
    """Connection ``a`` (alice, in group g) here; connection ``r`` on another node."""
    ops = make_ops(backplane=backplane)
    open_sessions(ops, ("a", "alice"))
    ops.add_connection_to_group(HUB, "g", "a")
    backplane.held[(HUB, "connection")] = {"r"}
    backplane.published.clear()
    return ops


Call = Callable[..., Any]

#: (operation, its result, what it publishes); ``takes_publish`` says the call passes ``**kw``
#: on (every operation but ``send_payloads_to_user``, the app servers' hot path).
PUBLISHES: list[tuple[Call, Any, list[Any]]] = [
    (lambda o, **kw: o.send_to_all(HUB, MESSAGE, ["x"], **kw), 1,
     [BroadcastDataMessage(P, ["x"])]),
    (lambda o, **kw: o.send_to_connection(HUB, "a", MESSAGE, **kw), 1, []),
    (lambda o, **kw: o.send_to_connection(HUB, "r", MESSAGE, **kw), 0,
     [MultiConnectionDataMessage(["r"], P)]),
    (lambda o, **kw: o.send_to_connections(HUB, ["a", "r", "r"], MESSAGE, **kw), 1,
     [MultiConnectionDataMessage(["r"], P)]),
    (lambda o, **kw: o.send_to_connections(HUB, ["a"], MESSAGE, **kw), 1, []),
    (lambda o, **kw: o.send_to_user(HUB, "alice", MESSAGE, **kw), 1,
     [UserDataMessage("alice", P)]),
    (lambda o, **kw: o.send_to_users(HUB, ["bob", "alice"], MESSAGE, **kw), 1,
     [MultiUserDataMessage(["bob", "alice"], P)]),
    (lambda o, **kw: o.send_to_group(HUB, "g", MESSAGE, ["x"], ["u"], **kw), 1,
     [GroupBroadcastDataMessage("g", P, ["x"], ["u"])]),
    (lambda o, **kw: o.send_to_groups(HUB, ["g", "h"], MESSAGE, **kw), 1,
     [MultiGroupBroadcastDataMessage(["g", "h"], P)]),
    (lambda o, **kw: o.add_connection_to_group(HUB, "k", "a", **kw), True, []),
    (lambda o, **kw: o.add_connection_to_group(HUB, "k", "r", **kw), True,
     [JoinGroupMessage("r", "k")]),
    (lambda o, **kw: o.remove_connection_from_group(HUB, "k", "r", **kw), True,
     [LeaveGroupMessage("r", "k")]),
    (lambda o, **kw: o.remove_connection_from_group(HUB, None, "r", **kw), True,
     [LeaveGroupMessage("r", None)]),
    (lambda o, **kw: o.add_user_to_group(HUB, "g", "bob", 30, **kw), None,
     [UserJoinGroupMessage("bob", "g", 30)]),
    (lambda o, **kw: o.add_user_to_group(HUB, "g", "bob", **kw), None,
     [UserJoinGroupMessage("bob", "g", None)]),
    (lambda o, **kw: o.remove_user_from_group(HUB, None, "bob", **kw), None,
     [UserLeaveGroupMessage("bob", None)]),
    (lambda o, **kw: o.close_connection(HUB, "r", "bye", **kw), True,
     [CloseConnectionWithAckMessage("r", 0, "bye")]),
    (lambda o, **kw: o.close_all_connections(HUB, "bye", ["x"], **kw), 1,
     [CloseConnectionsWithAckMessage(0, "bye", ["x"])]),
    (lambda o, **kw: o.close_user_connections(HUB, "bob", "bye", ["x"], **kw), 0,
     [CloseUserConnectionsWithAckMessage("bob", 0, "bye", ["x"])]),
    (lambda o, **kw: o.close_group_connections(HUB, "g", None, ["x"], **kw), 1,
     [CloseGroupConnectionsWithAckMessage("g", 0, None, ["x"])]),
    # Last: it closes ``a``.
    (lambda o, **kw: o.close_connection(HUB, "a", "bye", **kw), True, []),
]


@pytest.mark.parametrize(("call", "result", "published"), PUBLISHES)
def test_each_operation_publishes_the_message_that_encodes_it(ops, backplane, call, result,
                                                              published):
    assert call(ops) == result
    assert [m for hub, m in backplane.published] == published
    assert all(hub == HUB for hub, _ in backplane.published)


@pytest.mark.parametrize(("call", "result", "published"), PUBLISHES)
def test_an_operation_told_not_to_publish_publishes_nothing(ops, backplane, call, result,
                                                            published):
    call(ops, publish=False)
    assert backplane.published == []


def test_send_payloads_to_user_publishes_the_payloads_as_they_came(ops, backplane):
    assert ops.send_payloads_to_user(HUB, "alice", P) == 1
    assert backplane.published == [(HUB, UserDataMessage("alice", P))]


@pytest.mark.parametrize("op", ["send_to_connection", "add_connection_to_group",
                                "remove_connection_from_group", "close_connection"])
def test_an_operation_on_a_connection_no_node_holds_publishes_nothing(ops, backplane, op):
    args = {"send_to_connection": (HUB, "nowhere", MESSAGE),
            "add_connection_to_group": (HUB, "g", "nowhere"),
            "remove_connection_from_group": (HUB, "g", "nowhere"),
            "close_connection": (HUB, "nowhere")}[op]
    assert not getattr(ops, op)(*args)
    assert backplane.published == []


def test_existence_checks_ask_the_other_nodes_when_this_one_holds_nothing(ops, backplane):
    backplane.held[(HUB, "user")] = {"bob"}
    backplane.held[(HUB, "group")] = {"far"}
    assert ops.connection_exists(HUB, "r") and not ops.connection_exists(HUB, "s")
    assert ops.user_exists(HUB, "bob") and not ops.user_exists(HUB, "carol")
    assert ops.group_exists(HUB, "far") and not ops.group_exists(HUB, "near")
    assert ops.perform(HUB, CheckConnectionExistenceWithAckMessage("r", 1)) is True


# -- perform publishes, apply does not ----------------------------------------------------------

#: (operation message from an app server of this node, what ``perform`` publishes)
PERFORMED: list[tuple[Any, list[Any]]] = [
    (BroadcastDataMessage(P, ["x"]), [BroadcastDataMessage(P, ["x"])]),
    (MultiConnectionDataMessage(["a", "r"], P), [MultiConnectionDataMessage(["r"], P)]),
    (UserDataMessage("alice", P), [UserDataMessage("alice", P)]),
    (MultiUserDataMessage(["alice"], P), [MultiUserDataMessage(["alice"], P)]),
    (GroupBroadcastDataMessage("g", P, ["x"], ["u"]),
     [GroupBroadcastDataMessage("g", P, ["x"], ["u"])]),
    (MultiGroupBroadcastDataMessage(["g"], P), [MultiGroupBroadcastDataMessage(["g"], P)]),
    (JoinGroupMessage("r", "k"), [JoinGroupMessage("r", "k")]),
    (JoinGroupWithAckMessage("r", "k", 5), [JoinGroupMessage("r", "k")]),
    (JoinGroupWithAckMessage("a", "k", 5), []),
    (LeaveGroupMessage("r", "k"), [LeaveGroupMessage("r", "k")]),
    (LeaveGroupWithAckMessage("r", None, 5), [LeaveGroupMessage("r", None)]),
    (UserJoinGroupMessage("bob", "g", 30), [UserJoinGroupMessage("bob", "g", 30)]),
    (UserJoinGroupWithAckMessage("bob", "g", 5, 30), [UserJoinGroupMessage("bob", "g", 30)]),
    (UserLeaveGroupMessage("bob", "g"), [UserLeaveGroupMessage("bob", "g")]),
    (UserLeaveGroupWithAckMessage("bob", None, 5), [UserLeaveGroupMessage("bob", None)]),
    (CheckUserInGroupWithAckMessage("alice", "g", 5), []),
    (CheckGroupExistenceWithAckMessage("g", 5), []),
    (CheckConnectionExistenceWithAckMessage("a", 5), []),
    (CheckUserExistenceWithAckMessage("alice", 5), []),
    (CloseConnectionMessage("r", "err"), [CloseConnectionWithAckMessage("r", 0, "err")]),
    (CloseConnectionWithAckMessage("r", 5, "x"), [CloseConnectionWithAckMessage("r", 0, "x")]),
    (CloseConnectionsWithAckMessage(5, "x", ["e"]),
     [CloseConnectionsWithAckMessage(0, "x", ["e"])]),
    (CloseUserConnectionsWithAckMessage("bob", 5, "x", ["e"]),
     [CloseUserConnectionsWithAckMessage("bob", 0, "x", ["e"])]),
    (CloseGroupConnectionsWithAckMessage("g", 5, "x", ["e"]),
     [CloseGroupConnectionsWithAckMessage("g", 0, "x", ["e"])]),
]


def test_every_operation_message_has_its_publishing_rule_here():
    assert {type(m) for m, _ in PERFORMED} == OPERATION_MESSAGES


@pytest.mark.parametrize(("message", "published"), PERFORMED)
def test_perform_publishes_the_operation_for_the_other_nodes(ops, backplane, message,
                                                             published):
    ops.perform(HUB, message)
    assert [m for _, m in backplane.published] == published


@pytest.mark.parametrize(("message", "published"), PERFORMED)
def test_apply_does_it_here_and_publishes_nothing(ops, backplane, message, published):
    ops.apply(HUB, message)
    assert backplane.published == []


def test_apply_of_an_operation_on_a_connection_held_elsewhere_does_nothing(ops, backplane):
    # Another node sent it to every node; the one that holds ``r`` does it.
    assert ops.apply(HUB, JoinGroupWithAckMessage("r", "k", 5)) is False
    assert ops.apply(HUB, CloseConnectionMessage("r", "x")) is False


def test_apply_does_what_the_operation_says_on_this_nodes_connections(ops):
    (b,) = open_sessions(ops, ("b", "bob"))
    assert ops.apply(HUB, UserDataMessage("bob", P)) == 1
    assert ops.apply(HUB, JoinGroupMessage("b", "k")) is True
    assert b.groups == {"k"}
    assert ops.apply(HUB, CloseConnectionWithAckMessage("b", 0, "bye")) is True
    assert b.closes == [("bye", True)]


# -- two nodes ----------------------------------------------------------------------------------


def invocations(*sessions: FakeSession) -> dict[str, list[Any]]:
    return {s.id: [m["arguments"] for m in s.take()] for s in sessions}


def test_a_send_on_one_node_reaches_the_other_nodes_sessions_and_nothing_comes_back():
    a, b = two_nodes()
    (a1,) = open_sessions(a, ("a1", "alice"))
    b1, b2 = open_sessions(b, ("b1", "alice"), ("b2", "bob"))
    assert a.send_to_all(HUB, OutboundMessage.invocation("n", 1), ["b2"]) == 1
    assert a.send_to_user(HUB, "alice", OutboundMessage.invocation("n", 2)) == 1
    assert a.send_to_user(HUB, "bob", OutboundMessage.invocation("n", 3)) == 0
    assert a.send_to_connection(HUB, "b2", OutboundMessage.invocation("n", 4)) == 0
    assert invocations(a1, b1, b2) == {"a1": [[1], [2]], "b1": [[1], [2]],
                                       "b2": [[3], [4]]}
    assert len(a.backplane.published) == 4
    assert b.backplane.published == []  # applied on b, never published again


def test_group_changes_and_closes_on_one_node_act_on_the_connections_of_the_other():
    a, b = two_nodes()
    (local,) = open_sessions(a, ("a1", "alice"))
    (far,) = open_sessions(b, ("b1", "bob"))
    assert a.add_connection_to_group(HUB, "team", "b1")
    assert far.groups == {"team"}
    assert a.group_exists(HUB, "team") and a.connection_exists(HUB, "b1")
    assert a.user_exists(HUB, "bob") and not a.user_exists(HUB, "nobody")
    assert a.send_to_group(HUB, "team", OutboundMessage.invocation("n", 1)) == 0
    assert invocations(local, far) == {"a1": [], "b1": [[1]]}
    a.add_user_to_group(HUB, "fans", "bob", ttl=60)
    assert far.groups == {"team", "fans"} and b.user_in_group(HUB, "fans", "bob")
    assert a.remove_connection_from_group(HUB, None, "b1")
    assert far.groups == set()
    assert a.close_connection(HUB, "b1", "moved")
    assert far.closes == [("moved", True)] and not a.connection_exists(HUB, "b1")
    assert not a.close_connection(HUB, "b1")
    assert b.backplane.published == []


def test_an_app_servers_operation_performed_on_one_node_reaches_the_other():
    a, b = two_nodes()
    open_sessions(a, ("a1", "alice"))
    (far,) = open_sessions(b, ("b1", "alice"))
    assert a.perform(HUB, UserDataMessage("alice", P)) == 1
    assert a.perform(HUB, CloseUserConnectionsWithAckMessage("alice", 7, "bye", ["a1"])) is True
    assert invocations(far) == {"b1": [[1]]}
    assert far.closes == [("bye", True)]
    assert a.connection_exists(HUB, "a1")
    assert b.backplane.published == []
