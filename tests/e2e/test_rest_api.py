"""The REST API's refusals, over real HTTP (service-protocol §12.1): every failure is a 4xx with
a JSON body ``{"code", "message"}``, and REST tokens are bound to the request URL."""

from __future__ import annotations

import time

import httpx
import pytest
import trio

from relaycore.protocol._auth import generate_access_token

from .harness import API_VERSION, WAIT, RelayProcess, Rest

pytestmark = pytest.mark.e2e

SEND = f"/api/hubs/chat/:send?api-version={API_VERSION}"


def _json_error(response: httpx.Response, status: int) -> dict[str, str]:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers.get("content-type", "").startswith("application/json"), response
    body = response.json()
    assert isinstance(body.get("code"), str) and body["code"], body
    assert isinstance(body.get("message"), str) and body["message"], body
    return body


async def _post(relay: RelayProcess, path: str, token: str | None, **kwargs: object
                ) -> httpx.Response:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=relay.endpoint, timeout=WAIT) as client:
        with trio.fail_after(WAIT):
            return await client.post(path, headers=headers, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("problem", ["missing", "wrong key", "expired", "signed for another path",
                                     "client token"])
async def test_rest_tokens_are_checked(relay: RelayProcess, problem: str) -> None:
    now = time.time()
    audience = f"http://127.0.0.1{SEND}"
    token = {
        "missing": None,
        "wrong key": generate_access_token("not-the-key", audience, now=now),
        "expired": generate_access_token(relay.access_key, audience, now=now - 7200,
                                         lifetime=60),
        "signed for another path": generate_access_token(
            relay.access_key, "http://127.0.0.1/api/hubs/other/:send", now=now),
        "client token": relay.client_token(),
    }[problem]
    response = await _post(relay, SEND, token, json={"target": "notify", "arguments": []})
    assert _json_error(response, 401)["code"].startswith("Unauthorized")


async def test_rest_token_with_and_without_the_query(relay: RelayProcess) -> None:
    """The audience may carry the query the SDK signs (api-version) or not (§8.2)."""
    now = time.time()
    for audience in (f"http://127.0.0.1{SEND}", "http://127.0.0.1/api/hubs/chat/:send"):
        token = generate_access_token(relay.access_key, audience, now=now)
        response = await _post(relay, SEND + "&excluded=x", token,
                               json={"Target": "notify", "Arguments": None})
        assert response.status_code == 202, (audience, response.text)


async def test_bad_requests_get_json_errors(rest: Rest) -> None:
    # No api-version (Rest.request always adds it, so this one is sent by hand).
    url = httpx.URL(f"{rest.relay.endpoint}/api/hubs/chat/:send")
    token = generate_access_token(rest.relay.access_key, "http://127.0.0.1/api/hubs/chat/:send",
                                  now=time.time())
    with trio.fail_after(WAIT):
        response = await rest.client.post(url, json={"target": "notify"}, auth=_Bearer(token))
    assert "api-version" in _json_error(response, 400)["message"]

    cases = [
        ({"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 400),
        ({"json_body": ["not", "an", "object"]}, 400),
        ({"json_body": {"arguments": [1]}}, 400),  # no target
        ({"json_body": {"target": "notify", "arguments": "not a list"}}, 400),
        ({"content": b"\xc1", "headers": {"Content-Type": "application/x-msgpack"}}, 400),
        ({"content": b"x", "headers": {"Content-Type": "image/png"}}, 415),
    ]
    for kwargs, status in cases:
        response = await rest.request("POST", "/:send", **kwargs)  # type: ignore[arg-type]
        _json_error(response, status)

    _json_error(await rest.request("POST", "/nowhere/:send"), 404)
    _json_error(await rest.request("PATCH", "/users/alice"), 405)
    _json_error(await rest.request("POST", "/groups/%20%20/:send",
                                   json_body={"target": "notify"}), 400)  # blank group
    _json_error(await rest.hub("1bad-hub").request("POST", "/:send",
                                                   json_body={"target": "notify"}), 400)
    _json_error(await rest.add_user_to_group("alice", "g", ttl=-1, expect=None), 400)


class _Bearer(httpx.Auth):
    def __init__(self, token: str) -> None:
        self.token = token

    def auth_flow(self, request: httpx.Request):  # type: ignore[no-untyped-def]
        request.headers["Authorization"] = f"Bearer {self.token}"
        yield request
