"""The relay's configuration: every limit explicit, every default documented.

Sources, later ones winning: the defaults below, a TOML file (``--config``), ``RELAYCORE_*``
environment variables, command-line flags.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import sys
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Union
from urllib.parse import quote

from ..protocol._negotiate import transport_names

if sys.version_info >= (3, 11):
    import tomllib
else:  # the backport, same API (a dependency on 3.10)
    import tomli as tomllib

#: The access key of the embedded development default. Printed at start; never use it in
#: production (``--access-key`` or ``RELAYCORE_ACCESS_KEY`` replace it).
DEVELOPMENT_ACCESS_KEY = "relaycore-development-key-0123456789ABCDEFGH"

#: The values ``log_level`` takes (any case): the ``logging`` module's level names.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

#: How a boolean setting may be spelled in an environment variable (any case).
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def split_access_keys(raw: str) -> list[str]:
    """The keys of ``--access-key``, ``RELAYCORE_ACCESS_KEY`` or a TOML ``access_key`` string:
    comma-separated, blanks around each key dropped (``"k1, k2"`` is ``["k1", "k2"]``)."""
    return [key.strip() for key in raw.split(",") if key.strip()]


def _pattern_matches(pattern: str, value: str) -> bool:
    """``*``, a name, or a comma-separated list of names (compared case-insensitively)."""
    items = [p.strip() for p in pattern.split(",") if p.strip()]
    return any(p == "*" or fnmatch.fnmatchcase(value.lower(), p.lower()) for p in items)


@dataclasses.dataclass(frozen=True)
class UpstreamRule:
    """One upstream setting: where events of matching hubs, categories and events go."""

    url_template: str
    hub_pattern: str = "*"
    category_pattern: str = "*"
    event_pattern: str = "*"

    def url_for(self, hub: str, category: str, event: str) -> str | None:
        if not (_pattern_matches(self.hub_pattern, hub)
                and _pattern_matches(self.category_pattern, category)
                and _pattern_matches(self.event_pattern, event)):
            return None
        return (self.url_template.replace("{hub}", quote(hub, safe=""))
                .replace("{category}", quote(category, safe=""))
                .replace("{event}", quote(event, safe="")))

    @classmethod
    def parse(cls, value: str | Mapping[str, Any], where: str = "upstream") -> UpstreamRule:
        """From a URL template string, or a table with ``url_template`` and patterns."""
        if isinstance(value, str):
            rule = cls(value)
        else:
            known = {f.name for f in dataclasses.fields(cls)}
            fields = {k.replace("-", "_"): v for k, v in value.items()}
            fields.pop("auth", None)  # managed identity has no meaning here
            unknown = set(fields) - known
            if unknown:
                raise ValueError(f"{where}: unknown upstream settings {sorted(unknown)}")
            if "url_template" not in fields:
                raise ValueError(f"{where}: an upstream needs a url_template")
            rule = cls(**fields)
        if not rule.url_template.startswith(("http://", "https://")):
            raise ValueError(f"{where}: url_template must be an http(s) URL, got "
                             f"{rule.url_template!r}")
        return rule


def parse_rules(values: Iterable[str | Mapping[str, Any]]) -> list[UpstreamRule]:
    return [UpstreamRule.parse(v, f"upstream #{i + 1}") for i, v in enumerate(values)]


class _SettingError(ValueError):
    """A setting's value is invalid; ``setting`` names it so that ``load`` can say where it
    came from (the TOML file, the environment variable)."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


@dataclasses.dataclass
class RelayConfig:
    """Settings of one relay node. Times are in seconds, sizes in bytes."""

    host: str = "127.0.0.1"
    port: int = 8080
    #: Keys that sign tokens; every one is tried (Azure's primary and secondary keys).
    access_keys: list[str] = dataclasses.field(default_factory=lambda: [DEVELOPMENT_ACCESS_KEY])
    #: The public base URL clients and app servers use (goes into printed connection strings
    #: and token audiences). Default: ``http://{host}:{port}``.
    public_endpoint: str | None = None
    #: Send a Ping when nothing was sent to a client for this long (SignalR KeepAliveInterval).
    keep_alive_interval: float = 15.0
    #: Close a client that sent nothing for this long (SignalR ClientTimeoutInterval).
    client_timeout: float = 30.0
    #: Close a client whose handshake did not complete in this long (HandshakeTimeout).
    handshake_timeout: float = 15.0
    #: A negotiated connection id that is not used by a WebSocket in this long is forgotten.
    negotiate_timeout: float = 15.0
    #: The transports negotiate offers and the client endpoint serves (``WebSockets``,
    #: ``ServerSentEvents``, ``LongPolling``; any case); negotiate lists them in ASP.NET
    #: Core's order whatever the order here.
    transports: list[str] = dataclasses.field(
        default_factory=lambda: ["WebSockets", "ServerSentEvents", "LongPolling"])
    #: The longest a long poll is held before it is answered empty (ASP.NET Core's
    #: PollTimeout; below the client's own 100 s limit on a poll).
    poll_timeout: float = 90.0
    #: A long-polling client that has had no poll waiting for this long is gone: its
    #: connection is closed (ASP.NET Core's DisconnectTimeout).
    poll_idle_timeout: float = 15.0
    #: Largest hub message a client may send (a reassembled WebSocket message).
    max_message_size: int = 1 << 20
    #: Bytes queued for one client before the slow-consumer policy closes it (control
    #: replies such as pongs count too).
    send_buffer_limit: int = 4 << 20
    #: Stateful reconnect (WebSockets, ASP.NET Core 8): the bytes of messages sent to one
    #: client and not yet acknowledged that the relay keeps to resend after its WebSocket
    #: dropped (ASP.NET Core's StatefulReconnectBufferSize); past it the client is closed with
    #: a reason. 0: not offered (negotiate never answers ``useStatefulReconnect``).
    stateful_reconnect_buffer: int = 100_000
    #: How long a stateful client whose WebSocket dropped may take to resume it (ASP.NET
    #: Core's DisconnectTimeout); meanwhile it stays in the table and its sends are kept.
    stateful_reconnect_window: float = 15.0
    #: Bytes queued for one app-server connection (its clients' messages) before it is
    #: closed as not reading, with a ServiceError; its clients are told to reconnect.
    server_send_buffer_limit: int = 64 << 20
    #: Wait this long for the peer's close frame before dropping the TCP connection.
    close_timeout: float = 5.0
    #: Largest REST request body (Azure: 1 MB) and request head (Azure: 16 KB of headers).
    max_request_body: int = 1 << 20
    max_request_head: int = 16 << 10
    #: Time a connection has to send a whole HTTP request, head and body (a slow sender gets
    #: 408), and the longest an HTTP connection waits idle for its next request. The
    #: WebSocket upgrade is a request like any other: accept to upgrade takes at most this.
    request_timeout: float = 15.0
    #: HTTP connections not yet upgraded (requests in progress, idle keep-alives, slow
    #: senders) held at once; a new one past it closes the one that has waited longest, so
    #: that slow connections cannot keep new clients out.
    max_http_connections: int = 1000
    #: Sockets (HTTP and WebSocket) the relay holds at once; past it a new connection is
    #: answered 503 at once. 0: the process's open-file limit less a reserve of 64.
    max_connections: int = 0
    #: The key that signs tokens for the admin API (``/api/admin/*``: fault injection). Never
    #: one of ``access_keys``: an application's key must not reach every application. None:
    #: the admin API is off (404).
    admin_key: str | None = None
    #: ``auto``: a hub with a connected app server routes its clients there, a hub without
    #: one is served by the relay itself (serverless); ``default``: a client of a hub without
    #: an app server gets a handshake error (Azure's Default mode); ``serverless``: the relay
    #: serves every hub itself and never routes clients to app servers.
    service_mode: str = "auto"
    #: Ping app servers when nothing was sent to them for this long (service-protocol §4.1:
    #: the SDK drops a service that is silent for 30 s).
    server_keep_alive_interval: float = 5.0
    #: Close a server connection that sent nothing for this long.
    server_timeout: float = 30.0
    #: Largest service-protocol message an app server may send.
    max_service_message_size: int = 16 << 20
    #: Upstream webhooks (service-protocol §13), in order, first match wins: URL templates
    #: (``{hub}``, ``{category}``, ``{event}``) or tables with ``url_template``,
    #: ``hub_pattern``, ``category_pattern``, ``event_pattern``.
    upstreams: list[Any] = dataclasses.field(default_factory=list)
    #: Each upstream request's time limit, and how many run at once.
    upstream_timeout: float = 10.0
    upstream_concurrency: int = 64
    #: Connected/disconnected events waiting per hub before new ones are dropped (and counted).
    upstream_queue_limit: int = 10000
    #: How long a failing system event is retried, and the longest pause between attempts.
    upstream_retry_for: float = 300.0
    upstream_retry_max_delay: float = 5.0
    #: Invocations in flight per client connection: upstream calls a serverless client made,
    #: client results app servers await from it. Past it a new one fails at once with an
    #: error completion (a client cannot make the relay hold tasks or entries without end).
    max_pending_invocations: int = 100
    #: Largest upstream answer to an invocation that is passed to the client.
    max_upstream_response: int = 16 << 20
    #: Clock skew allowed when checking token expiry.
    token_clock_skew: float = 300.0
    #: Connections a hub may hold (0 = no limit).
    max_connections_per_hub: int = 0
    #: Connection quota reported to app servers (``capacity``); 0 = not reported.
    capacity: int = 0
    #: Origins allowed for browser CORS requests; ``["*"]`` echoes any Origin.
    cors_origins: list[str] = dataclasses.field(default_factory=lambda: ["*"])
    log_level: str = "INFO"
    #: Tune the garbage collector for many long-lived connections: a larger first-generation
    #: threshold, and the connections' objects frozen out of the collector as they grow in
    #: number. Process-wide, so off for a relay embedded in another program; the CLI turns
    #: it on.
    tune_gc: bool = False
    #: Several nodes as one endpoint: every node given the same Redis (and cluster name)
    #: serves the same clients, groups and users (``redis://host:port/db`` or
    #: ``unix:///path?db=N``). None: this node is the whole endpoint, in memory.
    redis: str | None = None
    #: Separates several clusters on one Redis (the prefix of its keys and channels).
    cluster_name: str = "relaycore"
    #: Listen with ``SO_REUSEPORT``: other processes may listen on the same port, and the
    #: kernel spreads new connections over them (what ``serve --workers`` gives each worker).
    reuse_port: bool = False
    #: While Redis is unreachable, operations for other nodes wait up to this many bytes and
    #: this long, then are dropped and counted (``backplane_dropped``).
    backplane_buffer_limit: int = 1 << 20
    backplane_buffer_time: float = 2.0

    def __post_init__(self) -> None:
        for name, hint in _HINTS.items():
            value = getattr(self, name)
            if not _matches(hint, value):
                raise _SettingError(name, f"{name}: expected {_describe(hint)}, got {value!r}")
            if hint is float:
                setattr(self, name, float(value))  # an integer is a fine number of seconds
        if not self.access_keys or not all(self.access_keys):
            raise _SettingError("access_keys",
                                "access_keys: at least one non-empty access key is required")
        for name in ("keep_alive_interval", "client_timeout", "handshake_timeout",
                     "negotiate_timeout", "poll_timeout", "poll_idle_timeout",
                     "close_timeout", "stateful_reconnect_window", "server_keep_alive_interval",
                     "server_timeout", "upstream_timeout", "upstream_concurrency",
                     "max_message_size", "send_buffer_limit", "server_send_buffer_limit",
                     "max_request_body",
                     "max_request_head", "max_service_message_size", "request_timeout",
                     "max_http_connections", "max_pending_invocations"):
            if getattr(self, name) <= 0:
                raise _SettingError(name, f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("max_connections_per_hub", "max_connections", "capacity",
                     "stateful_reconnect_buffer",
                     "upstream_queue_limit",
                     "upstream_retry_for", "upstream_retry_max_delay", "max_upstream_response",
                     "token_clock_skew"):
            if getattr(self, name) < 0:
                raise _SettingError(name, f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.admin_key is not None and (not self.admin_key
                                           or self.admin_key in self.access_keys):
            raise _SettingError("admin_key", "admin_key must be a non-empty key that is not one "
                                "of the access keys (it opens the admin API of every application)")
        if self.service_mode not in ("auto", "default", "serverless"):
            raise _SettingError("service_mode", f"service_mode must be auto, default or "
                                f"serverless, got {self.service_mode!r}")
        try:
            self.transports = transport_names(self.transports)
        except ValueError as exc:
            raise _SettingError("transports", f"transports: {exc}") from None
        if not self.transports:
            raise _SettingError("transports", "transports: at least one transport is required")
        if self.log_level.upper() not in LOG_LEVELS:
            raise _SettingError("log_level", f"log_level must be one of {', '.join(LOG_LEVELS)}, "
                                f"got {self.log_level!r}")
        try:
            parse_rules(self.upstreams)  # fail at start, naming the bad entry
        except ValueError as exc:
            raise _SettingError("upstreams", str(exc)) from None
        if self.redis is not None and not self.redis.startswith(("redis://", "unix://")):
            raise _SettingError("redis", f"redis must be a redis://host:port/db or "
                                f"unix:///path URL, got {self.redis!r}")
        if not self.cluster_name or any(c in self.cluster_name for c in " :\t\n"):
            raise _SettingError("cluster_name", "cluster_name must be a non-empty name without "
                                f"spaces or ':', got {self.cluster_name!r}")
        for name in ("backplane_buffer_limit", "backplane_buffer_time"):
            if getattr(self, name) < 0:
                raise _SettingError(name, f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.port <= 65535:
            raise _SettingError("port", f"port must be 0..65535, got {self.port}")

    @property
    def uses_development_key(self) -> bool:
        return DEVELOPMENT_ACCESS_KEY in self.access_keys

    def endpoint_url(self, port: int | None = None) -> str:
        """The public base URL, without a trailing slash."""
        if self.public_endpoint:
            return self.public_endpoint.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port if port is not None else self.port}"

    def connection_string(self, port: int | None = None) -> str:
        """The connection string app servers and management clients use for this relay."""
        return f"Endpoint={self.endpoint_url(port)};AccessKey={self.access_keys[0]};Version=1.0;"

    @classmethod
    def load(
        cls,
        *,
        toml_path: str | None = None,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
        defaults: Mapping[str, Any] | None = None,
    ) -> RelayConfig:
        """Build a config from a TOML file, ``RELAYCORE_*`` variables and explicit overrides,
        over ``defaults`` (the caller's, where they differ from the class's).

        Every error is a ``ValueError`` (``OSError`` when the file cannot be read) whose message
        says where the bad value came from: the file (with the line of a syntax error) and the
        key, or the environment variable.
        """
        values: dict[str, Any] = {_canonical(k): v for k, v in (defaults or {}).items()}
        sources: dict[str, str] = {}  # setting -> where its value came from, for errors
        if toml_path:
            for name, value in _from_toml(toml_path).items():
                values[name], sources[name] = value, toml_path
        for name, (value, variable) in _from_env(os.environ if env is None else env).items():
            values[name], sources[name] = value, variable
        for name, value in (overrides or {}).items():
            if value is not None:
                values[_canonical(name)] = value
                sources.pop(_canonical(name), None)
        if isinstance(values.get("access_keys"), str):
            values["access_keys"] = split_access_keys(values["access_keys"])
        try:
            return cls(**values)
        except _SettingError as exc:
            where = sources.get(exc.setting)
            if where is None:
                raise
            raise ValueError(f"{where}: {exc}") from None


_FIELDS = {f.name: f for f in dataclasses.fields(RelayConfig)}
_HINTS = {name: hint for name, hint in typing.get_type_hints(RelayConfig).items()
          if name in _FIELDS}


def _canonical(name: str) -> str:
    """A setting's field name: ``-`` is ``_``, and the singular spellings name the lists."""
    name = name.replace("-", "_")
    return {"access_key": "access_keys", "upstream": "upstreams"}.get(name, name)


def _matches(hint: Any, value: Any) -> bool:
    """Whether ``value`` is of the declared type ``hint`` (an int is a fine float, a bool is
    not a number)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_matches(arg, value) for arg in typing.get_args(hint))
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_matches(item, v) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint)
                           if arg is not type(None))
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return "a list" if item is Any else f"a list of {_describe(item)[2:]}s"
    return {bool: "a boolean (true or false)", int: "an integer", float: "a number",
            str: "a string"}.get(hint, getattr(hint, "__name__", str(hint)))


def _from_toml(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        data = f.read()
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        hint = ""
        if path.lower().endswith(".json") or data.lstrip().startswith(b"{"):
            hint = " (this looks like JSON; --config takes a TOML file)"
        raise ValueError(f"{path}: not valid TOML: {exc}{hint}") from None
    table = doc.get("relay", doc)
    if not isinstance(table, dict):
        raise ValueError(f"{path}: [relay] must be a table, got {table!r}")
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = _canonical(key)
        if name not in _FIELDS:
            raise ValueError(f"{path}: unknown setting {key!r}")
        out[name] = value
    return out


def _from_env(env: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    """``RELAYCORE_*`` settings: name -> (value, the variable it came from)."""
    out: dict[str, tuple[Any, str]] = {}
    for key, raw in env.items():
        if not key.startswith("RELAYCORE_") or key in (
            "RELAYCORE_NO_EXTENSIONS", "RELAYCORE_REQUIRE_EXTENSIONS", "RELAYCORE_BUILD_EXTENSION",
        ):
            continue
        name = _canonical(key[len("RELAYCORE_"):].lower())
        if name not in _FIELDS:
            raise ValueError(f"environment variable {key}: unknown setting {name!r}")
        out[name] = (_convert(name, raw, key), key)
    return out


def _convert(name: str, raw: str, where: str) -> Any:
    """An environment variable's text as the setting's type."""
    hint = _HINTS[name]
    if name == "access_keys":
        return split_access_keys(raw)
    if name == "upstreams":
        return raw.split()  # whitespace-separated URL templates
    if typing.get_origin(hint) is list:
        return [item.strip() for item in raw.split(",") if item.strip()]
    if hint is bool:
        if raw.strip().lower() in _TRUE:
            return True
        if raw.strip().lower() in _FALSE:
            return False
        raise ValueError(f"{where}: expected a boolean ({'/'.join(_TRUE)} or "
                         f"{'/'.join(_FALSE)}), got {raw!r}")
    try:
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
    except ValueError:
        raise ValueError(f"{where}: expected {_describe(hint)}, got {raw!r}") from None
    return raw
