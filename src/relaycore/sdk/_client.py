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
  order the invocations finish.
* CLOSING: the input ended. If the service said the client left (CloseConnection), running
  invocations get ``client_close_timeout`` to finish; if the server connection was lost they
  are cancelled at once (their results could not be delivered). If this side ended the
  connection (``context.abort()``, a protocol error), the service is sent a CloseConnection.
  Then ``Hub.on_disconnected`` runs, and the client is forgotten.
"""

from __future__ import annotations

import contextvars
import logging
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

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

if TYPE_CHECKING:
    from ._connection import Dispatcher, ServiceConnection

__all__ = ["ClientConnection", "claims_and_user_id", "current_service_connection"]

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
        self._task_group: anyio.abc.TaskGroup | None = None
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
        """Hand over the bytes of one ConnectionData (waits while the inbox is full)."""
        if self._input_closed:
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
                        await self._dispatch(task_group, buffer)
                    finally:
                        for scope in self._streams.values():
                            scope.cancel()
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

    async def _dispatch(self, task_group: anyio.abc.TaskGroup, buffer: bytearray) -> None:
        assert self.protocol is not None
        limit = self.router.options.max_message_size
        while True:
            if buffer:
                try:
                    messages, consumed = self.protocol.parse(buffer, limit)
                except RemoteProtocolError as exc:
                    _log.info("client %s sent a bad message: %s", self.connection_id, exc)
                    text = f"Connection closed with an error. {exc}"
                    await self._send_message(CloseMessage(text))
                    self._close_reason = text
                    return
                del buffer[:consumed]
                for message in messages:
                    if not self._handle(task_group, message):
                        return
            data = await self._inbox.get()
            if data is None:
                return
            buffer += data

    def _handle(self, task_group: anyio.abc.TaskGroup, message: Any) -> bool:
        if isinstance(message, InvocationMessage):
            task_group.start_soon(self._invoke, message)
        elif isinstance(message, StreamInvocationMessage):
            scope = anyio.CancelScope()
            self._streams[message.invocation_id] = scope
            task_group.start_soon(self._stream, message, scope)
        elif isinstance(message, CancelInvocationMessage):
            stream = self._streams.get(message.invocation_id)
            if stream is not None:
                stream.cancel()
        elif isinstance(message, CompletionMessage):
            task_group.start_soon(self.router.client_completed, self, message)
        elif isinstance(message, CloseMessage):
            # The client is leaving; the service follows with CloseConnection.
            return False
        # Ping, StreamItem (upload streams are not supported), Ack, Sequence: nothing to do.
        return True

    def make_hub(self) -> Hub:
        """A fresh hub instance bound to this connection."""
        hub = self.router.hub_factory()
        hub.context = self.context
        hub.clients = HubCallerClients(self.router, self.connection_id)
        hub.groups = GroupManager(self.router)
        return hub

    def _resolve(self, target: str, arguments: Sequence[Any], streaming: bool) -> tuple[Any, str]:
        """The bound hub function for ``target``, or raise ``_InvocationError``."""
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
        try:
            method.bind(arguments)
        except TypeError as exc:
            raise _InvocationError(
                _error_text(
                    f"Failed to invoke '{target}' due to an error on the server.",
                    exc,
                    self.router.options.enable_detailed_errors,
                )
            ) from None
        hub = self.make_hub()
        return getattr(hub, method.attribute), method.name

    async def _invoke(self, message: InvocationMessage) -> None:
        invocation_id = message.invocation_id
        detailed = self.router.options.enable_detailed_errors
        token = current_service_connection.set(self.service_connection)
        try:
            if message.stream_ids:
                raise _InvocationError(
                    f"Client sent {len(message.stream_ids)} stream(s), Hub method expects 0."
                )
            function, _name = self._resolve(message.target, message.arguments, False)
            result = await function(*message.arguments)
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

    async def _stream(self, message: StreamInvocationMessage, scope: anyio.CancelScope) -> None:
        invocation_id = message.invocation_id
        detailed = self.router.options.enable_detailed_errors
        token = current_service_connection.set(self.service_connection)
        error: str | None = None
        try:
            with scope:
                try:
                    if message.stream_ids:
                        raise _InvocationError(
                            f"Client sent {len(message.stream_ids)} stream(s), Hub method "
                            "expects 0."
                        )
                    function, _name = self._resolve(message.target, message.arguments, True)
                    generator = function(*message.arguments)
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

    def close(self, *, discard: bool = False) -> None:
        self._closed = True
        if discard:
            self._items.clear()
        self._notify()


class _InvocationError(Exception):
    """An invocation failed before the hub method ran; the text goes to the client."""
