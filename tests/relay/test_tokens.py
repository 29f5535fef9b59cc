"""Who may call (``relay/_tokens.py``): a token's audience is the URL the caller used, through
the relay's public endpoint or the ``Host`` it named; a refusal is counted and says why."""

from __future__ import annotations

import pytest

from relaycore.protocol._auth import TokenValidator
from relaycore.relay._http import HttpError, Request
from relaycore.relay._stats import RelayStats
from relaycore.relay._tokens import RequestAuth
from relayhelpers import KEY, client_token


def make_auth(endpoint: str = "http://relay.example:8080") -> RequestAuth:
    return RequestAuth(TokenValidator([KEY]), RelayStats(), lambda: endpoint)


def request(target: str, headers: dict[str, str]) -> Request:
    path, _, query = target.partition("?")
    pairs = [tuple(p.split("=", 1)) for p in query.split("&") if p]
    return Request("POST", target, path, query, pairs, headers)  # type: ignore[arg-type]


def test_audiences_are_the_endpoints_host_and_the_requests_over_http_and_https():
    auth = make_auth()
    got = auth.audiences(request("/x", {"host": "127.0.0.1:9000"}), "client/?hub=chat")
    assert sorted(got) == sorted(f"{scheme}://{host}/client/?hub=chat"
                                 for scheme in ("http", "https")
                                 for host in ("relay.example", "127.0.0.1"))


def test_a_host_header_that_is_no_host_is_a_400_naming_it():
    with pytest.raises(HttpError) as info:
        make_auth().audiences(request("/x", {"host": "[bad"}), "client/")
    assert info.value.status == 400 and "[bad" in info.value.message


def test_a_token_from_the_header_or_the_query_is_checked_for_the_hub():
    auth = make_auth()
    header = request("/client/negotiate?hub=chat",
                     {"host": "127.0.0.1", "authorization": f"Bearer {client_token('chat', 'u')}"})
    assert auth.authenticate(header, "client", "chat")["asrs.s.uid"] == "u"
    query = request(f"/client/?hub=chat&access_token={client_token('chat')}",
                    {"host": "127.0.0.1"})
    assert auth.authenticate(query, "client", "chat")["aud"].endswith("/client/?hub=chat")


@pytest.mark.parametrize(("token", "reason"), [(None, "missing"),
                                               (client_token("news"), "wrong_audience")])
def test_a_refused_token_is_a_401_with_its_reason_and_counted(token, reason):
    auth = make_auth()
    headers = {"host": "127.0.0.1"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    with pytest.raises(HttpError) as info:
        auth.authenticate(request("/client/?hub=chat", headers), "client", "chat")
    assert (info.value.status, info.value.code) == (401, f"Unauthorized.{reason}")
    assert auth.stats.auth_failures == 1
