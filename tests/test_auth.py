"""Connection strings, hub names and access tokens (service protocol §8, §9, §12.1).

Tokens that must be refused are built by hand here with ``hmac``, independently of PyJWT, so
that the validator is checked against the wire format and not against its own encoder.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest

from relaycore.protocol._auth import (
    ConnectionString,
    ConnectionStringError,
    TokenError,
    TokenValidator,
    audience_matches,
    generate_access_token,
    is_valid_group_name,
    is_valid_hub_name,
    normalize_audience,
    parse_connection_string,
    user_id_from_claims,
    wire_hub_name,
)
from relaycore.protocol._errors import LocalProtocolError, RemoteProtocolError

EMULATOR_KEY = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789ABCDEFGH"
EMULATOR = f"Endpoint=http://localhost;Port=8888;AccessKey={EMULATOR_KEY};Version=1.0;"
NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z
AUD = "https://relay.example/client/?hub=chat"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_token(
    payload: dict[str, Any],
    key: bytes = b"key",
    *,
    header: dict[str, Any] | None = None,
    digest: Any = hashlib.sha256,
) -> str:
    """A JWT built without PyJWT."""
    head = b64url(json.dumps(header or {"alg": "HS256", "typ": "JWT"}).encode())
    body = b64url(json.dumps(payload).encode())
    signature = hmac.new(key, f"{head}.{body}".encode(), digest).digest()
    return f"{head}.{body}.{b64url(signature)}"


def claims_at(now: float = NOW, aud: Any = AUD, **extra: Any) -> dict[str, Any]:
    return {"nbf": int(now), "exp": int(now) + 3600, "iat": int(now), "aud": aud, **extra}


def decode_part(token: str, index: int) -> dict[str, Any]:
    part = token.split(".")[index]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))  # type: ignore[no-any-return]


# --------------------------------------------------------------------------------------------
# Connection strings
# --------------------------------------------------------------------------------------------


def test_connection_string_emulator_example_parses_every_field() -> None:
    cs = parse_connection_string(EMULATOR)
    assert cs == ConnectionString(
        endpoint="http://localhost", access_key=EMULATOR_KEY, version="1.0", port=8888
    )


@pytest.mark.parametrize(
    ("text", "field", "expected"),
    [
        ("endpoint=https://a.example;accesskey=k", "endpoint", "https://a.example"),
        ("ENDPOINT=https://a.example/;ACCESSKEY=k", "access_key", "k"),
        ("  Endpoint = https://a.example/// ;  AccessKey =  k  ", "endpoint", "https://a.example"),
        ("Endpoint=https://a.example;AccessKey=k==;", "access_key", "k=="),
        ("Endpoint=https://a.example;AccessKey=a=b=c", "access_key", "a=b=c"),
        ("Endpoint=https://a.example;AccessKey=k;Version=1.0", "version", "1.0"),
        (
            "Endpoint=https://a.example;AccessKey=k;Version=1.12-preview.1",
            "version",
            "1.12-preview.1",
        ),
        ("Endpoint=https://a.example;AccessKey=k;Port=1", "port", 1),
        ("Endpoint=https://a.example;AccessKey=k;Port=65535", "port", 65535),
        (
            "Endpoint=https://a.example;AccessKey=k;clientendpoint=https://c.example/",
            "client_endpoint",
            "https://c.example",
        ),
        (
            "Endpoint=https://a.example;AccessKey=k;ServerEndpoint=http://s:81",
            "server_endpoint",
            "http://s:81",
        ),
        ("Endpoint=https://a.example;AuthType=aad;ClientId=x", "auth_type", "aad"),
        ("Endpoint=https://a.example;AuthType=azure.msi", "access_key", None),
        ("Endpoint=https://a.example;AccessKey=k;Unknown=1;;junk", "version", None),
        ("Endpoint=HTTPS://A.example;AccessKey=k", "endpoint", "HTTPS://A.example"),
        ("Endpoint=https://a.example/prefix/;AccessKey=k", "endpoint", "https://a.example/prefix"),
    ],
)
def test_connection_string_valid_grammar_parses_field(text: str, field: str, expected: Any) -> None:
    assert getattr(ConnectionString.parse(text), field) == expected


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("", "has 0 'key=value' pair(s); expected at least 2"),
        ("Endpoint=https://a.example;", "has 1 'key=value' pair(s); expected at least 2"),
        ("Endpoint=https://a.example;;  ;", "has 1 'key=value' pair(s)"),
        ("Endpoint=https://a.example;AccessKey=k;accesskey=j", "'accesskey'"),
        ("Endpoint=https://a.example;AccessKey=k;ENDPOINT=https://b.example", "'ENDPOINT'"),
        ("AccessKey=k;Version=1.0", "Endpoint"),
        ("Endpoint=ftp://a.example;AccessKey=k", "scheme 'ftp'"),
        ("Endpoint=ws://a.example;AccessKey=k", "scheme 'ws'"),
        ("Endpoint=/relative/path;AccessKey=k", "not an absolute URI"),
        ("Endpoint=a.example;AccessKey=k", "not an absolute URI"),
        ("Endpoint=localhost:8080;AccessKey=k", "not an absolute URI"),
        ("Endpoint=https://;AccessKey=k", "Endpoint"),
        ("Endpoint=https://a.example:99999;AccessKey=k", "Endpoint"),
        ("Endpoint=https://a.example?x=1;AccessKey=k", "query"),
        ("Endpoint=https://a.example;Version=1.0", "AccessKey"),
        ("Endpoint=https://a.example;AccessKey=;Version=1.0", "AccessKey"),
        ("Endpoint=https://a.example;AccessKey=k;Version=2.0", "Version '2.0'"),
        ("Endpoint=https://a.example;AccessKey=k;Version=1", "Version '1'"),
        ("Endpoint=https://a.example;AccessKey=k;Version=1.x", "Version '1.x'"),
        ("Endpoint=https://a.example;AccessKey=k;Version=1.0 beta", "Version"),
        ("Endpoint=https://a.example;AccessKey=k;Port=0", "Port '0'"),
        ("Endpoint=https://a.example;AccessKey=k;Port=65536", "Port '65536'"),
        ("Endpoint=https://a.example;AccessKey=k;Port=abc", "Port 'abc'"),
        ("Endpoint=https://a.example;AccessKey=k;Port=-1", "Port '-1'"),
        ("Endpoint=https://a.example;AccessKey=k;Port=", "Port ''"),
        ("Endpoint=https://a.example;AccessKey=k;ClientEndpoint=c.example", "ClientEndpoint"),
        ("Endpoint=https://a.example;AccessKey=k;ServerEndpoint=tcp://s", "ServerEndpoint"),
    ],
)
def test_connection_string_invalid_grammar_raises_error_naming_key(text: str, named: str) -> None:
    with pytest.raises(ConnectionStringError, match="expected") as info:
        ConnectionString.parse(text)
    assert named in str(info.value)
    assert isinstance(info.value, ValueError)


def test_connection_string_repr_does_not_leak_access_key() -> None:
    cs = ConnectionString.parse(EMULATOR)
    assert EMULATOR_KEY not in repr(cs)
    assert EMULATOR_KEY in str(cs)


@pytest.mark.parametrize(
    "text",
    [
        EMULATOR,
        "Endpoint=https://a.example;AccessKey=k;Version=1.0;",
        "Endpoint=https://a.example/p;AccessKey=k=;Version=1.1;Port=8443;"
        "ClientEndpoint=https://c.example;ServerEndpoint=http://s.example:81;",
        "Endpoint=https://a.example;Version=1.0;AuthType=aad;",
    ],
)
def test_connection_string_str_round_trips_through_parse(text: str) -> None:
    cs = ConnectionString.parse(text)
    assert ConnectionString.parse(str(cs)) == cs
    assert str(ConnectionString.parse(str(cs))) == str(cs)


def test_connection_string_str_writes_portal_order() -> None:
    assert str(ConnectionString.parse(EMULATOR)) == (
        f"Endpoint=http://localhost;AccessKey={EMULATOR_KEY};Version=1.0;Port=8888;"
    )


def test_connection_string_str_without_version_writes_1_0() -> None:
    cs = ConnectionString(endpoint="https://a.example", access_key="k")
    assert str(cs) == "Endpoint=https://a.example;AccessKey=k;Version=1.0;"
    assert ConnectionString.parse(str(cs)) == dataclasses.replace(cs, version="1.0")


@pytest.mark.parametrize(
    ("text", "audience_base", "connection_base", "client_base", "server_base"),
    [
        (
            EMULATOR,
            "http://localhost/",
            "http://localhost:8888/",
            "http://localhost:8888/",
            "http://localhost:8888/",
        ),
        (
            "Endpoint=https://My.Relay.Example:8443;AccessKey=k",
            "https://my.relay.example/",
            "https://My.Relay.Example:8443/",
            "https://My.Relay.Example:8443/",
            "https://My.Relay.Example:8443/",
        ),
        (
            "Endpoint=https://a.example:8443/prefix;AccessKey=k;Port=9443",
            "https://a.example/",
            "https://a.example:9443/prefix/",
            "https://a.example:9443/prefix/",
            "https://a.example:9443/prefix/",
        ),
        (
            "Endpoint=https://a.example:8443;AccessKey=k;Port=443",
            "https://a.example/",
            "https://a.example/",
            "https://a.example/",
            "https://a.example/",
        ),
        (
            "Endpoint=http://[::1]:80;AccessKey=k;Port=8080",
            "http://[::1]/",
            "http://[::1]:8080/",
            "http://[::1]:8080/",
            "http://[::1]:8080/",
        ),
        (
            "Endpoint=https://a.example;AccessKey=k;Port=8443;"
            "ClientEndpoint=https://c.example/;ServerEndpoint=http://internal:81",
            "https://a.example/",
            "https://a.example:8443/",
            "https://c.example/",
            "http://internal:81/",
        ),
    ],
)
def test_connection_string_bases_apply_port_to_connections_not_audiences(
    text: str, audience_base: str, connection_base: str, client_base: str, server_base: str
) -> None:
    cs = ConnectionString.parse(text)
    assert (cs.audience_base, cs.connection_base, cs.client_base, cs.server_base) == (
        audience_base,
        connection_base,
        client_base,
        server_base,
    )


def test_connection_string_urls_use_client_endpoint_and_audiences_use_endpoint_host() -> None:
    cs = ConnectionString.parse(EMULATOR + "ClientEndpoint=https://public.example")
    assert cs.client_url("myapp_chat") == "https://public.example/client/?hub=myapp_chat"
    assert cs.client_audience("myapp_chat") == "http://localhost/client/?hub=myapp_chat"
    assert cs.server_audience("chat") == "http://localhost/server/?hub=chat"


# --------------------------------------------------------------------------------------------
# Hub, application and group names
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("chat", True),
        ("Chat_Hub", True),
        ("a", True),
        ("a`1,b.c[d]", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("", False),
        ("1chat", False),
        ("_chat", False),
        ("chat-hub", False),
        ("chat hub", False),
        ("chat/hub", False),
        ("chat\n", False),
        ("chät", False),
    ],
)
def test_hub_name_validation_follows_rest_pattern(name: str, valid: bool) -> None:
    assert is_valid_hub_name(name) is valid


@pytest.mark.parametrize(
    ("hub", "application", "wire"),
    [
        ("Chat", None, "chat"),
        ("Chat", "", "chat"),
        ("ChatHub", "MyApp", "myapp_chathub"),
        ("a.b", "X", "x_a.b"),
    ],
)
def test_wire_hub_name_is_lowercase_app_underscore_hub(
    hub: str, application: str | None, wire: str
) -> None:
    assert wire_hub_name(hub, application) == wire


@pytest.mark.parametrize(
    ("hub", "application", "named"),
    [("1chat", None, "hub '1chat'"), ("chat", "my-app", "application 'my-app'")],
)
def test_wire_hub_name_invalid_part_raises_value_error_naming_it(
    hub: str, application: str | None, named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        wire_hub_name(hub, application)


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("g", True),
        (" g ", True),
        ("x" * 1024, True),
        ("x" * 1025, False),
        ("", False),
        (" \t\n", False),
    ],
)
def test_group_name_validation_allows_1_to_1024_chars_not_only_whitespace(
    name: str, valid: bool
) -> None:
    assert is_valid_group_name(name) is valid


# --------------------------------------------------------------------------------------------
# Token generation
# --------------------------------------------------------------------------------------------


def test_generate_access_token_writes_sdk_payload_in_order() -> None:
    token = generate_access_token(
        "key", AUD, now=NOW + 0.9, lifetime=60.5, user_id="alice", claims={"role": ["a", "b"]}
    )
    payload = decode_part(token, 1)
    assert list(payload) == ["nbf", "exp", "iat", "aud", "asrs.s.uid", "role", "nameid"]
    assert payload == {
        "nbf": int(NOW),
        "exp": int(NOW + 61.4),
        "iat": int(NOW),
        "aud": AUD,
        "asrs.s.uid": "alice",
        "role": ["a", "b"],
        "nameid": "alice",
    }
    header = decode_part(token, 0)
    assert header["alg"] == "HS256" and header["typ"] == "JWT" and isinstance(header["kid"], str)


def test_generate_access_token_signs_with_utf8_bytes_of_key() -> None:
    key = "clé-secrète"
    token = generate_access_token(key, AUD, now=NOW)
    head, body, signature = token.split(".")
    expected = hmac.new(key.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    assert signature == b64url(expected)


def test_generate_access_token_renames_reserved_user_claims_and_keeps_explicit_nameid() -> None:
    token = generate_access_token(
        "key", AUD, now=NOW, user_id="alice", claims={"exp": 1, "aud": "x", "nameid": "server"}
    )
    payload = decode_part(token, 1)
    assert payload["exp"] == int(NOW) + 3600 and payload["aud"] == AUD
    assert payload["asrs.u.exp"] == 1 and payload["asrs.u.aud"] == "x"
    assert payload["nameid"] == "server" and payload["asrs.s.uid"] == "alice"


@pytest.mark.parametrize(("algorithm", "key"), [("RS256", "key"), ("none", "key"), ("HS256", "")])
def test_generate_access_token_bad_algorithm_or_empty_key_raises_local_error(
    algorithm: str, key: str
) -> None:
    with pytest.raises(LocalProtocolError, match="expected"):
        generate_access_token(key, AUD, now=NOW, algorithm=algorithm)


# --------------------------------------------------------------------------------------------
# Token validation
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    not hasattr(jwt, "InsecureKeyLengthWarning"), reason="this PyJWT never warns on short keys"
)
def test_pyjwt_warns_on_short_hmac_key_so_the_round_trip_test_can_fail() -> None:
    with pytest.warns(jwt.InsecureKeyLengthWarning):
        jwt.encode({}, "k", algorithm="HS256")


@pytest.mark.parametrize("algorithm", ["HS256", "HS512"])
@pytest.mark.parametrize("key", ["k", EMULATOR_KEY])
def test_token_round_trip_returns_claims_without_warnings(algorithm: str, key: str) -> None:
    # filterwarnings=error turns PyJWT's InsecureKeyLengthWarning into a failure here.
    token = generate_access_token(key, AUD, now=NOW, user_id="u1", algorithm=algorithm)
    claims = TokenValidator([key]).validate(token, audiences=[AUD], now=NOW + 10)
    assert claims["aud"] == AUD and claims["exp"] == int(NOW) + 3600
    assert user_id_from_claims(claims) == "u1"


def test_token_signed_with_secondary_key_validates() -> None:
    token = generate_access_token("secondary", AUD, now=NOW)
    validator = TokenValidator(["primary", "secondary"])
    assert validator.validate(token, audiences=[AUD], now=NOW)["aud"] == AUD


def test_token_kid_is_ignored() -> None:
    header = {"alg": "HS256", "typ": "JWT", "kid": "-1234567"}
    token = hand_token(claims_at(), b"key", header=header)
    assert TokenValidator(["key"]).validate(token, audiences=[AUD], now=NOW)["aud"] == AUD


def test_token_signed_with_base64_decoded_key_does_not_validate() -> None:
    token = hand_token(claims_at(), base64.b64decode(EMULATOR_KEY))
    with pytest.raises(TokenError) as info:
        TokenValidator([EMULATOR_KEY]).validate(token, audiences=[AUD], now=NOW)
    assert info.value.reason == "bad_signature"


def _bad_base64_header() -> str:
    return "!!!." + hand_token(claims_at()).split(".", 1)[1]


@pytest.mark.parametrize(
    ("token", "reason", "says"),
    [
        (None, "missing", "No access token"),
        ("", "missing", "No access token"),
        ("not-a-jwt", "malformed", "3"),
        ("a.b.c.d", "malformed", "3"),
        (_bad_base64_header(), "malformed", "base64url"),
        (b64url(b"{") + "." + b64url(b"{}") + ".", "malformed", "header"),
        (b64url(b"[]") + "." + b64url(b"{}") + ".", "malformed", "header"),
        (b64url(b'{"alg":"HS256"}') + "." + b64url(b"nope") + ".", "malformed", "payload"),
        ("é.é.é", "malformed", "ASCII"),
        (
            hand_token(claims_at(), header={"alg": "none"}).rsplit(".", 1)[0] + ".",
            "malformed",
            "'none'",
        ),
        (hand_token(claims_at(), header={"alg": "RS256"}), "malformed", "'RS256'"),
        (hand_token(claims_at(), header={"typ": "JWT"}), "malformed", "None"),
        (
            hand_token(claims_at(), header={"alg": "HS256", "crit": ["b64"]}),
            "malformed",
            "critical",
        ),
        (hand_token({"aud": AUD}), "malformed", "'exp'"),
        (hand_token(claims_at(exp="soon")), "malformed", "'exp'"),
        (hand_token(claims_at(exp=True)), "malformed", "'exp'"),
        (hand_token(claims_at(), b"other"), "bad_signature", "signature"),
        (hand_token(claims_at(), digest=hashlib.sha512), "bad_signature", "signature"),
        (hand_token(claims_at(NOW - 7200)), "expired", "has expired (exp 2027-01-15T07:00:00Z"),
        (hand_token(claims_at(nbf=NOW + 3000)), "not_yet_valid", "not valid yet"),
        (
            hand_token(claims_at(aud="https://relay.example/server/?hub=chat")),
            "wrong_audience",
            "audience",
        ),
        (hand_token(claims_at(aud=None)), "wrong_audience", "audience"),
        (hand_token(claims_at(aud=42)), "wrong_audience", "audience"),
    ],
)
def test_token_validation_failure_reports_reason(token: str | None, reason: str, says: str) -> None:
    with pytest.raises(TokenError) as info:
        TokenValidator(["key"]).validate(token, audiences=[AUD], now=NOW)
    assert info.value.reason == reason
    assert says in str(info.value)
    assert isinstance(info.value, RemoteProtocolError)


def test_token_alg_none_with_valid_claims_is_rejected() -> None:
    head = b64url(b'{"alg":"none","typ":"JWT"}')
    token = f"{head}.{b64url(json.dumps(claims_at()).encode())}."
    with pytest.raises(TokenError) as info:
        TokenValidator(["key"]).validate(token, audiences=[AUD], now=NOW)
    assert info.value.reason == "malformed"


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        # An unsigned token that is also expired and for another audience: the signature first.
        (hand_token(claims_at(NOW - 7200, aud="x"), b"other"), "bad_signature"),
        # Correctly signed, expired and for another audience: expiry first.
        (hand_token(claims_at(NOW - 7200, aud="x")), "expired"),
    ],
)
def test_token_validation_reports_first_failing_check(token: str, reason: str) -> None:
    with pytest.raises(TokenError) as info:
        TokenValidator(["key"]).validate(token, audiences=[AUD], now=NOW)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("now", "reason"),
    [
        (NOW + 3600, None),
        (NOW + 3600 + 300, None),
        (NOW + 3600 + 300.5, "expired"),
        (NOW + 3600 + 301, "expired"),
        (NOW - 300, None),  # nbf 300 s ahead of our clock: within the skew
        (NOW - 301, "not_yet_valid"),
    ],
)
def test_token_clock_skew_edges(now: float, reason: str | None) -> None:
    token = hand_token(claims_at(NOW))
    validator = TokenValidator(["key"], clock_skew=300)
    if reason is None:
        assert validator.validate(token, audiences=[AUD], now=now)["aud"] == AUD
    else:
        with pytest.raises(TokenError) as info:
            validator.validate(token, audiences=[AUD], now=now)
        assert info.value.reason == reason


def test_token_iat_in_future_is_ignored() -> None:
    token = hand_token(claims_at(iat=int(NOW) + 86400))
    assert TokenValidator(["key"]).validate(token, audiences=[AUD], now=NOW)["aud"] == AUD


@pytest.mark.parametrize(
    ("aud", "candidate"),
    [
        (["https://relay.example/client/?hub=other", AUD], AUD),
        ("HTTPS://Relay.Example/Client/?hub=Chat", AUD),
        ("https://relay.example:443/client/?hub=chat", AUD),
        ("https://relay.example/client?hub=chat", AUD),
        (AUD, "https://relay.example:8443/client?hub=chat/"),
    ],
)
def test_token_audience_is_matched_leniently(aud: Any, candidate: str) -> None:
    token = hand_token(claims_at(aud=aud))
    assert TokenValidator(["key"]).validate(token, audiences=[candidate], now=NOW)["aud"] == aud


def test_token_rest_audience_with_query_validates_only_when_query_optional() -> None:
    signed = "https://relay.example/api/hubs/chat/:send?api-version=2022-06-01"
    request = "https://relay.example/api/hubs/chat/:send"
    token = generate_access_token("key", signed, now=NOW)
    validator = TokenValidator(["key"])
    assert validator.validate(token, audiences=[request], now=NOW, query_optional=True)
    with pytest.raises(TokenError) as info:
        validator.validate(token, audiences=[request], now=NOW)
    assert info.value.reason == "wrong_audience"


@pytest.mark.parametrize(
    ("keys", "error"), [("key", TypeError), ([], ValueError), (["key", ""], ValueError)]
)
def test_token_validator_bad_keys_raise(keys: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        TokenValidator(keys)


def test_token_error_has_default_sentence_and_rejects_unknown_reason() -> None:
    assert str(TokenError("expired")) == "The access token has expired."
    with pytest.raises(ValueError, match="unknown TokenError reason"):
        TokenError("late")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Audiences and user ids
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "normalized"),
    [
        ("HTTPS://Host.Example:443/client/?hub=Chat", "https://host.example/client?hub=chat"),
        ("http://localhost:8888/server/?hub=chat", "http://localhost/server?hub=chat"),
        ("https://h/", "https://h"),
        ("https://h", "https://h"),
        ("https://h/api/v1/hubs/chat/", "https://h/api/v1/hubs/chat"),
        ("https://h/client/?hub=chat/", "https://h/client?hub=chat"),
        ("http://[::1]:8080/client/?hub=a", "http://[::1]/client?hub=a"),
        ("http://[::1]/x", "http://[::1]/x"),
        ("https://user@h:1/x", "https://h/x"),
        (" https://h/x/ ", "https://h/x"),
    ],
)
def test_normalize_audience_lowercases_drops_port_and_trailing_slash(
    url: str, normalized: str
) -> None:
    assert normalize_audience(url) == normalized


@pytest.mark.parametrize(
    ("aud", "candidates", "query_optional", "matches"),
    [
        (AUD, [AUD], False, True),
        (AUD, [], False, False),
        ([], [AUD], False, False),
        (None, [AUD], False, False),
        ([1, AUD], [AUD], False, True),
        ("https://relay.example/client/?hub=chat2", [AUD], False, False),
        ("http://relay.example/client/?hub=chat", [AUD], False, False),
        ("https://other.example/client/?hub=chat", [AUD], False, False),
        ("https://h/api?b=2&a=1", ["https://h/api?a=1&b=2"], False, True),
        ("https://h/api?a=%5B1%5D", ["https://h/api?a=[1]"], False, True),
        ("https://h/api?api-version=2022-06-01", ["https://h/api"], True, True),
        ("https://h/api", ["https://h/api?api-version=2022-06-01"], True, True),
        ("https://h/api?application=x", ["https://h/api?application=y"], True, False),
        ("https://h/api2?a=1", ["https://h/api"], True, False),
    ],
)
def test_audience_matches_table(
    aud: Any, candidates: list[str], query_optional: bool, matches: bool
) -> None:
    assert audience_matches(aud, candidates, query_optional=query_optional) is matches


def test_audience_matches_accepts_one_shot_iterable() -> None:
    assert audience_matches(AUD, iter(["https://x/", AUD]))


@pytest.mark.parametrize(
    ("claims", "user_id"),
    [
        ({"asrs.s.uid": "alice", "nameid": "server_1"}, "alice"),
        ({"nameid": "bob"}, "bob"),
        ({"nameid": ["carol", "dave"]}, "carol"),
        ({"asrs.s.uid": ["erin"]}, "erin"),
        ({"asrs.s.uid": [], "nameid": "frank"}, "frank"),
        ({"asrs.s.uid": "", "nameid": "grace"}, "grace"),
        ({"sub": "someone"}, None),
        ({}, None),
        ({"nameid": 42}, None),
    ],
)
def test_user_id_from_claims_prefers_asrs_uid_then_nameid(
    claims: dict[str, Any], user_id: str | None
) -> None:
    assert user_id_from_claims(claims) == user_id


@pytest.mark.parametrize(
    ("aud", "candidate", "matches"),
    [
        ("https://h/api/hubs/chat/users/alice/:send", "https://h/api/hubs/chat/users/ALICE/:send",
         False),
        ("https://h/api/hubs/Chat/users/alice/:send", "https://h/api/hubs/chat/users/alice/:send",
         True),
        ("https://h/api/v1/hubs/chat/groups/Admins", "https://h/api/v1/hubs/chat/groups/admins",
         False),
        ("https://h/api/hubs/chat/:send?excluded=ConnA",
         "https://h/api/hubs/chat/:send?excluded=conna", False),
        ("https://h/api/hubs/chat/:send?application=App",
         "https://h/api/hubs/chat/:send?application=app", True),
        ("HTTPS://H/Client/?Hub=Chat", "https://h/client/?hub=chat", True),
    ],
)
def test_audience_matches_ids_in_rest_paths_exactly_and_hub_names_in_any_case(
    aud: str, candidate: str, matches: bool
) -> None:
    assert audience_matches(aud, [candidate]) is matches


def test_wire_hub_name_refuses_an_application_that_would_collide_with_another() -> None:
    # x + c_hat is x_c_hat; x_c + hat would be too: the application may not hold "_".
    assert wire_hub_name("c_hat", "x") == "x_c_hat"
    with pytest.raises(ValueError, match="application 'x_c' is invalid.*without '_'"):
        wire_hub_name("hat", "x_c")
