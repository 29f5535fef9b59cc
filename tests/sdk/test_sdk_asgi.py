"""negotiate() and the ASGI negotiate endpoint, against a fake service, under both backends."""

from __future__ import annotations

import time
from typing import Any

import anyio
import httpx
import pytest
from sdkhelpers import BACKENDS, KEY, FakeService, run

from relaycore.protocol import TokenValidator
from relaycore.sdk import Hub, HubServer, ServiceEndpoint, ServiceOptions


class Chat(Hub):
    async def ping(self):
        return "pong"


async def with_server(scenario, *, online: bool = True, **overrides: Any) -> None:
    async with anyio.create_task_group() as tg:
        service = await FakeService().start(tg)
        if not online:
            service.handshake_error = "not now"
        settings: dict[str, Any] = dict(connection_string=service.connection_string,
                                        connection_count=1, retry_delay=lambda n: 0.05)
        settings.update(overrides)
        server = HubServer(ServiceOptions(**settings))
        server.map_hub("Chat", Chat)
        async with server:
            await scenario(service, server)
        tg.cancel_scope.cancel()


def claims_of(token: str, port: int, hub: str = "chat") -> dict:
    return TokenValidator([KEY]).validate(
        token, audiences=[f"http://127.0.0.1/client/?hub={hub}"], now=time.time())


async def post(app, path, *, method="POST", headers=None, root_path="/hubs") -> httpx.Response:
    transport = httpx.ASGITransport(app=app, root_path=root_path)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
        return await http.request(method, path, headers=headers or {})


@pytest.mark.parametrize("backend", BACKENDS)
def test_negotiate_signs_a_client_token_for_the_endpoint(backend):
    async def scenario(service, server):
        doc = await server.negotiate("chat", user_id="alice", claims={"role": "admin",
                                                                     "exp": "spoof"},
                                     lifetime=60)
        assert set(doc) == {"url", "accessToken"}
        assert doc["url"] == f"http://127.0.0.1:{service.port}/client/?hub=shop_chat"
        claims = claims_of(doc["accessToken"], service.port, "shop_chat")
        assert claims["asrs.s.uid"] == "alice"
        assert claims["role"] == "admin"
        assert claims["asrs.u.exp"] == "spoof"
        assert claims["exp"] - claims["iat"] == 60
        anonymous = claims_of((await server.negotiate("chat"))["accessToken"], service.port,
                              "shop_chat")
        assert "asrs.s.uid" not in anonymous

    run(backend, lambda: with_server(scenario, application_name="shop"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_negotiate_marks_several_endpoints_and_detailed_errors(backend):
    async def scenario(service, server):
        doc = await server.negotiate("chat")
        claims = claims_of(doc["accessToken"], service.port)
        assert claims["asrs.s.secn"] == "2"
        assert claims["asrs.s.derror"] == "True"

    other = "Endpoint=http://other.invalid;AccessKey=k;Version=1.0;"
    run(backend, lambda: with_server(
        scenario, enable_detailed_errors=True, handshake_timeout=0.5,
        endpoints=[ServiceEndpoint(other, name="other")]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_asgi_negotiate_redirects_with_user_and_cors(backend):
    async def scenario(service, server):
        app = server.asgi()
        response = await post(app, "/hubs/chat/negotiate?negotiateVersion=1&user=alice&x=1",
                              headers={"Origin": "http://page.example"})
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "http://page.example"
        assert response.headers["access-control-allow-credentials"] == "true"
        doc = response.json()
        assert doc["url"] == (f"http://127.0.0.1:{service.port}/client/?hub=chat"
                              "&asrs.op=%2Fhubs%2Fchat&user=alice&x=1")
        assert claims_of(doc["accessToken"], service.port)["asrs.s.uid"] == "alice"
        by_header = await post(app, "/hubs/Chat/negotiate", headers={"X-User-Id": "bob"})
        assert claims_of(by_header.json()["accessToken"], service.port)["asrs.s.uid"] == "bob"
        # Mounted the old way: the path does not repeat the root path.
        old_style = await post(app, "/chat/negotiate", root_path="")
        assert old_style.status_code == 200

    run(backend, lambda: with_server(scenario))


@pytest.mark.parametrize("backend", BACKENDS)
def test_asgi_preflight_errors_and_custom_user_provider(backend):
    async def scenario(service, server):
        app = server.asgi(cors_origins=["http://good.example"])
        preflight = await post(app, "/hubs/chat/negotiate", method="OPTIONS", headers={
            "Origin": "http://good.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-signalr-user-agent"})
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == "http://good.example"
        assert preflight.headers["access-control-allow-headers"] == "x-signalr-user-agent"
        assert "POST" in preflight.headers["access-control-allow-methods"]
        refused = await post(app, "/hubs/chat/negotiate", headers={"Origin": "http://evil"})
        assert "access-control-allow-origin" not in refused.headers
        assert (await post(app, "/hubs/nothere/negotiate")).status_code == 404
        assert (await post(app, "/hubs/chat/other")).status_code == 404
        wrong = await post(app, "/hubs/chat/negotiate", method="GET")
        assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"

        async def provider(scope):
            return "from-session"

        custom = server.asgi(user_id_provider=provider)
        doc = (await post(custom, "/hubs/chat/negotiate?user=ignored")).json()
        assert claims_of(doc["accessToken"], service.port)["asrs.s.uid"] == "from-session"

    run(backend, lambda: with_server(scenario))


@pytest.mark.parametrize("backend", BACKENDS)
def test_asgi_negotiate_without_an_online_endpoint_is_503(backend):
    async def scenario(service, server):
        response = await post(server.asgi(), "/hubs/chat/negotiate")
        assert response.status_code == 503
        assert response.json() == {
            "error": "Azure SignalR Service is not connected yet, please try again later."}

    run(backend, lambda: with_server(scenario, online=False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_asgi_app_acknowledges_lifespan_and_refuses_websockets(backend):
    async def scenario(service, server):
        app = server.asgi()
        incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
        sent: list[dict] = []

        async def receive():
            return incoming.pop(0)

        async def send(message):
            sent.append(message)

        await app({"type": "lifespan"}, receive, send)
        await app({"type": "websocket", "path": "/chat"}, receive, send)
        assert [m["type"] for m in sent] == [
            "lifespan.startup.complete", "lifespan.shutdown.complete", "websocket.close"]

    run(backend, lambda: with_server(scenario))
