"""The relay's configuration: every limit explicit, every default documented.

Sources, later ones winning: the defaults below, a TOML file (``--config``), ``RELAYCORE_*``
environment variables, command-line flags.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import tomllib

from ._upstream import parse_rules

#: The access key of the embedded development default. Printed at start; never use it in
#: production (``--access-key`` or ``RELAYCORE_ACCESS_KEY`` replace it).
DEVELOPMENT_ACCESS_KEY = "relaycore-development-key-0123456789ABCDEFGH"


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
    #: Largest hub message a client may send (a reassembled WebSocket message).
    max_message_size: int = 1 << 20
    #: Bytes queued for one client before the slow-consumer policy closes it (control
    #: replies such as pongs count too).
    send_buffer_limit: int = 4 << 20
    #: Bytes queued for one app-server connection (its clients' messages) before it is
    #: closed as not reading, with a ServiceError; its clients are told to reconnect.
    server_send_buffer_limit: int = 64 << 20
    #: Wait this long for the peer's close frame before dropping the TCP connection.
    close_timeout: float = 5.0
    #: Largest REST request body (Azure: 1 MB) and request head (Azure: 16 KB of headers).
    max_request_body: int = 1 << 20
    max_request_head: int = 16 << 10
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

    def __post_init__(self) -> None:
        if not self.access_keys or not all(self.access_keys):
            raise ValueError("access_keys: at least one non-empty access key is required")
        for name in ("keep_alive_interval", "client_timeout", "handshake_timeout",
                     "negotiate_timeout", "close_timeout", "server_keep_alive_interval",
                     "server_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.service_mode not in ("auto", "default", "serverless"):
            raise ValueError(f"service_mode must be auto, default or serverless, got "
                             f"{self.service_mode!r}")
        for name in ("max_message_size", "send_buffer_limit", "server_send_buffer_limit",
                     "max_request_body",
                     "max_request_head", "max_service_message_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        parse_rules(self.upstreams)  # fail at start, naming the bad entry
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port}")

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
    ) -> RelayConfig:
        """Build a config from a TOML file, ``RELAYCORE_*`` variables and explicit overrides."""
        values: dict[str, Any] = {}
        if toml_path:
            with open(toml_path, "rb") as f:
                doc = tomllib.load(f)
            values.update(_check_keys(doc.get("relay", doc), f"{toml_path}"))
        values.update(_from_env(os.environ if env is None else env))
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        if "upstream" in values:
            values["upstreams"] = values.pop("upstream")
        if "access_key" in values:
            key = values.pop("access_key")
            values["access_keys"] = [key] if isinstance(key, str) else list(key)
        return cls(**values)


_FIELDS = {f.name: f for f in dataclasses.fields(RelayConfig)}


def _check_keys(doc: Mapping[str, Any], where: str) -> dict[str, Any]:
    out = {}
    for key, value in doc.items():
        name = key.replace("-", "_")
        if name not in _FIELDS and name not in ("access_key", "upstream"):
            raise ValueError(f"{where}: unknown setting {key!r}")
        out[name] = value
    return out


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, raw in env.items():
        if not key.startswith("RELAYCORE_") or key in (
            "RELAYCORE_NO_EXTENSIONS", "RELAYCORE_REQUIRE_EXTENSIONS", "RELAYCORE_BUILD_EXTENSION",
            "RELAYCORE_VECTORS_DIR",
        ):
            continue
        name = key[len("RELAYCORE_"):].lower()
        if name in ("access_key", "access_keys"):
            out["access_keys"] = [k.strip() for k in raw.split(",") if k.strip()]
            continue
        if name in ("upstream", "upstreams"):
            out["upstreams"] = raw.split()  # whitespace-separated URL templates
            continue
        field = _FIELDS.get(name)
        if field is None:
            raise ValueError(f"environment variable {key}: unknown setting {name!r}")
        out[name] = _convert(field, raw, key)
    return out


def _convert(field: dataclasses.Field[Any], raw: str, where: str) -> Any:
    default = field.default if field.default is not dataclasses.MISSING else None
    if field.default_factory is not dataclasses.MISSING:  # lists
        return [item.strip() for item in raw.split(",") if item.strip()]
    try:
        if isinstance(default, bool):
            return raw.lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise ValueError(f"{where}: expected a number, got {raw!r}") from None
    return raw
