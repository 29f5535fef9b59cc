"""A logical client as the SDK sees it (``sdk/_client.py``): the handshake versions it accepts,
and what the hub context makes of OpenConnection's claims and headers. Every test runs under
asyncio and under trio, against the fake service of sdkhelpers."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from sdkhelpers import BACKENDS, RS, FakeService, run

from relaycore.protocol import ConnectionDataMessage, OpenConnectionMessage
from relaycore.sdk import Hub, HubServer, ServiceOptions
from relaycore.sdk._client import claims_and_user_id


class Who(Hub):
    async def who(self) -> dict[str, Any]:
        context = self.context
        return {"user": context.user_id, "claims": dict(context.claims),
                "all_claims": [list(pair) for pair in context.all_claims],
                "roles": list(context.roles), "remote": context.remote_address}


async def serving(scenario):
    async with anyio.create_task_group() as tg:
        service = await FakeService().start(tg)
        server = HubServer(ServiceOptions(connection_string=service.connection_string,
                                          connection_count=1, retry_delay=lambda n: 0.05))
        server.map_hub("chat", Who)
        async with server:
            await scenario(service, server)
        tg.cancel_scope.cancel()


def records(payload: bytes) -> list[dict]:
    return [json.loads(r) for r in payload.split(RS) if r]


async def open_client(conn, claims, *, handshake, headers=None):
    await conn.send(OpenConnectionMessage("c1", claims, headers or {}, "?hub=chat",
                                          protocol="json"))
    await conn.send(ConnectionDataMessage("c1", handshake))
    return await conn.client_data("c1")


async def call_who(conn) -> dict[str, Any]:
    await conn.send(ConnectionDataMessage(
        "c1", b'{"type":1,"invocationId":"1","target":"who","arguments":[]}' + RS))
    while True:
        for record in records(await conn.client_data("c1")):
            if record.get("type") == 3:
                return record


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("version", [0, 1, 2])
def test_client_handshake_versions_up_to_two_are_accepted(backend, version):
    async def scenario(service, server):
        conn = (await service.wait_connections(1))[0]
        handshake = b'{"protocol":"json","version":%d}' % version + RS
        assert await open_client(conn, {"asrs.s.uid": "ann"}, handshake=handshake) == b"{}" + RS
        assert (await call_who(conn))["result"]["user"] == "ann"

    run(backend, lambda: serving(scenario))


@pytest.mark.parametrize("backend", BACKENDS)
def test_client_handshake_version_three_gets_the_dotnet_error(backend):
    async def scenario(service, server):
        conn = (await service.wait_connections(1))[0]
        reply = await open_client(conn, {}, handshake=b'{"protocol":"json","version":3}' + RS)
        assert records(reply) == [
            {"error": "The server does not support version 3 of the 'json' protocol."}]

    run(backend, lambda: serving(scenario))


@pytest.mark.parametrize("backend", BACKENDS)
def test_hub_context_lists_every_value_of_a_repeated_claim_and_the_remote_address(backend):
    async def scenario(service, server):
        conn = (await service.wait_connections(1))[0]
        claims = {"asrs.s.uid": "ann", "role": ("admin", "editor"), "team": "blue",
                  "asrs.u.exp": "later", "exp": "1"}
        headers = {"X-Forwarded-For": ["203.0.113.7, 10.0.0.2"]}
        await open_client(conn, claims, headers=headers,
                          handshake=b'{"protocol":"json","version":1}' + RS)
        assert (await call_who(conn))["result"] == {
            "user": "ann",
            "claims": {"role": "admin", "team": "blue", "exp": "later"},
            "all_claims": [["role", "admin"], ["role", "editor"], ["team", "blue"],
                           ["exp", "later"]],
            "roles": ["admin", "editor"],
            "remote": "203.0.113.7",
        }

    run(backend, lambda: serving(scenario))


@pytest.mark.parametrize("backend", BACKENDS)
def test_hub_context_roles_follow_the_role_type_the_token_names(backend):
    async def scenario(service, server):
        conn = (await service.wait_connections(1))[0]
        claims = {"asrs.s.rt": "perm", "perm": ("read", "write", "read"), "role": "ignored"}
        await open_client(conn, claims, handshake=b'{"protocol":"json","version":1}' + RS)
        result = (await call_who(conn))["result"]
        assert result["roles"] == ["read", "write"]
        assert result["remote"] is None

    run(backend, lambda: serving(scenario))


def test_claims_and_user_id_takes_the_first_value_of_a_repeated_user_id_claim():
    assert claims_and_user_id({"nameid": ("first", "second"), "role": "a"}) == (
        (("nameid", "first"), ("nameid", "second"), ("role", "a")), "first")
