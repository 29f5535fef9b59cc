"""``EndpointRouter``: which endpoint a new client goes to, which endpoints a message goes to.

The default behaviour is the Azure SDK's ``DefaultEndpointRouter`` (service-protocol §11.2):

* **negotiate**: a random online primary; when no primary is online, a random online secondary
  (failover); when none is online, ``ServiceUnavailableError`` (the negotiate app answers 503).
  When every candidate reports a capacity, the pick is weighted by the room left on each.
* **messages** to everyone, a user or a group: every online endpoint (each delivers to the
  clients it holds).
* **a message to one connection**: the endpoint that holds it when this app server knows it
  (the client is connected to this app server), else every online endpoint.

Subclass it and override any method; call ``super()`` to fall back to the default::

    class EastGroupsRouter(EndpointRouter):
        def get_endpoints_for_group(self, group, endpoints):
            if group.startswith("east-"):
                return [e for e in endpoints if e.name.startswith("east-") and e.online]
            return super().get_endpoints_for_group(group, endpoints)

    server = HubServer(ServiceOptions(endpoints=[...], endpoint_router=EastGroupsRouter()))

Methods may also be ``async def``. The ``endpoints`` they receive are ``HubServiceEndpoint``
objects of one hub, offline ones included; they return some of them (any iterable). For
messages, the endpoints being added (staging) and being removed (draining) are included, so
that nothing sent during the change is lost; for negotiate they are not.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl

from ._endpoints import EndpointType, HubServiceEndpoint, ServiceEndpoint
from ._errors import NOT_CONNECTED_MESSAGE, ServiceUnavailableError

__all__ = ["EndpointRouter", "NegotiateRequest"]


@dataclasses.dataclass(frozen=True)
class NegotiateRequest:
    """The negotiate request a router chooses an endpoint for.

    Made by ``HubServer.negotiate`` from its arguments; the negotiate ASGI app also fills
    ``headers`` and ``scope`` from the HTTP request.
    """

    #: The hub, as the client named it.
    hub: str
    #: The user id the token will carry (``None``: anonymous).
    user_id: str | None = None
    #: The user's claims the token will carry.
    claims: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: The app's path of the hub (sent to the relay as ``asrs.op``).
    path: str | None = None
    #: The request's query string (without ``?`` and ``negotiateVersion``).
    query: str = ""
    #: The request's HTTP headers, names in lower case.
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: The ASGI scope of the HTTP request, when it came through the negotiate app.
    scope: Mapping[str, Any] | None = None

    @property
    def query_params(self) -> dict[str, str]:
        """The query parameters (the last value of a repeated one)."""
        return dict(parse_qsl(self.query, keep_blank_values=True))


def _weighted_choice(candidates: Sequence[HubServiceEndpoint]) -> HubServiceEndpoint:
    # §11.2: uniform unless every candidate reports a capacity; then each weighs
    # max(floor((capacity - (clients + servers)) / capacity * 1000), 1).
    metrics = [c.metrics for c in candidates]
    if len(candidates) == 1 or any(m.connection_capacity == 0 for m in metrics):
        return random.choice(candidates)
    weights = [
        max(
            (m.connection_capacity - (m.client_connection_count + m.server_connection_count))
            * 1000
            // m.connection_capacity,
            1,
        )
        for m in metrics
    ]
    return random.choices(candidates, weights)[0]


class EndpointRouter:
    """The default endpoint routing (see the module doc); subclass it to change any part."""

    def get_negotiate_endpoint(
        self, request: NegotiateRequest, endpoints: Sequence[HubServiceEndpoint]
    ) -> ServiceEndpoint | None:
        """The endpoint a new client of ``request.hub`` is sent to.

        Default: an online primary, else an online secondary, weighted by reported capacity
        (§11.2). Raises ``ServiceUnavailableError`` when none is online. An override may
        raise ``NegotiateError`` to refuse the request (the negotiate app answers its
        status), or return ``None`` (answered as "no endpoint", 503).
        """
        online = [e for e in endpoints if e.online]
        candidates = [e for e in online if e.type is EndpointType.PRIMARY] or online
        if not candidates:
            raise ServiceUnavailableError(NOT_CONNECTED_MESSAGE)
        return _weighted_choice(candidates)

    def get_endpoints_for_broadcast(
        self, endpoints: Sequence[HubServiceEndpoint]
    ) -> Iterable[ServiceEndpoint]:
        """Where a message to every client goes. Default: every online endpoint."""
        return [e for e in endpoints if e.online]

    def get_endpoints_for_user(
        self, user_id: str, endpoints: Sequence[HubServiceEndpoint]
    ) -> Iterable[ServiceEndpoint]:
        """Where a message to ``user_id`` goes (also user-group changes, intersected with
        the group's endpoints). Default: every online endpoint."""
        return [e for e in endpoints if e.online]

    def get_endpoints_for_group(
        self, group: str, endpoints: Sequence[HubServiceEndpoint]
    ) -> Iterable[ServiceEndpoint]:
        """Where a message to ``group`` goes. Default: every online endpoint."""
        return [e for e in endpoints if e.online]

    def get_endpoints_for_connection(
        self, connection_id: str, endpoints: Sequence[HubServiceEndpoint]
    ) -> Iterable[ServiceEndpoint]:
        """Where a message to ``connection_id`` goes (also its group changes and client
        invocations). Default: the endpoint that holds the connection when it is connected to
        this app server (``endpoint.holds_connection``), else every online endpoint."""
        online = [e for e in endpoints if e.online]
        return [e for e in online if e.holds_connection(connection_id)] or online
