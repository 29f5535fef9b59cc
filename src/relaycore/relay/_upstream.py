"""Upstream webhooks (serverless mode, service-protocol §13): client events become HTTP POSTs.

Theory of operation
-------------------
``UpstreamRule``s are matched in order, first match wins (§13.1). Three kinds of event go up:

* ``connections/connected`` and ``connections/disconnected`` (system events): queued per hub in
  arrival order and sent by that hub's worker, one at a time so a connection's ``connected``
  always precedes its ``disconnected``. A failed or unreachable upstream is retried with
  exponential backoff (capped at ``upstream_retry_max_delay``) for up to ``upstream_retry_for``
  seconds; what is finally given up, or does not fit the hub's bounded queue, is counted
  (``RelayStats.upstream_dropped``) and logged with its connection id. Nothing is lost silently.
* ``messages/<target>`` (client invocations): sent at once, concurrently, bounded by
  ``upstream_concurrency``, each with ``upstream_timeout``. An invocation with an id always gets
  an answer (§13.4): the upstream's 200 body unchanged (a framed completion), an empty
  completion for an empty 200 or a 204, otherwise a completion error naming the status or the
  failure. The client's connection is never blocked by an upstream call.

Each POST is logged at DEBUG (``relaycore.relay.upstream``: URL, status, time); failures as
above. httpx's own INFO line for every request is dropped for the relay's upstream calls (a
filter on the ``httpx`` logger that only matches them), so that a busy serverless hub does not
write a line per message at the default INFO level.
"""

from __future__ import annotations

import collections
import contextvars
import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, Protocol

import httpx
import orjson
import trio

from ..protocol._hub import CompletionMessage
from ..protocol._service import upstream_signature
from ._config import RelayConfig, UpstreamRule
from ._stats import RelayStats

log = logging.getLogger("relaycore.relay.upstream")

#: Set while the relay's own upstream POST runs (in that task only).
_POSTING: contextvars.ContextVar[bool] = contextvars.ContextVar("relaycore_upstream_post",
                                                                default=False)


class _QuietUpstreamRequests(logging.Filter):
    """Drops the ``httpx`` logger's per-request line for the relay's upstream POSTs (they are
    logged at DEBUG by ``Upstream._post``); the process's other httpx requests keep theirs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _POSTING.get()


_QUIET = _QuietUpstreamRequests()

CONNECTIONS = "connections"
MESSAGES = "messages"


class ClientConnection(Protocol):
    """A serverless client as the upstream sees it (``_session.ClientSession``)."""

    id: str
    hub: str
    query: str
    user_id: str | None
    claims: dict[str, Any]
    protocol_name: str

    def reply(self, message: Any) -> None: ...

    def send_framed(self, payload: bytes) -> None: ...


@dataclasses.dataclass
class _SystemEvent:
    connection_id: str
    headers: dict[str, str]
    event: str
    body: bytes
    url: str


class Upstream:
    """Sends a relay's upstream events; ``run()`` lives in the relay's nursery."""

    def __init__(self, config: RelayConfig, stats: RelayStats,
                 rules: Sequence[UpstreamRule]) -> None:
        self.config = config
        self.stats = stats
        self.rules = list(rules)
        self._limiter = trio.CapacityLimiter(config.upstream_concurrency)
        self._queues: dict[str, collections.deque[_SystemEvent]] = {}
        self._wakeups: dict[str, trio.Event] = {}
        self._nursery: trio.Nursery | None = None
        self._http: httpx.AsyncClient | None = None
        #: Upstream calls in flight per client connection (``max_pending_invocations``).
        self._in_flight: collections.Counter[ClientConnection] = collections.Counter()

    @property
    def enabled(self) -> bool:
        return bool(self.rules)

    def url_for(self, hub: str, category: str, event: str) -> str | None:
        for rule in self.rules:
            url = rule.url_for(hub, category, event)
            if url is not None:
                return url
        return None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        timeout = httpx.Timeout(self.config.upstream_timeout)
        logging.getLogger("httpx").addFilter(_QUIET)  # once: addFilter skips a duplicate
        async with httpx.AsyncClient(timeout=timeout) as self._http, \
                trio.open_nursery() as self._nursery:
            task_status.started()
            await trio.sleep_forever()

    # -- events -------------------------------------------------------------------------------

    def _headers(self, conn: ClientConnection, category: str, event: str) -> dict[str, Any]:
        """The ``X-ASRS-*`` headers of one call. Values a client chose (its user id, claims,
        query) are sent as UTF-8 bytes: a header holds no other characters than Latin-1, and a
        claim such as ``"name": "José"`` must neither be mangled nor fail the request."""
        headers: dict[str, Any] = {
            "X-ASRS-Connection-Id": conn.id,
            "X-ASRS-Hub": conn.hub,
            "X-ASRS-Category": category,
            "X-ASRS-Event": event,
            "X-ASRS-Client-Query": conn.query,
            "X-ASRS-Signature": upstream_signature(conn.id, self.config.access_keys),
        }
        if conn.user_id is not None:
            headers["X-ASRS-User-Id"] = conn.user_id
        claims = ", ".join(f"{k}: {v}" for k, v in conn.claims.items()
                           if k not in ("aud", "exp", "iat", "nbf"))
        if claims:
            headers["X-ASRS-User-Claims"] = claims
        return {name: value.encode("utf-8") if not value.isascii() else value
                for name, value in headers.items()}

    def connected(self, conn: ClientConnection) -> None:
        self._system_event(conn, "connected", b'{"type":10}')

    def disconnected(self, conn: ClientConnection, error: str | None) -> None:
        body = b'{"type":11}' if not error else (
            b'{"type":11,"error":' + orjson.dumps(error) + b"}")
        self._system_event(conn, "disconnected", body)

    def _system_event(self, conn: ClientConnection, event: str, body: bytes) -> None:
        url = self.url_for(conn.hub, CONNECTIONS, event)
        if url is None or self._nursery is None:
            return
        queue = self._queues.get(conn.hub)
        if queue is None:
            queue = self._queues[conn.hub] = collections.deque()
            self._wakeups[conn.hub] = trio.Event()
            self._nursery.start_soon(self._hub_worker, conn.hub)
        if len(queue) >= self.config.upstream_queue_limit:
            self.stats.upstream_dropped += 1
            log.error("upstream queue of hub %s is full (%d events): dropped %s of %s",
                      conn.hub, len(queue), event, conn.id)
            return
        headers = self._headers(conn, CONNECTIONS, event)
        headers["Content-Type"] = "application/json"
        queue.append(_SystemEvent(conn.id, headers, event, body, url))
        self._wakeups[conn.hub].set()

    async def _hub_worker(self, hub: str) -> None:
        queue = self._queues[hub]
        while True:
            if not queue:
                self._wakeups[hub] = trio.Event()
                await self._wakeups[hub].wait()
                continue
            event = queue[0]
            try:
                await self._deliver_system_event(event)
            except Exception:  # one event is lost (and counted), never the relay
                self.stats.internal_errors += 1
                self.stats.upstream_dropped += 1
                log.exception("upstream %s event of connection %s dropped: internal error",
                              event.event, event.connection_id)
            queue.popleft()

    async def _deliver_system_event(self, event: _SystemEvent) -> None:
        config = self.config
        deadline = trio.current_time() + config.upstream_retry_for
        delay = 0.25
        attempt = 0
        while True:
            attempt += 1
            problem = await self._post_once(event.url, event.headers, event.body)
            if problem is None:
                self.stats.upstream_events_sent += 1
                return
            if trio.current_time() + delay > deadline:
                self.stats.upstream_dropped += 1
                log.error("upstream %s event of connection %s dropped after %d attempts: %s",
                          event.event, event.connection_id, attempt, problem)
                return
            log.warning("upstream %s event of connection %s failed (attempt %d: %s); retrying "
                        "in %.2g s", event.event, event.connection_id, attempt, problem, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, config.upstream_retry_max_delay)

    async def _post(self, url: str, headers: dict[str, str], body: bytes) -> httpx.Response:
        """POST to the upstream, logged at DEBUG (with its status and time, or failure)."""
        assert self._http is not None
        token = _POSTING.set(True)
        start = trio.current_time()
        try:
            async with self._limiter:
                response = await self._http.post(url, headers=headers, content=body)
        except httpx.HTTPError as exc:
            log.debug("upstream POST %s failed: %r", url, exc)
            raise
        finally:
            _POSTING.reset(token)
        log.debug("upstream POST %s: %d in %.0f ms", url, response.status_code,
                  (trio.current_time() - start) * 1000)
        return response

    async def _post_once(self, url: str, headers: dict[str, Any], body: bytes) -> str | None:
        try:
            response = await self._post(url, headers, body)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if response.status_code in (200, 204):
            return None
        return f"status code {response.status_code}"

    # -- invocations -------------------------------------------------------------------------

    def invoke(self, conn: ClientConnection, target: str, invocation_id: str | None,
               body: bytes) -> bool:
        """Send a client invocation up; False when no upstream takes it."""
        url = self.url_for(conn.hub, MESSAGES, target)
        if url is None or self._nursery is None:
            return False
        limit = self.config.max_pending_invocations
        if self._in_flight[conn] >= limit:
            self.stats.invocations_refused += 1
            if invocation_id is not None:
                conn.reply(CompletionMessage(invocation_id=invocation_id, error=(
                    f"Invocation refused: {limit} invocations of this connection are already "
                    "waiting for the upstream")))
            return True
        headers = self._headers(conn, MESSAGES, target)
        headers["Content-Type"] = ("application/x-msgpack" if conn.protocol_name == "messagepack"
                                   else "application/json")
        self._in_flight[conn] += 1
        self._nursery.start_soon(self._invoke_counted, conn, url, headers, body, target,
                                 invocation_id)
        return True

    async def _invoke_counted(self, conn: ClientConnection, *args: Any) -> None:
        try:
            await self._invoke(conn, *args)
        finally:
            self._in_flight[conn] -= 1
            if not self._in_flight[conn]:
                del self._in_flight[conn]

    async def _invoke(self, conn: ClientConnection, url: str, headers: dict[str, Any],
                      body: bytes, target: str, invocation_id: str | None) -> None:
        limit = self.config.max_upstream_response
        try:
            response = await self._post(url, headers, body)
        except Exception as exc:  # noqa: BLE001 - one call fails, never the relay
            self.stats.upstream_failures += 1
            if isinstance(exc, httpx.HTTPError):
                log.warning("upstream invocation %s of %s failed: %r", target, conn.id, exc)
            else:
                self.stats.internal_errors += 1
                log.exception("upstream invocation %s of %s: internal error", target, conn.id)
            if invocation_id is not None:
                conn.reply(CompletionMessage(invocation_id=invocation_id, error=(
                    f"Invocation failed: the upstream could not be reached "
                    f"({type(exc).__name__})")))
            return
        if invocation_id is None:
            return
        if response.status_code == 200 and response.content:
            if len(response.content) > limit:
                conn.reply(CompletionMessage(invocation_id=invocation_id, error=(
                    f"Invocation failed: the upstream answer of {len(response.content)} bytes "
                    f"exceeds the limit of {limit} bytes")))
            else:
                conn.send_framed(response.content)
        elif response.status_code in (200, 204):
            conn.reply(CompletionMessage(invocation_id=invocation_id))
        else:
            self.stats.upstream_failures += 1
            conn.reply(CompletionMessage(
                invocation_id=invocation_id,
                error=f"Invocation failed, status code {response.status_code}"))
