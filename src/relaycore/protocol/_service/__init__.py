"""The Azure SignalR service protocol, sans-I/O: app server <-> service over the server socket.

Theory of operation
-------------------

An app server opens a binary WebSocket to ``/server/`` and both sides then exchange *service
messages* (``protocol/service-protocol.md`` §1-2):

* The socket is a **byte stream**. A frame is a varint length prefix (the one of
  ``relaycore._accel``) and a body of that many bytes; the body is one MessagePack array whose
  first element is the message type. Frames are not aligned with WebSocket messages: one
  message may hold several frames or part of one. ``ServiceProtocolParser`` buffers the stream
  (``receive_data``) and hands out whole messages (``messages_received``).
* The first message is the app server's ``ServiceHandshakeRequest``; the service answers with a
  ``ServiceHandshakeResponse`` (§3.3). After that either side may send anything its direction
  allows; ``ServicePing`` keeps the connection alive and carries the key/value vocabulary of
  §4.4.
* ``write_message(message)`` gives one whole frame (prefix + body) in the layout the current
  Microsoft SDK writes, byte for byte (§2, ``vectors/service-protocol.json``).
* ``parse_message_body(body)`` reads one body the way the SDK reader does: the array length
  decides which optional trailing fields are present (older SDKs write shorter arrays), extra
  trailing elements are ignored, a message of unknown type is skipped (``None``), strings may
  be nil. Anything else that is wrong raises ``RemoteProtocolError`` naming the message type and
  the field; the connection should then be closed.

Nothing here keeps connection state beyond the parser's buffer; message objects are frozen
dataclasses named after the SDK's classes (``Service...`` where the hub protocol already has the
name). Parsed integers are plain ``int``; the enums here compare equal to them.

The extension map (§1.1) is a MessagePack map with integer keys that most message types carry
at a fixed position. Its members are ordinary fields here (``tracing_id``, ``ttl``,
``protocol``, ``filter``, ``data_message_type``, ``is_partial``), present only on the message
types that carry them. A key is written only when it is set, and no key outside 1-6 is ever
written: the 2024-03 SDK reads an unknown key but not its value, and misparses the rest of the
message. Unknown keys received are skipped.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

import msgpack  # type: ignore[import-untyped]

from ..._accel import decode_varint, encode_varint, split_varint_frames
from .._errors import LocalProtocolError, RemoteProtocolError, show_value, unpack_error_text

__all__ = [
    "ASRS_INSTANCE_ID_HEADER",
    "ASRS_IS_DIAGNOSTIC_CLIENT_HEADER",
    "ASRS_MIGRATE_FROM_HEADER",
    "ASRS_MIGRATE_TO_HEADER",
    "DEFAULT_MAX_SERVICE_MESSAGE_SIZE",
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
    "ServiceProtocolParser",
    "UserDataMessage",
    "UserJoinGroupMessage",
    "UserJoinGroupWithAckMessage",
    "UserLeaveGroupMessage",
    "UserLeaveGroupWithAckMessage",
    "connection_data_prefix",
    "header_for",
    "parse_message_body",
    "payload_for",
    "upstream_signature",
    "write_connection_data",
    "write_message",
    "write_messages",
]

#: The only service protocol version (§1: the integer 1 in the HandshakeRequest).
SERVICE_PROTOCOL_VERSION: Final = 1

#: Default limit on one service message body; a prefix announcing more is refused at once.
DEFAULT_MAX_SERVICE_MESSAGE_SIZE: Final = 16 * 1024 * 1024

#: The largest body a varint prefix may announce (§1: at most 5 bytes, 2**31 - 1).
_MAX_FRAME: Final = 0x7FFFFFFF

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


def _as_tuple(value: Iterable[Any], what: str) -> tuple[Any, ...]:
    # Messages are frozen, so their lists are tuples; this also makes a parsed message equal to
    # one built by hand with a list.
    if type(value) is tuple:
        return value
    if isinstance(value, (str, bytes, bytearray, memoryview, Mapping)):
        raise LocalProtocolError(f"{what} must be a list or tuple, got {type(value).__name__}")
    return tuple(value)


def _freeze(message: Any, *names: str) -> None:
    for name in names:
        object.__setattr__(message, name, _as_tuple(getattr(message, name), name))


def _freeze_headers(message: Any) -> None:
    headers = message.headers
    if all(type(v) is tuple for v in headers.values()):
        return
    object.__setattr__(
        message, "headers", {k: _as_tuple(v, f"header {k!r}") for k, v in headers.items()}
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


@dataclass(frozen=True, slots=True)
class ServiceErrorMessage:
    """Type 15, service→server: a fatal error. The SDK marks the connection failed; close the
    socket after sending it. No extension map."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.SERVICE_ERROR
    error_message: str | None


@dataclass(frozen=True, slots=True)
class ServiceEventMessage:
    """Type 22, service→server: a warning about an object (``ServiceEventObjectType``,
    ``ServiceEventKind``). The SDK only logs it."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.SERVICE_EVENT
    object_type: int
    id: str | None
    kind: int
    message: str | None


@dataclass(frozen=True, slots=True)
class AccessKeyRequestMessage:
    """Type 28, server→service (Microsoft Entra mode): a bearer ``token`` asking for a key."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.ACCESS_KEY_REQUEST
    token: str | None
    kid: str | None = None


@dataclass(frozen=True, slots=True)
class AccessKeyResponseMessage:
    """Type 29, service→server (Microsoft Entra mode): a signing key, or an error."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.ACCESS_KEY_RESPONSE
    kid: str | None = None
    access_key: str | None = None
    error_type: str | None = None
    error_message: str | None = None


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


@dataclass(frozen=True, slots=True)
class ConnectionReconnectMessage:
    """Type 38 (stateful reconnect; use UNCONFIRMED): the client connection reconnected."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.CONNECTION_RECONNECT
    connection_id: str


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


@dataclass(frozen=True, slots=True)
class UserDataMessage:
    """Type 8, server→service: send to every connection of ``user_id``."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.USER_DATA
    user_id: str
    payloads: dict[str, bytes]
    tracing_id: int | None = None
    filter: str | None = None


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


@dataclass(frozen=True, slots=True)
class JoinGroupMessage:
    """Type 11, server→service: add ``connection_id`` to ``group_name``; no answer."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.JOIN_GROUP
    connection_id: str
    group_name: str
    tracing_id: int | None = None


@dataclass(frozen=True, slots=True)
class LeaveGroupMessage:
    """Type 12, server→service: remove ``connection_id`` from ``group_name``; no answer."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.LEAVE_GROUP
    connection_id: str
    group_name: str | None
    tracing_id: int | None = None


@dataclass(frozen=True, slots=True)
class UserJoinGroupMessage:
    """Type 16, server→service: add ``user_id`` (and its later connections) to ``group_name``
    for ``ttl`` seconds (key 2; ``None``: no TTL); no answer."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.USER_JOIN_GROUP
    user_id: str
    group_name: str
    ttl: int | None = None
    tracing_id: int | None = None


@dataclass(frozen=True, slots=True)
class UserLeaveGroupMessage:
    """Type 17, server→service: remove ``user_id`` from ``group_name``; no answer."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.USER_LEAVE_GROUP
    user_id: str
    group_name: str | None
    tracing_id: int | None = None


@dataclass(frozen=True, slots=True)
class JoinGroupWithAckMessage:
    """Type 18, server→service: JoinGroup, answered with ``ServiceAckMessage(ack_id, ...)``."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.JOIN_GROUP_WITH_ACK
    connection_id: str
    group_name: str
    ack_id: int
    tracing_id: int | None = None


@dataclass(frozen=True, slots=True)
class LeaveGroupWithAckMessage:
    """Type 19, server→service: LeaveGroup, answered with an Ack. ``group_name=None`` means
    "from every group"."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.LEAVE_GROUP_WITH_ACK
    connection_id: str
    group_name: str | None
    ack_id: int
    tracing_id: int | None = None


@dataclass(frozen=True, slots=True)
class UserJoinGroupWithAckMessage:
    """Type 26, server→service: UserJoinGroup (``ttl`` in seconds), answered with an Ack."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.USER_JOIN_GROUP_WITH_ACK
    user_id: str
    group_name: str
    ack_id: int
    ttl: int | None = None
    tracing_id: int | None = None


@dataclass(frozen=True, slots=True)
class UserLeaveGroupWithAckMessage:
    """Type 27, server→service: UserLeaveGroup, answered with an Ack. ``group_name=None``
    means "from every group"."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.USER_LEAVE_GROUP_WITH_ACK
    user_id: str
    group_name: str | None
    ack_id: int
    tracing_id: int | None = None


@dataclass(frozen=True, slots=True)
class CheckUserInGroupWithAckMessage:
    """Type 21, server→service: Ack Ok if ``user_id`` is in ``group_name``, else NotFound."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.CHECK_USER_IN_GROUP_WITH_ACK
    user_id: str
    group_name: str
    ack_id: int
    tracing_id: int | None = None


@dataclass(frozen=True, slots=True)
class CheckGroupExistenceWithAckMessage:
    """Type 23, server→service: Ack Ok if ``group_name`` has any connection, else NotFound."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.CHECK_GROUP_EXISTENCE_WITH_ACK
    group_name: str
    ack_id: int
    tracing_id: int | None = None


@dataclass(frozen=True, slots=True)
class CheckConnectionExistenceWithAckMessage:
    """Type 24, server→service: Ack Ok if ``connection_id`` exists, else NotFound."""

    message_type: ClassVar[ServiceMessageType] = (
        ServiceMessageType.CHECK_CONNECTION_EXISTENCE_WITH_ACK
    )
    connection_id: str
    ack_id: int
    tracing_id: int | None = None


@dataclass(frozen=True, slots=True)
class CheckUserExistenceWithAckMessage:
    """Type 25, server→service: Ack Ok if ``user_id`` has any connection, else NotFound."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.CHECK_USER_EXISTENCE_WITH_ACK
    user_id: str
    ack_id: int
    tracing_id: int | None = None


@dataclass(frozen=True, slots=True)
class CloseConnectionWithAckMessage:
    """Type 30 (obsolete), server→service: close ``connection_id``, answered with an Ack."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.CLOSE_CONNECTION_WITH_ACK
    connection_id: str
    ack_id: int
    reason: str | None = None
    tracing_id: int | None = None


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


@dataclass(frozen=True, slots=True)
class ErrorCompletionMessage:
    """Type 36: the invocation failed with ``error`` (client gone, timeout after 10 minutes)."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.ERROR_COMPLETION
    invocation_id: str
    connection_id: str
    caller_server_id: str
    error: str | None
    tracing_id: int | None = None


@dataclass(frozen=True, slots=True)
class ServiceMappingMessage:
    """Type 37, service→caller server: the invoked client lives on service ``instance_id``."""

    message_type: ClassVar[ServiceMessageType] = ServiceMessageType.SERVICE_MAPPING
    invocation_id: str
    connection_id: str
    instance_id: str


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


# --------------------------------------------------------------------------------------------
# Writing


#: Extension map keys (§1.1).
_EXT_TRACING_ID: Final = 1
_EXT_TTL: Final = 2
_EXT_PROTOCOL: Final = 3
_EXT_FILTER: Final = 4
_EXT_DATA_MESSAGE_TYPE: Final = 5
_EXT_IS_PARTIAL: Final = 6

_NO_EXT: Final[dict[int, Any]] = {}


def _ext(
    tracing_id: int | None = None,
    ttl: int | None = None,
    protocol: str | None = None,
    filter: str | None = None,
    data_message_type: int = 0,
    is_partial: bool = False,
) -> dict[int, Any]:
    # Keys in the SDK's order, each only when set; never a key outside 1-6 (§1.1).
    ext: dict[int, Any] = {}
    if tracing_id is not None:
        ext[_EXT_TRACING_ID] = tracing_id
    if ttl is not None:
        ext[_EXT_TTL] = ttl
    if protocol is not None:
        ext[_EXT_PROTOCOL] = protocol
    if filter is not None:
        ext[_EXT_FILTER] = filter
    if data_message_type:
        ext[_EXT_DATA_MESSAGE_TYPE] = int(data_message_type)
    if is_partial:
        ext[_EXT_IS_PARTIAL] = True
    return ext


def _w_handshake_request(m: ServiceHandshakeRequest) -> list[Any]:
    target = "" if m.connection_type == ConnectionType.DEFAULT else (m.target or "")
    array: list[Any] = [1, m.version, m.connection_type, target, m.migration_level, _NO_EXT]
    if m.allow_stateful_reconnects is not None:
        array.append(bool(m.allow_stateful_reconnects))
    return array


def _w_handshake_response(m: ServiceHandshakeResponse) -> list[Any]:
    return [2, m.error_message, _NO_EXT, m.connection_id]


def _w_ping(m: ServicePing) -> list[Any]:
    return [3, *m.values]


def _open_body(m: OpenConnectionMessage) -> bytes:
    # The claims map is written pair by pair, a repeated claim type once per value (a dict
    # cannot hold a key twice); otherwise this is packb of the 6-element array.
    packer = msgpack.Packer(use_bin_type=True)
    pairs = [(name, value) for name, values in m.claims.items()
             for value in (values if type(values) is tuple else (values,))]
    return b"".join((
        b"\x96\x04",  # fixarray of 6, type 4
        packer.pack(m.connection_id),
        packer.pack_map_pairs(pairs),
        packer.pack(m.headers),
        packer.pack(m.query_string),
        packer.pack(_ext(m.tracing_id, protocol=m.protocol)),
    ))


def _w_close(m: CloseConnectionMessage) -> list[Any]:
    return [5, m.connection_id, m.error_message, m.headers, _ext(m.tracing_id)]


def _w_data(m: ConnectionDataMessage) -> list[Any]:
    ext = _ext(m.tracing_id, data_message_type=m.data_message_type, is_partial=m.is_partial)
    return [6, m.connection_id, m.payload, ext]


def _w_multi_connection(m: MultiConnectionDataMessage) -> list[Any]:
    return [7, m.connection_ids, m.payloads, _ext(m.tracing_id, filter=m.filter)]


def _w_user(m: UserDataMessage) -> list[Any]:
    return [8, m.user_id, m.payloads, _ext(m.tracing_id, filter=m.filter)]


def _w_multi_user(m: MultiUserDataMessage) -> list[Any]:
    return [9, m.user_ids, m.payloads, _ext(m.tracing_id, filter=m.filter)]


def _w_broadcast(m: BroadcastDataMessage) -> list[Any]:
    return [10, m.excluded_connection_ids, m.payloads, _ext(m.tracing_id, filter=m.filter)]


def _w_join(m: JoinGroupMessage) -> list[Any]:
    return [11, m.connection_id, m.group_name, _ext(m.tracing_id)]


def _w_leave(m: LeaveGroupMessage) -> list[Any]:
    return [12, m.connection_id, m.group_name, _ext(m.tracing_id)]


def _w_group_broadcast(m: GroupBroadcastDataMessage) -> list[Any]:
    return [
        13,
        m.group_name,
        m.excluded_connection_ids,
        m.payloads,
        _ext(m.tracing_id, filter=m.filter),
        m.excluded_user_ids,
        m.caller_user_id,
    ]


def _w_multi_group(m: MultiGroupBroadcastDataMessage) -> list[Any]:
    return [14, m.group_names, m.payloads, _ext(m.tracing_id, filter=m.filter)]


def _w_service_error(m: ServiceErrorMessage) -> list[Any]:
    return [15, m.error_message]


def _w_user_join(m: UserJoinGroupMessage) -> list[Any]:
    return [16, m.user_id, m.group_name, _ext(m.tracing_id, m.ttl)]


def _w_user_leave(m: UserLeaveGroupMessage) -> list[Any]:
    return [17, m.user_id, m.group_name, _ext(m.tracing_id)]


def _w_join_ack(m: JoinGroupWithAckMessage) -> list[Any]:
    return [18, m.connection_id, m.group_name, m.ack_id, _ext(m.tracing_id)]


def _w_leave_ack(m: LeaveGroupWithAckMessage) -> list[Any]:
    return [19, m.connection_id, m.group_name, m.ack_id, _ext(m.tracing_id)]


def _w_ack(m: ServiceAckMessage) -> list[Any]:
    array: list[Any] = [20, m.ack_id, m.status, m.message, _NO_EXT]
    if m.payload is not None:
        array.append(m.payload)
    return array


def _w_check_user_in_group(m: CheckUserInGroupWithAckMessage) -> list[Any]:
    return [21, m.user_id, m.group_name, m.ack_id, _ext(m.tracing_id)]


def _w_service_event(m: ServiceEventMessage) -> list[Any]:
    return [22, m.object_type, m.id, m.kind, m.message, _NO_EXT]


def _w_check_group(m: CheckGroupExistenceWithAckMessage) -> list[Any]:
    return [23, m.group_name, m.ack_id, _ext(m.tracing_id)]


def _w_check_connection(m: CheckConnectionExistenceWithAckMessage) -> list[Any]:
    return [24, m.connection_id, m.ack_id, _ext(m.tracing_id)]


def _w_check_user(m: CheckUserExistenceWithAckMessage) -> list[Any]:
    return [25, m.user_id, m.ack_id, _ext(m.tracing_id)]


def _w_user_join_ack(m: UserJoinGroupWithAckMessage) -> list[Any]:
    return [26, m.user_id, m.group_name, m.ack_id, _ext(m.tracing_id, m.ttl)]


def _w_user_leave_ack(m: UserLeaveGroupWithAckMessage) -> list[Any]:
    return [27, m.user_id, m.group_name, m.ack_id, _ext(m.tracing_id)]


def _w_access_key_request(m: AccessKeyRequestMessage) -> list[Any]:
    return [28, m.token, m.kid, _NO_EXT]


def _w_access_key_response(m: AccessKeyResponseMessage) -> list[Any]:
    return [29, m.kid, m.access_key, m.error_type, m.error_message, _NO_EXT]


def _w_close_connection_ack(m: CloseConnectionWithAckMessage) -> list[Any]:
    return [30, m.connection_id, m.reason, m.ack_id, _ext(m.tracing_id)]


def _w_close_connections_ack(m: CloseConnectionsWithAckMessage) -> list[Any]:
    return [31, m.reason, m.ack_id, m.excluded_connection_ids, _ext(m.tracing_id)]


def _w_close_user_ack(m: CloseUserConnectionsWithAckMessage) -> list[Any]:
    return [32, m.user_id, m.reason, m.ack_id, m.excluded_connection_ids, _ext(m.tracing_id)]


def _w_close_group_ack(m: CloseGroupConnectionsWithAckMessage) -> list[Any]:
    return [33, m.group_name, m.reason, m.ack_id, m.excluded_connection_ids, _ext(m.tracing_id)]


def _w_client_invocation(m: ClientInvocationMessage) -> list[Any]:
    return [
        34,
        m.invocation_id,
        m.connection_id,
        m.caller_server_id,
        m.payloads,
        _ext(m.tracing_id),
    ]


def _w_client_completion(m: ClientCompletionMessage) -> list[Any]:
    return [
        35,
        m.invocation_id,
        m.connection_id,
        m.caller_server_id,
        m.protocol,
        m.payload,
        _ext(m.tracing_id, protocol=m.protocol),
    ]


def _w_error_completion(m: ErrorCompletionMessage) -> list[Any]:
    return [36, m.invocation_id, m.connection_id, m.caller_server_id, m.error, _ext(m.tracing_id)]


def _w_service_mapping(m: ServiceMappingMessage) -> list[Any]:
    return [37, m.invocation_id, m.connection_id, m.instance_id, _NO_EXT]


def _w_reconnect(m: ConnectionReconnectMessage) -> list[Any]:
    return [38, m.connection_id, _NO_EXT]


def _w_group_member_query(m: GroupMemberQueryMessage) -> list[Any]:
    return [40, _ext(m.tracing_id), m.group_name, m.ack_id, m.max_count, m.continuation_token]


_WRITERS: Final[dict[type[Any], Callable[[Any], list[Any]]]] = {
    ServiceHandshakeRequest: _w_handshake_request,
    ServiceHandshakeResponse: _w_handshake_response,
    ServicePing: _w_ping,
    CloseConnectionMessage: _w_close,
    ConnectionDataMessage: _w_data,
    MultiConnectionDataMessage: _w_multi_connection,
    UserDataMessage: _w_user,
    MultiUserDataMessage: _w_multi_user,
    BroadcastDataMessage: _w_broadcast,
    JoinGroupMessage: _w_join,
    LeaveGroupMessage: _w_leave,
    GroupBroadcastDataMessage: _w_group_broadcast,
    MultiGroupBroadcastDataMessage: _w_multi_group,
    ServiceErrorMessage: _w_service_error,
    UserJoinGroupMessage: _w_user_join,
    UserLeaveGroupMessage: _w_user_leave,
    JoinGroupWithAckMessage: _w_join_ack,
    LeaveGroupWithAckMessage: _w_leave_ack,
    ServiceAckMessage: _w_ack,
    CheckUserInGroupWithAckMessage: _w_check_user_in_group,
    ServiceEventMessage: _w_service_event,
    CheckGroupExistenceWithAckMessage: _w_check_group,
    CheckConnectionExistenceWithAckMessage: _w_check_connection,
    CheckUserExistenceWithAckMessage: _w_check_user,
    UserJoinGroupWithAckMessage: _w_user_join_ack,
    UserLeaveGroupWithAckMessage: _w_user_leave_ack,
    AccessKeyRequestMessage: _w_access_key_request,
    AccessKeyResponseMessage: _w_access_key_response,
    CloseConnectionWithAckMessage: _w_close_connection_ack,
    CloseConnectionsWithAckMessage: _w_close_connections_ack,
    CloseUserConnectionsWithAckMessage: _w_close_user_ack,
    CloseGroupConnectionsWithAckMessage: _w_close_group_ack,
    ClientInvocationMessage: _w_client_invocation,
    ClientCompletionMessage: _w_client_completion,
    ErrorCompletionMessage: _w_error_completion,
    ServiceMappingMessage: _w_service_mapping,
    ConnectionReconnectMessage: _w_reconnect,
    GroupMemberQueryMessage: _w_group_member_query,
}

_INT32_MIN: Final = -(2**31)
_INT32_MAX: Final = 2**31 - 1


def _fixed_int32(value: int, name: str) -> bytes:
    # MessagePack int32 (d2) whatever the value: the SDK's WriteInt32 (§1, type 39).
    if not isinstance(value, int) or isinstance(value, bool):
        raise LocalProtocolError(f"ConnectionFlowControl {name} must be an int, got {value!r}")
    if not _INT32_MIN <= value <= _INT32_MAX:
        raise LocalProtocolError(f"ConnectionFlowControl {name} {value} does not fit in int32")
    return b"\xd2" + int(value).to_bytes(4, "big", signed=True)


def _flow_control_body(m: ConnectionFlowControlMessage) -> bytes:
    return b"".join(
        (
            b"\x95\x27",  # fixarray of 5, type 39
            msgpack.packb(m.connection_id, use_bin_type=True),
            _fixed_int32(m.connection_type, "connection_type"),
            _fixed_int32(m.operation, "operation"),
            b"\x80",  # the extension map: this type carries no member
        )
    )


def _body(message: ServiceMessage) -> bytes:
    writer = _WRITERS.get(type(message))
    try:
        if writer is not None:
            body: bytes = msgpack.packb(writer(message), use_bin_type=True)
            return body
        if type(message) is ConnectionFlowControlMessage:
            return _flow_control_body(message)
        if type(message) is OpenConnectionMessage:
            return _open_body(message)
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(
            f"cannot encode {type(message).__name__} as MessagePack ({exc}); expected str, "
            "bytes, int (64-bit), bool, None, and lists and maps of them in its fields"
        ) from None
    raise LocalProtocolError(
        f"cannot write {type(message).__name__}: expected a service message "
        "(OpenConnectionMessage, ConnectionDataMessage, ServicePing, ...)"
    )


def write_message(message: ServiceMessage) -> bytes:
    """Encode one service message as a frame: varint length prefix + MessagePack body.

    The layout is the one the current SDK writes (§2), byte for byte. Raises
    ``LocalProtocolError`` for something that is not a service message, or holds values
    MessagePack cannot carry.

    >>> write_message(ConnectionDataMessage("c1", b"{}\\x1e")).hex()
    '0b9406a26331c4037b7d1e80'
    """
    body = _body(message)
    if len(body) > _MAX_FRAME:
        raise LocalProtocolError(
            f"{type(message).__name__} of {len(body)} bytes exceeds the service protocol's "
            f"limit of {_MAX_FRAME} bytes"
        )
    return encode_varint(len(body)) + body


def connection_data_prefix(connection_id: str) -> bytes:
    """The bytes every ``ConnectionData`` frame of one connection starts its body with (the
    array header, the type and the connection id), for ``write_connection_data``."""
    packed: bytes = msgpack.packb(connection_id)
    return b"\x94\x06" + packed


def write_connection_data(prefix: bytes, payload: bytes) -> bytes:
    """``write_message(ConnectionDataMessage(connection_id, payload))`` without building the
    message: ``prefix`` is ``connection_data_prefix(connection_id)``. The hot path of every
    client message that goes to an app server.

    >>> prefix = connection_data_prefix("c1")
    >>> write_connection_data(prefix, b"{}\x1e") == write_message(
    ...     ConnectionDataMessage("c1", b"{}\x1e"))
    True
    """
    size = len(payload)
    if size < 0x100:
        head = b"\xc4" + size.to_bytes(1, "big")
    elif size < 0x10000:
        head = b"\xc5" + size.to_bytes(2, "big")
    else:
        head = b"\xc6" + size.to_bytes(4, "big")
    length = len(prefix) + len(head) + size + 1
    if length > _MAX_FRAME:
        raise LocalProtocolError(
            f"ConnectionDataMessage of {length} bytes exceeds the service protocol's "
            f"limit of {_MAX_FRAME} bytes"
        )
    return b"".join((encode_varint(length), prefix, head, payload, b"\x80"))


def write_messages(messages: Iterable[ServiceMessage]) -> bytes:
    """Encode several messages into one buffer, in order (one WebSocket message may carry
    several frames)."""
    return b"".join([write_message(message) for message in messages])


# --------------------------------------------------------------------------------------------
# Reading
#
# Each reader gets the body's array (a tuple: arrays are unpacked as tuples) and the message's
# name for errors, and follows the SDK reader: the array length decides which optional trailing
# fields are read; fields the SDK reads unconditionally are required.

#: Names and layouts (§2), for errors. ``?`` marks what older SDKs leave out.
_LAYOUTS: Final[dict[int, tuple[str, str]]] = {
    1: (
        "HandshakeRequest",
        "[1, version, (connectionType, target)?, migrationLevel?, ext?, allowStatefulReconnects?]",
    ),
    2: ("HandshakeResponse", "[2, errorMessage, ext?, connectionId?]"),
    3: ("Ping", "[3, string, string, ...]"),
    4: ("OpenConnection", "[4, connectionId, claims, (headers, queryString)?, ext?]"),
    5: ("CloseConnection", "[5, connectionId, errorMessage, headers?, ext?]"),
    6: ("ConnectionData", "[6, connectionId, payload, ext?]"),
    7: ("MultiConnectionData", "[7, connectionIds, payloads, ext?]"),
    8: ("UserData", "[8, userId, payloads, ext?]"),
    9: ("MultiUserData", "[9, userIds, payloads, ext?]"),
    10: ("BroadcastData", "[10, excludedConnectionIds, payloads, ext?]"),
    11: ("JoinGroup", "[11, connectionId, group, ext?]"),
    12: ("LeaveGroup", "[12, connectionId, group, ext?]"),
    13: (
        "GroupBroadcastData",
        "[13, group, excludedConnectionIds, payloads, ext?, (excludedUserIds, callerUserId)?]",
    ),
    14: ("MultiGroupBroadcastData", "[14, groups, payloads, ext?]"),
    15: ("ServiceError", "[15, errorMessage]"),
    16: ("UserJoinGroup", "[16, userId, group, ext?]"),
    17: ("UserLeaveGroup", "[17, userId, group, ext?]"),
    18: ("JoinGroupWithAck", "[18, connectionId, group, ackId, ext?]"),
    19: ("LeaveGroupWithAck", "[19, connectionId, group, ackId, ext?]"),
    20: ("Ack", "[20, ackId, status, message, ext?, payload?]"),
    21: ("CheckUserInGroupWithAck", "[21, userId, group, ackId, ext?]"),
    22: ("ServiceEvent", "[22, objectType, id, kind, message, ext]"),
    23: ("CheckGroupExistenceWithAck", "[23, group, ackId, ext]"),
    24: ("CheckConnectionExistenceWithAck", "[24, connectionId, ackId, ext]"),
    25: ("CheckUserExistenceWithAck", "[25, userId, ackId, ext]"),
    26: ("UserJoinGroupWithAck", "[26, userId, group, ackId, ext]"),
    27: ("UserLeaveGroupWithAck", "[27, userId, group, ackId, ext]"),
    28: ("AccessKeyRequest", "[28, token, kid, ext]"),
    29: ("AccessKeyResponse", "[29, kid, accessKey, errorType, errorMessage, ext]"),
    30: ("CloseConnectionWithAck", "[30, connectionId, reason, ackId, ext?]"),
    31: ("CloseConnectionsWithAck", "[31, reason, ackId, excludedConnectionIds, ext?]"),
    32: ("CloseUserConnectionsWithAck", "[32, userId, reason, ackId, excluded, ext?]"),
    33: ("CloseGroupConnectionsWithAck", "[33, group, reason, ackId, excluded, ext?]"),
    34: ("ClientInvocation", "[34, invocationId, connectionId, callerServerId, payloads, ext]"),
    35: (
        "ClientCompletion",
        "[35, invocationId, connectionId, callerServerId, protocol, payload, ext]",
    ),
    36: ("ErrorCompletion", "[36, invocationId, connectionId, callerServerId, error, ext]"),
    37: ("ServiceMapping", "[37, invocationId, connectionId, instanceId, ext]"),
    38: ("ConnectionReconnect", "[38, connectionId, ext]"),
    39: ("ConnectionFlowControl", "[39, connectionId, connectionType, operation, ext?]"),
    40: ("GroupMemberQuery", "[40, ext, group, ackId, max, continuationToken]"),
}

def _show(value: Any) -> str:
    """Describe a received value for an error message, briefly."""
    if value is None:
        return "nil"
    return show_value(value)


def _kind(array: tuple[Any, ...]) -> str:
    name = _LAYOUTS[array[0]][0]
    return f"{name} message (type {array[0]})"


def _bad(array: tuple[Any, ...], index: int, name: str, expected: str, value: Any) -> Exception:
    return RemoteProtocolError(
        f"{_kind(array)}: element {index} ({name}) must be {expected}, got {_show(value)}"
    )


def _need(array: tuple[Any, ...], count: int) -> None:
    if len(array) < count:
        layout = _LAYOUTS[array[0]][1]
        raise RemoteProtocolError(
            f"{_kind(array)} has {len(array)} elements; expected at least {count}: {layout}"
        )


def _str(array: tuple[Any, ...], index: int, name: str) -> str:
    value = array[index]
    if type(value) is not str:
        raise _bad(array, index, name, "a string", value)
    return value


def _opt_str(array: tuple[Any, ...], index: int, name: str) -> str | None:
    value = array[index]
    if value is not None and type(value) is not str:
        raise _bad(array, index, name, "a string or nil", value)
    return value


def _int32(array: tuple[Any, ...], index: int, name: str) -> int:
    value = array[index]
    if type(value) is not int or not _INT32_MIN <= value <= _INT32_MAX:
        raise _bad(array, index, name, "an int32", value)
    return value


def _bin(array: tuple[Any, ...], index: int, name: str) -> bytes:
    value = array[index]
    if type(value) is bytes:
        return value
    if value is None:
        return b""
    raise _bad(array, index, name, "binary (bin)", value)


def _strs(array: tuple[Any, ...], index: int, name: str) -> tuple[str, ...]:
    value = array[index]
    if value is None:
        return ()
    if type(value) is not tuple or any(type(item) is not str for item in value):
        raise _bad(array, index, name, "an array of strings", value)
    return value


def _payloads(array: tuple[Any, ...], index: int) -> dict[str, bytes]:
    value = array[index]
    if value is None:
        return {}
    if type(value) is not dict:
        raise _bad(array, index, "payloads", "a map of protocol names to bin", value)
    for key, payload in value.items():
        if type(key) is not str or type(payload) is not bytes:
            if type(key) is str and payload is None:
                value[key] = b""  # the SDK reads a nil bin as empty
                continue
            raise _bad(
                array, index, "payloads", "a map of protocol names to bin", f"{key!r}: {payload!r}"
            )
    return value


class _RepeatedClaim(tuple):  # type: ignore[type-arg]
    """The values of a claim type that came more than once (made by ``_unpack_open`` only, so
    that an array where a claim's string belongs is still refused)."""

    __slots__ = ()


def _claims(array: tuple[Any, ...], index: int) -> dict[str, str | tuple[str, ...]]:
    value = array[index]
    if value is None:
        return {}
    if type(value) is not dict or any(
        type(k) is not str or (type(v) is not str and type(v) is not _RepeatedClaim)
        for k, v in value.items()
    ):
        raise _bad(array, index, "claims", "a map of strings to strings", value)
    if any(type(v) is _RepeatedClaim for v in value.values()):
        return {k: tuple(v) if type(v) is _RepeatedClaim else v for k, v in value.items()}
    return value


def _headers(array: tuple[Any, ...], index: int) -> dict[str, Sequence[str]]:
    value = array[index]
    if value is None:
        return {}
    if type(value) is not dict or any(
        type(k) is not str or type(v) is not tuple or any(type(s) is not str for s in v)
        for k, v in value.items()
    ):
        raise _bad(array, index, "headers", "a map of strings to arrays of strings", value)
    return value


def _read_ext(array: tuple[Any, ...], index: int) -> dict[int, Any]:
    """The extension map at ``index``, its known members checked; unknown keys skipped."""
    ext = array[index]
    if not ext:  # {} (or nil, which a lenient reader takes as empty)
        return _NO_EXT
    if type(ext) is not dict:
        raise _bad(array, index, "ext", "a map with integer keys", ext)
    for key, value in ext.items():
        if type(key) is not int:
            raise _bad(array, index, "ext", "a map with integer keys", ext)
        if key == _EXT_TRACING_ID:
            ok = type(value) is int and 0 <= value < 2**64
            expected = "a uint64 tracing id (key 1)"
        elif key == _EXT_TTL or key == _EXT_DATA_MESSAGE_TYPE:
            ok = type(value) is int and _INT32_MIN <= value <= _INT32_MAX
            expected = "an int32 ttl (key 2)" if key == _EXT_TTL else "an int32 (key 5)"
        elif key == _EXT_PROTOCOL or key == _EXT_FILTER:
            ok = value is None or type(value) is str
            expected = f"a string or nil (key {key})"
        elif key == _EXT_IS_PARTIAL:
            ok = type(value) is bool
            expected = "a boolean (key 6)"
        else:
            continue  # unknown member, skipped (later SDKs do the same)
        if not ok:
            raise _bad(array, index, "ext", expected, value)
    return ext


def _r_handshake_request(a: tuple[Any, ...]) -> ServiceHandshakeRequest:
    _need(a, 2)
    n = len(a)
    version = _int32(a, 1, "version")
    connection_type = 0
    target: str | None = ""
    if n >= 4:
        connection_type = _int32(a, 2, "connectionType")
        target = _opt_str(a, 3, "target")
    migration_level = _int32(a, 4, "migrationLevel") if n >= 5 else 0
    if n >= 6:
        _read_ext(a, 5)
    allow: bool | None = None
    if n >= 7:
        allow = a[6]
        if type(allow) is not bool:
            raise _bad(a, 6, "allowStatefulReconnects", "a boolean", allow)
    return ServiceHandshakeRequest(version, connection_type, target or "", migration_level, allow)


def _r_handshake_response(a: tuple[Any, ...]) -> ServiceHandshakeResponse:
    _need(a, 2)
    error_message = _opt_str(a, 1, "errorMessage")
    if len(a) >= 3:
        _read_ext(a, 2)
    connection_id = _opt_str(a, 3, "connectionId") if len(a) >= 4 else None
    return ServiceHandshakeResponse(error_message, connection_id)


_KEEP_ALIVE: Final = ServicePing()


def _r_ping(a: tuple[Any, ...]) -> ServicePing:
    if len(a) == 1:
        return _KEEP_ALIVE
    values = a[1:]
    for i, value in enumerate(values, 1):
        if type(value) is not str:
            if value is None:
                values = tuple(v or "" for v in values)  # nil elements read as ""
                continue
            raise _bad(a, i, "ping value", "a string", value)
    return ServicePing(values)


def _r_open(a: tuple[Any, ...]) -> OpenConnectionMessage:
    _need(a, 3)
    connection_id = _str(a, 1, "connectionId")
    claims = _claims(a, 2)
    if len(a) < 5:
        return OpenConnectionMessage(connection_id, claims)
    headers = _headers(a, 3)
    query_string = _opt_str(a, 4, "queryString")
    ext = _read_ext(a, 5) if len(a) >= 6 else _NO_EXT
    return OpenConnectionMessage(
        connection_id,
        claims,
        headers,
        query_string,
        ext.get(_EXT_PROTOCOL),
        ext.get(_EXT_TRACING_ID),
    )


def _r_close(a: tuple[Any, ...]) -> CloseConnectionMessage:
    _need(a, 3)
    connection_id = _str(a, 1, "connectionId")
    error_message = _opt_str(a, 2, "errorMessage")
    headers = _headers(a, 3) if len(a) >= 4 else {}
    ext = _read_ext(a, 4) if len(a) >= 5 else _NO_EXT
    return CloseConnectionMessage(connection_id, error_message, headers, ext.get(_EXT_TRACING_ID))


def _r_data(a: tuple[Any, ...]) -> ConnectionDataMessage:
    _need(a, 3)
    connection_id = _str(a, 1, "connectionId")
    payload = _bin(a, 2, "payload")
    if len(a) < 4:
        return ConnectionDataMessage(connection_id, payload)
    ext = _read_ext(a, 3)
    if ext is _NO_EXT:
        return ConnectionDataMessage(connection_id, payload)
    return ConnectionDataMessage(
        connection_id,
        payload,
        ext.get(_EXT_TRACING_ID),
        ext.get(_EXT_DATA_MESSAGE_TYPE, 0),
        ext.get(_EXT_IS_PARTIAL, False),
    )


def _r_ext_at(a: tuple[Any, ...], index: int) -> dict[int, Any]:
    return _read_ext(a, index) if len(a) > index else _NO_EXT


def _r_multi_connection(a: tuple[Any, ...]) -> MultiConnectionDataMessage:
    _need(a, 3)
    ids = _strs(a, 1, "connectionIds")
    payloads = _payloads(a, 2)
    ext = _r_ext_at(a, 3)
    return MultiConnectionDataMessage(ids, payloads, ext.get(_EXT_TRACING_ID), ext.get(_EXT_FILTER))


def _r_user(a: tuple[Any, ...]) -> UserDataMessage:
    _need(a, 3)
    user_id = _str(a, 1, "userId")
    payloads = _payloads(a, 2)
    ext = _r_ext_at(a, 3)
    return UserDataMessage(user_id, payloads, ext.get(_EXT_TRACING_ID), ext.get(_EXT_FILTER))


def _r_multi_user(a: tuple[Any, ...]) -> MultiUserDataMessage:
    _need(a, 3)
    ids = _strs(a, 1, "userIds")
    payloads = _payloads(a, 2)
    ext = _r_ext_at(a, 3)
    return MultiUserDataMessage(ids, payloads, ext.get(_EXT_TRACING_ID), ext.get(_EXT_FILTER))


def _r_broadcast(a: tuple[Any, ...]) -> BroadcastDataMessage:
    _need(a, 3)
    excluded = _strs(a, 1, "excludedConnectionIds")
    payloads = _payloads(a, 2)
    ext = _r_ext_at(a, 3)
    return BroadcastDataMessage(payloads, excluded, ext.get(_EXT_TRACING_ID), ext.get(_EXT_FILTER))


def _r_join(a: tuple[Any, ...]) -> JoinGroupMessage:
    _need(a, 3)
    connection_id = _str(a, 1, "connectionId")
    group = _str(a, 2, "group")
    return JoinGroupMessage(connection_id, group, _r_ext_at(a, 3).get(_EXT_TRACING_ID))


def _r_leave(a: tuple[Any, ...]) -> LeaveGroupMessage:
    _need(a, 3)
    connection_id = _str(a, 1, "connectionId")
    group = _opt_str(a, 2, "group")
    return LeaveGroupMessage(connection_id, group, _r_ext_at(a, 3).get(_EXT_TRACING_ID))


def _r_group_broadcast(a: tuple[Any, ...]) -> GroupBroadcastDataMessage:
    _need(a, 4)
    group = _str(a, 1, "group")
    excluded = _strs(a, 2, "excludedConnectionIds")
    payloads = _payloads(a, 3)
    ext = _r_ext_at(a, 4)
    excluded_users: tuple[str, ...] = ()
    caller: str | None = None
    if len(a) >= 7:
        excluded_users = _strs(a, 5, "excludedUserIds")
        caller = _opt_str(a, 6, "callerUserId")
    return GroupBroadcastDataMessage(
        group,
        payloads,
        excluded,
        excluded_users,
        caller,
        ext.get(_EXT_TRACING_ID),
        ext.get(_EXT_FILTER),
    )


def _r_multi_group(a: tuple[Any, ...]) -> MultiGroupBroadcastDataMessage:
    _need(a, 3)
    groups = _strs(a, 1, "groups")
    payloads = _payloads(a, 2)
    ext = _r_ext_at(a, 3)
    return MultiGroupBroadcastDataMessage(
        groups, payloads, ext.get(_EXT_TRACING_ID), ext.get(_EXT_FILTER)
    )


def _r_service_error(a: tuple[Any, ...]) -> ServiceErrorMessage:
    _need(a, 2)
    return ServiceErrorMessage(_opt_str(a, 1, "errorMessage"))


def _r_user_join(a: tuple[Any, ...]) -> UserJoinGroupMessage:
    _need(a, 3)
    user_id = _str(a, 1, "userId")
    group = _str(a, 2, "group")
    ext = _r_ext_at(a, 3)
    return UserJoinGroupMessage(user_id, group, ext.get(_EXT_TTL), ext.get(_EXT_TRACING_ID))


def _r_user_leave(a: tuple[Any, ...]) -> UserLeaveGroupMessage:
    _need(a, 3)
    user_id = _str(a, 1, "userId")
    group = _opt_str(a, 2, "group")
    return UserLeaveGroupMessage(user_id, group, _r_ext_at(a, 3).get(_EXT_TRACING_ID))


def _r_join_ack(a: tuple[Any, ...]) -> JoinGroupWithAckMessage:
    _need(a, 4)
    connection_id = _str(a, 1, "connectionId")
    group = _str(a, 2, "group")
    ack_id = _int32(a, 3, "ackId")
    return JoinGroupWithAckMessage(
        connection_id, group, ack_id, _r_ext_at(a, 4).get(_EXT_TRACING_ID)
    )


def _r_leave_ack(a: tuple[Any, ...]) -> LeaveGroupWithAckMessage:
    _need(a, 4)
    connection_id = _str(a, 1, "connectionId")
    group = _opt_str(a, 2, "group")
    ack_id = _int32(a, 3, "ackId")
    return LeaveGroupWithAckMessage(
        connection_id, group, ack_id, _r_ext_at(a, 4).get(_EXT_TRACING_ID)
    )


def _r_ack(a: tuple[Any, ...]) -> ServiceAckMessage:
    _need(a, 4)
    ack_id = _int32(a, 1, "ackId")
    status = _int32(a, 2, "status")
    message = _opt_str(a, 3, "message")
    _r_ext_at(a, 4)
    payload: bytes | None = None
    if len(a) >= 6:
        payload = a[5]
        if payload is not None and type(payload) is not bytes:
            raise _bad(a, 5, "payload", "binary (bin) or nil", payload)
    return ServiceAckMessage(ack_id, status, message, payload)


def _r_check_user_in_group(a: tuple[Any, ...]) -> CheckUserInGroupWithAckMessage:
    _need(a, 4)
    user_id = _str(a, 1, "userId")
    group = _str(a, 2, "group")
    ack_id = _int32(a, 3, "ackId")
    return CheckUserInGroupWithAckMessage(
        user_id, group, ack_id, _r_ext_at(a, 4).get(_EXT_TRACING_ID)
    )


def _r_service_event(a: tuple[Any, ...]) -> ServiceEventMessage:
    _need(a, 6)
    object_type = _int32(a, 1, "objectType")
    object_id = _opt_str(a, 2, "id")
    kind = _int32(a, 3, "kind")
    message = _opt_str(a, 4, "message")
    _read_ext(a, 5)
    return ServiceEventMessage(object_type, object_id, kind, message)


def _r_check_group(a: tuple[Any, ...]) -> CheckGroupExistenceWithAckMessage:
    _need(a, 4)
    group = _str(a, 1, "group")
    ack_id = _int32(a, 2, "ackId")
    return CheckGroupExistenceWithAckMessage(group, ack_id, _read_ext(a, 3).get(_EXT_TRACING_ID))


def _r_check_connection(a: tuple[Any, ...]) -> CheckConnectionExistenceWithAckMessage:
    _need(a, 4)
    connection_id = _str(a, 1, "connectionId")
    ack_id = _int32(a, 2, "ackId")
    return CheckConnectionExistenceWithAckMessage(
        connection_id, ack_id, _read_ext(a, 3).get(_EXT_TRACING_ID)
    )


def _r_check_user(a: tuple[Any, ...]) -> CheckUserExistenceWithAckMessage:
    _need(a, 4)
    user_id = _str(a, 1, "userId")
    ack_id = _int32(a, 2, "ackId")
    return CheckUserExistenceWithAckMessage(user_id, ack_id, _read_ext(a, 3).get(_EXT_TRACING_ID))


def _r_user_join_ack(a: tuple[Any, ...]) -> UserJoinGroupWithAckMessage:
    _need(a, 5)
    user_id = _str(a, 1, "userId")
    group = _str(a, 2, "group")
    ack_id = _int32(a, 3, "ackId")
    ext = _read_ext(a, 4)
    return UserJoinGroupWithAckMessage(
        user_id, group, ack_id, ext.get(_EXT_TTL), ext.get(_EXT_TRACING_ID)
    )


def _r_user_leave_ack(a: tuple[Any, ...]) -> UserLeaveGroupWithAckMessage:
    _need(a, 5)
    user_id = _str(a, 1, "userId")
    group = _opt_str(a, 2, "group")
    ack_id = _int32(a, 3, "ackId")
    return UserLeaveGroupWithAckMessage(
        user_id, group, ack_id, _read_ext(a, 4).get(_EXT_TRACING_ID)
    )


def _r_access_key_request(a: tuple[Any, ...]) -> AccessKeyRequestMessage:
    _need(a, 4)
    token = _opt_str(a, 1, "token")
    kid = _opt_str(a, 2, "kid")
    _read_ext(a, 3)
    return AccessKeyRequestMessage(token, kid)


def _r_access_key_response(a: tuple[Any, ...]) -> AccessKeyResponseMessage:
    _need(a, 6)
    kid = _opt_str(a, 1, "kid")
    access_key = _opt_str(a, 2, "accessKey")
    error_type = _opt_str(a, 3, "errorType")
    error_message = _opt_str(a, 4, "errorMessage")
    _read_ext(a, 5)
    return AccessKeyResponseMessage(kid, access_key, error_type, error_message)


def _r_close_connection_ack(a: tuple[Any, ...]) -> CloseConnectionWithAckMessage:
    _need(a, 4)
    connection_id = _str(a, 1, "connectionId")
    reason = _opt_str(a, 2, "reason")
    ack_id = _int32(a, 3, "ackId")
    return CloseConnectionWithAckMessage(
        connection_id, ack_id, reason, _r_ext_at(a, 4).get(_EXT_TRACING_ID)
    )


def _r_close_connections_ack(a: tuple[Any, ...]) -> CloseConnectionsWithAckMessage:
    _need(a, 4)
    reason = _opt_str(a, 1, "reason")
    ack_id = _int32(a, 2, "ackId")
    excluded = _strs(a, 3, "excludedConnectionIds")
    return CloseConnectionsWithAckMessage(
        ack_id, reason, excluded, _r_ext_at(a, 4).get(_EXT_TRACING_ID)
    )


def _r_close_user_ack(a: tuple[Any, ...]) -> CloseUserConnectionsWithAckMessage:
    _need(a, 5)
    user_id = _str(a, 1, "userId")
    reason = _opt_str(a, 2, "reason")
    ack_id = _int32(a, 3, "ackId")
    excluded = _strs(a, 4, "excludedConnectionIds")
    return CloseUserConnectionsWithAckMessage(
        user_id, ack_id, reason, excluded, _r_ext_at(a, 5).get(_EXT_TRACING_ID)
    )


def _r_close_group_ack(a: tuple[Any, ...]) -> CloseGroupConnectionsWithAckMessage:
    _need(a, 5)
    group = _str(a, 1, "group")
    reason = _opt_str(a, 2, "reason")
    ack_id = _int32(a, 3, "ackId")
    excluded = _strs(a, 4, "excludedConnectionIds")
    return CloseGroupConnectionsWithAckMessage(
        group, ack_id, reason, excluded, _r_ext_at(a, 5).get(_EXT_TRACING_ID)
    )


def _r_client_invocation(a: tuple[Any, ...]) -> ClientInvocationMessage:
    _need(a, 6)
    invocation_id = _str(a, 1, "invocationId")
    connection_id = _str(a, 2, "connectionId")
    caller = _str(a, 3, "callerServerId")
    payloads = _payloads(a, 4)
    ext = _read_ext(a, 5)
    return ClientInvocationMessage(
        invocation_id, connection_id, caller, payloads, ext.get(_EXT_TRACING_ID)
    )


def _r_client_completion(a: tuple[Any, ...]) -> ClientCompletionMessage:
    _need(a, 7)
    invocation_id = _str(a, 1, "invocationId")
    connection_id = _str(a, 2, "connectionId")
    caller = _str(a, 3, "callerServerId")
    protocol = _opt_str(a, 4, "protocol")
    payload = _bin(a, 5, "payload")
    ext = _read_ext(a, 6)
    # One property in the SDK: the extension's copy, read last, wins.
    protocol = ext.get(_EXT_PROTOCOL, protocol)
    return ClientCompletionMessage(
        invocation_id, connection_id, caller, protocol, payload, ext.get(_EXT_TRACING_ID)
    )


def _r_error_completion(a: tuple[Any, ...]) -> ErrorCompletionMessage:
    _need(a, 6)
    invocation_id = _str(a, 1, "invocationId")
    connection_id = _str(a, 2, "connectionId")
    caller = _str(a, 3, "callerServerId")
    error = _opt_str(a, 4, "error")
    ext = _read_ext(a, 5)
    return ErrorCompletionMessage(
        invocation_id, connection_id, caller, error, ext.get(_EXT_TRACING_ID)
    )


def _r_service_mapping(a: tuple[Any, ...]) -> ServiceMappingMessage:
    _need(a, 5)
    invocation_id = _str(a, 1, "invocationId")
    connection_id = _str(a, 2, "connectionId")
    instance_id = _str(a, 3, "instanceId")
    _read_ext(a, 4)
    return ServiceMappingMessage(invocation_id, connection_id, instance_id)


def _r_reconnect(a: tuple[Any, ...]) -> ConnectionReconnectMessage:
    _need(a, 3)
    connection_id = _str(a, 1, "connectionId")
    _read_ext(a, 2)
    return ConnectionReconnectMessage(connection_id)


def _r_flow_control(a: tuple[Any, ...]) -> ConnectionFlowControlMessage:
    _need(a, 4)
    connection_id = _str(a, 1, "connectionId")
    connection_type = _int32(a, 2, "connectionType")
    operation = _int32(a, 3, "operation")
    # The SDK refuses values outside its enums, and does not read the extension map.
    if connection_type not in FlowControlConnectionType._value2member_map_:
        raise _bad(a, 2, "connectionType", "1 (client) or 2 (server)", connection_type)
    if operation not in ConnectionFlowControlOperation._value2member_map_:
        raise _bad(a, 3, "operation", "1 to 4 (Pause, PauseAck, Resume, Offline)", operation)
    return ConnectionFlowControlMessage(
        connection_id,
        ConnectionFlowControlOperation(operation),
        FlowControlConnectionType(connection_type),
    )


def _r_group_member_query(a: tuple[Any, ...]) -> GroupMemberQueryMessage:
    _need(a, 6)
    ext = _read_ext(a, 1)
    group = _str(a, 2, "group")
    ack_id = _int32(a, 3, "ackId")
    max_count = _int32(a, 4, "max")
    token = _opt_str(a, 5, "continuationToken")
    return GroupMemberQueryMessage(group, ack_id, max_count, token, ext.get(_EXT_TRACING_ID))


_READERS: Final[dict[int, Callable[[tuple[Any, ...]], ServiceMessage]]] = {
    1: _r_handshake_request,
    2: _r_handshake_response,
    3: _r_ping,
    4: _r_open,
    5: _r_close,
    6: _r_data,
    7: _r_multi_connection,
    8: _r_user,
    9: _r_multi_user,
    10: _r_broadcast,
    11: _r_join,
    12: _r_leave,
    13: _r_group_broadcast,
    14: _r_multi_group,
    15: _r_service_error,
    16: _r_user_join,
    17: _r_user_leave,
    18: _r_join_ack,
    19: _r_leave_ack,
    20: _r_ack,
    21: _r_check_user_in_group,
    22: _r_service_event,
    23: _r_check_group,
    24: _r_check_connection,
    25: _r_check_user,
    26: _r_user_join_ack,
    27: _r_user_leave_ack,
    28: _r_access_key_request,
    29: _r_access_key_response,
    30: _r_close_connection_ack,
    31: _r_close_connections_ack,
    32: _r_close_user_ack,
    33: _r_close_group_ack,
    34: _r_client_invocation,
    35: _r_client_completion,
    36: _r_error_completion,
    37: _r_service_mapping,
    38: _r_reconnect,
    39: _r_flow_control,
    40: _r_group_member_query,
}


def _unpack(body: bytes | bytearray | memoryview) -> Any:
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=False, use_list=False)
    except msgpack.ExtraData as exc:
        # The SDK reads one array from the frame and never looks at what follows it.
        return exc.unpacked
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
        raise RemoteProtocolError(
            f"service message{_type_hint(body)} of {len(body)} bytes is not valid MessagePack "
            f"({unpack_error_text(exc)}); expected one array"
        ) from None


def _unpack_open(body: bytes | bytearray | memoryview) -> Any:
    """An OpenConnection body whose claims map is read pair by pair, so that a repeated claim
    type keeps every value (a tuple, in order) as the SDK's array of claims does; anything
    unexpected goes to ``_unpack`` and the readers, which say what is wrong."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, use_list=False)
    unpacker.feed(body)
    try:
        length = unpacker.read_array_header()
        if length >= 3:
            head = (unpacker.unpack(), unpacker.unpack())
            claims: dict[str, Any] = {}
            for _ in range(unpacker.read_map_header()):
                name, value = unpacker.unpack(), unpacker.unpack()
                if type(name) is not str or type(value) is not str:
                    break
                earlier = claims.get(name)
                if earlier is None:
                    claims[name] = value
                elif type(earlier) is _RepeatedClaim:
                    claims[name] = _RepeatedClaim((*earlier, value))
                else:
                    claims[name] = _RepeatedClaim((earlier, value))
            else:
                return (*head, claims, *(unpacker.unpack() for _ in range(length - 3)))
    except Exception:  # truncated, or not this layout: the plain reader reports it
        pass
    return _unpack(body)


def _type_hint(body: bytes | bytearray | memoryview) -> str:
    # Say which message failed to unpack (e.g. a string that is not UTF-8): the array header
    # and the type are its first bytes.
    try:
        unpacker = msgpack.Unpacker(raw=True, strict_map_key=False)
        unpacker.feed(body)
        unpacker.read_array_header()
        message_type = unpacker.unpack()
    except Exception:  # the body is too broken to tell
        return ""
    if type(message_type) is not int:
        return ""
    name = _LAYOUTS.get(message_type, ("unknown",))[0]
    return f" ({name}, type {message_type})"


def parse_message_body(body: bytes | bytearray | memoryview) -> ServiceMessage | None:
    """Decode one service message body (no length prefix).

    Returns ``None`` for a message type this protocol does not know (41-43 included, whose
    layouts are unconfirmed): the SDK skips them too. Raises ``RemoteProtocolError`` naming
    the message type and the field when the body is not a valid message.

    >>> parse_message_body(bytes.fromhex("9103"))
    ServicePing(values=())
    """
    # OpenConnection (a fixarray, then type 4) keeps repeated claim types.
    is_open = len(body) > 1 and 0x93 <= body[0] <= 0x9F and body[1] == 4
    array = _unpack_open(body) if is_open else _unpack(body)
    if type(array) is not tuple or not array:
        raise RemoteProtocolError(
            f"service message body is {_show(array)}; expected a non-empty array whose first "
            "element is the message type"
        )
    message_type = array[0]
    if type(message_type) is not int:
        raise RemoteProtocolError(
            f"service message: element 0 (type) must be an integer, got {_show(message_type)}"
        )
    reader = _READERS.get(message_type)
    if reader is None:
        return None
    return reader(array)


# --------------------------------------------------------------------------------------------
# Stream parser


def _too_big(size: int, limit: int) -> RemoteProtocolError:
    return RemoteProtocolError(
        f"service message of {size} bytes exceeds the maximum message size of {limit} bytes"
    )


#: The first byte of a 3- or 4-element array: how a ConnectionData body (then 0x06) or a
#: UserData body (then 0x08) starts.
_DATA_HEADS: Final = (b"\x93", b"\x94")
#: The payload map keys a raw UserData may carry (the SDK's lower-case protocol names).
_RAW_PROTOCOLS: Final = frozenset(("json", "messagepack"))

#: What a parser made with ``raw_connection_data`` or ``raw_user_data`` hands out besides
#: messages: ``(connection_id, payload)`` for ConnectionData, ``(8, user_id, payloads)`` for
#: UserData.
RawItem = tuple[str, bytes] | tuple[int, str, dict[str, bytes]]


def _plain(array: tuple[Any, ...]) -> bool:
    """Whether a data message's array has no ``ext`` hints (3 elements, or an empty map)."""
    return len(array) == 3 or (len(array) == 4 and array[3] == {})


def _plain_payloads(value: Any) -> bool:
    """Whether a payload map is what the SDK sends: lower-case protocol names to bin."""
    if type(value) is not dict or not value:
        return False
    for key, payload in value.items():
        if key not in _RAW_PROTOCOLS or type(payload) is not bytes:
            return False
    return True


class ServiceProtocolParser:
    """Turns the bytes of a server connection into service messages.

    The socket is a byte stream (§1): feed whatever arrived with ``receive_data``, in any
    pieces, then take the complete messages with ``messages_received``. Messages of unknown type
    are dropped. A bad length prefix, a body over ``max_message_size`` (refused as soon as its
    prefix arrives, before the body is buffered) or a malformed body raises
    ``RemoteProtocolError``; the messages before the bad frame are still handed out, and every
    later call raises the same error again.

    >>> parser = ServiceProtocolParser()
    >>> frame = write_message(ServicePing())
    >>> parser.receive_data(frame + frame[:1])
    >>> parser.messages_received()
    [ServicePing(values=())]
    >>> parser.receive_data(frame[1:])
    >>> parser.messages_received()
    [ServicePing(values=())]
    """

    __slots__ = ("_buffer", "_error", "_max_message_size", "_messages", "_raw_data",
                 "_raw_user")

    def __init__(
        self,
        max_message_size: int = DEFAULT_MAX_SERVICE_MESSAGE_SIZE,
        *,
        raw_connection_data: bool = False,
        raw_user_data: bool = False,
    ) -> None:
        """``raw_connection_data``: hand out each plain ``ConnectionData`` (no ``ext`` hints)
        as a ``(connection_id, payload)`` tuple instead of a ``ConnectionDataMessage``, in
        its place among the other messages: the relay's hot path, where most messages are
        client data and building a frozen message object for each one is measurable.
        ``raw_user_data``: likewise each plain ``UserData`` whose payload map holds only
        ``json`` and ``messagepack`` bins, as ``(ServiceMessageType.USER_DATA, user_id,
        payloads)`` (what an app server's ``Clients.User(id)`` sends). Anything else, or
        anything malformed, goes through the full reader and its errors."""
        if not 0 < max_message_size <= _MAX_FRAME:
            raise ValueError(f"max_message_size must be 1..2**31-1, got {max_message_size}")
        self._raw_data = raw_connection_data
        self._raw_user = raw_user_data
        self._max_message_size = max_message_size
        self._buffer = bytearray()
        self._messages: list[ServiceMessage | RawItem] = []
        self._error: RemoteProtocolError | None = None

    @property
    def max_message_size(self) -> int:
        """The largest body accepted, in bytes."""
        return self._max_message_size

    @property
    def buffered(self) -> int:
        """How many bytes of an incomplete frame are waiting for the rest."""
        return len(self._buffer)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes received on the server connection."""
        if self._error is not None:
            raise self._error
        if not data:
            return
        if self._buffer:
            self._buffer += data
            stream: bytes | bytearray | memoryview = self._buffer
        else:
            stream = data  # the common case: whole frames, parsed without a copy into the buffer
        try:
            bodies, consumed = split_varint_frames(stream, self._max_message_size)
        except ValueError:
            bodies, consumed, self._error = self._split_until_error(stream)
        try:
            raw_data, raw_user = self._raw_data, self._raw_user
            for body in bodies:
                if (raw_data or raw_user) and body[:1] in _DATA_HEADS:
                    kind = body[1:2]
                    if raw_data and kind == b"\x06":
                        array = _unpack(body)
                        if _plain(array) and type(array[1]) is str and type(array[2]) is bytes:
                            self._messages.append((array[1], array[2]))
                            continue
                    elif raw_user and kind == b"\x08":
                        array = _unpack(body)
                        if _plain(array) and type(array[1]) is str and _plain_payloads(array[2]):
                            self._messages.append(
                                (ServiceMessageType.USER_DATA, array[1], array[2])
                            )
                            continue
                message = parse_message_body(body)
                if message is not None:
                    self._messages.append(message)
        except RemoteProtocolError as exc:
            self._error = exc
        if self._error is not None:
            self._buffer = bytearray()
            raise self._error
        if stream is self._buffer:
            del self._buffer[:consumed]
        elif consumed < len(data):
            self._buffer = bytearray(data[consumed:])

    def _split_until_error(
        self, stream: bytes | bytearray | memoryview
    ) -> tuple[list[bytes], int, RemoteProtocolError]:
        # Rare: walk the prefixes again, keep the frames before the bad one, and say precisely
        # what was wrong.
        bodies: list[bytes] = []
        pos = 0
        limit = self._max_message_size
        while True:
            try:
                got = decode_varint(stream, pos)
            except ValueError as exc:
                error = RemoteProtocolError(
                    f"bad service message length prefix at byte {pos} of the buffered stream: "
                    f"{exc}; expected a varint of at most 5 bytes announcing at most 2**31-1 "
                    "bytes"
                )
                return bodies, pos, error
            if got is None:  # pragma: no cover - split_varint_frames would not have failed
                return bodies, pos, RemoteProtocolError("bad service message length prefix")
            size, n = got
            if size > limit:
                return bodies, pos, _too_big(size, limit)
            if len(stream) - pos - n < size:  # pragma: no cover - as above
                return bodies, pos, RemoteProtocolError("bad service message length prefix")
            bodies.append(bytes(stream[pos + n : pos + n + size]))
            pos += n + size

    def receive_eof(self) -> None:
        """The connection ended; raises ``RemoteProtocolError`` if it ended inside a frame."""
        if self._buffer:
            size = len(self._buffer)
            self._buffer = bytearray()
            raise RemoteProtocolError(
                f"server connection ended inside a service message ({size} bytes of an "
                "incomplete frame)"
            )

    def messages_received(self) -> list[ServiceMessage]:
        """The messages completed since the last call, in order; the list is handed over.
        A parser made with ``raw_connection_data`` or ``raw_user_data`` hands out with
        ``items_received``."""
        if self._raw_data or self._raw_user:
            raise TypeError("this parser hands out raw data messages: call items_received()")
        messages = self._messages
        self._messages = []
        return messages  # type: ignore[return-value]  # no tuples without raw_connection_data

    def items_received(self) -> list[ServiceMessage | RawItem]:
        """As ``messages_received``, with plain ``ConnectionData`` as ``(connection_id,
        payload)`` tuples when the parser was made with ``raw_connection_data``, and plain
        ``UserData`` as ``(ServiceMessageType.USER_DATA, user_id, payloads)`` with
        ``raw_user_data``."""
        messages = self._messages
        self._messages = []
        return messages
