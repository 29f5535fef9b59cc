"""One app-server connection: the Azure SignalR service protocol over a binary WebSocket.

Theory of operation
-------------------
An app server (the relaycore SDK, or Microsoft's) opens ``GET /server/?hub=H`` and sends a
stream of varint-prefixed MessagePack arrays; a message may span WebSocket frames and a frame
may hold several (service-protocol §1). The first message must be the handshake (§3.3); the
relay answers it and the connection becomes OPEN:

* **Default** and **OnDemand** connections carry clients: a new client of hub H is bound to one
  of them (``Operations.choose_server``), which gets ``OpenConnection`` and then the client's bytes,
  handshake first, as ``ConnectionData``; what the hub writes back goes to the client as is.
* **Weak** connections (secondary endpoints, management clients) never carry clients; they only
  send fan-out, group and close operations.

Everything a server sends on one connection is handled in order (§7: an ack-able operation
follows the sends before it). What a message asks of the relay (a send, a group change, an
existence check, a close) is done by the operations layer (``Operations.perform``); this class
keeps only what belongs to the connection: its handshake, its clients' data, pings, acks and
client results. Operations that want an answer get a ``ServiceAck`` on the same
connection. A malformed message closes this connection with a ``ServiceError`` saying why; its
clients get a Close message with ``allowReconnect`` (they come back through another app server),
never silence. The relay pings every ``server_keep_alive_interval`` with the hub's metrics
(§4.4) and drops a server connection that sent nothing for ``server_timeout``.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from ..protocol import _service as service
from ..protocol._auth import is_system_claim
from ..protocol._errors import RemoteProtocolError
from ..protocol._handshake import answer_service_handshake
from ..protocol._websocket import (
    BinaryMessage,
    CloseCode,
    CloseReceived,
    Opcode,
    TextMessage,
    frame,
)
from ._operations import OPERATION_MESSAGES, Operations
from ._peer import ConnState, Peer, PeerIO

log = logging.getLogger("relaycore.relay.server")


def _type_name(value: int) -> str:
    """``default``, ``ondemand`` or ``weak``: a connection type as the log names it."""
    try:
        return service.ConnectionType(value).name.lower().replace("_", "")
    except ValueError:
        return f"type {value}"


def _claim_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _claims_for_server(claims: dict[str, Any]) -> dict[str, str | tuple[str, ...]]:
    """The client token's claims as OpenConnection carries them: strings, and every value of
    a JSON array (a repeated claim type, §9.1: ``"role": ["admin", "editor"]``) as a tuple,
    which goes on the wire as that claim type repeated, as Azure sends it."""
    out: dict[str, str | tuple[str, ...]] = {}
    for key, value in claims.items():
        if is_system_claim(key):
            continue
        if isinstance(value, list):
            if not value:
                continue
            out[key] = (_claim_text(value[0]) if len(value) == 1
                        else tuple(_claim_text(v) for v in value))
        else:
            out[key] = _claim_text(value)
    return out


class ServerConnection(Peer):
    """An app server's connection to one hub of this relay."""

    __slots__ = ("ops", "hub", "server_id", "connection_type", "accepting", "clients",
                 "_parser", "silenced")

    def __init__(
        self, io: PeerIO, ops: Operations, *, hub: str, server_id: str, now: float
    ) -> None:
        config = ops.config
        super().__init__(io, max_message_size=config.max_service_message_size,
                         send_limit=config.server_send_buffer_limit, now=now)
        self.ops = ops
        self.hub = hub
        self.server_id = server_id
        self.connection_type = service.ConnectionType.DEFAULT
        #: False after the server said it is leaving (``shutdown fin:*``): no new clients.
        self.accepting = True
        self.clients: dict[str, Any] = {}
        self._parser = service.ServiceProtocolParser(
            max_message_size=config.max_service_message_size, raw_connection_data=True,
            raw_user_data=True)
        #: Fault injection: while True nothing is sent or handled (a silent network).
        self.silenced = False

    @property
    def carries_clients(self) -> bool:
        return (
            self.state is ConnState.OPEN
            and self.accepting
            and self.connection_type != service.ConnectionType.WEAK
        )

    def send(self, message: Any) -> None:
        if self.silenced:
            return
        if self.state is ConnState.OPEN or isinstance(
            message, (service.ServiceHandshakeResponse, service.ServiceErrorMessage)
        ):
            self._push(frame(Opcode.BINARY, service.write_message(message)))

    # -- clients bound to this connection ------------------------------------------------------

    def client_opened(self, client: Any, handshake: bytes) -> None:
        headers: dict[str, list[str]] = {
            name: [value] for name, value in client.headers.items()
        }
        headers[service.ASRS_INSTANCE_ID_HEADER] = [self.ops.instance_id]
        client.headers = {}  # sent once, never needed again: idle connections are memory
        client.data_prefix = service.connection_data_prefix(client.id)
        self.clients[client.id] = client
        self.send(
            service.OpenConnectionMessage(
                client.id,
                _claims_for_server(client.claims),
                headers,
                client.query,
                protocol=client.protocol_name,
            )
        )
        self.client_data(client, handshake)

    def client_data(self, client: Any, data: bytes) -> None:
        """Forward a client's bytes as ``ConnectionData`` (written without building the
        message: this is every client message's path to its app server)."""
        if self.state is ConnState.OPEN and not self.silenced:
            self._push(frame(Opcode.BINARY,
                             service.write_connection_data(client.data_prefix, data)))

    def client_closed(self, client: Any, error: str | None) -> None:
        """A client bound here left (or is closed because this connection is): the app
        server hears it (while this connection is open), its pending client invocations
        fail."""
        if self.clients.pop(client.id, None) is not None:
            self.send(service.CloseConnectionMessage(client.id, error or ""))
        self.ops.invocations.client_gone(client)

    # -- timers --------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        config = self.ops.config
        if self.state is ConnState.HANDSHAKE:
            if now - self.created > config.handshake_timeout:
                self.fail("the service handshake did not arrive in time", broken=False)
        elif self.state is ConnState.OPEN:
            if now - self.last_receive > config.server_timeout:
                self.fail(f"the app server sent nothing for {config.server_timeout:g} seconds",
                          broken=False)
            elif now - self.last_send >= config.server_keep_alive_interval:
                self.send(service.ServicePing.of(self.ops.hub_metrics(self.hub)))

    # -- closing -------------------------------------------------------------------------------

    def fail(self, reason: str, *, broken: bool = True) -> None:
        """Close this server connection with a ServiceError saying why (``broken``: the app
        server broke the protocol, which is logged for each connection).

        While the relay drains, the close is 1001 Going Away without a ServiceError: the
        app server reconnects (elsewhere) and logs no error, as for any planned restart."""
        if self.state >= ConnState.CLOSING:
            return
        if self.ops.draining:
            self._leave(reason, expected=True)
            self._send_close_frame(CloseCode.GOING_AWAY, reason)
        else:
            self.send(service.ServiceErrorMessage(reason))
            self._leave(reason, each=logging.WARNING if broken else logging.DEBUG)
            self._send_close_frame(CloseCode.NORMAL_CLOSURE, reason)
        self._start_close_timer()

    def _joined(self) -> None:
        """Log the app server's first connection of a type to this hub (INFO), the others
        at DEBUG: an app server opens several (five by default) at once."""
        same = [s for s in self.ops.servers_of(self.hub)
                if s.server_id == self.server_id and s.connection_type == self.connection_type]
        kind = _type_name(self.connection_type)
        if len(same) == 1:
            log.info("app server %s connected to hub %s (%s)", self.server_id, self.hub, kind)
        else:
            log.debug("app server %s opened %s connection %d to hub %s", self.server_id, kind,
                      len(same), self.hub)

    def _left(self, reason: str, expected: bool, each: int) -> None:
        """Log a connection that left the hub's table: at ``each`` while the app server has
        others there, else one line for the app server, INFO when it left on purpose (it
        closed its connections, or the relay drains) and WARNING when it was lost."""
        kind = _type_name(self.connection_type)
        left = sum(s.server_id == self.server_id for s in self.ops.servers_of(self.hub))
        if left:
            log.log(logging.DEBUG if expected else each,
                    "a %s connection of app server %s to hub %s closed (%s); %d still open",
                    kind, self.server_id, self.hub, reason, left)
        elif expected:
            log.info("app server %s left hub %s (%s)", self.server_id, self.hub, reason)
        else:
            log.warning("app server %s disconnected from hub %s: %s", self.server_id, self.hub,
                        reason)

    def _leave(self, reason: str | None, *, expected: bool = False,
               each: int = logging.DEBUG) -> None:
        if self.state is ConnState.OPEN:
            self.ops.server_closed(self)
            self._left(reason or "closed", expected, each)
        if self.state < ConnState.CLOSING:
            self.state = ConnState.CLOSING
        clients, self.clients = self.clients, {}
        for client in clients.values():
            client.close(
                "The app server connection of this client was closed; reconnect.",
                allow_reconnect=True,
            )

    def _ended(self) -> None:
        self._leave("the connection dropped without a WebSocket close")

    def _on_protocol_error(self, reason: str, code: int | None) -> None:
        self._leave(f"WebSocket protocol error: {reason}", each=logging.WARNING)
        self._start_close_timer()

    def _overflow(self, size: int) -> None:
        """The app server stopped reading (its clients' messages piled up past
        ``server_send_buffer_limit``): drop what waits, close with a ServiceError first."""
        dropped = self.drop_backlog() + size
        stats = self.ops.stats
        stats.server_slow_closes += 1
        stats.server_dropped_bytes += dropped
        reason = (f"the app server did not read: more than {self._limit} bytes were queued "
                  f"for this connection ({dropped} dropped)")
        self._leave(reason, each=logging.WARNING)
        self._push(frame(Opcode.BINARY, service.write_message(service.ServiceErrorMessage(reason))))
        self._send_close_frame(CloseCode.POLICY_VIOLATION, "the app server did not read")
        self._start_close_timer()

    # -- inbound -------------------------------------------------------------------------------

    def abort(self) -> None:
        """Drop the connection without a goodbye (fault injection)."""
        self.drop()

    def _handle_events(self, events: list[Any]) -> None:
        if self.silenced:
            return
        for event in events:
            if isinstance(event, BinaryMessage):
                self._handle_messages([event.data])
            elif isinstance(event, TextMessage):
                self.fail("the service protocol is binary; got a text frame")
            elif isinstance(event, CloseReceived):
                self._leave("it shut down" if not self.accepting else "it closed the connection",
                            expected=True)

    #: A text frame is an error here, which the full path reports.
    _TEXT_MESSAGES = False

    def _handle_messages(self, messages: list[bytes]) -> None:
        if self.silenced:
            return
        parser = self._parser
        clients = self.clients
        for data in messages:
            if self.state >= ConnState.CLOSING:
                return
            try:
                parser.receive_data(data)
                items = parser.items_received()
            except RemoteProtocolError as exc:
                self.fail(f"malformed service message: {exc}")
                return
            for message in items:
                if self.state is not ConnState.OPEN:
                    if self.state >= ConnState.CLOSING:
                        return
                    if type(message) is tuple:  # data before the handshake
                        message = (service.ConnectionDataMessage(*message) if len(message) == 2
                                   else service.UserDataMessage(message[1], message[2]))
                elif type(message) is tuple:  # the hot paths
                    if len(message) == 2:  # ConnectionData (connection id, payload)
                        client = clients.get(message[0])
                        if client is not None:
                            client.server_data(message[1])
                    else:  # UserData (8, user id, payloads)
                        self.ops.send_payloads_to_user(self.hub, message[1], message[2])
                    continue
                self._dispatch(message)

    def _dispatch(self, message: Any) -> None:
        if self.state is ConnState.HANDSHAKE:
            self._handshake(message)
            return
        kind = type(message)
        handler = _HANDLERS.get(kind)
        if handler is not None:
            handler(self, message)
        elif kind in OPERATION_MESSAGES:
            result = self.ops.perform(self.hub, message)
            if kind in _REPORTS_MISSING:
                if not result:
                    self._not_existed(message.connection_id)
            elif kind not in _UNACKED:
                self._ack(message.ack_id, bool(result))

    def _handshake(self, message: Any) -> None:
        try:
            answer = answer_service_handshake(message)
        except RemoteProtocolError as exc:
            self.fail(str(exc))
            return
        self.send(answer)
        if not answer.succeeded:
            self._leave("unsupported version")
            self._send_close_frame(CloseCode.NORMAL_CLOSURE)
            self._start_close_timer()
            return
        self.connection_type = message.connection_type
        self.state = ConnState.OPEN
        self.ops.server_opened(self)
        self._joined()
        self.send(service.ServicePing.of(self.ops.hub_metrics(self.hub)))

    # -- messages ------------------------------------------------------------------------------

    def _not_existed(self, connection_id: str) -> None:
        """An operation without an ack named an unknown connection: say so (ServiceEvent)."""
        self.send(service.ServiceEventMessage(
            service.ServiceEventObjectType.CONNECTION, connection_id,
            service.ServiceEventKind.NOT_EXISTED, f"connection '{connection_id}' does not exist"))

    def _ack(self, ack_id: int, ok: bool, message: str = "") -> None:
        status = service.AckStatus.OK if ok else service.AckStatus.NOT_FOUND
        self.send(service.ServiceAckMessage(ack_id, status, message))

    def _on_ping(self, ping: service.ServicePing) -> None:
        status = ping.get(service.PingKey.STATUS)
        if status is not None:
            self.send(
                service.ServicePing.of(
                    {
                        service.PingKey.STATUS: "1" if self.ops.hub_has_clients(self.hub) else "0",
                        **self.ops.hub_metrics(self.hub),
                    }
                )
            )
        elif ping.get(service.PingKey.SERVERS) is not None:
            self.send(
                service.ServicePing.servers_reply(
                    int(trio.current_time() * 1000), self.ops.server_ids(self.hub)
                )
            )
        shutdown = ping.get(service.PingKey.SHUTDOWN)
        if shutdown is not None and shutdown.startswith("fin"):
            self.accepting = False
            self.send(service.ServicePing.of({service.PingKey.SHUTDOWN: service.PingKey.FIN_ACK}))

    def _on_connection_data(self, message: service.ConnectionDataMessage) -> None:
        client = self.clients.get(message.connection_id)
        if client is not None:
            client.server_data(message.payload)

    def _on_close_connection(self, message: service.CloseConnectionMessage) -> None:
        client = self.clients.pop(message.connection_id, None)
        if client is not None:
            self.ops.invocations.client_gone(client)
            client.close_from_server(message.error_message or None)
        else:  # a client of another server connection: close it as an operation
            self.ops.close_connection(self.hub, message.connection_id,
                                      message.error_message or None)

    def _on_client_invocation(self, m: service.ClientInvocationMessage) -> None:
        self.ops.invocations.invoke(self, m)

    def _on_client_completion(
            self, m: service.ClientCompletionMessage | service.ErrorCompletionMessage) -> None:
        self.ops.invocations.complete(self, m)


_S = ServerConnection
#: The messages this connection answers itself; the other operations go to ``Operations``.
_HANDLERS: dict[type, Any] = {
    service.ServicePing: _S._on_ping,
    service.ConnectionDataMessage: _S._on_connection_data,
    service.CloseConnectionMessage: _S._on_close_connection,
    service.ClientInvocationMessage: _S._on_client_invocation,
    service.ClientCompletionMessage: _S._on_client_completion,
    service.ErrorCompletionMessage: _S._on_client_completion,
}
#: Operations without an ack that say so when their connection does not exist (ServiceEvent).
_REPORTS_MISSING = frozenset({service.JoinGroupMessage, service.LeaveGroupMessage})
#: Operations answered with nothing: the sends and the user-group changes without an ack.
_UNACKED = frozenset(m for m in OPERATION_MESSAGES if not m.__name__.endswith("WithAckMessage"))
