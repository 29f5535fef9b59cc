"""The relay service, on trio: HTTP front, client endpoint, connection table, REST API."""

from ._config import DEVELOPMENT_ACCESS_KEY, RelayConfig
from ._message import OutboundMessage
from ._relay import Relay, RelayStats, serve_relay

__all__ = [
    "DEVELOPMENT_ACCESS_KEY",
    "OutboundMessage",
    "Relay",
    "RelayConfig",
    "RelayStats",
    "serve_relay",
]
