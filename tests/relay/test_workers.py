"""The pieces of ``serve --workers`` that need no worker process (``relay/_workers.py``): how
many workers ``--workers`` means, listeners that share one port, the port the supervisor
keeps, and the command's refusals (each one line, exit status 2). The workers themselves are
run in ``tests/e2e/test_workers.py``.
"""

from __future__ import annotations

import os

import pytest
import trio

from relaycore.__main__ import main
from relaycore.relay._workers import reserve_port, reuse_port_listeners, worker_count


def test_workers_count_is_a_positive_number_or_one_per_core():
    assert worker_count("3") == 3
    cores = len(os.sched_getaffinity(0))
    assert worker_count("auto") == worker_count("AUTO") == worker_count("0") == cores
    for bad in ("-1", "many"):
        with pytest.raises(ValueError):
            worker_count(bad)


async def test_listeners_share_the_port_the_supervisor_keeps():
    kept = reserve_port("127.0.0.1", 0)
    try:
        port = kept.getsockname()[1]
        first = await reuse_port_listeners("127.0.0.1", port)
        second = await reuse_port_listeners("127.0.0.1", port)
        try:
            # The kept socket does not listen: every connection goes to one of the listeners.
            accepted = 0
            one_accepted = trio.Event()

            async def accept(listener):
                nonlocal accepted
                stream = await listener.accept()
                accepted += 1
                one_accepted.set()
                await stream.aclose()

            async with trio.open_nursery() as nursery:
                for listener in (*first, *second):
                    nursery.start_soon(accept, listener)
                client = await trio.open_tcp_stream("127.0.0.1", port)
                with trio.fail_after(5):
                    await one_accepted.wait()
                await client.aclose()
                nursery.cancel_scope.cancel()
            assert accepted == 1
        finally:
            for listener in (*first, *second):
                await listener.aclose()
    finally:
        kept.close()


def test_serve_refuses_a_bad_workers_count(capsys):
    assert main(["serve", "--port", "0", "--workers", "none"]) == 2
    err = capsys.readouterr().err
    assert "--workers" in err and err.count("\n") == 1


def test_serve_refuses_workers_on_a_port_another_process_holds(capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port), "--workers", "2",
                     "--redis", "redis://127.0.0.1:1/0"]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
