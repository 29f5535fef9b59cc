"""An app server connected to one relay node serves the clients of another: two real relay
processes on a private ``redis-server``, a pod of ``examples/two-pods`` (FastAPI, relaycore's
server SDK) connected to node A only, and the official ``@microsoft/signalr`` client (JSON and
MessagePack) connected to node B. The client's handshake, hub calls and their answers travel
through A's inbox; what the pod sends to the client comes back the same way.
"""

from __future__ import annotations

import secrets

import pytest

from redisserver import RedisServer, needs_redis

from .harness import Received

pytestmark = [pytest.mark.e2e, needs_redis]


@pytest.fixture
def redis(tmp_path):
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


@pytest.mark.parametrize("protocol", ["json", "messagepack"])
async def test_a_pod_on_node_a_serves_a_client_of_node_b(
        redis, relay_factory, pod_factory, node_agent_factory, protocol):
    key = secrets.token_urlsafe(32)
    args = ["--redis", redis.url, "--cluster-name", "e2e"]
    a = await relay_factory(args=args, access_key=key)
    b = await relay_factory(args=args, access_key=key)
    await b.changes.wait_for(lambda: any("(1 other nodes)" in line for line in b.lines),
                             what="B to see A", describe=b.describe, timeout=5)
    pod = await pod_factory("pod 1", a.connection_string)
    agent = await node_agent_factory(b)
    connection_id = await agent.connect("bob", b.client_url(), b.client_token(user="bob"),
                                        protocol=protocol)
    assert connection_id
    who = await agent.invoke("bob", "whoami")
    assert who == {**who, "user": "bob", "pod": "pod 1", "connection": connection_id}, who
    answer = await pod.post("/notify/bob", text="through A")
    assert answer["sent_by"] == "pod 1", answer
    await agent.wait_for(lambda: Received("notify", ["through A", "pod 1"])
                         in agent.messages.get("bob", []), what="the pod's message on bob")
