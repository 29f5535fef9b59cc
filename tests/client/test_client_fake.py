"""The client against a scripted server (``fakehub.py``): what it sends and how it reacts, to
the byte, where the relay cannot be made to misbehave on cue (redirect chains, refusals,
silence, client-result corner cases, upload stream ids)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from clienthelpers import BACKENDS, run, wait_for
from fakehub import FakeHub

from relaycore.client import (
    HandshakeError,
    HubConnection,
    HubConnectionBuilder,
    HubConnectionError,
    HubConnectionState,
    HubException,
    NegotiateError,
    RetryContext,
    ServerClosedError,
    ServerTimeoutError,
    TransportError,
)
from relaycore.protocol import (
    CancelInvocationMessage,
    CloseMessage,
    CompletionMessage,
    InvocationMessage,
    PingMessage,
    StreamInvocationMessage,
    StreamItemMessage,
)

#: The table-driven cases run on one backend of each kind; the flows on all three.
TWO_BACKENDS = ["asyncio", "trio"]


@contextlib.asynccontextmanager
async def fake_hub() -> AsyncIterator[FakeHub]:
    async with anyio.create_task_group() as task_group:
        hub = await FakeHub().start(task_group)
        yield hub
        task_group.cancel_scope.cancel()


@pytest.mark.parametrize("backend", BACKENDS)
def test_negotiate_follows_a_redirect_and_uses_its_access_token(backend):
    async def scenario():
        async with fake_hub() as hub:
            def negotiate(request):
                if request.path == "/app/chat/negotiate":
                    return 200, {"url": f"http://127.0.0.1:{hub.port}/relay/?hub=chat",
                                 "accessToken": "from-the-app"}
                return hub.default_negotiate(request)

            hub.negotiate = negotiate
            connection = (HubConnectionBuilder()
                          .with_url(f"http://127.0.0.1:{hub.port}/app/chat?tenant=7",
                                    access_token_factory=lambda: "mine",
                                    headers={"X-Extra": "yes"})
                          .build())
            async with connection:
                assert connection.state is HubConnectionState.CONNECTED
                assert connection.connection_id == "id-tok-1"
                server = await hub.connection(0)
            first, second = hub.of("POST")
            assert first.target == "/app/chat/negotiate?tenant=7&negotiateVersion=1"
            assert first.headers["authorization"] == "Bearer mine"
            assert first.headers["x-requested-with"] == "XMLHttpRequest"
            assert first.headers["x-extra"] == "yes"
            assert second.target == "/relay/negotiate?hub=chat&negotiateVersion=1"
            assert second.headers["authorization"] == "Bearer from-the-app"
            assert server.request.target == "/relay/?hub=chat&id=tok-1"
            assert server.request.headers["authorization"] == "Bearer from-the-app"
            assert server.request.headers["x-extra"] == "yes"
            assert connection.state is HubConnectionState.DISCONNECTED

    run(backend, scenario)


@pytest.mark.parametrize("backend", TWO_BACKENDS)
def test_negotiate_gives_up_after_a_hundred_redirects(backend):
    async def scenario():
        async with fake_hub() as hub:
            hub.negotiate = lambda request: (200, {"url": hub.url})
            connection = HubConnection(hub.url)
            with pytest.raises(NegotiateError, match="Negotiate redirection limit exceeded."):
                await connection.start()
            assert len(hub.of("POST")) == 100
            assert connection.state is HubConnectionState.DISCONNECTED

    run(backend, scenario)


_WS = [{"transport": "WebSockets", "transferFormats": ["Text", "Binary"]}]


@pytest.mark.parametrize("backend", TWO_BACKENDS)
@pytest.mark.parametrize(("status", "document", "protocol", "expected"), [
    (200, {"error": "Unauthorized: no user"}, "json", r"^Unauthorized: no user$"),
    (401, {"detail": "bad token"}, "json", r"^Failed to complete negotiation with the "
     r"server: 401 Unauthorized at http://.*/hub/negotiate\?negotiateVersion=1: .*bad token"),
    (404, {}, "json", r"404 Not Found \(is the URL the hub's URL\?\)"),
    (200, ["not", "an", "object"], "json", r"is not a JSON object"),
    (200, {"ProtocolVersion": "1.5"}, "json", r"Detected a connection attempt to an ASP\.NET "
     r"SignalR Server"),
    (200, {"negotiateVersion": 1, "connectionToken": "t", "useStatefulReconnect": True,
           "availableTransports": _WS}, "json",
     r"Client didn't negotiate Stateful Reconnect but the server did\."),
    (200, {"negotiateVersion": 1, "connectionToken": "t", "availableTransports": [
        {"transport": "ServerSentEvents", "transferFormats": ["Text"]},
        {"transport": "Pigeon", "transferFormats": ["Binary"]}]}, "messagepack",
     r"None of the transports supported by the client are supported by the server: the "
     r"client needs WebSockets or ServerSentEvents or LongPolling with the Binary format "
     r"\(messagepack\), the server offers ServerSentEvents \(Text\), Pigeon \(Binary\)\."),
    (200, {"negotiateVersion": 1, "connectionToken": "t"}, "json",
     r"the server offers nothing\."),
    (200, {"url": 42}, "json", r"The negotiate redirect's 'url' must be a non-empty string"),
])
def test_negotiate_failures_say_what_was_wrong(backend, status, document, protocol,
                                                expected):
    async def scenario():
        async with fake_hub() as hub:
            hub.negotiate = lambda request: (status, document)
            connection = HubConnection(hub.url, protocol=protocol)
            closed = []
            connection.on_close(closed.append)
            with pytest.raises(NegotiateError, match=expected) as caught:
                await connection.start()
            assert caught.value.status == (status if status != 200 else None)
            assert connection.state is HubConnectionState.DISCONNECTED
            assert closed == [] and hub.connections == []

    run(backend, scenario)


@pytest.mark.parametrize("backend", TWO_BACKENDS)
def test_negotiate_version_0_connects_with_the_connection_id(backend):
    async def scenario():
        async with fake_hub() as hub:
            hub.negotiate = lambda request: (200, {"connectionId": "public-id",
                                                   "availableTransports": _WS})
            async with HubConnection(hub.url) as connection:
                assert connection.connection_id == "public-id"
                server = await hub.connection(0)
            assert server.request.target == "/hub?id=public-id"

    run(backend, scenario)


@pytest.mark.parametrize("backend", TWO_BACKENDS)
def test_skip_negotiation_opens_the_websocket_directly_with_the_token(backend):
    async def scenario():
        async with fake_hub() as hub:
            connection = HubConnection(f"ws://127.0.0.1:{hub.port}/hub?x=1",
                                       skip_negotiation=True,
                                       access_token_factory=lambda: "direct")
            async with connection:
                assert connection.connection_id is None
                server = await hub.connection(0)
            assert hub.of("POST") == []
            assert server.request.target == "/hub?x=1"
            assert server.request.headers["authorization"] == "Bearer direct"

    run(backend, scenario)


@pytest.mark.parametrize("backend", TWO_BACKENDS)
def test_a_refused_upgrade_and_a_refused_handshake_fail_start(backend):
    async def scenario():
        async with fake_hub() as hub:
            hub.refuse_upgrade = 404
            connection = HubConnection(hub.url)
            with pytest.raises(TransportError, match=r"WebSocket failed to connect to "
                               r"ws://127\.0\.0\.1:\d+/hub\?id=tok-1: HTTP 404: refused") as c:
                await connection.start()
            assert c.value.status == 404

            hub.refuse_upgrade = None
            hub.handshake_answer = b'{"error":"The protocol \'json\' is not supported."}\x1e'
            with pytest.raises(HandshakeError, match="Server returned handshake error: The "
                               "protocol 'json' is not supported.") as caught:
                await connection.start()
            assert caught.value.error == "The protocol 'json' is not supported."
            assert connection.state is HubConnectionState.DISCONNECTED

            hub.handshake_answer = b'{"type":6}\x1e'
            with pytest.raises(HandshakeError, match="Expected a handshake response"):
                await connection.start()

    run(backend, scenario)


@pytest.mark.parametrize("backend", TWO_BACKENDS)
def test_a_silent_server_answers_no_handshake_and_start_says_so(backend):
    async def scenario():
        async with fake_hub() as hub:
            hub.handshake_answer = b""  # nothing at all
            connection = HubConnection(hub.url, server_timeout=0.2)
            with pytest.raises(HandshakeError, match=r"did not answer the hub handshake "
                               r"within 0\.2 s"):
                await connection.start()

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("protocol", ["json", "messagepack"])
def test_handshake_is_a_text_frame_then_frames_of_the_protocol_and_a_first_ping(
        backend, protocol):
    async def scenario():
        async with fake_hub() as hub:
            async with HubConnection(hub.url, protocol=protocol) as connection:
                server = await hub.connection(0)
                await server.next(PingMessage)
                await connection.send("hello", 1)
                assert (await server.next(InvocationMessage)).arguments == (1,)
            await server.next(CloseMessage)
            frame = "binary" if protocol == "messagepack" else "text"
            assert server.frames == ["text", frame, frame, frame]
            assert server.protocol_name == protocol

    run(backend, scenario)


@pytest.mark.parametrize("backend", TWO_BACKENDS)
def test_keep_alive_pings_an_idle_server_and_sending_postpones_them(backend):
    async def scenario():
        async with fake_hub() as hub:
            async with HubConnection(hub.url, keep_alive_interval=0.05) as connection:
                server = await hub.connection(0)
                await wait_for(lambda: server.pings() >= 4)
                # While the client keeps sending, no ping is needed.
                before = server.pings()
                for number in range(10):
                    await connection.send("tick", number)
                    await anyio.sleep(0.01)
                assert server.pings() - before <= 1
                assert len(server.of(InvocationMessage)) == 10

    run(backend, scenario)


@pytest.mark.parametrize("backend", TWO_BACKENDS)
def test_server_silence_past_the_server_timeout_ends_the_connection(backend):
    async def scenario():
        async with fake_hub() as hub:
            connection = HubConnection(hub.url, server_timeout=0.3)
            closed = []
            connection.on_close(closed.append)
            await connection.start()
            await wait_for(lambda: closed)
            assert isinstance(closed[0], ServerTimeoutError)
            assert "Server timeout elapsed without receiving a message from the server" in \
                str(closed[0])
            assert connection.state is HubConnectionState.DISCONNECTED
            await connection.stop()  # already Disconnected: nothing to do

    run(backend, scenario)


@pytest.mark.parametrize("backend", TWO_BACKENDS)
def test_messages_in_the_handshake_answers_frame_are_delivered(backend):
    async def scenario():
        async with fake_hub() as hub:
            hub.handshake_answer = (b'{}\x1e{"type":1,"target":"Notify","arguments":["early"]}'
                                    b'\x1e')
            got = []
            connection = HubConnection(hub.url)
            connection.on("notify", got.append)  # names match case-insensitively
            async with connection:
                await wait_for(lambda: got)
            assert got == ["early"]

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_client_results_answer_as_the_js_client_does(backend):
    async def scenario():
        async with fake_hub() as hub:
            connection = HubConnection(hub.url)

            async def double(x):
                await anyio.sleep(0)
                return 2 * x

            def refuse(x):
                raise ValueError(f"no {x}")

            connection.on("double", double)
            connection.on("refuse", refuse)
            connection.on("twice", lambda: 1)
            connection.on("twice", lambda: 2)
            connection.on("nothing", lambda: None)
            async with connection:
                server = await hub.connection(0)
                for index, (target, args) in enumerate([
                        ("double", [21]), ("refuse", [3]), ("twice", []), ("nothing", []),
                        ("missing", [])]):
                    await server.send(InvocationMessage(target, args, f"s{index}"))
                answers = {}
                for _ in range(5):
                    completion = await server.next(CompletionMessage)
                    answers[completion.invocation_id] = (completion.error, completion.result)
            assert answers == {
                "s0": (None, 42),
                "s1": ("ValueError: no 3", None),
                "s2": ("Client provided multiple results.", None),
                "s3": ("Client didn't provide a result.", None),
                "s4": ("Client didn't provide a result.", None),
            }

    run(backend, scenario)


@pytest.mark.parametrize("backend", TWO_BACKENDS)
def test_handlers_run_in_order_and_off_removes_them(backend):
    async def scenario():
        async with fake_hub() as hub:
            connection = HubConnection(hub.url)
            seen: list[Any] = []
            first = connection.on("n", seen.append)

            @connection.on("n")
            async def also(value):
                seen.append(("async", value))

            async with connection:
                server = await hub.connection(0)
                await server.send(InvocationMessage("n", [1]))
                await wait_for(lambda: len(seen) == 2)
                connection.off("n", first)
                await server.send(InvocationMessage("n", [2]))
                await wait_for(lambda: len(seen) == 3)
                connection.off("n")
                await server.send(InvocationMessage("n", [3]), InvocationMessage("m", []))
                await server.send(InvocationMessage("nothing-here", [], "s1"))
                await server.next(CompletionMessage)  # the missing handler's answer
            assert seen == [1, ("async", 1), ("async", 2)]

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_invoke_returns_the_result_and_raises_the_servers_error(backend):
    async def scenario():
        async with fake_hub() as hub:
            async with HubConnection(hub.url) as connection:
                server = await hub.connection(0)

                async def answer():
                    calls = {}
                    for _ in range(2):
                        invocation = await server.next(InvocationMessage)
                        calls[invocation.target] = invocation
                    assert {c.invocation_id for c in calls.values()} == {"0", "1"}
                    assert calls["a"].arguments == (1, 2)
                    # Answered in the other order: each reaches its own caller.
                    await server.send(
                        CompletionMessage(calls["b"].invocation_id,
                                          error="Unknown hub method 'b'"),
                        CompletionMessage(calls["a"].invocation_id, result={"sum": 3}))

                outcomes: dict[str, Any] = {}

                async def call(target, *args):
                    try:
                        outcomes[target] = await connection.invoke(target, *args)
                    except HubException as exc:
                        outcomes[target] = exc

                async with anyio.create_task_group() as task_group:
                    task_group.start_soon(answer)
                    task_group.start_soon(call, "a", 1, 2)
                    task_group.start_soon(call, "b")
                assert outcomes["a"] == {"sum": 3}
                assert isinstance(outcomes["b"], HubException)
                assert str(outcomes["b"]) == outcomes["b"].error == "Unknown hub method 'b'"

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stream_yields_items_and_a_consumer_that_stops_early_cancels_it(backend):
    async def scenario():
        async with fake_hub() as hub:
            async with HubConnection(hub.url) as connection:
                server = await hub.connection(0)

                async def produce(count: int, error: str | None = None):
                    invocation = await server.next(StreamInvocationMessage)
                    for item in range(count):
                        await server.send(StreamItemMessage(invocation.invocation_id, item))
                    await server.send(CompletionMessage(invocation.invocation_id, error=error))

                async with anyio.create_task_group() as task_group:
                    task_group.start_soon(produce, 3)
                    assert [item async for item in connection.stream("count", 3)] == [0, 1, 2]

                    task_group.start_soon(produce, 2, "it broke")
                    received = []
                    with pytest.raises(HubException, match="it broke"):
                        async for item in connection.stream("count", 2):
                            received.append(item)
                    assert received == [0, 1]

                # A consumer that breaks out of the loop: the dropped iterator cancels.
                async def items_then_wait():
                    invocation = await server.next(StreamInvocationMessage)
                    for item in range(5):
                        await server.send(StreamItemMessage(invocation.invocation_id, item))
                    return invocation.invocation_id

                async with anyio.create_task_group() as task_group:
                    task_group.start_soon(items_then_wait)
                    async for item in connection.stream("forever"):
                        if item == 1:
                            break
                cancel = await server.next(CancelInvocationMessage)
                assert cancel.invocation_id == "2"

                # With async with, the cancel is sent when the block ends.
                async with anyio.create_task_group() as task_group:
                    task_group.start_soon(items_then_wait)
                    async with connection.stream("forever") as stream:
                        assert await stream.__anext__() == 0
                        assert stream.invocation_id == "3"
                    assert (await server.next(CancelInvocationMessage)).invocation_id == "3"

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_async_iterable_arguments_are_uploaded_as_streams(backend):
    async def scenario():
        async with fake_hub() as hub:
            async with HubConnection(hub.url) as connection:
                server = await hub.connection(0)

                async def numbers():
                    for number in range(3):
                        yield number

                async def failing():
                    yield "a"
                    raise RuntimeError("the source failed")

                async def answer():
                    invocation = await server.next(InvocationMessage)
                    # Stream ids come from the invocation counter, before the call's own id.
                    assert invocation.stream_ids == ("0",)
                    assert invocation.invocation_id == "1"
                    assert invocation.arguments == ("label",)
                    while not any(m.invocation_id == "0" for m in server.of(CompletionMessage)):
                        await anyio.sleep(0.01)
                    await server.send(CompletionMessage("1", result="done"))

                async with anyio.create_task_group() as task_group:
                    task_group.start_soon(answer)
                    assert await connection.invoke("upload", "label", numbers()) == "done"
                await connection.send("upload", failing())
                await wait_for(lambda: len(server.of(CompletionMessage)) == 2)
            items = [(m.invocation_id, m.item) for m in server.of(StreamItemMessage)]
            assert items == [("0", 0), ("0", 1), ("0", 2), ("2", "a")]
            ends = [(m.invocation_id, m.error) for m in server.of(CompletionMessage)]
            assert ends == [("0", None), ("2", "RuntimeError: the source failed")]

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_dropped_transport_fails_pending_calls_and_closes_without_a_policy(backend):
    async def scenario():
        async with fake_hub() as hub:
            connection = HubConnection(hub.url)
            closed = []
            connection.on_close(closed.append)
            await connection.start()
            server = await hub.connection(0)

            async def drop_when_asked():
                await server.next(InvocationMessage)
                await server.drop()

            async with anyio.create_task_group() as task_group:
                task_group.start_soon(drop_when_asked)
                with pytest.raises(HubConnectionError, match="Invocation canceled due to the "
                                   "underlying connection being closed.") as caught:
                    await connection.invoke("slow")
            assert isinstance(caught.value.__cause__, TransportError)
            assert caught.value.__cause__.code == 1006
            await wait_for(lambda: closed)
            assert closed == [caught.value.__cause__]
            assert connection.state is HubConnectionState.DISCONNECTED
            with pytest.raises(HubConnectionError, match="Cannot send data if the connection "
                               "is not in the 'Connected' State."):
                await connection.send("late")

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_close_with_allow_reconnect_reconnects_and_ids_keep_counting(backend):
    async def scenario():
        async with fake_hub() as hub:
            connection = HubConnection(hub.url, reconnect=[0, 0])
            events: list[Any] = []
            connection.on_reconnecting(lambda error: events.append(("reconnecting", error)))
            connection.on_reconnected(lambda cid: events.append(("reconnected", cid)))
            connection.on_close(lambda error: events.append(("closed", error)))
            async with connection:
                first = await hub.connection(0)
                await connection.send("before")
                await first.send(CloseMessage(allow_reconnect=True))
                second = await hub.connection(1)
                await wait_for(lambda: connection.state is HubConnectionState.CONNECTED
                               and len(events) == 2)
                assert events[0][0] == "reconnecting"
                assert isinstance(events[0][1], HubConnectionError)
                assert events[1] == ("reconnected", "id-tok-2")
                assert connection.connection_id == "id-tok-2"

                async def answer():
                    invocation = await second.next(InvocationMessage)
                    await second.send(CompletionMessage(invocation.invocation_id,
                                                        result=invocation.invocation_id))

                async with anyio.create_task_group() as task_group:
                    task_group.start_soon(answer)
                    assert await connection.invoke("after") == "0"
                    # the first id: send() takes none; invoke's counter survived the reconnect
            assert events[2:] == [("closed", None)]

    run(backend, scenario)


@pytest.mark.parametrize("backend", TWO_BACKENDS)
def test_close_with_an_error_ends_the_connection_despite_a_retry_policy(backend):
    async def scenario():
        async with fake_hub() as hub:
            connection = HubConnection(hub.url, reconnect=True)
            closed = []
            connection.on_close(closed.append)
            await connection.start()
            server = await hub.connection(0)
            await server.send(CloseMessage("the service is going away"))
            await wait_for(lambda: closed)
            assert isinstance(closed[0], ServerClosedError)
            assert str(closed[0]) == ("Server returned an error on close: the service is going "
                                      "away")
            assert closed[0].error == "the service is going away"
            assert len(hub.connections) == 1

    run(backend, scenario)


@pytest.mark.parametrize("backend", TWO_BACKENDS)
def test_a_retry_policy_is_told_each_failure_and_giving_up_is_reported(backend):
    async def scenario():
        async with fake_hub() as hub:
            contexts: list[RetryContext] = []

            def policy(context: RetryContext) -> float | None:
                contexts.append(context)
                return 0.01 if context.previous_retry_count < 2 else None

            connection = HubConnection(hub.url, reconnect=policy)
            closed = []
            connection.on_close(closed.append)
            await connection.start()
            server = await hub.connection(0)
            hub.refuse_upgrade = 503
            await server.drop()
            await wait_for(lambda: closed)
            assert [c.previous_retry_count for c in contexts] == [0, 1, 2]
            assert isinstance(contexts[0].retry_reason, TransportError)
            assert contexts[1].retry_reason.status == 503
            assert contexts[2].elapsed >= contexts[1].elapsed
            assert isinstance(closed[0], HubConnectionError)
            assert str(closed[0]).startswith("Reconnect retries have been exhausted after 2 "
                                             "failed attempts")
            assert closed[0].__cause__.status == 503

    run(backend, scenario)


@pytest.mark.parametrize("backend", TWO_BACKENDS)
def test_stop_sends_a_close_message_and_may_be_called_from_a_handler(backend):
    async def scenario():
        async with fake_hub() as hub:
            connection = HubConnection(hub.url, reconnect=True)
            closed = []
            connection.on_close(closed.append)

            async def bye():
                await connection.stop()

            connection.on("bye", bye)
            await connection.start()
            with pytest.raises(HubConnectionError, match="not in the 'Disconnected' state"):
                await connection.start()
            server = await hub.connection(0)
            await server.send(InvocationMessage("bye", []))
            await wait_for(lambda: closed)
            assert closed == [None]
            assert isinstance(await server.next(CloseMessage), CloseMessage)
            await server.closed.wait()
            assert len(hub.connections) == 1  # a stop is not a reason to reconnect

            # Started again, it is a new connection.
            await connection.start()
            assert connection.connection_id == "id-tok-2"
            await connection.stop()
            assert closed == [None, None]

    run(backend, scenario)


@pytest.mark.parametrize("backend", TWO_BACKENDS)
def test_a_close_callback_may_start_the_connection_again(backend):
    async def scenario():
        async with fake_hub() as hub:
            connection = HubConnection(hub.url)
            closed: list[Any] = []

            async def start_again(error):
                closed.append(error)
                if len(closed) == 1:
                    await connection.start()

            connection.on_close(start_again)
            await connection.start()
            await (await hub.connection(0)).drop()
            second = await hub.connection(1)
            await wait_for(lambda: connection.state is HubConnectionState.CONNECTED)
            assert connection.connection_id == "id-tok-2"
            await second.send(InvocationMessage("ping-me", [], "s1"))
            assert (await second.next(CompletionMessage)).error == \
                "Client didn't provide a result."
            await connection.stop()
            assert [type(error).__name__ for error in closed] == ["TransportError", "NoneType"]

    run(backend, scenario)


@pytest.mark.parametrize("backend", TWO_BACKENDS)
def test_when_every_transport_fails_start_names_each_failure(backend):
    async def scenario():
        async with fake_hub() as hub:
            def negotiate(request):
                status, document = hub.default_negotiate(request)
                document["availableTransports"] = [
                    {"transport": "WebSockets", "transferFormats": ["Text", "Binary"]},
                    {"transport": "LongPolling", "transferFormats": ["Text", "Binary"]}]
                return status, document

            hub.negotiate = negotiate
            hub.refuse_upgrade = 404
            connection = HubConnection(hub.url)
            with pytest.raises(TransportError, match=r"Unable to connect to the server with any "
                               r"of the available transports: WebSockets: .*HTTP 404.*; "
                               r"LongPolling: .*HTTP 404"):
                await connection.start()
            # A new negotiate before the second transport, as the JS client does.
            assert [r.method for r in hub.requests] == ["POST", "GET", "POST", "GET"]
            assert hub.requests[3].query["id"] == "tok-2"
            assert hub.requests[3].headers.get("upgrade") is None

            only = HubConnection(hub.url, transport="LongPolling")
            with pytest.raises(TransportError, match=r"^LongPolling failed to connect to "
                               r"http://127\.0\.0\.1:\d+/hub\?id=tok-3: HTTP 404"):
                await only.start()

    run(backend, scenario)
