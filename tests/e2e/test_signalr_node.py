"""The official ``@microsoft/signalr`` client (Node.js) against the real relay, driven through
the data-plane REST API (service-protocol §12; client-protocol §1, §4.3, §6).

"Reaches nobody else" is proved without sleeping: after the send under test, a broadcast
marker goes to the whole hub and the test waits until every live client has it. A client's
messages arrive in order on one socket, so whatever it got before the marker is exactly what
the sends under test delivered to it (``barrier``).
"""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Sequence
from urllib.parse import quote

import httpx
import msgpack
import pytest
import trio

from relaycore.protocol._hub import JsonHubProtocol, MessagePackHubProtocol

from .harness import (
    WAIT,
    AgentError,
    NodeAgent,
    NodeAgentFactory,
    RelayFactory,
    RelayProcess,
    Rest,
    open_rest,
)

pytestmark = pytest.mark.e2e

PROTOCOLS = ["json", "messagepack"]

#: name -> user id (None: an anonymous connection). alice has two connections.
USERS = {"a1": "alice", "a2": "alice", "b": "bob", "c": "carol", "anon": None}

_markers = itertools.count()


@pytest.fixture(params=PROTOCOLS)
def protocol(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def connect_all(agent: NodeAgent, relay: RelayProcess, protocol: str | Sequence[str],
                      users: dict[str, str | None] = USERS, hub: str = "chat") -> dict[str, str]:
    """Connect every ``name: user`` at once; returns ``name -> connectionId``."""
    ids: dict[str, str] = {}
    protocols = itertools.cycle([protocol] if isinstance(protocol, str) else protocol)

    async def one(name: str, user: str | None, proto: str) -> None:
        ids[name] = await agent.connect(name, relay.client_url(hub),
                                        relay.client_token(hub, user), protocol=proto)

    async with trio.open_nursery() as nursery:
        for (name, user), proto in zip(users.items(), protocols, strict=False):
            nursery.start_soon(one, name, user, proto)
    assert len(set(ids.values())) == len(ids), f"connection ids are not unique: {ids}"
    return ids


async def barrier(agent: NodeAgent, rest: Rest, names: Sequence[str] | None = None
                  ) -> dict[str, list[list[object]]]:
    """Broadcast a marker to the hub, wait until each of ``names`` (default: every live
    connection) has it, and return the arguments of what each received before it."""
    names = agent.live() if names is None else list(names)
    marker = f"marker-{next(_markers)}"
    await rest.send_all("notify", marker)

    def has_marker(name: str) -> bool:
        return any(m.args == [marker] for m in agent.messages.get(name, []))

    await agent.wait_for(lambda: all(has_marker(n) for n in names),
                         what=f"the broadcast marker {marker!r} on {names}")
    got: dict[str, list[list[object]]] = {}
    for name in names:
        messages = agent.take(name)
        index = next(i for i, m in enumerate(messages) if m.args == [marker])
        assert index == len(messages) - 1, f"{name} received after the marker: {messages}"
        assert all(m.method == "notify" for m in messages), messages
        got[name] = [m.args for m in messages[:index]]
    return got


def nothing(*names: str) -> dict[str, list[list[object]]]:
    return {name: [] for name in names}


# ---------------------------------------------------------------------------------------------
# sends


async def test_broadcast_reaches_every_connection_of_the_hub_only(
        relay: RelayProcess, rest: Rest, node_agent: NodeAgent, protocol: str) -> None:
    await connect_all(node_agent, relay, protocol)
    await node_agent.connect("other", relay.client_url("other"), relay.client_token("other"),
                             protocol=protocol)

    await rest.send_all("notify", "hello", 42, {"nested": [1, 2.5, None, True]})
    everyone = [["hello", 42, {"nested": [1, 2.5, None, True]}]]
    assert await barrier(node_agent, rest, list(USERS)) == {n: everyone for n in USERS}

    # The other hub got neither the broadcast nor the chat markers: only its own broadcast.
    await rest.hub("other").send_all("notify", "other hub")
    assert [m.args for m in await node_agent.wait_messages("other", 1)] == [["other hub"]]
    assert await barrier(node_agent, rest, list(USERS)) == nothing(*USERS)


async def test_broadcast_excluded_connections(
        relay: RelayProcess, rest: Rest, node_agent: NodeAgent, protocol: str) -> None:
    ids = await connect_all(node_agent, relay, protocol)

    await rest.send_all("notify", "not a1, not b", excluded=[ids["a1"], ids["b"]])
    assert await barrier(node_agent, rest) == {
        "a1": [], "a2": [["not a1, not b"]], "b": [], "c": [["not a1, not b"]],
        "anon": [["not a1, not b"]]}

    await rest.send_all("notify", "unknown excluded id", excluded=["no-such-connection"])
    assert await barrier(node_agent, rest) == {n: [["unknown excluded id"]] for n in USERS}


async def test_send_to_user_reaches_all_its_connections_only(
        relay: RelayProcess, rest: Rest, node_agent: NodeAgent, protocol: str) -> None:
    await connect_all(node_agent, relay, protocol)

    await rest.send_user("alice", "notify", "to alice")
    assert await barrier(node_agent, rest) == {
        **nothing(*USERS), "a1": [["to alice"]], "a2": [["to alice"]]}

    await rest.send_user("bob", "notify", "to bob")
    await rest.send_user("nobody", "notify", "to nobody")  # 202 all the same
    assert await barrier(node_agent, rest) == {**nothing(*USERS), "b": [["to bob"]]}


async def test_send_to_connection_reaches_that_connection_only(
        relay: RelayProcess, rest: Rest, node_agent: NodeAgent, protocol: str) -> None:
    ids = await connect_all(node_agent, relay, protocol)

    await rest.send_connection(ids["a2"], "notify", "to a2")
    await rest.send_connection(ids["anon"], "notify", "to anon")
    await rest.send_connection("no-such-connection", "notify", "to nobody")
    assert await barrier(node_agent, rest) == {
        **nothing(*USERS), "a2": [["to a2"]], "anon": [["to anon"]]}


async def test_group_add_and_remove_change_who_receives(
        relay: RelayProcess, rest: Rest, node_agent: NodeAgent, protocol: str) -> None:
    ids = await connect_all(node_agent, relay, protocol)

    await rest.send_group("g1", "notify", "empty group")
    assert await barrier(node_agent, rest) == nothing(*USERS)

    await rest.add_to_group("g1", ids["a1"])
    await rest.add_to_group("g1", ids["c"])
    await rest.add_to_group("g1", ids["c"])  # idempotent
    await rest.add_to_group("g2", ids["anon"])
    await rest.send_group("g1", "notify", "to g1")
    assert await barrier(node_agent, rest) == {
        **nothing(*USERS), "a1": [["to g1"]], "c": [["to g1"]]}

    await rest.send_group("g1", "notify", "g1 but c", excluded=[ids["c"]])
    assert await barrier(node_agent, rest) == {**nothing(*USERS), "a1": [["g1 but c"]]}

    await rest.remove_from_group("g1", ids["a1"])
    await rest.send_group("g1", "notify", "g1 after a1 left")
    await rest.send_group("g2", "notify", "to g2")
    assert await barrier(node_agent, rest) == {
        **nothing(*USERS), "c": [["g1 after a1 left"]], "anon": [["to g2"]]}

    # Leaving every group (DELETE .../connections/{c}/groups).
    await rest.request("DELETE", f"/connections/{ids['c']}/groups", expect=200)
    await rest.send_group("g1", "notify", "g1 is empty again")
    assert await barrier(node_agent, rest) == nothing(*USERS)


async def test_user_group_membership_covers_current_and_later_connections(
        relay: RelayProcess, rest: Rest, node_agent: NodeAgent, protocol: str) -> None:
    await connect_all(node_agent, relay, protocol)

    await rest.add_user_to_group("alice", "team")
    await rest.send_group("team", "notify", "team 1")
    assert await barrier(node_agent, rest) == {
        **nothing(*USERS), "a1": [["team 1"]], "a2": [["team 1"]]}

    # A connection alice opens later is in the group as well.
    await node_agent.connect("a3", relay.client_url(), relay.client_token(user="alice"),
                             protocol=protocol)
    await rest.send_group("team", "notify", "team 2")
    assert await barrier(node_agent, rest) == {
        **nothing(*USERS, "a3"), "a1": [["team 2"]], "a2": [["team 2"]], "a3": [["team 2"]]}
    await rest.head("/users/alice/groups/team", expect=200)

    await rest.remove_user_from_group("alice", "team")
    await rest.send_group("team", "notify", "team 3")
    assert await barrier(node_agent, rest) == nothing(*USERS, "a3")
    response = await rest.head("/users/alice/groups/team", expect=404)
    assert response.headers.get("x-ms-error-code") == "Info.User.NotInGroup"

    # ... and no longer applies to alice's later connections.
    await node_agent.connect("a4", relay.client_url(), relay.client_token(user="alice"),
                             protocol=protocol)
    await rest.send_group("team", "notify", "team 4")
    assert await barrier(node_agent, rest) == nothing(*USERS, "a3", "a4")


async def test_user_group_ttl_zero_covers_current_connections_only(
        relay: RelayProcess, rest: Rest, node_agent: NodeAgent, protocol: str) -> None:
    await connect_all(node_agent, relay, protocol)

    await rest.add_user_to_group("bob", "now", ttl=0)
    await node_agent.connect("b2", relay.client_url(), relay.client_token(user="bob"),
                             protocol=protocol)
    await rest.send_group("now", "notify", "bob's current connection")
    assert await barrier(node_agent, rest) == {
        **nothing(*USERS, "b2"), "b": [["bob's current connection"]]}

    # With a TTL, later connections are covered (until it expires).
    await rest.add_user_to_group("carol", "later", ttl=3600)
    await node_agent.connect("c2", relay.client_url(), relay.client_token(user="carol"),
                             protocol=protocol)
    await rest.send_group("later", "notify", "carol's connections")
    assert await barrier(node_agent, rest) == {
        **nothing(*USERS, "b2", "c2"), "c": [["carol's connections"]],
        "c2": [["carol's connections"]]}

    # DELETE .../users/{user}/groups: out of every group, now and for later connections.
    await rest.add_user_to_group("carol", "more")
    await rest.request("DELETE", "/users/carol/groups", expect=204)
    await node_agent.connect("c3", relay.client_url(), relay.client_token(user="carol"),
                             protocol=protocol)
    for group in ("later", "more"):
        await rest.send_group(group, "notify", f"{group} after leaving")
    assert await barrier(node_agent, rest) == nothing(*USERS, "b2", "c2", "c3")


# ---------------------------------------------------------------------------------------------
# closing


async def test_delete_connection_closes_it_with_the_reason(
        relay: RelayProcess, rest: Rest, node_agent: NodeAgent, protocol: str) -> None:
    ids = await connect_all(node_agent, relay, protocol)

    await rest.close_connection(ids["b"], reason="kicked by the e2e test", expect=200)
    error = await node_agent.wait_closed("b")
    assert error is not None and "kicked by the e2e test" in error, error
    assert set(node_agent.live()) == set(USERS) - {"b"}

    response = await rest.head(f"/connections/{ids['b']}", expect=404)
    assert response.headers.get("x-ms-error-code") == "Warning.Connection.NotExisted"
    response = await rest.close_connection(ids["b"], expect=404)
    assert response.headers.get("x-ms-error-code") == "Warning.Connection.NotExisted"
    await rest.send_user("bob", "notify", "bob is gone")
    assert await barrier(node_agent, rest) == _nothing_but(list(USERS), exclude=["b"])


def _nothing_but(names: Sequence[str], exclude: Sequence[str]) -> dict[str, list[list[object]]]:
    return {n: [] for n in names if n not in exclude}


async def test_close_user_connections(
        relay: RelayProcess, rest: Rest, node_agent: NodeAgent, protocol: str) -> None:
    ids = await connect_all(node_agent, relay, protocol)

    await rest.close_user("alice", reason="alice logged out", excluded=[ids["a2"]])
    error = await node_agent.wait_closed("a1")
    assert error is not None and "alice logged out" in error, error
    assert await barrier(node_agent, rest) == _nothing_but(list(USERS), exclude=["a1"])
    assert "a2" not in node_agent.closed

    await rest.close_user("alice", reason="really")
    error = await node_agent.wait_closed("a2")
    assert error is not None and "really" in error, error
    response = await rest.head("/users/alice", expect=404)
    assert response.headers.get("x-ms-error-code") == "Warning.User.NotExisted"
    assert await barrier(node_agent, rest) == _nothing_but(list(USERS), exclude=["a1", "a2"])


async def test_close_group_connections(
        relay: RelayProcess, rest: Rest, node_agent: NodeAgent, protocol: str) -> None:
    ids = await connect_all(node_agent, relay, protocol)
    for name in ("a1", "b", "anon"):
        await rest.add_to_group("doomed", ids[name])

    await rest.close_group("doomed", reason="group closed", excluded=[ids["anon"]])
    for name in ("a1", "b"):
        error = await node_agent.wait_closed(name)
        assert error is not None and "group closed" in error, (name, error)
    assert await barrier(node_agent, rest) == _nothing_but(list(USERS), exclude=["a1", "b"])
    assert set(node_agent.closed) == {"a1", "b"}
    await rest.head("/groups/doomed", expect=200)  # anon is still in it


async def test_close_all_connections(
        relay: RelayProcess, rest: Rest, node_agent: NodeAgent, protocol: str) -> None:
    ids = await connect_all(node_agent, relay, protocol)
    await node_agent.connect("other", relay.client_url("other"), relay.client_token("other"),
                             protocol=protocol)

    await rest.close_all(reason="maintenance", excluded=[ids["c"]])
    for name in ("a1", "a2", "b", "anon"):
        error = await node_agent.wait_closed(name)
        assert error is not None and "maintenance" in error, (name, error)
    assert await barrier(node_agent, rest, ["c"]) == {"c": []}
    assert "other" not in node_agent.closed  # another hub is not touched

    await rest.close_all()
    await node_agent.wait_closed("c")
    assert node_agent.live() == ["other"]


async def test_client_stop_removes_the_connection(
        relay: RelayProcess, rest: Rest, node_agent: NodeAgent, protocol: str) -> None:
    ids = await connect_all(node_agent, relay, protocol, {"b": "bob", "c": "carol"})
    await rest.add_to_group("solo", ids["b"])

    await node_agent.stop("b")
    assert await node_agent.wait_closed("b") is None
    # stop() does not wait for the relay, which removes the connection when it reads the
    # client's Close message (or the socket's end) a moment later.
    response = await rest.wait_status("HEAD", f"/connections/{ids['b']}", 404)
    assert response.headers.get("x-ms-error-code") == "Warning.Connection.NotExisted"
    response = await rest.head("/users/bob", expect=404)
    assert response.headers.get("x-ms-error-code") == "Warning.User.NotExisted"
    response = await rest.head("/groups/solo", expect=404)
    assert response.headers.get("x-ms-error-code") == "Warning.Group.NotExisted"
    assert await barrier(node_agent, rest) == {"c": []}


# ---------------------------------------------------------------------------------------------
# existence checks


async def test_existence_checks(
        relay: RelayProcess, rest: Rest, node_agent: NodeAgent, protocol: str) -> None:
    ids = await connect_all(node_agent, relay, protocol)

    async def check(path: str, status: int, code: str | None = None,
                    method: str = "HEAD") -> None:
        response = await rest.request(method, path, expect=status)
        assert response.headers.get("x-ms-error-code") == code, (path, response.headers)

    await check(f"/connections/{ids['a1']}", 200)
    await check("/connections/no-such-connection", 404, "Warning.Connection.NotExisted")
    await check("/users/alice", 200)
    await check("/users/nobody", 404, "Warning.User.NotExisted")
    await check("/groups/g", 404, "Warning.Group.NotExisted")
    await check("/users/bob/groups/g", 404, "Info.User.NotInGroup")

    await rest.add_to_group("g", ids["b"])
    await check("/groups/g", 200)
    await check("/users/bob/groups/g", 200)
    await check("/users/bob/groups/g", 200, method="GET")  # what IsUserInGroup sends
    await check("/users/carol/groups/g", 404, "Info.User.NotInGroup", method="GET")

    response = await rest.add_to_group("g", "no-such-connection", expect=404)
    assert response.headers.get("x-ms-error-code") == "Error.Connection.NotExisted"

    # The health probe needs no token.
    async with httpx.AsyncClient(base_url=relay.endpoint, timeout=WAIT) as anonymous:
        with trio.fail_after(WAIT):
            response = await anonymous.head("/api/health")
    assert response.status_code == 200, response


# ---------------------------------------------------------------------------------------------
# payloads and protocols


def _payload_map(**entries: bytes) -> bytes:
    return msgpack.packb(entries, use_bin_type=True)


async def test_messagepack_rest_body_reaches_json_and_messagepack_clients(
        relay: RelayProcess, rest: Rest, node_agent: NodeAgent) -> None:
    users = {"j1": "alice", "m1": "alice", "j2": "bob", "m2": "bob"}
    ids = await connect_all(node_agent, relay, ["json", "messagepack"], users)

    # Each entry says which one it is, so each client proves it got its own protocol's entry,
    # forwarded as the app server framed it.
    body = _payload_map(
        json=JsonHubProtocol().write_invocation("notify", ["via json entry", 1]),
        messagepack=MessagePackHubProtocol().write_invocation("notify", ["via msgpack entry", 1]))
    await rest.send_payloads("/:send", body)
    assert await barrier(node_agent, rest) == {
        "j1": [["via json entry", 1]], "j2": [["via json entry", 1]],
        "m1": [["via msgpack entry", 1]], "m2": [["via msgpack entry", 1]]}

    for path in ("/users/bob/:send", f"/connections/{ids['m1']}/:send"):
        await rest.send_payloads(path, body, content_type="application/octet-stream")
    assert await barrier(node_agent, rest) == {
        "j1": [], "m1": [["via msgpack entry", 1]],
        "j2": [["via json entry", 1]], "m2": [["via msgpack entry", 1]]}

    await rest.add_to_group("mixed", ids["j1"])
    await rest.add_to_group("mixed", ids["m2"])
    await rest.send_payloads("/groups/mixed/:send", body)
    assert await barrier(node_agent, rest) == {
        "j1": [["via json entry", 1]], "m1": [], "j2": [], "m2": [["via msgpack entry", 1]]}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


async def test_binary_argument_round_trip_messagepack(
        relay: RelayProcess, rest: Rest, node_agent: NodeAgent) -> None:
    await connect_all(node_agent, relay, ["messagepack", "json"], {"m": "alice", "j": "bob"})
    blob = bytes(range(256)) * 3 + b"\x00\x1e\xff"

    # Framed by hand (hub-protocol §3.5: VarInt length, then [1, headers, id, target, args]),
    # independently of relaycore's encoder.
    invocation = msgpack.packb([1, {}, None, "notify", [blob, "tail"]], use_bin_type=True)
    json_entry = json.dumps({"type": 1, "target": "notify",
                             "arguments": ["base64 for json clients", "tail"]}).encode() + b"\x1e"
    body = _payload_map(messagepack=_varint(len(invocation)) + invocation, json=json_entry)
    await rest.send_payloads("/:send", body)
    assert await barrier(node_agent, rest) == {
        "m": [[blob, "tail"]], "j": [["base64 for json clients", "tail"]]}

    # The client's own binary message is parsed by the relay; with no app server an invocation
    # that waits for a result gets a completion error (never silence), and the connection lives.
    with pytest.raises(AgentError, match="not delivered"):
        await node_agent.invoke("m", "echo", blob)
    await node_agent.send("m", "fireAndForget", blob)
    assert await barrier(node_agent, rest) == {"m": [], "j": []}


async def test_invocation_without_app_server_gets_a_completion_error(
        relay: RelayProcess, rest: Rest, node_agent: NodeAgent, protocol: str) -> None:
    await connect_all(node_agent, relay, protocol, {"a": "alice"})
    with pytest.raises(AgentError, match="not delivered"):
        await node_agent.invoke("a", "SendMessage", "hello", {"x": 1})
    assert await node_agent.state("a") == "Connected"
    assert await barrier(node_agent, rest) == {"a": []}


# ---------------------------------------------------------------------------------------------
# tokens


async def test_cli_token_works_as_a_negotiate_redirect(
        relay: RelayProcess, rest: Rest, node_agent: NodeAgent) -> None:
    cmd = [sys.executable, "-m", "relaycore", "token", "--hub", "chat", "--user", "alice",
           "--port", str(relay.port), f"--access-key={relay.access_key}"]
    with trio.fail_after(WAIT * 2):
        result = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True,
                                        check=False, env=relay.env)
    assert result.returncode == 0, result.stderr.decode()
    redirect = json.loads(result.stdout)
    assert redirect["url"] == relay.client_url("chat"), redirect

    await node_agent.connect("a", redirect["url"], redirect["accessToken"])
    await rest.send_user("alice", "notify", "via the CLI token")
    assert await barrier(node_agent, rest) == {"a": [["via the CLI token"]]}


@pytest.mark.parametrize("problem", ["wrong key", "expired", "other hub", "none"])
async def test_start_fails_with_a_bad_token(
        relay: RelayProcess, node_agent: NodeAgent, problem: str) -> None:
    token = {
        "wrong key": relay.client_token(user="alice", key="not-the-relay-key"),
        "expired": relay.client_token(user="alice", now=0, lifetime=60),
        "other hub": relay.client_token("other", user="alice"),
        "none": None,
    }[problem]
    with pytest.raises(AgentError, match="401"):
        await node_agent.connect("a", relay.client_url("chat"), token)


async def test_skip_negotiation(relay: RelayProcess, rest: Rest, node_agent: NodeAgent,
                                protocol: str) -> None:
    """``skipNegotiation`` opens the WebSocket at once (client-protocol §1.5)."""
    await node_agent.connect("a", relay.client_url(), relay.client_token(user="alice"),
                             protocol=protocol, skipNegotiation=True)
    await rest.send_user("alice", "notify", "no negotiate")
    assert await barrier(node_agent, rest) == {"a": [["no negotiate"]]}


# ---------------------------------------------------------------------------------------------
# sizes, numbers, names


async def test_large_messages_both_ways(
        relay: RelayProcess, rest: Rest, node_agent: NodeAgent, protocol: str) -> None:
    """Frames past the 16-bit and into the 64-bit WebSocket length forms (RFC 6455 §5.2)."""
    await connect_all(node_agent, relay, protocol, {"a": "alice", "b": "bob"})
    sizes = [125, 126, 65535, 65536, 300_000]
    for size in sizes:
        await rest.send_user("alice", "notify", "x" * size)
    assert await barrier(node_agent, rest) == {"a": [["x" * size] for size in sizes], "b": []}

    # A large client message is read whole (and, with no app server, answered with an error).
    with pytest.raises(AgentError, match="not delivered"):
        await node_agent.invoke("a", "upload", "y" * 200_000)
    assert await barrier(node_agent, rest) == {"a": [], "b": []}


async def test_fan_out_to_many_connections(
        relay: RelayProcess, rest: Rest, node_agent: NodeAgent, protocol: str) -> None:
    users = {f"c{i}": f"user{i % 5}" for i in range(24)}
    ids = await connect_all(node_agent, relay, protocol, users)
    for name in list(users)[::3]:
        await rest.add_to_group("thirds", ids[name])

    for i in range(5):
        await rest.send_all("notify", i)
    await rest.send_group("thirds", "notify", "thirds")
    await rest.send_user("user1", "notify", "user1")
    expected = {name: [[i] for i in range(5)] for name in users}
    for index, name in enumerate(users):
        if index % 3 == 0:
            expected[name].append(["thirds"])
        if index % 5 == 1:
            expected[name].append(["user1"])
    assert await barrier(node_agent, rest) == expected


async def test_escaped_user_and_group_names(
        relay: RelayProcess, rest: Rest, node_agent: NodeAgent, protocol: str) -> None:
    """Ids with spaces, non-ASCII letters and an escaped ``/`` survive the path and the token."""
    user = "Zoë Ünïcode 1"
    await connect_all(node_agent, relay, protocol, {"z": user, "o": "other"})
    ids = node_agent.connection_ids
    await rest.send_user(quote(user, safe=""), "notify", "to zoë")
    group = quote("team/α β", safe="")
    await rest.add_to_group(group, ids["z"])
    await rest.send_group(group, "notify", "to the team")
    await rest.head(f"/groups/{group}", expect=200)
    await rest.head(f"/users/{quote(user, safe='')}", expect=200)
    assert await barrier(node_agent, rest) == {"z": [["to zoë"], ["to the team"]], "o": []}


# ---------------------------------------------------------------------------------------------
# client options, shutdown and reconnect


async def test_client_asking_for_stateful_reconnect_still_connects(
        relay: RelayProcess, rest: Rest, node_agent: NodeAgent, protocol: str) -> None:
    """A client that asks for stateful reconnect gets a working connection whether the relay
    agrees or not (negotiate never answers ``useStatefulReconnect: true`` unasked; the resume
    itself is ``test_stateful_reconnect_node.py``)."""
    await node_agent.connect("s", relay.client_url(), relay.client_token(user="alice"),
                             protocol=protocol, statefulReconnect=True)
    await rest.send_user("alice", "notify", "stateful?")
    assert await barrier(node_agent, rest) == {"s": [["stateful?"]]}


async def test_relay_shutdown_closes_clients_and_they_reconnect_to_its_successor(
        relay_factory: RelayFactory, node_agent_factory: NodeAgentFactory, protocol: str) -> None:
    """SIGTERM drains: every client gets a Close message with ``allowReconnect`` (client-protocol
    §4.3). A client without automatic reconnect closes with the relay's reason; one with it
    reconnects, here to a new relay on the same port (a restart, or another node)."""
    first = await relay_factory()
    agent = await node_agent_factory(first)
    await agent.connect("plain", first.client_url(), first.client_token(user="alice"),
                        protocol=protocol)
    await agent.connect("auto", first.client_url(), first.client_token(user="bob"),
                        protocol=protocol, automaticReconnect=True)
    old_id = agent.connection_ids["auto"]

    await first.stop()  # SIGTERM, then exit status 0 within the deadline
    error = await agent.wait_closed("plain")
    assert error is not None and "shutting down" in error, error
    reconnecting = await agent.wait_event("auto", "reconnecting")
    assert "auto" not in agent.closed, agent.events
    assert reconnecting["error"] is None or "shutting down" in reconnecting["error"], reconnecting

    # The client's retries (0 s, 2 s, 10 s, ...) find the successor.
    second = await relay_factory(args=["--port", str(first.port)], access_key=first.access_key)
    reconnected = await agent.wait_event("auto", "reconnected", timeout=WAIT * 2)
    assert reconnected["connectionId"] not in (None, old_id), reconnected
    async with open_rest(second) as rest:
        await rest.send_user("bob", "notify", "welcome back")
        assert [m.args for m in await agent.wait_messages("auto", 1)] == [["welcome back"]]
        await rest.head(f"/connections/{reconnected['connectionId']}", expect=200)
