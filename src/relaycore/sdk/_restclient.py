"""The data-plane REST API as the management SDK's transient transport (service-protocol §12).

Theory of operation
-------------------

The management SDK reuses the server SDK's routing (``HubDispatcher``: endpoint router, targets,
acks) for both of its transports. For the transient one, each endpoint of a hub is a
``RestEndpointHub`` (an ``EndpointHub`` without server connections) whose one "connection" is a
``RestChannel``: it takes the service messages the hub proxies build (service-protocol §7) and
makes the REST calls that do the same:

=====================================  ===============================================
``BroadcastData`` (excluded)           ``POST /:send?excluded=...``
``UserData`` / ``MultiUserData``       ``POST /users/{user}/:send``, one per user
``MultiConnectionData``                ``POST /connections/{id}/:send``, one per id
``GroupBroadcastData`` (excluded)      ``POST /groups/{group}/:send?excluded=...``
``MultiGroupBroadcastData``            ``POST /groups/{group}/:send``, one per group
``CloseConnection``                    ``DELETE /connections/{id}?reason=...``
``JoinGroupWithAck``                   ``PUT /groups/{group}/connections/{id}``
``LeaveGroupWithAck``                  ``DELETE`` the same (no group: ``/connections/{id}/groups``)
``UserJoinGroupWithAck`` (ttl)         ``PUT /users/{user}/groups/{group}?ttl=...``
``UserLeaveGroupWithAck``              ``DELETE`` the same (no group: ``/users/{user}/groups``)
``CheckUserInGroupWithAck``            ``GET /users/{user}/groups/{group}`` (as the Azure SDK)
``Check{Connection,User,Group}...``    ``HEAD /connections/{id}``, ``/users/{u}``, ``/groups/{g}``
``Close{,User,Group}ConnectionsWith..  ``POST [/users/{u}|/groups/{g}]/:closeConnections``
=====================================  ===============================================

A send's body is the MessagePack payload map ``{"json": ..., "messagepack": ...}`` of §12.2:
the very bytes a server connection would carry, serialised once, so that clients receive the
same frames whichever transport sent them.

Each request is signed for its own URL (§8.2: the audience is the URL with ``{scheme}://{host}/``
of ``Endpoint``, ``application`` and ``api-version`` included, ``excluded``/``reason``/``ttl``
added after signing) and carries ``Asrs-User-Agent``. A 404 is an answer, not an error, only
with the ``x-ms-error-code`` the call expects (§12.1); other failures raise the
``ServiceRequestError`` subclass of their status, named after the call and carrying the
service's reason. Retries follow the Azure SDK (§12.1): sends only on a status above 500 (a 500
may mean "timed out but delivered"), other calls on any 5xx or 408; both when the endpoint could
not be reached at all; with backoff, within ``RetryOptions.max_retries`` and ``budget``.

The recipients a send reached (the relay's ``{"recipients": n}``) and the errors of a call that
went to several endpoints are collected in the ``CallState`` of the current call (a context
variable the management SDK sets), so that ``HubDispatcher`` fans a call out unchanged and the SDK
sums or raises afterwards.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final
from urllib.parse import quote, urlencode

import anyio
import msgpack  # type: ignore[import-untyped]

from relaycore import protocol
from relaycore.protocol import AckStatus, ServiceMessage, generate_access_token

from ._connection import USER_AGENT, Channel, Dispatcher, EndpointHub, ServiceConnection
from ._endpoints import ServiceEndpoint
from ._errors import ServiceError, ServiceUnavailableError

if TYPE_CHECKING:
    import httpx

__all__ = [
    "API_VERSION",
    "CallState",
    "EndpointHealth",
    "RestChannel",
    "RestClient",
    "RestEndpointHub",
    "RetryOptions",
    "ServiceInvalidArgumentError",
    "ServiceNotFoundError",
    "ServiceRequestError",
    "ServiceRuntimeError",
    "ServiceUnauthorizedError",
    "current_call",
]

_log = logging.getLogger("relaycore.sdk")

#: §12.3: the REST API version the SDK speaks.
API_VERSION: Final = "2022-06-01"
#: §9.1: REST tokens live one hour.
_TOKEN_LIFETIME: Final = 3600.0
#: §12.1: the ``x-ms-error-code`` values that make a 404 an expected answer.
_CONNECTION_NOT_EXISTED: Final = "Warning.Connection.NotExisted"
_USER_NOT_EXISTED: Final = "Warning.User.NotExisted"
_GROUP_NOT_EXISTED: Final = "Warning.Group.NotExisted"
_USER_NOT_IN_GROUP: Final = "Info.User.NotInGroup"
_CONNECTION_NOT_EXISTED_ERROR: Final = "Error.Connection.NotExisted"

_MSGPACK: Final = "application/x-msgpack"

#: The clock tokens are signed with (tests shift it to make expired tokens).
_now = time.time


# --------------------------------------------------------------------------------------------
# Errors


class ServiceRequestError(ServiceError):
    """The service answered a REST call with an error status (base class).

    ``str()`` names the call, the endpoint and the service's reason; the parts are attributes::

        try:
            await hub.clients.user("alice").send("notify", big_blob)
        except ServiceInvalidArgumentError as exc:
            print(exc.status, exc.reason)          # 413 request body of ... exceeds the limit
    """

    def __init__(
        self, message: str, *, call: str, status: int, code: str | None, reason: str
    ) -> None:
        super().__init__(message)
        #: What was asked, e.g. ``send to user 'alice'``.
        self.call = call
        #: The HTTP status.
        self.status = status
        #: The ``x-ms-error-code`` header, or the ``code`` of the JSON body.
        self.code = code
        #: The service's explanation (the ``message`` of its JSON body).
        self.reason = reason


class ServiceInvalidArgumentError(ServiceRequestError):
    """400 (and 413, 414, 415, 422, 431): the request is invalid, e.g. a hub or group name the
    service refuses or a body over its size limit (Azure:
    ``AzureSignalRInvalidArgumentException``)."""


class ServiceUnauthorizedError(ServiceRequestError):
    """401 or 403: the token was refused: wrong access key, expired, or signed for another URL
    (Azure: ``AzureSignalRUnauthorizedException``)."""


class ServiceNotFoundError(ServiceRequestError):
    """404 without the ``x-ms-error-code`` the call expects: the endpoint has no such route, so
    it is probably not the service it was taken for (Azure:
    ``AzureSignalRInaccessibleEndpointException``)."""


class ServiceRuntimeError(ServiceRequestError):
    """Any other error status: 5xx (after the retries), 408, 429 ... (Azure:
    ``AzureSignalRRuntimeException``)."""


def _error_class(status: int) -> type[ServiceRequestError]:
    if status in (400, 413, 414, 415, 422, 431):
        return ServiceInvalidArgumentError
    if status in (401, 403):
        return ServiceUnauthorizedError
    if status == 404:
        return ServiceNotFoundError
    return ServiceRuntimeError


# --------------------------------------------------------------------------------------------
# Retries


@dataclasses.dataclass(frozen=True)
class RetryOptions:
    """How the transient transport retries a failed REST call (service-protocol §12.1).

    Sends are retried only on a status above 500, or when the endpoint could not be reached
    (nothing was delivered); other calls also on 500 and 408 and on a read timeout. The n-th
    retry waits ``delay * 2**n`` (``exponential``) or ``delay``, at most ``max_delay``; no retry
    starts once ``budget`` seconds have passed since the call began, and there are at most
    ``max_retries``::

        ServiceManager(options, retry=RetryOptions(max_retries=5, budget=60))
        ServiceManager(options, retry=RetryOptions(max_retries=0))     # never retry
    """

    #: Retries after the first attempt.
    max_retries: int = 3
    #: Seconds before the first retry.
    delay: float = 0.8
    #: The longest pause between attempts.
    max_delay: float = 10.0
    #: Double the pause after each retry (else always ``delay``).
    exponential: bool = True
    #: Seconds one call may take, all attempts and pauses included, before giving up.
    budget: float = 30.0

    def __post_init__(self) -> None:
        if type(self.max_retries) is not int or self.max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0, got {self.max_retries!r}")
        for name in ("delay", "max_delay", "budget"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")

    def pause(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (0-based)."""
        base = self.delay * (2**retry if self.exponential else 1)
        return min(base, self.max_delay)


# --------------------------------------------------------------------------------------------
# What one management call collects


@dataclasses.dataclass
class CallState:
    """Filled by the REST channels while one management call runs (see the module doc)."""

    #: The recipients each REST send reported (``None``: the service did not say).
    recipients: list[int | None] = dataclasses.field(default_factory=list)
    #: Failures of the endpoints the call went to, raised by the SDK once all are done.
    errors: list[ServiceError] = dataclasses.field(default_factory=list)

    def total(self) -> int | None:
        """The sum of ``recipients``; ``None`` when any endpoint did not report."""
        if any(n is None for n in self.recipients):
            return None
        return sum(n for n in self.recipients if n is not None)


#: The state of the management call running in this task (and its child tasks).
current_call: contextvars.ContextVar[CallState | None] = contextvars.ContextVar(
    "relaycore_management_call", default=None
)


# --------------------------------------------------------------------------------------------
# Requests


@dataclasses.dataclass(frozen=True)
class _Request:
    method: str
    #: Under ``api/hubs/{hub}``, segments already escaped; "" for the hub itself.
    path: str
    #: What the caller asked, for messages.
    what: str
    #: A message API (retried only on status > 500).
    send: bool = False
    #: Added to the query after signing (§8.2).
    unsigned: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None
    #: The ``x-ms-error-code`` that makes a 404 an answer (§12.1).
    expected_404: str | None = None


def _segment(value: str) -> str:
    return quote(value, safe="")


def _excluded(ids: Sequence[str]) -> tuple[tuple[str, str], ...]:
    return tuple(("excluded", i) for i in dict.fromkeys(ids))


class RestClient:
    """Signs, sends and retries REST calls for a ``ServiceManager`` (one per manager)."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        retry: RetryOptions,
        application: str | None,
        name_id: str,
        health_timeout: float,
    ) -> None:
        self.http = http
        self.retry = retry
        self.application = application
        #: The ``nameid`` claim of REST tokens (§9.1: ``{machine}_{guid}``).
        self.name_id = name_id
        self.health_timeout = health_timeout

    def url_and_audience(self, endpoint: ServiceEndpoint, hub: str, path: str) -> tuple[str, str]:
        """The request URL and the token audience of ``path`` under ``api/hubs/{hub}`` (§8.2)."""
        query = f"api-version={API_VERSION}"
        if self.application:
            query = f"application={_segment(self.application.lower())}&{query}"
        suffix = f"api/hubs/{_segment(hub.lower())}{path}?{query}"
        connection = endpoint.connection
        return connection.server_base + suffix, connection.audience_base + suffix

    def _headers(self, endpoint: ServiceEndpoint, audience: str) -> dict[str, str]:
        """A fresh token for ``audience`` (§9.1) and the user agent."""
        token = generate_access_token(
            endpoint.access_key,
            audience,
            now=_now(),
            lifetime=_TOKEN_LIFETIME,
            claims={"nameid": self.name_id},
        )
        return {"Authorization": f"Bearer {token}", "Asrs-User-Agent": USER_AGENT}

    async def call(
        self, endpoint: ServiceEndpoint, hub: str, request: _Request
    ) -> httpx.Response | None:
        """Make ``request``, retrying as ``RetryOptions`` says; the response of a success,
        ``None`` for an expected 404. Raises ``ServiceRequestError`` subclasses, or
        ``ServiceUnavailableError`` when the endpoint could not be reached."""
        import httpx

        url, audience = self.url_and_audience(endpoint, hub, request.path)
        if request.unsigned:
            url += "&" + urlencode(request.unsigned)
        started = anyio.current_time()
        retry = 0
        while True:
            headers = self._headers(endpoint, audience)
            if request.body is not None:
                headers["Content-Type"] = _MSGPACK
            failure: ServiceError
            try:
                response = await self.http.request(
                    request.method, url, headers=headers, content=request.body
                )
            except httpx.TransportError as exc:
                # Not connected at all: nothing was delivered, any call may be retried. Once
                # the request may have reached the service, a send may not.
                unsent = isinstance(
                    exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
                )
                retriable = unsent or not request.send
                failure = ServiceUnavailableError(
                    f"{request.what} failed: {request.method} {_shown(url)}: "
                    f"{type(exc).__name__}: {exc or 'no answer'}"
                )
            else:
                status = response.status_code
                if 200 <= status < 300:
                    return response
                code = response.headers.get("x-ms-error-code")
                if status == 404 and request.expected_404 and code == request.expected_404:
                    return None
                retriable = status > 500 if request.send else (status >= 500 or status == 408)
                failure = _request_error(request, url, response)
            pause = self.retry.pause(retry)
            elapsed = anyio.current_time() - started
            if (
                not retriable
                or retry >= self.retry.max_retries
                or elapsed + pause > self.retry.budget
            ):
                if isinstance(failure, ServiceRequestError) and request.method == "HEAD":
                    failure = await self._explain(endpoint, audience, url, request, failure)
                if retry:
                    _log.warning("%s gave up after %d retries: %s", request.what, retry, failure)
                raise failure
            _log.info("%s failed (%s); retry %d in %.2g s", request.what, failure, retry + 1, pause)
            retry += 1
            await anyio.sleep(pause)

    async def _explain(
        self,
        endpoint: ServiceEndpoint,
        audience: str,
        url: str,
        request: _Request,
        failure: ServiceRequestError,
    ) -> ServiceRequestError:
        """A HEAD answer has no body to say why it failed: ask the same URL with GET (the
        relay answers checks to both) for the reason; keep ``failure`` when that fails too."""
        import httpx

        try:
            response = await self.http.get(url, headers=self._headers(endpoint, audience))
        except httpx.HTTPError:
            return failure
        if response.status_code != failure.status or not response.content:
            return failure
        return _request_error(request, url, response)

    async def probe(self, endpoint: ServiceEndpoint) -> bool:
        """``HEAD {server}api/health`` (no auth, §8.2): whether the endpoint answers 2xx within
        the health timeout."""
        import httpx

        url = f"{endpoint.connection.server_base}api/health?api-version={API_VERSION}"
        try:
            with anyio.fail_after(self.health_timeout):
                response = await self.http.head(url, headers={"Asrs-User-Agent": USER_AGENT})
        except (httpx.HTTPError, TimeoutError) as exc:
            _log.debug("health probe of %s failed: %r", endpoint, exc)
            return False
        return 200 <= response.status_code < 300


def _shown(url: str) -> str:
    """A URL for messages: without the query (it says nothing the call's name does not)."""
    return url.split("?", 1)[0]


def _request_error(request: _Request, url: str, response: httpx.Response) -> ServiceRequestError:
    status = response.status_code
    code = response.headers.get("x-ms-error-code")
    reason = ""
    try:
        body = response.json() if response.content else None
    except ValueError:
        body = None
    if isinstance(body, dict):
        fields = {str(k).lower(): v for k, v in body.items()}
        if isinstance(fields.get("message"), str):
            reason = fields["message"]
        if code is None and isinstance(fields.get("code"), str):
            code = fields["code"]
    if not reason:
        text = response.text.strip() if response.content else ""
        reason = text[:300] or (response.reason_phrase or "no reason given")
    label = f"{status} {code}" if code else str(status)
    message = f"{request.what} failed: {request.method} {_shown(url)} answered {label}: {reason}"
    return _error_class(status)(message, call=request.what, status=status, code=code, reason=reason)


def _recipients(response: httpx.Response) -> int | None:
    try:
        body = response.json() if response.content else None
    except ValueError:
        return None
    if isinstance(body, dict):
        value = body.get("recipients")
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


# --------------------------------------------------------------------------------------------
# The channel: service messages in, REST calls out


class RestChannel(Channel):
    """One endpoint's REST API for one hub, in the place of a server connection (see the
    module doc): ``HubDispatcher`` writes on it with ``send`` and ``request_ack``."""

    def __init__(self, client: RestClient, container: RestEndpointHub, hub: str) -> None:
        self.client = client
        self.container = container
        self.hub = hub

    @property
    def endpoint(self) -> ServiceEndpoint:
        """The container's endpoint (as renamed, when it is)."""
        return self.container.endpoint

    def __repr__(self) -> str:
        return f"<RestChannel {self.hub} {self.endpoint}>"

    async def _run(self, request: _Request) -> httpx.Response | None:
        return await self.client.call(self.endpoint, self.hub, request)

    async def send(self, message: ServiceMessage) -> None:
        """Make the REST calls that do what ``message`` asks. Within a management call, the
        recipients and a failure go to its ``CallState`` (the other endpoints' calls go on);
        outside one, a failure is raised."""
        state = current_call.get()
        errors: list[ServiceError] = []
        for request in _send_requests(message):
            # One failed user (group, connection) of several does not keep the others from
            # getting the message.
            try:
                response = await self._run(request)
            except ServiceError as exc:
                errors.append(exc)
                continue
            if state is not None and request.send and response is not None:
                state.recipients.append(_recipients(response))
        if errors:
            if state is None:
                raise errors[0]
            state.errors.extend(errors)

    async def request_ack(
        self, message_for: Callable[[int], ServiceMessage], ack_id: int
    ) -> tuple[int, str | None]:
        """Make the REST call of a ``...WithAck`` message; ``(AckStatus.OK, None)``, or
        ``NOT_FOUND`` for the expected 404 of a check or of an unknown connection."""
        request = _ack_request(message_for(ack_id))
        response = await self._run(request)
        if response is None:
            return AckStatus.NOT_FOUND, f"{request.what}: not found"
        return AckStatus.OK, None


def _payload_body(payloads: dict[str, bytes]) -> bytes:
    body: bytes = msgpack.packb(payloads, use_bin_type=True)
    return body


#: The messages a REST send carries: a payload map for clients.
_SENDS: Final = (
    protocol.BroadcastDataMessage,
    protocol.GroupBroadcastDataMessage,
    protocol.UserDataMessage,
    protocol.MultiUserDataMessage,
    protocol.MultiConnectionDataMessage,
    protocol.MultiGroupBroadcastDataMessage,
)


def _send_requests(message: ServiceMessage) -> list[_Request]:
    """The REST calls that send what ``message`` carries (the table in the module doc)."""
    if isinstance(message, protocol.CloseConnectionMessage):
        return [_close_connection(message.connection_id, message.error_message)]
    if not isinstance(message, _SENDS):
        raise TypeError(f"the REST API cannot send {type(message).__name__}")
    body = _payload_body(message.payloads)

    def send(path: str, what: str, unsigned: tuple[tuple[str, str], ...] = ()) -> _Request:
        return _Request("POST", f"{path}/:send", what, send=True, unsigned=unsigned, body=body)

    if isinstance(message, protocol.BroadcastDataMessage):
        return [send("", "send to all", _excluded(message.excluded_connection_ids))]
    if isinstance(message, protocol.GroupBroadcastDataMessage):
        group = message.group_name
        excluded = _excluded(message.excluded_connection_ids)
        return [send(f"/groups/{_segment(group)}", f"send to group {group!r}", excluded)]
    # One call per recipient, each once.
    if isinstance(message, protocol.UserDataMessage):
        recipients = [("user", message.user_id)]
    elif isinstance(message, protocol.MultiUserDataMessage):
        recipients = [("user", u) for u in dict.fromkeys(message.user_ids)]
    elif isinstance(message, protocol.MultiConnectionDataMessage):
        recipients = [("connection", c) for c in dict.fromkeys(message.connection_ids)]
    else:
        # No multi-group send in the REST API: one call per group, so that a connection in
        # two of the groups gets the message twice (as with the Azure SDK's REST transport).
        recipients = [("group", g) for g in dict.fromkeys(message.group_names)]
    return [send(f"/{kind}s/{_segment(k)}", f"send to {kind} {k!r}") for kind, k in recipients]


def _ack_request(message: ServiceMessage) -> _Request:
    """The REST call that does what a ``...WithAck`` message asks (the table in the module
    doc)."""
    if isinstance(message, (protocol.JoinGroupWithAckMessage, protocol.LeaveGroupWithAckMessage)):
        return _connection_in_group(message)
    if isinstance(
        message,
        (
            protocol.UserJoinGroupWithAckMessage,
            protocol.UserLeaveGroupWithAckMessage,
            protocol.CheckUserInGroupWithAckMessage,
        ),
    ):
        return _user_in_group(message)
    if isinstance(message, protocol.CheckConnectionExistenceWithAckMessage):
        return _exists("connection", message.connection_id, _CONNECTION_NOT_EXISTED)
    if isinstance(message, protocol.CheckUserExistenceWithAckMessage):
        return _exists("user", message.user_id, _USER_NOT_EXISTED)
    if isinstance(message, protocol.CheckGroupExistenceWithAckMessage):
        return _exists("group", message.group_name, _GROUP_NOT_EXISTED)
    if isinstance(message, protocol.CloseConnectionWithAckMessage):
        return _close_connection(message.connection_id, message.reason)
    if isinstance(
        message,
        (
            protocol.CloseConnectionsWithAckMessage,
            protocol.CloseUserConnectionsWithAckMessage,
            protocol.CloseGroupConnectionsWithAckMessage,
        ),
    ):
        return _close_connections(message)
    raise TypeError(f"the REST API has no call for {type(message).__name__}")


def _connection_in_group(
    message: protocol.JoinGroupWithAckMessage | protocol.LeaveGroupWithAckMessage,
) -> _Request:
    c, group = message.connection_id, message.group_name
    if group is None:
        return _Request(
            "DELETE",
            f"/connections/{_segment(c)}/groups",
            f"remove connection {c!r} from all groups",
            expected_404=_CONNECTION_NOT_EXISTED,
        )
    joining = isinstance(message, protocol.JoinGroupWithAckMessage)
    return _Request(
        "PUT" if joining else "DELETE",
        f"/groups/{_segment(group)}/connections/{_segment(c)}",
        f"add connection {c!r} to group {group!r}"
        if joining
        else f"remove connection {c!r} from group {group!r}",
        expected_404=_CONNECTION_NOT_EXISTED_ERROR,
    )


def _user_in_group(
    message: protocol.UserJoinGroupWithAckMessage
    | protocol.UserLeaveGroupWithAckMessage
    | protocol.CheckUserInGroupWithAckMessage,
) -> _Request:
    u, group = message.user_id, message.group_name
    path = f"/users/{_segment(u)}/groups"
    if group is None:
        return _Request("DELETE", path, f"remove user {u!r} from all groups")
    path += f"/{_segment(group)}"
    if isinstance(message, protocol.UserJoinGroupWithAckMessage):
        ttl = () if message.ttl is None else (("ttl", str(message.ttl)),)
        return _Request("PUT", path, f"add user {u!r} to group {group!r}", unsigned=ttl)
    if isinstance(message, protocol.CheckUserInGroupWithAckMessage):
        return _Request(
            "GET",
            path,
            f"check whether user {u!r} is in group {group!r}",
            expected_404=_USER_NOT_IN_GROUP,
        )
    return _Request("DELETE", path, f"remove user {u!r} from group {group!r}")


def _exists(kind: str, key: str, expected_404: str) -> _Request:
    """``Check{Connection,User,Group}ExistenceWithAck``: a 404 with ``expected_404`` is "no"."""
    return _Request(
        "HEAD",
        f"/{kind}s/{_segment(key)}",
        f"check whether {kind} {key!r} exists",
        expected_404=expected_404,
    )


def _close_connection(connection_id: str, reason: str | None) -> _Request:
    """``CloseConnection`` and ``CloseConnectionWithAck`` (an unknown connection is no error)."""
    return _Request(
        "DELETE",
        f"/connections/{_segment(connection_id)}",
        f"close connection {connection_id!r}",
        unsigned=(("reason", reason),) if reason else (),
        expected_404=_CONNECTION_NOT_EXISTED,
    )


def _close_connections(
    message: protocol.CloseConnectionsWithAckMessage
    | protocol.CloseUserConnectionsWithAckMessage
    | protocol.CloseGroupConnectionsWithAckMessage,
) -> _Request:
    scope, whose = "", "all connections"
    if isinstance(message, protocol.CloseUserConnectionsWithAckMessage):
        u = message.user_id
        scope, whose = f"/users/{_segment(u)}", f"the connections of user {u!r}"
    elif isinstance(message, protocol.CloseGroupConnectionsWithAckMessage):
        g = message.group_name
        scope, whose = f"/groups/{_segment(g)}", f"the connections in group {g!r}"
    query = _excluded(message.excluded_connection_ids)
    if message.reason:
        query = (*query, ("reason", message.reason))
    return _Request("POST", f"{scope}/:closeConnections", f"close {whose}", unsigned=query)


# --------------------------------------------------------------------------------------------
# Endpoint status from the health probe


class EndpointHealth:
    """Whether one endpoint answers its health probe, and since when (§8.2: the Management SDK
    probes every 2 minutes, an offline endpoint again after 3 s)."""

    def __init__(self, endpoint: ServiceEndpoint) -> None:
        self.endpoint = endpoint
        #: Optimistic until the first probe says otherwise.
        self.online = True
        self.checked = -math.inf
        #: The hubs' containers of this endpoint, told of a change of ``online``.
        self.containers: list[RestEndpointHub] = []

    def next_due(self, interval: float, retry_interval: float) -> float:
        """When the next probe is due (``anyio.current_time`` clock)."""
        return self.checked + (interval if self.online else retry_interval)

    def update(self, online: bool) -> None:
        self.checked = anyio.current_time()
        if online == self.online:
            return
        self.online = online
        _log.debug("health probe of %s: %s", self.endpoint, "online" if online else "offline")
        for container in self.containers:
            # Logged and published per hub (ServiceOptions.on_endpoint_status), as for
            # server connections.
            container.connection_changed()


class RestEndpointHub(EndpointHub):
    """A hub's endpoint for the transient transport: no server connections (the transport's
    ``ServiceOptions.connection_count`` is 0); ``online`` is the endpoint's health, and its one
    channel is a ``RestChannel``."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        endpoint: ServiceEndpoint,
        health: EndpointHealth,
        client: RestClient,
    ) -> None:
        self.health = health  # before the base class reads ``online``
        super().__init__(dispatcher, endpoint)
        self.channel = RestChannel(client, self, dispatcher.name)
        health.containers.append(self)

    @property
    def online(self) -> bool:
        return self.health.online

    def pick(self, preferred: ServiceConnection | None = None) -> Channel | None:
        """The channel while the endpoint is online (``HubDispatcher`` writes on it as on a
        server connection)."""
        return self.channel if self.health.online else None
