"""The management SDK's transient transport against a scripted fake service (httpx's
``MockTransport``): the REST call each operation makes and how it is signed, the retry rules,
the exception of each error status, the health probe, and several endpoints. Every scenario
runs under asyncio and trio."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

import anyio
import httpx
import msgpack
import pytest
from sdkhelpers import run

from relaycore.protocol import (
    InvocationMessage,
    JsonHubProtocol,
    MessagePackHubProtocol,
    TokenValidator,
)
from relaycore.sdk import (
    EndpointRouter,
    EndpointStatusEvent,
    EndpointType,
    RetryOptions,
    ServiceEndpoint,
    ServiceInvalidArgumentError,
    ServiceManager,
    ServiceNotFoundError,
    ServiceOptions,
    ServiceRequestError,
    ServiceRuntimeError,
    ServiceUnauthorizedError,
    ServiceUnavailableError,
)

BACKENDS = ["asyncio", "trio"]
KEY = "fake-service-key"
EAST = f"Endpoint=http://east.example;AccessKey={KEY};Version=1.0;"
WEST = f"Endpoint=http://west.example:8080;AccessKey={KEY}-west;Version=1.0;"
FAST = RetryOptions(delay=0.001, max_delay=0.001)


class FakeService:
    """Answers every request with ``answer(request)`` (default: the success status of the
    call, with ``{"recipients": 1}`` for sends) and records it."""

    def __init__(self, answer: Callable[[httpx.Request], httpx.Response] | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.answer = answer or default_answer
        self.health: dict[str, int] = {}

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/api/health"):
            return httpx.Response(self.health.get(request.url.host, 200))
        self.requests.append(request)
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer(request)

    def calls(self) -> list[tuple[str, str, str]]:
        """(method, host, path after the hub) of each request."""
        return [(r.method, r.url.host, r.url.raw_path.decode().split("?")[0].split("/chat", 1)[1])
                for r in self.requests]

    def manager(self, *endpoints: Any, retry: RetryOptions = FAST, **kwargs: Any
                ) -> ServiceManager:
        options = kwargs.pop("options", {})
        if not endpoints:
            endpoints = (ServiceEndpoint(EAST, name="east"),)
        http = httpx.AsyncClient(transport=httpx.MockTransport(self.handle))
        return ServiceManager(ServiceOptions(endpoints=list(endpoints), **options), retry=retry,
                              http_client=http, **kwargs)


def default_answer(request: httpx.Request) -> httpx.Response:
    if request.url.path.endswith(":send"):
        return httpx.Response(202, json={"recipients": 1})
    if request.method == "DELETE" and "/users/" in request.url.path:
        return httpx.Response(204)
    return httpx.Response(200)


def statuses(*codes: int, then: Callable[[httpx.Request], httpx.Response] = default_answer
             ) -> Callable[[httpx.Request], httpx.Response]:
    """Answer ``codes`` in turn (with a JSON error body), then ``then``."""
    left = list(codes)

    def answer(request: httpx.Request) -> httpx.Response:
        if left:
            code = left.pop(0)
            return httpx.Response(code, json={"code": f"E{code}", "message": f"reason {code}"})
        return then(request)

    return answer


async def hub(service: FakeService, *endpoints: Any, **kwargs: Any):
    manager = service.manager(*endpoints, **kwargs)
    return manager, await manager.create_hub_context("chat")


# --------------------------------------------------------------------------------------------
# The call each operation makes


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_operation_makes_its_rest_call(backend):
    async def scenario():
        service = FakeService()
        manager, chat = await hub(service)
        async with manager:
            await chat.clients.all.send("m")
            await chat.clients.all_except(["c1", "c2"]).send("m")
            await chat.clients.client("c/1").send("m")
            await chat.clients.clients(["c1", "c2", "c1"]).send("m")
            await chat.clients.user("a b").send("m")
            await chat.clients.users(["u1", "u2"]).send("m")
            await chat.clients.group("g").send("m")
            await chat.clients.groups(["g1", "g2"]).send("m")
            await chat.clients.group_except("g", ["c1"]).send("m")
            await chat.groups.add_to_group("c1", "g")
            await chat.groups.remove_from_group("c1", "g")
            await chat.user_groups.add_to_group("u", "g")
            await chat.user_groups.add_to_group("u", "g", ttl=90)
            await chat.user_groups.remove_from_group("u", "g")
            await chat.user_groups.remove_from_all_groups("u")
            assert await chat.user_groups.is_user_in_group("u", "g")
            assert await chat.client_manager.connection_exists("c1")
            assert await chat.client_manager.user_exists("u")
            assert await chat.client_manager.group_exists("g")
            await chat.client_manager.close_connection("c1", reason="bye")
            await chat.client_manager.close_connections(reason="all", excluded=["c9"])
            await chat.client_manager.close_user_connections("u")
            await chat.client_manager.close_group_connections("g", reason="g")
        assert service.calls() == [
            ("POST", "east.example", "/:send"),
            ("POST", "east.example", "/:send"),
            ("POST", "east.example", "/connections/c%2F1/:send"),
            ("POST", "east.example", "/connections/c1/:send"),
            ("POST", "east.example", "/connections/c2/:send"),
            ("POST", "east.example", "/users/a%20b/:send"),
            ("POST", "east.example", "/users/u1/:send"),
            ("POST", "east.example", "/users/u2/:send"),
            ("POST", "east.example", "/groups/g/:send"),
            ("POST", "east.example", "/groups/g1/:send"),
            ("POST", "east.example", "/groups/g2/:send"),
            ("POST", "east.example", "/groups/g/:send"),
            ("PUT", "east.example", "/groups/g/connections/c1"),
            ("DELETE", "east.example", "/groups/g/connections/c1"),
            ("PUT", "east.example", "/users/u/groups/g"),
            ("PUT", "east.example", "/users/u/groups/g"),
            ("DELETE", "east.example", "/users/u/groups/g"),
            ("DELETE", "east.example", "/users/u/groups"),
            ("GET", "east.example", "/users/u/groups/g"),
            ("HEAD", "east.example", "/connections/c1"),
            ("HEAD", "east.example", "/users/u"),
            ("HEAD", "east.example", "/groups/g"),
            ("DELETE", "east.example", "/connections/c1"),
            ("POST", "east.example", "/:closeConnections"),
            ("POST", "east.example", "/users/u/:closeConnections"),
            ("POST", "east.example", "/groups/g/:closeConnections"),
        ]
        queries = [dict(parse_qsl(r.url.query.decode())) for r in service.requests]
        assert all(q["api-version"] == "2022-06-01" for q in queries)
        assert parse_qsl(service.requests[1].url.query.decode())[1:] == [
            ("excluded", "c1"), ("excluded", "c2")]
        assert queries[11]["excluded"] == "c1"
        assert "ttl" not in queries[14] and queries[15]["ttl"] == "90"
        assert queries[22]["reason"] == "bye"
        assert (queries[23]["reason"], queries[23]["excluded"]) == ("all", "c9")
        assert "reason" not in queries[24]

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_request_is_signed_for_its_own_url(backend):
    async def scenario():
        service = FakeService()
        manager, chat = await hub(service, options={"application_name": "Shop"})
        async with manager:
            await chat.clients.all_except(["c1"]).send("m")
            await chat.user_groups.add_to_group("u", "g", ttl=5)
        validator = TokenValidator([KEY])
        for request, signed in zip(service.requests, (
                "http://east.example/api/hubs/chat/:send?application=shop&api-version=2022-06-01",
                "http://east.example/api/hubs/chat/users/u/groups/g"
                "?application=shop&api-version=2022-06-01"), strict=True):
            token = request.headers["authorization"].removeprefix("Bearer ")
            claims = validator.validate(token, audiences=[signed], now=time.time())
            assert claims["aud"] == signed  # the query added after signing is not in it
            assert claims["nameid"] == manager.options.server_id
            assert claims["exp"] - claims["iat"] == 3600
            assert request.headers["asrs-user-agent"].startswith("relaycore-sdk/")
        assert service.requests[0].url.params.get_list("excluded") == ["c1"]

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_send_body_is_the_payload_map_a_server_connection_would_carry(backend):
    async def scenario():
        service = FakeService()
        manager, chat = await hub(service)
        async with manager:
            await chat.clients.user("u").send("notify", "hi", b"\x00\x01", {"n": 1})
        request = service.requests[0]
        assert request.headers["content-type"] == "application/x-msgpack"
        payloads = msgpack.unpackb(request.content, raw=False)
        message = InvocationMessage("notify", ("hi", b"\x00\x01", {"n": 1}))
        assert payloads == {"json": JsonHubProtocol().write(message),
                            "messagepack": MessagePackHubProtocol().write(message)}

    run(backend, scenario)


# --------------------------------------------------------------------------------------------
# Retries and errors


def send_call(chat):
    return chat.clients.user("alice").send("m")


def group_call(chat):
    return chat.groups.add_to_group("c1", "g")


def check_call(chat):
    return chat.client_manager.user_exists("alice")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("call", "codes", "attempts", "error"), [
    (send_call, [503, 503], 3, None),                         # retried, then delivered
    (send_call, [502, 504, 503, 503], 4, ServiceRuntimeError),  # 3 retries, then given up
    (send_call, [500], 1, ServiceRuntimeError),  # maybe delivered: never retried
    (send_call, [408], 1, ServiceRuntimeError),
    (send_call, [429], 1, ServiceRuntimeError),
    (send_call, [400], 1, ServiceInvalidArgumentError),
    (send_call, [413], 1, ServiceInvalidArgumentError),
    (send_call, [401], 1, ServiceUnauthorizedError),
    (send_call, [403], 1, ServiceUnauthorizedError),
    (send_call, [404], 1, ServiceNotFoundError),
    (group_call, [500, 408, 503], 4, None),  # other calls: any 5xx and 408
    (group_call, [500, 500, 500, 500], 4, ServiceRuntimeError),
    (group_call, [400], 1, ServiceInvalidArgumentError),
    (check_call, [408, 502], 3, None),
    (check_call, [401], 1, ServiceUnauthorizedError),
], ids=lambda v: getattr(v, "__name__", None) or str(v))
def test_retry_rules_and_the_exception_of_each_status(backend, call, codes, attempts, error):
    async def scenario():
        service = FakeService(statuses(*codes))
        manager, chat = await hub(service)
        async with manager:
            if error is None:
                await call(chat)
            else:
                with pytest.raises(error) as caught:
                    await call(chat)
                assert isinstance(caught.value, ServiceRequestError)
                assert caught.value.status == codes[-1]
                assert caught.value.reason == f"reason {codes[-1]}"
                assert caught.value.code == f"E{codes[-1]}"
                assert f"answered {codes[-1]} E{codes[-1]}: reason {codes[-1]}" in str(caught.value)
        # A failed HEAD check is followed by one GET for the reason (a HEAD answer has no body).
        made = [r for r in service.requests if r.method != "GET"]
        assert len(made) == attempts

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_error_message_names_the_call_and_the_reason(backend):
    async def scenario():
        service = FakeService(statuses(400))
        manager, chat = await hub(service)
        async with manager:
            with pytest.raises(ServiceInvalidArgumentError) as caught:
                await chat.user_groups.add_to_group("alice", "vip", ttl=5)
        assert str(caught.value) == (
            "add user 'alice' to group 'vip' failed: PUT "
            "http://east.example/api/hubs/chat/users/alice/groups/vip answered 400 E400: "
            "reason 400")
        assert caught.value.call == "add user 'alice' to group 'vip'"

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_retries_stop_at_the_time_budget(backend):
    async def scenario():
        service = FakeService(statuses(*[503] * 20))
        retry = RetryOptions(max_retries=10, delay=0.2, max_delay=5, budget=0.5)
        manager, chat = await hub(service, retry=retry)
        async with manager:
            started = anyio.current_time()
            with pytest.raises(ServiceRuntimeError):
                await send_call(chat)
            # pauses 0.2 then 0.4: the second would end past the budget, so no third attempt
            assert len(service.requests) == 2
            assert anyio.current_time() - started < 0.5

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_delay_and_no_retries_options(backend):
    assert RetryOptions(delay=1, exponential=False).pause(5) == 1
    assert RetryOptions(delay=1, max_delay=3).pause(5) == 3
    with pytest.raises(ValueError, match="max_retries"):
        RetryOptions(max_retries=-1)

    async def scenario():
        service = FakeService(statuses(503))
        manager, chat = await hub(service, retry=RetryOptions(max_retries=0))
        async with manager:
            with pytest.raises(ServiceRuntimeError):
                await send_call(chat)
        assert len(service.requests) == 1

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("failure", "call", "attempts"), [
    (httpx.ConnectError("refused"), send_call, 4),  # nothing was delivered: retried
    (httpx.ReadTimeout("slow"), send_call, 1),      # maybe delivered: a send is not retried
    (httpx.ReadTimeout("slow"), group_call, 4),
    (httpx.RemoteProtocolError("reset"), check_call, 4),
], ids=["connect-send", "timeout-send", "timeout-group", "reset-check"])
def test_unreachable_endpoint_is_retried_then_unavailable(backend, failure, call, attempts):
    async def scenario():
        service = FakeService()
        service.answer = failure  # type: ignore[assignment]
        manager, chat = await hub(service)
        async with manager:
            with pytest.raises(ServiceUnavailableError, match=type(failure).__name__):
                await call(chat)
        assert len(service.requests) == attempts

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_404_is_an_answer_only_with_the_expected_error_code(backend):
    def answer(request: httpx.Request) -> httpx.Response:
        code = {"/users/gone": "Warning.User.NotExisted",
                "/groups/g/connections/gone": "Error.Connection.NotExisted",
                "/users/wrong": "Warning.Group.NotExisted"}.get(
            request.url.path.split("/chat", 1)[1])
        if code is None:
            return default_answer(request)
        return httpx.Response(404, headers={"x-ms-error-code": code})

    async def scenario():
        service = FakeService(answer)
        manager, chat = await hub(service)
        async with manager:
            assert not await chat.client_manager.user_exists("gone")
            assert await chat.client_manager.user_exists("here")
            await chat.groups.add_to_group("gone", "g")  # an unknown connection: no error
            with pytest.raises(ServiceNotFoundError, match="Warning.Group.NotExisted"):
                await chat.client_manager.user_exists("wrong")

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_report_counts_recipients_and_is_none_when_the_service_does_not_say(backend):
    async def scenario():
        service = FakeService()
        manager, chat = await hub(service)
        async with manager:
            assert await chat.clients.users(["a", "b", "c"]).send("m", report=True) == 3
            service.answer = lambda request: httpx.Response(202)  # as Azure answers
            assert await chat.clients.all.send("m", report=True) is None
            assert await chat.clients.all.send("m") is None

    run(backend, scenario)


# --------------------------------------------------------------------------------------------
# Health and several endpoints


@pytest.mark.parametrize("backend", BACKENDS)
def test_health_probe_takes_an_endpoint_offline_and_back(backend):
    async def scenario():
        service = FakeService()
        events: list[EndpointStatusEvent] = []
        service.health["east.example"] = 503
        manager = service.manager(options={"on_endpoint_status": events.append},
                                  health_retry_interval=0.2)
        async with manager:
            chat = await manager.create_hub_context("chat")
            assert [e.online for e in await chat.list_endpoints()] == [False]
            with pytest.raises(ServiceUnavailableError, match="no endpoint is online"):
                await send_call(chat)
            assert service.requests == []  # nothing was tried
            service.health["east.example"] = 200
            with anyio.fail_after(5):  # the background probe retries an offline endpoint
                while not (await chat.list_endpoints())[0].online:
                    await anyio.sleep(0.02)
            await send_call(chat)
        assert [(e.hub, e.endpoint.name, e.online) for e in events] == [
            ("chat", "east", False), ("chat", "east", True)]

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_async_with_a_stale_status_is_probed_before_a_call(backend):
    async def scenario():
        service = FakeService()
        manager = service.manager(health_retry_interval=0.05)
        service.health["east.example"] = 503
        chat = await manager.create_hub_context("chat")
        with pytest.raises(ServiceUnavailableError):
            await send_call(chat)
        service.health["east.example"] = 200
        await anyio.sleep(0.06)
        await send_call(chat)
        await manager.aclose()
        with pytest.raises(RuntimeError, match="closed"):
            await send_call(chat)

    run(backend, scenario)


def east_west() -> tuple[ServiceEndpoint, ServiceEndpoint]:
    return (ServiceEndpoint(EAST, name="east"),
            ServiceEndpoint(WEST, EndpointType.SECONDARY, name="west"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_endpoints_counts_are_summed_and_subsets_chosen(backend):
    async def scenario():
        service = FakeService()
        manager, chat = await hub(service, *east_west())
        async with manager:
            assert await chat.clients.all.send("m", report=True) == 2
            assert sorted(service.calls()) == [("POST", "east.example", "/:send"),
                                               ("POST", "west.example", "/:send")]
            service.requests.clear()
            west = chat.with_endpoints([east_west()[1]])
            assert await west.clients.user("u").send("m", report=True) == 1
            assert await west.client_manager.user_exists("u")
            assert service.calls() == [("POST", "west.example", "/users/u/:send"),
                                       ("HEAD", "west.example", "/users/u")]
            assert (await west.negotiate()).url == "http://west.example:8080/client/?hub=chat"
            assert (await chat.negotiate()).url == "http://east.example/client/?hub=chat"
            every = await chat.negotiate_all(user_id="u")
            assert [(n.endpoint.name, n.endpoint.type, n.online) for n in every] == [
                ("east", EndpointType.PRIMARY, True), ("west", EndpointType.SECONDARY, True)]
            west_token = every[1].connection_info.access_token
            claims = TokenValidator([f"{KEY}-west"]).validate(
                west_token, audiences=["http://west.example/client/?hub=chat"], now=time.time())
            assert claims["asrs.s.uid"] == "u"

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_failure_on_one_endpoint_is_raised_after_the_others_were_sent(backend):
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.host == "west.example":
            return httpx.Response(400, json={"message": "west refuses"})
        return default_answer(request)

    async def scenario():
        service = FakeService(answer)
        manager, chat = await hub(service, *east_west())
        async with manager:
            with pytest.raises(ServiceInvalidArgumentError, match="west refuses"):
                await chat.clients.all.send("m", report=True)
            assert sorted(h for _, h, _ in service.calls()) == ["east.example", "west.example"]
            with pytest.raises(ServiceInvalidArgumentError, match="west refuses"):
                await chat.client_manager.user_exists("u")

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_router_chooses_the_endpoints_of_each_call(backend):
    class EastGroups(EndpointRouter):
        def get_endpoints_for_group(self, group, endpoints):
            if group.startswith("east-"):
                return [e for e in endpoints if e.name == "east"]
            return super().get_endpoints_for_group(group, endpoints)

        async def get_negotiate_endpoint(self, request, endpoints):
            return next(e for e in endpoints if e.name == request.query_params.get(
                "region", "west")) if request.query else endpoints[-1]

    async def scenario():
        service = FakeService()
        manager, chat = await hub(service, *east_west(), router=EastGroups())
        async with manager:
            await chat.clients.group("east-1").send("m")
            await chat.clients.group("other").send("m")
            assert sorted(service.calls()) == [("POST", "east.example", "/groups/east-1/:send"),
                                               ("POST", "east.example", "/groups/other/:send"),
                                               ("POST", "west.example", "/groups/other/:send")]
            assert (await chat.negotiate()).url.startswith("http://west.example:8080/")

    run(backend, scenario)


def test_manager_options_are_checked():
    with pytest.raises(ValueError, match="no endpoint configured"):
        ServiceManager(ServiceOptions())
    with pytest.raises(ValueError, match="router"):
        ServiceManager(ServiceOptions(connection_string=EAST), router=object())  # type: ignore
    with pytest.raises(ValueError, match="transport"):
        ServiceManager(ServiceOptions(connection_string=EAST), transport=7)  # type: ignore
    with pytest.raises(ValueError, match="request_timeout"):
        ServiceManager(ServiceOptions(connection_string=EAST), request_timeout=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_names_are_refused_before_any_request(backend):
    async def scenario():
        service = FakeService()
        manager = service.manager()
        async with manager:
            with pytest.raises(ValueError, match="hub"):
                await manager.create_hub_context("1chat")
            chat = await manager.create_hub_context("chat")
            with pytest.raises(ValueError, match="group name"):
                await chat.clients.group(" ").send("m")
            with pytest.raises(ValueError, match="method"):
                await chat.clients.all.send("")
            with pytest.raises(TypeError, match="list"):
                chat.clients.users("alice")
            with pytest.raises(ValueError, match="ttl"):
                await chat.user_groups.add_to_group("u", "g", ttl=-1)
        assert service.requests == []

    run(backend, scenario)




@pytest.mark.parametrize("backend", BACKENDS)
def test_one_failed_user_of_several_does_not_stop_the_others(backend):
    def answer(request: httpx.Request) -> httpx.Response:
        if "/users/b/" in request.url.path:
            return httpx.Response(400, json={"message": "not b"})
        return default_answer(request)

    async def scenario():
        service = FakeService(answer)
        manager, chat = await hub(service)
        async with manager:
            with pytest.raises(ServiceInvalidArgumentError, match="send to user 'b' failed"):
                await chat.clients.users(["a", "b", "c"]).send("m", report=True)
        assert service.calls() == [("POST", "east.example", f"/users/{u}/:send")
                                   for u in "abc"]

    run(backend, scenario)
