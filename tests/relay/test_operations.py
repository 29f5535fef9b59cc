"""``Operations`` in memory: every operation returns what it reached, against fake sessions
(``relayfakes.FakeSession``) in a real connection table, with a real flusher and a clock the
test sets. ``perform`` is checked for every service-protocol operation message, with the result
its ack reports; what each operation publishes to a backplane is in ``test_backplane.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
from relayfakes import (
    HUB,
    Clock,
    FakeServer,
    FakeSession,
    FakeUpstream,
    make_ops,
    open_sessions,
)

from relaycore.protocol._hub import InvocationMessage
from relaycore.protocol._service import (
    BroadcastDataMessage,
    CheckConnectionExistenceWithAckMessage,
    CheckGroupExistenceWithAckMessage,
    CheckUserExistenceWithAckMessage,
    CheckUserInGroupWithAckMessage,
    ClientCompletionMessage,
    ClientInvocationMessage,
    CloseConnectionMessage,
    CloseConnectionsWithAckMessage,
    CloseConnectionWithAckMessage,
    CloseGroupConnectionsWithAckMessage,
    CloseUserConnectionsWithAckMessage,
    ErrorCompletionMessage,
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
from relaycore.relay import OutboundMessage, RelayConfig
from relaycore.relay._operations import OPERATION_MESSAGES, ClientInvocations
from relaycore.relay._peer import ConnState
from relaycore.relay._table import USER_GROUP_DEFAULT_TTL


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def ops(clock):
    return make_ops(clock=clock)


def notify(*arguments: Any) -> OutboundMessage:
    return OutboundMessage.invocation("notify", *arguments)


def arguments_received(*sessions: FakeSession) -> dict[str, list[list[Any]]]:
    """Per session, the arguments of every invocation it was sent since the last look."""
    out = {}
    for session in sessions:
        got = []
        for message in session.take():
            if isinstance(message, InvocationMessage):
                got.append(list(message.arguments))
            else:
                assert message["type"] == 1 and message["target"] == "notify", message
                got.append(message["arguments"])
        out[session.id] = got
    return out


# -- sending ------------------------------------------------------------------------------------


def test_send_to_all_reaches_every_open_connection_but_the_excluded_and_counts_them(ops):
    a, b, c, d = open_sessions(ops, ("a", "alice"), ("b", "bob"), ("c", None), ("d", "dora"))
    waiting = FakeSession(ops, "w")  # still in its handshake: not in the table
    assert ops.send_to_all(HUB, notify(1), ["b"]) == 3
    assert arguments_received(a, b, c, d, waiting) == {
        "a": [[1]], "b": [], "c": [[1]], "d": [[1]], "w": []}
    # Many targets take the fast path: the buffers it filled are marked for the flusher.
    assert set(ops.flusher.dirty) == {a, c, d}
    assert (ops.stats.messages_sent, ops.stats.deliveries) == (1, 3)
    assert ops.send_to_all("other", notify(2)) == 0
    assert ops.send_to_all(HUB, notify(3)) == 4


def test_send_to_all_frames_the_message_for_each_clients_protocol(ops):
    j1, j2 = open_sessions(ops, ("j1", None), ("j2", None))
    m1, m2 = open_sessions(ops, ("m1", None), ("m2", None), protocol="messagepack")
    assert ops.send_to_all(HUB, notify("hi", 2)) == 4
    assert arguments_received(j1, j2, m1, m2) == {
        "j1": [["hi", 2]], "j2": [["hi", 2]], "m1": [["hi", 2]], "m2": [["hi", 2]]}


def test_a_client_past_the_send_buffer_limit_is_not_counted_as_reached():
    ops = make_ops(RelayConfig(send_buffer_limit=100))
    a, b, c = open_sessions(ops, ("a", None), ("b", None), ("c", None))
    b._out += b"\0" * 90  # what it has not read yet
    assert ops.send_to_all(HUB, notify("x" * 20)) == 2
    assert b.refused == 1 and len(b._out) == 90  # offered through enqueue, which refused it
    assert ops.stats.deliveries == 2


def test_send_to_connection_reaches_only_it_and_reports_zero_for_an_unknown_one(ops):
    a, b = open_sessions(ops, ("a", None), ("b", None))
    assert ops.send_to_connection(HUB, "a", notify(1)) == 1
    assert ops.send_to_connection(HUB, "nope", notify(2)) == 0
    assert ops.send_to_connection("other", "a", notify(3)) == 0
    assert arguments_received(a, b) == {"a": [[1]], "b": []}


def test_send_to_connections_counts_each_existing_connection_once(ops):
    a, b, c = open_sessions(ops, ("a", None), ("b", None), ("c", None))
    assert ops.send_to_connections(HUB, ["a", "a", "nope", "b"], notify(1)) == 2
    assert arguments_received(a, b, c) == {"a": [[1]], "b": [[1]], "c": []}


def test_send_to_user_reaches_every_connection_of_the_user_in_its_protocol(ops):
    a1, b = open_sessions(ops, ("a1", "alice"), ("b", "bob"))
    (a2,) = open_sessions(ops, ("a2", "alice"), protocol="messagepack")
    assert ops.send_to_user(HUB, "alice", notify(1)) == 2
    assert ops.send_to_user(HUB, "nobody", notify(2)) == 0
    assert arguments_received(a1, a2, b) == {"a1": [[1]], "a2": [[1]], "b": []}


def test_send_payloads_to_user_frames_each_payload_for_the_users_connections(ops):
    a1, b = open_sessions(ops, ("a1", "alice"), ("b", "bob"))
    (a2,) = open_sessions(ops, ("a2", "alice"), protocol="messagepack")
    payloads = notify(7).payload_map()
    assert ops.send_payloads_to_user(HUB, "alice", payloads) == 2
    assert arguments_received(a1, a2, b) == {"a1": [[7]], "a2": [[7]], "b": []}
    # A payload map without the connection's protocol reaches nobody of that protocol.
    assert ops.send_payloads_to_user(HUB, "alice", {"json": payloads["json"]}) == 1
    assert arguments_received(a1, a2) == {"a1": [[7]], "a2": []}
    assert (ops.stats.messages_sent, ops.stats.deliveries) == (2, 3)


def test_send_to_users_counts_each_connection_once(ops):
    a1, a2, b, c = open_sessions(ops, ("a1", "alice"), ("a2", "alice"), ("b", "bob"),
                                 ("c", "carol"))
    assert ops.send_to_users(HUB, ["alice", "bob", "alice", "nobody"], notify(1)) == 3
    assert arguments_received(a1, a2, b, c) == {"a1": [[1]], "a2": [[1]], "b": [[1]], "c": []}


def test_send_to_group_skips_excluded_connections_and_excluded_users(ops):
    a, b, c, d, outside = open_sessions(ops, ("a", "alice"), ("b", "bob"), ("c", "carol"),
                                        ("d", None), ("o", "olga"))
    for conn_id in "abcd":
        assert ops.add_connection_to_group(HUB, "team", conn_id)
    assert ops.send_to_group(HUB, "team", notify(1)) == 4
    assert ops.send_to_group(HUB, "team", notify(2), ["a"], ["bob"]) == 2
    assert ops.send_to_group(HUB, "nobody-here", notify(3)) == 0
    assert arguments_received(a, b, c, d, outside) == {
        "a": [[1]], "b": [[1]], "c": [[1], [2]], "d": [[1], [2]], "o": []}


def test_send_to_groups_counts_a_member_of_several_groups_once(ops):
    a, b, c = open_sessions(ops, ("a", None), ("b", None), ("c", None))
    ops.add_connection_to_group(HUB, "g1", "a")
    ops.add_connection_to_group(HUB, "g2", "a")
    ops.add_connection_to_group(HUB, "g2", "b")
    assert ops.send_to_groups(HUB, ["g1", "g2", "g3"], notify(1)) == 2
    assert arguments_received(a, b, c) == {"a": [[1]], "b": [[1]], "c": []}


# -- groups -------------------------------------------------------------------------------------


def test_connections_join_and_leave_groups_and_an_unknown_one_is_reported(ops):
    (a,) = open_sessions(ops, ("a", "alice"))
    assert ops.add_connection_to_group(HUB, "g1", "a")
    assert ops.add_connection_to_group(HUB, "g2", "a")
    assert a.groups == {"g1", "g2"}
    assert ops.group_exists(HUB, "g1") and ops.user_in_group(HUB, "g1", "alice")
    assert not ops.add_connection_to_group(HUB, "g1", "nope")
    assert ops.remove_connection_from_group(HUB, "g1", "a")
    assert a.groups == {"g2"} and not ops.group_exists(HUB, "g1")
    assert ops.remove_connection_from_group(HUB, None, "a")  # every group
    assert a.groups == set() and not ops.group_exists(HUB, "g2")
    assert not ops.remove_connection_from_group(HUB, "g1", "nope")


def test_a_user_group_membership_takes_later_connections_until_its_ttl_runs_out(ops, clock):
    (a1,) = open_sessions(ops, ("a1", "alice"))
    ops.add_user_to_group(HUB, "team", "alice", ttl=10)
    (a2,) = open_sessions(ops, ("a2", "alice"))  # a later connection of the user joins too
    assert a1.groups == a2.groups == {"team"}
    assert ops.send_to_group(HUB, "team", notify(1)) == 2
    clock.now += 9
    assert ops.user_in_group(HUB, "team", "alice")
    clock.now += 2
    assert not ops.user_in_group(HUB, "team", "alice")
    assert a1.groups == a2.groups == set() and not ops.group_exists(HUB, "team")


def test_a_user_group_membership_without_ttl_lasts_a_year(ops, clock):
    open_sessions(ops, ("a", "alice"))
    ops.add_user_to_group(HUB, "team", "alice")
    clock.now += USER_GROUP_DEFAULT_TTL - 1
    assert ops.user_in_group(HUB, "team", "alice")
    clock.now += 2
    assert not ops.user_in_group(HUB, "team", "alice")


def test_a_user_group_join_with_ttl_zero_adds_only_the_current_connections(ops, clock):
    (a1,) = open_sessions(ops, ("a1", "alice"))
    ops.add_user_to_group(HUB, "team", "alice", ttl=0)
    (a2,) = open_sessions(ops, ("a2", "alice"))
    assert (a1.groups, a2.groups) == ({"team"}, set())
    clock.now += 10 * USER_GROUP_DEFAULT_TTL
    ops.table.expire_user_groups(clock.now)
    assert a1.groups == {"team"} and ops.user_in_group(HUB, "team", "alice")


def test_removing_a_user_from_one_group_or_all_of_them(ops):
    a, b = open_sessions(ops, ("a", "alice"), ("b", "bob"))
    for group in ("g1", "g2"):
        ops.add_user_to_group(HUB, group, "alice")
        ops.add_user_to_group(HUB, group, "bob")
    ops.remove_user_from_group(HUB, "g1", "alice")
    assert (a.groups, b.groups) == ({"g2"}, {"g1", "g2"})
    ops.remove_user_from_group(HUB, None, "alice")
    assert a.groups == set() and not ops.user_in_group(HUB, "g2", "alice")
    ops.remove_user_from_group("other", None, "alice")  # a hub without a shard: nothing
    assert ops.user_in_group(HUB, "g2", "bob")


# -- existence ----------------------------------------------------------------------------------


def test_existence_checks_see_only_what_this_node_holds(ops):
    open_sessions(ops, ("a", "alice"))
    ops.add_connection_to_group(HUB, "g", "a")
    assert ops.connection_exists(HUB, "a") and not ops.connection_exists(HUB, "b")
    assert ops.user_exists(HUB, "alice") and not ops.user_exists(HUB, "bob")
    assert ops.group_exists(HUB, "g") and not ops.group_exists(HUB, "h")
    assert not ops.connection_exists("other", "a")
    assert ops.connection(HUB, "a").id == "a" and ops.connection(HUB, "b") is None


# -- closing ------------------------------------------------------------------------------------


def test_close_connection_sends_the_reason_with_allow_reconnect(ops):
    a, b = open_sessions(ops, ("a", None), ("b", None))
    assert ops.close_connection(HUB, "a", "bye")
    assert a.closes == [("bye", True)] and b.closes == []
    assert not ops.connection_exists(HUB, "a")
    assert not ops.close_connection(HUB, "a")
    assert not ops.close_connection(HUB, "nope")


def test_close_all_connections_spares_the_excluded(ops):
    a, b, c = open_sessions(ops, ("a", None), ("b", None), ("c", None))
    assert ops.close_all_connections(HUB, "maintenance", ["b"]) == 2
    assert [s.closes for s in (a, b, c)] == [[("maintenance", True)], [],
                                             [("maintenance", True)]]
    assert set(ops.table.view(HUB).connections) == {"b"}
    assert ops.close_all_connections("other") == 0


def test_close_user_connections_spares_the_excluded_connections_of_the_user(ops):
    a1, a2, a3, b = open_sessions(ops, ("a1", "alice"), ("a2", "alice"), ("a3", "alice"),
                                  ("b", "bob"))
    assert ops.close_user_connections(HUB, "alice", None, ["a2"]) == 2
    assert [bool(s.closes) for s in (a1, a2, a3, b)] == [True, False, True, False]
    assert a1.closes == [(None, True)]
    assert ops.close_user_connections(HUB, "nobody") == 0


def test_close_group_connections_spares_the_excluded_and_non_members(ops):
    a, b, c = open_sessions(ops, ("a", None), ("b", None), ("c", None))
    ops.add_connection_to_group(HUB, "g", "a")
    ops.add_connection_to_group(HUB, "g", "b")
    assert ops.close_group_connections(HUB, "g", "r", ["b"]) == 1
    assert [bool(s.closes) for s in (a, b, c)] == [True, False, False]
    assert ops.close_group_connections(HUB, "empty") == 0


# -- connections and app servers ----------------------------------------------------------------


def test_opening_and_closing_a_serverless_client_tells_the_upstream_and_counts(ops):
    upstream = ops.serverless = FakeUpstream()
    bound_server = FakeServer()
    (a,) = open_sessions(ops, ("a", "alice"))
    bound = FakeSession(ops, "b", server=bound_server).open()
    assert a.state is bound.state is ConnState.OPEN
    assert ops.stats.connections_opened == 2
    a.close("gone")
    bound.close()
    # Only the client without an app server is the upstream's.
    assert upstream.events == [("connected", "a"), ("disconnected", "a", "gone")]
    assert ops.stats.connections_closed == 2
    assert ops.table.get(HUB) is None  # the last client pruned the hub's shard


def test_a_client_invocation_goes_to_the_upstream_which_may_refuse_it(ops):
    (a,) = open_sessions(ops, ("a", None))
    call = InvocationMessage("Send", [1], invocation_id="7")
    assert not ops.client_invocation(a, call, b"raw")  # no upstream: nobody takes it
    upstream = ops.serverless = FakeUpstream(takes=True)
    assert ops.client_invocation(a, call, b"raw")
    assert upstream.events == [("invoke", "a", "Send", "7", b"raw")]
    upstream.takes = False
    assert not ops.client_invocation(a, call, b"raw")


def test_servers_are_listed_per_hub_until_they_close(ops):
    one, two, other = FakeServer("pod2"), FakeServer("pod1"), FakeServer("pod9", hub="news")
    for server in (one, two, FakeServer("pod1"), other):
        ops.server_opened(server)
    assert ops.server_ids(HUB) == ["pod1", "pod2"]
    assert ops.servers_of("news") == [other]
    ops.server_closed(one)
    ops.server_closed(one)  # twice is harmless
    assert ops.server_ids(HUB) == ["pod1"]
    ops.server_closed(other)
    assert ops.table.get("news") is None


def test_choose_server_takes_the_least_loaded_app_server_then_its_emptiest_connection(ops):
    assert ops.choose_server(HUB) is None
    busy, idle, other = FakeServer("pod1"), FakeServer("pod1"), FakeServer("pod2")
    weak = FakeServer("pod3", carries_clients=False)
    for server in (busy, idle, other, weak):
        ops.server_opened(server)
    busy.clients = {"x": None, "y": None}
    other.clients = {"z": None}
    # pod1 holds two clients, pod2 one; the weak pod3 none, but it carries no clients.
    assert ops.choose_server(HUB) is other
    other.clients = {"z": None, "w": None, "v": None}
    assert ops.choose_server(HUB) is idle
    assert ops.choose_server("news") is None


@pytest.mark.parametrize(("mode", "chooses", "serves_itself"),
                         [("auto", True, True), ("default", True, False),
                          ("serverless", False, True)])
def test_the_service_mode_decides_who_serves_a_hub(mode, chooses, serves_itself):
    ops = make_ops(RelayConfig(service_mode=mode))
    server = FakeServer()
    ops.server_opened(server)
    assert (ops.choose_server(HUB) is server) == chooses
    assert ops.serves_hubs_itself == serves_itself


def test_hub_metrics_and_whether_the_hub_has_clients(ops):
    assert ops.hub_metrics(HUB) == {"clientcount": 0, "servercount": 0}
    assert not ops.hub_has_clients(HUB)
    server = FakeServer()
    ops.server_opened(server)
    server.clients = {"bound-elsewhere": None}  # a client still in its handshake, say
    assert ops.hub_has_clients(HUB)
    server.clients = {}
    open_sessions(ops, ("a", None), ("b", None))
    assert ops.hub_metrics(HUB) == {"clientcount": 2, "servercount": 1}
    assert ops.hub_has_clients(HUB)
    with_capacity = make_ops(RelayConfig(capacity=500))
    assert with_capacity.hub_metrics(HUB) == {"clientcount": 0, "servercount": 0,
                                              "capacity": 500}


# -- service-protocol operation messages --------------------------------------------------------

PAYLOADS = notify(1).payload_map()


def perform_setup(ops) -> dict[str, FakeSession]:
    """a (alice, in g), b (bob), c (alice, messagepack, in g and h)."""
    a, b = open_sessions(ops, ("a", "alice"), ("b", "bob"))
    (c,) = open_sessions(ops, ("c", "alice"), protocol="messagepack")
    ops.add_connection_to_group(HUB, "g", "a")
    ops.add_connection_to_group(HUB, "g", "c")
    ops.add_connection_to_group(HUB, "h", "c")
    return {"a": a, "b": b, "c": c}


SENDS = [
    (BroadcastDataMessage(PAYLOADS), "abc"),
    (BroadcastDataMessage(PAYLOADS, ["b"]), "ac"),
    (MultiConnectionDataMessage(["a", "nope", "b"], PAYLOADS), "ab"),
    (UserDataMessage("alice", PAYLOADS), "ac"),
    (UserDataMessage("nobody", PAYLOADS), ""),
    (MultiUserDataMessage(["bob", "alice"], PAYLOADS), "abc"),
    (GroupBroadcastDataMessage("g", PAYLOADS), "ac"),
    (GroupBroadcastDataMessage("g", PAYLOADS, ["a"]), "c"),
    (GroupBroadcastDataMessage("g", PAYLOADS, (), ["alice"]), ""),
    (MultiGroupBroadcastDataMessage(["g", "h"], PAYLOADS), "ac"),
]


@pytest.mark.parametrize(("message", "reached"), SENDS)
def test_perform_sends_and_returns_how_many_it_reached(ops, message, reached):
    sessions = perform_setup(ops)
    assert ops.perform(HUB, message) == len(reached)
    got = arguments_received(*sessions.values())
    assert {conn_id for conn_id, calls in got.items() if calls == [[1]]} == set(reached)
    assert all(calls in ([], [[1]]) for calls in got.values())


GROUP_CHANGES = [
    # (message, result, groups of a, b, c afterwards)
    (JoinGroupMessage("b", "g"), True, ({"g"}, {"g"}, {"g", "h"})),
    (JoinGroupMessage("nope", "g"), False, ({"g"}, set(), {"g", "h"})),
    (JoinGroupWithAckMessage("b", "h", 1), True, ({"g"}, {"h"}, {"g", "h"})),
    (JoinGroupWithAckMessage("nope", "h", 1), False, ({"g"}, set(), {"g", "h"})),
    (LeaveGroupMessage("c", "g"), True, ({"g"}, set(), {"h"})),
    (LeaveGroupMessage("c", None), True, ({"g"}, set(), set())),
    (LeaveGroupWithAckMessage("a", "g", 1), True, (set(), set(), {"g", "h"})),
    (LeaveGroupWithAckMessage("nope", "g", 1), False, ({"g"}, set(), {"g", "h"})),
    (UserJoinGroupMessage("bob", "h"), None, ({"g"}, {"h"}, {"g", "h"})),
    (UserJoinGroupWithAckMessage("alice", "k", 1, 60), True, ({"g", "k"}, set(),
                                                              {"g", "h", "k"})),
    (UserLeaveGroupMessage("alice", "g"), None, (set(), set(), {"h"})),
    (UserLeaveGroupWithAckMessage("alice", None, 1), True, (set(), set(), set())),
]


@pytest.mark.parametrize(("message", "result", "groups"), GROUP_CHANGES)
def test_perform_changes_groups_and_returns_what_the_ack_reports(ops, message, result, groups):
    sessions = perform_setup(ops)
    assert ops.perform(HUB, message) == result
    assert tuple(sessions[c].groups for c in "abc") == groups


def test_perform_a_user_join_with_ttl_ends_the_membership_when_it_runs_out(ops, clock):
    sessions = perform_setup(ops)
    assert ops.perform(HUB, UserJoinGroupWithAckMessage("bob", "k", 1, 30)) is True
    assert ops.perform(HUB, CheckUserInGroupWithAckMessage("bob", "k", 2)) is True
    clock.now += 31
    ops.table.expire_user_groups(clock.now)
    assert ops.perform(HUB, CheckUserInGroupWithAckMessage("bob", "k", 3)) is False
    assert sessions["b"].groups == set()


CHECKS = [
    (CheckUserInGroupWithAckMessage("alice", "g", 1), True),
    (CheckUserInGroupWithAckMessage("bob", "g", 1), False),
    (CheckGroupExistenceWithAckMessage("h", 1), True),
    (CheckGroupExistenceWithAckMessage("nope", 1), False),
    (CheckConnectionExistenceWithAckMessage("b", 1), True),
    (CheckConnectionExistenceWithAckMessage("nope", 1), False),
    (CheckUserExistenceWithAckMessage("bob", 1), True),
    (CheckUserExistenceWithAckMessage("nobody", 1), False),
]


@pytest.mark.parametrize(("message", "result"), CHECKS)
def test_perform_checks_answer_what_exists(ops, message, result):
    perform_setup(ops)
    assert ops.perform(HUB, message) is result


CLOSES = [
    # (message, result, {closed connection: reason})
    (CloseConnectionMessage("a", "gone"), True, {"a": "gone"}),
    (CloseConnectionMessage("a", ""), True, {"a": None}),  # no error text: no reason
    (CloseConnectionMessage("nope", "gone"), False, {}),
    (CloseConnectionWithAckMessage("b", 1, "r"), True, {"b": "r"}),
    (CloseConnectionWithAckMessage("nope", 1, "r"), False, {}),
    (CloseConnectionsWithAckMessage(1, "all", ["b"]), True, {"a": "all", "c": "all"}),
    (CloseUserConnectionsWithAckMessage("alice", 1, "u", ["c"]), True, {"a": "u"}),
    (CloseUserConnectionsWithAckMessage("nobody", 1, "u"), True, {}),
    (CloseGroupConnectionsWithAckMessage("g", 1, None, ["a"]), True, {"c": None}),
]


@pytest.mark.parametrize(("message", "result", "closed"), CLOSES)
def test_perform_closes_and_returns_what_the_ack_reports(ops, message, result, closed):
    sessions = perform_setup(ops)
    assert ops.perform(HUB, message) is result
    assert {c: s.closes for c, s in sessions.items() if s.closes} == {
        c: [(reason, True)] for c, reason in closed.items()}


def test_every_operation_message_is_performed_here():
    # A new operation message needs its row in one of the tables above.
    covered = {type(m) for table in (SENDS, GROUP_CHANGES, CHECKS, CLOSES) for m, *_ in table}
    assert covered == OPERATION_MESSAGES


def test_perform_refuses_a_message_that_is_not_an_operation(ops):
    with pytest.raises(KeyError):
        ops.perform(HUB, ClientCompletionMessage("i", "a", "pod1", "json", b""))


# -- client results across app servers ----------------------------------------------------------


def invocation_setup(ops, **config: Any) -> tuple[FakeSession, FakeServer, FakeServer]:
    """Client ``a`` bound to app server pod1; pod2 invokes it."""
    owner, caller = FakeServer("pod1"), FakeServer("pod2")
    ops.server_opened(owner)
    ops.server_opened(caller)
    client = FakeSession(ops, "a", server=owner).open()
    return client, owner, caller


def invoke(invocation_id: str = "i1", connection_id: str = "a") -> ClientInvocationMessage:
    return ClientInvocationMessage(invocation_id, connection_id, "pod2", PAYLOADS)


def test_a_client_invocation_reaches_the_client_and_its_owner_and_the_result_the_caller(ops):
    client, owner, caller = invocation_setup(ops)
    ops.invocations.invoke(caller, invoke())
    assert arguments_received(client) == {"a": [[1]]}
    assert owner.sent == [invoke()]  # the owner routes the client's completion
    completion = ClientCompletionMessage("i1", "a", "pod2", "json", b"{}")
    ops.invocations.complete(owner, completion)
    assert caller.sent == [completion]
    assert ops.invocations.pending == {}
    ops.invocations.complete(owner, completion)  # unknown by now: dropped
    assert caller.sent == [completion]


def test_a_client_invocation_by_the_clients_own_server_is_not_echoed_to_it(ops):
    client, owner, caller = invocation_setup(ops)
    ops.invocations.invoke(owner, ClientInvocationMessage("i1", "a", "pod1", PAYLOADS))
    assert owner.sent == [] and arguments_received(client) == {"a": [[1]]}
    # The caller's own completion only clears the entry.
    ops.invocations.complete(owner, ErrorCompletionMessage("i1", "a", "pod1", "cancelled"))
    assert owner.sent == [] and ops.invocations.pending == {}


def test_a_client_invocation_for_an_unknown_client_fails_at_once(ops):
    _, _, caller = invocation_setup(ops)
    ops.invocations.invoke(caller, invoke(connection_id="nope"))
    assert caller.sent == [ErrorCompletionMessage("i1", "nope", "pod2",
                                                  "Connection 'nope' does not exist.")]


def test_pending_client_invocations_fail_when_the_client_leaves_or_they_time_out(ops, clock):
    client, _, caller = invocation_setup(ops)
    ops.invocations.invoke(caller, invoke("i1"))
    ops.invocations.client_gone(client)
    assert caller.sent == [ErrorCompletionMessage("i1", "a", "pod2",
                                                  "Connection 'a' disconnected.")]
    ops.invocations.invoke(caller, invoke("i2"))
    ops.invocations.expire(clock.now + ClientInvocations.TIMEOUT - 1)
    assert len(caller.sent) == 1
    ops.invocations.expire(clock.now + ClientInvocations.TIMEOUT)
    assert caller.sent[1] == ErrorCompletionMessage(
        "i2", "a", "pod2", "The client invocation on connection 'a' timed out.")
    assert ops.invocations.pending == {}


def test_client_invocations_past_the_limit_or_with_a_waiting_id_are_refused():
    ops = make_ops(RelayConfig(max_pending_invocations=2))
    _, _, caller = invocation_setup(ops)
    ops.invocations.invoke(caller, invoke("i1"))
    ops.invocations.invoke(caller, invoke("i1"))
    ops.invocations.invoke(caller, invoke("i2"))
    ops.invocations.invoke(caller, invoke("i3"))
    assert [m.error for m in caller.sent] == [
        "Invocation 'i1' is already waiting.",
        "Connection 'a' has 2 client invocations waiting already."]
    assert ops.stats.invocations_refused == 2
    assert set(ops.invocations.pending) == {"i1", "i2"}
