"""Connection strings, hub-name rules and access tokens (service protocol §8, §9, §12.1).

Sans-I/O like the rest of ``relaycore.protocol``: nothing here reads a clock, the environment or
a random source. "Now" is always passed in as a float of epoch seconds, so a test can place a
token at any instant and the relay can use trio's clock.

Three things are easy to get wrong, and every Azure SignalR peer depends on them:

* The HMAC key is the UTF-8 bytes of the AccessKey string **as written**. It looks like base64
  but is never decoded (§9.1); the Emulator validates the same way.
* The audience always uses the ``Endpoint`` host **without** a port and without a path, even
  when ``Port``, ``ClientEndpoint`` or ``ServerEndpoint`` move the connections elsewhere (§8.2).
* ``kid`` carries no meaning: .NET derives it from a per-process randomised hash. A validator
  tries every configured key (primary and secondary) and ignores ``kid`` (§9.1, §9.3).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Final, Literal
from urllib.parse import parse_qsl, urlsplit

import jwt
from jwt.algorithms import HMACAlgorithm
from jwt.utils import base64url_decode

from ._errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "HUB_NAME_PATTERN",
    "ConnectionString",
    "ConnectionStringError",
    "TokenError",
    "TokenValidator",
    "audience_matches",
    "generate_access_token",
    "is_system_claim",
    "is_valid_group_name",
    "is_valid_hub_name",
    "normalize_audience",
    "parse_connection_string",
    "user_id_from_claims",
    "wire_hub_name",
]


# --------------------------------------------------------------------------------------------
# Connection strings (§8.1)
# --------------------------------------------------------------------------------------------

#: §8.1: the SDK for service 1.x accepts ``Version=1.<n>[suffix]``. .NET reads ``[\w-.]`` as a
#: class with a literal ``-``; Python needs it written last.
_VERSION_PATTERN: Final = re.compile(r"1\.\d+(?:[\w.-]+)?")

#: Version written by ``ConnectionString.__str__`` when none was parsed (the only one there is).
_DEFAULT_VERSION: Final = "1.0"

_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


class ConnectionStringError(ValueError):
    """A connection string does not follow the grammar of §8.1.

    The message names the offending key and says what was expected.
    """


@dataclass(frozen=True)
class ConnectionString:
    """A parsed Azure SignalR connection string (§8.1) and the URLs derived from it (§8.2).

    >>> cs = ConnectionString.parse("Endpoint=http://localhost;Port=8888;AccessKey=k;Version=1.0;")
    >>> cs.client_url("chat")
    'http://localhost:8888/client/?hub=chat'
    >>> cs.client_audience("chat")
    'http://localhost/client/?hub=chat'

    ``access_key`` is left out of ``repr()`` so that logging the object does not leak it;
    ``str()`` is the full connection string, key included.
    """

    #: Absolute http(s) URI without a trailing ``/``.
    endpoint: str
    #: The HMAC key, used as UTF-8 bytes. ``None`` only in Entra mode (``AuthType`` given).
    access_key: str | None = field(repr=False)
    version: str | None = None
    #: Overrides the endpoint's port for connections, never for audiences.
    port: int | None = None
    #: Base of the client URL handed out by negotiate (trailing ``/`` trimmed).
    client_endpoint: str | None = None
    #: Base of server WebSocket connections and REST calls (trailing ``/`` trimmed).
    server_endpoint: str | None = None
    #: Microsoft Entra mode (``aad``, ``azure``, ...). relaycore keeps it and otherwise ignores it.
    auth_type: str | None = None

    @classmethod
    def parse(cls, text: str) -> ConnectionString:
        """Parse ``text`` exactly as the Azure SignalR SDK does (§8.1).

        ``;``-separated ``key=value`` pairs; keys are case-insensitive and values trimmed; only
        the first ``=`` splits; segments without ``=`` and unknown keys are ignored. Raises
        :class:`ConnectionStringError` for a duplicate key, fewer than two pairs, a missing or
        non-absolute-http(s) ``Endpoint``, a missing ``AccessKey`` (unless ``AuthType`` is
        given), a bad ``Version`` or a ``Port`` outside 1-65535.
        """
        segments = [s for s in text.split(";") if s.strip()]
        if len(segments) < 2:
            raise ConnectionStringError(
                f"Connection string has {len(segments)} 'key=value' pair(s); expected at least 2 "
                f"separated by ';', such as Endpoint=https://host;AccessKey=<key>;Version=1.0;"
            )
        values: dict[str, str] = {}
        for segment in segments:
            key, sep, value = segment.partition("=")
            if not sep:
                continue
            key = key.strip()
            folded = key.casefold()
            if folded in values:
                raise ConnectionStringError(
                    f"Duplicate key {key!r} in connection string; expected each key once."
                )
            values[folded] = value.strip()

        if "endpoint" not in values:
            raise ConnectionStringError(
                "Connection string has no 'Endpoint'; expected Endpoint=<absolute http(s) URI>."
            )
        endpoint = _check_endpoint("Endpoint", values["endpoint"])

        version = values.get("version")
        if version is not None and not _VERSION_PATTERN.fullmatch(version):
            raise ConnectionStringError(
                f"Version {version!r} is not supported; expected 1.<minor> such as '1.0'."
            )

        port: int | None = None
        if "port" in values:
            raw = values["port"]
            if not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= 65535):
                raise ConnectionStringError(
                    f"Port {raw!r} is invalid; expected an integer from 1 to 65535."
                )
            port = int(raw)

        client_endpoint = values.get("clientendpoint")
        if client_endpoint is not None:
            client_endpoint = _check_endpoint("ClientEndpoint", client_endpoint)
        server_endpoint = values.get("serverendpoint")
        if server_endpoint is not None:
            server_endpoint = _check_endpoint("ServerEndpoint", server_endpoint)

        auth_type = values.get("authtype") or None
        access_key = values.get("accesskey")
        if auth_type is None:
            if access_key is None:
                raise ConnectionStringError(
                    "Connection string has no 'AccessKey'; expected AccessKey=<key> "
                    "(or AuthType=aad for Microsoft Entra mode)."
                )
            if not access_key:
                # The SDK would sign with an empty HMAC key; a relay that accepted such tokens
                # would accept anyone's.
                raise ConnectionStringError("AccessKey is empty; expected the access key string.")

        return cls(
            endpoint=endpoint,
            access_key=access_key or None,
            version=version,
            port=port,
            client_endpoint=client_endpoint,
            server_endpoint=server_endpoint,
            auth_type=auth_type,
        )

    def __str__(self) -> str:
        """The connection string, in the order the Azure portal writes it; parses back equal
        (except that a missing ``Version`` is written as ``1.0``)."""
        parts = [f"Endpoint={self.endpoint}"]
        if self.access_key is not None:
            parts.append(f"AccessKey={self.access_key}")
        parts.append(f"Version={self.version or _DEFAULT_VERSION}")
        if self.port is not None:
            parts.append(f"Port={self.port}")
        if self.client_endpoint is not None:
            parts.append(f"ClientEndpoint={self.client_endpoint}")
        if self.server_endpoint is not None:
            parts.append(f"ServerEndpoint={self.server_endpoint}")
        if self.auth_type is not None:
            parts.append(f"AuthType={self.auth_type}")
        return "".join(f"{part};" for part in parts)

    @property
    def audience_base(self) -> str:
        """``{scheme}://{host}/`` of ``Endpoint``: lowercase, no port, no path (§8.2)."""
        parts = urlsplit(self.endpoint)
        return f"{parts.scheme.lower()}://{_url_host(parts.hostname or '')}/"

    @property
    def connection_base(self) -> str:
        """``Endpoint`` with ``Port`` applied, ending in ``/``: where connections go (§3.1)."""
        if self.port is None:
            return f"{self.endpoint}/"
        parts = urlsplit(self.endpoint)
        scheme = parts.scheme.lower()
        host = _url_host(parts.hostname or "")
        # As .NET's Uri prints it: the default port of the scheme is not written.
        netloc = host if _DEFAULT_PORTS.get(scheme) == self.port else f"{host}:{self.port}"
        return f"{scheme}://{netloc}{parts.path}/"

    @property
    def client_base(self) -> str:
        """``ClientEndpoint`` (or :attr:`connection_base`), ending in ``/``."""
        if self.client_endpoint is None:
            return self.connection_base
        return f"{self.client_endpoint}/"

    @property
    def server_base(self) -> str:
        """``ServerEndpoint`` (or :attr:`connection_base`), ending in ``/``."""
        if self.server_endpoint is None:
            return self.connection_base
        return f"{self.server_endpoint}/"

    def client_url(self, hub: str) -> str:
        """The client URL negotiate hands out, before any ``asrs.op``/query suffix (§8.2)."""
        return f"{self.client_base}client/?hub={hub}"

    def client_audience(self, hub: str) -> str:
        """``aud`` of a client token for ``hub`` (the wire hub name, §8.2)."""
        return f"{self.audience_base}client/?hub={hub}"

    def server_audience(self, hub: str) -> str:
        """``aud`` of a server-connection token for ``hub`` (the wire hub name, §3.2)."""
        return f"{self.audience_base}server/?hub={hub}"


def parse_connection_string(text: str) -> ConnectionString:
    """Same as :meth:`ConnectionString.parse`."""
    return ConnectionString.parse(text)


def _check_endpoint(key: str, value: str) -> str:
    """Return ``value`` without trailing ``/`` if it is an absolute http(s) URI with a host."""
    trimmed = value.rstrip("/")
    expected = "expected an absolute http:// or https:// URI such as https://host.example"
    try:
        parts = urlsplit(trimmed)
        parts.port  # noqa: B018 -- raises ValueError for a port out of range or not a number
    except ValueError:
        raise ConnectionStringError(f"{key} {value!r} is not a valid URI; {expected}.") from None
    if not parts.scheme or not parts.netloc:
        raise ConnectionStringError(f"{key} {value!r} is not an absolute URI; {expected}.")
    if parts.scheme.lower() not in _DEFAULT_PORTS:
        raise ConnectionStringError(f"{key} {value!r} has scheme {parts.scheme!r}; {expected}.")
    if not parts.hostname or any(c.isspace() for c in trimmed):
        raise ConnectionStringError(f"{key} {value!r} has no valid host; {expected}.")
    if parts.query or parts.fragment or "?" in trimmed or "#" in trimmed:
        # Every URL is built by appending "client/?hub=..." to the base.
        raise ConnectionStringError(
            f"{key} {value!r} has a query or fragment; {expected}, without '?' or '#'."
        )
    return trimmed


def _url_host(hostname: str) -> str:
    """``urlsplit`` strips the brackets of an IPv6 literal; put them back."""
    return f"[{hostname}]" if ":" in hostname else hostname


# --------------------------------------------------------------------------------------------
# Hub, application and group names (§3.1, §8.2, §12.1)
# --------------------------------------------------------------------------------------------

#: §12.1: hub and application names. ``\Z`` rather than ``$``, which would accept a final "\n".
HUB_NAME_PATTERN: Final = re.compile(r"^[A-Za-z][A-Za-z0-9_`,.[\]]{0,127}\Z")

#: §12.1: a group name is 1-1024 characters and not only whitespace.
_MAX_GROUP_NAME_LENGTH: Final = 1024


def is_valid_hub_name(name: str) -> bool:
    """Whether ``name`` is a valid hub or application name (§12.1).

    >>> is_valid_hub_name("Chat"), is_valid_hub_name("1chat"), is_valid_hub_name("a/b")
    (True, False, False)
    """
    return HUB_NAME_PATTERN.match(name) is not None


def is_valid_application_name(name: str) -> bool:
    """Whether ``name`` is a valid application name: a hub name without ``_``, which joins
    application and hub on the wire (with one, ``x_c`` + ``hat`` and ``x`` + ``c_hat`` would
    both be hub ``x_c_hat``: one hub for two applications).

    >>> is_valid_application_name("Shop"), is_valid_application_name("my_shop")
    (True, False)
    """
    return is_valid_hub_name(name) and "_" not in name


def wire_hub_name(hub: str, application: str | None = None) -> str:
    """The hub name used on the wire and in audiences: lowercase ``{app}_{hub}`` or ``{hub}``.

    An empty ``application`` means none, as in the SDK. Raises :class:`ValueError` naming
    whichever of ``hub`` and ``application`` is invalid.

    >>> wire_hub_name("Chat", "MyApp")
    'myapp_chat'
    """
    if not is_valid_hub_name(hub):
        raise ValueError(f"hub {hub!r} is invalid; expected {HUB_NAME_PATTERN.pattern}")
    if not application:
        return hub.lower()
    if not is_valid_application_name(application):
        raise ValueError(
            f"application {application!r} is invalid; expected {HUB_NAME_PATTERN.pattern} "
            "without '_' (it separates the application from the hub on the wire)"
        )
    return f"{application.lower()}_{hub.lower()}"


def is_valid_group_name(name: str) -> bool:
    """Whether ``name`` is a valid group name: 1-1024 characters, not only whitespace (§12.1)."""
    return 0 < len(name) <= _MAX_GROUP_NAME_LENGTH and not name.isspace()


# --------------------------------------------------------------------------------------------
# Access tokens (§9)
# --------------------------------------------------------------------------------------------

#: §9.1: the SDK signs with HS256 by default, HS512 optionally. Nothing else is accepted.
_HMAC_ALGORITHMS: Final[Mapping[str, HMACAlgorithm]] = {
    "HS256": HMACAlgorithm(HMACAlgorithm.SHA256),
    "HS512": HMACAlgorithm(HMACAlgorithm.SHA512),
}

#: §6.2, §9.2: claims that describe the token, not its user (see ``is_system_claim``).
_SYSTEM_CLAIMS: Final = frozenset(
    {"aud", "exp", "iat", "nbf", "iss", "actort", "acr", "azp", "c_hash", "jti", "nonce"}
)

#: §9.2: the user id the app server's user id provider returned.
USER_ID_CLAIM: Final = "asrs.s.uid"
#: §9.1: NameIdentifier after .NET's outbound claim-type map.
NAME_ID_CLAIM: Final = "nameid"

# PyJWT >= 2.10 warns when an HMAC key is shorter than the digest (32 bytes for HS256). Access
# keys are whatever the user configured (Azure's are 44 characters, dev keys are often short),
# so the warning is noise here. Older PyJWT has no such warning.
_KEY_LENGTH_WARNING: Final[type[Warning]] = getattr(
    jwt, "InsecureKeyLengthWarning", DeprecationWarning
)
_ENCODER: Final = jwt.PyJWT(options={"enforce_minimum_key_length": False})

#: A JWT segment: base64url without padding (RFC 7515 §2); tolerate padding some encoders add.
_SEGMENT: Final = re.compile(rb"[A-Za-z0-9_-]*={0,2}")


def _key_id(key: bytes) -> str:
    # Only a label: validators ignore kid (§9.1). A short fingerprint lets an operator with a
    # primary and a secondary key tell which one signed; the signature itself already allows
    # the same offline guessing, so it reveals nothing more.
    return hashlib.sha256(key).hexdigest()[:16]


def generate_access_token(
    access_key: str,
    audience: str,
    *,
    now: float,
    lifetime: float = 3600.0,
    user_id: str | None = None,
    claims: Mapping[str, Any] | None = None,
    algorithm: str = "HS256",
) -> str:
    """Sign a token as the Azure SignalR SDK does (§9.1).

    The key is the UTF-8 bytes of ``access_key`` (never base64-decoded). The payload is
    ``nbf`` = ``iat`` = ``int(now)``, ``exp`` = ``int(now + lifetime)``, ``aud``, then
    ``asrs.s.uid`` (when ``user_id`` is given), then ``claims``, then ``nameid`` = ``user_id``
    unless ``claims`` set ``nameid``. A claim named like a reserved JWT claim (``exp``,
    ``aud``, ...) is renamed ``asrs.u.<name>``, as the SDK does (§9.2).

    >>> token = generate_access_token("key", "http://localhost/client/?hub=chat", now=0)
    >>> TokenValidator(["key"]).validate(
    ...     token, audiences=["http://localhost/client/?hub=chat"], now=10)["exp"]
    3600
    """
    hmac_algorithm = _HMAC_ALGORITHMS.get(algorithm)
    if hmac_algorithm is None:
        raise LocalProtocolError(
            f"Cannot sign with algorithm {algorithm!r}; expected one of {sorted(_HMAC_ALGORITHMS)}."
        )
    if not access_key:
        raise LocalProtocolError("Cannot sign with an empty access key; expected the AccessKey.")
    key = access_key.encode("utf-8")
    payload: dict[str, Any] = {
        "nbf": int(now),
        "exp": int(now + lifetime),
        "iat": int(now),
        "aud": audience,
    }
    if user_id is not None:
        payload[USER_ID_CLAIM] = user_id
    for name, value in (claims or {}).items():
        payload[f"asrs.u.{name}" if is_system_claim(name) else name] = value
    if user_id is not None:
        payload.setdefault(NAME_ID_CLAIM, user_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", _KEY_LENGTH_WARNING)
        return _ENCODER.encode(
            payload, key, algorithm=algorithm, headers={"kid": _key_id(key), "typ": "JWT"}
        )


TokenErrorReason = Literal[
    "missing", "malformed", "expired", "bad_signature", "wrong_audience", "not_yet_valid"
]

_DEFAULT_TOKEN_MESSAGES: Final[Mapping[str, str]] = {
    "missing": "No access token was given; expected a JWT "
    "(Authorization: Bearer <token>, or the access_token query parameter).",
    "malformed": "The access token is malformed; expected a JWT signed with HS256 or HS512.",
    "expired": "The access token has expired.",
    "bad_signature": "The access token's signature does not match any configured access key.",
    "wrong_audience": "The access token was issued for another audience.",
    "not_yet_valid": "The access token is not valid yet.",
}


class TokenError(RemoteProtocolError):
    """An access token was refused (the caller answers HTTP 401).

    ``str(err)`` is a sentence for humans; :attr:`reason` is for machines, one of
    ``"missing"``, ``"malformed"``, ``"expired"``, ``"bad_signature"``, ``"wrong_audience"``,
    ``"not_yet_valid"``. Messages never contain the token or a key.
    """

    reason: TokenErrorReason

    def __init__(self, reason: TokenErrorReason, message: str | None = None) -> None:
        if reason not in _DEFAULT_TOKEN_MESSAGES:
            raise ValueError(
                f"unknown TokenError reason {reason!r}; expected one of "
                f"{sorted(_DEFAULT_TOKEN_MESSAGES)}"
            )
        super().__init__(message or _DEFAULT_TOKEN_MESSAGES[reason])
        self.reason = reason


def _malformed(why: str) -> TokenError:
    return TokenError(
        "malformed",
        f"The access token is malformed: {why}; expected a JWT signed with HS256 or HS512.",
    )


def _utc(timestamp: float) -> str:
    try:
        return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return repr(timestamp)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_object(segment: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(base64url_decode(segment), parse_constant=_reject_constant)
    except (ValueError, TypeError):  # binascii.Error, UnicodeDecodeError are ValueErrors
        raise _malformed(f"its {what} is not base64url-encoded JSON") from None
    except RecursionError:  # json recurses once per level of nesting
        raise _malformed(f"its {what} nests JSON values too deeply") from None
    if not isinstance(value, dict):
        raise _malformed(f"its {what} is not a JSON object")
    return value


def _number(value: Any) -> float | None:
    """``value`` as a finite number of seconds, or None (``True`` is not a number here)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, int) or math.isfinite(value):
            return value
    return None


class TokenValidator:
    """Validates access tokens as recommended for a replacement service (§9.3).

    Every configured key (primary, secondary, ...) is tried; ``kid`` is ignored. HS256 and
    HS512 are accepted, anything else (``none`` included) is refused. ``exp`` is required and
    checked with ``clock_skew``; ``iat`` is ignored, and ``nbf`` only refused when it lies more
    than ``clock_skew`` in the future. ``aud`` is compared leniently (:func:`audience_matches`).

    >>> validator = TokenValidator(["primary-key", "secondary-key"])
    >>> token = generate_access_token("secondary-key", "https://h/server/?hub=chat", now=0)
    >>> validator.validate(token, audiences=["https://H:443/server?hub=chat"], now=0)["aud"]
    'https://h/server/?hub=chat'
    """

    def __init__(self, access_keys: Sequence[str], *, clock_skew: float = 300.0) -> None:
        if isinstance(access_keys, str):
            raise TypeError("access_keys is a single string; expected a sequence of keys")
        keys = tuple(access_keys)
        if not keys or not all(keys):
            raise ValueError("expected at least one access key, and no empty key")
        if clock_skew < 0:
            raise ValueError(f"clock_skew {clock_skew!r} is negative; expected seconds >= 0")
        self._keys = tuple(key.encode("utf-8") for key in keys)
        self.clock_skew = clock_skew

    def validate(
        self,
        token: str | None,
        *,
        audiences: Iterable[str],
        now: float,
        query_optional: bool = False,
    ) -> dict[str, Any]:
        """Return the claims of ``token`` or raise :class:`TokenError`.

        ``audiences`` are the acceptable ``aud`` values; ``query_optional`` is for REST calls
        (see :func:`audience_matches`). Checks run in this order, so that the reason names the
        first thing wrong: missing, malformed, bad_signature, expired, not_yet_valid,
        wrong_audience.
        """
        if not token:
            raise TokenError("missing")
        try:
            raw = token.encode("ascii")
        except (UnicodeEncodeError, AttributeError):
            raise _malformed("it is not an ASCII string") from None
        segments = raw.split(b".")
        if len(segments) != 3:
            raise _malformed(f"it has {len(segments)} dot-separated parts instead of 3")
        if not all(_SEGMENT.fullmatch(segment) for segment in segments):
            raise _malformed("it contains characters outside base64url")
        header = _json_object(segments[0], "header")
        claims = _json_object(segments[1], "payload")

        alg = header.get("alg")
        hmac_algorithm = _HMAC_ALGORITHMS.get(alg) if isinstance(alg, str) else None
        if hmac_algorithm is None:
            raise _malformed(f"its algorithm {alg!r} is not accepted")
        if "crit" in header:
            raise _malformed("it has critical header extensions, which are not supported")
        exp = _number(claims.get("exp"))
        if exp is None:
            raise _malformed("its 'exp' claim is missing or not a number")
        try:
            signature = base64url_decode(segments[2])
        except ValueError:
            raise _malformed("its signature is not base64url") from None

        signing_input = segments[0] + b"." + segments[1]
        if not any(hmac_algorithm.verify(signing_input, key, signature) for key in self._keys):
            raise TokenError(
                "bad_signature",
                f"The access token's signature ({alg}) does not match any of the "
                f"{len(self._keys)} configured access key(s); expected a token signed with "
                f"the UTF-8 bytes of the AccessKey.",
            )

        if exp < now - self.clock_skew:
            raise TokenError(
                "expired",
                f"The access token has expired (exp {_utc(exp)}, now {_utc(now)}, "
                f"clock skew {self.clock_skew:g} s).",
            )
        nbf = _number(claims.get("nbf"))
        if nbf is not None and nbf > now + self.clock_skew:
            raise TokenError(
                "not_yet_valid",
                f"The access token is not valid yet (nbf {_utc(nbf)}, now {_utc(now)}, "
                f"clock skew {self.clock_skew:g} s).",
            )

        candidates = list(audiences)
        aud = claims.get("aud")
        if not audience_matches(aud, candidates, query_optional=query_optional):
            raise TokenError(
                "wrong_audience",
                f"The access token's audience {aud!r} does not match any of {candidates!r}.",
            )
        return claims


# --------------------------------------------------------------------------------------------
# Audiences (§9.3)
# --------------------------------------------------------------------------------------------


#: The REST paths whose hub segment names a hub (compared in any case, as hub names are); what
#: follows it names users, groups and connections, which are compared exactly.
_HUB_PATH = re.compile(r"(/api(?:/v1)?/hubs/[^/]*)(.*)", re.IGNORECASE | re.DOTALL)
#: Query parameters whose values are compared in any case (hub and application names).
_FOLDED_QUERY_VALUES = frozenset({"hub", "application"})


def normalize_audience(url: str) -> str:
    """``url`` for comparison: scheme, host, hub and application names lowercased, any port
    and a trailing ``/`` of the path dropped, the query kept. User ids, group names and
    connection ids in a REST path or query keep their case: a token for ``users/alice`` is
    not one for ``users/ALICE``.

    >>> normalize_audience("HTTPS://Host.Example:443/client/?hub=Chat")
    'https://host.example/client?hub=chat'
    >>> normalize_audience("https://h/api/hubs/Chat/users/Alice/:send")
    'https://h/api/hubs/chat/users/Alice/:send'
    """
    url = url.strip()
    url, _, _fragment = url.partition("#")
    url, sep, query = url.partition("?")
    scheme, colon_slashes, rest = url.partition("://")
    if colon_slashes:
        authority, slash, path = rest.partition("/")
        host = authority.rpartition("@")[2].lower()
        if not host.endswith("]"):  # an IPv6 literal is all colons, its port follows the "]"
            name, colon, port = host.rpartition(":")
            if colon and (port.isdigit() or not port):
                host = name
        url = f"{scheme.lower()}://{host}{_fold_path(slash + path)}"
    else:
        url = _fold_path(url)
    return f"{url.rstrip('/')}{sep}{_fold_query(query.rstrip('/'))}"


def _fold_path(path: str) -> str:
    hub_path = _HUB_PATH.match(path)
    if hub_path is None:
        return path.lower()  # /client, /server and the relay's own routes: fixed words
    return hub_path[1].lower() + hub_path[2]


def _fold_query(query: str) -> str:
    folded = []
    for pair in query.split("&") if query else ():
        key, eq, value = pair.partition("=")
        key = key.lower()
        folded.append(f"{key}{eq}{value.lower() if key in _FOLDED_QUERY_VALUES else value}")
    return "&".join(folded)


def _audience_key(url: str) -> tuple[str, list[tuple[str, str]]]:
    """The normalized path, and the query as sorted decoded pairs."""
    path, _, query = normalize_audience(url).partition("?")
    return path, sorted(parse_qsl(query, keep_blank_values=True))


def audience_matches(aud: Any, candidates: Iterable[str], *, query_optional: bool = False) -> bool:
    """Whether a token's ``aud`` matches any of ``candidates``, leniently (§9.3).

    Both sides are compared after :func:`normalize_audience`, with the query compared as a set
    of decoded parameters. ``aud`` may be a list: any element may match. With
    ``query_optional`` (REST: the SDK signs ``...?api-version=...&application=...``, the docs
    sign without a query) a side without a query matches the other side's path alone.

    >>> audience_matches(["https://h/client/?hub=a", "https://h/client/?hub=b"],
    ...                  ["https://h:443/client?hub=b"])
    True
    """
    if isinstance(aud, str):
        auds = [aud]
    elif isinstance(aud, list):
        auds = [a for a in aud if isinstance(a, str)]
    else:
        return False
    aud_keys = [_audience_key(a) for a in auds]
    for candidate in candidates:
        path, query = _audience_key(candidate)
        for aud_path, aud_query in aud_keys:
            if aud_path != path:
                continue
            if aud_query == query or (query_optional and (not aud_query or not query)):
                return True
    return False


def is_system_claim(name: str) -> bool:
    """Whether a token claim describes the token (its audience, lifetime, issuer, the
    validator's bookkeeping) rather than its user.

    The one rule for all three places that need it (§6.2, §9.2): the service strips these
    claims before passing a client's claims to the app server in OpenConnection; the SDK
    drops them from the claims a hub sees (with the ``asrs.*`` ones, which are the service's);
    and a signer renames a user claim of such a name ``asrs.u.<name>``, so that it can
    neither override the token's own lifetime or audience nor be stripped on the way.

    >>> is_system_claim("exp"), is_system_claim("role")
    (True, False)
    """
    return name in _SYSTEM_CLAIMS


def user_id_from_claims(claims: Mapping[str, Any]) -> str | None:
    """The user id of a validated token: ``asrs.s.uid``, else ``nameid``, else None (§9.2, §9.3).

    A claim written as a JSON array (a repeated claim type, §9.1) gives its first element.
    """
    for name in (USER_ID_CLAIM, NAME_ID_CLAIM):
        value = claims.get(name)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, str) and value:
            return value
    return None
