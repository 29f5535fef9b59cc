"""The Azure SignalR data-plane REST API (service-protocol §12): 2022-06-01 and v1 routes.

Each route maps a method and a path shape to one operation of ``Operations``. Path segments are
split before they are unescaped, so a group name may hold an escaped ``/``. Failures answer a
JSON body ``{"code", "message"}``; existence checks answer 404 with the ``x-ms-error-code``
header the Management SDK needs (§12.1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Protocol
from urllib.parse import unquote, urlsplit

import msgpack
import orjson

from ..protocol._auth import TokenValidator, is_valid_group_name, wire_hub_name
from ._config import RelayConfig
from ._http import HttpError, Request, Response, bearer_token
from ._message import OutboundMessage
from ._operations import Operations
from ._tokens import RequestAuth

#: What the fault-injection switch can do to server connections: nothing; refuse new ones
#: (503); drop the existing ones (TCP closed, no goodbye) and refuse new ones; or go silent
#: (existing ones get and send nothing, new ones are never answered): a blocked port.
FAULT_MODES = ("none", "refuse", "drop", "silence")


class FaultSwitch(Protocol):
    """The relay's fault-injection switch (``Relay.inject_fault``)."""

    fault_mode: str

    def inject_fault(self, mode: str) -> None: ...

API_VERSION = "2022-06-01"
#: Query parameters the SDK adds after signing a REST token (§8.2), so not part of ``aud``.
_UNSIGNED_QUERY = ("excluded", "reason", "ttl")

_JSON_TYPES = ("application/json", "text/json", "text/plain", "")
_MSGPACK_TYPES = ("application/octet-stream", "application/x-msgpack", "application/msgpack")


@dataclasses.dataclass
class Call:
    """One REST request, matched to a route."""

    request: Request
    hub: str
    params: dict[str, str]
    versioned: bool

    def excluded(self) -> list[str]:
        return self.request.args("excluded")

    def reason(self) -> str | None:
        return self.request.arg("reason") or None


Operation = Callable[["RestApi", Call], Awaitable[Response]]


def _not_found(code: str, message: str) -> Response:
    return Response.json(404, {"code": code, "message": message}, [("x-ms-error-code", code)])


class RestApi:
    def __init__(self, config: RelayConfig, ops: Operations, auth: RequestAuth,
                 faults: FaultSwitch) -> None:
        self.ops = ops
        self.auth = auth
        self.switch = faults
        #: Checks admin tokens, signed with ``admin_key`` only (None: the admin API is off).
        self.admin_validator = None if config.admin_key is None else TokenValidator(
            [config.admin_key], clock_skew=config.token_clock_skew)

    async def handle(self, request: Request) -> Response:
        raw_path = urlsplit(request.target).path
        segments = [unquote(s) for s in raw_path.split("/")[2:]]  # after "/api/"
        if segments and segments[-1] == "":
            segments.pop()
        if segments[:1] == ["v1"]:
            routes, segments, versioned = _V1_ROUTES, segments[1:], False
        else:
            routes, versioned = _ROUTES, True
        params: dict[str, str] | None = None
        allowed: set[str] = set()
        for methods, shape, operation, status in routes:
            params = _match(shape, segments)
            if params is None:
                continue
            if request.method not in methods:
                allowed |= methods
                continue
            return await self._run(request, raw_path, params, operation, status, versioned)
        if allowed:
            raise HttpError(405, f"{request.method} is not allowed on {raw_path}; use "
                                 f"{', '.join(sorted(allowed))}",
                            headers=[("Allow", ", ".join(sorted(allowed)))])
        raise HttpError(404, f"no REST API route for {request.method} {raw_path}")

    async def _run(self, request: Request, raw_path: str, params: dict[str, str],
                   operation: Operation, status: int, versioned: bool) -> Response:
        if operation is RestApi.health:
            return Response(200)
        if operation is RestApi.faults:
            if self.admin_validator is None:
                raise HttpError(404, "the admin API is off: start the relay with --admin-key "
                                     "(RELAYCORE_ADMIN_KEY) to turn it on")
            self._authenticate(request, raw_path, self.admin_validator)
            return await self.faults(request)
        if versioned and request.arg("api-version") is None:
            raise HttpError(400, f"missing the 'api-version' query parameter "
                                 f"(expected api-version={API_VERSION})")
        try:
            hub = wire_hub_name(params["hub"], request.arg("application") if versioned else None)
        except ValueError as exc:
            raise HttpError(400, str(exc)) from None
        if "group" in params and not is_valid_group_name(params["group"]):
            raise HttpError(400, "invalid group name: it must be 1 to 1024 characters and not "
                                 "only whitespace")
        for key in ("user", "connection"):
            if key in params and not params[key]:
                raise HttpError(400, f"empty {key} id")
        self._authenticate(request, raw_path)
        response = await operation(self, Call(request, hub, params, versioned))
        if response.status == 0:
            response.status = status
        return response

    def _authenticate(self, request: Request, raw_path: str,
                      validator: TokenValidator | None = None) -> None:
        """REST tokens are signed for the request URL, with or without its query (less the
        parameters the SDK adds after signing); by an access key, or by ``validator``'s."""
        signed = "&".join(
            part for part in urlsplit(request.target).query.split("&")
            if part and part.split("=", 1)[0].lower() not in _UNSIGNED_QUERY)
        suffix = raw_path.lstrip("/")
        candidates = self.auth.audiences(request, suffix)
        if signed:
            candidates += self.auth.audiences(request, f"{suffix}?{signed}")
        self.auth.check_token(bearer_token(request), candidates, validator)

    # -- operations ---------------------------------------------------------------------------

    async def health(self, call: Call) -> Response:  # answered before auth in _run
        return Response(200)

    async def faults(self, request: Request) -> Response:
        """``GET``/``PUT /api/admin/faults?serverConnections=none|refuse|drop|silence``: the
        fault-injection switch, to rehearse a failover without touching the network."""
        if request.method == "PUT":
            mode = request.arg("serverConnections")
            if mode not in FAULT_MODES:
                raise HttpError(400, f"serverConnections must be one of {', '.join(FAULT_MODES)}, "
                                     f"got {mode!r}")
            self.switch.inject_fault(mode)
        return Response.json(200, {"serverConnections": self.switch.fault_mode})

    async def send_to_all(self, call: Call) -> Response:
        return _sent(self.ops.send_to_all(call.hub, _message(call.request),
                                                  call.excluded()))

    async def send_to_user(self, call: Call) -> Response:
        return _sent(self.ops.send_to_user(call.hub, call.params["user"],
                                                   _message(call.request)))

    async def send_to_connection(self, call: Call) -> Response:
        return _sent(self.ops.send_to_connection(call.hub, call.params["connection"],
                                                         _message(call.request)))

    async def send_to_group(self, call: Call) -> Response:
        return _sent(self.ops.send_to_group(call.hub, call.params["group"],
                                                    _message(call.request), call.excluded()))

    async def close_all(self, call: Call) -> Response:
        self.ops.close_all_connections(call.hub, call.reason(), call.excluded())
        return Response(0)

    async def close_group(self, call: Call) -> Response:
        self.ops.close_group_connections(call.hub, call.params["group"], call.reason(),
                                                 call.excluded())
        return Response(0)

    async def close_user(self, call: Call) -> Response:
        self.ops.close_user_connections(call.hub, call.params["user"], call.reason(),
                                                call.excluded())
        return Response(0)

    async def connection(self, call: Call) -> Response:
        """HEAD/GET: does it exist; DELETE: close it (v1 POST: send to it)."""
        method = call.request.method
        if method == "POST":
            return await self.send_to_connection(call)
        conn_id = call.params["connection"]
        if method == "DELETE":
            found = self.ops.close_connection(call.hub, conn_id, call.reason())
        else:
            found = self.ops.connection_exists(call.hub, conn_id)
        if not found:
            return _not_found("Warning.Connection.NotExisted",
                              f"connection '{conn_id}' does not exist in hub '{call.hub}'")
        return Response(0 if method == "DELETE" else 200)

    async def remove_connection_from_all_groups(self, call: Call) -> Response:
        self.ops.remove_connection_from_group(call.hub, None, call.params["connection"])
        return Response(0)

    async def group(self, call: Call) -> Response:
        """HEAD/GET: does the group have a connection (v1 POST: send to it)."""
        if call.request.method == "POST":
            return await self.send_to_group(call)
        if not self.ops.group_exists(call.hub, call.params["group"]):
            return _not_found("Warning.Group.NotExisted",
                              f"group '{call.params['group']}' has no connection in hub "
                              f"'{call.hub}'")
        return Response(200)

    async def group_connection(self, call: Call) -> Response:
        group, conn_id = call.params["group"], call.params["connection"]
        if call.request.method == "PUT":
            found = self.ops.add_connection_to_group(call.hub, group, conn_id)
        else:
            found = self.ops.connection_exists(call.hub, conn_id)
            self.ops.remove_connection_from_group(call.hub, group, conn_id)
        if not found:
            return _not_found("Error.Connection.NotExisted",
                              f"connection '{conn_id}' does not exist in hub '{call.hub}'")
        return Response(0)

    async def user(self, call: Call) -> Response:
        """HEAD/GET: does the user have a connection (v1 POST: send to it)."""
        if call.request.method == "POST":
            return await self.send_to_user(call)
        if not self.ops.user_exists(call.hub, call.params["user"]):
            return _not_found("Warning.User.NotExisted",
                              f"user '{call.params['user']}' has no connection in hub "
                              f"'{call.hub}'")
        return Response(200)

    async def user_group(self, call: Call) -> Response:
        group, user = call.params["group"], call.params["user"]
        method = call.request.method
        if method == "PUT":
            self.ops.add_user_to_group(call.hub, group, user, _ttl(call.request))
        elif method == "DELETE":
            self.ops.remove_user_from_group(call.hub, group, user)
            return Response(204 if call.versioned else 0)
        elif not self.ops.user_in_group(call.hub, group, user):
            return _not_found("Info.User.NotInGroup",
                              f"user '{user}' is not in group '{group}' of hub '{call.hub}'")
        else:
            return Response(200)
        return Response(0)

    async def remove_user_from_all_groups(self, call: Call) -> Response:
        self.ops.remove_user_from_group(call.hub, None, call.params["user"])
        return Response(0)


def _sent(recipients: int) -> Response:
    """202 as Azure answers, with an addition Azure clients ignore: how many connections the
    message was queued for, so a caller can tell that nobody was online."""
    return Response.json(0, {"recipients": recipients})


#: The largest ``ttl`` a REST call may give (int32 seconds, as Azure's API declares it).
_MAX_TTL = 2**31 - 1


def _ttl(request: Request) -> float | None:
    raw = request.arg("ttl")
    if raw is None or raw == "":
        return None
    # Azure's API takes an int32 number of seconds; a longer string is not one.
    if len(raw) > 11:
        raise HttpError(400, f"ttl must be a whole number of seconds up to {_MAX_TTL}, "
                             f"got {len(raw)} characters")
    try:
        ttl = int(raw)
    except ValueError:
        raise HttpError(400, f"ttl must be a whole number of seconds, got {raw!r}") from None
    if not 0 <= ttl <= _MAX_TTL:
        raise HttpError(400, f"ttl must be between 0 and {_MAX_TTL} seconds, got {ttl}")
    return float(ttl)


def _message(request: Request) -> OutboundMessage:
    """The message of a ``:send`` body: JSON ``{target, arguments}`` (any letter case) or a
    MessagePack payload map ``{protocol: framed hub message}`` (service-protocol §12.2)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype in _MSGPACK_TYPES:
        return _payload_map(request.body)
    if ctype not in _JSON_TYPES:
        raise HttpError(415, f"unsupported Content-Type {ctype!r}: send application/json "
                             "({\"target\": ..., \"arguments\": [...]}) or "
                             "application/x-msgpack (a map of protocol name to hub message)")
    try:
        body = orjson.loads(request.body)
    except orjson.JSONDecodeError as exc:
        raise HttpError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise HttpError(400, "the body must be a JSON object with 'target' and 'arguments'")
    fields = {k.lower(): v for k, v in body.items()}
    target = fields.get("target")
    if not isinstance(target, str) or not target:
        raise HttpError(400, "the body needs a non-empty string 'target' (the client method)")
    arguments = fields.get("arguments")
    if arguments is None:
        arguments = []
    if not isinstance(arguments, list):
        raise HttpError(400, "'arguments' must be a JSON array")
    return OutboundMessage(target, arguments)


def _payload_map(body: bytes) -> OutboundMessage:
    try:
        payloads = msgpack.unpackb(body, raw=False)
    except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated types
        raise HttpError(400, f"the body is not valid MessagePack: {exc}") from None
    if (not isinstance(payloads, dict) or not payloads
            or not all(isinstance(k, str) and isinstance(v, bytes) for k, v in payloads.items())):
        raise HttpError(400, "a MessagePack body must be a non-empty map of protocol name "
                             "('json', 'messagepack') to the framed hub message as bin")
    return OutboundMessage(payloads=payloads)


def _match(shape: tuple[str, ...], segments: list[str]) -> dict[str, str] | None:
    if len(shape) != len(segments):
        return None
    params = {}
    for part, seg in zip(shape, segments, strict=True):
        if part[0] == "{":
            params[part[1:-1]] = seg
        elif part != seg:
            return None
    return params


_R = RestApi
_CHECK = {"HEAD", "GET"}
#: (methods, path shape after /api/, operation, success status) for api-version 2022-06-01.
_ROUTES: list[tuple[set[str], tuple[str, ...], Operation, int]] = [
    (_CHECK, ("health",), _R.health, 200),
    ({"GET", "PUT"}, ("admin", "faults"), _R.faults, 200),  # type: ignore[list-item]
    ({"POST"}, ("hubs", "{hub}", ":send"), _R.send_to_all, 202),
    ({"POST"}, ("hubs", "{hub}", "users", "{user}", ":send"), _R.send_to_user, 202),
    ({"POST"}, ("hubs", "{hub}", "connections", "{connection}", ":send"),
     _R.send_to_connection, 202),
    ({"POST"}, ("hubs", "{hub}", "groups", "{group}", ":send"), _R.send_to_group, 202),
    ({"POST"}, ("hubs", "{hub}", ":closeConnections"), _R.close_all, 204),
    ({"POST"}, ("hubs", "{hub}", "groups", "{group}", ":closeConnections"), _R.close_group, 204),
    ({"POST"}, ("hubs", "{hub}", "users", "{user}", ":closeConnections"), _R.close_user, 204),
    (_CHECK | {"DELETE"}, ("hubs", "{hub}", "connections", "{connection}"), _R.connection, 200),
    ({"DELETE"}, ("hubs", "{hub}", "connections", "{connection}", "groups"),
     _R.remove_connection_from_all_groups, 200),
    (_CHECK, ("hubs", "{hub}", "groups", "{group}"), _R.group, 200),
    ({"PUT", "DELETE"}, ("hubs", "{hub}", "groups", "{group}", "connections", "{connection}"),
     _R.group_connection, 200),
    ({"PUT", "DELETE"}, ("hubs", "{hub}", "connections", "{connection}", "groups", "{group}"),
     _R.group_connection, 200),
    (_CHECK, ("hubs", "{hub}", "users", "{user}"), _R.user, 200),
    (_CHECK | {"PUT", "DELETE"}, ("hubs", "{hub}", "users", "{user}", "groups", "{group}"),
     _R.user_group, 200),
    (_CHECK | {"PUT", "DELETE"}, ("hubs", "{hub}", "groups", "{group}", "users", "{user}"),
     _R.user_group, 200),
    ({"DELETE"}, ("hubs", "{hub}", "users", "{user}", "groups"),
     _R.remove_user_from_all_groups, 204),
]

#: The same for the v1 paths (no api-version, no application: ``{hub}`` is ``app_hub``).
_V1_ROUTES: list[tuple[set[str], tuple[str, ...], Operation, int]] = [
    (_CHECK, ("health",), _R.health, 200),
    ({"POST"}, ("hubs", "{hub}"), _R.send_to_all, 202),
    ({"POST"}, ("hubs", "{hub}", "users", "{user}"), _R.send_to_user, 202),
    (_CHECK | {"DELETE", "POST"}, ("hubs", "{hub}", "connections", "{connection}"),
     _R.connection, 202),
    (_CHECK | {"POST"}, ("hubs", "{hub}", "groups", "{group}"), _R.group, 202),
    (_CHECK, ("hubs", "{hub}", "users", "{user}"), _R.user, 200),
    ({"PUT", "DELETE"}, ("hubs", "{hub}", "groups", "{group}", "connections", "{connection}"),
     _R.group_connection, 200),
    (_CHECK | {"PUT", "DELETE"}, ("hubs", "{hub}", "groups", "{group}", "users", "{user}"),
     _R.user_group, 202),
    ({"DELETE"}, ("hubs", "{hub}", "users", "{user}", "groups"),
     _R.remove_user_from_all_groups, 200),
]
