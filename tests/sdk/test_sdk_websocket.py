"""The SDK's WebSocket client driver: the upgrade checks and messages both ways."""

from __future__ import annotations

import anyio
import anyio.abc
import h11
import pytest
from sdkhelpers import BACKENDS, run

from relaycore.protocol import BinaryMessage, Role, TextMessage, WebSocketProtocol, accept_key
from relaycore.sdk._websocket import WebSocketClosed, WebSocketHandshakeError, connect_websocket


async def one_shot_server(task_group: anyio.abc.TaskGroup, handler) -> int:
    """Serve one connection with ``handler(stream, request_headers)``; returns the port."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def serve():
        async with listener:
            stream = await listener.listeners[0].accept()
        async with stream:
            conn = h11.Connection(h11.SERVER)
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive())
                    continue
                break
            headers = {k.decode().lower(): v.decode() for k, v in event.headers}
            await handler(stream, conn, headers)

    task_group.start_soon(serve)
    return port


@pytest.mark.parametrize("backend", BACKENDS)
def test_websocket_round_trip_with_masking_text_and_binary(backend):
    async def handler(stream, conn, headers):
        assert headers["authorization"] == "Bearer t"
        await stream.send(conn.send(h11.InformationalResponse(status_code=101, headers=[
            ("upgrade", "websocket"), ("connection", "Upgrade"),
            ("sec-websocket-accept", accept_key(headers["sec-websocket-key"]))])))
        ws = WebSocketProtocol(Role.SERVER)
        ws.send_binary(b"hello")  # sent right behind the 101, in the same read maybe
        await stream.send(ws.data_to_send())
        got = []
        while len(got) < 2:
            ws.receive_data(await stream.receive())
            got += [e for e in ws.events_received() if isinstance(e, TextMessage | BinaryMessage)]
        assert got == [TextMessage("text"), BinaryMessage(b"\x00\x01")]
        ws.send_close(1000, "bye")
        await stream.send(ws.data_to_send())

    async def scenario():
        async with anyio.create_task_group() as tg:
            port = await one_shot_server(tg, handler)
            ws = await connect_websocket(f"ws://127.0.0.1:{port}/x?y=1", [("Authorization",
                                                                           "Bearer t")])
            assert await ws.receive() == b"hello"
            await ws.send("text")
            await ws.send(b"\x00\x01")
            with pytest.raises(WebSocketClosed) as info:
                await ws.receive()
            assert (info.value.code, info.value.reason) == (1000, "bye")
            assert ws.closed
            with pytest.raises(WebSocketClosed):
                await ws.send(b"late")
            await ws.aclose()

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_websocket_upgrade_refused_with_status_and_body(backend):
    async def handler(stream, conn, headers):
        body = b'{"error":"bad token"}'
        await stream.send(conn.send(h11.Response(status_code=401, headers=[
            ("content-length", str(len(body)))])) + conn.send(h11.Data(data=body))
            + conn.send(h11.EndOfMessage()))

    async def scenario():
        async with anyio.create_task_group() as tg:
            port = await one_shot_server(tg, handler)
            with pytest.raises(WebSocketHandshakeError) as info:
                await connect_websocket(f"ws://127.0.0.1:{port}/")
            assert info.value.status == 401 and b"bad token" in info.value.body
            assert "HTTP 401" in str(info.value)

    run(backend, scenario)


@pytest.mark.parametrize("backend", BACKENDS)
def test_websocket_upgrade_with_wrong_accept_key_is_refused(backend):
    async def handler(stream, conn, headers):
        await stream.send(conn.send(h11.InformationalResponse(status_code=101, headers=[
            ("upgrade", "websocket"), ("connection", "Upgrade"),
            ("sec-websocket-accept", accept_key("something else"))])))

    async def scenario():
        async with anyio.create_task_group() as tg:
            port = await one_shot_server(tg, handler)
            with pytest.raises(WebSocketHandshakeError, match="Sec-WebSocket-Accept"):
                await connect_websocket(f"ws://127.0.0.1:{port}/")

    run(backend, scenario)


def test_websocket_url_scheme_is_checked():
    async def scenario():
        await connect_websocket("ftp://example/")

    with pytest.raises(ValueError, match="ws://"):
        anyio.run(scenario)
