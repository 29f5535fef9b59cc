"""The counters a relay keeps (``relay.stats``): what it did, refused and dropped, and why."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class RelayStats:
    """Counters the relay keeps (``relay.stats``)."""

    connections_opened: int = 0
    connections_closed: int = 0
    messages_sent: int = 0
    deliveries: int = 0
    slow_consumer_closes: int = 0
    #: Bytes queued for slow consumers and dropped when they were closed (the Close message
    #: goes first; what was behind it is never sent).
    slow_consumer_dropped_bytes: int = 0
    #: App-server connections closed because they stopped reading, and the bytes of their
    #: clients' messages that were dropped then (counted, logged, never silent).
    server_slow_closes: int = 0
    server_dropped_bytes: int = 0
    handshake_errors: int = 0
    protocol_errors: int = 0
    auth_failures: int = 0
    upstream_events_sent: int = 0
    upstream_failures: int = 0
    upstream_dropped: int = 0
    #: HTTP requests that did not arrive whole in time (408, or an idle keep-alive closed),
    #: HTTP connections closed to make room for new ones, connections refused with a 503.
    request_timeouts: int = 0
    http_evictions: int = 0
    connections_refused: int = 0
    #: Invocations refused for ``max_pending_invocations`` (answered with an error).
    invocations_refused: int = 0
    #: The backplane (several nodes on Redis): operations published for other nodes and
    #: applied from them; publishes Redis may not have run (the connection broke after they
    #: were written, or Redis refused them); publishes dropped while Redis was unreachable
    #: past the buffer's bound; publishes that reached fewer nodes than the node's directory
    #: says hold a target (one was gone, or not subscribed again yet after Redis came back);
    #: subscriber connections opened again (every channel subscribed again), Redis connections
    #: lost; other nodes found gone (their heartbeat expired) and forgotten.
    backplane_published: int = 0
    backplane_received: int = 0
    backplane_publish_failed: int = 0
    backplane_dropped: int = 0
    backplane_unrouted: int = 0
    backplane_resubscribes: int = 0
    backplane_disconnects: int = 0
    backplane_nodes_gone: int = 0
    #: Requests and connections ended by an unexpected exception in the relay (each logged
    #: once with its traceback; the relay and every other connection carry on).
    internal_errors: int = 0
