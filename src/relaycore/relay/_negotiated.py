"""Negotiated connection tokens that any node of a cluster, or any worker, accepts.

A client negotiates on one node (or worker) and opens its transport with the token it got,
over a new TCP connection that a load balancer or ``SO_REUSEPORT`` may hand to another node.
So the token carries what the transport needs, signed: the connection id, the hub, the user
that negotiated, when it expires, and which node issued it::

    base64url(JSON {"c": id, "h": hub, "u": user, "e": expiry, "i": issuer}) "." base64url(MAC)

The MAC is an HMAC-SHA256 under a key derived from the relay's first access key (every node of
a cluster shares its access keys, which already sign the clients' tokens); any of the access
keys is accepted, so a key rotation does not strand negotiated clients. The token is as
unguessable as the random part and the MAC.

The node that accepts the transport holds the connection, under the id negotiate gave the
client (which names the node that negotiated: the others find the holder in their presence
directory). The node that issued the token also keeps it, as one node always did: there it is
spent by its first use and forgotten at ``expire`` (a monotonic clock). Another node checks
the signature and the wall-clock expiry, and remembers what it has seen until it expires, so
a token serves one transport per node at most (a client that used it twice would hold two
connections of one id: only its own sends would be confused). Tokens of negotiate version 0 are the
connection id itself, and are served by the issuing node only.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Sequence

import orjson

from ._http import HttpError

#: What the access key is mixed with, so that a token's MAC is no other signature's.
_PURPOSE = b"relaycore negotiated connection token v1"


@dataclasses.dataclass
class Negotiated:
    """What a connection token stands for."""

    connection_id: str
    hub: str
    #: when it expires, on the clock the issuing node keeps it by
    expires: float
    #: who negotiated: only that user may use the token
    user_id: str | None = None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class NegotiatedTokens:
    """The tokens one node issues and accepts (see the module's docstring)."""

    def __init__(self, access_keys: Sequence[str], clock: Callable[[], float],
                 wall_clock: Callable[[], float] = time.time) -> None:
        self._keys = [hmac.new(key.encode(), _PURPOSE, hashlib.sha256).digest()
                      for key in access_keys]
        self._clock = clock
        self._wall_clock = wall_clock
        #: names this node (this process) as a token's issuer
        self._issuer = secrets.token_urlsafe(6)
        #: tokens issued here and not yet used, by token
        self._pending: dict[str, Negotiated] = {}
        #: the connection ids of other nodes' tokens used here, with their wall-clock expiry
        self._seen: dict[str, float] = {}

    def issue(self, connection_id: str, hub: str, user_id: str | None, timeout: float,
              signed: bool) -> str:
        """A token for ``connection_id``: signed (negotiate version 1), or the connection id
        itself (version 0)."""
        if signed:
            payload = _b64(orjson.dumps({"c": connection_id, "h": hub, "u": user_id,
                                         "e": int(self._wall_clock() + timeout) + 1,
                                         "i": self._issuer}))
            token = f"{payload}.{_b64(self._mac(self._keys[0], payload))}"
        else:
            token = connection_id
        self._pending[token] = Negotiated(connection_id, hub, self._clock() + timeout, user_id)
        return token

    def take(self, token: str, hub: str, user_id: str | None) -> str:
        """The connection id ``token`` stands for; the token is spent. Only the user that
        negotiated may use it, on the same hub."""
        pending = self._pending.get(token)
        if pending is None:
            pending = self._foreign(token)
        elif pending.hub != hub:
            del self._pending[token]
        if pending is None or pending.hub != hub:
            raise HttpError(404, "unknown or expired connection id; negotiate again")
        if pending.user_id != user_id:
            raise HttpError(403, "the connection id was negotiated by another user")
        if self._pending.pop(token, None) is None:
            self._seen[pending.connection_id] = pending.expires
        return pending.connection_id

    def expire(self, now: float) -> None:
        """Forget tokens that were not used in time (``now`` on the node's clock)."""
        if self._pending:
            for token in [t for t, p in self._pending.items() if p.expires < now]:
                del self._pending[token]
        if self._seen:
            wall = self._wall_clock()
            for connection_id in [c for c, expires in self._seen.items() if expires < wall]:
                del self._seen[connection_id]

    def _foreign(self, token: str) -> Negotiated | None:
        """What a token another node issued stands for, if it is genuine, unexpired and not
        seen here before; None otherwise."""
        payload, dot, mac = token.partition(".")
        if not dot or len(token) > 4096:
            return None
        try:
            given = _unb64(mac)
            fields = orjson.loads(_unb64(payload))
        except (ValueError, binascii.Error, orjson.JSONDecodeError):
            return None
        if not any(hmac.compare_digest(given, self._mac(key, payload)) for key in self._keys):
            return None
        try:
            connection_id, hub, user_id = fields["c"], fields["h"], fields["u"]
            expires, issuer = float(fields["e"]), fields["i"]
        except (KeyError, TypeError, ValueError):
            return None
        if not isinstance(connection_id, str):
            return None
        if (issuer == self._issuer or expires < self._wall_clock()
                or connection_id in self._seen):
            return None  # this node's own token, spent or forgotten; or late; or replayed
        return Negotiated(connection_id, hub, expires, user_id)

    @staticmethod
    def _mac(key: bytes, payload: str) -> bytes:
        return hmac.new(key, payload.encode(), hashlib.sha256).digest()[:18]
