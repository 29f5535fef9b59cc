"""Two real relay processes (``python -m relaycore serve --redis ...``) on a private
``redis-server`` act as one endpoint: the official ``@microsoft/signalr`` client (JSON and
MessagePack) connected to node B gets, exactly once and in order, what REST calls on node A
send to everyone, to its user, to its connection and to its group; existence checks on A see
B's clients; once B is killed, A forgets them within seconds.
"""

from __future__ import annotations

import secrets

import pytest
import trio

from redisserver import RedisServer, needs_redis

from .harness import open_rest

pytestmark = [pytest.mark.e2e, needs_redis]


@pytest.fixture
def redis(tmp_path):
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


async def wait_status(rest, path: str, status: int, timeout: float = 15) -> None:
    with trio.fail_after(timeout):
        while (await rest.request("HEAD", path)).status_code != status:
            await trio.sleep(0.05)


async def test_rest_calls_on_one_node_reach_clients_of_the_other(
        redis, relay_factory, node_agent_factory):
    key = secrets.token_urlsafe(32)
    args = ["--redis", redis.url, "--cluster-name", "e2e"]
    a = await relay_factory(args=args, access_key=key)
    b = await relay_factory(args=args, access_key=key)
    await b.changes.wait_for(lambda: any(line.startswith("cluster: e2e on ") for line in b.lines),
                             what="the cluster line", describe=b.describe, timeout=5)
    agent = await node_agent_factory(b)
    ids = {}
    for name, protocol in (("json", "json"), ("messagepack", "messagepack")):
        ids[name] = await agent.connect(name, b.client_url(), b.client_token(user="bob"),
                                        protocol=protocol)
    async with open_rest(a) as rest:
        await wait_status(rest, "/users/bob", 200)
        await rest.add_to_group("team", ids["json"])
        await rest.send_all("notify", 1)
        await rest.send_user("bob", "notify", 2)
        await rest.send_connection(ids["messagepack"], "notify", 3)
        await rest.send_group("team", "notify", 4)
        await rest.send_all("notify", 5, excluded=[ids["json"]])
        await rest.send_all("notify", 6)  # the last: a copy of any other would come before it
        got = {name: [m.args for m in await agent.wait_messages(name, count)]
               for name, count in (("json", 4), ("messagepack", 5))}
        assert got == {"json": [[1], [2], [4], [6]],
                       "messagepack": [[1], [2], [3], [5], [6]]}
        assert (await rest.request("HEAD", f"/connections/{ids['json']}")).status_code == 200
        assert (await rest.request("HEAD", "/groups/team")).status_code == 200
        await b.crash()
        # B's clients are gone with it; A forgets them when B's heartbeat expires.
        await wait_status(rest, "/users/bob", 404)
        await wait_status(rest, "/groups/team", 404, timeout=1)
