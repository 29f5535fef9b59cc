"""Negotiated connection tokens (``relay/_negotiated.py``): issued by one node, accepted by any
node that shares the access keys, once, by the user that negotiated, on its hub, in time.

No socket and no real time: the node's clock and the wall clock are plain variables.
"""

from __future__ import annotations

import pytest
from relayfakes import HUB
from test_front import client_request, exchange, make_front, negotiated

from relaycore.relay._http import HttpError
from relaycore.relay._negotiated import NegotiatedTokens


class Clocks:
    def __init__(self) -> None:
        self.node = 100.0
        self.wall = 1_800_000_000.0


@pytest.fixture
def clocks() -> Clocks:
    return Clocks()


def node(clocks: Clocks, keys=("key-one",)) -> NegotiatedTokens:
    return NegotiatedTokens(list(keys), lambda: clocks.node, lambda: clocks.wall)


def refused(tokens: NegotiatedTokens, token: str, hub: str = HUB, user: str | None = "alice"
            ) -> tuple[int, str]:
    with pytest.raises(HttpError) as caught:
        tokens.take(token, hub, user)
    return caught.value.status, str(caught.value)


def test_a_token_issued_on_one_node_opens_the_connection_on_another_under_its_id(clocks):
    a, b = node(clocks), node(clocks)
    token = a.issue("a.RANDOM", HUB, "alice", timeout=10, signed=True)
    assert "RANDOM" not in token.split(".")[1]  # the MAC, not the id
    assert b.take(token, HUB, "alice") == "a.RANDOM"
    # Spent there: a second transport with it is refused (on the issuer it is still good once).
    assert refused(b, token)[0] == 404
    assert a.take(token, HUB, "alice") == "a.RANDOM"
    assert refused(a, token)[0] == 404


def test_a_foreign_token_is_refused_for_another_hub_user_key_or_when_late_or_altered(clocks):
    a, b = node(clocks), node(clocks)
    token = a.issue("a.R1", HUB, "alice", timeout=10, signed=True)
    assert refused(b, token, hub="news")[0] == 404
    assert refused(b, token, user="mallory") == (
        403, "the connection id was negotiated by another user")
    assert refused(b, token, user=None)[0] == 403
    assert refused(node(clocks, keys=["another key"]), token)[0] == 404
    payload, mac = token.split(".")
    assert refused(b, payload + "." + mac[::-1])[0] == 404
    assert refused(b, payload[:-2] + "." + mac)[0] == 404
    for junk in ("", ".", "x.y", "no-dot", "a" * 5000):
        assert refused(b, junk)[0] == 404
    clocks.wall += 12
    assert refused(b, token)[0] == 404
    # Still good on b after all those refusals, had it been in time.
    clocks.wall -= 12
    assert b.take(token, HUB, "alice") == "a.R1"


def test_a_rotated_key_still_accepts_tokens_signed_with_the_old_one(clocks):
    old = node(clocks, keys=["old"])
    token = old.issue("x.R", HUB, None, timeout=10, signed=True)
    assert node(clocks, keys=["new", "old"]).take(token, HUB, None) == "x.R"


def test_the_issuer_keeps_its_tokens_by_its_own_clock_and_forgets_them_at_expire(clocks):
    a = node(clocks)
    token = a.issue("a.R", HUB, "alice", timeout=10, signed=True)
    clocks.node += 11
    a.expire(clocks.node)
    # Forgotten by its issuer, it is not taken for a foreign token, though signed and in time.
    assert refused(a, token)[0] == 404


def test_version_0_tokens_are_the_connection_id_and_only_the_issuer_knows_them(clocks):
    a, b = node(clocks), node(clocks)
    token = a.issue("a.R", HUB, "alice", timeout=10, signed=False)
    assert token == "a.R"
    assert refused(b, token)[0] == 404
    assert a.take(token, HUB, "alice") == "a.R"


def test_seen_tokens_are_forgotten_once_expired(clocks):
    a, b = node(clocks), node(clocks)
    token = a.issue("a.R", HUB, "alice", timeout=10, signed=True)
    b.take(token, HUB, "alice")
    assert b._seen
    clocks.wall += 12
    b.expire(clocks.node)
    assert not b._seen


async def test_a_long_poll_opens_on_a_front_that_did_not_negotiate():
    one, two = make_front(), make_front()
    _connection_id, token = await negotiated(one)
    first = await exchange(two, client_request("GET", token))
    assert (first.status, first.body) == (200, b"")
    assert (await exchange(two, client_request("GET", token, user="mallory"))).status == 403
    # The issuing front can still open it once (one transport per node at most).
    assert (await exchange(one, client_request("GET", token))).status == 200
    assert len(one.live) == len(two.live) == 1
