"""One logical client connection: a SignalR client the service forwards to this app server.

Theory of operation
-------------------

The service announces a client with OpenConnection, then forwards the client's bytes as
ConnectionData, beginning with its SignalR handshake request (service-protocol §5, §6.2). The
server connection that received OpenConnection *owns* the client: every byte for the client
(the handshake response, completions, stream items) goes back on that connection.

A ``ClientConnection`` is one task (``run``) fed through an in-memory inbox by the server
connection's reader, moving through these states:

* HANDSHAKE: bytes accumulate until a whole handshake request has arrived (bounded by
  ``client_handshake_timeout`` and ``max_message_size``). A bad or unsupported request is
  answered with a handshake error and a CloseConnection; a good one with ``{}`` + 0x1E.
* CONNECTED: ``Hub.on_connected`` runs, then hub messages are parsed and dispatched. Each
  invocation runs in its own task of the client's task group, so a slow method (or one awaiting
  a client result from this very client) never stops the reading; completions go out in the
  order the invocations finish. What arrived until then is handled by the client's task; from
  then on the server connection's reader parses each payload as it hands it over (``feed``)
  and starts the invocations itself (in the client's task group and context), which saves a
  task switch and an inbox round trip per message; the client's task waits for the end. An
  invocation's upload streams (``streamIds``) are each an ``UploadStream`` the hub method
  iterates: StreamItems are put there without waiting, and a stream whose method falls
  ``Hub.stream_buffer_capacity`` items behind fails, so that a slow method never holds up the
  server connection, which carries other clients too.
* CLOSING: the input ended. If the service said the client left (CloseConnection), running
  invocations get ``client_close_timeout`` to finish; if the server connection was lost they
  are cancelled at once (their results could not be delivered); upload streams that have
  not ended fail, and streaming invocations are cancelled. If this side ended the
  connection (``context.abort()``, a protocol error), the service is sent a CloseConnection.
  Then ``Hub.on_disconnected`` runs, and the client is forgotten.
"""

from __future__ import annotations

import contextvars
import logging
import types
from collections import deque
from collections.abc import Callable, Coroutine, Generator, Mapping
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.lowlevel

from relaycore.protocol import (
    ASRS_MIGRATE_FROM_HEADER,
    CancelInvocationMessage,
    CloseConnectionMessage,
    CloseMessage,
    CompletionMessage,
    ConnectionDataMessage,
    HandshakeRefused,
    HubHandshake,
    InvocationMessage,
    JsonHubProtocol,
    LocalProtocolError,
    MessagePackHubProtocol,
    OpenConnectionMessage,
    RemoteProtocolError,
    StreamInvocationMessage,
    StreamItemMessage,
    header_for,
    is_system_claim,
)

from ._errors import HubException
from ._hub import ROLE_CLAIM_TYPES, GroupManager, Hub, HubCallerClients, HubCallerContext
from ._websocket import Wakeup, wakeup_factory

if TYPE_CHECKING:
    from ._connection import Dispatcher, ServiceConnection

__all__ = ["ClientConnection", "UploadStream", "claims_and_user_id", "current_service_connection"]

_log = logging.getLogger("relaycore.sdk")

#: The server connection owning the client a hub method runs for: sends from that method go
#: out on it (for its endpoint), so that they stay in order with the method's completion and
#: with its group changes (service-protocol §7, "Ordering").
current_service_connection: contextvars.ContextVar[ServiceConnection | None] = (
    contextvars.ContextVar("relaycore_sdk_service_connection", default=None)
)

#: Inbox depth: ConnectionData payloads waiting for the client's task. When it is full the
#: server connection's reader waits (backpressure), as the Azure SDK's pipes do.
_INBOX_SIZE = 256

_NAME_IDENTIFIER = "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/nameidentifier"
#: The claim an app server's token sets when its identity's role claim type is not .NET's
#: default (ClaimsUtility.BuildJwtClaims): the type whose values are the roles.
_ROLE_TYPE_CLAIM = "asrs.s.rt"


def claims_and_user_id(
    claims: Mapping[str, str | tuple[str, ...]],
) -> tuple[tuple[tuple[str, str], ...], str | None]:
    """The user's claims and user id from OpenConnection claims, as the Azure SDK reads them
    (§6.2): ``asrs.s.uid`` is the user id, else the name identifier (long URI, ``nameid``,
    ``sub``); ``asrs.u.<name>`` becomes ``<name>``; other ``asrs.s.*`` and system claims go.
    The claims are ``(type, value)`` pairs in order, a repeated claim type (a tuple of values
    in OpenConnection) once per value, as the SDK's ``ClaimsPrincipal`` holds them.

    >>> claims_and_user_id({"asrs.s.uid": "ann", "role": ("admin", "editor"), "exp": "9"})
    ((('role', 'admin'), ('role', 'editor')), 'ann')
    """
    user_claims: list[tuple[str, str]] = []
    for name, values in claims.items():
        if name.startswith("asrs.u."):
            name = name[len("asrs.u.") :]
        elif name.startswith("asrs.") or is_system_claim(name):
            continue
        for value in values if isinstance(values, tuple) else (values,):
            user_claims.append((name, value))
    user_id = _first(claims.get("asrs.s.uid")) or None
    if user_id is None:
        for name in (_NAME_IDENTIFIER, "nameid", "sub"):
            found = _first(claims.get(name))
            if found:
                user_id = found
                break
    return tuple(user_claims), user_id


def _first(value: str | tuple[str, ...] | None) -> str | None:
    if isinstance(value, tuple):
        return value[0] if value else None
    return value


def _error_text(base: str, exc: BaseException, detailed: bool) -> str:
    # .NET ErrorMessageHelper: HubException always shows its message, others only in detail.
    if isinstance(exc, HubException) or detailed:
        return f"{base} {type(exc).__name__}: {exc}"
    return base


class _ClientGone(ConnectionError):
    """The client connection ended while a hub method was running."""


class ClientConnection:
    """A SignalR client connected through the service to this app server (see module doc)."""

    def __init__(
        self, router: Dispatcher, connection: ServiceConnection, open_message: OpenConnectionMessage
    ) -> None:
        self.router = router
        self.service_connection = connection
        self.connection_id = open_message.connection_id
        claims, user_id = claims_and_user_id(open_message.claims)
        role_type = _first(open_message.claims.get(_ROLE_TYPE_CLAIM))
        self.context = HubCallerContext(
            self,
            open_message.connection_id,
            user_id,
            claims,
            dict(open_message.headers),
            (open_message.query_string or "").lstrip("?"),
            role_claim_types=(role_type,) if role_type else ROLE_CLAIM_TYPES,
        )
        self._migrated = header_for(open_message.headers, ASRS_MIGRATE_FROM_HEADER) is not None
        self.protocol: JsonHubProtocol | MessagePackHubProtocol | None = None
        self._announced_protocol = open_message.protocol
        self._inbox = _Inbox(_INBOX_SIZE)
        self._scope = anyio.CancelScope()
        self._input_closed = False
        #: Why the input ended: None (normal close) or the error passed to on_disconnected.
        self._end_error: BaseException | None = None
        #: This side ends the connection: tell the service with CloseConnection.
        self._close_reason: str | None = None
        self._streams: dict[str, anyio.CancelScope] = {}
        #: The upload streams still open, by stream id.
        self._uploads: dict[str, UploadStream] = {}
        self._task_group: anyio.abc.TaskGroup | None = None
        #: The bytes of an incomplete hub message, while dispatching.
        self._buffer = bytearray()
        #: Messages are being dispatched (``_dispatch``): the task group takes invocations.
        self._dispatching = False
        #: ``feed`` dispatches in the reader's task (see the module doc).
        self._direct = False
        #: What failed dispatching in the reader's task; the client's task raises it.
        self._failure: Exception | None = None
        #: The client task's context: each invocation runs in a copy of it.
        self._context = contextvars.copy_context()
        #: Calls to start (``_start_soon``), the task that starts them (``_runner``) and what
        #: it waits on when the queue is empty.
        self._runq: deque[tuple[Callable[..., Coroutine[Any, Any, object]], tuple[Any, ...]]] = (
            deque()
        )
        self._has_runner = False
        self._runner_wake: Wakeup | None = None
        self._new_wakeup = wakeup_factory()
        self._max_message_size = router.options.max_message_size
        # One set of proxies for every hub instance made for this connection.
        self._hub_clients = HubCallerClients(router, self.connection_id)
        self._groups = GroupManager(router)
        self.done = anyio.Event()

    @property
    def protocol_name(self) -> str:
        """The negotiated hub protocol's name; before the handshake, the one the service
        announced in OpenConnection (or ``""``)."""
        if self.protocol is not None:
            return self.protocol.name
        return (self._announced_protocol or "").lower()

    # Input from the server connection ------------------------------------------------------

    async def feed(self, payload: bytes) -> None:
        """Hand over the bytes of one ConnectionData: dispatched at once once the client is
        connected (see the module doc), else queued (waits while the inbox is full)."""
        if self._input_closed:
            return
        if self._direct:
            try:
                go_on = await self._receive(payload)
            except Exception as exc:  # a bug: it fails this client, as in the client's task
                self._failure = exc
                go_on = False
            if not go_on:
                self._direct = False
                self._inbox.close()  # the client's task ends the connection
            return
        await self._inbox.put(payload)

    def close_input(self, error: BaseException | None = None, *, lost: bool = False) -> None:
        """The client is gone (CloseConnection, ``error`` from its message), or with
        ``lost`` its server connection is: stop at once."""
        if lost:
            self._scope.cancel()
        if self._input_closed:
            return
        self._input_closed = True
        self._end_error = error
        self._inbox.close()

    def abort(self, reason: str = "") -> None:
        """End the connection from this side; the service is told with CloseConnection."""
        if self._close_reason is None:
            self._close_reason = reason
        self._inbox.close(discard=True)
        self.close_input(None)

    # Output --------------------------------------------------------------------------------

    async def send_bytes(self, data: bytes) -> None:
        """Write raw hub-protocol bytes to the client (ConnectionData on the owning
        connection). Raises ``_ClientGone`` once the client or its connection has gone."""
        if self.done.is_set():
            raise _ClientGone(f"connection {self.connection_id} has ended")
        await self.service_connection.send(ConnectionDataMessage(self.connection_id, data))

    async def _send_message(self, message: Any) -> None:
        assert self.protocol is not None
        try:
            await self.send_bytes(self.protocol.write(message))
        except ConnectionError as exc:
            _log.debug("dropped a message for %s: %s", self.connection_id, exc)

    # The connection's task -----------------------------------------------------------------

    async def run(self) -> None:
        """Serve the client until it leaves; runs ``on_connected`` and ``on_disconnected``."""
        options = self.router.options
        connected = False
        hurried = False
        try:
            with self._scope:
                buffer = await self._handshake()
                if buffer is None:
                    return
                if not await self._run_on_connected():
                    return
                connected = True
                async with anyio.create_task_group() as task_group:
                    self._task_group = task_group
                    try:
                        await self._dispatch(buffer)
                    finally:
                        self._dispatching = self._direct = False
                        if self._runner_wake is not None:
                            self._runner_wake.set()  # it starts what is queued, then ends
                        for scope in self._streams.values():
                            scope.cancel()
                        for upload in self._uploads.values():
                            upload.fail(
                                HubException("The client disconnected before the stream ended.")
                            )
                        self._uploads.clear()
                        # The client left: give running invocations a grace period.
                        task_group.cancel_scope.deadline = min(
                            task_group.cancel_scope.deadline,
                            anyio.current_time() + options.client_close_timeout,
                        )
        except anyio.get_cancelled_exc_class():
            hurried = True  # the app server is shutting down
            raise
        finally:
            await self._finish(connected, hurried or self._scope.cancel_called)

    async def _handshake(self) -> bytearray | None:
        """Read the client's handshake and answer it; the bytes that followed it (hub
        messages), or ``None`` when the client is not connected after all."""
        options = self.router.options
        handshake = HubHandshake(options.max_message_size)
        with anyio.move_on_after(options.client_handshake_timeout):
            while handshake.result is None:
                data = await self._inbox.get()
                if data is None:
                    return None  # the client left before its handshake
                handshake.receive_data(data)
        if handshake.result is None:
            handshake.cancel()
        result = handshake.result
        if isinstance(result, HandshakeRefused):
            _log.info("client %s handshake refused: %s", self.connection_id, result.error)
            try:
                await self.send_bytes(handshake.data_to_send())
            except ConnectionError:
                pass
            self._close_reason = result.error
            return None
        assert result is not None  # cancel() decided an undecided handshake
        self.protocol = result.hub_protocol
        if not self._migrated:
            # A migrated client already had its handshake answered by its first server.
            try:
                await self.send_bytes(handshake.data_to_send())
            except ConnectionError:
                return None
        return bytearray(result.rest)

    async def _run_on_connected(self) -> bool:
        hub = self.make_hub()
        token = current_service_connection.set(self.service_connection)
        try:
            await hub.on_connected()
        except Exception as exc:
            _log.exception("on_connected failed for %s", self.connection_id)
            text = _error_text(
                "Connection closed with an error.", exc, self.router.options.enable_detailed_errors
            )
            await self._send_message(CloseMessage(text))
            self._close_reason = text
            return False
        finally:
            current_service_connection.reset(token)
        return True

    async def _dispatch(self, buffer: bytearray) -> None:
        """Dispatch the client's messages until it leaves: the bytes that followed its
        handshake and what arrived while ``on_connected`` ran, here; then, once the inbox is
        empty, whatever the reader feeds, in the reader's task (``feed``), while this task
        waits for the inbox to close (the client left, ``abort``, or a message that ends the
        connection)."""
        self._buffer = buffer
        self._context = contextvars.copy_context()
        self._dispatching = True
        data: bytes | None = b""
        while data is not None:
            if not await self._receive(data):
                return
            data = self._inbox.get_nowait()
        self._direct = True
        while (data := await self._inbox.get()) is not None:
            if not await self._receive(data):
                return
        if self._failure is not None:
            raise self._failure

    async def _receive(self, data: bytes) -> bool:
        """Parse ``data`` after what was left of the client's last message and handle each
        message; False once the connection is to end (a bad message, a CloseMessage, or
        dispatching stopped while this waited)."""
        protocol = self.protocol
        task_group = self._task_group
        assert protocol is not None and task_group is not None
        buffer = self._buffer
        # The common payload holds whole messages: parsed as it is, not copied into the buffer.
        source: bytes | bytearray = data
        if buffer:
            buffer += data
            source = buffer
        elif not data:
            return True
        try:
            messages, consumed = protocol.parse(source, self._max_message_size)
        except RemoteProtocolError as exc:
            _log.info("client %s sent a bad message: %s", self.connection_id, exc)
            text = f"Connection closed with an error. {exc}"
            await self._send_message(CloseMessage(text))
            self._close_reason = text
            return False
        if source is buffer:
            del buffer[:consumed]
        elif consumed < len(data):
            buffer += memoryview(data)[consumed:]
        for message in messages:
            if isinstance(message, StreamItemMessage):
                upload = self._uploads.get(message.invocation_id)
                if upload is not None and upload.full:
                    # One more chance for its method to read before it fails.
                    await anyio.lowlevel.checkpoint()
                    if not self._dispatching:
                        return False
            if not self._handle(task_group, message):
                return False
        if self._uploads:
            # The methods reading upload streams take this batch's items before the
            # next batch is read: one that keeps up never fills its buffer.
            await anyio.lowlevel.checkpoint()
            return self._dispatching
        return True

    def _handle(self, task_group: anyio.abc.TaskGroup, message: Any) -> bool:
        if isinstance(message, StreamItemMessage):
            upload = self._uploads.get(message.invocation_id)
            # Items of a stream whose invocation ended (or never was) are dropped.
            if upload is not None and not upload.put(message.item):
                del self._uploads[message.invocation_id]
                _log.info(
                    "client %s: upload stream %r overflowed", self.connection_id, upload.stream_id
                )
        elif isinstance(message, InvocationMessage):
            self._start_soon(task_group, self._invoke, message, self._open_uploads(message))
        elif isinstance(message, StreamInvocationMessage):
            scope = anyio.CancelScope()
            self._streams[message.invocation_id] = scope
            self._start_soon(task_group, self._stream, message, self._open_uploads(message), scope)
        elif isinstance(message, CancelInvocationMessage):
            stream = self._streams.get(message.invocation_id)
            if stream is not None:
                stream.cancel()
        elif isinstance(message, CompletionMessage):
            upload = self._uploads.pop(message.invocation_id, None)
            if upload is not None:
                upload.end(message.error)
            else:
                self._start_soon(task_group, self.router.client_completed, self, message)
        elif isinstance(message, CloseMessage):
            # The client is leaving; the service follows with CloseConnection.
            return False
        # Ping, Ack, Sequence: nothing to do.
        return True

    def _start_soon(
        self,
        task_group: anyio.abc.TaskGroup,
        function: Callable[..., Coroutine[Any, Any, object]],
        *args: Any,
    ) -> None:
        """Run ``function(*args)`` as a task of its own in the client's task group would run
        it, without the cost of a task for each call (see ``_runner``)."""
        self._runq.append((function, args))
        wake = self._runner_wake
        if wake is not None:
            self._runner_wake = None
            wake.set()
        elif not self._has_runner:
            self._has_runner = True
            self._context.run(task_group.start_soon, self._runner, task_group)

    async def _runner(self, task_group: anyio.abc.TaskGroup) -> None:
        """Start what ``_start_soon`` queued, in order, each call in a copy of the client's
        context (as a task of its own would run it). Most calls (a hub method that sends and
        returns: sends do not wait) finish in their first step, so one task runs them one
        after the other. A call that waits for something keeps this task, which stays with it
        to its end (cancel scopes and the event loop know the task a coroutine waits in), and
        a new runner takes over the queue. Ends when the queue is empty and dispatching
        stopped."""
        holding = True  # this task is the client's runner
        try:
            while True:
                while self._runq:
                    function, args = self._runq.popleft()
                    context = self._context.copy()
                    coroutine = function(*args)
                    try:
                        trap = context.run(coroutine.send, None)
                    except StopIteration:
                        continue
                    holding = self._has_runner = False
                    if self._runq:
                        self._has_runner = True
                        self._context.run(task_group.start_soon, self._runner, task_group)
                    await _resume(context, coroutine, trap)
                    return
                if not self._dispatching:
                    return
                self._runner_wake = wake = self._new_wakeup()
                await wake.wait()
        finally:
            if holding:
                self._has_runner = False
                self._runner_wake = None

    def _open_uploads(
        self, message: InvocationMessage | StreamInvocationMessage
    ) -> tuple[UploadStream, ...]:
        """The upload streams of an invocation, registered before the next message is handled
        (its items may follow in the same batch). None are made when the method does not take
        as many streams as were sent, or an id repeats or is in use: the invocation then fails
        (``_resolve``) and the items are dropped."""
        ids = message.stream_ids
        if not ids:
            return ()
        methods = self.router.methods
        method = methods.find(message.target)
        if method is None or len(method.uploads) != len(ids):
            return ()
        if len(set(ids)) != len(ids) or not self._uploads.keys().isdisjoint(ids):
            return ()
        capacity = methods.hub_class.stream_buffer_capacity
        uploads = tuple(UploadStream(stream_id, capacity) for stream_id in ids)
        for upload in uploads:
            self._uploads[upload.stream_id] = upload
        return uploads

    def _close_uploads(self, uploads: tuple[UploadStream, ...]) -> None:
        """An invocation ended: its streams' later items are dropped."""
        for upload in uploads:
            if self._uploads.get(upload.stream_id) is upload:
                del self._uploads[upload.stream_id]

    def make_hub(self) -> Hub:
        """A fresh hub instance bound to this connection."""
        hub = self.router.hub_factory()
        hub.context = self.context
        hub.clients = self._hub_clients
        hub.groups = self._groups
        return hub

    def _resolve(
        self,
        message: InvocationMessage | StreamInvocationMessage,
        uploads: tuple[UploadStream, ...],
    ) -> Callable[[], Any]:
        """The hub method ``message`` calls, as a function of no arguments, or raise
        ``_InvocationError``."""
        target = message.target
        streaming = isinstance(message, StreamInvocationMessage)
        method = self.router.methods.find(target)
        if method is None:
            raise _InvocationError(f"Unknown hub method '{target}'")
        if method.streaming and not streaming:
            raise _InvocationError(
                f"The client attempted to invoke the streaming '{target}' method with a "
                "non-streaming invocation."
            )
        if streaming and not method.streaming:
            raise _InvocationError(
                f"The client attempted to invoke the non-streaming '{target}' method with a "
                "streaming invocation."
            )
        sent = len(message.stream_ids)
        if sent != len(method.uploads):
            raise _InvocationError(
                f"Client sent {sent} stream(s), Hub method expects {len(method.uploads)}."
            )
        if len(uploads) != sent:
            raise _InvocationError(
                f"Failed to invoke '{target}': its stream ids {list(message.stream_ids)} "
                "repeat one another or a stream still open."
            )
        try:
            arguments, keywords = method.bind(message.arguments, uploads)
        except TypeError as exc:
            raise _InvocationError(
                _error_text(
                    f"Failed to invoke '{target}' due to an error on the server.",
                    exc,
                    self.router.options.enable_detailed_errors,
                )
            ) from None
        function = getattr(self.make_hub(), method.attribute)
        return lambda: function(*arguments, **keywords)

    async def _invoke(self, message: InvocationMessage, uploads: tuple[UploadStream, ...]) -> None:
        invocation_id = message.invocation_id
        detailed = self.router.options.enable_detailed_errors
        token = current_service_connection.set(self.service_connection)
        try:
            result = await self._resolve(message, uploads)()
        except _InvocationError as exc:
            reply = CompletionMessage(invocation_id or "", error=str(exc))
        except Exception as exc:
            if not isinstance(exc, HubException):
                _log.exception("hub method %r failed", message.target)
            reply = CompletionMessage(
                invocation_id or "",
                error=_error_text(
                    f"An unexpected error occurred invoking '{message.target}' on the server.",
                    exc,
                    detailed,
                ),
            )
        else:
            reply = CompletionMessage(invocation_id or "", result=result, has_result=True)
        finally:
            current_service_connection.reset(token)
            self._close_uploads(uploads)
        if invocation_id is None:
            return  # non-blocking: never answered
        assert self.protocol is not None
        try:
            data = self.protocol.write(reply)
        except LocalProtocolError as exc:
            data = self.protocol.write(
                CompletionMessage(
                    invocation_id,
                    error=_error_text(
                        f"An unexpected error occurred invoking '{message.target}' on the server.",
                        exc,
                        detailed,
                    ),
                )
            )
        try:
            await self.send_bytes(data)
        except ConnectionError as exc:
            _log.debug("completion for %s dropped: %s", self.connection_id, exc)

    async def _stream(
        self,
        message: StreamInvocationMessage,
        uploads: tuple[UploadStream, ...],
        scope: anyio.CancelScope,
    ) -> None:
        invocation_id = message.invocation_id
        detailed = self.router.options.enable_detailed_errors
        token = current_service_connection.set(self.service_connection)
        error: str | None = None
        try:
            with scope:
                try:
                    generator = self._resolve(message, uploads)()
                    try:
                        async for item in generator:
                            await self._send_message(StreamItemMessage(invocation_id, item))
                    finally:
                        await generator.aclose()
                except _InvocationError as exc:
                    error = str(exc)
                except Exception as exc:
                    if not isinstance(exc, HubException):
                        _log.exception("streaming hub method %r failed", message.target)
                    error = _error_text(
                        f"An unexpected error occurred invoking '{message.target}' on the server.",
                        exc,
                        detailed,
                    )
            if scope.cancel_called:
                return  # cancelled by the client (or it left): nothing more to send
            await self._send_message(CompletionMessage(invocation_id, error=error))
        finally:
            current_service_connection.reset(token)
            self._streams.pop(invocation_id, None)
            self._close_uploads(uploads)

    async def _finish(self, connected: bool, hurried: bool) -> None:
        self._input_closed = True
        self._inbox.close()
        options = self.router.options
        # Shielded: on_disconnected runs even when the app server is shutting down, then
        # within ``shutdown_timeout`` rather than the usual ``client_close_timeout``.
        grace = (
            min(options.shutdown_timeout, options.client_close_timeout)
            if hurried
            else (options.client_close_timeout)
        )
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(self.router.options.shutdown_timeout):
                if self._close_reason is not None and not self._scope.cancel_called:
                    try:
                        await self.service_connection.send(
                            CloseConnectionMessage(self.connection_id, self._close_reason)
                        )
                    except ConnectionError:
                        pass
            self.router.client_gone(self)
            if connected:
                with anyio.move_on_after(grace):
                    hub = self.make_hub()
                    try:
                        await hub.on_disconnected(self._end_error)
                    except Exception:
                        _log.exception("on_disconnected failed for %s", self.connection_id)
            self.done.set()


@types.coroutine
def _resume(
    context: contextvars.Context, coroutine: Coroutine[Any, Any, Any], trap: Any
) -> Generator[Any, Any, Any]:
    """Await ``coroutine``, which has run its first step and yielded ``trap`` to the event
    loop: hand what it yields to the loop and what the loop sends or throws back to it, each
    step in ``context``, as the coroutine's own task would."""
    step: Callable[[Any], Any]
    while True:
        try:
            value = yield trap
        except BaseException as exc:  # a cancellation, or anything thrown at the awaiting task
            step, argument = coroutine.throw, exc
        else:
            step, argument = coroutine.send, value
        try:
            trap = context.run(step, argument)
        except StopIteration as stop:
            return stop.value


class _Inbox:
    """A bounded FIFO of ConnectionData payloads between the server connection's reader and
    the client's task. ``close`` lets the items queued so far be read, then ``get`` returns
    ``None``; ``put`` after ``close`` drops the item. (Plain state and events rather than a
    memory object stream: nothing to close when the client's task never ran.)"""

    __slots__ = ("_changed", "_closed", "_items", "_limit")

    def __init__(self, limit: int) -> None:
        self._items: deque[bytes] = deque()
        self._limit = limit
        self._closed = False
        self._changed = anyio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def put(self, item: bytes) -> None:
        while len(self._items) >= self._limit and not self._closed:
            await self._changed.wait()
        if not self._closed:
            self._items.append(item)
            self._notify()

    async def get(self) -> bytes | None:
        while not self._items:
            if self._closed:
                return None
            await self._changed.wait()
        item = self._items.popleft()
        self._notify()
        return item

    def get_nowait(self) -> bytes | None:
        """The next item, or ``None`` when none is queued now."""
        if not self._items:
            return None
        item = self._items.popleft()
        self._notify()
        return item

    def close(self, *, discard: bool = False) -> None:
        self._closed = True
        if discard:
            self._items.clear()
        self._notify()


class UploadStream:
    """One stream a client uploads (``streamIds``), as the hub method's ``AsyncIterator``
    parameter receives it: the client's StreamItems in order; the iteration ends with the
    stream's Completion, or raises ``HubException`` when the client ended it with an error,
    disconnected first, or sent more items than ``Hub.stream_buffer_capacity`` ahead of the
    method (the items held are then dropped).

    The client connection's task puts items without waiting (``put``); the method waits in
    ``__anext__``. (A deque and an event rather than a memory object stream: the producer
    must never block, and a full buffer is an error, not a wait.)"""

    __slots__ = ("_changed", "_ended", "_error", "_items", "_limit", "stream_id")

    def __init__(self, stream_id: str, limit: int) -> None:
        self.stream_id = stream_id
        self._items: deque[Any] = deque()
        self._limit = limit
        self._ended = False
        #: What the iteration raises once the items held are read (None: it just stops).
        self._error: BaseException | None = None
        #: Set when an item or the end arrives; made by a reader about to wait.
        self._changed: anyio.Event | None = None

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    @property
    def full(self) -> bool:
        """The next item would fail the stream."""
        return len(self._items) >= self._limit

    def put(self, item: Any) -> bool:
        """Hand the method one item; False (and the stream failed) when the buffer is full."""
        if self._ended:
            return True
        if self.full:
            self._items.clear()
            self.fail(
                HubException(
                    f"Stream '{self.stream_id}' was sent more than {self._limit} items ahead "
                    "of the hub method reading it."
                )
            )
            return False
        self._items.append(item)
        self._notify()
        return True

    def end(self, error: str | None) -> None:
        """The client's Completion of the stream: a normal end, or its error text."""
        self.fail(None if error is None else HubException(error))

    def fail(self, error: BaseException | None) -> None:
        """End the stream after the items held (with ``error`` raised then, if given)."""
        if not self._ended:
            self._ended = True
            self._error = error
            self._notify()

    def __aiter__(self) -> UploadStream:
        return self

    async def __anext__(self) -> Any:
        while not self._items:
            if self._ended:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            if self._changed is None:
                self._changed = anyio.Event()
            await self._changed.wait()
        return self._items.popleft()

    def __repr__(self) -> str:
        return f"<UploadStream {self.stream_id!r}>"


class _InvocationError(Exception):
    """An invocation failed before the hub method ran; the text goes to the client."""
