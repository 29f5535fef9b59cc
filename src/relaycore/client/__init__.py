"""A SignalR hub client on anyio (asyncio, uvloop or trio): the Python peer of
``@microsoft/signalr``.

It connects to the relay, to an app server (following its negotiate redirect to the relay, as
Azure SignalR clients do), or to any ASP.NET Core SignalR server::

    from relaycore.client import HubConnectionBuilder

    connection = (
        HubConnectionBuilder()
        .with_url("http://127.0.0.1:8000/hubs/chat")
        .with_hub_protocol("messagepack")
        .with_automatic_reconnect()
        .build()
    )
    connection.on("newMessage", lambda user, text: print(user, "says", text))
    async with connection:
        print(await connection.invoke("SendMessage", "hello"))

What it speaks: negotiate (versions 0 and 1, redirects with ``url`` and ``accessToken``,
``skip_negotiation``), WebSockets, Server-Sent Events and long polling (with the JS client's
fallback from one to the next), the JSON and MessagePack hub protocols, invocations (``send``,
``invoke``), server-to-client streams (``stream``), client-to-server streams (an
async-iterable argument), client results (a handler's return value), keep-alive pings, the
server timeout, automatic reconnect, and stateful reconnect (``with_stateful_reconnect``).
See ``docs/client.md``.
"""

from ._builder import HubConnectionBuilder
from ._calls import HubStream
from ._connection import HubConnection, HubConnectionState
from ._errors import (
    HandshakeError,
    HubConnectionError,
    HubException,
    NegotiateError,
    ServerClosedError,
    ServerTimeoutError,
    TransportError,
)
from ._retry import DEFAULT_RECONNECT_DELAYS, RetryContext, RetryPolicy

__all__ = [
    "DEFAULT_RECONNECT_DELAYS",
    "HandshakeError",
    "HubConnection",
    "HubConnectionBuilder",
    "HubConnectionError",
    "HubConnectionState",
    "HubException",
    "HubStream",
    "NegotiateError",
    "RetryContext",
    "RetryPolicy",
    "ServerClosedError",
    "ServerTimeoutError",
    "TransportError",
]
