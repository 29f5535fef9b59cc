"""The SDK's exceptions.

Two families, as h11 separates the peer's faults from the caller's:

* ``HubException`` is the hub author's way to fail an invocation *with a message the client may
  see*; the SDK also raises it when a client answers a server-to-client invocation with an error.
* ``ServiceError`` and its subclasses say that the service (the relay) could not do what the app
  server asked: no endpoint online, no ack in time, an ack with a failure status.

``NegotiateError`` is the third kind: the *client's* negotiate request is refused (an endpoint
router or a user id provider found it invalid), with the HTTP status to answer.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "NOT_CONNECTED_MESSAGE",
    "AckTimeoutError",
    "HubException",
    "NegotiateError",
    "ServiceError",
    "ServiceUnavailableError",
]

#: §10: the .NET SDK's negotiate error when no endpoint is online.
NOT_CONNECTED_MESSAGE: Final = "Azure SignalR Service is not connected yet, please try again later."


class HubException(Exception):
    """An error whose message is always shown to the client.

    Raise it from a hub method to fail the invocation with a message of your choosing; other
    exceptions become a generic error unless ``ServiceOptions.enable_detailed_errors`` is on::

        class Chat(Hub):
            async def join(self, room: str) -> None:
                if room not in ROOMS:
                    raise HubException(f"no room {room!r}")

    ``clients.client(id).invoke(...)`` raises it with the client's error text when the client
    answers with an error, or when the service reports the invocation failed (client gone).
    """


class ServiceError(Exception):
    """The service could not carry out a request of this app server (base class)."""


class ServiceUnavailableError(ServiceError, ConnectionError):
    """No endpoint is online for the hub, or the server connection that carried a request was
    lost before the answer came back."""


class AckTimeoutError(ServiceError, TimeoutError):
    """A ``...WithAck`` request (group membership, existence check) got no ``Ack`` in time, or
    an ``Ack`` with status Timeout (service-protocol §2.4)."""


class NegotiateError(Exception):
    """A negotiate request refused because of the request itself, not the service.

    Raise it from ``EndpointRouter.get_negotiate_endpoint`` (or a user id provider); the
    negotiate ASGI app answers ``status_code`` with ``{"error": message}``::

        region = request.query_params.get("region")
        if region is None:
            raise NegotiateError("the 'region' query parameter is required", status_code=400)
    """

    def __init__(self, message: str, status_code: int = 400) -> None:
        super().__init__(message)
        if not 400 <= status_code <= 599:
            raise ValueError(
                f"status_code must be an HTTP error status (4xx or 5xx), got {status_code!r}"
            )
        #: The HTTP status the negotiate endpoint answers with.
        self.status_code = status_code
        #: What is wrong with the request, shown to the client.
        self.message = message
