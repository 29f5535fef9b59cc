"""Every operation of the relay, written once: the REST API, the service protocol, the upstream
and the library API all call these, and nothing else touches the connection table.

Theory of operation
-------------------
``Operations`` holds the connection table, the fan-out's flusher, the counters and the
backplane. Each operation is synchronous (it never awaits: a send queues frames, which the
flusher writes once the caller yields) and returns what happened: how many connections a send
reached, whether a connection existed, how many connections a close reached. A face only turns
its wire's request into a call and the result into its wire's answer.

An operation is applied to this node's connections and then, when other nodes may hold some of
its targets, handed to the backplane as the service-protocol message that encodes it (see
``_backplane``). An operation that arrives from another node goes through ``apply``, which
runs the same code without publishing it again. The service-protocol face hands the messages it
receives to ``perform``, which is ``apply`` plus publishing: one table (``_BY_MESSAGE``) says
what each message does, for both.

Sessions (client connections) and server links (app-server connections) are seen through the
small protocols below, so this floor imports no face.
"""

from __future__ import annotations

import collections
import logging
import secrets
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any, Protocol

from ..protocol import _service as service
from ..protocol._hub import InvocationMessage, StreamInvocationMessage
from ._backplane import Backplane
from ._config import RelayConfig
from ._message import OutboundMessage, fan_out, queue_payloads
from ._peer import ConnState, Flusher
from ._stats import RelayStats
from ._table import ConnectionTable

log = logging.getLogger("relaycore.relay")


class Session(Protocol):
    """A client connection as the operations see it (``_session.ClientSession``)."""

    id: str
    hub: str
    user_id: str | None
    protocol_name: str
    groups: set[str]
    state: ConnState
    server: Any

    def enqueue(self, data: bytes) -> bool: ...

    def close(self, reason: str | None = None, *, allow_reconnect: bool = False) -> None: ...


class ServerLink(Protocol):
    """An app-server connection as the operations see it (``_server.ServerConnection``)."""

    hub: str
    server_id: str
    clients: dict[str, Any]

    @property
    def carries_clients(self) -> bool: ...

    def send(self, message: Any) -> None: ...


class Serverless(Protocol):
    """Where a hub without app servers sends its clients' events (``_upstream.Upstream``)."""

    def connected(self, conn: Any) -> None: ...

    def disconnected(self, conn: Any, error: str | None) -> None: ...

    def invoke(self, conn: Any, target: str, invocation_id: str | None, body: bytes) -> bool: ...


class _NoUpstream:
    def connected(self, conn: Any) -> None:
        pass

    def disconnected(self, conn: Any, error: str | None) -> None:
        pass

    def invoke(self, conn: Any, target: str, invocation_id: str | None, body: bytes) -> bool:
        return False


class Operations:
    """The relay's operations on one node (see the module's docstring)."""

    def __init__(self, config: RelayConfig, stats: RelayStats, flusher: Flusher,
                 backplane: Backplane, clock: Callable[[], float]) -> None:
        self.config = config
        self.stats = stats
        # A backplane that publishes is told what this node starts and stops holding.
        self.table = ConnectionTable(backplane.interest if backplane.publishes else None)
        self.flusher = flusher
        self.backplane = backplane
        self.now = clock
        #: The serverless hubs' upstream (set by the relay when it has one).
        self.serverless: Serverless = _NoUpstream()
        self.invocations = ClientInvocations(self)
        backplane.on_node_gone = self._node_gone
        #: clients of other nodes served by an app server of this node, by connection id
        self.forwarded: dict[str, ForwardedClient] = {}
        #: clients of this node served by an app server of another node, by connection id
        self.served_elsewhere: dict[str, Any] = {}
        #: (hub, node) -> what stands for that node's app servers of the hub here
        self._remote_servers: dict[tuple[str, str], RemoteServer] = {}
        #: the hubs this node has said it has an app server of that takes clients
        self._serving: set[str] = set()
        #: Set while the relay drains: no new clients, app servers are told "going away".
        self.draining = False
        #: This node's id, as ``Asrs-Instance-Id`` tells app servers (service-protocol §6.2).
        self.instance_id = ""

    def new_connection_id(self) -> str:
        """A new client's connection id: unguessable (it is what a client reconnects with);
        a backplane may make it name this node too, so that a send to it needs no look-up."""
        return self.backplane.connection_id_prefix + secrets.token_urlsafe(16)

    # -- looking up ----------------------------------------------------------------------------

    def connection(self, hub: str, connection_id: str) -> Any:
        """This node's connection ``connection_id`` of ``hub``, or None."""
        return self.table.view(hub).connections.get(connection_id)

    def connection_exists(self, hub: str, connection_id: str) -> bool:
        return (connection_id in self.table.view(hub).connections
                or self.backplane.holds(hub, "connection", connection_id))

    def user_exists(self, hub: str, user_id: str) -> bool:
        return user_id in self.table.view(hub).users or self.backplane.holds(hub, "user", user_id)

    def group_exists(self, hub: str, group: str) -> bool:
        return group in self.table.view(hub).groups or self.backplane.holds(hub, "group", group)

    def user_in_group(self, hub: str, group: str, user_id: str) -> bool:
        return self.table.view(hub).user_in_group(user_id, group, self.now())

    # -- sending -------------------------------------------------------------------------------

    def _deliver(self, targets: Iterable[Any], message: OutboundMessage) -> int:
        reached = fan_out(targets, message, self.flusher, self.config.send_buffer_limit)
        self.stats.messages_sent += 1
        self.stats.deliveries += reached
        return reached

    def _publish(self, hub: str, operation: Any) -> None:
        self.backplane.publish(hub, operation)

    def send_to_all(self, hub: str, message: OutboundMessage,
                    excluded: Collection[str] = (), *, publish: bool = True) -> int:
        """Send to every connection of ``hub`` but ``excluded``; returns how many it reached."""
        reached = self._deliver(self.table.view(hub).all_targets(excluded), message)
        if publish and self.backplane.publishes:
            self._publish(hub, service.BroadcastDataMessage(message.payload_map(), list(excluded)))
        return reached

    def send_to_connection(self, hub: str, connection_id: str, message: OutboundMessage,
                           *, publish: bool = True) -> int:
        conn = self.connection(hub, connection_id)
        if conn is not None:
            return self._deliver((conn,), message)
        if publish and self.backplane.holds(hub, "connection", connection_id):
            self._publish(hub, service.MultiConnectionDataMessage(
                [connection_id], message.payload_map()))
        return 0

    def send_to_connections(self, hub: str, connection_ids: Iterable[str],
                            message: OutboundMessage, *, publish: bool = True) -> int:
        connections = self.table.view(hub).connections
        ids = list(dict.fromkeys(connection_ids))
        found = [c for c in map(connections.get, ids) if c is not None]
        reached = self._deliver(found, message)
        if publish and self.backplane.publishes and len(found) < len(ids):
            missing = [i for i in ids if i not in connections]
            self._publish(hub, service.MultiConnectionDataMessage(missing, message.payload_map()))
        return reached

    def send_to_user(self, hub: str, user_id: str, message: OutboundMessage,
                     *, publish: bool = True) -> int:
        reached = self._deliver(self.table.view(hub).user_targets(user_id), message)
        if publish and self.backplane.publishes:
            self._publish(hub, service.UserDataMessage(user_id, message.payload_map()))
        return reached

    def send_payloads_to_user(self, hub: str, user_id: str, payloads: dict[str, bytes]) -> int:
        """``send_to_user`` for an app server's payload map whose keys are already the
        lower-case protocol names (the service parser's raw ``UserData``): no message object,
        each payload framed once for the user's few connections."""
        reached = queue_payloads(self.table.view(hub).user_targets(user_id), payloads)
        self.stats.messages_sent += 1
        self.stats.deliveries += reached
        if self.backplane.publishes:
            self._publish(hub, service.UserDataMessage(user_id, payloads))
        return reached

    def _send_to_each(self, hub: str, keys: list[str], targets_of: Callable[[str], Any],
                      message: OutboundMessage, encoded: Any) -> int:
        """Send once to the union of ``targets_of(key)`` for every key (a connection in two
        of the groups gets the message once); ``encoded`` is the service message class that
        carries the operation to other nodes (``None``: do not publish)."""
        targets = {c.id: c for key in keys for c in targets_of(key)}
        reached = self._deliver(targets.values(), message)
        if encoded is not None and self.backplane.publishes:
            self._publish(hub, encoded(keys, message.payload_map()))
        return reached

    def send_to_users(self, hub: str, user_ids: Iterable[str], message: OutboundMessage,
                      *, publish: bool = True) -> int:
        return self._send_to_each(hub, list(user_ids), self.table.view(hub).user_targets,
                                  message, service.MultiUserDataMessage if publish else None)

    def send_to_group(self, hub: str, group: str, message: OutboundMessage,
                      excluded: Collection[str] = (), excluded_users: Collection[str] = (),
                      *, publish: bool = True) -> int:
        targets: Iterable[Any] = self.table.view(hub).group_targets(group, excluded)
        if excluded_users:
            users = set(excluded_users)
            targets = (c for c in targets if c.user_id not in users)
        reached = self._deliver(targets, message)
        if publish and self.backplane.publishes:
            self._publish(hub, service.GroupBroadcastDataMessage(
                group, message.payload_map(), list(excluded), list(excluded_users)))
        return reached

    def send_to_groups(self, hub: str, groups: Iterable[str], message: OutboundMessage,
                       *, publish: bool = True) -> int:
        return self._send_to_each(
            hub, list(groups), self.table.view(hub).group_targets, message,
            service.MultiGroupBroadcastDataMessage if publish else None)

    # -- groups --------------------------------------------------------------------------------

    def _on_connection(self, hub: str, connection_id: str, here: Callable[[Any], Any],
                       elsewhere: Callable[[], Any] | None) -> bool:
        """Do ``here(connection)`` when this node holds the connection; else, when another
        node holds it, publish ``elsewhere()`` (the message that does it there; ``None``: do
        not publish). False when no node holds it."""
        conn = self.connection(hub, connection_id)
        if conn is not None:
            here(conn)
            return True
        if elsewhere is not None and self.backplane.holds(hub, "connection", connection_id):
            self._publish(hub, elsewhere())
            return True
        return False

    def add_connection_to_group(self, hub: str, group: str, connection_id: str,
                                *, publish: bool = True) -> bool:
        """False when the connection does not exist (on any node)."""
        return self._on_connection(
            hub, connection_id, lambda conn: self.table.shard(hub).join(conn, group),
            (lambda: service.JoinGroupMessage(connection_id, group)) if publish else None)

    def remove_connection_from_group(self, hub: str, group: str | None, connection_id: str,
                                     *, publish: bool = True) -> bool:
        """Leave ``group`` (every group when None); False when the connection does not
        exist."""
        def here(conn: Any) -> None:
            shard = self.table.shard(hub)
            if group is None:
                shard.leave_all(conn)
            else:
                shard.leave(conn, group)

        return self._on_connection(
            hub, connection_id, here,
            (lambda: service.LeaveGroupMessage(connection_id, group)) if publish else None)

    def add_user_to_group(self, hub: str, group: str, user_id: str, ttl: float | None = None,
                          *, publish: bool = True) -> None:
        """Add the user's connections, and unless ``ttl == 0`` its later ones, for ``ttl``
        seconds (None: the longest a membership lasts)."""
        self.table.shard(hub).add_user_to_group(user_id, group, ttl, self.now())
        if publish and self.backplane.publishes:
            self._publish(hub, service.UserJoinGroupMessage(
                user_id, group, None if ttl is None else int(ttl)))

    def remove_user_from_group(self, hub: str, group: str | None, user_id: str,
                               *, publish: bool = True) -> None:
        """End the user's membership of ``group`` (of every group when None)."""
        shard = self.table.get(hub)
        if shard is not None:
            if group is None:
                shard.remove_user_from_all_groups(user_id)
            else:
                shard.remove_user_from_group(user_id, group)
            self.table.prune(hub)
        if publish and self.backplane.publishes:
            self._publish(hub, service.UserLeaveGroupMessage(user_id, group))

    # -- closing -------------------------------------------------------------------------------

    @staticmethod
    def _close_each(targets: Iterable[Any], reason: str | None) -> int:
        """A Close message with the reason and ``allowReconnect`` (as Microsoft's emulator
        does; the app's negotiate decides whether the client may come back)."""
        count = 0
        for conn in list(targets):
            conn.close(reason, allow_reconnect=True)
            count += 1
        return count

    def close_connection(self, hub: str, connection_id: str, reason: str | None = None,
                         *, publish: bool = True) -> bool:
        return self._on_connection(
            hub, connection_id, lambda conn: self._close_each((conn,), reason),
            (lambda: service.CloseConnectionWithAckMessage(connection_id, 0, reason))
            if publish else None)

    def close_all_connections(self, hub: str, reason: str | None = None,
                              excluded: Collection[str] = (), *, publish: bool = True) -> int:
        closed = self._close_each(self.table.view(hub).all_targets(excluded), reason)
        if publish and self.backplane.publishes:
            self._publish(hub, service.CloseConnectionsWithAckMessage(0, reason, list(excluded)))
        return closed

    def close_user_connections(self, hub: str, user_id: str, reason: str | None = None,
                               excluded: Collection[str] = (), *, publish: bool = True) -> int:
        skip = set(excluded)
        closed = self._close_each(
            [c for c in self.table.view(hub).user_targets(user_id) if c.id not in skip], reason)
        if publish and self.backplane.publishes:
            self._publish(hub, service.CloseUserConnectionsWithAckMessage(
                user_id, 0, reason, list(excluded)))
        return closed

    def close_group_connections(self, hub: str, group: str, reason: str | None = None,
                                excluded: Collection[str] = (), *, publish: bool = True) -> int:
        closed = self._close_each(self.table.view(hub).group_targets(group, excluded), reason)
        if publish and self.backplane.publishes:
            self._publish(hub, service.CloseGroupConnectionsWithAckMessage(
                group, 0, reason, list(excluded)))
        return closed

    # -- service-protocol messages ------------------------------------------------------------

    def perform(self, hub: str, message: Any) -> Any:
        """Do what a service-protocol operation message says (from an app server of this
        node) and publish it; returns the operation's result (what an ack reports)."""
        return _BY_MESSAGE[type(message)](self, hub, message, True)

    def apply(self, hub: str, message: Any) -> Any:
        """Do what an operation published by another node says, on this node only."""
        kind = type(message)
        if kind in _FORWARDED and (self._forwarded_message(hub, message)
                                   or kind not in _BY_MESSAGE):
            return None
        if kind is service.ClientInvocationMessage:
            return self.invocations.invoke_published(hub, message)
        if kind is service.ClientCompletionMessage or kind is service.ErrorCompletionMessage:
            return self.invocations.complete_published(hub, message)
        return _BY_MESSAGE[kind](self, hub, message, False)

    # -- connections and app servers -----------------------------------------------------------

    def connection_opened(self, conn: Session) -> None:
        """A client finished its handshake: it is routable from now on."""
        conn.state = ConnState.OPEN
        self.table.shard(conn.hub).add(conn, self.now())
        self.stats.connections_opened += 1
        if conn.server is None:
            self.serverless.connected(conn)
        log.debug("connection %s opened on hub %s (user %s)", conn.id, conn.hub, conn.user_id)

    def connection_closed(self, conn: Session, reason: str | None) -> None:
        """An open client left (it is no longer routable)."""
        self.table.shard(conn.hub).remove(conn)
        self.table.prune(conn.hub)
        if self.invocations.pending:  # a client served here, or invoked from another node
            self.invocations.client_gone(conn)
        if conn.server is None:
            self.serverless.disconnected(conn, reason)
        self.stats.connections_closed += 1

    def client_invocation(self, conn: Session,
                          message: InvocationMessage | StreamInvocationMessage,
                          body: bytes) -> bool:
        """A serverless client invoked a hub method: it goes to the matching upstream; False
        when none takes it (the session then answers with a completion error)."""
        return self.serverless.invoke(conn, message.target, message.invocation_id, body)

    def server_opened(self, server: ServerLink) -> None:
        self.table.shard(server.hub).servers.append(server)
        if self.backplane.publishes:
            self._tell_serving(server.hub)

    def server_closed(self, server: ServerLink) -> None:
        shard = self.table.get(server.hub)
        if shard is not None and server in shard.servers:
            shard.servers.remove(server)
            if self.backplane.publishes:
                self._tell_serving(server.hub)
            self.table.prune(server.hub)

    def _tell_serving(self, hub: str) -> None:
        """Tell the other nodes whether an app server here takes clients of ``hub`` (they
        send their clients of a hub that has none there)."""
        serving = any(s.carries_clients for s in self.table.view(hub).servers)
        if serving != (hub in self._serving):
            if serving:
                self._serving.add(hub)
            else:
                self._serving.discard(hub)
            self.backplane.interest(hub, "server", "", serving)

    def servers_of(self, hub: str) -> list[Any]:
        return self.table.view(hub).servers

    def server_ids(self, hub: str) -> list[str]:
        return sorted({s.server_id for s in self.servers_of(hub)})

    @property
    def serves_hubs_itself(self) -> bool:
        """Whether a hub without an app server is served by the relay (serverless)."""
        return self.config.service_mode != "default"

    def choose_server(self, hub: str) -> Any:
        """The server connection a new client of ``hub`` is bound to: spread over app servers
        (the server with the fewest clients), then over that server's connections; when this
        node has none, an app server of another node that has one (``RemoteServer``); None
        when no node has one that carries clients (or the relay is serverless)."""
        if self.config.service_mode == "serverless":
            return None
        return self.local_server(hub) or self._remote_server(hub)

    def _remote_server(self, hub: str) -> RemoteServer | None:
        if not self.backplane.publishes:
            return None
        nodes = sorted(self.backplane.holders(hub, "server", ""))
        if not nodes:
            return None
        node = secrets.choice(nodes)
        server = self._remote_servers.get((hub, node))
        if server is None:
            server = self._remote_servers[(hub, node)] = RemoteServer(self, hub, node)
        return server

    def local_server(self, hub: str) -> Any:
        """This node's server connection for a new client of ``hub`` (see ``choose_server``),
        or None."""
        load: dict[str, int] = {}
        best: dict[str, Any] = {}
        for server in self.servers_of(hub):
            if not server.carries_clients:
                continue
            count = len(server.clients)
            load[server.server_id] = load.get(server.server_id, 0) + count
            current = best.get(server.server_id)
            if current is None or count < len(current.clients):
                best[server.server_id] = server
        if not best:
            return None
        return best[min(load, key=load.__getitem__)]

    def hub_metrics(self, hub: str) -> dict[str, int]:
        """The endpoint metrics app servers read from pings (service-protocol §4.4)."""
        shard = self.table.view(hub)
        metrics = {"clientcount": len(shard.connections), "servercount": len(shard.servers)}
        if self.config.capacity:
            metrics["capacity"] = self.config.capacity
        return metrics

    def hub_has_clients(self, hub: str) -> bool:
        """Whether ``hub`` still has clients on this relay, whichever app server they are
        bound to (the ``status`` ping's answer: an app server removing this endpoint waits
        until no client of the hub could miss its messages)."""
        shard = self.table.view(hub)
        return bool(shard.connections) or any(s.clients for s in shard.servers)

    def connection_count(self, hub: str) -> int:
        """How many clients of ``hub`` are open on this node."""
        return len(self.table.view(hub).connections)

    def expire(self, now: float) -> None:
        """End what has timed out by ``now``: user-group memberships past their TTL, client
        invocations nobody answered (the relay's ticker calls this)."""
        self.invocations.expire(now)
        self.table.expire_user_groups(now)


    # -- clients and app servers on different nodes -------------------------------------------

    def _forwarded_message(self, hub: str, m: Any) -> bool:
        """A client's traffic between its node and the node of its app server; False when
        it is for no client of either kind."""
        kind = type(m)
        if kind is service.OpenConnectionMessage:
            self.forwarded[m.connection_id] = ForwardedClient(self, hub, m)
            return True
        client = self.served_elsewhere.get(m.connection_id)
        if kind is service.ConnectionDataMessage:
            if client is not None:
                client.server_data(m.payload)
            elif (proxy := self.forwarded.get(m.connection_id)) is not None:
                proxy.client_data(m.payload)
            else:
                return False
        elif client is not None:  # the app server closed the client
            del self.served_elsewhere[m.connection_id]
            client.close_from_server(m.error_message or None)
        elif (proxy := self.forwarded.pop(m.connection_id, None)) is not None:
            proxy.client_left(m.error_message or None)  # the client left
        else:
            return False
        return True

    def _node_gone(self, node: str, connections: set[str]) -> None:
        """Another node went away with its ``connections``: the invocations of its clients
        fail, this node's clients that its app servers served are closed (they reconnect),
        and its clients that this node's app servers served leave them."""
        self.invocations.node_gone(connections)
        for key in [key for key in self._remote_servers if key[1] == node]:
            del self._remote_servers[key]
        for client in [c for c in self.served_elsewhere.values()
                       if getattr(c.server, "node", None) == node]:
            client.close("The app server connection of this client was closed; reconnect.",
                         allow_reconnect=True)
        for connection_id in [i for i, c in self.forwarded.items() if c.node == node]:
            self.forwarded.pop(connection_id).client_left("its relay node went away")


#: The messages that carry a client's traffic between its node and its app server's.
_FORWARDED = frozenset({service.OpenConnectionMessage, service.ConnectionDataMessage,
                        service.CloseConnectionMessage})


#: The header of a forwarded OpenConnection that names the client's node (never an app
#: server's: the node that forwards it drops it).
_CLIENT_NODE = "x-relaycore-client-node"


def _claim_text(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


class RemoteServer:
    """The app servers of another node, for a client of this node whose hub has none here:
    what the session sees as its app server (``ServerBinding``). The client's open, bytes
    and close go to that node's inbox, where a ``ForwardedClient`` stands for the client;
    what the app server sends the client comes back the same way."""

    #: never a client invocation's caller: an invocation of its clients is always passed on
    server_id = ""

    def __init__(self, ops: Operations, hub: str, node: str) -> None:
        self.ops = ops
        self.hub = hub
        self.node = node

    def client_opened(self, client: Any, handshake: bytes) -> None:
        self.ops.served_elsewhere[client.id] = client
        claims: dict[str, str | tuple[str, ...]] = {}
        for key, value in client.claims.items():
            if isinstance(value, list):
                if value:
                    claims[key] = tuple(_claim_text(v) for v in value)
            else:
                claims[key] = _claim_text(value)
        headers: dict[str, Sequence[str]] = {
            name: [value] for name, value in client.headers.items()}
        headers[_CLIENT_NODE] = [self.ops.backplane.connection_id_prefix[:-1]]
        client.headers = {}  # as an app server connection does: sent once
        self.send(service.OpenConnectionMessage(client.id, claims, headers, client.query,
                                                protocol=client.protocol_name))
        self.client_data(client, handshake)

    def client_data(self, client: Any, data: bytes) -> None:
        self.send(service.ConnectionDataMessage(client.id, data))

    def client_closed(self, client: Any, error: str | None) -> None:
        if self.ops.served_elsewhere.pop(client.id, None) is not None:
            self.send(service.CloseConnectionMessage(client.id, error or ""))
        self.ops.invocations.client_gone(client)

    def send(self, message: Any) -> None:
        """To the other node (a client invocation, for the client's app server there)."""
        self.ops.backplane.send_to_node(self.node, self.hub, message)


class ForwardedClient:
    """A client of another node (``node``) served by an app server of this node: what the
    app server connection sees of it (a session's attributes and methods)."""

    def __init__(self, ops: Operations, hub: str, m: service.OpenConnectionMessage) -> None:
        self.ops = ops
        self.hub = hub
        #: the client's node (its id may name another: the node that negotiated it)
        self.node = m.headers.get(_CLIENT_NODE, ("",))[0]
        self.id = m.connection_id
        # as a session holds them: a repeated claim's values as a list
        self.claims = {k: list(v) if isinstance(v, tuple) else v for k, v in m.claims.items()}
        self.headers = {name: values[0] for name, values in m.headers.items()
                        if values and name != _CLIENT_NODE}
        self.query = m.query_string or ""
        self.protocol_name = m.protocol or ""
        self.data_prefix = b""
        self.server: Any = None

    def client_data(self, data: bytes) -> None:
        """The client's bytes; the first are its handshake, which binds it to an app server."""
        if self.server is not None:
            self.server.client_data(self, data)
            return
        self.server = self.ops.local_server(self.hub)
        if self.server is None:
            self.ops.forwarded.pop(self.id, None)
            self.close_from_server(f"No app server is connected to hub '{self.hub}'.")
            return
        self.server.client_opened(self, data)

    def client_left(self, error: str | None) -> None:
        if self.server is not None:
            self.server.client_closed(self, error)

    # what the app-server connection calls

    def server_data(self, payload: bytes) -> None:
        self._send(service.ConnectionDataMessage(self.id, payload))

    def close_from_server(self, error: str | None) -> None:
        self.ops.forwarded.pop(self.id, None)
        self._send(service.CloseConnectionMessage(self.id, error or ""))

    def close(self, reason: str | None = None, *, allow_reconnect: bool = False) -> None:
        self.ops.forwarded.pop(self.id, None)
        self._send(service.CloseConnectionWithAckMessage(self.id, 0, reason))

    def _send(self, message: Any) -> None:
        self.ops.backplane.send_to_node(self.node, self.hub, message)


#: What each service-protocol operation message does: ``(operations, hub, message, publish)``
#: -> the result an ack reports (a bool) or what a send reached.
_BY_MESSAGE: dict[type, Callable[[Operations, str, Any, bool], Any]] = {
    service.BroadcastDataMessage: lambda o, h, m, p: o.send_to_all(
        h, OutboundMessage(payloads=m.payloads), m.excluded_connection_ids, publish=p),
    service.MultiConnectionDataMessage: lambda o, h, m, p: o.send_to_connections(
        h, m.connection_ids, OutboundMessage(payloads=m.payloads), publish=p),
    service.UserDataMessage: lambda o, h, m, p: o.send_to_user(
        h, m.user_id, OutboundMessage(payloads=m.payloads), publish=p),
    service.MultiUserDataMessage: lambda o, h, m, p: o.send_to_users(
        h, m.user_ids, OutboundMessage(payloads=m.payloads), publish=p),
    service.GroupBroadcastDataMessage: lambda o, h, m, p: o.send_to_group(
        h, m.group_name, OutboundMessage(payloads=m.payloads), m.excluded_connection_ids,
        m.excluded_user_ids, publish=p),
    service.MultiGroupBroadcastDataMessage: lambda o, h, m, p: o.send_to_groups(
        h, m.group_names, OutboundMessage(payloads=m.payloads), publish=p),
    service.JoinGroupMessage: lambda o, h, m, p: o.add_connection_to_group(
        h, m.group_name, m.connection_id, publish=p),
    service.JoinGroupWithAckMessage: lambda o, h, m, p: o.add_connection_to_group(
        h, m.group_name, m.connection_id, publish=p),
    service.LeaveGroupMessage: lambda o, h, m, p: o.remove_connection_from_group(
        h, m.group_name, m.connection_id, publish=p),
    service.LeaveGroupWithAckMessage: lambda o, h, m, p: o.remove_connection_from_group(
        h, m.group_name, m.connection_id, publish=p),
    service.UserJoinGroupMessage: lambda o, h, m, p: o.add_user_to_group(
        h, m.group_name, m.user_id, None if m.ttl is None else float(m.ttl), publish=p),
    service.UserJoinGroupWithAckMessage: lambda o, h, m, p: o.add_user_to_group(
        h, m.group_name, m.user_id, None if m.ttl is None else float(m.ttl), publish=p) or True,
    service.UserLeaveGroupMessage: lambda o, h, m, p: o.remove_user_from_group(
        h, m.group_name, m.user_id, publish=p),
    service.UserLeaveGroupWithAckMessage: lambda o, h, m, p: o.remove_user_from_group(
        h, m.group_name, m.user_id, publish=p) or True,
    service.CheckUserInGroupWithAckMessage: lambda o, h, m, p: o.user_in_group(
        h, m.group_name, m.user_id),
    service.CheckGroupExistenceWithAckMessage: lambda o, h, m, p: o.group_exists(h, m.group_name),
    service.CheckConnectionExistenceWithAckMessage: lambda o, h, m, p: o.connection_exists(
        h, m.connection_id),
    service.CheckUserExistenceWithAckMessage: lambda o, h, m, p: o.user_exists(h, m.user_id),
    service.CloseConnectionMessage: lambda o, h, m, p: o.close_connection(
        h, m.connection_id, m.error_message or None, publish=p),
    service.CloseConnectionWithAckMessage: lambda o, h, m, p: o.close_connection(
        h, m.connection_id, m.reason, publish=p),
    service.CloseConnectionsWithAckMessage: lambda o, h, m, p: o.close_all_connections(
        h, m.reason, m.excluded_connection_ids, publish=p) >= 0,
    service.CloseUserConnectionsWithAckMessage: lambda o, h, m, p: o.close_user_connections(
        h, m.user_id, m.reason, m.excluded_connection_ids, publish=p) >= 0,
    service.CloseGroupConnectionsWithAckMessage: lambda o, h, m, p: o.close_group_connections(
        h, m.group_name, m.reason, m.excluded_connection_ids, publish=p) >= 0,
}

#: The service-protocol messages that are operations (``Operations.perform`` takes them).
OPERATION_MESSAGES = frozenset(_BY_MESSAGE)


#: Where the two ends of a pending client invocation are, as this node sees them: both here,
#: the client on another node (this node has the caller), or the caller on another node (this
#: node has the client).
_HERE, _CLIENT_ELSEWHERE, _CALLER_ELSEWHERE = 0, 1, 2


class ClientInvocations:
    """Client results across app servers (§2.5) and nodes: which server asked, for which
    client.

    The caller server sends ClientInvocation; the relay writes the payload to the client and,
    when another server owns the client, tells that server (it routes the client's completion).
    The owner answers with ClientCompletion or ErrorCompletion, which goes to a connection of
    the caller server. A client that leaves first gets its pending invocations failed.

    When the client is on another node, the caller's node keeps the invocation too and
    publishes it to the client's node (the inbox its id names), which does the rest as if the
    caller were there and publishes every end of it back (a completion, an error, the client
    leaving, the timeout): the caller's node gives it to the caller. A caller that cleans up
    after itself on its own node has the cleanup published to the client's node. When the
    client's node goes away, the invocations waiting on it fail at once.
    """

    #: How long the relay keeps a pending client invocation (§2.5: at most 10 minutes).
    TIMEOUT = 600.0

    def __init__(self, operations: Operations) -> None:
        self._ops = operations
        #: invocation id -> (hub, caller server id, client connection id, expiry time, where)
        self.pending: dict[str, tuple[str, str, str, float, int]] = {}
        #: (hub, client connection id) -> how many of ``pending`` it has
        self._per_client: collections.Counter[tuple[str, str]] = collections.Counter()

    def invoke(self, caller: ServerLink, m: service.ClientInvocationMessage) -> None:
        ops = self._ops
        client = ops.connection(caller.hub, m.connection_id)
        if client is None:
            if ops.backplane.publishes and ops.backplane.holds(
                    caller.hub, "connection", m.connection_id):
                if self._admit(caller.hub, m, caller.send, _CLIENT_ELSEWHERE):
                    ops._publish(caller.hub, m)
                return
            caller.send(service.ErrorCompletionMessage(
                m.invocation_id, m.connection_id, m.caller_server_id,
                f"Connection '{m.connection_id}' does not exist."))
            return
        if self._admit(caller.hub, m, caller.send, _HERE):
            self._to_client(client, m)

    def invoke_published(self, hub: str, m: service.ClientInvocationMessage) -> None:
        """A caller on another node invokes a client of this node; or the client of another
        node is served by an app server of this node, which is told (as its owner)."""
        ops = self._ops
        proxy = ops.forwarded.get(m.connection_id)
        if proxy is not None:
            if proxy.server is not None and proxy.server.server_id != m.caller_server_id:
                proxy.server.send(m)
            return

        def answer(message: Any) -> None:
            ops._publish(hub, message)

        client = ops.connection(hub, m.connection_id)
        if client is None:
            answer(service.ErrorCompletionMessage(
                m.invocation_id, m.connection_id, m.caller_server_id,
                f"Connection '{m.connection_id}' does not exist."))
        elif self._admit(hub, m, answer, _CALLER_ELSEWHERE):
            self._to_client(client, m)

    def _admit(self, hub: str, m: service.ClientInvocationMessage,
               answer: Callable[[Any], None], where: int) -> bool:
        """Keep the invocation as pending; False (and ``answer`` told why) past the limits."""
        ops = self._ops
        limit = ops.config.max_pending_invocations
        key = (hub, m.connection_id)
        if self._per_client[key] >= limit or m.invocation_id in self.pending:
            ops.stats.invocations_refused += 1
            answer(service.ErrorCompletionMessage(
                m.invocation_id, m.connection_id, m.caller_server_id,
                f"Connection '{m.connection_id}' has {limit} client invocations waiting "
                "already." if m.invocation_id not in self.pending
                else f"Invocation '{m.invocation_id}' is already waiting."))
            return False
        self._per_client[key] += 1
        self.pending[m.invocation_id] = (hub, m.caller_server_id, m.connection_id,
                                         ops.now() + self.TIMEOUT, where)
        return True

    def _to_client(self, client: Any, m: service.ClientInvocationMessage) -> None:
        self._ops._deliver((client,), OutboundMessage(payloads=m.payloads))
        owner = client.server
        if owner is not None and owner.server_id != m.caller_server_id:
            owner.send(m)

    def complete(self, sender: ServerLink,
                 m: service.ClientCompletionMessage | service.ErrorCompletionMessage) -> None:
        entry = self.pending.pop(m.invocation_id, None)
        if entry is None:
            if m.connection_id in self._ops.forwarded:
                # the owner of a client of another node: the result goes to that node
                self._ops._publish(sender.hub, m)
            return  # else unknown
        hub, caller_id, connection_id, _expiry, where = entry
        self._forget(hub, connection_id)
        if where == _HERE:
            if sender.server_id != caller_id:  # else the caller cleaning up after itself
                self._to_caller(hub, caller_id, m)
        else:
            # the client's node: the end goes to the caller's; the caller's node: its
            # cleanup goes to the client's (or a completion from elsewhere to the caller)
            self._ops._publish(hub, m)
            if where == _CLIENT_ELSEWHERE and sender.server_id != caller_id:
                self._to_caller(hub, caller_id, m)

    def complete_published(self, hub: str, m: service.ClientCompletionMessage
                           | service.ErrorCompletionMessage) -> None:
        """The end of an invocation, from the other node that keeps it."""
        entry = self.pending.pop(m.invocation_id, None)
        if entry is None:
            return
        self._forget(entry[0], entry[2])
        if entry[4] != _CALLER_ELSEWHERE:  # the client's node's answer, or its owner's
            self._to_caller(entry[0], entry[1], m)
        elif entry[2] in self._ops.served_elsewhere:
            self._ops._publish(hub, m)  # the answer of the owner of a forwarded client
        # else the caller's cleanup: nothing more

    def client_gone(self, client: Session) -> None:
        self._fail(lambda hub, conn_id, expiry: conn_id == client.id and hub == client.hub,
                   "Connection '{}' disconnected.")

    def node_gone(self, connections: set[str]) -> None:
        """The node that held ``connections`` went away: the invocations of its clients
        fail."""
        self._fail(lambda hub, conn_id, expiry: conn_id in connections,
                   "Connection '{}' is gone: the relay node that held it went away.")

    def expire(self, now: float) -> None:
        self._fail(lambda hub, conn_id, expiry: expiry <= now,
                   "The client invocation on connection '{}' timed out.")

    def _fail(self, which: Callable[[str, str, float], bool], error: str) -> None:
        if not self.pending:
            return
        for invocation_id, (hub, caller_id, conn_id, expiry, where) in list(
                self.pending.items()):
            if which(hub, conn_id, expiry):
                del self.pending[invocation_id]
                self._forget(hub, conn_id)
                failed = service.ErrorCompletionMessage(
                    invocation_id, conn_id, caller_id, error.format(conn_id))
                if where == _CALLER_ELSEWHERE:
                    self._ops._publish(hub, failed)
                else:
                    self._to_caller(hub, caller_id, failed)

    def _forget(self, hub: str, connection_id: str) -> None:
        key = (hub, connection_id)
        self._per_client[key] -= 1
        if self._per_client[key] <= 0:
            del self._per_client[key]

    def _to_caller(self, hub: str, caller_id: str, message: Any) -> None:
        for server in self._ops.servers_of(hub):
            if server.server_id == caller_id:
                server.send(message)
                return
