"""relaycore: a self-hosted, wire-compatible replacement for Azure SignalR Service."""

__version__ = "0.1.0"

__all__ = ["__version__"]
