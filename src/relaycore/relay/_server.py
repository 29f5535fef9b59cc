"""One app-server connection: the Azure SignalR service protocol over a binary WebSocket.

Theory of operation
-------------------
An app server (the relaycore SDK, or Microsoft's) opens ``GET /server/?hub=H`` and sends a
stream of varint-prefixed MessagePack arrays; a message may span WebSocket frames and a frame
may hold several (service-protocol §1). The first message must be the handshake (§3.3); the
relay answers it and the connection becomes OPEN:

* **Default** and **OnDemand** connections carry clients: a new client of hub H is bound to one
  of them (``Relay.choose_server``), which gets ``OpenConnection`` and then the client's bytes,
  handshake first, as ``ConnectionData``; what the hub writes back goes to the client as is.
* **Weak** connections (secondary endpoints, management clients) never carry clients; they only
  send fan-out, group and close operations.

Everything a server sends on one connection is handled in order (§7: an ack-able operation
follows the sends before it). Operations that want an answer get a ``ServiceAck`` on the same
connection. A malformed message closes this connection with a ``ServiceError`` saying why; its
clients get a Close message with ``allowReconnect`` (they come back through another app server),
never silence. The relay pings every ``server_keep_alive_interval`` with the hub's metrics
(§4.4) and drops a server connection that sent nothing for ``server_timeout``.
"""

from __future__ import annotations

import collections
import logging
from typing import TYPE_CHECKING, Any

import trio

from ..protocol._errors import RemoteProtocolError
from ..protocol._service import (
    ASRS_INSTANCE_ID_HEADER,
    SERVICE_PROTOCOL_VERSION,
    AckStatus,
    BroadcastDataMessage,
    CheckConnectionExistenceWithAckMessage,
    CheckGroupExistenceWithAckMessage,
    CheckUserExistenceWithAckMessage,
    CheckUserInGroupWithAckMessage,
    ClientCompletionMessage,
    ClientInvocationMessage,
    CloseConnectionMessage,
    CloseConnectionsWithAckMessage,
    CloseConnectionWithAckMessage,
    CloseGroupConnectionsWithAckMessage,
    CloseUserConnectionsWithAckMessage,
    ConnectionDataMessage,
    ConnectionType,
    ErrorCompletionMessage,
    GroupBroadcastDataMessage,
    JoinGroupMessage,
    JoinGroupWithAckMessage,
    LeaveGroupMessage,
    LeaveGroupWithAckMessage,
    MultiConnectionDataMessage,
    MultiGroupBroadcastDataMessage,
    MultiUserDataMessage,
    OpenConnectionMessage,
    PingKey,
    ServiceAckMessage,
    ServiceErrorMessage,
    ServiceEventKind,
    ServiceEventMessage,
    ServiceEventObjectType,
    ServiceHandshakeRequest,
    ServiceHandshakeResponse,
    ServicePing,
    ServiceProtocolParser,
    UserDataMessage,
    UserJoinGroupMessage,
    UserJoinGroupWithAckMessage,
    UserLeaveGroupMessage,
    UserLeaveGroupWithAckMessage,
    connection_data_prefix,
    write_connection_data,
    write_message,
)
from ..protocol._websocket import (
    BinaryMessage,
    CloseCode,
    CloseReceived,
    Opcode,
    TextMessage,
    frame,
)
from ._message import OutboundMessage
from ._peer import ConnState, Peer
from ._table import HubShard

if TYPE_CHECKING:
    from ._client import ClientConnection
    from ._relay import Relay

log = logging.getLogger("relaycore.relay.server")


def _type_name(value: int) -> str:
    """``default``, ``ondemand`` or ``weak``: a connection type as the log names it."""
    try:
        return ConnectionType(value).name.lower().replace("_", "")
    except ValueError:
        return f"type {value}"


#: Claims of a client token that are about the token itself, not the user (§6.2).
_SYSTEM_CLAIMS = frozenset(
    {"aud", "exp", "iat", "nbf", "iss", "jti", "nonce", "actort", "acr", "azp", "c_hash"}
)


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
        if key in _SYSTEM_CLAIMS:
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

    __slots__ = ("hub", "server_id", "connection_type", "accepting", "clients", "_parser",
                 "silenced")

    def __init__(
        self, relay: Relay, *, hub: str, server_id: str, now: float
    ) -> None:
        config = relay.config
        super().__init__(relay, max_message_size=config.max_service_message_size,
                         send_limit=config.server_send_buffer_limit, now=now)
        self.hub = hub
        self.server_id = server_id
        self.connection_type = ConnectionType.DEFAULT
        #: False after the server said it is leaving (``shutdown fin:*``): no new clients.
        self.accepting = True
        self.clients: dict[str, ClientConnection] = {}
        self._parser = ServiceProtocolParser(max_message_size=config.max_service_message_size,
                                             raw_connection_data=True,
                                             raw_user_data=True)
        #: Fault injection: while True nothing is sent or handled (a silent network).
        self.silenced = False

    @property
    def carries_clients(self) -> bool:
        return (
            self.state is ConnState.OPEN
            and self.accepting
            and self.connection_type != ConnectionType.WEAK
        )

    def send(self, message: Any) -> None:
        if self.silenced:
            return
        if self.state is ConnState.OPEN or isinstance(
            message, (ServiceHandshakeResponse, ServiceErrorMessage)
        ):
            self._push(frame(Opcode.BINARY, write_message(message)))

    # -- clients bound to this connection ------------------------------------------------------

    def client_opened(self, client: ClientConnection, handshake: bytes) -> None:
        headers: dict[str, list[str]] = {
            name: [value] for name, value in client.headers.items()
        }
        headers[ASRS_INSTANCE_ID_HEADER] = [self.relay.instance_id]
        client.headers = {}  # sent once, never needed again: idle connections are memory
        client.data_prefix = connection_data_prefix(client.id)
        self.clients[client.id] = client
        self.send(
            OpenConnectionMessage(
                client.id,
                _claims_for_server(client.claims),
                headers,
                client.query,
                protocol=client.protocol_name,
            )
        )
        self.client_data(client, handshake)

    def client_data(self, client: ClientConnection, data: bytes) -> None:
        """Forward a client's bytes as ``ConnectionData`` (written without building the
        message: this is every client message's path to its app server)."""
        if self.state is ConnState.OPEN and not self.silenced:
            self._push(frame(Opcode.BINARY, write_connection_data(client.data_prefix, data)))

    def client_closed(self, client: ClientConnection, error: str | None) -> None:
        if self.clients.pop(client.id, None) is not None:
            self.send(CloseConnectionMessage(client.id, error or ""))
            self.relay.invocations.client_gone(client)

    # -- timers --------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        config = self.relay.config
        if self.state is ConnState.HANDSHAKE:
            if now - self.created > config.handshake_timeout:
                self.fail("the service handshake did not arrive in time", broken=False)
        elif self.state is ConnState.OPEN:
            if now - self.last_receive > config.server_timeout:
                self.fail(f"the app server sent nothing for {config.server_timeout:g} seconds",
                          broken=False)
            elif now - self.last_send >= config.server_keep_alive_interval:
                self.send(ServicePing.of(self.relay.hub_metrics(self.hub)))

    # -- closing -------------------------------------------------------------------------------

    def fail(self, reason: str, *, broken: bool = True) -> None:
        """Close this server connection with a ServiceError saying why (``broken``: the app
        server broke the protocol, which is logged for each connection).

        While the relay drains, the close is 1001 Going Away without a ServiceError: the
        app server reconnects (elsewhere) and logs no error, as for any planned restart."""
        if self.state >= ConnState.CLOSING:
            return
        if self.relay._shutting_down:
            self._leave(reason, expected=True)
            self._send_close_frame(CloseCode.GOING_AWAY, reason)
        else:
            self.send(ServiceErrorMessage(reason))
            self._leave(reason, each=logging.WARNING if broken else logging.DEBUG)
            self._send_close_frame(CloseCode.NORMAL_CLOSURE, reason)
        self._start_close_timer()

    def _joined(self) -> None:
        """Log the app server's first connection of a type to this hub (INFO), the others
        at DEBUG: an app server opens several (five by default) at once."""
        same = [s for s in self.relay.servers_of(self.hub)
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
        left = sum(s.server_id == self.server_id for s in self.relay.servers_of(self.hub))
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
            self.relay._remove_server(self)
            self._left(reason or "closed", expected, each)
        if self.state < ConnState.CLOSING:
            self.state = ConnState.CLOSING
        clients, self.clients = self.clients, {}
        for client in clients.values():
            client.server = None
            client.close(
                "The app server connection of this client was closed; reconnect.",
                allow_reconnect=True,
            )

    def _ended(self) -> None:
        self._leave("the connection dropped without a WebSocket close")
        self.relay._forget(self)

    def _on_protocol_error(self, reason: str, code: int | None) -> None:
        self._leave(f"WebSocket protocol error: {reason}", each=logging.WARNING)
        self._start_close_timer()

    def _overflow(self, size: int) -> None:
        """The app server stopped reading (its clients' messages piled up past
        ``server_send_buffer_limit``): drop what waits, close with a ServiceError first."""
        dropped = self.drop_backlog() + size
        stats = self.relay.stats
        stats.server_slow_closes += 1
        stats.server_dropped_bytes += dropped
        reason = (f"the app server did not read: more than {self._limit} bytes were queued "
                  f"for this connection ({dropped} dropped)")
        self._leave(reason, each=logging.WARNING)
        self._push(frame(Opcode.BINARY, write_message(ServiceErrorMessage(reason))))
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
                        message = (ConnectionDataMessage(*message) if len(message) == 2
                                   else UserDataMessage(message[1], message[2]))
                elif type(message) is tuple:  # the hot paths
                    if len(message) == 2:  # ConnectionData (connection id, payload)
                        client = clients.get(message[0])
                        if client is not None:
                            client.server_data(message[1])
                    else:  # UserData (8, user id, payloads)
                        self.relay._deliver_payloads(
                            self._shard().user_targets(message[1]), message[2])
                    continue
                self._dispatch(message)

    def _dispatch(self, message: Any) -> None:
        if self.state is ConnState.HANDSHAKE:
            self._handshake(message)
            return
        handler = _HANDLERS.get(type(message))
        if handler is not None:
            handler(self, message)

    def _handshake(self, message: Any) -> None:
        if not isinstance(message, ServiceHandshakeRequest):
            self.fail(f"expected a handshake request first, got {type(message).__name__}")
            return
        if message.version != SERVICE_PROTOCOL_VERSION:
            self.send(
                ServiceHandshakeResponse(
                    f"Protocol version {message.version} is not supported; this relay speaks "
                    f"version {SERVICE_PROTOCOL_VERSION}."
                )
            )
            self._leave("unsupported version")
            self._send_close_frame(CloseCode.NORMAL_CLOSURE)
            self._start_close_timer()
            return
        self.connection_type = message.connection_type
        self.send(ServiceHandshakeResponse())
        self.relay._add_server(self)
        self._joined()
        self.send(ServicePing.of(self.relay.hub_metrics(self.hub)))

    # -- messages ------------------------------------------------------------------------------

    def _not_existed(self, connection_id: str) -> None:
        """An operation without an ack named an unknown connection: say so (ServiceEvent)."""
        self.send(ServiceEventMessage(ServiceEventObjectType.CONNECTION, connection_id,
                                      ServiceEventKind.NOT_EXISTED,
                                      f"connection '{connection_id}' does not exist"))

    def _ack(self, ack_id: int, ok: bool, message: str = "") -> None:
        self.send(ServiceAckMessage(ack_id, AckStatus.OK if ok else AckStatus.NOT_FOUND, message))

    def _hub_has_clients(self) -> bool:
        """The ``status`` answer: whether this hub still has clients on this relay, whichever
        app server they are bound to. An app server removing this endpoint waits for "0", so
        it keeps sending here until no client of the hub could miss its messages."""
        shard = self._shard()
        return bool(shard.connections) or any(s.clients for s in shard.servers)

    def _on_ping(self, ping: ServicePing) -> None:
        status = ping.get(PingKey.STATUS)
        if status is not None:
            self.send(
                ServicePing.of(
                    {
                        PingKey.STATUS: "1" if self._hub_has_clients() else "0",
                        **self.relay.hub_metrics(self.hub),
                    }
                )
            )
        elif ping.get(PingKey.SERVERS) is not None:
            self.send(
                ServicePing.servers_reply(
                    int(trio.current_time() * 1000), self.relay.server_ids(self.hub)
                )
            )
        shutdown = ping.get(PingKey.SHUTDOWN)
        if shutdown is not None and shutdown.startswith("fin"):
            self.accepting = False
            self.send(ServicePing.of({PingKey.SHUTDOWN: PingKey.FIN_ACK}))

    def _on_connection_data(self, message: ConnectionDataMessage) -> None:
        client = self.clients.get(message.connection_id)
        if client is not None:
            client.server_data(message.payload)

    def _on_close_connection(self, message: CloseConnectionMessage) -> None:
        client = self.clients.pop(message.connection_id, None)
        if client is not None:
            self.relay.invocations.client_gone(client)
            client.close_from_server(message.error_message or None)
        else:  # a client of another server connection: close it as an operation
            conn = self.relay._connection(self.hub, message.connection_id)
            self.relay._close_each(() if conn is None else (conn,),
                                   message.error_message or None)

    def _send(self, targets: Any, payloads: dict[str, bytes]) -> None:
        self.relay._deliver(targets, OutboundMessage(payloads=payloads))

    def _shard(self) -> HubShard:
        """This hub's shard, for reading (empty when the hub has nothing)."""
        return self.relay.table.view(self.hub)

    def _on_broadcast(self, m: BroadcastDataMessage) -> None:
        self._send(self._shard().all_targets(m.excluded_connection_ids), m.payloads)

    def _on_multi_connection(self, m: MultiConnectionDataMessage) -> None:
        connections = self._shard().connections
        found = (connections.get(c) for c in dict.fromkeys(m.connection_ids))
        self._send([c for c in found if c is not None], m.payloads)

    def _on_user(self, m: UserDataMessage) -> None:
        self._send(self._shard().user_targets(m.user_id), m.payloads)

    def _on_multi_user(self, m: MultiUserDataMessage) -> None:
        shard = self._shard()
        targets = {c.id: c for u in m.user_ids for c in shard.user_targets(u)}
        self._send(targets.values(), m.payloads)

    def _on_group(self, m: GroupBroadcastDataMessage) -> None:
        targets = self._shard().group_targets(m.group_name, m.excluded_connection_ids)
        if m.excluded_user_ids:
            users = set(m.excluded_user_ids)
            targets = (c for c in targets if c.user_id not in users)
        self._send(targets, m.payloads)

    def _on_multi_group(self, m: MultiGroupBroadcastDataMessage) -> None:
        shard = self._shard()
        targets = {c.id: c for g in m.group_names for c in shard.group_targets(g)}
        self._send(targets.values(), m.payloads)

    def _join(self, connection_id: str, group: str) -> bool:
        conn = self.relay._connection(self.hub, connection_id)
        if conn is None:
            return False
        self.relay.table.shard(self.hub).join(conn, group)
        return True

    def _leave_group(self, connection_id: str, group: str | None) -> bool:
        conn = self.relay._connection(self.hub, connection_id)
        if conn is None:
            return False
        shard = self.relay.table.shard(self.hub)
        if group is None:
            shard.leave_all(conn)
        else:
            shard.leave(conn, group)
        return True

    def _user_join(self, user_id: str, group: str, ttl: int | None) -> None:
        self.relay.table.shard(self.hub).add_user_to_group(
            user_id, group, None if ttl is None else float(ttl), self.relay.now()
        )

    def _user_leave(self, user_id: str, group: str | None) -> None:
        shard = self.relay.table.get(self.hub)
        if shard is None:
            return
        if group is None:
            shard.remove_user_from_all_groups(user_id)
        else:
            shard.remove_user_from_group(user_id, group)
        self.relay.table.prune(self.hub)

    def _on_client_invocation(self, m: ClientInvocationMessage) -> None:
        self.relay.invocations.invoke(self, m)

    def _on_client_completion(self, m: ClientCompletionMessage | ErrorCompletionMessage) -> None:
        self.relay.invocations.complete(self, m)


def _close_connections(s: ServerConnection, m: CloseConnectionsWithAckMessage) -> None:
    s.relay._close_each(s._shard().all_targets(m.excluded_connection_ids), m.reason)
    s._ack(m.ack_id, True)


def _close_user(s: ServerConnection, m: CloseUserConnectionsWithAckMessage) -> None:
    excluded = set(m.excluded_connection_ids)
    targets = [c for c in s._shard().user_targets(m.user_id) if c.id not in excluded]
    s.relay._close_each(targets, m.reason)
    s._ack(m.ack_id, True)


def _close_group(s: ServerConnection, m: CloseGroupConnectionsWithAckMessage) -> None:
    s.relay._close_each(s._shard().group_targets(m.group_name, m.excluded_connection_ids), m.reason)
    s._ack(m.ack_id, True)


def _close_one(s: ServerConnection, m: CloseConnectionWithAckMessage) -> None:
    conn = s.relay._connection(s.hub, m.connection_id)
    s.relay._close_each(() if conn is None else (conn,), m.reason)
    s._ack(m.ack_id, conn is not None)


def _shard_has(s: ServerConnection, index: str, key: str) -> bool:
    return key in getattr(s._shard(), index)


_S = ServerConnection
_HANDLERS: dict[type, Any] = {
    ServicePing: _S._on_ping,
    ConnectionDataMessage: _S._on_connection_data,
    CloseConnectionMessage: _S._on_close_connection,
    BroadcastDataMessage: _S._on_broadcast,
    MultiConnectionDataMessage: _S._on_multi_connection,
    UserDataMessage: _S._on_user,
    MultiUserDataMessage: _S._on_multi_user,
    GroupBroadcastDataMessage: _S._on_group,
    MultiGroupBroadcastDataMessage: _S._on_multi_group,
    JoinGroupMessage: lambda s, m: s._join(m.connection_id, m.group_name)
    or s._not_existed(m.connection_id),
    LeaveGroupMessage: lambda s, m: s._leave_group(m.connection_id, m.group_name)
    or s._not_existed(m.connection_id),
    JoinGroupWithAckMessage: lambda s, m: s._ack(m.ack_id, s._join(m.connection_id, m.group_name)),
    LeaveGroupWithAckMessage: lambda s, m: s._ack(
        m.ack_id, s._leave_group(m.connection_id, m.group_name)
    ),
    UserJoinGroupMessage: lambda s, m: s._user_join(m.user_id, m.group_name, m.ttl),
    UserLeaveGroupMessage: lambda s, m: s._user_leave(m.user_id, m.group_name),
    UserJoinGroupWithAckMessage: lambda s, m: (
        s._user_join(m.user_id, m.group_name, m.ttl),
        s._ack(m.ack_id, True),
    ),
    UserLeaveGroupWithAckMessage: lambda s, m: (
        s._user_leave(m.user_id, m.group_name),
        s._ack(m.ack_id, True),
    ),
    CheckUserInGroupWithAckMessage: lambda s, m: s._ack(
        m.ack_id,
        s._shard().user_in_group(m.user_id, m.group_name, s.relay.now()),
    ),
    CheckGroupExistenceWithAckMessage: lambda s, m: s._ack(
        m.ack_id, _shard_has(s, "groups", m.group_name)
    ),
    CheckConnectionExistenceWithAckMessage: lambda s, m: s._ack(
        m.ack_id, _shard_has(s, "connections", m.connection_id)
    ),
    CheckUserExistenceWithAckMessage: lambda s, m: s._ack(
        m.ack_id, _shard_has(s, "users", m.user_id)
    ),
    CloseConnectionWithAckMessage: _close_one,
    CloseConnectionsWithAckMessage: _close_connections,
    CloseUserConnectionsWithAckMessage: _close_user,
    CloseGroupConnectionsWithAckMessage: _close_group,
    ClientInvocationMessage: _S._on_client_invocation,
    ClientCompletionMessage: _S._on_client_completion,
    ErrorCompletionMessage: _S._on_client_completion,
}


class ClientInvocations:
    """Client results across app servers (§2.5): which server asked, for which client.

    The caller server sends ClientInvocation; the relay writes the payload to the client and,
    when another server owns the client, tells that server (it routes the client's completion).
    The owner answers with ClientCompletion or ErrorCompletion, which goes to a connection of
    the caller server. A client that leaves first gets its pending invocations failed.
    """

    #: How long the relay keeps a pending client invocation (§2.5: at most 10 minutes).
    TIMEOUT = 600.0

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        #: invocation id -> (hub, caller server id, client connection id, expiry time)
        self.pending: dict[str, tuple[str, str, str, float]] = {}
        #: (hub, client connection id) -> how many of ``pending`` it has
        self._per_client: collections.Counter[tuple[str, str]] = collections.Counter()

    def invoke(self, caller: ServerConnection, m: ClientInvocationMessage) -> None:
        client = self.relay._connection(caller.hub, m.connection_id)
        if client is None:
            caller.send(
                ErrorCompletionMessage(
                    m.invocation_id,
                    m.connection_id,
                    m.caller_server_id,
                    f"Connection '{m.connection_id}' does not exist.",
                )
            )
            return
        limit = self.relay.config.max_pending_invocations
        key = (caller.hub, m.connection_id)
        if self._per_client[key] >= limit or m.invocation_id in self.pending:
            self.relay.stats.invocations_refused += 1
            caller.send(ErrorCompletionMessage(
                m.invocation_id, m.connection_id, m.caller_server_id,
                f"Connection '{m.connection_id}' has {limit} client invocations waiting "
                "already." if m.invocation_id not in self.pending
                else f"Invocation '{m.invocation_id}' is already waiting."))
            return
        self._per_client[key] += 1
        self.pending[m.invocation_id] = (caller.hub, m.caller_server_id, m.connection_id,
                                         self.relay.now() + self.TIMEOUT)
        self.relay._deliver((client,), OutboundMessage(payloads=m.payloads))
        owner = client.server
        if owner is not None and owner.server_id != m.caller_server_id:
            owner.send(m)

    def complete(
        self, sender: ServerConnection, m: ClientCompletionMessage | ErrorCompletionMessage
    ) -> None:
        entry = self.pending.pop(m.invocation_id, None)
        if entry is not None:
            self._forget(entry[0], entry[2])
        if entry is None or sender.server_id == entry[1]:
            return  # unknown, or the caller cleaning up after itself
        self._to_caller(entry[0], entry[1], m)

    def client_gone(self, client: ClientConnection) -> None:
        self._fail(lambda hub, conn_id, expiry: conn_id == client.id and hub == client.hub,
                   "Connection '{}' disconnected.")

    def expire(self, now: float) -> None:
        self._fail(lambda hub, conn_id, expiry: expiry <= now,
                   "The client invocation on connection '{}' timed out.")

    def _fail(self, which: Any, error: str) -> None:
        if not self.pending:
            return
        for invocation_id, (hub, caller_id, conn_id, expiry) in list(self.pending.items()):
            if which(hub, conn_id, expiry):
                del self.pending[invocation_id]
                self._forget(hub, conn_id)
                self._to_caller(hub, caller_id, ErrorCompletionMessage(
                    invocation_id, conn_id, caller_id, error.format(conn_id)))

    def _forget(self, hub: str, connection_id: str) -> None:
        key = (hub, connection_id)
        self._per_client[key] -= 1
        if self._per_client[key] <= 0:
            del self._per_client[key]

    def _to_caller(self, hub: str, caller_id: str, message: Any) -> None:
        for server in self.relay.servers_of(hub):
            if server.server_id == caller_id:
                server.send(message)
                return
