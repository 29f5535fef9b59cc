"""In-memory stand-ins for the relay's tests: what a client session, a transport, an app-server
link, an upstream and a backplane look like to the floor under test, each recording what was
done to it. No socket and no clock: a time is a number the test passes (``Clock``).

Frames are what the relay queues for the wire (``_message.WIRE_FORMATS``: server WebSocket
frames, never masked); ``frames`` splits a send buffer into ``(opcode, payload)`` pairs and
``records`` reads a payload as the client's hub protocol would.
"""

from __future__ import annotations

import json
from typing import Any

from relaycore._accel import apply_mask, encode_frame_header, parse_frame_header
from relaycore.protocol._hub import get_protocol
from relaycore.protocol._websocket import Opcode
from relaycore.relay import RelayConfig
from relaycore.relay._backplane import Holding, LocalBackplane
from relaycore.relay._operations import Operations
from relaycore.relay._peer import _IN, ConnState, Flusher
from relaycore.relay._session import ClientSession
from relaycore.relay._stats import RelayStats

HUB = "chat"
RS = b"\x1e"


class Clock:
    """The time the operations read: whatever the test says it is."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_ops(config: RelayConfig | None = None, *, backplane: Any = None,
             clock: Clock | None = None) -> Operations:
    """Operations over a real table and flusher (neither needs a running trio)."""
    ops = Operations(config or RelayConfig(), RelayStats(), Flusher(),
                     backplane or LocalBackplane(), clock or Clock())
    ops.instance_id = "node-under-test"
    return ops


# -- frames -------------------------------------------------------------------------------------


def frames(data: bytes | bytearray) -> list[tuple[int, bytes]]:
    """The whole server frames in ``data`` as ``(opcode, payload)``; fails on a partial one."""
    out = []
    pos = 0
    while pos < len(data):
        header = parse_frame_header(data, pos)
        assert header is not None, f"a partial frame header at offset {pos}"
        first, second, mask, length, header_length = header
        assert mask is None and not second & 0x80, "a server frame is never masked"
        start = pos + header_length
        assert start + length <= len(data), f"a partial frame at offset {pos}"
        out.append((first & 0x0F, bytes(data[start:start + length])))
        pos = start + length
    return out


def records(payload: bytes, protocol_name: str = "json") -> list[Any]:
    """A frame's hub messages: JSON records as dicts (a handshake answer too), MessagePack
    messages as the protocol's message objects."""
    if protocol_name == "json":
        assert payload.endswith(RS), payload
        return [json.loads(record) for record in payload.split(RS)[:-1]]
    messages, consumed = get_protocol(protocol_name).parse(payload, 1 << 20)
    assert consumed == len(payload)
    return messages


def close_code(payload: bytes) -> int:
    """The status code of a close frame's payload."""
    return int.from_bytes(payload[:2], "big")


def client_frame(payload: bytes, opcode: int = Opcode.TEXT, *, fin: bool = True,
                 mask: bytes = b"mask") -> bytes:
    """One masked frame, as a client sends it."""
    return encode_frame_header(opcode, len(payload), fin, mask) + apply_mask(payload, mask)


class RecordingPoller:
    """What a peer asks of its poller, recorded: there is no socket to watch."""

    def __init__(self) -> None:
        #: peer -> what it waits for (``_peer._IN``, ``_OUT``, both or 0)
        self.watching: dict[Any, int] = {}
        self.removed: list[Any] = []

    def add(self, peer: Any) -> None:
        self.watching[peer] = _IN

    def watch(self, peer: Any, mask: int) -> None:
        self.watching[peer] = mask

    def remove(self, peer: Any) -> None:
        self.watching.pop(peer, None)
        self.removed.append(peer)


# -- what the operations see of a client --------------------------------------------------------


class FakeSession:
    """A client connection as ``Operations`` sees it (the ``Session`` protocol and what the
    fan-out reads: ``state``, ``wire_format``, ``_out``). Opening it makes it routable through
    the operations, closing it leaves the table, as ``ClientSession`` does."""

    def __init__(self, ops: Operations, connection_id: str, user_id: str | None = None, *,
                 hub: str = HUB, protocol: str = "json", server: Any = None) -> None:
        self.ops = ops
        self.id = connection_id
        self.hub = hub
        self.user_id = user_id
        self.protocol_name = protocol
        self.wire_format = protocol
        self.groups: set[str] = set()
        self.state = ConnState.HANDSHAKE
        self.server = server
        self._out = bytearray()
        self._sink = self
        #: what ``enqueue`` lets the buffer hold (the fan-out's own test reads the config)
        self.limit = ops.config.send_buffer_limit
        #: every close as ``(reason, allow_reconnect)``
        self.closes: list[tuple[str | None, bool]] = []
        #: frames refused for the limit
        self.refused = 0

    def open(self) -> FakeSession:
        self.ops.connection_opened(self)
        return self

    def enqueue(self, data: bytes) -> bool:
        if self.state is not ConnState.OPEN:
            return False
        if len(self._out) + len(data) > self.limit:
            self.refused += 1
            return False
        self._out += data
        return True

    def close(self, reason: str | None = None, *, allow_reconnect: bool = False) -> None:
        self.closes.append((reason, allow_reconnect))
        if self.state is ConnState.OPEN:
            self.ops.connection_closed(self, reason)
        self.state = ConnState.CLOSING

    def take(self) -> list[Any]:
        """The hub messages queued for this client since the last call (the buffer is
        emptied, as a flush would)."""
        got = [m for _, payload in frames(self._out)
               for m in records(payload, self.protocol_name)]
        self._out.clear()
        return got


def open_sessions(ops: Operations, *specs: tuple[str, str | None], **kwargs: Any
                  ) -> list[FakeSession]:
    """Open one ``FakeSession`` per ``(connection id, user id)``."""
    return [FakeSession(ops, conn_id, user, **kwargs).open() for conn_id, user in specs]


# -- what a session sees of its transport -------------------------------------------------------


class MemoryTransport:
    """A ``_session.Transport`` that keeps what the session queues in memory.

    ``push`` appends to ``_out`` (the buffer the fan-out appends to as well) up to ``limit``;
    past it the backlog is dropped and the session told, as ``WebSocketTransport`` does.
    ``deliver`` hands the session the client's messages at a time; ``flush`` empties the buffer
    as a write would and returns its frames.
    """

    def __init__(self, session: ClientSession, *, now: float = 0.0,
                 limit: int = 1 << 20) -> None:
        self.state = ConnState.HANDSHAKE
        self.created = self.last_receive = self.last_send = now
        self._out = bytearray()
        self.limit = limit
        #: every ``close`` as ``(code, reason)``
        self.closes: list[tuple[int, str]] = []
        self.session = session
        session.attach(self)

    def wire_format_for(self, protocol_name: str) -> str:
        return protocol_name

    def push(self, data: bytes) -> bool:
        if len(self._out) + len(data) > self.limit and self.state < ConnState.CLOSING:
            dropped = len(self._out)
            self._out.clear()
            self.session.slow_consumer(dropped + len(data), self.limit)
            return False
        self._out += data
        return True

    def close(self, code: int, reason: str = "") -> None:
        self.closes.append((code, reason))

    def deliver(self, *messages: bytes | str, now: float | None = None) -> None:
        if now is not None:
            self.last_receive = now
        self.session.receive([m.encode() if isinstance(m, str) else m for m in messages])

    def flush(self, now: float | None = None) -> list[tuple[int, bytes]]:
        got = frames(self._out)
        self._out.clear()
        if now is not None:
            self.last_send = now
        return got

    def take(self, protocol_name: str = "json") -> list[Any]:
        """The hub messages (and handshake answers) queued since the last flush."""
        return [m for _, payload in self.flush() for m in records(payload, protocol_name)]


def new_session(ops: Operations, connection_id: str = "c1", user_id: str | None = None, *,
                hub: str = HUB, claims: dict[str, Any] | None = None, now: float = 0.0,
                limit: int = 1 << 20) -> tuple[ClientSession, MemoryTransport]:
    session = ClientSession(ops, connection_id=connection_id, hub=hub, claims=claims or {},
                            user_id=user_id, query="", headers={"x-test": "1"})
    return session, MemoryTransport(session, now=now, limit=limit)


# -- app servers, upstreams, other nodes --------------------------------------------------------


class FakeServer:
    """An app-server connection as the operations (``ServerLink``) and a bound session
    (``ServerBinding``) see it: it records what it is sent and what its clients do."""

    def __init__(self, server_id: str = "pod1", *, hub: str = HUB,
                 carries_clients: bool = True) -> None:
        self.hub = hub
        self.server_id = server_id
        self.carries_clients = carries_clients
        self.clients: dict[str, Any] = {}
        self.sent: list[Any] = []
        #: ``("opened", id, handshake bytes)``, ``("data", id, bytes)``, ``("closed", id, error)``
        self.events: list[tuple[str, str, Any]] = []

    def send(self, message: Any) -> None:
        self.sent.append(message)

    def client_opened(self, client: Any, handshake: bytes) -> None:
        self.clients[client.id] = client
        self.events.append(("opened", client.id, handshake))

    def client_data(self, client: Any, data: bytes) -> None:
        self.events.append(("data", client.id, data))

    def client_closed(self, client: Any, error: str | None) -> None:
        self.clients.pop(client.id, None)
        self.events.append(("closed", client.id, error))


class FakeUpstream:
    """The ``Serverless`` side of the operations: records events, takes invocations when
    ``takes`` says so."""

    def __init__(self, takes: bool = True) -> None:
        self.takes = takes
        self.events: list[tuple[Any, ...]] = []

    def connected(self, conn: Any) -> None:
        self.events.append(("connected", conn.id))

    def disconnected(self, conn: Any, error: str | None) -> None:
        self.events.append(("disconnected", conn.id, error))

    def invoke(self, conn: Any, target: str, invocation_id: str | None, body: bytes) -> bool:
        self.events.append(("invoke", conn.id, target, invocation_id, body))
        return self.takes


class RecordingBackplane:
    """A backplane that keeps what is published and answers ``holds`` from ``held``
    (``{(hub, kind): {keys}}``)."""

    publishes = True
    connection_id_prefix = ""

    def __init__(self) -> None:
        self.published: list[tuple[str, Any]] = []
        self.held: dict[tuple[str, Holding], set[str]] = {}
        #: what the table told it, as ``(hub, kind, key, present)``
        self.interests: list[tuple[str, str, str, bool]] = []

    def interest(self, hub: str, kind: Holding, key: str, present: bool) -> None:
        self.interests.append((hub, kind, key, present))

    def publish(self, hub: str, operation: Any) -> None:
        self.published.append((hub, operation))

    def holds(self, hub: str, kind: Holding, key: str) -> bool:
        return key in self.held.get((hub, kind), ())


class LinkedBackplane(RecordingBackplane):
    """One node's end of an in-memory backplane between two nodes: what this node publishes is
    applied on the other at once, and ``holds`` asks the other node's table."""

    def __init__(self) -> None:
        super().__init__()
        self.other: Operations | None = None

    def publish(self, hub: str, operation: Any) -> None:
        super().publish(hub, operation)
        assert self.other is not None
        self.other.apply(hub, operation)

    def holds(self, hub: str, kind: Holding, key: str) -> bool:
        assert self.other is not None
        shard = self.other.table.view(hub)
        return key in {"connection": shard.connections, "user": shard.users,
                       "group": shard.groups}[kind]


def two_nodes(config: RelayConfig | None = None, clock: Clock | None = None
              ) -> tuple[Operations, Operations]:
    """Two nodes of one endpoint wired by ``LinkedBackplane``s."""
    clock = clock or Clock()
    a_end, b_end = LinkedBackplane(), LinkedBackplane()
    a = make_ops(config, backplane=a_end, clock=clock)
    b = make_ops(config, backplane=b_end, clock=clock)
    a_end.other, b_end.other = b, a
    return a, b
