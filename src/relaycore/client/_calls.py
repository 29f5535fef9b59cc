"""Calls that wait on the server: an invocation's completion, a stream's items.

``HubConnection`` registers a ``Pending`` per call before its message leaves and the receive
loop resolves it; ``HubStream`` is what ``HubConnection.stream`` returns. A stream calls back
up into its connection through ``StreamOwner`` rather than importing it.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol

import anyio

from ..protocol import CompletionMessage
from ._errors import HubConnectionError, HubException

__all__ = ["HubStream", "Pending", "StreamOwner"]


class StreamOwner(Protocol):
    """What a ``HubStream`` asks of its connection."""

    async def _call(self, target: str, args: tuple[Any, ...],
                    streaming: bool) -> tuple[str, Pending]: ...

    async def _cancel_stream(self, invocation_id: str) -> None: ...

    def _abandon(self, invocation_id: str) -> None: ...


class Pending:
    """A call waiting on the server: an invocation's completion, or a stream's items."""

    __slots__ = ("_wake", "done", "error", "items", "result", "streaming")

    def __init__(self, streaming: bool) -> None:
        self.streaming = streaming
        self.items: deque[Any] = deque()
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None
        self._wake: anyio.Event | None = None

    def _notify(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def item(self, value: Any) -> None:
        if self.streaming and not self.done:
            self.items.append(value)
            self._notify()

    def complete(self, message: CompletionMessage) -> None:
        # A result in a stream's completion breaks the spec; the JS client ignores it too.
        if message.error is not None:
            self.error = HubException(message.error)
        else:
            self.result = message.result
        self.done = True
        self._notify()

    def fail(self, error: BaseException) -> None:
        if not self.done:
            self.error = error
            self.done = True
            self._notify()

    async def changed(self) -> None:
        """Wait for the next item or the end."""
        self._wake = anyio.Event()
        await self._wake.wait()


class HubStream:
    """The items of a server-to-client stream (``HubConnection.stream``), an async iterator.

    The StreamInvocation is sent when iteration begins (or on ``async with``). The iterator
    ends at the server's completion, or raises ``HubException`` with the server's error, or
    ``HubConnectionError`` when the connection ends first. A consumer that stops early
    cancels the stream on the server (a CancelInvocation): at once with ``aclose()`` or at the
    end of an ``async with`` block, else when the iterator is dropped (a ``break`` out of
    ``async for``)::

        async with connection.stream("Counter", 10) as counter:
            async for value in counter:
                if value == 3:
                    break   # the server is told to stop
    """

    def __init__(self, connection: StreamOwner, target: str, args: tuple[Any, ...]) -> None:
        self._connection = connection
        self._target = target
        self._args = args
        self._pending: Pending | None = None
        self._invocation_id: str | None = None
        self._closed = False

    @property
    def invocation_id(self) -> str | None:
        """The stream's invocation id, once started."""
        return self._invocation_id

    async def _begin(self) -> Pending:
        if self._pending is None:
            if self._closed:
                raise HubConnectionError(f"the stream of {self._target!r} was closed")
            self._invocation_id, self._pending = await self._connection._call(
                self._target, self._args, streaming=True
            )
        return self._pending

    def __aiter__(self) -> HubStream:
        return self

    async def __anext__(self) -> Any:
        pending = await self._begin()
        while not pending.items:
            if pending.done:
                error, pending.error = pending.error, None
                if error is not None:
                    raise error
                raise StopAsyncIteration
            await pending.changed()
        return pending.items.popleft()

    async def aclose(self) -> None:
        """Stop consuming: the server is told to cancel the stream if it has not ended."""
        self._closed = True
        pending = self._pending
        if pending is not None and not pending.done and self._invocation_id is not None:
            pending.fail(HubConnectionError(f"the stream of {self._target!r} was closed"))
            await self._connection._cancel_stream(self._invocation_id)

    async def __aenter__(self) -> HubStream:
        await self._begin()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        pending = self._pending
        if pending is not None and not pending.done and self._invocation_id is not None:
            try:
                self._connection._abandon(self._invocation_id)
            except Exception:  # noqa: S110 - at interpreter exit there is nothing left to tell
                pass
