"""``HubServer``: maps hubs, keeps their server connections, negotiates their clients.

Each mapped hub is a ``HubDispatcher`` (``_dispatcher``: routing what the hub sends, its
clients and their client results) with a container of server connections per endpoint
(``_connection``). The server holds what the hubs share: the options and the endpoint router,
its id, the ids of acks and client invocations, the endpoints and their changes at run time
(``_scaling``), its lifetime, and the endpoint status events.
"""

from __future__ import annotations

import itertools
import logging
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final
from urllib.parse import quote

import anyio

from relaycore.protocol import generate_access_token, is_valid_hub_name, negotiate_redirect

from ._asgi import NegotiateApp, UserIdProvider
from ._connection import ACTIVE, EndpointHub, EndpointState
from ._dispatcher import HubDispatcher, resolve
from ._endpoints import (
    EndpointEvents,
    EndpointStatusEvent,
    HubServiceEndpoint,
    ServiceEndpoint,
    publish_status,
)
from ._errors import ServiceUnavailableError
from ._hub import GroupManager, Hub, HubClients, HubContext, UserGroupManager
from ._options import ServiceOptions
from ._router import EndpointRouter, NegotiateRequest
from ._scaling import EndpointSet, Lifetime

__all__ = ["HubServer"]

_log = logging.getLogger("relaycore.sdk")

#: Ack ids are positive int32 values (§2.4).
_MAX_ACK_ID: Final = 0x7FFFFFFF


class HubServer:
    """An app server's side of the relay: hubs, server connections, negotiate.

    ::

        class Chat(Hub):
            async def send(self, text):
                await self.clients.all.send("message", self.context.user_id, text)

        server = HubServer(ServiceOptions.from_env())
        server.map_hub("chat", Chat)
        async with server:                       # server connections up, reconnecting
            doc = await server.negotiate("chat", user_id="alice")   # {"url", "accessToken"}
            await server.hub_context("chat").clients.all.send("hello")

    ``async with`` opens ``connection_count`` connections per hub to every endpoint and
    returns once each has made its first attempt (up or failed: failed ones keep retrying
    in the background). Leaving it tells the service (``shutdown fin:0``), waits briefly for
    the ``finack``, and closes the sockets.

    Several endpoints (service-protocol §11): primaries get server connections that carry
    clients, secondaries Weak ones that only deliver this server's messages. Negotiate and
    message routing follow ``ServiceOptions.endpoint_router``. Endpoints can be added and
    removed while the server runs (``add_endpoint``, ``remove_endpoint``,
    ``set_endpoints``, or a watched ``ServiceOptions.config_file``); every endpoint's status
    is in ``hub_endpoints(hub)``, and its changes come out of ``endpoint_events()``.
    """

    #: Make every server connection Weak, so that the service binds no client to this server
    #: (a subclass sets it: the management SDK's persistent transport only sends).
    weak_connections: bool = False

    def __init__(self, options: ServiceOptions) -> None:
        self.options = options
        #: Chooses endpoints for negotiate and for messages.
        self.endpoint_router: EndpointRouter = options.endpoint_router or EndpointRouter()
        #: ``X-ASRS-Server-Id`` and the ``nameid`` of this server's tokens.
        self.server_id = options.server_id or f"{socket.gethostname()}_{uuid.uuid4().hex}"
        self._dispatchers: dict[str, HubDispatcher] = {}
        self._life = Lifetime()
        self._endpoints = EndpointSet(options, self._dispatchers, self._life)
        self._ack_ids = itertools.count(1)
        self._invocation_prefix = uuid.uuid4().hex[:12]
        self._invocation_ids = itertools.count(1)
        self._listeners: list[EndpointEvents] = []

    # Configuration -------------------------------------------------------------------------

    @property
    def endpoints(self) -> tuple[ServiceEndpoint, ...]:
        """The configured endpoints, de-duplicated (``ServiceOptions.all_endpoints``), with
        those added since and without those being removed."""
        return self._endpoints.configured()

    def endpoint_states(self) -> list[tuple[ServiceEndpoint, EndpointState]]:
        """Every endpoint in the routing store and its state (internal)."""
        return self._endpoints.states()

    def make_container(
        self, dispatcher: HubDispatcher, endpoint: ServiceEndpoint, state: EndpointState
    ) -> EndpointHub:
        """A hub's container of an endpoint (internal: the management SDK's REST transport
        makes its own)."""
        return EndpointHub(dispatcher, endpoint, state)

    def map_hub(
        self, name: str, hub_class: type[Hub], *, factory: Callable[[], Hub] | None = None
    ) -> None:
        """Serve ``hub_class`` as hub ``name`` (matched case-insensitively). ``factory``
        makes the hub instances (default: ``hub_class()``), e.g. to inject dependencies.

        Raises ``ValueError`` for an invalid or duplicate name, ``TypeError`` when
        ``hub_class`` is not a ``Hub`` subclass or two of its methods answer the same name.
        """
        if self._life.running:
            raise RuntimeError("map hubs before entering 'async with server'")
        if not isinstance(name, str) or not is_valid_hub_name(name):
            raise ValueError(
                f"hub name {name!r} is invalid; expected a letter then up to 127 letters, "
                "digits or _`,.[]"
            )
        if name.lower() in self._dispatchers:
            raise ValueError(f"hub {name!r} is already mapped")
        self._dispatchers[name.lower()] = HubDispatcher(self, name, hub_class, factory)

    def _dispatcher(self, hub: str) -> HubDispatcher:
        dispatcher = self._dispatchers.get(hub.lower()) if isinstance(hub, str) else None
        if dispatcher is None:
            raise KeyError(f"hub {hub!r} is not mapped; mapped hubs: {sorted(self._dispatchers)}")
        return dispatcher

    def _containers(self) -> list[EndpointHub]:
        return [c for dispatcher in self._dispatchers.values() for c in dispatcher.containers]

    @property
    def hubs(self) -> list[str]:
        """The names of the mapped hubs, as given to ``map_hub``."""
        return [dispatcher.name for dispatcher in self._dispatchers.values()]

    # Ids ----------------------------------------------------------------------------------

    def next_ack_id(self) -> int:
        """A fresh positive int32 ack id (§2.4)."""
        ack_id = next(self._ack_ids)
        if ack_id >= _MAX_ACK_ID:
            self._ack_ids = itertools.count(2)
            ack_id = 1
        return ack_id

    def next_invocation_id(self) -> str:
        """A fresh invocation id for a server-to-client invocation, unique across servers."""
        return f"{self._invocation_prefix}-{next(self._invocation_ids)}"

    # Lifetime -----------------------------------------------------------------------------

    async def __aenter__(self) -> HubServer:
        if not self._dispatchers:
            raise RuntimeError("no hub is mapped; call server.map_hub(name, HubClass) first")
        life = self._life
        task_group = await life.begin("a HubServer runs once; make a new one to start again")
        containers = self._containers()
        try:
            for container in containers:
                task_group.start_soon(container.run)
            with anyio.move_on_after(self.options.handshake_timeout + 1):
                for container in containers:
                    await container.ready.wait()
            config_file = self.options.config_file
            if config_file is not None:
                self._endpoints.watch(config_file)
        except BaseException:
            life.running = False
            task_group.cancel_scope.cancel()
            await task_group.__aexit__(*sys.exc_info())
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        life = self._life
        task_group = life.task_group
        assert task_group is not None, "HubServer.__aexit__ without __aenter__"
        connections = [c for container in self._containers() for c in container.connections]
        up = sum(connection.connected for connection in connections)
        try:
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(self.options.shutdown_timeout):
                    async with anyio.create_task_group() as shutdowns:
                        for connection in connections:
                            shutdowns.start_soon(connection.shutdown)
        finally:
            life.running = False
            task_group.cancel_scope.cancel()
            life.task_group = None
            try:
                # The body's own exception propagates as is (not wrapped in an ExceptionGroup).
                await task_group.__aexit__(None, None, None)
            finally:
                for listener in list(self._listeners):
                    listener.close()
                for container in self._containers():
                    container.notify()  # wake a staging that waits for them
                _log.info(
                    "app server %s stopped: %d server connections closed", self.server_id, up
                )

    # Status --------------------------------------------------------------------------------

    def hub_endpoints(self, hub: str) -> list[HubServiceEndpoint]:
        """Every endpoint of ``hub`` with its live ``online`` and ``metrics``: those being
        added and removed included (the endpoints routers see for messages)."""
        return [c.hub_endpoint for c in self._dispatcher(hub).containers]

    def online_endpoints(self, hub: str) -> list[HubServiceEndpoint]:
        """The endpoints with at least one server connection up for ``hub``."""
        return [c.hub_endpoint for c in self._dispatcher(hub).online()]

    async def wait_online(self, hub: str | None = None) -> None:
        """Wait until every endpoint has a connection up for ``hub`` (every hub when
        ``None``). Bound it with ``anyio.fail_after``."""
        dispatchers = (
            [self._dispatcher(hub)] if hub is not None else list(self._dispatchers.values())
        )
        for dispatcher in dispatchers:
            for container in list(dispatcher.containers):
                await container.wait_until(lambda c: c.online)

    def endpoint_events(self) -> EndpointEvents:
        """Every ``EndpointStatusEvent`` from now on, as an async iterator that ends when the
        server stops (see ``EndpointEvents``)::

            async with server.endpoint_events() as events:
                async for event in events:
                    ...
        """
        events = EndpointEvents(self._unsubscribe)
        if self._life.stopped:
            events.close()
        else:
            self._listeners.append(events)
        return events

    def _unsubscribe(self, events: EndpointEvents) -> None:
        if events in self._listeners:
            self._listeners.remove(events)

    def refusal(self, hub: str) -> str | None:
        """Why no endpoint offered to clients of ``hub`` is online, when the service refuses
        this app server's connections (a wrong access key: HTTP 401 and the relay's reason);
        ``None`` when an endpoint is online or none was refused. Negotiate answers it."""
        offered = [c for c in self._dispatcher(hub).containers if c.state == ACTIVE]
        if any(c.online for c in offered):
            return None
        reasons = [reason for c in offered if (reason := c.refusal()) is not None]
        return "; ".join(reasons) or None

    def publish_status(self, event: EndpointStatusEvent) -> None:
        """Publish an endpoint's status change (called by its container)."""
        publish_status(self._listeners, self.options.on_endpoint_status, event)

    # Endpoints at run time (``_scaling``) -----------------------------------------------

    async def add_endpoint(self, endpoint: ServiceEndpoint | str) -> bool:
        """Add an endpoint (a ``ServiceEndpoint``, or a connection string for an unnamed
        primary) and return once it is offered to new clients (§11.3 Add).

        While the server runs, every hub first opens its server connections to it (messages
        already go to it), then the SDK waits until the endpoint's ``servers`` list matches
        the other endpoints' (every app server connected to them is connected to it too, so
        that none misses a client that lands there). Only then does negotiate offer it.
        That staging is bounded by ``server_scale_timeout``: past it an error is logged, the
        endpoint is offered anyway and the result is ``False``; otherwise ``True``.

        Raises ``ValueError`` when an endpoint with the same ``{scheme}://{host}:{port}`` is
        already configured (or still being removed).
        """
        return await self._endpoints.add(endpoint)

    async def remove_endpoint(self, endpoint: ServiceEndpoint | str) -> bool:
        """Remove an endpoint (a ``ServiceEndpoint``, or its name) and return once its server
        connections are closed (§11.3 Remove).

        Negotiate stops offering it at once, and the service is told (``shutdown fin:0``)
        to bind no new client to this server there. Messages still go to it until the
        service says (``status`` "0") that no client bound to this server is left, or until
        ``server_scale_timeout`` (an error is logged; the result is then ``False``). Then
        its connections close.

        Raises ``ValueError`` when it is not configured, or when it is the last primary.
        """
        return await self._endpoints.remove(endpoint)

    async def set_endpoints(self, endpoints: Iterable[ServiceEndpoint | str]) -> bool:
        """Make the server's endpoints ``endpoints``: add the new ones, remove the missing
        ones, and take a new name, role or key of an existing one in place (its connections
        stay, §11.3). Additions and removals run concurrently, as ``add_endpoint`` and
        ``remove_endpoint`` do them; returns ``True`` when every one finished in time.

        This is what a change of the watched ``ServiceOptions.config_file`` does. A newer
        call supersedes the changes of an older one that have not started yet.
        """
        return await self._endpoints.replace(endpoints)

    # The API --------------------------------------------------------------------------------

    def hub_context(self, hub: str) -> HubContext:
        """``clients``, ``groups`` and ``user_groups`` of ``hub``, for code outside hub
        methods (a background job; another pod)."""
        dispatcher = self._dispatcher(hub)
        return HubContext(
            HubClients(dispatcher), GroupManager(dispatcher), UserGroupManager(dispatcher)
        )

    async def negotiate(
        self,
        hub: str,
        user_id: str | None = None,
        claims: Mapping[str, Any] | None = None,
        lifetime: float | None = None,
        *,
        path: str | None = None,
        query: str | None = None,
        headers: Mapping[str, str] | None = None,
        scope: Mapping[str, Any] | None = None,
        endpoint: ServiceEndpoint | None = None,
    ) -> dict[str, Any]:
        """The negotiate redirect for a client of ``hub``: ``{"url", "accessToken"}``.

        The endpoint is the router's ``get_negotiate_endpoint`` among the endpoints offered
        to clients (not those being added or removed); by default a random online primary,
        else an online secondary (§11.2). The token is signed with that endpoint's key,
        carries ``asrs.s.uid`` = ``user_id`` and the user's ``claims`` (§9.2), and lives
        ``lifetime`` seconds (default ``access_token_lifetime``). ``path`` (the app's hub
        path, sent as ``asrs.op``) and ``query`` (the negotiate request's query) are appended
        to the URL as the Azure SDK does; ``headers`` and ``scope`` (the HTTP request's)
        are only for the router (``NegotiateRequest``). ``endpoint`` (one of the hub's)
        bypasses the router: the redirect is to that endpoint, online or not.

        Raises ``ServiceUnavailableError`` when no endpoint is online (or the router chose
        none; it says why when the service refuses this app server's connections, e.g. a
        wrong access key), and whatever the router raises (``NegotiateError`` to refuse the
        request).
        """
        dispatcher = self._dispatcher(hub)
        request = NegotiateRequest(
            hub=hub,
            user_id=user_id,
            claims=dict(claims or {}),
            path=path,
            query=(query or "").lstrip("?&"),
            headers=dict(headers or {}),
            scope=scope,
        )
        if endpoint is None:
            offered = [c.hub_endpoint for c in dispatcher.containers if c.state == ACTIVE]
            try:
                chosen = await resolve(
                    self.endpoint_router.get_negotiate_endpoint(request, offered)
                )
            except ServiceUnavailableError as exc:
                refusal = self.refusal(hub)
                if refusal is None:
                    raise
                raise ServiceUnavailableError(refusal) from exc
            if chosen is None:
                raise ServiceUnavailableError(
                    f"the endpoint router chose no endpoint for a client of hub {hub!r}"
                )
        else:
            chosen = endpoint
        endpoint = dispatcher.container_for(chosen).endpoint
        connection = endpoint.connection
        url = connection.client_url(dispatcher.wire_name)
        if path:
            url += f"&asrs.op={quote(path, safe='')}"
        if request.query:
            url += f"&{request.query}"
        token_claims: dict[str, Any] = dict(claims or {})
        count = len(self.endpoints)
        if count > 1:
            token_claims["asrs.s.secn"] = str(count)
        if self.options.enable_detailed_errors:
            token_claims["asrs.s.derror"] = "True"
        token = generate_access_token(
            endpoint.access_key,
            connection.client_audience(dispatcher.wire_name),
            now=time.time(),
            lifetime=self.options.access_token_lifetime if lifetime is None else lifetime,
            user_id=user_id,
            claims=token_claims,
        )
        return negotiate_redirect(url, token)

    def asgi(
        self,
        *,
        user_id_provider: UserIdProvider | None = None,
        cors_origins: tuple[str, ...] | list[str] = ("*",),
    ) -> NegotiateApp:
        """An ASGI app serving ``POST /{hub}/negotiate`` (see ``NegotiateApp``)::

        app = FastAPI(lifespan=lifespan)       # lifespan: async with server: yield
        app.mount("/hubs", server.asgi())      # clients use https://app/hubs/chat
        """
        return NegotiateApp(self, user_id_provider=user_id_provider, cors_origins=cors_origins)
