"""Client results: server-to-client invocations that wait for the client's answer (§2.5).

A hub method (or code outside one) calls ``clients.client(id).invoke(...)``. The invocation goes
out as ClientInvocation, carrying this server's id; the client's Completion comes back as
ConnectionData to whichever app server owns the client. Three cases follow:

* **This server invoked it and owns the client**: the completion resolves the waiting call
  at once; the service is sent an empty ClientCompletion so that it forgets the invocation.
* **Another server invoked it**: the service told this server (the owner) with the same
  ClientInvocation, which is remembered; the completion is forwarded to the caller as a
  ClientCompletion (its payload: the completion in the client's protocol), which the service
  relays to the caller.
* **The completion came first**: the ClientInvocation that says where it goes is still on
  its way; the completion waits for it (at most ``_MAX_ORPHANS`` of them).

The caller resolves the waiting call from a relayed ClientCompletion, or fails it on the
service's ErrorCompletion (client gone, timeout): one per endpoint the invocation went to, so
that it fails only when every endpoint said so. A client leaving fails what waits for it.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final

import anyio

from relaycore.protocol import (
    ClientCompletionMessage,
    ClientInvocationMessage,
    CompletionMessage,
    ErrorCompletionMessage,
    RemoteProtocolError,
    ServiceMessage,
    UnsupportedProtocolError,
    get_protocol,
)

from ._errors import HubException, ServiceUnavailableError

if TYPE_CHECKING:
    from ._connection import Client, ServiceConnection

__all__ = ["ClientResults", "PendingResult"]

_log = logging.getLogger("relaycore.sdk")

#: Completions that arrived before the service's ClientInvocation told us where they go.
_MAX_ORPHANS: Final = 1024


class PendingResult:
    """A client result this server waits for (it sent the ClientInvocation)."""

    __slots__ = ("connection_id", "done", "error", "errors_left", "result")

    def __init__(self, connection_id: str) -> None:
        self.connection_id = connection_id
        self.done = anyio.Event()
        self.result: Any = None
        self.error: str | None = None
        #: ErrorCompletions still needed to fail: one per endpoint the invocation went to.
        self.errors_left = 1

    def resolve(self, completion: CompletionMessage) -> None:
        if self.done.is_set():
            return
        self.result = completion.result
        self.error = completion.error
        self.done.set()

    def fail(self, error: str) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()

    async def outcome(self, timeout: float | None) -> Any:
        """The client's result; ``HubException`` with its error, ``TimeoutError`` after
        ``timeout`` seconds."""
        with anyio.fail_after(timeout):
            await self.done.wait()
        if self.error is not None:
            raise HubException(self.error)
        return self.result


class ClientResults:
    """The client results of one hub on this server (see the module doc)."""

    def __init__(self, server_id: str, local_clients: Mapping[str, Client]) -> None:
        self.server_id = server_id
        #: The hub's clients owned by this server (the dispatcher's, kept current by it).
        self.local_clients = local_clients
        self._pending: dict[str, PendingResult] = {}
        self._routed: dict[str, ClientInvocationMessage] = {}
        self._orphans: OrderedDict[str, tuple[Client, CompletionMessage]] = OrderedDict()

    @contextlib.contextmanager
    def awaiting(self, invocation_id: str, connection_id: str) -> Iterator[PendingResult]:
        """Wait for the result of ``invocation_id`` from ``connection_id`` within the block."""
        pending = PendingResult(connection_id)
        self._pending[invocation_id] = pending
        try:
            yield pending
        finally:
            self._pending.pop(invocation_id, None)

    async def client_completed(self, client: Client, completion: CompletionMessage) -> None:
        """A client sent a Completion (the result of a server-to-client invocation)."""
        invocation_id = completion.invocation_id
        pending = self._pending.get(invocation_id)
        if pending is not None and pending.connection_id == client.connection_id:
            pending.resolve(completion)
            # The caller's cleanup ClientCompletion: the service may forget the invocation.
            await _send_quietly(
                client.service_connection,
                ClientCompletionMessage(
                    invocation_id, client.connection_id, self.server_id, client.protocol_name, b""
                ),
            )
            return
        routed = self._routed.pop(invocation_id, None)
        if routed is not None and routed.connection_id == client.connection_id:
            await self._forward(client, routed, completion)
            return
        # The ClientInvocation telling us who waits may still be on its way.
        self._orphans[invocation_id] = (client, completion)
        while len(self._orphans) > _MAX_ORPHANS:
            self._orphans.popitem(last=False)

    async def _forward(
        self,
        client: Client,
        routed: ClientInvocationMessage,
        completion: CompletionMessage,
    ) -> None:
        protocol = client.protocol
        assert protocol is not None
        await _send_quietly(
            client.service_connection,
            ClientCompletionMessage(
                routed.invocation_id,
                client.connection_id,
                routed.caller_server_id,
                protocol.name,
                protocol.write(completion),
            ),
        )

    async def from_service(
        self, message: ClientInvocationMessage | ClientCompletionMessage | ErrorCompletionMessage
    ) -> None:
        """The service's word on a client invocation: another server invoked a client of
        this one, or a result (or failure) for a call of this server."""
        if isinstance(message, ClientInvocationMessage):
            await self._routed_invocation(message)
        elif isinstance(message, ClientCompletionMessage):
            self._completion_from_service(message)
        else:
            self._error_from_service(message)

    async def _routed_invocation(self, message: ClientInvocationMessage) -> None:
        if message.caller_server_id == self.server_id:
            return
        orphan = self._orphans.pop(message.invocation_id, None)
        if orphan is not None and orphan[0].connection_id == message.connection_id:
            await self._forward(orphan[0], message, orphan[1])
            return
        if message.connection_id in self.local_clients:
            self._routed[message.invocation_id] = message

    def _completion_from_service(self, message: ClientCompletionMessage) -> None:
        pending = self._pending.get(message.invocation_id)
        if pending is None or not message.payload:
            return  # someone else's, or a cleanup echo
        try:
            protocol = get_protocol(message.protocol or "json")
            messages, _consumed = protocol.parse(message.payload)
        except (UnsupportedProtocolError, RemoteProtocolError) as exc:
            pending.fail(f"Invalid client result: {exc}")
            return
        for item in messages:
            if isinstance(item, CompletionMessage):
                pending.resolve(item)
                return
        pending.fail("Invalid client result: no completion message in the payload")

    def _error_from_service(self, message: ErrorCompletionMessage) -> None:
        self._routed.pop(message.invocation_id, None)
        pending = self._pending.get(message.invocation_id)
        if pending is None:
            return
        pending.errors_left -= 1
        if pending.errors_left <= 0:
            pending.fail(message.error or "Invocation failed.")

    def client_gone(self, client: Client) -> None:
        """Fail the results still awaited from a client that left."""
        for pending in self._pending.values():
            if pending.connection_id == client.connection_id:
                pending.fail(f"Connection '{client.connection_id}' disconnected.")
        for invocation_id in [
            i for i, m in self._routed.items() if m.connection_id == client.connection_id
        ]:
            del self._routed[invocation_id]


async def _send_quietly(connection: ServiceConnection, message: ServiceMessage) -> None:
    try:
        await connection.send(message)
    except ServiceUnavailableError as exc:
        _log.info("could not send %s: %s", type(message).__name__, exc)
