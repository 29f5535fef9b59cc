"""The HTTP front of a relay node: accepting, routing, negotiate, and the client transports.

Theory of operation
-------------------
Every accepted TCP connection is an HTTP/1.1 connection first (``_http.HttpConnection``),
served by one task until it closes or is upgraded. ``route`` sends ``/api/...`` to the REST
API, answers negotiate, and refuses what is not an endpoint; an upgrade of ``/client`` becomes
a ``ClientSession`` carried by a ``WebSocketTransport``, an upgrade of ``/server`` a
``ServerConnection``. From then on the connection is its peer alone: a file descriptor in the
poller's epoll set and no task (``Peer.start``). The front keeps the set of live peers, which
bounds the connections a node holds (``max_connections``) and which the ticker, the drain and
the fault switch walk.

The other client transports are plain requests to ``/client`` that name the connection token
negotiate handed out (``id=``), as ASP.NET Core serves them (client-protocol §2): a ``GET``
that accepts ``text/event-stream`` opens a ``ServerSentEventsTransport`` (the response's head
is written here; then the socket is that peer's, as after an upgrade), another ``GET`` is a
long poll of a ``LongPollingTransport`` (the first one opens it and is answered at once),
``POST`` carries the client's messages and ``DELETE`` ends a long-polling connection. Each
request is authenticated like the negotiate, and must come from the user that negotiated; a
waiting poll is its client's connection, not an HTTP connection waiting for a request (it is
never evicted to make room). ``transports`` says which of the three are served.

Limits: ``admit`` refuses a new TCP connection past ``max_connections`` plus a few for HTTP
(health checks, negotiates) and evicts the HTTP connection that waited longest when
``max_http_connections`` are open; a request that does not arrive whole in ``request_timeout``
is answered 408 (or, idle, closed).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from typing import Any

import h11
import trio

from ..protocol._auth import user_id_from_claims, wire_hub_name
from ..protocol._errors import RemoteProtocolError
from ..protocol._negotiate import (
    available_transports,
    negotiate_error,
    negotiate_response,
    parse_negotiate_version,
)
from ..protocol._websocket import accept_key, is_valid_client_key
from ._config import RelayConfig
from ._http import HttpConnection, HttpError, Request, Response, query_without
from ._longpolling import LongPollingTransport
from ._message import hold_formats, release_formats
from ._negotiated import NegotiatedTokens
from ._operations import Operations
from ._peer import ConnState, Flusher, Peer, PeerIO, Poller, aclose_quietly
from ._rest import RestApi
from ._server import ServerConnection
from ._session import ClientSession, StatefulSession
from ._sse import FIRST_CHUNK, RESPONSE_HEADERS, ServerSentEventsTransport
from ._tokens import RequestAuth
from ._transport import ResumedTransport, WebSocketTransport

log = logging.getLogger("relaycore.relay")

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


#: The transports whose connections are plain HTTP requests naming their token.
_HttpTransport = ServerSentEventsTransport | LongPollingTransport
_HTTP_TRANSPORTS = (ServerSentEventsTransport, LongPollingTransport)
#: What carries a client session (what the drain waits for).
_CLIENT_TRANSPORTS = (WebSocketTransport, *_HTTP_TRANSPORTS)

#: What a long poll's answers say about caching, as ASP.NET Core's (``AddNoCacheHeaders``).
_NO_CACHE = [("Cache-Control", "no-cache, no-store"), ("Pragma", "no-cache"),
             ("Expires", "Thu, 01 Jan 1970 00:00:00 GMT")]

#: A ``/client`` request that names no connection.
_NO_CONNECTION_ID = ("the client endpoint expects a WebSocket upgrade, or the connection id "
                     "(id=...) negotiate handed out for Server-Sent Events or long polling")


def _accepts_event_stream(request: Request) -> bool:
    """Whether the request accepts ``text/event-stream`` (an ``EventSource``'s ``GET``)."""
    return any(item.split(";", 1)[0].strip().lower() == "text/event-stream"
               for item in request.headers.get("accept", "").split(","))


def _is_client_path(path: str) -> bool:
    return path.rstrip("/") == "/client"


#: File descriptors kept back from ``max_connections``'s default: listeners, log files, the
#: upstream's HTTP connections, the spare that refuses connections when none are left, and
#: the HTTP connections let in past the limit (``_HTTP_OVER_LIMIT``).
_FD_RESERVE = 64
#: HTTP connections admitted beyond ``max_connections`` (health checks, negotiates).
_HTTP_OVER_LIMIT = 32


class HttpFront:
    """Serves one relay node's TCP connections until they are upgraded (see above)."""

    def __init__(self, config: RelayConfig, ops: Operations, auth: RequestAuth,
                 poller: Poller, flusher: Flusher) -> None:
        self.config = config
        self.ops = ops
        self.auth = auth
        self.stats = ops.stats
        #: what the peers this front creates share (they tell ``forget`` when they are gone)
        self.io = PeerIO(poller, flusher, config.close_timeout, ops.stats, self.forget)
        self.rest = RestApi(config, ops, auth, faults=self)
        #: every client transport and upgraded server connection, until it is over
        self.live: set[Peer | LongPollingTransport] = set()
        self._live_clients = 0
        self._all_gone: trio.Event | None = None
        #: every HTTP connection not (yet) upgraded, oldest first, with the scope that ends it
        self._http: dict[trio.SocketStream, trio.CancelScope] = {}
        self.max_connections = config.max_connections or open_file_budget()
        #: negotiated connection tokens, which any node of a cluster accepts
        # ops.now read at each call: the relay has one clock, which a harness may replace
        self._negotiated = NegotiatedTokens(config.access_keys, lambda: ops.now())
        #: tokens negotiated here with stateful reconnect, until used or expired
        self._stateful_tokens: dict[str, float] = {}
        #: sessions that negotiated stateful reconnect, by their token, while they may resume
        self._resumable: dict[str, StatefulSession] = {}
        #: the open Server-Sent Events and long-polling connections, by their token
        self._by_token: dict[str, _HttpTransport] = {}
        #: whether clients may use Server-Sent Events or long polling
        self._http_transports = bool({"ServerSentEvents", "LongPolling"}
                                     & set(config.transports))
        #: The fault-injection switch (``inject_fault``); ``none`` in normal operation.
        self.fault_mode = "none"
        #: Set when a ``silence`` fault ends: the upgrades it held get their answer.
        self._silence_lifted = trio.Event()

    def forget(self, peer: Peer | LongPollingTransport) -> None:
        """A peer's socket is closed (a long-polling connection is over): it no longer counts
        (``PeerIO.forget``)."""
        if isinstance(peer, _HTTP_TRANSPORTS) and self._by_token.get(peer.token) is peer:
            del self._by_token[peer.token]
            release_formats(peer.FORMATS)
        if peer not in self.live:
            return
        self.live.remove(peer)
        if isinstance(peer, _CLIENT_TRANSPORTS):
            self._live_clients -= 1
            if self._all_gone is not None and not self._live_clients:
                self._all_gone.set()

    def _add_live(self, peer: Peer | LongPollingTransport) -> None:
        self.live.add(peer)
        if isinstance(peer, _CLIENT_TRANSPORTS):
            self._live_clients += 1

    def _register(self, transport: _HttpTransport) -> None:
        """Requests naming its token find ``transport`` from now on (until ``forget``)."""
        self._by_token[transport.token] = transport
        # Before its session can take one of them, until forget: see _message._framed.
        hold_formats(transport.FORMATS)

    def client_transports(self) -> list[WebSocketTransport | _HttpTransport]:
        """The transports of every client session (what a drain closes)."""
        return [peer for peer in self.live if isinstance(peer, _CLIENT_TRANSPORTS)]

    async def clients_gone(self, timeout: float) -> None:
        """Wait until every client transport is gone, or ``timeout``."""
        self._all_gone = trio.Event()
        if self._live_clients:
            with trio.move_on_after(timeout):
                await self._all_gone.wait()

    def expire(self, now: float) -> None:
        """Forget negotiated connection tokens that were not used in time."""
        self._negotiated.expire(now)
        if self._stateful_tokens:
            for token in [t for t, due in self._stateful_tokens.items() if due < now]:
                del self._stateful_tokens[token]
        if self._resumable:
            # Stateful sessions whose window to resume passed end here; ended ones go.
            for token in [t for t, s in self._resumable.items() if s.resume_over(now)]:
                del self._resumable[token]

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
        for peer in list(self.live):
            if isinstance(peer, ServerConnection):
                if mode == "drop":
                    peer.abort()
                peer.silenced = mode == "silence"

    def admit(self) -> str | None:
        """Whether a new connection may be served (None), or why not (it gets a 503). Past
        ``max_http_connections`` the HTTP connection that has waited longest for its current
        request makes room.

        ``max_connections`` bounds WebSockets (an upgrade past it is a 503); a few HTTP
        connections more are let in, so that health checks and negotiates are answered
        while the relay is full."""
        if len(self.live) + len(self._http) >= self.max_connections + _HTTP_OVER_LIMIT:
            return (f"the relay holds its limit of {self.max_connections} connections; "
                    "retry later")
        if len(self._http) >= self.config.max_http_connections:
            oldest = next(iter(self._http))
            self._http.pop(oldest).cancel()
            self.stats.http_evictions += 1
        return None

    def refused(self, reason: str) -> None:
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
            self._add_live(peer)
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
                if (request.method == "GET" and self._http_transports
                        and _is_client_path(request.path)):
                    served = await self._client_get(http, request)
                    if not isinstance(served, Response):
                        return served  # an event stream (its peer), or a poll's client left
                    response = served
                else:
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
        if _is_client_path(path):
            if not self._http_transports:
                raise HttpError(400, "the client endpoint expects a WebSocket upgrade "
                                     "(Server-Sent Events and long polling are not enabled)")
            if request.method == "POST":
                return self._client_post(request)
            if request.method == "DELETE":
                return self._client_delete(request)
            raise HttpError(405, "the client endpoint expects GET, POST or DELETE",
                            headers=[("Allow", "GET, POST, DELETE")])
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
        claims = self.auth.authenticate(request, "client", hub)
        if self.ops.draining:
            raise HttpError(503, "the relay is shutting down; negotiate again elsewhere")
        try:
            version = parse_negotiate_version(request.arg("negotiateVersion"))
        except RemoteProtocolError as exc:
            return Response.json(200, negotiate_error(str(exc)))
        connection_id = self.ops.new_connection_id()
        token = self._negotiated.issue(connection_id, hub, user_id_from_claims(claims),
                                       self.config.negotiate_timeout, signed=version >= 1)
        # Stateful reconnect is offered only to a client that asks (it refuses it unasked),
        # and not by a worker that shares its port (a resume must reach the process that
        # holds the connection; the kernel would hand it to any of them).
        stateful = (self.config.stateful_reconnect_buffer > 0
                    and not self.config.reuse_port
                    and "WebSockets" in self.config.transports
                    and (request.arg("useStatefulReconnect") or "").lower() == "true")
        if stateful:
            self._stateful_tokens[token] = self.ops.now() + self.config.negotiate_timeout
        return Response.json(200, negotiate_response(
            connection_id, token if version >= 1 else None, version,
            transports=available_transports(self.config.transports),
            use_stateful_reconnect=stateful))

    async def _upgrade(self, http: HttpConnection, request: Request
                       ) -> tuple[Peer, bytes] | None:
        kind = request.path.strip("/")
        try:
            if kind not in ("client", "server"):
                raise HttpError(404, f"no WebSocket endpoint at {request.path}")
            hub = self._hub_of(request)
            claims = self.auth.authenticate(request, kind, hub)
            key = request.headers.get("sec-websocket-key", "")
            if request.headers.get("sec-websocket-version") != "13":
                raise HttpError(426, "only WebSocket version 13 is supported",
                                headers=[("Sec-WebSocket-Version", "13")])
            if not is_valid_client_key(key):
                raise HttpError(400, "missing or malformed Sec-WebSocket-Key")
            self._check_room()
            if kind == "server" and self.fault_mode in ("refuse", "drop"):
                raise HttpError(503, "server connections are refused (fault injection)")
            if kind == "server" and self.fault_mode == "silence":
                await self._hold_silenced(http.stream)
                raise HttpError(503, "server connections were silenced (fault injection)")
            if kind == "server":
                server_id = (request.headers.get("x-asrs-server-id")
                             or user_id_from_claims(claims) or secrets.token_hex(8))
                return await self._accept(http, key, ServerConnection(
                    self.io, self.ops, hub=hub, server_id=server_id, now=self.ops.now()))
            if "WebSockets" not in self.config.transports:
                raise HttpError(404, "WebSockets transport not supported by this end point type")
            token = request.arg("id")
            resuming = None if token is None else self._resumable.get(token)
            if resuming is not None:
                self._check_resume(token, resuming, hub, claims)  # type: ignore[arg-type]
            elif token is not None:
                connection_id = self._take_pending(token, hub, claims)
            else:  # skipNegotiation
                connection_id = self.ops.new_connection_id()
            if resuming is None:
                self._check_hub_limit(hub)
        except HttpError as exc:
            await http.send_response(self._with_cors(request, Response.error(exc)), close=True)
            return None
        config = self.config
        if resuming is not None:  # the same connection on a new WebSocket
            return await self._accept(http, key, ResumedTransport(
                self.io, resuming, max_message_size=config.max_message_size,
                send_limit=config.send_buffer_limit, now=self.ops.now()))
        stateful = token is not None and self._stateful_tokens.pop(token, None) is not None
        session = self._new_session(request, connection_id, hub, claims, stateful=stateful)
        if stateful:
            self._resumable[token] = session  # type: ignore[index,assignment]
        return await self._accept(http, key, WebSocketTransport(
            self.io, session, max_message_size=config.max_message_size,
            send_limit=config.send_buffer_limit, now=self.ops.now()))

    def _take_pending(self, token: str, hub: str, claims: dict[str, Any]) -> str:
        """The connection id negotiate gave ``token``, which is spent: a client opens one
        transport per negotiate. Only the user that negotiated may use it, on the same hub."""
        if token in self._by_token:
            raise HttpError(400, "Cannot change transports mid-connection")
        return self._negotiated.take(token, hub, user_id_from_claims(claims))

    def _check_resume(self, token: str, session: StatefulSession, hub: str,
                      claims: dict[str, Any]) -> None:
        """A WebSocket that resumes ``session`` (stateful reconnect): the same hub and user,
        and a session still open with the feature on (a client that was closed, or did not
        turn it on in its handshake, gets 404, as from ASP.NET Core)."""
        if session.hub != hub or not session.can_resume():
            if session.state >= ConnState.CLOSING:  # over: forget the token
                del self._resumable[token]
            raise HttpError(404, "unknown or expired connection id; negotiate again")
        if session.user_id != user_id_from_claims(claims):
            raise HttpError(403, "the connection id was negotiated by another user")

    def _check_room(self) -> None:
        """Refuse a new connection when the relay drains or is full."""
        if self.ops.draining:
            raise HttpError(503, "the relay is shutting down")
        if len(self.live) >= self.max_connections:
            self.stats.connections_refused += 1
            raise HttpError(503, f"the relay holds its limit of {self.max_connections} "
                                 "connections; retry later", headers=[("Retry-After", "1")])

    def _check_hub_limit(self, hub: str) -> None:
        limit = self.config.max_connections_per_hub
        if limit and self.ops.connection_count(hub) >= limit:
            raise HttpError(429, f"hub '{hub}' has reached its limit of {limit} connections")

    def _new_session(self, request: Request, connection_id: str, hub: str,
                     claims: dict[str, Any], *, stateful: bool = False) -> ClientSession:
        query = query_without(request.raw_query, _QUERY_NOT_FORWARDED)
        return (StatefulSession if stateful else ClientSession)(
            self.ops, connection_id=connection_id, hub=hub, claims=claims,
            user_id=user_id_from_claims(claims), query=f"?{query}" if query else "",
            headers=_forwarded_headers(request))

    # -- Server-Sent Events and long polling ---------------------------------------------------

    def _connection_of(self, request: Request) -> tuple[str, dict[str, Any], str]:
        """A ``/client`` request's hub, claims (its token checked) and connection token."""
        hub = self._hub_of(request)
        token = request.arg("id")
        if not token:
            raise HttpError(400, _NO_CONNECTION_ID)
        return hub, self.auth.authenticate(request, "client", hub), token

    def _open_transport(self, token: str, hub: str, claims: dict[str, Any]) -> _HttpTransport:
        """The open connection ``token`` names, if the caller is the user that opened it."""
        transport = self._by_token.get(token)
        if transport is None or transport.session.hub != hub:
            raise HttpError(404, "no connection with that id; negotiate again")
        if transport.session.user_id != user_id_from_claims(claims):
            raise HttpError(403, "the connection belongs to another user")
        return transport

    async def _client_get(self, http: HttpConnection, request: Request
                          ) -> Response | tuple[Peer, bytes] | None:
        """An event stream's ``GET`` (the stream, as a peer to start), or a long poll (its
        answer; None when its client went away while it waited)."""
        hub, claims, token = self._connection_of(request)
        streaming = _accepts_event_stream(request)
        kind = "ServerSentEvents" if streaming else "LongPolling"
        if kind not in self.config.transports:
            raise HttpError(404, f"{kind} transport not supported by this end point type")
        if streaming and http.conn.their_http_version != b"1.1":
            raise HttpError(505, "an event stream needs HTTP/1.1 (its body is chunked)")
        if token in self._by_token:
            transport = self._open_transport(token, hub, claims)
            if isinstance(transport, LongPollingTransport) and not streaming:
                return await self._poll(http, transport)
            if isinstance(transport, ServerSentEventsTransport) and streaming:
                raise HttpError(409, "the connection's event stream is already open")
            raise HttpError(400, "Cannot change transports mid-connection")
        connection_id = self._take_pending(token, hub, claims)
        self._check_room()
        self._check_hub_limit(hub)
        session = self._new_session(request, connection_id, hub, claims)
        config = self.config
        if streaming:
            return await self._open_event_stream(http, request, ServerSentEventsTransport(
                self.io, session, token=token, send_limit=config.send_buffer_limit,
                now=self.ops.now()))
        transport = LongPollingTransport(
            self.io, session, token=token, send_limit=config.send_buffer_limit,
            poll_timeout=config.poll_timeout, idle_timeout=config.poll_idle_timeout,
            clock=self.ops.now)
        self._register(transport)
        self._add_live(transport)
        # The first poll is answered at once: the client sends its handshake after it.
        return Response(200, headers=list(_NO_CACHE), content_type="application/octet-stream")

    async def _open_event_stream(self, http: HttpConnection, request: Request,
                                 transport: ServerSentEventsTransport) -> tuple[Peer, bytes]:
        """Write the event stream's head and first chunk; the socket is then the peer's."""
        head = self._with_cors(request, Response(200, headers=list(RESPONSE_HEADERS)))
        # No Content-Length: h11 frames the body in chunks, which the wire format continues.
        data = http.conn.send(h11.Response(status_code=200, headers=head.headers))
        data += http.conn.send(h11.Data(data=FIRST_CHUNK))
        # The client posts its handshake once it has read the head, which may be before this
        # task runs again: the connection is found from now on (what it queues waits).
        self._register(transport)
        try:
            await http.stream.send_all(data)
        except BaseException:
            transport.drop()  # never started: the session leaves, the token is forgotten
            raise
        return transport, b""

    async def _poll(self, http: HttpConnection, transport: LongPollingTransport
                    ) -> Response | None:
        """Hold a long poll until there is something for it, its time is up, or the
        connection ends (204); its client leaving ends the wait, not the connection."""
        stream = http.stream
        # A waiting poll is its client's connection: no HTTP request is late, none is evicted.
        scope = self._http.pop(stream, None)  # type: ignore[call-overload]
        left = False

        async def until_client_leaves(cancel_scope: trio.CancelScope) -> None:
            nonlocal left
            try:
                while data := await stream.receive_some(65536):
                    http.conn.receive_data(bytes(data))  # a pipelined request waits its turn
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            left = True
            cancel_scope.cancel()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(until_client_leaves, nursery.cancel_scope)
                data = await transport.poll()
                nursery.cancel_scope.cancel()
        finally:
            if scope is not None:
                self._http[stream] = scope  # type: ignore[index]
        if left:
            return None
        if data is None:
            return Response(204, headers=list(_NO_CACHE), content_type="text/plain")
        return Response(200, data, list(_NO_CACHE), content_type="application/octet-stream"
                        if data else "text/plain")

    def _client_post(self, request: Request) -> Response:
        """The client's messages, for its session (Server-Sent Events or long polling)."""
        hub, claims, token = self._connection_of(request)
        self._open_transport(token, hub, claims).receive_posted(request.body, self.ops.now())
        return Response(200, content_type="text/plain")

    def _client_delete(self, request: Request) -> Response:
        """A long-polling client stops: its connection ends now (a waiting poll gets 204)."""
        hub, claims, token = self._connection_of(request)
        transport = self._open_transport(token, hub, claims)
        if not isinstance(transport, LongPollingTransport):
            raise HttpError(400, "Cannot terminate this connection using the DELETE endpoint.")
        transport.drop()
        return Response(202, content_type="text/plain")

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



def open_file_budget() -> int:
    """The default ``max_connections``: the soft open-file limit less ``_FD_RESERVE``."""
    try:
        import resource
    except ImportError:  # not a Unix: no limit known here
        return 1 << 30
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return max(soft - _FD_RESERVE, 1)
