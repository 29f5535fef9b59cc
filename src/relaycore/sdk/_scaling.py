"""Endpoints at run time (service-protocol §11.3): adding, removing and renaming the endpoints
of a running ``HubServer``.

The server keeps the configured endpoints, each STAGING, ACTIVE or REMOVING (see
``_connection``), and every hub has a container of each. Negotiate offers only ACTIVE ones;
messages go to all three, so that a client of an endpoint being added or removed misses
nothing. Changes of one endpoint (add, remove, rename) are serialised by a lock per endpoint
identity; changes of different endpoints run concurrently.

* **Add**: every hub opens its server connections to the new endpoint (STAGING: messages
  already go to it), then waits until the endpoint's ``servers`` list matches the other
  endpoints' (every app server of the hub is connected to it), bounded by
  ``server_scale_timeout``; then it is ACTIVE, offered to new clients.
* **Remove**: REMOVING at once; every session tells the service ``shutdown fin:0``, and the
  containers wait until the service holds no client of this server there (``status`` "0"),
  bounded by ``server_scale_timeout``; then the connections close.
* **Rename** (same ``{scheme}://{host}:{port}``, another name, role or key): taken in place.

A watched ``ServiceOptions.config_file`` applies its endpoints whenever it changes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping, Sequence

import anyio
import anyio.abc

from relaycore.protocol import PingKey

from ._connection import ACTIVE, REMOVING, STAGING, EndpointHub, EndpointState
from ._dispatcher import HubDispatcher
from ._endpoints import EndpointType, HubServiceEndpoint, ServiceEndpoint, select_endpoints
from ._options import ServiceOptions

__all__ = ["EndpointSet", "Lifetime"]

_log = logging.getLogger("relaycore.sdk")


@dataclasses.dataclass
class Lifetime:
    """Where a ``HubServer`` (or a ``ServiceManager``) is in its one life; the server's
    endpoint changes depend on it."""

    #: The server's task group while it runs.
    task_group: anyio.abc.TaskGroup | None = None
    #: Inside ``async with``, until its exit has begun.
    running: bool = False
    #: ``async with`` was entered (a server runs once).
    entered: bool = False

    @property
    def stopped(self) -> bool:
        """It ran and has stopped."""
        return self.entered and not self.running

    async def begin(self, again: str) -> anyio.abc.TaskGroup:
        """Enter the one life: open the task group and keep it, running. Raises
        ``RuntimeError(again)`` when it was entered before."""
        if self.entered:
            raise RuntimeError(again)
        self.entered = True
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self.task_group = task_group
        self.running = True
        return task_group


class _ManagedEndpoint:
    """One configured endpoint of a ``HubServer`` and its state (every hub's container of it
    is in the same state)."""

    __slots__ = ("endpoint", "state")

    def __init__(self, endpoint: ServiceEndpoint, state: EndpointState = ACTIVE) -> None:
        self.endpoint = endpoint
        self.state: EndpointState = state


def _as_endpoint(endpoint: ServiceEndpoint | str) -> ServiceEndpoint:
    if isinstance(endpoint, str):
        return ServiceEndpoint(endpoint)
    if not isinstance(endpoint, ServiceEndpoint):
        raise TypeError(f"expected a ServiceEndpoint or a connection string, got {endpoint!r}")
    if isinstance(endpoint, HubServiceEndpoint):  # a router's view: back to configuration
        return ServiceEndpoint(endpoint.connection_string, endpoint.type, endpoint.name)
    return endpoint


def _file_signature(path: str | os.PathLike[str]) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


class EndpointSet:
    """The endpoints of a ``HubServer``, and their changes while it runs (see the module
    doc). ``dispatchers`` are the server's hubs, ``life`` its lifetime: both are the
    server's own, read as they are at each step."""

    def __init__(
        self, options: ServiceOptions, dispatchers: Mapping[str, HubDispatcher], life: Lifetime
    ) -> None:
        self.options = options
        self._dispatchers = dispatchers
        self._life = life
        self._managed: dict[str, _ManagedEndpoint] = {
            e.identity: _ManagedEndpoint(e) for e in options.all_endpoints()
        }
        self._locks: dict[str, anyio.Lock] = {}
        self._generation = 0

    def configured(self) -> tuple[ServiceEndpoint, ...]:
        """The endpoints, without those being removed."""
        return tuple(m.endpoint for m in self._managed.values() if m.state != REMOVING)

    def states(self) -> list[tuple[ServiceEndpoint, EndpointState]]:
        """Every endpoint in the routing store and its state."""
        return [(m.endpoint, m.state) for m in self._managed.values()]

    def _lock(self, identity: str) -> anyio.Lock:
        lock = self._locks.get(identity)
        if lock is None:
            lock = self._locks[identity] = anyio.Lock()
        return lock

    def _check_usable(self) -> None:
        if self._life.stopped:
            raise RuntimeError("the server has stopped; endpoints can no longer change")

    def _find(self, endpoint: ServiceEndpoint | str) -> _ManagedEndpoint:
        if isinstance(endpoint, ServiceEndpoint):
            managed = self._managed.get(endpoint.identity)
            if managed is None:
                raise ValueError(f"endpoint {endpoint} is not configured")
            return managed
        if not isinstance(endpoint, str):
            raise TypeError(f"expected a ServiceEndpoint or an endpoint name, got {endpoint!r}")
        found = [m for m in self._managed.values() if m.endpoint.name == endpoint]
        if not found:
            names = sorted(m.endpoint.name for m in self._managed.values())
            raise ValueError(f"no endpoint is named {endpoint!r}; endpoints: {names}")
        if len(found) > 1:
            raise ValueError(
                f"{len(found)} endpoints are named {endpoint!r}; pass the ServiceEndpoint"
            )
        return found[0]

    # The changes (``HubServer.add_endpoint``, ``remove_endpoint``, ``set_endpoints``) ------

    async def add(self, endpoint: ServiceEndpoint | str) -> bool:
        """``HubServer.add_endpoint``."""
        endpoint = _as_endpoint(endpoint)
        self._check_usable()
        async with self._lock(endpoint.identity):
            existing = self._managed.get(endpoint.identity)
            if existing is not None:
                raise ValueError(
                    f"endpoint {endpoint} is already configured as {existing.endpoint} "
                    f"({existing.state})"
                )
            return await self._add(endpoint)

    async def remove(self, endpoint: ServiceEndpoint | str) -> bool:
        """``HubServer.remove_endpoint``."""
        self._check_usable()
        managed = self._find(endpoint)
        identity = managed.endpoint.identity
        async with self._lock(identity):
            managed = self._find(managed.endpoint)
            others = [m.endpoint for m in self._managed.values() if m is not managed]
            if not any(e.type is EndpointType.PRIMARY for e in others):
                raise ValueError(
                    f"cannot remove {managed.endpoint}: at least one primary endpoint must remain"
                )
            return await self._remove(managed)

    async def replace(self, endpoints: Iterable[ServiceEndpoint | str]) -> bool:
        """``HubServer.set_endpoints``."""
        wanted = {e.identity: e for e in select_endpoints(_as_endpoint(e) for e in endpoints)}
        self._check_usable()
        self._generation += 1
        generation = self._generation
        results: list[bool] = []
        async with anyio.create_task_group() as task_group:
            for identity in dict.fromkeys([*self._managed, *wanted]):
                task_group.start_soon(
                    self._reconcile, identity, wanted.get(identity), generation, results
                )
        return all(results)

    async def _reconcile(
        self,
        identity: str,
        target: ServiceEndpoint | None,
        generation: int,
        results: list[bool],
    ) -> None:
        async with self._lock(identity):
            if generation != self._generation:
                return  # a newer set_endpoints decides
            managed = self._managed.get(identity)
            if target is None:
                if managed is not None:
                    results.append(await self._remove(managed))
            elif managed is None:
                results.append(await self._add(target))
            elif managed.endpoint != target:
                self._swap(managed, target)

    def _swap(self, managed: _ManagedEndpoint, endpoint: ServiceEndpoint) -> None:
        _log.info("endpoint %s is now %s", managed.endpoint, endpoint)
        managed.endpoint = endpoint
        for dispatcher in self._dispatchers.values():
            for container in dispatcher.containers_of(endpoint.identity):
                container.swap(endpoint)

    # Add -------------------------------------------------------------------------------------

    async def _add(self, endpoint: ServiceEndpoint) -> bool:
        life = self._life
        running = life.running
        managed = _ManagedEndpoint(endpoint, STAGING if running else ACTIVE)
        self._managed[endpoint.identity] = managed
        added = [(d, d.add_container(endpoint, managed.state)) for d in self._dispatchers.values()]
        containers = [c for _d, c in added]
        if not running:
            return True
        assert life.task_group is not None
        for container in containers:
            life.task_group.start_soon(container.run)
        _log.info(
            "adding endpoint %s: staging until every hub's server connections to it are up",
            endpoint,
        )
        staged = False
        waiting_for = "the server connections"
        try:
            with anyio.move_on_after(self.options.server_scale_timeout):
                for container in containers:
                    waiting_for = f"the server connections of hub {container.dispatcher.name}"
                    await container.wait_until(
                        lambda c: not life.running or all(x.connected for x in c.connections)
                    )
                for dispatcher, container in added:
                    waiting_for = (
                        f"the servers of hub {dispatcher.name} on it to match those on the "
                        "other endpoints"
                    )
                    await self._servers_agree(dispatcher, container)
                staged = life.running
        finally:
            # Offered to clients even when the staging did not finish, as the Azure SDK
            # does: nothing more can be done from this side.
            managed.state = ACTIVE
            for container in containers:
                container.state = ACTIVE
        if staged:
            _log.info("endpoint %s added: offered to new clients", endpoint)
        elif not life.running:
            _log.info("adding endpoint %s: the server stopped", endpoint)
        else:
            _log.error(
                "adding endpoint %s: staging did not finish within server_scale_timeout "
                "(%s s), still waiting for %s; it is offered to new clients anyway, and "
                "messages from app servers not connected to it may miss its clients",
                endpoint,
                self.options.server_scale_timeout,
                waiting_for,
            )
        return staged

    async def _servers_agree(self, dispatcher: HubDispatcher, new: EndpointHub) -> None:
        """Return once the ``servers`` reply of ``new`` equals (case-insensitively) those of
        the hub's other online endpoints (§11.3 Add, step 4): every app server of the hub
        is connected to it. Asks every ``scale_poll_interval``; the caller bounds it."""
        interval = self.options.scale_poll_interval
        while self._life.running:
            others = [c for c in dispatcher.containers if c is not new and c.online]
            if not others:
                return
            asked = [new, *others]
            counts = {id(c): c.servers_replies for c in asked}
            for container in asked:
                await container.ask(PingKey.SERVERS)

            def answered(c: EndpointHub, counts: dict[int, int] = counts) -> bool:
                return c.servers_replies > counts[id(c)]

            with anyio.move_on_after(interval):
                for container in asked:
                    await container.wait_until(lambda c: answered(c) or not c.online)
            live = [c for c in asked if c.online]
            if new in live and all(answered(c) for c in live):
                if len({c.servers for c in live}) == 1:
                    return
                _log.debug(
                    "endpoint %s of hub %s: servers %s, elsewhere %s",
                    new.endpoint,
                    dispatcher.name,
                    new.servers,
                    [c.servers for c in live if c is not new],
                )
            await anyio.sleep(interval)

    # Remove ----------------------------------------------------------------------------------

    async def _remove(self, managed: _ManagedEndpoint) -> bool:
        life = self._life
        endpoint = managed.endpoint
        identity = endpoint.identity
        managed.state = REMOVING
        removed = [
            (d, c) for d in self._dispatchers.values() for c in d.containers_of(identity)
        ]
        containers = [c for _d, c in removed]
        for container in containers:
            container.state = REMOVING
        drained = not life.running
        try:
            if life.running:
                _log.info(
                    "removing endpoint %s: no new clients; its connections close once its "
                    "clients left",
                    endpoint,
                )
                with anyio.move_on_after(self.options.server_scale_timeout):
                    for container in containers:
                        await container.send_fin()
                    async with anyio.create_task_group() as task_group:
                        for container in containers:
                            task_group.start_soon(container.drain, self.options.scale_poll_interval)
                    drained = True
                if not drained:
                    _log.error(
                        "removing endpoint %s: clients still connected after "
                        "server_scale_timeout (%s s); closing its connections anyway",
                        endpoint,
                        self.options.server_scale_timeout,
                    )
        finally:
            for dispatcher, container in removed:
                dispatcher.containers.remove(container)
                container.stop()
            if self._managed.get(identity) is managed:
                del self._managed[identity]
        if life.running:
            with anyio.move_on_after(self.options.shutdown_timeout):
                for container in containers:
                    await container.stopped.wait()
            _log.info("endpoint %s removed", endpoint)
        return drained

    # The watched configuration file ----------------------------------------------------------

    def watch(self, path: str | os.PathLike[str]) -> None:
        """Apply the endpoints of ``path`` whenever it changes, while the server runs."""
        assert self._life.task_group is not None
        self._life.task_group.start_soon(self._watch_config, path, _file_signature(path))

    async def _watch_config(
        self, path: str | os.PathLike[str], last: tuple[int, int, int] | None
    ) -> None:
        """Apply the endpoints of ``path`` whenever it changes from ``last`` (polling its
        modification time, size and inode every ``config_reload_interval``)."""
        while True:
            await anyio.sleep(self.options.config_reload_interval)
            signature = _file_signature(path)
            if signature == last:
                continue
            last = signature
            try:
                endpoints = ServiceOptions.from_file(path, watch=False).all_endpoints()
            except ValueError as exc:
                _log.error("configuration not reloaded: %s", exc)
                continue
            _log.info("configuration file %s changed: applying its endpoints", os.fspath(path))
            assert self._life.task_group is not None
            self._life.task_group.start_soon(self._reload, endpoints)

    async def _reload(self, endpoints: Sequence[ServiceEndpoint]) -> None:
        try:
            await self.replace(endpoints)
        except Exception:
            _log.exception("applying the reloaded endpoints failed")
