"""Helpers of the socket-driven tests of this folder: a REST caller of the in-process relay
(``conftest.py`` starts it), its client ids, and the check that a healthy client still
receives."""

from __future__ import annotations

import httpx
import trio

from relayhelpers import rest_token


class Rest:
    def __init__(self, relay):
        self.base = f"http://127.0.0.1:{relay.port}"

    async def call(self, method: str, path: str, *, params=None, json_body=None, content=None,
                   headers=None, token: str | None = "auto") -> httpx.Response:
        hdrs = dict(headers or {})
        if token == "auto":
            token = rest_token(path)
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        query = {"api-version": "2022-06-01", **(params or {})}
        async with httpx.AsyncClient() as client:
            return await client.request(method, self.base + path, params=query, json=json_body,
                                        content=content, headers=hdrs)


async def connection_ids(relay, hub="chat"):
    shard = relay.table.get(hub)
    return set(shard.connections) if shard else set()


async def assert_still_receives(rest, client):
    r = await rest.call("POST", "/api/hubs/chat/users/healthy/:send",
                        json_body={"target": "alive", "arguments": [1]})
    assert r.status_code == 202
    with trio.fail_after(3):
        message = await client.next_message()
    assert message == {"type": 1, "target": "alive", "arguments": [1]}
