"""The seam between one relay node and the others that serve the same endpoint.

Theory of operation
-------------------
Every operation that may concern a connection held by another node (a send, a group or
user-group change, a close) is handed by the operations layer to its ``Backplane`` once it has
been applied locally. The operation travels as the service-protocol message that already
encodes it (``BroadcastDataMessage``, ``UserJoinGroupMessage``, ``CloseConnectionMessage``...,
service-protocol §5-§7), so a backplane needs no format of its own: a node that receives one
from another node applies it to its own connections only (``Operations.apply``), and never
publishes it again.

The hot path never awaits: ``publish`` queues (a real backplane drains its queue in its own
task, as the flusher drains send buffers) and ``holds`` answers from what the node already
knows of the others. ``publishes`` is False when no other node can exist; the operations layer
then does not even build the messages, so a single node pays one attribute test per operation.

``LocalBackplane`` is that single node: nothing to publish, nobody else holding anything.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any, Literal, Protocol

import trio

#: What ``Backplane.holds`` may be asked about.
Holding = Literal["connection", "user", "group", "server"]

#: Applies an operation that another node published: ``(hub, service-protocol message)``.
Receiver = Callable[[str, Any], None]


class Backplane(Protocol):
    """What the operations layer needs of the other nodes of its endpoint."""

    #: Whether operations are published at all (False: this node is the whole endpoint).
    publishes: bool
    #: What every connection id of this node starts with ("" when no node needs naming).
    connection_id_prefix: str
    #: Told the id of a node that went away and the ids of the connections it held (they
    #: are gone); the operations set it.
    on_node_gone: Callable[[str, set[str]], None] | None

    def publish(self, hub: str, operation: Any) -> None:
        """Queue an operation already applied on this node for the nodes that may need it;
        never awaits."""

    def holds(self, hub: str, kind: Holding, key: str) -> bool:
        """Whether another node holds the connection, a connection of the user, or a member
        of the group (an existence check that found nothing here asks this)."""

    def holders(self, hub: str, kind: Holding, key: str) -> Collection[str]:
        """The other nodes that hold it (``"server"``, ``""``: an app server of the hub)."""

    def send_to_node(self, node: str, hub: str, operation: Any) -> None:
        """Queue a message for one other node (what a client's traffic to and from an app
        server of that node is); never awaits."""

    def interest(self, hub: str, kind: Holding, key: str, present: bool) -> None:
        """This node now holds (``present``) or no longer holds the connection, a connection
        of the user, or a member of the group; called only when ``publishes``."""

    async def run(self, receive: Receiver, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Carry operations until cancelled; ``receive`` applies each one from another node."""


class LocalBackplane:
    """One node is the whole endpoint: nothing to publish, nothing held elsewhere."""

    publishes = False
    connection_id_prefix = ""
    on_node_gone: Callable[[str, set[str]], None] | None = None

    def publish(self, hub: str, operation: Any) -> None:
        raise RuntimeError("a single relay node has no other node to publish to")

    def holds(self, hub: str, kind: Holding, key: str) -> bool:
        return False

    def holders(self, hub: str, kind: Holding, key: str) -> Collection[str]:
        return ()

    def send_to_node(self, node: str, hub: str, operation: Any) -> None:
        raise RuntimeError("a single relay node has no other node to send to")

    def interest(self, hub: str, kind: Holding, key: str, present: bool) -> None:
        raise RuntimeError("a single relay node tells no other node what it holds")

    async def run(self, receive: Receiver, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
