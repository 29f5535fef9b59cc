"""The SDK's exceptions.

Two families, as h11 separates the peer's faults from the caller's:

* ``HubException`` is the hub author's way to fail an invocation *with a message the client may
  see*; the SDK also raises it when a client answers a server-to-client invocation with an error.
* ``ServiceError`` and its subclasses say that the service (the relay) could not do what the app
  server asked: no endpoint online, no ack in time, an ack with a failure status.
"""

from __future__ import annotations

__all__ = ["AckTimeoutError", "HubException", "ServiceError", "ServiceUnavailableError"]


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
