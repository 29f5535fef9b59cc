"""The app server SDK, on anyio (asyncio, uvloop or trio): hubs served through the relay.

An app server maps its hubs on a ``HubServer``, which keeps persistent server connections to
every relay endpoint (the Azure SignalR service protocol). Clients negotiate with the app
server, are redirected to the relay, and their invocations come back to a hub method here;
anything a hub sends reaches its clients through the relay, whichever pod they connected to::

    from relaycore.sdk import Hub, HubServer, ServiceOptions

    class Chat(Hub):
        async def send_message(self, text: str) -> None:
            await self.clients.all.send("newMessage", self.context.user_id, text)

    server = HubServer(ServiceOptions.from_env())   # Azure__SignalR__ConnectionString=...
    server.map_hub("chat", Chat)
    async with server:
        ...                                           # serve server.asgi() for negotiate

Several endpoints (regions), primary or secondary, are configured in code
(``ServiceOptions(endpoints=[ServiceEndpoint(...), ...])``), from the environment or from a
watched JSON/TOML file (``ServiceOptions.from_file``); an ``EndpointRouter`` subclass changes
where clients and messages go. See ``docs/endpoints.md``.

An app without server connections (serverless) uses a ``ServiceManager`` instead: negotiate,
sends, groups, existence checks and closing connections, over REST calls (TRANSIENT) or Weak
server connections (PERSISTENT); its clients' events reach it as upstream webhooks
(``relaycore.sdk.upstream``). See ``docs/serverless.md``.
"""

from ._asgi import NegotiateApp, UserIdProvider, default_user_id_provider
from ._endpoints import (
    EndpointEvents,
    EndpointMetrics,
    EndpointStatusEvent,
    EndpointType,
    HubServiceEndpoint,
    ServiceEndpoint,
)
from ._errors import (
    AckTimeoutError,
    HubException,
    NegotiateError,
    ServiceError,
    ServiceUnavailableError,
)
from ._hub import (
    ClientProxy,
    GroupManager,
    Hub,
    HubCallerClients,
    HubCallerContext,
    HubClients,
    HubContext,
    SingleClientProxy,
    UserGroupManager,
    hub_method,
)
from ._manager import (
    ClientManager,
    EndpointNegotiation,
    NegotiationResponse,
    ServiceClientProxy,
    ServiceHubClients,
    ServiceHubContext,
    ServiceManager,
    TransportType,
)
from ._options import ServiceOptions, default_retry_delay
from ._restclient import (
    RetryOptions,
    ServiceInvalidArgumentError,
    ServiceNotFoundError,
    ServiceRequestError,
    ServiceRuntimeError,
    ServiceUnauthorizedError,
)
from ._router import EndpointRouter, NegotiateRequest
from ._server import HubServer

__all__ = [
    "AckTimeoutError",
    "ClientManager",
    "ClientProxy",
    "EndpointEvents",
    "EndpointMetrics",
    "EndpointNegotiation",
    "EndpointRouter",
    "EndpointStatusEvent",
    "EndpointType",
    "GroupManager",
    "Hub",
    "HubCallerClients",
    "HubCallerContext",
    "HubClients",
    "HubContext",
    "HubException",
    "HubServer",
    "HubServiceEndpoint",
    "NegotiateApp",
    "NegotiateError",
    "NegotiateRequest",
    "NegotiationResponse",
    "RetryOptions",
    "ServiceClientProxy",
    "ServiceEndpoint",
    "ServiceError",
    "ServiceHubClients",
    "ServiceHubContext",
    "ServiceInvalidArgumentError",
    "ServiceManager",
    "ServiceNotFoundError",
    "ServiceOptions",
    "ServiceRequestError",
    "ServiceRuntimeError",
    "ServiceUnauthorizedError",
    "ServiceUnavailableError",
    "SingleClientProxy",
    "TransportType",
    "UserGroupManager",
    "UserIdProvider",
    "default_retry_delay",
    "default_user_id_provider",
    "hub_method",
]
