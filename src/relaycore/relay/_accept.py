"""Accepting TCP connections without letting the excess in, and without a loop of errors when
the process runs out of file descriptors.

Theory of operation
-------------------
``serve_accept`` is the relay's accept loop (in place of ``trio.serve_listeners``, which logs an
``EMFILE`` traceback every 0.1 s and holds the pending connection until a descriptor frees):

* ``admit()`` decides for each accepted connection: ``None`` runs the handler in a task; a
  reason answers ``503`` with that reason at once, with no task, and closes (the relay is at its
  connection limit, say).
* When ``accept()`` fails for want of descriptors (``EMFILE``, ``ENFILE``), one **spare**
  descriptor, opened at start for this alone, is closed so that the pending connection can be
  accepted and refused with a 503; the spare is then opened again. The client hears why at once
  instead of waiting in the backlog, and the loop does not spin on the same error. Such events
  are logged once per ``log_interval`` with how many there were, not each time.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import socket
from collections.abc import Awaitable, Callable

import orjson
import trio

log = logging.getLogger("relaycore.relay")

#: accept() errors that mean "no descriptor or buffer now", not "the listener is broken".
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def refusal(reason: str) -> bytes:
    """A complete ``503`` answer that closes the connection, with a JSON body saying why."""
    body = orjson.dumps({"code": "ServiceUnavailable", "message": reason})
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8"
            b"\r\nRetry-After: 1\r\nConnection: close\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


def refuse_now(sock: socket.socket, answer: bytes) -> None:
    """Write ``answer`` without waiting (it fits any socket buffer), read what the client sent
    already (closing with unread bytes would reset the connection and lose the answer), and
    close. Best effort: a client that is gone is gone."""
    try:
        sock.setblocking(False)
        sock.send(answer)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(65536)
    except OSError:
        pass
    finally:
        sock.close()


def _raw(stream: trio.SocketStream) -> socket.socket:
    """The stream's socket as a plain one (trio lets go of it)."""
    return socket.socket(fileno=stream.socket.detach())


class _Spare:
    """One descriptor held in reserve for refusing connections when there are no others."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self.reopen()

    def reopen(self) -> None:
        if self._fd is None:
            try:
                self._fd = os.open(os.devnull, os.O_RDONLY)
            except OSError:
                self._fd = None  # still none free: the next shortage tries again

    def release(self) -> bool:
        if self._fd is None:
            return False
        os.close(self._fd)
        self._fd = None
        return True

    def close(self) -> None:
        self.release()


async def serve_accept(
    listener: trio.SocketListener,
    handler: Callable[[trio.SocketStream], Awaitable[object]],
    admit: Callable[[], str | None],
    on_refused: Callable[[str], None],
    *,
    log_interval: float = 10.0,
) -> None:
    """Accept connections on ``listener`` for ever (see the module's docstring)."""
    spare = _Spare()
    last_log = -math.inf
    shortages = 0
    try:
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _OUT_OF_RESOURCES:
                        raise
                    shortages += 1
                    now = trio.current_time()
                    if now - last_log >= log_interval:
                        log.error("out of file descriptors (%s): refusing new connections with "
                                  "503 (%d time(s) since the last report); raise the open-file "
                                  "limit or lower max_connections", errno.errorcode[exc.errno],
                                  shortages)
                        last_log, shortages = now, 0
                    if spare.release():
                        try:
                            with trio.move_on_after(0.1):
                                stream = await listener.accept()
                                reason = "the relay is out of file descriptors"
                                on_refused(reason)
                                refuse_now(_raw(stream), refusal(reason))
                        except OSError:
                            pass
                        finally:
                            spare.reopen()
                    else:
                        await trio.sleep(0.1)  # nothing to refuse with: wait for a descriptor
                    continue
                reason = admit()
                if reason is None:
                    nursery.start_soon(handler, stream)
                else:
                    on_refused(reason)
                    refuse_now(_raw(stream), refusal(reason))
    finally:
        spare.close()
        with trio.CancelScope(shield=True):
            await listener.aclose()
