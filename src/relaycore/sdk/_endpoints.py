"""Endpoints: as configured, and as one hub of this app server sees them at run time.

``ServiceEndpoint`` is configuration (a connection string, a role, a name). Once a hub is mapped,
every endpoint gets, for that hub, a ``HubServiceEndpoint``: the same endpoint plus what is true
right now, which is what an ``EndpointRouter`` decides on (service-protocol §11):

* ``online``: at least one of the hub's server connections to it is up (§11.1);
* ``metrics``: the ``EndpointMetrics`` the service last reported in a ping (§4.4);
* ``holds_connection(id)``: whether a client of this app server is connected through it.

Every change of ``online`` is published as an ``EndpointStatusEvent``: to the
``ServiceOptions.on_endpoint_status`` callback and to every ``HubServer.endpoint_events()``
iterator. (The container logs it, with the reason: see ``_connection``, "What is logged".)
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import logging
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

import anyio

from relaycore.protocol import ConnectionString

__all__ = [
    "Container",
    "EndpointEvents",
    "EndpointMetrics",
    "EndpointStatusEvent",
    "EndpointType",
    "HubServiceEndpoint",
    "ServiceEndpoint",
    "publish_status",
    "select_endpoints",
]

_log = logging.getLogger("relaycore.sdk")

#: Events an ``EndpointEvents`` iterator holds for a consumer that does not keep up; older ones
#: are dropped beyond this (with a warning), so that a forgotten iterator cannot grow forever.
_EVENT_BUFFER: Final = 1024


# --------------------------------------------------------------------------------------------
# Configuration


class EndpointType(enum.IntEnum):
    """The role of an endpoint (service-protocol §11.1)."""

    #: Gets Default server connections that carry clients; negotiate prefers it.
    PRIMARY = 0
    #: Gets Weak server connections that only send; negotiate uses it when no primary is online.
    SECONDARY = 1


def _endpoint_type(value: Any, where: str) -> EndpointType:
    if isinstance(value, EndpointType):
        return value
    if isinstance(value, str):
        try:
            return EndpointType[value.strip().upper()]
        except KeyError:
            pass
    elif isinstance(value, int) and not isinstance(value, bool):
        try:
            return EndpointType(value)
        except ValueError:
            pass
    raise ValueError(f"{where}: endpoint type {value!r} is invalid; expected primary or secondary")


@dataclasses.dataclass(frozen=True)
class ServiceEndpoint:
    """One relay (or Azure SignalR) endpoint the app server connects to.

    The connection string is parsed at construction; a bad one raises ``ValueError`` saying
    what is wrong::

        ServiceEndpoint("Endpoint=http://localhost:8080;AccessKey=...;Version=1.0;")
        ServiceEndpoint(backup_string, EndpointType.SECONDARY, name="west")

    ``str()`` and ``repr()`` never show the access key.
    """

    connection_string: str = dataclasses.field(repr=False)
    type: EndpointType = EndpointType.PRIMARY
    name: str = ""
    #: The parsed connection string.
    connection: ConnectionString = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        where = f"endpoint {self.name!r}" if self.name else "endpoint"
        object.__setattr__(self, "type", _endpoint_type(self.type, where))
        if not isinstance(self.connection_string, str):
            raise ValueError(
                f"{where}: connection string must be a str, got "
                f"{type(self.connection_string).__name__}"
            )
        try:
            connection = ConnectionString.parse(self.connection_string)
        except ValueError as exc:
            raise ValueError(f"{where}: invalid connection string: {exc}") from None
        if connection.access_key is None:
            raise ValueError(
                f"{where}: connection string has AuthType={connection.auth_type} but no "
                "AccessKey; relaycore's SDK signs tokens with an access key (Entra mode is not "
                "supported)"
            )
        object.__setattr__(self, "connection", connection)

    @property
    def endpoint(self) -> str:
        """The ``Endpoint`` URI of the connection string (no trailing ``/``)."""
        return self.connection.endpoint

    @property
    def access_key(self) -> str:
        """The key that signs server and client tokens for this endpoint."""
        assert self.connection.access_key is not None  # checked in __post_init__
        return self.connection.access_key

    @property
    def identity(self) -> str:
        """``{scheme}://{host}:{port}`` of the connection base: endpoints with the same
        identity are one endpoint (§11.1)."""
        parts = urlsplit(self.connection.server_base)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return f"{parts.scheme.lower()}://{(parts.hostname or '').lower()}:{port}"

    def __str__(self) -> str:
        role = self.type.name.lower()
        # The connection base (with Port=), so that two relays on one host read apart.
        return f"{self.name or '(default)'} {self.connection.server_base.rstrip('/')} [{role}]"


def select_endpoints(candidates: Iterable[ServiceEndpoint]) -> tuple[ServiceEndpoint, ...]:
    """De-duplicate endpoints by ``{scheme}://{host}:{port}``, preferring the primary
    (§11.1); raise ``ValueError`` when none is left or none is primary."""
    chosen: dict[str, ServiceEndpoint] = {}
    for endpoint in candidates:
        if not isinstance(endpoint, ServiceEndpoint):
            raise ValueError(f"expected ServiceEndpoint objects, got {type(endpoint).__name__}")
        seen = chosen.get(endpoint.identity)
        if seen is None or (
            seen.type is EndpointType.SECONDARY and endpoint.type is EndpointType.PRIMARY
        ):
            chosen[endpoint.identity] = endpoint
    if not chosen:
        raise ValueError(
            "no endpoint configured; give ServiceOptions(connection_string=...) or "
            "endpoints=[ServiceEndpoint(...)], or set Azure__SignalR__ConnectionString"
        )
    endpoints = tuple(chosen.values())
    if not any(e.type is EndpointType.PRIMARY for e in endpoints):
        raise ValueError("no primary endpoint configured; at least one endpoint must be primary")
    return endpoints


# --------------------------------------------------------------------------------------------
# At run time


@dataclasses.dataclass(frozen=True)
class EndpointMetrics:
    """What the service reports about one hub on one endpoint, from the ``clientcount``,
    ``servercount`` and ``capacity`` keys of its pings (service-protocol §4.4).

    All zero until the service reports them; relaycore's relay reports them when a server
    connection comes up and in every ``status`` reply, and ``capacity`` only when started
    with ``--capacity``. The default router weighs negotiate with them (§11.2).
    """

    #: Clients of the hub connected to the endpoint (from every app server).
    client_connection_count: int = 0
    #: Server connections of the hub to the endpoint (from every app server).
    server_connection_count: int = 0
    #: The endpoint's connection quota; 0 when unknown.
    connection_capacity: int = 0


class Container(Protocol):
    """Where a ``HubServiceEndpoint`` reads what is true now: the hub's container of the
    endpoint (``_connection.EndpointHub``, or the management SDK's ``RestEndpointHub``)."""

    @property
    def online(self) -> bool: ...

    @property
    def metrics(self) -> EndpointMetrics: ...

    def holds_connection(self, connection_id: str) -> bool: ...


class HubServiceEndpoint(ServiceEndpoint):
    """An endpoint as one hub of this app server sees it: the configured ``ServiceEndpoint``
    (``name``, ``type``, ``endpoint``, ...) plus ``hub``, ``online`` and ``metrics``, always
    current. ``EndpointRouter`` methods receive these::

        def get_negotiate_endpoint(self, request, endpoints):
            online = [e for e in endpoints if e.online]
            return min(online, key=lambda e: e.metrics.client_connection_count)

    It equals the ``ServiceEndpoint`` it was configured from; two of them are equal only
    when they are the same object (there is one per hub and endpoint).
    """

    # Not a dataclass itself: it adds run-time state to a frozen ServiceEndpoint, which a
    # frozen dataclass allows on subclasses for names that are not its fields.
    hub: str
    _container: Container

    def __init__(self, endpoint: ServiceEndpoint, hub: str, container: Container) -> None:
        super().__init__(endpoint.connection_string, endpoint.type, endpoint.name)
        object.__setattr__(self, "hub", hub)
        object.__setattr__(self, "_container", container)

    def __eq__(self, other: object) -> bool:
        # One object per hub and endpoint; equal to the ServiceEndpoint it was configured
        # from, so that ``endpoint in server.online_endpoints(hub)`` works with either.
        if isinstance(other, HubServiceEndpoint):
            return self is other
        if isinstance(other, ServiceEndpoint):
            return (self.connection_string, self.type, self.name) == (
                other.connection_string,
                other.type,
                other.name,
            )
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.connection_string, self.type, self.name))

    @property
    def online(self) -> bool:
        """Whether at least one of this hub's server connections to the endpoint is up."""
        return self._container.online

    @property
    def metrics(self) -> EndpointMetrics:
        """The last metrics the endpoint reported for this hub."""
        return self._container.metrics

    def holds_connection(self, connection_id: str) -> bool:
        """Whether the client ``connection_id`` is connected to this app server through this
        endpoint (a client of another app server is not known here)."""
        return self._container.holds_connection(connection_id)

    def __repr__(self) -> str:
        state = "online" if self.online else "offline"
        return f"<HubServiceEndpoint {self} hub={self.hub!r} {state}>"


@dataclasses.dataclass(frozen=True)
class EndpointStatusEvent:
    """An endpoint went online or offline for a hub (its first server connection came up, or
    its last one went down)."""

    #: The hub, as mapped.
    hub: str
    #: The endpoint (live: its ``online`` may have changed again since).
    endpoint: HubServiceEndpoint
    #: The new status.
    online: bool


class EndpointEvents:
    """The ``EndpointStatusEvent``\\ s of a ``HubServer`` from the moment this was made, as an
    async iterator (``HubServer.endpoint_events()``)::

        async with server.endpoint_events() as events:
            async for event in events:
                print(event.hub, event.endpoint.name, "online" if event.online else "offline")

    It ends when the server stops or on ``close()``. A consumer that falls more than 1024
    events behind loses the oldest ones (a warning is logged).
    """

    def __init__(self, unsubscribe: Callable[[EndpointEvents], None]) -> None:
        self._unsubscribe = unsubscribe
        self._events: deque[EndpointStatusEvent] = deque()
        self._arrived = anyio.Event()
        self._closed = False
        self._dropped = 0

    def publish(self, event: EndpointStatusEvent) -> None:
        """Queue an event (called by the server)."""
        if self._closed:
            return
        if len(self._events) >= _EVENT_BUFFER:
            self._events.popleft()
            self._dropped += 1
            if self._dropped == 1 or self._dropped % _EVENT_BUFFER == 0:
                _log.warning("endpoint events: a consumer is behind; %d dropped", self._dropped)
        self._events.append(event)
        self._arrived.set()

    def close(self) -> None:
        """Stop receiving events; iteration ends after the ones already queued."""
        if not self._closed:
            self._closed = True
            self._unsubscribe(self)
            self._arrived.set()

    def __aiter__(self) -> EndpointEvents:
        return self

    async def __anext__(self) -> EndpointStatusEvent:
        while not self._events:
            if self._closed:
                raise StopAsyncIteration
            await self._arrived.wait()
            self._arrived = anyio.Event()
        return self._events.popleft()

    async def __aenter__(self) -> EndpointEvents:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


def publish_status(
    listeners: list[EndpointEvents],
    callback: Callable[[EndpointStatusEvent], Any] | None,
    event: EndpointStatusEvent,
) -> None:
    """Hand a status change to the callback and every listener (DEBUG in the log: the
    container logs the change once, with why)."""
    _log.debug(
        "endpoint %s is %s for hub %s",
        event.endpoint,
        "online" if event.online else "offline",
        event.hub,
    )
    if callback is not None:
        try:
            result = callback(event)
            if inspect.iscoroutine(result):
                result.close()
                raise TypeError(
                    "on_endpoint_status must be a plain function (it is called inline); "
                    "iterate HubServer.endpoint_events() from a task for async code"
                )
        except Exception:
            _log.exception("the on_endpoint_status callback failed")
    for listener in list(listeners):
        listener.publish(event)
