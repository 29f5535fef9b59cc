"""``HubConnectionBuilder``: the JS client's way of making a ``HubConnection``, in snake_case."""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..protocol import JsonHubProtocol, MessagePackHubProtocol
from ._buffer import DEFAULT_BUFFER_SIZE
from ._connection import HubConnection
from ._negotiate import AccessTokenFactory
from ._retry import RetryPolicy

__all__ = ["HubConnectionBuilder"]


class HubConnectionBuilder:
    """Collects a hub connection's settings; ``build()`` makes the ``HubConnection``::

        connection = (
            HubConnectionBuilder()
            .with_url("http://127.0.0.1:8000/hubs/chat", access_token_factory=get_token)
            .with_hub_protocol("messagepack")
            .with_automatic_reconnect([0, 2, 10, 30])
            .build()
        )

    Every method returns the builder. Settings not given keep ``HubConnection``'s defaults.
    """

    def __init__(self) -> None:
        self._url: str | None = None
        self._options: dict[str, Any] = {}

    def with_url(
        self,
        url: str,
        *,
        access_token_factory: AccessTokenFactory | None = None,
        headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
        skip_negotiation: bool | None = None,
        transport: str | Sequence[str] | None = None,
        http_timeout: float | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> HubConnectionBuilder:
        """The hub URL, and how to reach it (see ``HubConnection``); ``transport`` limits the
        transports tried: ``"WebSockets"``, ``"ServerSentEvents"``, ``"LongPolling"``, or a
        list of them (default: any the server offers, in its order)."""
        self._url = url
        given = {"access_token_factory": access_token_factory, "headers": headers,
                 "skip_negotiation": skip_negotiation, "transport": transport,
                 "http_timeout": http_timeout,
                 "ssl_context": ssl_context}
        self._options.update({name: value for name, value in given.items() if value is not None})
        return self

    def with_hub_protocol(
        self, protocol: str | JsonHubProtocol | MessagePackHubProtocol
    ) -> HubConnectionBuilder:
        """``"json"`` (the default) or ``"messagepack"``."""
        self._options["protocol"] = protocol
        return self

    def with_automatic_reconnect(
        self, policy: Sequence[float] | RetryPolicy | None = None
    ) -> HubConnectionBuilder:
        """Reconnect when the connection is lost: after each delay of ``policy`` in turn
        (seconds; by default 0, 2, 10 and 30, then give up), or as a ``RetryPolicy`` says."""
        self._options["reconnect"] = True if policy is None else policy
        return self

    def with_stateful_reconnect(self, buffer_size: int = DEFAULT_BUFFER_SIZE
                                ) -> HubConnectionBuilder:
        """Ask for stateful reconnect: a dropped WebSocket is reopened to the same connection
        and the messages the other side did not acknowledge are sent again (no message lost,
        none handled twice). Sends wait once ``buffer_size`` bytes are unacknowledged."""
        self._options["stateful_reconnect"] = buffer_size
        return self

    def with_server_timeout(self, seconds: float) -> HubConnectionBuilder:
        """Give the connection up after this long without a message (default 30 s)."""
        self._options["server_timeout"] = seconds
        return self

    def with_keep_alive_interval(self, seconds: float) -> HubConnectionBuilder:
        """Ping the server after this long without sending (default 15 s)."""
        self._options["keep_alive_interval"] = seconds
        return self

    def build(self) -> HubConnection:
        """The ``HubConnection`` (not started). Raises ``ValueError`` without ``with_url``."""
        if self._url is None:
            raise ValueError("HubConnectionBuilder.with_url() must be called before build()")
        return HubConnection(self._url, **self._options)
