"""The relay: HTTP front, client endpoint, connection table and the operations of the REST API.

``serve_relay(config, task_status=...)`` runs a relay inside the caller's trio nursery and
hands back the running ``Relay``; its public async methods are the REST API's operations, for
programs that host relaycore as their transport layer::

    async with trio.open_nursery() as nursery:
        relay = await nursery.start(serve_relay, RelayConfig(port=0))
        await relay.send_to_all("chat", OutboundMessage.invocation("notify", "hello"))
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import secrets
import time
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

import trio

from ..protocol._auth import TokenError, TokenValidator, user_id_from_claims, wire_hub_name
from ..protocol._errors import RemoteProtocolError
from ..protocol._hub import InvocationMessage, PingMessage, StreamInvocationMessage, get_protocol
from ..protocol._negotiate import (
    TRANSPORTS_WEBSOCKETS_ONLY,
    negotiate_error,
    negotiate_response,
    parse_negotiate_version,
)
from ..protocol._websocket import Opcode, accept_key, frame, is_valid_client_key
from ._accept import serve_accept
from ._client import ClientConnection
from ._config import RelayConfig
from ._http import HttpConnection, HttpError, Request, Response, bearer_token, query_without
from ._message import OutboundMessage, fan_out, queue_payloads
from ._peer import ConnState, Flusher, Peer, Poller, aclose_quietly
from ._rest import RestApi
from ._server import ClientInvocations, ServerConnection
from ._table import ConnectionTable
from ._upstream import Upstream, parse_rules

log = logging.getLogger("relaycore.relay")

#: Connections whose timers are checked between two checkpoints of the ticker.
_TICK_SLICE = 1000


@dataclasses.dataclass
class RelayStats:
    """Counters the relay keeps (``relay.stats``)."""

    connections_opened: int = 0
    connections_closed: int = 0
    messages_sent: int = 0
    deliveries: int = 0
    slow_consumer_closes: int = 0
    #: Bytes queued for slow consumers and dropped when they were closed (the Close message
    #: goes first; what was behind it is never sent).
    slow_consumer_dropped_bytes: int = 0
    #: App-server connections closed because they stopped reading, and the bytes of their
    #: clients' messages that were dropped then (counted, logged, never silent).
    server_slow_closes: int = 0
    server_dropped_bytes: int = 0
    handshake_errors: int = 0
    protocol_errors: int = 0
    auth_failures: int = 0
    upstream_events_sent: int = 0
    upstream_failures: int = 0
    upstream_dropped: int = 0
    #: HTTP requests that did not arrive whole in time (408, or an idle keep-alive closed),
    #: HTTP connections closed to make room for new ones, connections refused with a 503.
    request_timeouts: int = 0
    http_evictions: int = 0
    connections_refused: int = 0
    #: Invocations refused for ``max_pending_invocations`` (answered with an error).
    invocations_refused: int = 0
    #: Requests and connections ended by an unexpected exception in the relay (each logged
    #: once with its traceback; the relay and every other connection carry on).
    internal_errors: int = 0


#: Request headers a client connection does not keep (credentials, and the upgrade's own):
#: what is left is what app servers get in OpenConnection (service-protocol §6.2).
_NOT_FORWARDED = frozenset({
    "authorization", "cookie", "upgrade", "connection", "sec-websocket-key",
    "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol",
})


#: Query parameters a client connection does not forward: its credential, like the
#: ``Authorization`` header. Everything else goes to app servers (OpenConnection) and upstreams
#: (``X-ASRS-Client-Query``) exactly as it arrived, still percent-encoded and with the
#: transport's own ``hub`` and ``id``: Azure's service forwards the connect request's query as
#: is (the ASP.NET SDK reads the transport's ``connectionToken`` and ``transport`` from it, the
#: Core SDK ``asrs.op`` and ``asrs_lang``). Whether Azure drops ``access_token`` is not
#: published; the relay keeps credentials away from app servers, which already get the claims.
_QUERY_NOT_FORWARDED = frozenset({"access_token"})


def _forwarded_headers(request: Request) -> dict[str, str]:
    """The client's request headers as app servers get them in OpenConnection: without
    credentials and the upgrade's own, plus ``X-Forwarded-For`` ending with the client's
    address, as Azure adds it (the Azure SDK makes the first address of that header the
    connection's remote IP; a proxy in front of the relay keeps its client first)."""
    headers = {k: v for k, v in request.headers.items() if k not in _NOT_FORWARDED}
    if request.peer is not None:
        earlier = headers.get("x-forwarded-for")
        headers["x-forwarded-for"] = f"{earlier}, {request.peer}" if earlier else request.peer
    return headers


@dataclasses.dataclass
class _Pending:
    connection_id: str
    hub: str
    expires: float


class Relay:
    """A running relay node. Create it with ``serve_relay``; use its methods from trio code."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.table = ConnectionTable()
        self.stats = RelayStats()
        self.validator = TokenValidator(config.access_keys, clock_skew=config.token_clock_skew)
        self.port: int = config.port
        #: every upgraded connection, client or server, until its stream is closed
        self._live: set[Peer] = set()
        #: every HTTP connection not (yet) upgraded, oldest first, with the scope that ends it
        self._http: dict[trio.SocketStream, trio.CancelScope] = {}
        self.max_connections = config.max_connections or _open_file_budget()
        self._live_clients = 0
        self.flusher = Flusher()
        self.poller = Poller(self.flusher)
        self.invocations = ClientInvocations(self)
        self.upstream = Upstream(self, parse_rules(config.upstreams))
        #: this node's id, as ``Asrs-Instance-Id`` tells app servers (service-protocol §6.2)
        self.instance_id = secrets.token_hex(8)
        self._pending: dict[str, _Pending] = {}
        self._ping_frames = {
            name: frame(Opcode.BINARY if name == "messagepack" else Opcode.TEXT,
                        get_protocol(name).write(PingMessage()))
            for name in ("json", "messagepack")
        }
        self.rest = RestApi(self)
        self._shutting_down = False
        self._all_gone: trio.Event | None = None
        #: The fault-injection switch (``inject_fault``); ``none`` in normal operation.
        self.fault_mode = "none"
        #: Set when a ``silence`` fault ends: the upgrades it held get their answer.
        self._silence_lifted = trio.Event()

    # -- public helpers ------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return self.config.endpoint_url(self.port)

    @property
    def connection_string(self) -> str:
        return self.config.connection_string(self.port)

    def ping_frame(self, protocol_name: str) -> bytes:
        return self._ping_frames[protocol_name]

    def now(self) -> float:
        return trio.current_time()

    # -- the operations of the REST API --------------------------------------------------

    async def send_to_all(self, hub: str, message: OutboundMessage,
                          excluded: Iterable[str] = ()) -> int:
        """Send to every connection of ``hub`` but ``excluded``; returns the number reached."""
        return self._deliver(self.table.view(hub).all_targets(excluded), message)

    async def send_to_user(self, hub: str, user_id: str, message: OutboundMessage) -> int:
        return self._deliver(self.table.view(hub).user_targets(user_id), message)

    async def send_to_connection(self, hub: str, connection_id: str,
                                 message: OutboundMessage) -> int:
        conn = self._connection(hub, connection_id)
        return self._deliver((conn,) if conn else (), message)

    async def send_to_group(self, hub: str, group: str, message: OutboundMessage,
                            excluded: Iterable[str] = ()) -> int:
        return self._deliver(self.table.view(hub).group_targets(group, excluded), message)

    async def add_connection_to_group(self, hub: str, group: str, connection_id: str) -> bool:
        """False when the connection does not exist."""
        conn = self._connection(hub, connection_id)
        if conn is None:
            return False
        self.table.shard(hub).join(conn, group)
        return True

    async def remove_connection_from_group(self, hub: str, group: str,
                                           connection_id: str) -> bool:
        conn = self._connection(hub, connection_id)
        return conn is not None and self.table.shard(hub).leave(conn, group)

    async def remove_connection_from_all_groups(self, hub: str, connection_id: str) -> bool:
        conn = self._connection(hub, connection_id)
        if conn is None:
            return False
        self.table.shard(hub).leave_all(conn)
        return True

    async def add_user_to_group(self, hub: str, group: str, user_id: str,
                                ttl: float | None = None) -> None:
        """Add the user's connections, and unless ``ttl == 0`` its later ones, for ``ttl`` s."""
        self.table.shard(hub).add_user_to_group(user_id, group, ttl, self.now())

    async def remove_user_from_group(self, hub: str, group: str, user_id: str) -> None:
        shard = self.table.get(hub)
        if shard is not None:
            shard.remove_user_from_group(user_id, group)
            self.table.prune(hub)

    async def remove_user_from_all_groups(self, hub: str, user_id: str) -> None:
        shard = self.table.get(hub)
        if shard is not None:
            shard.remove_user_from_all_groups(user_id)
            self.table.prune(hub)

    async def connection_exists(self, hub: str, connection_id: str) -> bool:
        return self._connection(hub, connection_id) is not None

    async def user_exists(self, hub: str, user_id: str) -> bool:
        shard = self.table.get(hub)
        return shard is not None and user_id in shard.users

    async def group_exists(self, hub: str, group: str) -> bool:
        shard = self.table.get(hub)
        return shard is not None and group in shard.groups

    async def user_in_group(self, hub: str, group: str, user_id: str) -> bool:
        shard = self.table.get(hub)
        return shard is not None and shard.user_in_group(user_id, group, self.now())

    async def close_connection(self, hub: str, connection_id: str,
                               reason: str | None = None) -> bool:
        conn = self._connection(hub, connection_id)
        if conn is None:
            return False
        self._close_each((conn,), reason)
        return True

    async def close_all_connections(self, hub: str, reason: str | None = None,
                                    excluded: Iterable[str] = ()) -> int:
        return self._close_each(self.table.view(hub).all_targets(excluded), reason)

    async def close_user_connections(self, hub: str, user_id: str, reason: str | None = None,
                                     excluded: Iterable[str] = ()) -> int:
        skip = set(excluded)
        targets = [c for c in self.table.view(hub).user_targets(user_id) if c.id not in skip]
        return self._close_each(targets, reason)

    async def close_group_connections(self, hub: str, group: str, reason: str | None = None,
                                      excluded: Iterable[str] = ()) -> int:
        return self._close_each(self.table.view(hub).group_targets(group, excluded), reason)

    # -- internals -----------------------------------------------------------------------------

    def _connection(self, hub: str, connection_id: str) -> Any:
        return self.table.view(hub).connections.get(connection_id)

    def _deliver(self, targets: Iterable[Any], message: OutboundMessage) -> int:
        reached = fan_out(targets, message, self.flusher, self.config.send_buffer_limit)
        self.stats.messages_sent += 1
        self.stats.deliveries += reached
        return reached

    def _deliver_payloads(self, targets: Sequence[Any], payloads: dict[str, bytes]) -> int:
        """``_deliver`` for a few targets (a user's connections) and an app server's payload
        map whose keys are already the lower-case protocol names: no message object."""
        reached = queue_payloads(targets, payloads)
        self.stats.messages_sent += 1
        self.stats.deliveries += reached
        return reached

    @staticmethod
    def _close_each(targets: Iterable[Any], reason: str | None) -> int:
        """Close connections as an operation (REST, library or service protocol alike): a
        Close message with the reason and ``allowReconnect`` (as Microsoft's emulator does;
        the app's negotiate decides whether the client may come back)."""
        count = 0
        for conn in list(targets):
            conn.close(reason, allow_reconnect=True)
            count += 1
        return count

    def _add_connection(self, conn: ClientConnection) -> None:
        conn.state = ConnState.OPEN
        self.table.shard(conn.hub).add(conn, self.now())
        self.stats.connections_opened += 1
        if conn.server is None:
            self.upstream.connected(conn)
        log.debug("connection %s opened on hub %s (user %s)", conn.id, conn.hub, conn.user_id)

    def _remove_connection(self, conn: ClientConnection) -> None:
        self.table.shard(conn.hub).remove(conn)
        self.table.prune(conn.hub)
        if conn.server is None:
            self.upstream.disconnected(conn, conn.close_reason)
        self.stats.connections_closed += 1

    def _forget(self, peer: Peer) -> None:
        if peer not in self._live:
            return
        self._live.remove(peer)
        if isinstance(peer, ClientConnection):
            self._live_clients -= 1
            if self._all_gone is not None and not self._live_clients:
                self._all_gone.set()

    def inject_fault(self, mode: str) -> None:
        """Make server connections fail as in an outage, to rehearse failover: ``refuse``
        new ones (503), ``drop`` the existing ones too (no goodbye), or go ``silence``
        (existing ones get and send nothing; new ones hang), or ``none`` to heal."""
        log.warning("fault injection: server connections -> %s", mode)
        if mode == "silence" and self.fault_mode != "silence":
            self._silence_lifted = trio.Event()
        elif mode != "silence":
            self._silence_lifted.set()
        self.fault_mode = mode
        for peer in list(self._live):
            if isinstance(peer, ServerConnection):
                if mode == "drop":
                    peer.abort()
                peer.silenced = mode == "silence"

    # -- app servers ---------------------------------------------------------------------------

    @property
    def serves_hubs_itself(self) -> bool:
        """Whether a hub without an app server is served by the relay (serverless)."""
        return self.config.service_mode != "default"

    def servers_of(self, hub: str) -> list[ServerConnection]:
        return self.table.view(hub).servers

    def server_ids(self, hub: str) -> list[str]:
        return sorted({s.server_id for s in self.servers_of(hub)})

    def choose_server(self, hub: str) -> ServerConnection | None:
        """The server connection a new client of ``hub`` is bound to: spread over app servers
        (the server with the fewest clients), then over that server's connections."""
        if self.config.service_mode == "serverless":
            return None
        load: dict[str, int] = {}
        best: dict[str, ServerConnection] = {}
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

    def _add_server(self, server: ServerConnection) -> None:
        server.state = ConnState.OPEN
        self.table.shard(server.hub).servers.append(server)

    def _remove_server(self, server: ServerConnection) -> None:
        shard = self.table.get(server.hub)
        if shard is not None and server in shard.servers:
            shard.servers.remove(server)
            self.table.prune(server.hub)

    def _client_invocation(self, conn: ClientConnection,
                           message: InvocationMessage | StreamInvocationMessage,
                           body: bytes) -> None:
        """A serverless client invoked a hub method: it goes to the matching upstream; without
        one, an invocation that expects an answer gets a completion error, never silence."""
        if not self.upstream.invoke(conn, message.target, message.invocation_id, body):
            conn.not_delivered(message)

    # -- authentication ------------------------------------------------------------------------

    def authenticate(self, request: Request, kind: str, hub: str) -> dict[str, Any]:
        """Validate the token of ``request`` for ``{endpoint}/{kind}/?hub={hub}``: from the
        ``Authorization`` header, or the ``access_token`` query parameter (browsers)."""
        token = bearer_token(request) or request.arg("access_token")
        return self.check_token(token, self.audiences(request, f"{kind}/?hub={hub}"))

    def check_token(self, token: str | None, audiences: list[str],
                    validator: TokenValidator | None = None) -> dict[str, Any]:
        try:
            return (validator or self.validator).validate(token, audiences=audiences,
                                                          now=time.time())
        except TokenError as exc:
            self.stats.auth_failures += 1
            raise HttpError(401, str(exc), code=f"Unauthorized.{exc.reason}") from None

    def audiences(self, request: Request, suffix: str) -> list[str]:
        hosts = {urlsplit(self.endpoint).hostname or ""}
        host_header = request.headers.get("host", "")
        if host_header:
            try:
                hosts.add(urlsplit(f"//{host_header}").hostname or "")
            except ValueError:
                raise HttpError(400, f"invalid Host header {host_header[:100]!r}") from None
        return [f"{scheme}://{host}/{suffix}" for host in hosts if host
                for scheme in ("http", "https")]

    # -- HTTP front -------------------------------------------------------------------------

    def admit(self) -> str | None:
        """Whether a new connection may be served (None), or why not (it gets a 503). Past
        ``max_http_connections`` the HTTP connection that has waited longest for its current
        request makes room.

        ``max_connections`` bounds WebSockets (an upgrade past it is a 503); a few HTTP
        connections more are let in, so that health checks and negotiates are answered
        while the relay is full."""
        if len(self._live) + len(self._http) >= self.max_connections + _HTTP_OVER_LIMIT:
            return (f"the relay holds its limit of {self.max_connections} connections; "
                    "retry later")
        if len(self._http) >= self.config.max_http_connections:
            oldest = next(iter(self._http))
            self._http.pop(oldest).cancel()
            self.stats.http_evictions += 1
        return None

    def _refused(self, reason: str) -> None:
        self.stats.connections_refused += 1

    async def handle_stream(self, stream: trio.SocketStream) -> None:
        upgraded = None
        scope = self._http[stream] = trio.CancelScope()
        try:
            with scope:
                upgraded = await self._serve_http(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            # A fault while serving one connection ends that connection only, never the
            # listener (an exception escaping this task would end serve_listeners and the
            # process, and with it every other client).
            self.stats.internal_errors += 1
            log.exception("relay: internal error on an HTTP connection; closing it")
        finally:
            self._http.pop(stream, None)
            if upgraded is None:
                with trio.CancelScope(shield=True):
                    await aclose_quietly(stream)
        if upgraded is not None:
            # From here on an open connection is its peer alone: a file descriptor in the
            # poller's epoll set, no task, no HTTP state (idle connections are the relay's
            # memory). This task ends.
            peer, trailing = upgraded
            self._live.add(peer)
            if isinstance(peer, ClientConnection):
                self._live_clients += 1
            peer.start(stream, trailing)

    async def _serve_http(self, stream: trio.abc.Stream) -> tuple[Peer, bytes] | None:
        """Answer HTTP requests until the connection closes or is upgraded to a WebSocket
        (then return the peer to run and the bytes already read past the upgrade)."""
        http = HttpConnection(stream, max_head=self.config.max_request_head,
                              max_body=self.config.max_request_body)
        request: Request | None = None
        while True:
            try:
                request = None
                with trio.move_on_after(self.config.request_timeout) as waiting:
                    request = await http.read_request()
                if waiting.cancelled_caught:
                    return await self._request_timed_out(http)
                if request is None:
                    return None
                if request.is_websocket_upgrade:
                    return await self._upgrade(http, request)
                response = await self.route(request)
            except HttpError as exc:
                await http.send_response(self._with_cors(request, Response.error(exc)),
                                         close=True)
                await http.linger(max_bytes=4 * self.config.max_request_body)
                return None
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise
            except Exception:
                self.stats.internal_errors += 1
                where = f"{request.method} {request.path}" if request is not None else "a request"
                log.exception("relay: internal error answering %s", where)
                error = HttpError(500, "internal error in the relay (logged on the relay)")
                await http.send_response(self._with_cors(request, Response.error(error)),
                                         close=True)
                await http.linger(max_bytes=4 * self.config.max_request_body)
                return None
            await http.send_response(self._with_cors(request, response))
            if not http.can_continue():
                return None
            # Answered: it now waits for its next request, the newest wait of all (the
            # oldest waits are what ``admit`` closes first: a busy keep-alive connection
            # is never taken for a slow one).
            scope = self._http.pop(stream, None)
            if scope is not None:
                self._http[stream] = scope

    async def _request_timed_out(self, http: HttpConnection) -> None:
        """No whole request within ``request_timeout``: an idle keep-alive connection is
        closed, a slow sender (slowloris) hears 408 first."""
        self.stats.request_timeouts += 1
        if http.received:
            error = HttpError(408, f"the request did not arrive whole within "
                                   f"{self.config.request_timeout:g} seconds")
            with trio.move_on_after(1):  # a sender that does not read gets no more time
                await http.send_response(Response.error(error), close=True)
        return None

    async def route(self, request: Request) -> Response:
        path = request.path
        if request.method == "OPTIONS":
            return Response(204)
        if path.startswith("/api/"):
            return await self.rest.handle(request)
        if path.rstrip("/") == "/client/negotiate":
            if request.method != "POST":
                raise HttpError(405, "negotiate expects POST", headers=[("Allow", "POST")])
            return self._negotiate(request)
        if path.rstrip("/") == "/client":
            raise HttpError(400, "the client endpoint expects a WebSocket upgrade "
                                 "(Server-Sent Events and long polling are not enabled)")
        raise HttpError(404, f"no such endpoint: {request.method} {path}")

    def _with_cors(self, request: Request | None, response: Response) -> Response:
        origin = request.headers.get("origin") if request is not None else None
        # Browsers send an ASCII origin (IDNA hosts are punycode); anything else is not a
        # value a header can echo.
        allowed = self.config.cors_origins
        if (origin and origin.isascii() and origin.isprintable()
                and ("*" in allowed or origin in allowed)):
            response.headers += [
                ("Access-Control-Allow-Origin", origin),
                ("Access-Control-Allow-Credentials", "true"),
                ("Access-Control-Allow-Headers",
                 "Authorization, X-Requested-With, X-SignalR-User-Agent, Content-Type"),
                ("Access-Control-Allow-Methods", "GET, POST, PUT, DELETE, HEAD, OPTIONS"),
                ("Vary", "Origin"),
            ]
        return response

    def _hub_of(self, request: Request) -> str:
        hub = request.arg("hub")
        if not hub:
            raise HttpError(400, "missing the 'hub' query parameter")
        try:
            return wire_hub_name(hub, request.arg("application"))
        except ValueError as exc:
            raise HttpError(400, str(exc)) from None

    def _negotiate(self, request: Request) -> Response:
        hub = self._hub_of(request)
        self.authenticate(request, "client", hub)
        if self._shutting_down:
            raise HttpError(503, "the relay is shutting down; negotiate again elsewhere")
        try:
            version = parse_negotiate_version(request.arg("negotiateVersion"))
        except RemoteProtocolError as exc:
            return Response.json(200, negotiate_error(str(exc)))
        connection_id = secrets.token_urlsafe(16)
        token = secrets.token_urlsafe(24) if version >= 1 else connection_id
        self._pending[token] = _Pending(connection_id, hub,
                                        self.now() + self.config.negotiate_timeout)
        return Response.json(200, negotiate_response(
            connection_id, token if version >= 1 else None, version,
            transports=TRANSPORTS_WEBSOCKETS_ONLY))

    async def _upgrade(self, http: HttpConnection, request: Request
                       ) -> tuple[Peer, bytes] | None:
        kind = request.path.strip("/")
        try:
            if kind not in ("client", "server"):
                raise HttpError(404, f"no WebSocket endpoint at {request.path}")
            hub = self._hub_of(request)
            claims = self.authenticate(request, kind, hub)
            key = request.headers.get("sec-websocket-key", "")
            if request.headers.get("sec-websocket-version") != "13":
                raise HttpError(426, "only WebSocket version 13 is supported",
                                headers=[("Sec-WebSocket-Version", "13")])
            if not is_valid_client_key(key):
                raise HttpError(400, "missing or malformed Sec-WebSocket-Key")
            if self._shutting_down:
                raise HttpError(503, "the relay is shutting down")
            if len(self._live) >= self.max_connections:
                self.stats.connections_refused += 1
                raise HttpError(503, f"the relay holds its limit of {self.max_connections} "
                                     "connections; retry later", headers=[("Retry-After", "1")])
            if kind == "server" and self.fault_mode in ("refuse", "drop"):
                raise HttpError(503, "server connections are refused (fault injection)")
            if kind == "server" and self.fault_mode == "silence":
                await self._hold_silenced(http.stream)
                raise HttpError(503, "server connections were silenced (fault injection)")
            if kind == "server":
                server_id = (request.headers.get("x-asrs-server-id")
                             or user_id_from_claims(claims) or secrets.token_hex(8))
                return await self._accept(http, key, ServerConnection(
                    self, hub=hub, server_id=server_id, now=self.now()))
            token = request.arg("id")
            if token is not None:
                pending = self._pending.pop(token, None)
                if pending is None or pending.hub != hub:
                    raise HttpError(404, "unknown or expired connection id; negotiate again")
                connection_id = pending.connection_id
            else:  # skipNegotiation
                connection_id = secrets.token_urlsafe(16)
            limit = self.config.max_connections_per_hub
            shard = self.table.get(hub)
            if limit and shard is not None and len(shard.connections) >= limit:
                raise HttpError(429, f"hub '{hub}' has reached its limit of {limit} connections")
        except HttpError as exc:
            await http.send_response(self._with_cors(request, Response.error(exc)), close=True)
            return None
        query = query_without(request.raw_query, _QUERY_NOT_FORWARDED)
        return await self._accept(http, key, ClientConnection(
            self, connection_id=connection_id, hub=hub, claims=claims,
            user_id=user_id_from_claims(claims), query=f"?{query}" if query else "",
            headers=_forwarded_headers(request), now=self.now()))

    async def _hold_silenced(self, stream: trio.abc.Stream) -> None:
        """A ``silence`` fault: leave an app server's upgrade unanswered, as a blocked port
        would, until the fault ends or the app server gives up and closes (then the attempt
        holds nothing more: no file descriptor, no task)."""
        lifted = self._silence_lifted

        async def until_closed(cancel_scope: trio.CancelScope) -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while await stream.receive_some(4096):
                    pass  # whatever it sends while waiting is not read as HTTP
            cancel_scope.cancel()

        async def until_lifted(cancel_scope: trio.CancelScope) -> None:
            await lifted.wait()
            cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(until_closed, nursery.cancel_scope)
            nursery.start_soon(until_lifted, nursery.cancel_scope)

    @staticmethod
    async def _accept(http: HttpConnection, key: str, peer: Peer) -> tuple[Peer, bytes]:
        trailing = await http.send_switching_protocols(
            {"Upgrade": "websocket", "Connection": "Upgrade",
             "Sec-WebSocket-Accept": accept_key(key)})
        return peer, trailing

    # -- background ----------------------------------------------------------------------------

    async def _ticker(self) -> None:
        config = self.config
        interval = min(1.0, config.keep_alive_interval / 3, config.client_timeout / 3,
                       config.handshake_timeout / 3, config.negotiate_timeout / 3,
                       config.server_keep_alive_interval / 3, config.server_timeout / 3,
                       config.close_timeout / 3)
        # A connection needs its tick() only when one of these holds (a superset of what the
        # client and server timers check): most open connections are skipped by one
        # comparison chain instead of two method calls.
        quiet = min(config.client_timeout, config.server_timeout)
        idle = min(config.keep_alive_interval, config.server_keep_alive_interval)
        is_open = ConnState.OPEN
        frozen_at = 0
        while True:
            await trio.sleep(interval)
            now = self.now()
            live = list(self._live)
            for start in range(0, len(live), _TICK_SLICE):
                if start:
                    # Let other tasks run between slices: one pass over 15k connections
                    # would otherwise hold the loop (and every message) for milliseconds.
                    await trio.lowlevel.checkpoint()
                    now = self.now()
                for conn in [c for c in live[start:start + _TICK_SLICE]
                             if c.state is not is_open or c._close_deadline <= now
                             or now - c.last_receive > quiet or now - c.last_send >= idle]:
                    try:
                        if not conn.close_due(now):
                            conn.tick(now)
                    except Exception:  # a bug in one connection's timers ends only it
                        conn._internal_error()
            if self.config.tune_gc and len(live) > 2 * frozen_at + 1000:
                # The connections' long-lived objects leave the collector's generations, so
                # collections stop rescanning them (idle CPU, latency spikes at scale).
                gc.freeze()
                frozen_at = len(live)
            if self._pending:
                for token in [t for t, p in self._pending.items() if p.expires < now]:
                    del self._pending[token]
            self.invocations.expire(now)
            self.table.expire_user_groups(now)

    async def drain(self, reason: str = "The relay is shutting down.",
                    timeout: float | None = None) -> None:
        """Stop accepting clients, send every client a Close message with ``allowReconnect``
        (so it reconnects, to another node if there is one) and wait until all have gone or
        ``timeout`` (default: ``close_timeout``) has passed."""
        self._shutting_down = True
        self._all_gone = trio.Event()
        clients = [p for p in self._live if isinstance(p, ClientConnection)]
        for conn in clients:
            conn.close(reason, allow_reconnect=True)
        if clients:
            with trio.move_on_after(self.config.close_timeout if timeout is None else timeout):
                await self._all_gone.wait()
        for peer in list(self._live):
            if isinstance(peer, ServerConnection):
                peer.fail(reason)


async def serve_relay(
    config: RelayConfig,
    *,
    task_status: trio.TaskStatus[Relay] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a relay until cancelled; ``task_status.started`` gets the running ``Relay``.

    Cancellation drops the sockets at once; call ``await relay.drain()`` first for a graceful
    stop in which every client is told to reconnect (``python -m relaycore serve`` does so on
    SIGINT and SIGTERM).
    """
    relay = Relay(config)
    listeners = await trio.open_tcp_listeners(config.port, host=config.host or None)
    relay.port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay._ticker)
        nursery.start_soon(relay.flusher.run)
        nursery.start_soon(relay.poller.run)
        await nursery.start(relay.upstream.run)
        for listener in listeners:
            nursery.start_soon(serve_accept, listener, relay.handle_stream, relay.admit,
                               relay._refused)
        task_status.started(relay)


#: File descriptors kept back from ``max_connections``'s default: listeners, log files, the
#: upstream's HTTP connections, the spare that refuses connections when none are left, and
#: the HTTP connections let in past the limit (``_HTTP_OVER_LIMIT``).
_FD_RESERVE = 64
#: HTTP connections admitted beyond ``max_connections`` (health checks, negotiates).
_HTTP_OVER_LIMIT = 32


def _open_file_budget() -> int:
    """The default ``max_connections``: the soft open-file limit less ``_FD_RESERVE``."""
    try:
        import resource
    except ImportError:  # not a Unix: no limit known here
        return 1 << 30
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return max(soft - _FD_RESERVE, 1)
