"""The accept loop (``relay/_accept.py``): each accepted connection is admitted (its handler
runs) or refused at once with a 503 saying why; out of file descriptors, the spare one makes
room to refuse the pending connection, and the shortage is logged once per interval.

The listener is scripted (what each ``accept`` returns or raises) and the connections are
local socket pairs, since a refusal writes to the socket itself; time is trio's autojump
clock. ``tests/test_relay_limits.py`` runs the real thing out of descriptors, in a subprocess.
"""

from __future__ import annotations

import errno
import logging
import socket

import orjson
import pytest
import trio

from relaycore.relay._accept import refusal, serve_accept


class ScriptedListener:
    """``accept`` returns or raises the next item of the script, then waits for ever."""

    def __init__(self, script: list) -> None:
        self.script = script
        self.closed = False

    async def accept(self) -> trio.SocketStream:
        await trio.lowlevel.checkpoint()
        if not self.script:
            await trio.sleep_forever()
        item = self.script.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    async def aclose(self) -> None:
        self.closed = True


@pytest.fixture
def pairs():
    """Accepted streams and the client ends of their connections."""
    made = [socket.socketpair() for _ in range(2)]
    yield [(trio.SocketStream(trio.socket.from_stdlib_socket(ours)), theirs)
           for ours, theirs in made]
    for ours, theirs in made:
        ours.close()
        theirs.close()


def answer_of(client: socket.socket) -> tuple[int, dict]:
    client.settimeout(5)
    raw = b""
    while chunk := client.recv(65536):
        raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), orjson.loads(body)


def emfile() -> OSError:
    return OSError(errno.EMFILE, "Too many open files")


def test_a_refusal_is_a_complete_503_that_closes_and_says_why():
    raw = refusal("the relay is full")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ")
    assert b"Connection: close" in head and b"Retry-After: 1" in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert orjson.loads(body) == {"code": "ServiceUnavailable", "message": "the relay is full"}


async def run(listener: ScriptedListener, admit, **kwargs) -> tuple[list, list]:
    handled: list = []
    refused: list = []

    async def handler(stream: trio.SocketStream) -> None:
        handled.append(stream)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: serve_accept(listener, handler, admit, refused.append,
                                                **kwargs))
        while listener.script:
            await trio.sleep(0.05)
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert listener.closed
    return handled, refused


async def test_admitted_connections_are_handled_and_the_others_refused_at_once(autojump_clock,
                                                                              pairs):
    (first, _), (second, client) = pairs
    reasons = iter([None, "the relay is full"])
    handled, refused = await run(ScriptedListener([first, second]), lambda: next(reasons))
    assert handled == [first] and refused == ["the relay is full"]
    assert answer_of(client) == (503, {"code": "ServiceUnavailable",
                                       "message": "the relay is full"})


async def test_out_of_descriptors_the_pending_connections_are_refused_and_logged_once(
        autojump_clock, pairs, caplog):
    (first, one), (second, two) = pairs
    script = [emfile(), first, emfile(), second]
    with caplog.at_level(logging.ERROR, logger="relaycore.relay"):
        handled, refused = await run(ScriptedListener(script), lambda: None, log_interval=10)
    assert handled == []
    assert refused == ["the relay is out of file descriptors"] * 2
    for client in (one, two):
        assert answer_of(client)[1]["message"] == "the relay is out of file descriptors"
    (line,) = [r.getMessage() for r in caplog.records]
    assert "out of file descriptors (EMFILE)" in line and "1 time(s)" in line


async def test_an_accept_error_that_is_no_shortage_ends_the_loop(autojump_clock):
    listener = ScriptedListener([OSError(errno.EBADF, "Bad file descriptor")])
    with pytest.raises(Exception) as info:  # noqa: B017 - the error inside the nursery's group
        await serve_accept(listener, None, lambda: None, lambda reason: None)  # type: ignore[arg-type]
    errors = getattr(info.value, "exceptions", (info.value,))
    assert [(type(e), e.errno) for e in errors] == [(OSError, errno.EBADF)]
    assert listener.closed
