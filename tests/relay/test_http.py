"""The relay's HTTP/1.1 front on h11 (``relay/_http.py``), over trio's in-memory streams:
requests read whole within their limits, responses framed for the request, keep-alive, the
upgrade's trailing bytes, and the small helpers the faces use."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from relaycore.relay._http import (
    HttpConnection,
    HttpError,
    Request,
    Response,
    bearer_token,
    peer_address,
    query_without,
)


def connection(max_body: int = 100) -> tuple[trio.abc.Stream, HttpConnection]:
    client, server = trio.testing.memory_stream_pair()
    return client, HttpConnection(server, max_head=1024, max_body=max_body)


async def read_answer(client: trio.abc.Stream) -> bytes:
    received = bytearray()
    while b"\r\n\r\n" not in received:
        received += await client.receive_some(65536)
    return bytes(received)


async def test_a_request_is_read_with_its_body_and_query():
    client, http = connection()
    await client.send_all(b"POST /api/hubs/chat/:send?Excluded=a&excluded=b&x= HTTP/1.1\r\n"
                          b"Host: h\r\nX-Twice: 1\r\nX-Twice: 2\r\nContent-Length: 5\r\n\r\nhello")
    request = await http.read_request()
    assert (request.method, request.path, request.body) == ("POST", "/api/hubs/chat/:send",
                                                            b"hello")
    assert request.args("excluded") == ["a", "b"] and request.arg("X") == ""
    assert request.arg("missing", "default") == "default"
    assert request.headers["x-twice"] == "1, 2"
    assert request.peer is None  # an in-memory stream has no address
    assert not request.is_websocket_upgrade


async def test_a_body_over_the_limit_is_a_413_whether_announced_or_not():
    client, http = connection(max_body=10)
    await client.send_all(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\n")
    with pytest.raises(HttpError) as info:
        await http.read_request()
    assert info.value.status == 413
    client, http = connection(max_body=10)
    await client.send_all(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"b\r\nhello world\r\n0\r\n\r\n")
    with pytest.raises(HttpError) as info:
        await http.read_request()
    assert info.value.status == 413


@pytest.mark.parametrize(("raw", "status"), [(b"NOT HTTP\r\n\r\n", 400),
                                             (b"GET / HTTP/1.1\r\nX: " + b"y" * 2000, 431)])
async def test_a_malformed_or_oversized_head_is_refused(raw, status):
    client, http = connection()
    await client.send_all(raw)
    with pytest.raises(HttpError) as info:
        await http.read_request()
    assert info.value.status == status


async def test_a_closed_connection_reads_as_no_request():
    client, http = connection()
    await client.aclose()
    assert await http.read_request() is None


async def test_responses_are_framed_for_their_request_and_keep_alive_continues():
    client, http = connection()
    await client.send_all(b"HEAD /api/health HTTP/1.1\r\nHost: h\r\n\r\n")
    await http.read_request()
    await http.send_response(Response.json(200, {"a": 1}))
    answer = await read_answer(client)
    assert answer.startswith(b"HTTP/1.1 200 ") and b"content-length: 7" in answer.lower()
    assert answer.endswith(b"\r\n\r\n")  # no body after a HEAD
    assert http.can_continue()
    await client.send_all(b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    await http.read_request()
    await http.send_response(Response.error(HttpError(404, "no such thing")))
    answer = await read_answer(client)
    while not answer.endswith(b"}"):
        answer += await client.receive_some(65536)
    assert b'{"code":"NotFound","message":"no such thing"}' in answer
    assert not http.can_continue()


async def test_an_upgrade_request_is_answered_101_with_the_bytes_read_past_it():
    client, http = connection()
    await client.send_all(b"GET /client/?hub=chat HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n"
                          b"Connection: keep-alive, Upgrade\r\n\r\n\x81\x80mask")
    request = await http.read_request()
    assert request.is_websocket_upgrade
    trailing = await http.send_switching_protocols({"Upgrade": "websocket"})
    assert trailing == b"\x81\x80mask"
    assert (await read_answer(client)).startswith(b"HTTP/1.1 101 ")


def test_query_without_drops_only_the_named_parameters_and_keeps_the_rest_as_it_came():
    assert query_without("hub=chat&room=a%26b&Access_Token=t&x", {"access_token"}) == (
        "hub=chat&room=a%26b&x")
    assert query_without("hub=chat", {"access_token"}) == "hub=chat"


def test_bearer_token_reads_only_a_bearer_authorization():
    def with_auth(value: str) -> Request:
        return Request("GET", "/", "/", "", [], {"authorization": value})

    assert bearer_token(with_auth("Bearer abc ")) == "abc"
    assert bearer_token(with_auth("bearer abc")) == "abc"
    assert bearer_token(with_auth("Basic abc")) is None
    assert bearer_token(with_auth("Bearer ")) is None


def test_peer_address_is_none_without_a_connected_socket():
    assert peer_address(object()) is None
