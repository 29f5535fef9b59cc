"""The SDK's options and its endpoints, from code, the environment or a configuration dict.

The configuration keys are those of the Azure SignalR SDK (service-protocol §8.2), read
case-insensitively as .NET configuration is:

=====================================================  =========================================
``Azure:SignalR:ConnectionString``                     the default (primary) endpoint
``ConnectionStrings:Azure:SignalR:ConnectionString``   the same, read when the first is absent
``Azure:SignalR:ConnectionString:<name>[:<role>]``     a named endpoint; role ``primary``
``ConnectionStrings:Azure:SignalR:ConnectionString:``  (default) or ``secondary``
``<name>[:<role>]``
``Azure:SignalR:Endpoints:<name>[:<role>]``            the same
``Azure:SignalR:ApplicationName``                      ``ServiceOptions.application_name``
=====================================================  =========================================

In the environment ``__`` stands for ``:`` (``Azure__SignalR__ConnectionString``). In a JSON or
TOML file (``ServiceOptions.from_file``) the keys may be nested objects or tables, or flat
``"Azure:SignalR:Endpoints:east"`` keys::

    [Azure.SignalR.Endpoints]
    east = "Endpoint=https://east.example;AccessKey=...;Version=1.0;"
    "west:secondary" = "Endpoint=https://west.example;AccessKey=...;Version=1.0;"

Other ``Azure:SignalR:*`` keys (``ServerStickyMode``, ``Enabled``, ...) are not used by this SDK
and are ignored; a malformed endpoint key, a bad connection string or two endpoints with the same
name raise ``ValueError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from relaycore.protocol import is_valid_application_name

from ._endpoints import EndpointStatusEvent, EndpointType, ServiceEndpoint, select_endpoints
from ._router import EndpointRouter

__all__ = ["ServiceOptions", "default_retry_delay", "load_config_file"]


#: §4.5: the delay after the n-th consecutive failure, n = 0..5; 60 s after that.
_BACKOFF: Final = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
_MAX_BACKOFF: Final = 60.0


def default_retry_delay(failures: int) -> float:
    """Seconds to wait before reconnecting after ``failures`` consecutive failures (0-based):
    1, 2, 4, 8, 16, 32 s, then 60 s, each plus a random 0-1 s (service-protocol §4.5)."""
    base = _BACKOFF[failures] if 0 <= failures < len(_BACKOFF) else _MAX_BACKOFF
    return base + random.random()


@dataclasses.dataclass
class ServiceOptions:
    """How an app server reaches the service. Times are in seconds.

    Give ``connection_string`` (one primary endpoint), ``endpoints``, or both::

        options = ServiceOptions(connection_string=os.environ["RELAY"], application_name="shop")
        options = ServiceOptions.from_env()              # Azure__SignalR__ConnectionString ...
        options = ServiceOptions.from_config(settings)   # {"Azure:SignalR:Endpoints:east": ...}

    The timers default to the Azure SDK's (service-protocol §4.1); tests shorten them.
    """

    connection_string: str | None = None
    endpoints: Sequence[ServiceEndpoint] = ()
    #: Prefixes hub names on the wire (``{app}_{hub}``) so that apps can share a relay.
    application_name: str | None = None
    #: Server connections per hub per endpoint (``InitialHubServerConnectionCount``).
    connection_count: int = 5
    #: Lifetime of client tokens made by ``negotiate`` and of server-connection tokens.
    access_token_lifetime: float = 3600.0
    #: Put exception types and messages into invocation errors sent to clients.
    enable_detailed_errors: bool = False
    #: This app server's id (``X-ASRS-Server-Id``, JWT ``nameid``); default
    #: ``{hostname}_{random hex}``, new for each ``HubServer``.
    server_id: str | None = None
    #: Wait this long for the service's handshake response.
    handshake_timeout: float = 15.0
    #: Drop a server connection on which nothing was received for this long.
    service_timeout: float = 30.0
    #: On receiving, send a keep-alive ping when nothing was sent for this long.
    keep_alive_interval: float = 5.0
    #: Send ``status`` pings this often, on one connection per hub and endpoint.
    status_interval: float = 10.0
    #: Wait this long for the ``Ack`` of a ``...WithAck`` request.
    ack_timeout: float = 10.0
    #: On exit, wait this long for ``shutdown finack``.
    shutdown_timeout: float = 5.0
    #: A hub's connection task gets this long to finish after its client went away.
    client_close_timeout: float = 30.0
    #: A client that connected gets this long to send its SignalR handshake.
    client_handshake_timeout: float = 15.0
    #: Largest hub message accepted from a client, in bytes.
    max_message_size: int = 1 << 20
    #: Seconds before reconnect attempt after n consecutive failures (``default_retry_delay``).
    retry_delay: Callable[[int], float] = default_retry_delay
    #: Chooses endpoints for negotiate and for messages (default: ``EndpointRouter()``).
    endpoint_router: EndpointRouter | None = None
    #: Called with every ``EndpointStatusEvent`` (an endpoint went online or offline for a
    #: hub), from the task that saw the change: it must not block.
    on_endpoint_status: Callable[[EndpointStatusEvent], object] | None = None
    #: An endpoint added at run time is offered to clients once it is staged, or after this
    #: long (an error is logged); a removed one is closed once its clients left, or after
    #: this long (``ServiceScaleTimeout``, §11.3).
    server_scale_timeout: float = 300.0
    #: While an endpoint is being added or removed, ask the service this often for its
    #: ``servers`` list or its ``status`` (§4.1: 5 s).
    scale_poll_interval: float = 5.0
    #: A configuration file (JSON or TOML, see ``from_file``) watched while the server runs:
    #: when it changes, its endpoints replace the server's (``HubServer.set_endpoints``).
    config_file: str | os.PathLike[str] | None = None
    #: How often the ``config_file`` is checked for changes.
    config_reload_interval: float = 1.0

    def __post_init__(self) -> None:
        if self.connection_string is not None:
            ServiceEndpoint(self.connection_string)  # raises ValueError naming the problem
        endpoints = []
        for endpoint in self.endpoints:
            if isinstance(endpoint, str):
                endpoint = ServiceEndpoint(endpoint)
            if not isinstance(endpoint, ServiceEndpoint):
                raise ValueError(
                    f"endpoints must hold ServiceEndpoint objects, got {type(endpoint).__name__}"
                )
            endpoints.append(endpoint)
        self.endpoints = tuple(endpoints)
        if self.application_name == "":
            self.application_name = None
        if self.application_name is not None and not is_valid_application_name(
                self.application_name):
            raise ValueError(
                f"application_name {self.application_name!r} is invalid; expected a letter then "
                "up to 127 letters, digits or `,.[] (no '_': it joins application and hub)"
            )
        if type(self.connection_count) is not int or self.connection_count < 0:
            raise ValueError(
                f"connection_count must be an integer >= 0, got {self.connection_count!r}"
            )
        for name in (
            "access_token_lifetime",
            "handshake_timeout",
            "service_timeout",
            "keep_alive_interval",
            "status_interval",
            "ack_timeout",
            "shutdown_timeout",
            "client_close_timeout",
            "client_handshake_timeout",
            "server_scale_timeout",
            "scale_poll_interval",
            "config_reload_interval",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
        if type(self.max_message_size) is not int or self.max_message_size <= 0:
            raise ValueError(
                f"max_message_size must be an integer > 0, got {self.max_message_size!r}"
            )
        if self.endpoint_router is not None and not isinstance(
            self.endpoint_router, EndpointRouter
        ):
            raise ValueError(
                "endpoint_router must be an EndpointRouter (or a subclass) instance, got "
                f"{type(self.endpoint_router).__name__}"
            )
        if self.on_endpoint_status is not None and not callable(self.on_endpoint_status):
            raise ValueError("on_endpoint_status must be callable")

    def all_endpoints(self) -> tuple[ServiceEndpoint, ...]:
        """Every endpoint: ``connection_string`` first (primary, unnamed), then ``endpoints``,
        de-duplicated by ``{scheme}://{host}:{port}`` preferring the primary (§11.1).

        Raises ``ValueError`` when there is no endpoint or no primary one.
        """
        candidates: list[ServiceEndpoint] = []
        if self.connection_string is not None:
            candidates.append(ServiceEndpoint(self.connection_string))
        candidates.extend(self.endpoints)
        return select_endpoints(candidates)

    # Configuration -------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> ServiceOptions:
        """Options from a configuration mapping with the Azure SDK's keys (see the module doc).

        Keys are ``:``-separated paths compared case-insensitively; nested mappings (as in an
        ``appsettings.json``) are flattened. ``overrides`` set other fields::

            ServiceOptions.from_config({
                "Azure:SignalR:Endpoints:east": primary_string,
                "Azure:SignalR:Endpoints:west:secondary": backup_string,
            }, connection_count=2)

        Raises ``ValueError`` naming the key of a malformed endpoint key, an unknown role or a
        bad connection string.
        """
        connection_string: str | None = None
        fallback: str | None = None
        application_name: str | None = None
        endpoints: list[ServiceEndpoint] = []
        names: dict[str, str] = {}
        if not isinstance(config, Mapping):
            raise ValueError(
                f"configuration must be a mapping of keys to values, got {type(config).__name__}"
            )
        for key, value in _flatten(config):
            parts = [p.strip() for p in key.split(":")]
            lower = [p.lower() for p in parts]
            if lower[:1] == ["connectionstrings"]:
                rest, secondary_form = lower[1:], True
            else:
                rest, secondary_form = lower, False
            if rest[:2] != ["azure", "signalr"]:
                continue
            if rest[2:] == ["connectionstring"]:
                text = _config_string(key, value)
                if text:
                    if secondary_form:
                        fallback = text
                    else:
                        connection_string = text
                    _check_string(key, text)
                continue
            if not secondary_form and rest[2:] == ["applicationname"]:
                application_name = _config_string(key, value) or None
                continue
            if rest[2:3] in (["connectionstring"], ["endpoints"]) and (
                not secondary_form or rest[2] == "connectionstring"
            ):
                endpoint = _endpoint_from_key(key, parts[3 + secondary_form :], value)
                if endpoint is not None:
                    other = names.setdefault(endpoint.name.lower(), key)
                    if other != key:
                        raise ValueError(
                            f"configuration keys {other!r} and {key!r} both name endpoint "
                            f"{endpoint.name!r}; endpoint names must be unique"
                        )
                    endpoints.append(endpoint)
            # Other Azure:SignalR:* settings do not concern this SDK.
        fields: dict[str, Any] = {
            "connection_string": connection_string or fallback,
            "endpoints": tuple(endpoints),
        }
        if application_name is not None:
            fields["application_name"] = application_name
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], *, watch: bool = True, **overrides: Any
    ) -> ServiceOptions:
        """Options from a JSON (``.json``) or TOML (``.toml``) file holding the configuration
        keys (see the module doc and ``from_config``).

        With ``watch`` (the default) the file is also the server's ``config_file``: while
        the server runs, a change of the file adds, removes or renames endpoints without a
        restart (a file that does not load is logged and ignored until it changes again).

        Raises ``ValueError`` naming the file, and the key when a key is at fault.
        """
        document = load_config_file(path)
        if watch:
            overrides.setdefault("config_file", os.fspath(path))
        try:
            return cls.from_config(document, **overrides)
        except ValueError as exc:
            raise ValueError(f"configuration file {os.fspath(path)!r}: {exc}") from None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> ServiceOptions:
        """Options from environment variables, ``__`` standing for ``:``
        (``Azure__SignalR__ConnectionString``, ``Azure__SignalR__Endpoints__east__secondary``,
        ...); ``env`` defaults to ``os.environ``. See ``from_config``."""
        source = os.environ if env is None else env
        return cls.from_config({k.replace("__", ":"): v for k, v in source.items()}, **overrides)


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The document in a ``.json`` or ``.toml`` file, as a dict; ``ValueError`` naming the
    file (and the line, for a syntax error) when it cannot be read."""
    where = f"configuration file {os.fspath(path)!r}"
    suffix = Path(path).suffix.lower()
    if suffix not in (".json", ".toml"):
        raise ValueError(f"{where}: unknown format {suffix or '(none)'!r}; expected .json or .toml")
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{where}: cannot be read: {exc.strerror or exc}") from None
    try:
        if suffix == ".json":
            document = json.loads(data)
        else:
            document = _toml_loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where}: not UTF-8 text: {exc}") from None
    except ValueError as exc:  # json.JSONDecodeError and tomllib.TOMLDecodeError are both
        raise ValueError(f"{where}: invalid {suffix[1:].upper()}: {exc}") from None
    if not isinstance(document, dict):
        raise ValueError(f"{where}: expected an object of keys, got {type(document).__name__}")
    return document


def _toml_loads(text: str) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef, import-not-found, unused-ignore]
        except ModuleNotFoundError:
            raise ValueError("TOML needs Python 3.11 or the tomli package") from None
    return tomllib.loads(text)


def _flatten(config: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in config.items():
        if not isinstance(key, str):
            raise ValueError(f"configuration key {key!r} must be a string")
        path = f"{prefix}:{key}" if prefix else key
        if isinstance(value, Mapping):
            yield from _flatten(value, path)
        else:
            yield path, value


def _config_string(key: str, value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(
            f"configuration key {key!r}: expected a string, got {type(value).__name__}"
        )
    return value.strip()


def _check_string(key: str, text: str) -> None:
    try:
        ServiceEndpoint(text)
    except ValueError as exc:
        raise ValueError(f"configuration key {key!r}: {exc}") from None


def _endpoint_from_key(key: str, tail: list[str], value: Any) -> ServiceEndpoint | None:
    if len(tail) not in (1, 2) or not tail[0]:
        raise ValueError(
            f"configuration key {key!r} is malformed; expected "
            "Azure:SignalR:Endpoints:<name>[:primary|:secondary]"
        )
    name = tail[0]
    role = tail[1] if len(tail) == 2 else "primary"
    if role.lower() not in ("primary", "secondary"):
        raise ValueError(
            f"configuration key {key!r}: role {role!r} is invalid; expected primary or secondary"
        )
    text = _config_string(key, value)
    if not text:
        return None
    try:
        return ServiceEndpoint(text, EndpointType[role.upper()], name)
    except ValueError as exc:
        raise ValueError(f"configuration key {key!r}: {exc}") from None
