"""The service messages: their enumerations, one frozen dataclass per message type, and each
message's wire layout (``@schema``, read and written by ``_codec``).

Message objects are named after the SDK's classes (``Service...`` where the hub protocol already
has the name). Parsed integers are plain ``int``; the enums here compare equal to them.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

from .._errors import LocalProtocolError
from .._wire import as_tuple
from ._codec import (
    CLAIMS,
    EXT,
    HEADERS,
    PAYLOADS,
    PING_VALUES,
    UNREAD_EXT,
    binary,
    boolean,
    enum32,
    int32,
    nullable,
    nullable_binary,
    opt,
    schema,
    string,
    strings,
)

__all__ = [
    "ASRS_INSTANCE_ID_HEADER",
    "ASRS_IS_DIAGNOSTIC_CLIENT_HEADER",
    "ASRS_MIGRATE_FROM_HEADER",
    "ASRS_MIGRATE_TO_HEADER",
    "SERVICE_PROTOCOL_VERSION",
    "AccessKeyRequestMessage",
    "AccessKeyResponseMessage",
    "AckStatus",
    "BroadcastDataMessage",
    "CheckConnectionExistenceWithAckMessage",
    "CheckGroupExistenceWithAckMessage",
    "CheckUserExistenceWithAckMessage",
    "CheckUserInGroupWithAckMessage",
    "ClientCompletionMessage",
    "ClientInvocationMessage",
    "CloseConnectionMessage",
    "CloseConnectionWithAckMessage",
    "CloseConnectionsWithAckMessage",
    "CloseGroupConnectionsWithAckMessage",
    "CloseUserConnectionsWithAckMessage",
    "ConnectionDataMessage",
    "ConnectionFlowControlMessage",
    "ConnectionFlowControlOperation",
    "ConnectionReconnectMessage",
    "ConnectionType",
    "DataMessageType",
    "ErrorCompletionMessage",
    "FlowControlConnectionType",
    "GracefulShutdownMode",
    "GroupBroadcastDataMessage",
    "GroupMemberQueryMessage",
    "JoinGroupMessage",
    "JoinGroupWithAckMessage",
    "LeaveGroupMessage",
    "LeaveGroupWithAckMessage",
    "MigrationLevel",
    "MultiConnectionDataMessage",
    "MultiGroupBroadcastDataMessage",
    "MultiUserDataMessage",
    "OpenConnectionMessage",
    "PingKey",
    "ServiceAckMessage",
    "ServiceErrorMessage",
    "ServiceEventKind",
    "ServiceEventMessage",
    "ServiceEventObjectType",
    "ServiceHandshakeRequest",
    "ServiceHandshakeResponse",
    "ServiceMappingMessage",
    "ServiceMessage",
    "ServiceMessageType",
    "ServicePing",
    "UserDataMessage",
    "UserJoinGroupMessage",
    "UserJoinGroupWithAckMessage",
    "UserLeaveGroupMessage",
    "UserLeaveGroupWithAckMessage",
    "header_for",
    "payload_for",
    "upstream_signature",
]

#: The only service protocol version (§1: the integer 1 in the HandshakeRequest).
SERVICE_PROTOCOL_VERSION: Final = 1


#: OpenConnection headers added by the service (§6.2) and CloseConnection's migration mark (§2.2).
ASRS_INSTANCE_ID_HEADER: Final = "Asrs-Instance-Id"
ASRS_MIGRATE_FROM_HEADER: Final = "Asrs-Migrate-From"
ASRS_MIGRATE_TO_HEADER: Final = "Asrs-Migrate-To"
ASRS_IS_DIAGNOSTIC_CLIENT_HEADER: Final = "Asrs-Is-Diagnostic-Client"


# --------------------------------------------------------------------------------------------
# Enumerations


class ServiceMessageType(enum.IntEnum):
    """Service message type ids: element 0 of every message array (§2)."""

    #: Server→service, first message: version, connection type, target, migration level.
    HANDSHAKE_REQUEST = 1
    #: Service→server: the handshake's answer; an empty or nil error means success.
    HANDSHAKE_RESPONSE = 2
    #: Both ways: keep-alive, or a flat list of key/value strings (§4.4).
    PING = 3
    #: Service→server: a client connected (id, claims, headers, query string).
    OPEN_CONNECTION = 4
    #: Both ways: a client connection ended, or must be ended.
    CLOSE_CONNECTION = 5
    #: Both ways: raw bytes of one client's SignalR stream.
    CONNECTION_DATA = 6
    #: Server→service: send to the listed connections.
    MULTI_CONNECTION_DATA = 7
    #: Server→service: send to every connection of a user.
    USER_DATA = 8
    #: Server→service: send to every connection of the listed users.
    MULTI_USER_DATA = 9
    #: Server→service: send to every connection of the hub but the excluded ones.
    BROADCAST_DATA = 10
    #: Server→service: add a connection to a group.
    JOIN_GROUP = 11
    #: Server→service: remove a connection from a group.
    LEAVE_GROUP = 12
    #: Server→service: send to a group, minus excluded connections (and users).
    GROUP_BROADCAST_DATA = 13
    #: Server→service: send to several groups, once per connection.
    MULTI_GROUP_BROADCAST_DATA = 14
    #: Service→server: a fatal error; the service closes the socket after it.
    SERVICE_ERROR = 15
    #: Server→service: add a user (and its future connections) to a group, with a TTL.
    USER_JOIN_GROUP = 16
    #: Server→service: remove a user from a group.
    USER_LEAVE_GROUP = 17
    #: Server→service: JoinGroup, answered with an Ack.
    JOIN_GROUP_WITH_ACK = 18
    #: Server→service: LeaveGroup (nil group = every group), answered with an Ack.
    LEAVE_GROUP_WITH_ACK = 19
    #: Service→server: the answer to a ``*WithAck`` message.
    ACK = 20
    #: Server→service: is the user in the group? Ack Ok or NotFound.
    CHECK_USER_IN_GROUP_WITH_ACK = 21
    #: Service→server: a warning about an object (the SDK only logs it).
    SERVICE_EVENT = 22
    #: Server→service: does the group have any connection? Ack Ok or NotFound.
    CHECK_GROUP_EXISTENCE_WITH_ACK = 23
    #: Server→service: does the connection exist? Ack Ok or NotFound.
    CHECK_CONNECTION_EXISTENCE_WITH_ACK = 24
    #: Server→service: does the user have any connection? Ack Ok or NotFound.
    CHECK_USER_EXISTENCE_WITH_ACK = 25
    #: Server→service: UserJoinGroup, answered with an Ack.
    USER_JOIN_GROUP_WITH_ACK = 26
    #: Server→service: UserLeaveGroup (nil group = every group), answered with an Ack.
    USER_LEAVE_GROUP_WITH_ACK = 27
    #: Server→service (Entra mode): a bearer token asking for a signing key.
    ACCESS_KEY_REQUEST = 28
    #: Service→server (Entra mode): the signing key, or an error.
    ACCESS_KEY_RESPONSE = 29
    #: Server→service (obsolete): close one connection, answered with an Ack.
    CLOSE_CONNECTION_WITH_ACK = 30
    #: Server→service (obsolete): close every connection of the hub, answered with an Ack.
    CLOSE_CONNECTIONS_WITH_ACK = 31
    #: Server→service: close every connection of a user, answered with an Ack.
    CLOSE_USER_CONNECTIONS_WITH_ACK = 32
    #: Server→service: close every connection of a group, answered with an Ack.
    CLOSE_GROUP_CONNECTIONS_WITH_ACK = 33
    #: Both ways: a server invokes a client and waits for its result (§2.5).
    CLIENT_INVOCATION = 34
    #: Both ways: the client's result, relayed to the caller server.
    CLIENT_COMPLETION = 35
    #: Both ways: the invocation failed (client gone, timeout).
    ERROR_COMPLETION = 36
    #: Service→caller server: which service instance holds the invoked client.
    SERVICE_MAPPING = 37
    #: Stateful reconnect (direction UNCONFIRMED): a client connection reconnected.
    CONNECTION_RECONNECT = 38
    #: Newer SDKs, both ways: pause, resume or move the traffic of a connection.
    CONNECTION_FLOW_CONTROL = 39
    #: Newer SDKs, server→service: list a group's members, page by page; answered with an Ack.
    GROUP_MEMBER_QUERY = 40
    #: Newer SDKs: layout UNCONFIRMED, not parsed (skipped like an unknown type).
    REFRESH_AUTH = 41
    #: Newer SDKs: layout UNCONFIRMED, not parsed (skipped like an unknown type).
    GET_CONNECTION_CLAIMS = 42
    #: Newer SDKs: layout UNCONFIRMED, not parsed (skipped like an unknown type).
    UPDATE_CONNECTION_CLAIMS = 43


class ConnectionType(enum.IntEnum):
    """Kinds of server connection, from the HandshakeRequest (§3.3)."""

    #: Carries clients; the service must accept it.
    DEFAULT = 0
    #: Opened at the service's request (a ``target`` ping); carries clients; may be refused.
    ON_DEMAND = 1
    #: Never carries clients, only sends (secondary endpoints, Management SDK).
    WEAK = 2


class MigrationLevel(enum.IntEnum):
    """Whether the server's clients may be moved to another server (HandshakeRequest, §3.3)."""

    #: Never migrate.
    OFF = 0
    #: Migrate only when the server shuts down gracefully (``shutdown`` ``fin:1``).
    SHUTDOWN_ONLY = 1
    #: Migrate even when the server connection drops (may lose data).
    ANY = 2


class AckStatus(enum.IntEnum):
    """Status codes of ``ServiceAckMessage`` (§2.4)."""

    #: True, or success.
    OK = 1
    #: False; not an error (e.g. the connection to add to a group does not exist).
    NOT_FOUND = 2
    #: The SDK throws ``TimeoutException``.
    TIMEOUT = 3
    #: The SDK throws ``TimeoutException`` too.
    INTERNAL_SERVER_ERROR = 4


class ServiceEventObjectType(enum.IntEnum):
    """What a ``ServiceEventMessage`` is about (§2.1)."""

    #: A service instance.
    SERVICE_INSTANCE = 0
    #: A client connection.
    CONNECTION = 1
    #: A user.
    USER = 2
    #: A group.
    GROUP = 3
    #: A server connection.
    SERVER_CONNECTION = 4


class ServiceEventKind(enum.IntEnum):
    """What happened, in a ``ServiceEventMessage`` (§2.1)."""

    #: The object is being reloaded.
    RELOADING = 0
    #: The object is invalid.
    INVALID = 1
    #: The object does not exist.
    NOT_EXISTED = 2
    #: A buffer for the object is full.
    BUFFER_FULL = 3


class DataMessageType(enum.IntEnum):
    """ConnectionData's optional hint (extension key 5, §1.1) on what the payload holds."""

    #: Not said (never written).
    UNKNOWN = 0
    #: The SignalR handshake.
    HANDSHAKE = 1
    #: A hub invocation.
    INVOCATION = 2
    #: Anything else: ping, ack, sequence.
    OTHER = 3


class FlowControlConnectionType(enum.IntEnum):
    """Which connection a ``ConnectionFlowControlMessage`` is about (§2.1)."""

    #: A client connection.
    CLIENT = 1
    #: A server connection.
    SERVER = 2


class ConnectionFlowControlOperation(enum.IntEnum):
    """What a ``ConnectionFlowControlMessage`` asks (§2.1)."""

    #: Service→server: stop sending for this connection.
    PAUSE = 1
    #: Server→service: sending for this connection has stopped.
    PAUSE_ACK = 2
    #: Service→server: sending may resume.
    RESUME = 3
    #: Service→server: use the other server connections.
    OFFLINE = 4


class GracefulShutdownMode(enum.IntEnum):
    """The ``N`` of a server's ``shutdown`` ``fin:N`` ping (§4.4)."""

    #: Leaving (also used when an endpoint is removed); what to do with clients is open.
    OFF = 0
    #: Migrate the server's clients to other servers.
    MIGRATE_CLIENTS = 1
    #: Leave existing clients alone until they go.
    WAIT_FOR_CLIENTS_CLOSE = 2


class PingKey:
    """Keys of the key/value pings (§4.4), as the SDK spells them.

    A ping is ``[3, k1, v1, k2, v2, ...]``; see ``ServicePing.of`` and ``ServicePing.get``.
    """

    #: Service→server, ``"1"``/``"0"``: whether the service has clients for this server; and
    #: server→service, ``"1"``: "do you have clients for me?" (every 10 s).
    STATUS: Final = "status"
    #: Server→service ``""``: list the hub's servers; service→server
    #: ``"<timestamp>:<id1>;<id2>"`` (must contain ``:``; ids sorted): the answer.
    SERVERS: Final = "servers"
    #: Service→server, an instance id: open one more (OnDemand) connection to that instance.
    TARGET: Final = "target"
    #: Service→server, an instance id: that service instance is gone.
    OFFLINE: Final = "offline"
    #: Server→service ``fin:0``/``fin:1``/``fin:2`` (``GracefulShutdownMode``); service→server
    #: ``finack``.
    SHUTDOWN: Final = "shutdown"
    #: Service→server, anything: the SDK sends the same ping straight back.
    ECHO: Final = "echo"
    #: Service→server ``"1"``/``"0"``: turn message tracing ids on or off.
    DIAGNOSTIC_MESSAGES: Final = "d-m"
    #: Service→server, decimal: endpoint metrics used for negotiate weighting.
    CLIENT_COUNT: Final = "clientcount"
    SERVER_COUNT: Final = "servercount"
    CAPACITY: Final = "capacity"
    #: Server→service, decimal: clients known to the server, and on this connection.
    CLIENTS_IN_HUB: Final = "#clientInHub"
    CLIENTS_ON_CONNECTION: Final = "#client"
    #: The value of ``shutdown`` that acknowledges a fin.
    FIN_ACK: Final = "finack"


# --------------------------------------------------------------------------------------------
# Messages
#
# Each dataclass stands under its schema: the SDK's name for the message, then the elements of
# its array after the type, in wire order (``opt(...)``: what older SDKs leave out). The schema
# is all ``_codec`` needs to read, write and check the message; the extension map's members
# are the fields named after them (``tracing_id``, ``ttl``, ...).


def _freeze(message: Any, *names: str) -> None:
    for name in names:
        object.__setattr__(message, name, as_tuple(getattr(message, name), name))


def _freeze_headers(message: Any) -> None:
    headers = message.headers
    if all(type(v) is tuple for v in headers.values()):
        return
    object.__setattr__(
        message, "headers", {k: as_tuple(v, f"header {k!r}") for k, v in headers.items()}
    )


def _written_target(target: str, message: ServiceHandshakeRequest) -> str:
    # The SDK writes "" for a Default connection, whatever the target.
    return "" if message.connection_type == ConnectionType.DEFAULT else (target or "")


# Fields that several layouts share.
_GROUP: Final = string("group", "group_name")
#: LeaveGroup and UserLeaveGroup (with or without Ack): nil means every group.
_ANY_GROUP: Final = nullable("group", "group_name")
_ACK_ID: Final = int32("ackId")
_REASON: Final = nullable("reason")
_EXCLUDED: Final = strings("excludedConnectionIds")
#: Who invoked which client: the first elements of ClientInvocation, ClientCompletion and
#: ErrorCompletion.
_INVOCATION: Final = (string("invocationId"), string("connectionId"), string("callerServerId"))


@schema(
    "HandshakeRequest",
    int32("version"),
    opt(int32("connectionType"), nullable("target", nil="", write=_written_target)),
    opt(int32("migrationLevel")),
    opt(EXT),
    opt(boolean("allowStatefulReconnects"), omit_none=True),
)
@dataclass(frozen=True, slots=True)
class ServiceHandshakeRequest:
    """Type 1, server→service, the first message on a server connection (§3.3).

    ``allow_stateful_reconnects`` is written as a 7th element only when it is not ``None`` (the
    2024-03 SDK writes 6 elements, newer SDKs 7). ``target`` is written as ``""`` for a Default
    connection, as the SDK does.

    >>> write_message(ServiceHandshakeRequest()).hex()
    '0796010100a00080'
    """

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.HANDSHAKE_REQUEST
    version: int = SERVICE_PROTOCOL_VERSION
    connection_type: int = ConnectionType.DEFAULT
    target: str = ""
    migration_level: int = MigrationLevel.OFF
    allow_stateful_reconnects: bool | None = None


@schema("HandshakeResponse", nullable("errorMessage"), opt(EXT), opt(nullable("connectionId")))
@dataclass(frozen=True, slots=True)
class ServiceHandshakeResponse:
    """Type 2, service→server: the handshake's answer (§3.3).

    An empty or nil ``error_message`` means success; otherwise close the socket after it.
    ``connection_id`` is not used by the SDK.

    >>> write_message(ServiceHandshakeResponse()).hex()
    '059402a080c0'
    """

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.HANDSHAKE_RESPONSE
    error_message: str | None = ""
    connection_id: str | None = None

    @property
    def succeeded(self) -> bool:
        """Whether the handshake was accepted (no error message)."""
        return not self.error_message


@schema("Ping", PING_VALUES, hot=True)
@dataclass(frozen=True, slots=True)
class ServicePing:
    """Type 3, both ways: ``[3]`` is a keep-alive; ``[3, k1, v1, k2, v2, ...]`` carries the
    key/value vocabulary of §4.4 (keys in ``PingKey``).

    ``values`` is the flat list of strings after the type. A nil element is read as ``""``.

    >>> ping = ServicePing.of(status="1", clientcount=12)
    >>> ping.values
    ('status', '1', 'clientcount', '12')
    >>> ping.get(PingKey.STATUS)
    '1'
    >>> write_message(ServicePing()).hex()
    '029103'
    """

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.PING
    values: Sequence[str] = ()

    def __post_init__(self) -> None:
        _freeze(self, "values")

    @classmethod
    def of(
        cls,
        pairs: Mapping[str, str | int] | Iterable[tuple[str, str | int]] = (),
        /,
        **kwargs: str | int,
    ) -> ServicePing:
        """A key/value ping from a mapping or pairs, then keyword pairs, in order.

        Integers become decimal strings and booleans ``"1"``/``"0"`` (the SDK reads strings
        only). Keys that are not identifiers go in the first argument:
        ``ServicePing.of({PingKey.DIAGNOSTIC_MESSAGES: "1"})``.
        """
        items = pairs.items() if isinstance(pairs, Mapping) else pairs
        values: list[str] = []
        for key, value in [*items, *kwargs.items()]:
            values.append(key)
            values.append(_ping_value(key, value))
        return cls(tuple(values))

    @classmethod
    def servers_reply(cls, timestamp: int, server_ids: Iterable[str]) -> ServicePing:
        """The service's answer to ``servers``: ``"<timestamp>:<id1>;<id2>;..."``, ids sorted.

        The SDK compares these strings across endpoints, so the order must be stable, and it
        throws unless the value holds a ``:``.
        """
        return cls((PingKey.SERVERS, f"{timestamp}:{';'.join(sorted(server_ids))}"))

    def get(self, key: str) -> str | None:
        """The value after the first ``key`` at an even position, as the SDK reads it; ``None``
        when absent (a key in the last position has no value)."""
        values = self.values
        for i in range(0, len(values) - 1, 2):
            if values[i] == key:
                return values[i + 1]
        return None

    def as_dict(self) -> dict[str, str]:
        """Every key/value pair; the first of a repeated key wins, as in ``get``."""
        values = self.values
        pairs: dict[str, str] = {}
        for i in range(0, len(values) - 1, 2):
            pairs.setdefault(values[i], values[i + 1])
        return pairs

    @property
    def is_keep_alive(self) -> bool:
        """Whether this is the plain ``[3]``."""
        return not self.values


def _ping_value(key: str, value: str | int) -> str:
    if type(value) is str:
        return value
    if type(value) is bool:
        return "1" if value else "0"
    if type(value) is int:
        return str(value)
    raise LocalProtocolError(
        f"ping value of {key!r} must be a string or an integer, got {type(value).__name__}"
    )


@schema("ServiceError", nullable("errorMessage"))
@dataclass(frozen=True, slots=True)
class ServiceErrorMessage:
    """Type 15, service→server: a fatal error. The SDK marks the connection failed; close the
    socket after sending it. No extension map."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.SERVICE_ERROR
    error_message: str | None


@schema(
    "ServiceEvent", int32("objectType"), nullable("id"), int32("kind"), nullable("message"), EXT,
)
@dataclass(frozen=True, slots=True)
class ServiceEventMessage:
    """Type 22, service→server: a warning about an object (``ServiceEventObjectType``,
    ``ServiceEventKind``). The SDK only logs it."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.SERVICE_EVENT
    object_type: int
    id: str | None
    kind: int
    message: str | None


@schema("AccessKeyRequest", nullable("token"), nullable("kid"), EXT)
@dataclass(frozen=True, slots=True)
class AccessKeyRequestMessage:
    """Type 28, server→service (Microsoft Entra mode): a bearer ``token`` asking for a key."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.ACCESS_KEY_REQUEST
    token: str | None
    kid: str | None = None


@schema(
    "AccessKeyResponse", nullable("kid"), nullable("accessKey"), nullable("errorType"),
    nullable("errorMessage"), EXT,
)
@dataclass(frozen=True, slots=True)
class AccessKeyResponseMessage:
    """Type 29, service→server (Microsoft Entra mode): a signing key, or an error."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.ACCESS_KEY_RESPONSE
    kid: str | None = None
    access_key: str | None = None
    error_type: str | None = None
    error_message: str | None = None


@schema(
    "OpenConnection", string("connectionId"), CLAIMS, opt(HEADERS, nullable("queryString")),
    opt(EXT), hot=True,
)
@dataclass(frozen=True, slots=True)
class OpenConnectionMessage:
    """Type 4, service→server: a client connected (§6.2).

    ``claims`` come from the client's token: claim type -> value, or -> a tuple of every value
    of a repeated claim type (a JWT ``"role": ["admin", "editor"]``), in order. On the wire
    they are one MessagePack map whose keys repeat, as the SDK writes and reads its array of
    claims (``WriteMapHeader(Claims.Length)``, then each claim's type and value). ``headers``
    come from the client's HTTP request plus the ``Asrs-*`` headers, ``query_string`` is its
    original query string. ``protocol`` (extension key 3) is the client's hub protocol, so
    that the server sends it that protocol only.

    >>> OpenConnectionMessage("c1", {"asrs.s.uid": "alice"}, protocol="json").claims
    {'asrs.s.uid': 'alice'}
    """

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.OPEN_CONNECTION
    connection_id: str
    claims: dict[str, str | tuple[str, ...]] = field(default_factory=dict)
    headers: dict[str, Sequence[str]] = field(default_factory=dict)
    query_string: str | None = ""
    protocol: str | None = None
    tracing_id: int | None = None

    def __post_init__(self) -> None:
        _freeze_headers(self)
        if not all(isinstance(v, (str, tuple)) for v in self.claims.values()):
            # Values given as lists: tuples, as a parsed message holds them.
            object.__setattr__(self, "claims", {
                k: v if isinstance(v, (str, tuple)) else tuple(v) for k, v in self.claims.items()})


@schema(
    "CloseConnection", string("connectionId"), nullable("errorMessage"), opt(HEADERS), opt(EXT),
    hot=True,
)
@dataclass(frozen=True, slots=True)
class CloseConnectionMessage:
    """Type 5, both ways: the client connection ended (service→server), or must be ended
    (server→service). An empty ``error_message`` means a normal close; the header
    ``Asrs-Migrate-To`` marks a migration."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.CLOSE_CONNECTION
    connection_id: str
    error_message: str | None = ""
    headers: dict[str, Sequence[str]] = field(default_factory=dict)
    tracing_id: int | None = None

    def __post_init__(self) -> None:
        _freeze_headers(self)


@schema("ConnectionData", string("connectionId"), binary("payload"), opt(EXT), hot=True)
@dataclass(frozen=True, slots=True)
class ConnectionDataMessage:
    """Type 6, both ways: raw bytes of one client's SignalR stream, framing included (§5).

    ``data_message_type`` (``DataMessageType``, key 5) and ``is_partial`` (key 6) are optional
    hints, written only when not 0 / false.
    """

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.CONNECTION_DATA
    connection_id: str
    payload: bytes
    tracing_id: int | None = None
    data_message_type: int = DataMessageType.UNKNOWN
    is_partial: bool = False


@schema("ConnectionReconnect", string("connectionId"), EXT)
@dataclass(frozen=True, slots=True)
class ConnectionReconnectMessage:
    """Type 38 (stateful reconnect; use UNCONFIRMED): the client connection reconnected."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.CONNECTION_RECONNECT
    connection_id: str


@schema("MultiConnectionData", strings("connectionIds"), PAYLOADS, opt(EXT), hot=True)
@dataclass(frozen=True, slots=True)
class MultiConnectionDataMessage:
    """Type 7, server→service: send to each of ``connection_ids`` the entry of ``payloads``
    for its protocol (``payload_for``)."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.MULTI_CONNECTION_DATA
    connection_ids: Sequence[str]
    payloads: dict[str, bytes]
    tracing_id: int | None = None
    filter: str | None = None

    def __post_init__(self) -> None:
        _freeze(self, "connection_ids")


@schema("UserData", string("userId"), PAYLOADS, opt(EXT), hot=True)
@dataclass(frozen=True, slots=True)
class UserDataMessage:
    """Type 8, server→service: send to every connection of ``user_id``."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.USER_DATA
    user_id: str
    payloads: dict[str, bytes]
    tracing_id: int | None = None
    filter: str | None = None


@schema("MultiUserData", strings("userIds"), PAYLOADS, opt(EXT), hot=True)
@dataclass(frozen=True, slots=True)
class MultiUserDataMessage:
    """Type 9, server→service: send to every connection of each of ``user_ids``."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.MULTI_USER_DATA
    user_ids: Sequence[str]
    payloads: dict[str, bytes]
    tracing_id: int | None = None
    filter: str | None = None

    def __post_init__(self) -> None:
        _freeze(self, "user_ids")


@schema("BroadcastData", strings("excludedConnectionIds"), PAYLOADS, opt(EXT), hot=True)
@dataclass(frozen=True, slots=True)
class BroadcastDataMessage:
    """Type 10, server→service: send to every connection of the hub but
    ``excluded_connection_ids``.

    >>> BroadcastDataMessage({"json": b'{"type":6}\\x1e'}).excluded_connection_ids
    ()
    """

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.BROADCAST_DATA
    payloads: dict[str, bytes]
    excluded_connection_ids: Sequence[str] = ()
    tracing_id: int | None = None
    filter: str | None = None

    def __post_init__(self) -> None:
        _freeze(self, "excluded_connection_ids")


@schema(
    "GroupBroadcastData", _GROUP, strings("excludedConnectionIds"), PAYLOADS, opt(EXT),
    opt(strings("excludedUserIds"), nullable("callerUserId")), hot=True,
)
@dataclass(frozen=True, slots=True)
class GroupBroadcastDataMessage:
    """Type 13, server→service: send to every connection in ``group_name`` but
    ``excluded_connection_ids``.

    ``excluded_user_ids`` and ``caller_user_id`` (elements 6 and 7, UNCONFIRMED semantics; the
    SDK writes an empty list and nil) are always written: 7 elements.
    """

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.GROUP_BROADCAST_DATA
    group_name: str
    payloads: dict[str, bytes]
    excluded_connection_ids: Sequence[str] = ()
    excluded_user_ids: Sequence[str] = ()
    caller_user_id: str | None = None
    tracing_id: int | None = None
    filter: str | None = None

    def __post_init__(self) -> None:
        _freeze(self, "excluded_connection_ids", "excluded_user_ids")


@schema("MultiGroupBroadcastData", strings("groups", "group_names"), PAYLOADS, opt(EXT), hot=True)
@dataclass(frozen=True, slots=True)
class MultiGroupBroadcastDataMessage:
    """Type 14, server→service: send to every connection in any of ``group_names``, once."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.MULTI_GROUP_BROADCAST_DATA
    group_names: Sequence[str]
    payloads: dict[str, bytes]
    tracing_id: int | None = None
    filter: str | None = None

    def __post_init__(self) -> None:
        _freeze(self, "group_names")


@schema("JoinGroup", string("connectionId"), _GROUP, opt(EXT))
@dataclass(frozen=True, slots=True)
class JoinGroupMessage:
    """Type 11, server→service: add ``connection_id`` to ``group_name``; no answer."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.JOIN_GROUP
    connection_id: str
    group_name: str
    tracing_id: int | None = None


@schema("LeaveGroup", string("connectionId"), _ANY_GROUP, opt(EXT))
@dataclass(frozen=True, slots=True)
class LeaveGroupMessage:
    """Type 12, server→service: remove ``connection_id`` from ``group_name``; no answer."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.LEAVE_GROUP
    connection_id: str
    group_name: str | None
    tracing_id: int | None = None


@schema("UserJoinGroup", string("userId"), _GROUP, opt(EXT))
@dataclass(frozen=True, slots=True)
class UserJoinGroupMessage:
    """Type 16, server→service: add ``user_id`` (and its later connections) to ``group_name``
    for ``ttl`` seconds (key 2; ``None``: no TTL); no answer."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.USER_JOIN_GROUP
    user_id: str
    group_name: str
    ttl: int | None = None
    tracing_id: int | None = None


@schema("UserLeaveGroup", string("userId"), _ANY_GROUP, opt(EXT))
@dataclass(frozen=True, slots=True)
class UserLeaveGroupMessage:
    """Type 17, server→service: remove ``user_id`` from ``group_name``; no answer."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.USER_LEAVE_GROUP
    user_id: str
    group_name: str | None
    tracing_id: int | None = None


@schema("JoinGroupWithAck", string("connectionId"), _GROUP, _ACK_ID, opt(EXT))
@dataclass(frozen=True, slots=True)
class JoinGroupWithAckMessage:
    """Type 18, server→service: JoinGroup, answered with ``ServiceAckMessage(ack_id, ...)``."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.JOIN_GROUP_WITH_ACK
    connection_id: str
    group_name: str
    ack_id: int
    tracing_id: int | None = None


@schema("LeaveGroupWithAck", string("connectionId"), _ANY_GROUP, _ACK_ID, opt(EXT))
@dataclass(frozen=True, slots=True)
class LeaveGroupWithAckMessage:
    """Type 19, server→service: LeaveGroup, answered with an Ack. ``group_name=None`` means
    "from every group"."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.LEAVE_GROUP_WITH_ACK
    connection_id: str
    group_name: str | None
    ack_id: int
    tracing_id: int | None = None


@schema("UserJoinGroupWithAck", string("userId"), _GROUP, _ACK_ID, EXT)
@dataclass(frozen=True, slots=True)
class UserJoinGroupWithAckMessage:
    """Type 26, server→service: UserJoinGroup (``ttl`` in seconds), answered with an Ack."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.USER_JOIN_GROUP_WITH_ACK
    user_id: str
    group_name: str
    ack_id: int
    ttl: int | None = None
    tracing_id: int | None = None


@schema("UserLeaveGroupWithAck", string("userId"), _ANY_GROUP, _ACK_ID, EXT)
@dataclass(frozen=True, slots=True)
class UserLeaveGroupWithAckMessage:
    """Type 27, server→service: UserLeaveGroup, answered with an Ack. ``group_name=None``
    means "from every group"."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.USER_LEAVE_GROUP_WITH_ACK
    user_id: str
    group_name: str | None
    ack_id: int
    tracing_id: int | None = None


@schema("CheckUserInGroupWithAck", string("userId"), _GROUP, _ACK_ID, opt(EXT))
@dataclass(frozen=True, slots=True)
class CheckUserInGroupWithAckMessage:
    """Type 21, server→service: Ack Ok if ``user_id`` is in ``group_name``, else NotFound."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.CHECK_USER_IN_GROUP_WITH_ACK
    user_id: str
    group_name: str
    ack_id: int
    tracing_id: int | None = None


@schema("CheckGroupExistenceWithAck", _GROUP, _ACK_ID, EXT)
@dataclass(frozen=True, slots=True)
class CheckGroupExistenceWithAckMessage:
    """Type 23, server→service: Ack Ok if ``group_name`` has any connection, else NotFound."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.CHECK_GROUP_EXISTENCE_WITH_ACK
    group_name: str
    ack_id: int
    tracing_id: int | None = None


@schema("CheckConnectionExistenceWithAck", string("connectionId"), _ACK_ID, EXT)
@dataclass(frozen=True, slots=True)
class CheckConnectionExistenceWithAckMessage:
    """Type 24, server→service: Ack Ok if ``connection_id`` exists, else NotFound."""

    message_type: ClassVar[ServiceMessageType] = (
        ServiceMessageType.CHECK_CONNECTION_EXISTENCE_WITH_ACK
    )
    connection_id: str
    ack_id: int
    tracing_id: int | None = None


@schema("CheckUserExistenceWithAck", string("userId"), _ACK_ID, EXT)
@dataclass(frozen=True, slots=True)
class CheckUserExistenceWithAckMessage:
    """Type 25, server→service: Ack Ok if ``user_id`` has any connection, else NotFound."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.CHECK_USER_EXISTENCE_WITH_ACK
    user_id: str
    ack_id: int
    tracing_id: int | None = None


@schema("CloseConnectionWithAck", string("connectionId"), _REASON, _ACK_ID, opt(EXT))
@dataclass(frozen=True, slots=True)
class CloseConnectionWithAckMessage:
    """Type 30 (obsolete), server→service: close ``connection_id``, answered with an Ack."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.CLOSE_CONNECTION_WITH_ACK
    connection_id: str
    ack_id: int
    reason: str | None = None
    tracing_id: int | None = None


@schema("CloseConnectionsWithAck", _REASON, _ACK_ID, _EXCLUDED, opt(EXT))
@dataclass(frozen=True, slots=True)
class CloseConnectionsWithAckMessage:
    """Type 31 (obsolete), server→service: close every connection of the hub but the
    excluded ones, answered with an Ack."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.CLOSE_CONNECTIONS_WITH_ACK
    ack_id: int
    reason: str | None = None
    excluded_connection_ids: Sequence[str] = ()
    tracing_id: int | None = None

    def __post_init__(self) -> None:
        _freeze(self, "excluded_connection_ids")


@schema("CloseUserConnectionsWithAck", string("userId"), _REASON, _ACK_ID, _EXCLUDED, opt(EXT))
@dataclass(frozen=True, slots=True)
class CloseUserConnectionsWithAckMessage:
    """Type 32, server→service: close every connection of ``user_id`` but the excluded ones,
    answered with an Ack."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.CLOSE_USER_CONNECTIONS_WITH_ACK
    user_id: str
    ack_id: int
    reason: str | None = None
    excluded_connection_ids: Sequence[str] = ()
    tracing_id: int | None = None

    def __post_init__(self) -> None:
        _freeze(self, "excluded_connection_ids")


@schema("CloseGroupConnectionsWithAck", _GROUP, _REASON, _ACK_ID, _EXCLUDED, opt(EXT))
@dataclass(frozen=True, slots=True)
class CloseGroupConnectionsWithAckMessage:
    """Type 33, server→service: close every connection in ``group_name`` but the excluded
    ones, answered with an Ack."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.CLOSE_GROUP_CONNECTIONS_WITH_ACK
    group_name: str
    ack_id: int
    reason: str | None = None
    excluded_connection_ids: Sequence[str] = ()
    tracing_id: int | None = None

    def __post_init__(self) -> None:
        _freeze(self, "excluded_connection_ids")


@schema(
    "GroupMemberQuery", EXT, _GROUP, _ACK_ID, int32("max", "max_count"),
    nullable("continuationToken"),
)
@dataclass(frozen=True, slots=True)
class GroupMemberQueryMessage:
    """Type 40 (newer SDKs), server→service: list ``group_name``'s members, at most
    ``max_count`` per page, from ``continuation_token``; answered with an Ack whose payload is
    MessagePack ``[[[connectionId, userId|nil], ...], continuationToken|nil]``.

    On the wire the extension map comes second: ``[40, ext, group, ackId, max, token]``.
    """

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.GROUP_MEMBER_QUERY
    group_name: str
    ack_id: int
    max_count: int
    continuation_token: str | None = None
    tracing_id: int | None = None


@schema(
    "Ack", _ACK_ID, int32("status"), nullable("message"), opt(EXT),
    opt(nullable_binary("payload"), omit_none=True),
)
@dataclass(frozen=True, slots=True)
class ServiceAckMessage:
    """Type 20, service→server: the answer to the ``*WithAck`` message with ``ack_id``.

    ``status`` is an ``AckStatus`` (other values make the SDK throw). ``payload`` (newer SDKs,
    GroupMemberQuery) is written as a 6th element only when it is not ``None``.

    >>> write_message(ServiceAckMessage(1, AckStatus.OK)).hex()
    '0695140101a080'
    """

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.ACK
    ack_id: int
    status: int
    message: str | None = ""
    payload: bytes | None = None


@schema("ClientInvocation", *_INVOCATION, PAYLOADS, EXT)
@dataclass(frozen=True, slots=True)
class ClientInvocationMessage:
    """Type 34: server ``caller_server_id`` invokes client ``connection_id`` and waits for the
    result; ``payloads`` hold the invocation per protocol (§2.5)."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.CLIENT_INVOCATION
    invocation_id: str
    connection_id: str
    caller_server_id: str
    payloads: dict[str, bytes]
    tracing_id: int | None = None


@schema("ClientCompletion", *_INVOCATION, nullable("protocol"), binary("payload"), EXT)
@dataclass(frozen=True, slots=True)
class ClientCompletionMessage:
    """Type 35: the client's completion ``payload`` (in ``protocol``), for the caller server.

    ``protocol`` travels twice, as element 4 and as extension key 3, as the SDK writes it; on
    reading, the extension's value wins when present (the SDK sets one property from both).
    """

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.CLIENT_COMPLETION
    invocation_id: str
    connection_id: str
    caller_server_id: str
    protocol: str | None
    payload: bytes
    tracing_id: int | None = None


@schema("ErrorCompletion", *_INVOCATION, nullable("error"), EXT)
@dataclass(frozen=True, slots=True)
class ErrorCompletionMessage:
    """Type 36: the invocation failed with ``error`` (client gone, timeout after 10 minutes)."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.ERROR_COMPLETION
    invocation_id: str
    connection_id: str
    caller_server_id: str
    error: str | None
    tracing_id: int | None = None


@schema("ServiceMapping", string("invocationId"), string("connectionId"), string("instanceId"), EXT)
@dataclass(frozen=True, slots=True)
class ServiceMappingMessage:
    """Type 37, service→caller server: the invoked client lives on service ``instance_id``."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.SERVICE_MAPPING
    invocation_id: str
    connection_id: str
    instance_id: str


@schema(
    "ConnectionFlowControl",
    string("connectionId"),
    enum32("connectionType", FlowControlConnectionType, "1 (client) or 2 (server)"),
    enum32(
        "operation", ConnectionFlowControlOperation, "1 to 4 (Pause, PauseAck, Resume, Offline)"
    ),
    opt(UNREAD_EXT),
)
@dataclass(frozen=True, slots=True)
class ConnectionFlowControlMessage:
    """Type 39 (newer SDKs): pause, resume or move the traffic of ``connection_id``.

    Its two enums are written as fixed int32 (``d2 xx xx xx xx``), as the SDK writes them, and
    values outside the enums are refused on reading, as the SDK does.

    >>> write_message(ConnectionFlowControlMessage("c", ConnectionFlowControlOperation.PAUSE)).hex()
    '0f9527a163d200000001d20000000180'
    """

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.CONNECTION_FLOW_CONTROL
    connection_id: str
    operation: int
    connection_type: int = FlowControlConnectionType.CLIENT


#: Any service message; ``isinstance(x, ServiceMessage)`` works.
ServiceMessage = (
    ServiceHandshakeRequest
    | ServiceHandshakeResponse
    | ServicePing
    | ServiceErrorMessage
    | ServiceEventMessage
    | AccessKeyRequestMessage
    | AccessKeyResponseMessage
    | OpenConnectionMessage
    | CloseConnectionMessage
    | ConnectionDataMessage
    | ConnectionReconnectMessage
    | MultiConnectionDataMessage
    | UserDataMessage
    | MultiUserDataMessage
    | BroadcastDataMessage
    | GroupBroadcastDataMessage
    | MultiGroupBroadcastDataMessage
    | JoinGroupMessage
    | LeaveGroupMessage
    | UserJoinGroupMessage
    | UserLeaveGroupMessage
    | JoinGroupWithAckMessage
    | LeaveGroupWithAckMessage
    | UserJoinGroupWithAckMessage
    | UserLeaveGroupWithAckMessage
    | CheckUserInGroupWithAckMessage
    | CheckGroupExistenceWithAckMessage
    | CheckConnectionExistenceWithAckMessage
    | CheckUserExistenceWithAckMessage
    | CloseConnectionWithAckMessage
    | CloseConnectionsWithAckMessage
    | CloseUserConnectionsWithAckMessage
    | CloseGroupConnectionsWithAckMessage
    | GroupMemberQueryMessage
    | ServiceAckMessage
    | ClientInvocationMessage
    | ClientCompletionMessage
    | ErrorCompletionMessage
    | ServiceMappingMessage
    | ConnectionFlowControlMessage
)


# --------------------------------------------------------------------------------------------
# Lookups


def payload_for(payloads: Mapping[str, bytes], protocol_name: str) -> bytes | None:
    """The entry of a payload map for a client's hub protocol, matched case-insensitively
    (§1 reading rules, §5); ``None`` when the map has none for it.

    >>> payload_for({"Json": b"a", "messagepack": b"b"}, "json")
    b'a'
    """
    payload = payloads.get(protocol_name)
    if payload is not None:
        return payload
    wanted = protocol_name.lower()
    for name, payload in payloads.items():
        if name.lower() == wanted:
            return payload
    return None


def header_for(headers: Mapping[str, Sequence[str]], name: str) -> Sequence[str] | None:
    """The values of an OpenConnection/CloseConnection header, matched case-insensitively
    (the SDK's header maps ignore case); ``None`` when absent."""
    values = headers.get(name)
    if values is not None:
        return values
    wanted = name.lower()
    for key, values in headers.items():
        if key.lower() == wanted:
            return values
    return None


def upstream_signature(connection_id: str, access_keys: Iterable[str]) -> str:
    """The ``X-ASRS-Signature`` header of an upstream request (§13.3): one
    ``sha256=<hex HMAC-SHA256>`` per access key (keyed by the key's UTF-8 bytes, over the
    connection id's), comma-separated, lowercase hex."""
    message = connection_id.encode("utf-8")
    return ",".join(
        "sha256=" + hmac.new(key.encode("utf-8"), message, hashlib.sha256).hexdigest()
        for key in access_keys
    )

