"""``HubDispatcher``: one mapped hub at run time, between its hub code and the service.

Outward, it takes what the hub's proxies and group managers send and writes it where it goes
(service-protocol §7, §11.2):

* The ``EndpointRouter`` (``ServiceOptions.endpoint_router``) chooses the endpoints of each
  message: by default every online endpoint, and for a connection the endpoint that holds it
  when it is one of this server's clients. With the default router the choice is made inline
  (no call per message).
* A send is serialised **once** per hub protocol (``{"json": ..., "messagepack": ...}``) into
  one service message, written on one ``Channel`` of every chosen endpoint; each endpoint
  delivers to the clients it holds. With the default router, a send to one client connected
  to this very server goes only on the connection that owns it, in that client's protocol.
* Inside a hub method, the connection that owns the caller is preferred on its endpoint, so
  that the method's sends, group changes and completion stay in order; elsewhere the first
  connected slot of each endpoint is used (one task's sends stay in order).
* ``...WithAck`` requests go to every chosen endpoint and wait for all the Acks; the answer is
  true if any endpoint says Ok, and an error from any endpoint is raised (for a request about
  one connection, only when no endpoint said Ok: the others do not hold it).

Inward, it is what the hub's server connections hand their clients and the service's word on
them to: it makes the ``ClientConnection`` of each OpenConnection, knows the clients this
server owns, and keeps their client results (``_results``).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol, TypeVar

import anyio

from relaycore.protocol import (
    AckStatus,
    ClientCompletionMessage,
    ClientInvocationMessage,
    CompletionMessage,
    ErrorCompletionMessage,
    InvocationMessage,
    JsonHubProtocol,
    MessagePackHubProtocol,
    OpenConnectionMessage,
    ServiceMessage,
    wire_hub_name,
)

from ._client import ClientConnection, current_service_connection
from ._connection import Channel, Client, EndpointHub, EndpointState, ServiceConnection
from ._endpoints import EndpointStatusEvent, HubServiceEndpoint, ServiceEndpoint
from ._errors import (
    NOT_CONNECTED_MESSAGE,
    AckTimeoutError,
    ServiceError,
    ServiceUnavailableError,
)
from ._hub import (
    ALL,
    BROADCAST,
    CONNECTIONS,
    GROUPS,
    USER_GROUP,
    USERS,
    Hub,
    HubMethodTable,
    Recipients,
    Route,
)
from ._options import ServiceOptions
from ._results import ClientResults
from ._router import EndpointRouter

__all__ = ["HubDispatcher", "Server", "resolve"]

_log = logging.getLogger("relaycore.sdk")
_T = TypeVar("_T")

_PROTOCOLS: Final = (JsonHubProtocol(), MessagePackHubProtocol())


async def resolve(value: _T | Awaitable[_T]) -> _T:
    """A router method's answer (routers may be ``async def``)."""
    if inspect.isawaitable(value):
        return await value
    return value


class Server(Protocol):
    """What a hub's dispatcher uses of its ``HubServer``."""

    options: ServiceOptions
    server_id: str
    endpoint_router: EndpointRouter
    weak_connections: bool

    def endpoint_states(self) -> list[tuple[ServiceEndpoint, EndpointState]]: ...

    def make_container(
        self, dispatcher: HubDispatcher, endpoint: ServiceEndpoint, state: EndpointState
    ) -> EndpointHub: ...

    def refusal(self, hub: str) -> str | None: ...

    def next_ack_id(self) -> int: ...

    def next_invocation_id(self) -> str: ...

    def publish_status(self, event: EndpointStatusEvent) -> None: ...


class HubDispatcher:
    """Everything one mapped hub needs at run time: its methods, its endpoint containers,
    its local clients and pending client results (see the module doc)."""

    def __init__(
        self,
        server: Server,
        name: str,
        hub_class: type[Hub],
        factory: Callable[[], Hub] | None,
    ) -> None:
        self.server = server
        self.options = server.options
        self.server_id = server.server_id
        self.name = name
        self.wire_name = wire_hub_name(name, server.options.application_name)
        self.methods = HubMethodTable(hub_class)
        self.hub_factory: Callable[[], Hub] = factory or hub_class
        #: The routing store: an ``EndpointHub`` per endpoint, whatever its state.
        self.containers = [
            server.make_container(self, endpoint, state)
            for endpoint, state in server.endpoint_states()
        ]
        #: Clients owned by this server's connections, by connection id.
        self.local_clients: dict[str, ClientConnection] = {}
        self.results = ClientResults(self.server_id, self.local_clients)

    @property
    def weak_connections(self) -> bool:
        """Every server connection of the hub is Weak (``HubServer.weak_connections``)."""
        return self.server.weak_connections

    def publish_status(self, event: EndpointStatusEvent) -> None:
        """An endpoint went online or offline for this hub (its container says)."""
        self.server.publish_status(event)

    # Choosing endpoints and connections --------------------------------------------------

    def online(self) -> list[EndpointHub]:
        """The containers with at least one connection up."""
        return [c for c in self.containers if c.online]

    def add_container(self, endpoint: ServiceEndpoint, state: EndpointState) -> EndpointHub:
        """Put an endpoint into the routing store."""
        container = self.server.make_container(self, endpoint, state)
        self.containers.append(container)
        return container

    def containers_of(self, identity: str) -> list[EndpointHub]:
        """The containers of the endpoint with this identity (one, or none)."""
        return [c for c in self.containers if c.endpoint.identity == identity]

    def container_for(self, endpoint: ServiceEndpoint) -> EndpointHub:
        """The container of an endpoint a router returned; ``ValueError`` when it is not an
        endpoint of this hub."""
        for container in self.containers:
            if isinstance(endpoint, HubServiceEndpoint):
                if endpoint._container is container:
                    return container
            elif isinstance(endpoint, ServiceEndpoint):
                if container.endpoint.identity == endpoint.identity:
                    return container
        raise ValueError(
            f"the endpoint router returned {endpoint!r}, which is not an endpoint of hub "
            f"{self.name!r}; return some of the endpoints it was given"
        )

    @property
    def default_routing(self) -> bool:
        """Whether the router is the default one (choices are then made inline)."""
        return type(self.server.endpoint_router) is EndpointRouter

    async def endpoints_for(self, route: Route) -> list[EndpointHub]:
        """The containers ``route`` goes to, as the endpoint router chooses (§11.2)."""
        containers = self.containers
        if self.default_routing and route.kind != CONNECTIONS:
            return [c for c in containers if c.online]
        router = self.server.endpoint_router
        endpoints = [c.hub_endpoint for c in containers]
        kind, keys = route.kind, route.keys
        per_key = {
            USERS: router.get_endpoints_for_user,
            GROUPS: router.get_endpoints_for_group,
            CONNECTIONS: router.get_endpoints_for_connection,
        }
        chosen: list[ServiceEndpoint] = []
        if kind == ALL:
            chosen.extend(await resolve(router.get_endpoints_for_broadcast(endpoints)) or ())
        elif kind in per_key:
            for key in keys:
                chosen.extend(await resolve(per_key[kind](key, endpoints)) or ())
        elif kind == USER_GROUP:
            # §11.2: a user's group membership goes where both the user and the group go.
            for_user = list(await resolve(router.get_endpoints_for_user(keys[0], endpoints)) or ())
            if len(keys) > 1:
                for_group = {
                    id(self.container_for(e))
                    for e in await resolve(router.get_endpoints_for_group(keys[1], endpoints))
                    or ()
                }
                for_user = [e for e in for_user if id(self.container_for(e)) in for_group]
            chosen = for_user
        else:
            raise AssertionError(f"unknown route kind {kind!r}")
        result: dict[int, EndpointHub] = {}
        for endpoint in chosen:
            container = self.container_for(endpoint)
            result.setdefault(id(container), container)
        return list(result.values())

    def _describe(self, route: Route) -> str:
        if route.kind == ALL:
            return "a broadcast"
        if route.kind == USER_GROUP:
            return f"user {route.keys[0]!r} in group {route.keys[1:] or '(all)'}"
        return f"{route.kind} {', '.join(route.keys)}"

    async def _targets(self, route: Route) -> list[Channel]:
        """One channel of every endpoint ``route`` goes to (the caller's own connection
        where it is one of them)."""
        containers = await self.endpoints_for(route)
        preferred = current_service_connection.get()
        targets = []
        for container in containers:
            channel = container.pick(preferred)
            if channel is not None:
                targets.append(channel)
        if not targets:
            if self.default_routing:
                why = self.server.refusal(self.name) or NOT_CONNECTED_MESSAGE
                raise ServiceUnavailableError(f"no endpoint is online for hub {self.name!r}; {why}")
            if not containers:
                raise ServiceUnavailableError(
                    f"the endpoint router chose no endpoint for {self._describe(route)} "
                    f"of hub {self.name!r}"
                )
            raise ServiceUnavailableError(
                f"no endpoint the router chose for {self._describe(route)} of hub "
                f"{self.name!r} is online: {', '.join(str(c.endpoint) for c in containers)}"
            )
        return targets

    # Sending -------------------------------------------------------------------------------

    async def _channels_and_payloads(
        self, invocation: InvocationMessage, route: Route, connection_id: str | None = None
    ) -> tuple[list[Channel], dict[str, bytes]]:
        """Where ``invocation`` goes and its serialised payloads: with the default router,
        for one client of this server, the connection that owns it and the client's
        protocol alone; else one channel per chosen endpoint and every protocol."""
        if connection_id is not None and self.default_routing:
            client = self.local_clients.get(connection_id)
            if client is not None and client.protocol is not None:
                protocol = client.protocol
                return [client.service_connection], {protocol.name: protocol.write(invocation)}
        targets = await self._targets(route)
        return targets, {protocol.name: protocol.write(invocation) for protocol in _PROTOCOLS}

    async def _write_everywhere(self, targets: list[Channel], message: ServiceMessage) -> None:
        if len(targets) == 1:
            await targets[0].send(message)
            return
        failures: list[ServiceUnavailableError] = []

        async def write(channel: Channel) -> None:
            try:
                await channel.send(message)
            except ServiceUnavailableError as exc:
                failures.append(exc)

        async with anyio.create_task_group() as task_group:
            for channel in targets:
                task_group.start_soon(write, channel)
        if len(failures) == len(targets):
            raise failures[0]
        for failure in failures:
            _log.warning("a message reached only some endpoints: %s", failure)

    async def send(self, to: Recipients, method: str, args: tuple[Any, ...]) -> None:
        """Send an invocation of ``method`` to the clients ``to`` names, on the endpoints the
        router chooses for them."""
        connection_id = to.connection_id
        if connection_id is not None and self.default_routing:
            # The hot path of a hub method answering its caller: what ``_channels_and_payloads``
            # chooses for a client of this server, without the message object in between.
            client = self.local_clients.get(connection_id)
            if client is not None and (protocol := client.protocol) is not None:
                payloads = {protocol.name: protocol.write_invocation(method, args)}
                await client.service_connection.send(to.build(payloads))
                return
        targets, payloads = await self._channels_and_payloads(
            InvocationMessage(method, args), to.route, to.connection_id
        )
        await self._write_everywhere(targets, to.build(payloads))

    async def write(self, message: ServiceMessage, route: Route = BROADCAST) -> None:
        """Write a service message that carries no hub message (CloseConnection, §7) to the
        endpoints the router chooses for ``route``."""
        await self._write_everywhere(await self._targets(route), message)

    async def request_ack(self, build: Callable[[int], ServiceMessage], route: Route) -> bool:
        """Send a ``...WithAck`` request to the endpoints the router chooses for ``route``;
        True if any says Ok."""
        targets = await self._targets(route)
        outcomes: list[bool] = []
        errors: list[ServiceError] = []

        async def ask(channel: Channel) -> None:
            try:
                status, text = await channel.request_ack(build, self.server.next_ack_id())
            except ServiceError as exc:
                errors.append(exc)
                return
            if status == AckStatus.OK:
                outcomes.append(True)
            elif status == AckStatus.NOT_FOUND:
                outcomes.append(False)
            elif status == AckStatus.TIMEOUT:
                errors.append(AckTimeoutError(f"{channel.endpoint}: {text or 'timeout'}"))
            else:
                errors.append(
                    ServiceError(f"{channel.endpoint} answered with ack status {status}: {text}")
                )

        if len(targets) == 1:
            await ask(targets[0])
        else:
            async with anyio.create_task_group() as task_group:
                for channel in targets:
                    task_group.start_soon(ask, channel)
        # About one connection: only the endpoint that holds it knows; the others' failures
        # do not count once it said Ok.
        if errors and not (route.kind == CONNECTIONS and any(outcomes)):
            raise errors[0]
        return any(outcomes)

    async def invoke_client(
        self, connection_id: str, method: str, args: tuple[Any, ...], timeout: float | None
    ) -> Any:
        """Invoke ``method`` on one client and wait for its result (§2.5, ``_results``)."""
        invocation_id = self.server.next_invocation_id()
        invocation = InvocationMessage(method, args, invocation_id=invocation_id)
        with self.results.awaiting(invocation_id, connection_id) as pending:
            targets, payloads = await self._channels_and_payloads(
                invocation, Route(CONNECTIONS, (connection_id,)), connection_id
            )
            # An endpoint that does not hold the client answers ErrorCompletion: the call
            # fails only when every endpoint did.
            pending.errors_left = len(targets)
            message = ClientInvocationMessage(
                invocation_id, connection_id, self.server_id, payloads
            )
            await self._write_everywhere(targets, message)
            return await pending.outcome(timeout)

    # The hub's clients ------------------------------------------------------------------------

    def open_client(
        self, connection: ServiceConnection, message: OpenConnectionMessage
    ) -> ClientConnection:
        """The client ``message`` announces, owned by ``connection`` (it runs it)."""
        client = ClientConnection(self, connection, message)
        self.local_clients[message.connection_id] = client
        return client

    def client_gone(self, client: Client) -> None:
        """Forget a client that left; fail the results still awaited from it."""
        if self.local_clients.get(client.connection_id) is client:
            del self.local_clients[client.connection_id]
        self.results.client_gone(client)

    async def client_completed(self, client: Client, completion: CompletionMessage) -> None:
        """A client sent a Completion (the result of a server-to-client invocation)."""
        await self.results.client_completed(client, completion)

    async def client_result(
        self, message: ClientInvocationMessage | ClientCompletionMessage | ErrorCompletionMessage
    ) -> None:
        """The service's word on a client invocation (``_results``)."""
        await self.results.from_service(message)
