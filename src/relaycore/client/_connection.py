"""``HubConnection``: a SignalR hub client on anyio, the Python peer of ``@microsoft/signalr``.

Theory of operation
-------------------

States (``HubConnectionState``), as the JS client names them::

    Disconnected --start()--> Connecting --negotiate, transport, handshake--> Connected
    Connected --transport lost, server timeout, Close{allowReconnect}--> Reconnecting
    Reconnecting --a new connection--> Connected      (on_reconnected)
    Reconnecting --the retry policy gives up--> Disconnected   (on_close with the reason)
    Connected --Close without allowReconnect, or lost without a retry policy--> Disconnected
    any --stop()--> Disconnecting --> Disconnected    (on_close with None)

``start()`` does the connecting in the caller's task, so that its errors are the caller's
(``NegotiateError``, ``TransportError``, ``HandshakeError``). Everything after it runs in one
*run task* per start, detached from the caller like the JS client's event loop work: the
caller may call ``start()`` and ``stop()`` from any tasks, or use ``async with``. The run task
holds a task group with:

* the receive loop (in the run task itself): reads the transport (a WebSocket, an event
  stream, long polls), splits hub messages, and dispatches them. Completions and stream
  items go to the waiting call (``Pending``); invocations go to the ``on`` handlers:
  synchronous handlers of a non-blocking invocation are called right there, in arrival
  order; anything that must be awaited (an ``async`` handler, an answer for a client-result
  invocation) runs in a task of its own, started in arrival order. Any received data
  resets the server timeout: silence for ``server_timeout`` seconds ends the transport.
* the keep-alive task: a Ping whenever nothing was sent for ``keep_alive_interval`` seconds
  (not on long polling, whose polls prove the connection alive, and where the server timeout
  does not apply either), and a CancelInvocation for each stream whose consumer dropped it
  unfinished.
* handler tasks and upload-stream pumps.

When the transport ends, every pending call fails with ``HubConnectionError`` (its cause is why
the transport ended); then either the retry policy reconnects (a whole new connection:
negotiate, transport, handshake; invocation ids keep counting) or the run ends. ``stop()``
sends a Close message, closes the transport, cancels the run task's work (handlers still
running included) and waits until the run task has called the ``on_close`` callbacks.

Invariants: only the run task changes ``_link`` after ``start()``, and only the run task (or
``start()`` on failure) moves the state to Disconnected; a call is in ``_pending`` from just
before its message is sent until its completion, its failure, or its caller leaving.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import functools
import inspect
import itertools
import logging
import math
import platform
import ssl
import sys
from collections import deque
from collections.abc import (
    AsyncIterable,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
    Sequence,
)
from typing import Any, Final, TypeAlias, TypeVar

import anyio
import anyio.abc

from .. import __version__
from ..protocol import (
    AckMessage,
    CancelInvocationMessage,
    CloseMessage,
    CompletionMessage,
    HubMessage,
    InvocationMessage,
    JsonHubProtocol,
    LocalProtocolError,
    MessagePackHubProtocol,
    PingMessage,
    RemoteProtocolError,
    SequenceMessage,
    StreamInvocationMessage,
    StreamItemMessage,
    get_protocol,
    parse_handshake_response,
    write_handshake_request,
)
from ._buffer import ACK_DELAY, DEFAULT_BUFFER_SIZE, MessageBuffer, is_trackable
from ._calls import HubStream, Pending
from ._errors import (
    HandshakeError,
    HubConnectionError,
    NegotiateError,
    ServerClosedError,
    ServerTimeoutError,
    TransportError,
)
from ._negotiate import (
    AccessTokenFactory,
    Negotiation,
    connect_url,
    negotiate,
    negotiate_url,
    resolve_token,
)
from ._retry import RetryContext, RetryPolicy, retry_policy
from ._transports import (
    LONG_POLLING,
    WEBSOCKETS,
    LongPollingTransport,
    ServerSentEventsTransport,
    Transport,
    transport_names,
)
from ._websocket import open_websocket

__all__ = ["HubConnection", "HubConnectionState"]

_log = logging.getLogger("relaycore.client")

_USER_AGENT: Final = (
    f"relaycore-client/{__version__} (Python {platform.python_version()}; {platform.system()})"
)

_NOT_CONNECTED: Final = "Cannot send data if the connection is not in the 'Connected' State."
_CANCELED: Final = "Invocation canceled due to the underlying connection being closed."
_NO_RESULT: Final = "Client didn't provide a result."
_MULTIPLE_RESULTS: Final = "Client provided multiple results."

_F = TypeVar("_F", bound=Callable[..., Any])


class HubConnectionState(str, enum.Enum):
    """Where a ``HubConnection`` is in its life; the values are the JS client's names."""

    #: Not started, stopped, or given up on.
    DISCONNECTED = "Disconnected"
    #: ``start()`` is negotiating, connecting or handshaking.
    CONNECTING = "Connecting"
    #: Messages flow.
    CONNECTED = "Connected"
    #: ``stop()`` is closing it.
    DISCONNECTING = "Disconnecting"
    #: The transport was lost; the retry policy is making a new connection.
    RECONNECTING = "Reconnecting"


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
    return float(value)


def _protocol_of(protocol: str | JsonHubProtocol | MessagePackHubProtocol,
                 ) -> JsonHubProtocol | MessagePackHubProtocol:
    if isinstance(protocol, JsonHubProtocol | MessagePackHubProtocol):
        return protocol
    try:
        return get_protocol(protocol)
    except ValueError:
        raise ValueError(f"unknown hub protocol {protocol!r}; expected 'json' or "
                         "'messagepack'") from None


def _error_text(exc: BaseException) -> str:
    """An exception as a client result's error, the way the JS client shows one."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _spawn_detached(function: Callable[[], Coroutine[Any, Any, None]]) -> asyncio.Task[None] | None:
    """Run ``function`` in a task of its own that outlives the caller's task.

    anyio has no such task (its task groups are scoped); the hub connection's run task must
    outlive ``start()``, as the JS client's does. So: a trio system task, or an asyncio task
    (returned, for the caller to keep a reference to: asyncio holds tasks weakly).
    """
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            pass  # trio is imported but not running: this is asyncio
        else:
            trio.lowlevel.spawn_system_task(
                function, name="relaycore.client run task", context=contextvars.copy_context()
            )
            return None
    return asyncio.get_running_loop().create_task(function(), name="relaycore.client run task")


class _Link:
    """One connection after its handshake: its transport (replaced when stateful reconnect
    resumes it), and its stateful-reconnect state when the server agreed to it."""

    __slots__ = ("binary", "buffer", "connection_id", "last_sent", "name", "reopen", "rest",
                 "resuming", "transport")

    def __init__(self, transport: Transport, name: str, connection_id: str | None, rest: bytes,
                 binary: bool, buffer: MessageBuffer | None = None,
                 reopen: Callable[[], Awaitable[Transport]] | None = None) -> None:
        self.transport = transport
        #: The transport's name, as negotiate spells it.
        self.name = name
        self.connection_id = connection_id
        #: Hub messages that arrived with the handshake answer.
        self.rest = rest
        self.binary = binary
        self.last_sent = anyio.current_time()
        #: Stateful reconnect: what was sent and received (``None``: not negotiated).
        self.buffer = buffer
        #: Opens the same transport to the same connection again, for a resume.
        self.reopen = reopen
        #: A resume is replacing the transport: trackable messages are kept, not sent.
        self.resuming = False

    async def send(self, data: bytes) -> None:
        await self.transport.send(data, text=not self.binary)
        self.last_sent = anyio.current_time()


#: A handler of ``on``: called with the invocation's arguments; may be ``async``.
Handler: TypeAlias = Callable[..., Any]


class HubConnection:
    """A connection to a SignalR hub: the relay's, an app server's through its negotiate
    redirect, or any ASP.NET Core SignalR server.

    ``url`` is the hub URL (``http(s)://``): an app server's (``.../hubs/chat``), or the
    relay's client URL (``http://relay:8080/client/?hub=chat``). ``access_token_factory`` is
    called (sync or async) for the bearer token of each negotiate, or of the WebSocket with
    ``skip_negotiation``. ``protocol`` is ``"json"`` or ``"messagepack"``. ``transport`` limits
    the transports tried (``"WebSockets"``, ``"ServerSentEvents"``, ``"LongPolling"``, or a
    list; by default any the server offers, in its order). ``reconnect``:
    ``None`` (lost is lost), ``True`` (wait 0, 2, 10 and 30 s before the attempts, then give
    up), a list of delays in seconds, or a ``RetryPolicy``. ``stateful_reconnect``: ``True``
    or a buffer size in bytes asks the server to resume a dropped WebSocket (see
    ``HubConnectionBuilder.with_stateful_reconnect``).

    ::

        connection = HubConnection("http://127.0.0.1:8000/hubs/chat", protocol="json")
        connection.on("newMessage", lambda user, text: print(user, "says", text))
        async with connection:
            print(await connection.invoke("SendMessage", "hello"))

    ``HubConnectionBuilder`` builds the same, in the JS client's words.
    """

    def __init__(
        self,
        url: str,
        *,
        access_token_factory: AccessTokenFactory | None = None,
        protocol: str | JsonHubProtocol | MessagePackHubProtocol = "json",
        headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
        skip_negotiation: bool = False,
        transport: str | Sequence[str] | None = None,
        reconnect: Sequence[float] | RetryPolicy | bool | None = None,
        stateful_reconnect: bool | int = False,
        keep_alive_interval: float = 15.0,
        server_timeout: float = 30.0,
        http_timeout: float = 100.0,
        ssl_context: ssl.SSLContext | None = None,
        max_message_size: int | None = None,
    ) -> None:
        if not isinstance(url, str) or not url.lower().startswith(
                ("http://", "https://", "ws://", "wss://")):
            raise ValueError(f"the hub URL must be an absolute http(s):// URL, got {url!r}")
        if skip_negotiation is False and url.lower().startswith(("ws://", "wss://")):
            raise ValueError(f"{url!r} is a WebSocket URL: negotiate needs the http(s):// hub "
                             "URL (or pass skip_negotiation=True)")
        #: The hub URL each start (and each reconnect) negotiates with.
        self.url = url
        self._token_factory = access_token_factory
        self._protocol = _protocol_of(protocol)
        pairs = headers.items() if isinstance(headers, Mapping) else headers
        self._headers: tuple[tuple[str, str], ...] = tuple((str(k), str(v)) for k, v in pairs)
        self._skip_negotiation = bool(skip_negotiation)
        self._transports = transport_names(transport)
        if self._skip_negotiation and transport is not None and self._transports != (
                WEBSOCKETS,):
            raise ValueError("skip_negotiation works with the WebSockets transport only "
                             f"(transport={transport!r}): the others need a negotiated id")
        self._retry = retry_policy(reconnect)
        if stateful_reconnect is True:
            stateful_reconnect = DEFAULT_BUFFER_SIZE
        if stateful_reconnect is not False and (
                not isinstance(stateful_reconnect, int) or stateful_reconnect <= 0):
            raise ValueError("stateful_reconnect must be True, False or a buffer size in bytes "
                             f"> 0, got {stateful_reconnect!r}")
        #: Stateful reconnect's buffer size (``None``: not asked for).
        self._stateful_size: int | None = stateful_reconnect or None
        self.keep_alive_interval = _positive("keep_alive_interval", keep_alive_interval)
        self.server_timeout = _positive("server_timeout", server_timeout)
        self.http_timeout = _positive("http_timeout", http_timeout)
        self._ssl_context = ssl_context
        self._max_message_size = max_message_size

        self._handlers: dict[str, list[Handler]] = {}
        self._close_callbacks: list[Callable[[BaseException | None], Any]] = []
        self._reconnecting_callbacks: list[Callable[[BaseException], Any]] = []
        self._reconnected_callbacks: list[Callable[[str | None], Any]] = []

        self._state = HubConnectionState.DISCONNECTED
        self._ids = itertools.count()
        self._pending: dict[str, Pending] = {}
        #: Streams dropped by their consumer unfinished: the keep-alive task cancels them.
        self._abandoned: deque[str] = deque()
        self._link: _Link | None = None
        self._stopping = False
        self._connect_scope: anyio.CancelScope | None = None
        self._run_scope: anyio.CancelScope | None = None
        self._run_task_id: int | None = None
        #: The asyncio run tasks (asyncio holds tasks weakly; trio's system tasks need none).
        self._runs: set[asyncio.Task[None]] = set()
        self._task_group: anyio.abc.TaskGroup | None = None
        self._wake: anyio.Event | None = None
        self._done: anyio.Event | None = None

    # -- what it is ---------------------------------------------------------------------------

    @property
    def state(self) -> HubConnectionState:
        """Where the connection is in its life."""
        return self._state

    @property
    def connection_id(self) -> str | None:
        """The server's id of the current connection (``None`` when not connected, or when
        the server named none, as with ``skip_negotiation``)."""
        link = self._link
        return link.connection_id if link is not None else None

    @property
    def transport(self) -> str | None:
        """The current connection's transport (``"WebSockets"``, ``"ServerSentEvents"``,
        ``"LongPolling"``); ``None`` when not connected."""
        link = self._link
        return link.name if link is not None else None

    @property
    def protocol(self) -> str:
        """The hub protocol's name: ``"json"`` or ``"messagepack"``."""
        return self._protocol.name

    def __repr__(self) -> str:
        return (f"<HubConnection {self.url} {self._protocol.name} {self._state.value}"
                + (f" id={self.connection_id}" if self.connection_id else "") + ">")

    # -- handlers and callbacks ---------------------------------------------------------------

    def on(self, target: str, handler: _F | None = None) -> Any:
        """Call ``handler(*arguments)`` for each invocation of ``target`` by the server
        (target names are matched case-insensitively, as by the JS client).

        A handler may be ``async``. When the server asks for a result (a client-result
        invocation), the handler's return value is the answer (``None`` is no answer: the
        server is told "Client didn't provide a result."), and an exception it raises is the
        error. Without ``handler``, a decorator::

            @connection.on("notify")
            def notify(text):
                print(text)
        """
        if handler is None:
            def register(function: _F) -> _F:
                self.on(target, function)
                return function

            return register
        if not callable(handler):
            raise TypeError(f"handler must be callable, got {type(handler).__name__}")
        self._handlers.setdefault(target.lower(), []).append(handler)
        return handler

    def off(self, target: str, handler: Handler | None = None) -> None:
        """Remove ``handler`` from ``target``, or every handler of ``target`` without one."""
        key = target.lower()
        if handler is None:
            self._handlers.pop(key, None)
            return
        handlers = self._handlers.get(key)
        if handlers and handler in handlers:
            handlers.remove(handler)
            if not handlers:
                del self._handlers[key]

    def on_close(self, callback: Callable[[BaseException | None], Any]) -> None:
        """Call ``callback(error)`` (sync or async) once the connection is Disconnected:
        ``None`` after ``stop()`` or a Close without error, else why it ended (the server's
        ``ServerClosedError``, a ``TransportError``, a ``ServerTimeoutError``, or a
        ``HubConnectionError`` saying reconnect attempts ran out)."""
        self._close_callbacks.append(callback)

    def on_reconnecting(self, callback: Callable[[BaseException], Any]) -> None:
        """Call ``callback(error)`` when the transport is lost and reconnecting begins."""
        self._reconnecting_callbacks.append(callback)

    def on_reconnected(self, callback: Callable[[str | None], Any]) -> None:
        """Call ``callback(connection_id)`` when reconnecting succeeded (a new connection id)."""
        self._reconnected_callbacks.append(callback)

    # -- start and stop -----------------------------------------------------------------------

    async def __aenter__(self) -> HubConnection:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Negotiate, open a transport and do the hub handshake; return once Connected.

        Raises ``NegotiateError``, ``TransportError`` or ``HandshakeError`` (the connection is
        then Disconnected again, and no close callback is called), and ``HubConnectionError``
        when the connection is not Disconnected or ``stop()`` was called meanwhile.
        """
        if self._state is not HubConnectionState.DISCONNECTED:
            raise HubConnectionError(
                "Cannot start a HubConnection that is not in the 'Disconnected' state "
                f"(it is {self._state.value})."
            )
        self._state = HubConnectionState.CONNECTING
        self._stopping = False
        self._done = done = anyio.Event()
        try:
            with anyio.CancelScope() as scope:
                self._connect_scope = scope
                link = await self._connect()
            if scope.cancelled_caught:
                raise HubConnectionError("The connection was stopped during negotiation.")
        except BaseException:
            self._state = HubConnectionState.DISCONNECTED
            done.set()
            raise
        finally:
            self._connect_scope = None
        self._link = link
        self._state = HubConnectionState.CONNECTED
        self._run_scope = scope = anyio.CancelScope()
        task = _spawn_detached(lambda: self._run(link, scope, done))
        if task is not None:
            self._runs.add(task)
            task.add_done_callback(self._runs.discard)

    async def stop(self) -> None:
        """Close the connection: a Close message, the transport closed, reconnecting
        abandoned, handlers still running cancelled (one calling ``stop()`` included), pending
        calls failed; returns once Disconnected and the close callbacks have run. Does
        nothing when already Disconnected."""
        if self._state in (HubConnectionState.CONNECTING, HubConnectionState.CONNECTED,
                           HubConnectionState.RECONNECTING):
            self._stopping = True
            self._state = HubConnectionState.DISCONNECTING
            if self._connect_scope is not None:
                self._connect_scope.cancel()
            link = self._link
            if link is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
                    try:
                        await link.send(self._protocol.write(CloseMessage()))
                    except HubConnectionError:
                        pass
            # The run task closes the transport once its receive loop has stopped reading it.
            if self._run_scope is not None:
                self._run_scope.cancel()
        done = self._done
        if (done is not None and self._state is HubConnectionState.DISCONNECTING
                and anyio.get_current_task().id != self._run_task_id):
            await done.wait()

    # -- calls --------------------------------------------------------------------------------

    async def send(self, target: str, *args: Any) -> None:
        """Invoke ``target`` on the server without waiting for it (no answer comes back).

        Async-iterable arguments are uploaded as client-to-server streams. Raises
        ``HubConnectionError`` when not Connected, ``TypeError`` for arguments the hub
        protocol cannot carry.
        """
        link = self._require_link()
        arguments, streams = self._split_streams(args)
        await self._send_on(link, InvocationMessage(target, arguments, None, tuple(streams)))
        self._upload(link, streams)

    async def invoke(self, target: str, *args: Any) -> Any:
        """Invoke ``target`` on the server and return its result.

        Raises ``HubException`` with the server's error ("Unknown hub method 'x'", a hub
        method's own error), ``HubConnectionError`` when not Connected or when the connection
        ends first. Async-iterable arguments are uploaded as client-to-server streams.
        Cancelling the caller forgets the call (SignalR cannot cancel an invocation).
        """
        invocation_id, pending = await self._call(target, args, streaming=False)
        try:
            while not pending.done:
                await pending.changed()
        finally:
            self._pending.pop(invocation_id, None)
        if pending.error is not None:
            raise pending.error
        return pending.result

    def stream(self, target: str, *args: Any) -> HubStream:
        """The items of the streaming hub method ``target`` (an async iterator; see
        ``HubStream``)::

            async for item in connection.stream("Counter", 5):
                print(item)
        """
        return HubStream(self, target, args)

    async def _call(self, target: str, args: tuple[Any, ...],
                    streaming: bool) -> tuple[str, Pending]:
        """Send an Invocation (or a StreamInvocation) that expects an answer; its id and the
        ``Pending`` that receives the answer, registered before the message leaves."""
        link = self._require_link()
        arguments, streams = self._split_streams(args)
        invocation_id = str(next(self._ids))
        pending = Pending(streaming)
        self._pending[invocation_id] = pending
        message: HubMessage
        if streaming:
            message = StreamInvocationMessage(invocation_id, target, arguments, tuple(streams))
        else:
            message = InvocationMessage(target, arguments, invocation_id, tuple(streams))
        try:
            await self._send_on(link, message)
        except BaseException:
            self._pending.pop(invocation_id, None)
            raise
        self._upload(link, streams)
        return invocation_id, pending

    async def _cancel_stream(self, invocation_id: str) -> None:
        if self._pending.pop(invocation_id, None) is None:
            return
        link = self._link
        if link is not None and self._state is HubConnectionState.CONNECTED:
            try:
                await self._send_on(link, CancelInvocationMessage(invocation_id))
            except HubConnectionError:
                pass  # the connection ended: the server forgot the stream with it

    def _abandon(self, invocation_id: str) -> None:
        """A stream's iterator was dropped unfinished (called from ``__del__``)."""
        self._abandoned.append(invocation_id)
        if self._wake is not None:
            self._wake.set()

    def _require_link(self) -> _Link:
        link = self._link
        if link is None or self._state is not HubConnectionState.CONNECTED:
            raise HubConnectionError(_NOT_CONNECTED)
        return link

    async def _send_on(self, link: _Link, message: HubMessage) -> None:
        try:
            data = self._protocol.write(message)
        except LocalProtocolError as exc:
            raise TypeError(str(exc)) from None
        if link is not self._link:
            raise HubConnectionError(_NOT_CONNECTED)
        buffer = link.buffer
        if buffer is not None and is_trackable(message):
            # Kept until acked; sent now unless a resume is replacing the transport (the
            # resume replays it). A send that fails is replayed by the resume that follows.
            buffer.keep(data)
            if not link.resuming:
                try:
                    await link.send(data)
                except TransportError:
                    pass
            await buffer.room()
            return
        try:
            await link.send(data)
        except TransportError as exc:
            raise HubConnectionError(f"{_NOT_CONNECTED} ({exc})") from exc

    def _split_streams(self, args: tuple[Any, ...]) -> tuple[list[Any], dict[str, Any]]:
        """Arguments without their async iterables, and those as upload streams by stream id
        (ids taken from the invocation counter before the invocation's own, as the JS client
        does)."""
        arguments: list[Any] = []
        streams: dict[str, Any] = {}
        for arg in args:
            if isinstance(arg, AsyncIterable):
                streams[str(next(self._ids))] = arg
            else:
                arguments.append(arg)
        return arguments, streams

    def _upload(self, link: _Link, streams: Mapping[str, AsyncIterable[Any]]) -> None:
        task_group = self._task_group
        for stream_id, items in streams.items():
            if task_group is not None:
                task_group.start_soon(self._pump, link, stream_id, items)

    async def _pump(self, link: _Link, stream_id: str, items: AsyncIterable[Any]) -> None:
        """Send an upload stream's items, then its completion (with the error that ended it,
        if one did)."""
        try:
            try:
                async for item in items:
                    await self._send_on(link, StreamItemMessage(stream_id, item))
            except (HubConnectionError, TypeError):
                raise
            except Exception as exc:
                await self._send_on(link, CompletionMessage(stream_id, error=_error_text(exc)))
                return
            await self._send_on(link, CompletionMessage(stream_id))
        except HubConnectionError:
            pass  # the connection ended; the server dropped the stream with it
        except TypeError as exc:
            _log.error("upload stream %s: an item cannot be sent: %s", stream_id, exc)
            try:
                await self._send_on(link, CompletionMessage(stream_id, error=str(exc)))
            except HubConnectionError:
                pass

    # -- connecting ---------------------------------------------------------------------------

    async def _connect(self) -> _Link:
        """One connection: negotiate (unless skipped), a transport (the first of the server's
        list that this client allows and that opens, negotiating again before each next
        one, as the JS client does), the handshake, and a first Ping."""
        headers = [("User-Agent", _USER_AGENT), *self._headers]
        if self._skip_negotiation:
            access_token = await resolve_token(self._token_factory)
            return await self._open(WEBSOCKETS, self.url, None, None, access_token, headers)
        negotiation = await self._negotiate(headers)
        candidates = [name for name, formats in negotiation.transports
                      if name in self._transports
                      and self._protocol.transfer_format in formats]
        if not candidates:
            offered = ", ".join(f"{name} ({'/'.join(formats)})"
                                for name, formats in negotiation.transports) or "nothing"
            raise NegotiateError(
                "None of the transports supported by the client are supported by the server: "
                f"the client needs {' or '.join(self._transports)} with the "
                f"{self._protocol.transfer_format} format ({self._protocol.name}), the server "
                f"offers {offered}.", url=negotiate_url(negotiation.url))
        failures: list[str] = []
        for index, name in enumerate(candidates):
            if index:
                negotiation = await self._negotiate(headers)  # a fresh connection to try
            opener = functools.partial(self._open_transport, name, negotiation.url,
                                       negotiation.connection_token, negotiation.access_token,
                                       headers)
            try:
                transport = await opener()
            except TransportError as exc:
                if len(candidates) == 1:
                    raise
                failures.append(f"{name}: {exc}")
                if index + 1 == len(candidates):
                    raise TransportError(
                        "Unable to connect to the server with any of the available "
                        f"transports: {'; '.join(failures)}") from exc
                _log.info("%s failed to connect, trying the next transport: %s", name, exc)
                continue
            # Stateful reconnect resumes WebSockets only (the JS client's rule).
            stateful = negotiation.stateful_reconnect and name == WEBSOCKETS
            return await self._start_link(transport, name, negotiation.connection_id,
                                          opener if stateful else None)
        raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover

    async def _negotiate(self, headers: list[tuple[str, str]]) -> Negotiation:
        return await negotiate(self.url, access_token_factory=self._token_factory,
                               headers=headers, timeout=self.http_timeout,
                               ssl_context=self._ssl_context,
                               stateful_reconnect=self._stateful_size is not None)

    async def _open(self, name: str, url: str, connection_id: str | None, token: str | None,
                    access_token: str | None, headers: list[tuple[str, str]]) -> _Link:
        transport = await self._open_transport(name, url, token, access_token, headers)
        return await self._start_link(transport, name, connection_id)

    async def _open_transport(self, name: str, url: str, token: str | None,
                              access_token: str | None,
                              headers: list[tuple[str, str]]) -> Transport:
        headers = [*headers, *([("Authorization", f"Bearer {access_token}")]
                               if access_token else [])]
        if name == WEBSOCKETS:
            ws_url = connect_url(url, token)
            with anyio.move_on_after(self.http_timeout):
                return await open_websocket(ws_url, headers, ssl_context=self._ssl_context,
                                            max_message_size=self._max_message_size,
                                            write_timeout=self.server_timeout)
            raise TransportError(f"WebSocket failed to connect to {ws_url}: no answer within "
                                 f"{self.http_timeout:g} s")
        opener = (LongPollingTransport if name == LONG_POLLING
                  else ServerSentEventsTransport).open
        http_url = connect_url(url, token, websocket=False)
        with anyio.move_on_after(self.http_timeout):
            return await opener(http_url, headers, timeout=self.http_timeout,
                                ssl_context=self._ssl_context)
        raise TransportError(f"{name} failed to connect to {http_url}: no answer within "
                             f"{self.http_timeout:g} s")

    async def _start_link(self, transport: Transport, name: str, connection_id: str | None,
                          reopen: Callable[[], Awaitable[Transport]] | None = None) -> _Link:
        """The handshake on a new transport, then a first Ping (where pings are sent). With
        ``reopen`` (stateful reconnect was agreed), the handshake asks for version 2 and the
        link keeps a ``MessageBuffer``."""
        try:
            rest = await self._handshake(transport, 1 if reopen is None else 2)
            buffer = None
            if reopen is not None:
                buffer = MessageBuffer(self._stateful_size or DEFAULT_BUFFER_SIZE)
            link = _Link(transport, name, connection_id, rest,
                         self._protocol.transfer_format == "Binary", buffer, reopen)
            if not transport.inherent_keep_alive:
                await link.send(self._protocol.write(PingMessage()))
        except BaseException:
            await transport.aclose()
            raise
        return link

    async def _handshake(self, transport: Transport, version: int) -> bytes:
        """Send the handshake request; the hub messages that came with the answer."""
        # Always text (a text frame), MessagePack too: the JS client does so, servers expect it.
        await transport.send(write_handshake_request(self._protocol.name, version), text=True)
        received = bytearray()
        with anyio.move_on_after(self.server_timeout):
            while True:
                try:
                    received += await transport.receive()
                except TransportError as exc:
                    raise HandshakeError(
                        "The underlying connection was closed before the hub handshake could "
                        f"complete ({exc})."
                    ) from exc
                try:
                    answer = parse_handshake_response(received)
                except RemoteProtocolError as exc:
                    raise HandshakeError(f"The server's handshake answer is invalid: {exc}"
                                         ) from None
                if answer is None:
                    continue
                error, consumed = answer
                if error is not None:
                    raise HandshakeError(f"Server returned handshake error: {error}",
                                         error=error)
                return bytes(received[consumed:])
        raise HandshakeError(
            f"The server did not answer the hub handshake within {self.server_timeout:g} s.")

    # -- the run task -------------------------------------------------------------------------

    async def _run(self, link: _Link, scope: anyio.CancelScope, done: anyio.Event) -> None:
        """Everything after ``start()``: serve the link, reconnect, end (see the module doc).

        ``scope`` is what ``stop()`` cancels, ``done`` what it waits for. They, like the task
        group, are this run's own: a close callback may start the connection again, and the
        new run must not see this one's leftovers.
        """
        self._run_task_id = anyio.get_current_task().id
        error: BaseException | None = None
        finished = False
        task_group: anyio.abc.TaskGroup | None = None
        try:
            async with anyio.create_task_group() as task_group:
                self._task_group = task_group
                with scope:
                    current: _Link | None = link
                    while current is not None:
                        error, may_reconnect = await self._serve(current)
                        if (current.buffer is not None and isinstance(error, TransportError)
                                and not self._stopping and await self._resume(current, error)):
                            continue  # the same connection on a new WebSocket
                        await self._drop(current, error)
                        current = None
                        if may_reconnect and self._retry is not None and not self._stopping:
                            current, error = await self._reconnect(error)
                with anyio.CancelScope(shield=True):
                    finished = True
                    await self._finish(None if self._stopping else error, done)
                task_group.cancel_scope.cancel()  # handlers still running, upload pumps
        except Exception:  # a bug; the connection must still end cleanly
            _log.exception("the hub connection's run task failed")
            if not finished:
                with anyio.CancelScope(shield=True):
                    await self._finish(None, done)
        finally:
            if self._task_group is task_group:
                self._task_group = None

    async def _finish(self, error: BaseException | None, done: anyio.Event) -> None:
        link, self._link = self._link, None
        if link is not None:
            await link.transport.aclose()
        self._fail_pending(error, link)
        self._state = HubConnectionState.DISCONNECTED
        await self._call_back("close", self._close_callbacks, error)
        done.set()

    async def _serve(self, link: _Link) -> tuple[BaseException | None, bool]:
        """Run one link until its transport ends: why, and whether reconnecting may follow."""
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(self._keep_alive, link)
            outcome = await self._receive(link)
            task_group.cancel_scope.cancel()
        return outcome

    async def _drop(self, link: _Link, error: BaseException | None) -> None:
        if self._link is link:
            self._link = None
        await link.transport.aclose()
        self._fail_pending(error, link)

    async def _resume(self, link: _Link, error: TransportError) -> bool:
        """Stateful reconnect: the same connection on a new WebSocket (same URL, same token;
        no negotiate, no handshake), the kept messages replayed after a Sequence. Whether it
        worked; if not, the connection is lost as without stateful reconnect."""
        buffer, reopen = link.buffer, link.reopen
        assert buffer is not None and reopen is not None
        buffer.disconnected()
        link.resuming = True
        await link.transport.aclose()
        _log.info("resuming connection %s after: %s", link.connection_id, error)
        try:
            link.transport = await reopen()
            await link.send(self._protocol.write(SequenceMessage(buffer.replay_from())))
            index = 0
            # Messages kept while this replays are replayed too; after the last one, no
            # await before the flag is cleared: a later message is its sender's to send.
            while (data := buffer.kept(index)) is not None:
                await link.send(data)
                index += 1
        except TransportError as exc:
            _log.info("connection %s could not be resumed: %s", link.connection_id, exc)
            return False
        link.resuming = False
        link.rest = b""
        return True

    def _fail_pending(self, error: BaseException | None, link: _Link | None = None) -> None:
        pending, self._pending = self._pending, {}
        self._abandoned.clear()
        for call in pending.values():
            failure = HubConnectionError(_CANCELED)
            failure.__cause__ = error
            call.fail(failure)
        if link is not None and link.buffer is not None:
            failure = HubConnectionError(_CANCELED)
            failure.__cause__ = error
            link.buffer.end(failure)

    async def _reconnect(self, error: BaseException | None,
                         ) -> tuple[_Link | None, BaseException | None]:
        """New connections until one works (the new link) or the policy gives up (the error
        for the close callbacks)."""
        assert self._retry is not None
        reason: BaseException = error or HubConnectionError(
            "The server closed the connection and invited the client to reconnect.")
        self._state = HubConnectionState.RECONNECTING
        await self._call_back("reconnecting", self._reconnecting_callbacks, reason)
        began = anyio.current_time()
        attempts = 0
        while not self._stopping:
            context = RetryContext(attempts, anyio.current_time() - began, reason)
            try:
                delay = self._retry(context)
            except Exception as exc:
                _log.exception("the retry policy failed; reconnecting stops")
                return None, exc
            if delay is None:
                if attempts == 0:
                    return None, reason
                gave_up = HubConnectionError(
                    f"Reconnect retries have been exhausted after {attempts} failed attempts "
                    f"and {anyio.current_time() - began:.1f} s; the last one failed with: "
                    f"{reason}")
                gave_up.__cause__ = reason
                return None, gave_up
            _log.info("reconnecting to %s in %g s (attempt %d): %s", self.url, delay,
                      attempts + 1, reason)
            await anyio.sleep(delay)
            if self._stopping:
                break
            try:
                link = await self._connect()
            except Exception as exc:
                attempts += 1
                reason = exc
                continue
            if self._stopping:
                await link.transport.aclose()
                break
            self._link = link
            self._state = HubConnectionState.CONNECTED
            await self._call_back("reconnected", self._reconnected_callbacks, link.connection_id)
            return link, None
        return None, None

    async def _keep_alive(self, link: _Link) -> None:
        """A Ping whenever nothing was sent for ``keep_alive_interval``; cancel the streams
        whose consumers dropped them; with stateful reconnect, ack what arrived (``ACK_DELAY``
        after something new)."""
        ping = self._protocol.write(PingMessage())
        interval = math.inf if link.transport.inherent_keep_alive else self.keep_alive_interval
        buffer = link.buffer
        try:
            while True:
                self._wake = wake = anyio.Event()
                if self._abandoned:
                    wake.set()
                deadline = link.last_sent + interval
                if buffer is not None and buffer.ack_since is not None:
                    deadline = min(deadline, buffer.ack_since + ACK_DELAY)
                with anyio.move_on_after(deadline - anyio.current_time()):
                    await wake.wait()
                while self._abandoned:
                    await self._cancel_stream(self._abandoned.popleft())
                now = anyio.current_time()
                if (buffer is not None and buffer.ack_since is not None
                        and now >= buffer.ack_since + ACK_DELAY):
                    buffer.ack_since = None
                    await link.send(self._protocol.write(AckMessage(buffer.latest_received)))
                if now >= link.last_sent + interval:
                    await link.send(ping)
        except HubConnectionError:
            return  # the receive loop reports the end of the transport

    async def _receive(self, link: _Link) -> tuple[BaseException | None, bool]:
        """The receive loop of one link (see the module doc)."""
        parse = self._protocol.parse
        received = bytearray(link.rest)
        timeout = math.inf if link.transport.inherent_keep_alive else self.server_timeout
        buffer = link.buffer
        while True:
            if received:
                try:
                    messages, consumed = parse(received)
                except RemoteProtocolError as exc:
                    return HubConnectionError(f"The server sent an invalid hub message: {exc}"
                                              ), True
                del received[:consumed]
                now = anyio.current_time()
                for message in messages:
                    if buffer is not None:
                        ack_was_due = buffer.ack_since is not None
                        process = buffer.should_process(message, now)
                        if not ack_was_due and buffer.ack_since is not None and self._wake:
                            self._wake.set()  # the keep-alive task acks in ACK_DELAY
                        if not process:
                            continue
                        if type(message) is AckMessage:
                            buffer.acknowledged(message.sequence_id)
                            continue
                        if type(message) is SequenceMessage:
                            try:
                                buffer.sequence(message.sequence_id)
                            except HubConnectionError as exc:
                                return exc, True
                            continue
                    if type(message) is CloseMessage:
                        if message.error is None:
                            return None, message.allow_reconnect
                        return ServerClosedError(
                            message.error, allow_reconnect=message.allow_reconnect
                        ), message.allow_reconnect
                    self._dispatch(message, link)
            with anyio.move_on_after(timeout) as timer:
                try:
                    received += await link.transport.receive()
                except TransportError as exc:
                    return exc, True
            if timer.cancelled_caught:
                return ServerTimeoutError(
                    "Server timeout elapsed without receiving a message from the server "
                    f"(server_timeout is {self.server_timeout:g} s)."), True

    def _dispatch(self, message: HubMessage, link: _Link) -> None:
        kind = type(message)
        if kind is InvocationMessage:
            assert isinstance(message, InvocationMessage)
            self._on_invocation(message, link)
        elif kind is StreamItemMessage:
            assert isinstance(message, StreamItemMessage)
            pending = self._pending.get(message.invocation_id)
            if pending is not None:
                pending.item(message.item)
        elif kind is CompletionMessage:
            assert isinstance(message, CompletionMessage)
            pending = self._pending.pop(message.invocation_id, None)
            if pending is not None:
                pending.complete(message)
        # Ping: any data reset the server timeout already. Ack and Sequence belong to
        # stateful reconnect, which this client does not negotiate. StreamInvocation and
        # CancelInvocation: a client has no streaming methods (the JS client drops them too).

    def _on_invocation(self, message: InvocationMessage, link: _Link) -> None:
        handlers = self._handlers.get(message.target.lower())
        task_group = self._task_group
        if not handlers:
            _log.warning("No client method with the name '%s' found.", message.target)
            if message.invocation_id is not None and task_group is not None:
                task_group.start_soon(self._answer, link, message.invocation_id, [], None)
            return
        if message.invocation_id is None and not any(
                inspect.iscoroutinefunction(handler) for handler in handlers):
            for handler in tuple(handlers):
                try:
                    value = handler(*message.arguments)
                except Exception:
                    _log.exception("the handler %r of %r failed", handler, message.target)
                    continue
                if inspect.isawaitable(value) and task_group is not None:
                    task_group.start_soon(self._await_handler, value, message.target)
            return
        if task_group is not None:
            task_group.start_soon(self._call_handlers, link, message, tuple(handlers))

    @staticmethod
    async def _await_handler(value: Awaitable[Any], target: str) -> None:
        try:
            await value
        except Exception:
            _log.exception("a handler of %r failed", target)

    async def _call_handlers(self, link: _Link, message: InvocationMessage,
                             handlers: tuple[Handler, ...]) -> None:
        results: list[Any] = []
        error: str | None = None
        for handler in handlers:
            try:
                value = handler(*message.arguments)
                if inspect.isawaitable(value):
                    value = await value
            except Exception as exc:
                _log.exception("the handler %r of %r failed", handler, message.target)
                error = error or _error_text(exc)
                continue
            if value is not None:
                results.append(value)
        if message.invocation_id is not None:
            await self._answer(link, message.invocation_id, results, error)

    async def _answer(self, link: _Link, invocation_id: str, results: list[Any],
                      error: str | None) -> None:
        """Answer a client-result invocation, as the JS client words each case."""
        if error is not None:
            answer = CompletionMessage(invocation_id, error=error)
        elif len(results) > 1:
            answer = CompletionMessage(invocation_id, error=_MULTIPLE_RESULTS)
        elif results:
            answer = CompletionMessage(invocation_id, result=results[0], has_result=True)
        else:
            answer = CompletionMessage(invocation_id, error=_NO_RESULT)
        try:
            try:
                await self._send_on(link, answer)
            except TypeError as exc:
                await self._send_on(link, CompletionMessage(invocation_id, error=str(exc)))
        except HubConnectionError:
            pass  # the connection ended; the server fails the invocation itself

    async def _call_back(self, what: str, callbacks: list[Callable[[Any], Any]],
                         argument: Any) -> None:
        for callback in tuple(callbacks):
            try:
                value = callback(argument)
                if inspect.isawaitable(value):
                    await value
            except Exception:
                _log.exception("the %s callback %r failed", what, callback)
