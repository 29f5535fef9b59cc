"""ServiceEndpoint and ServiceOptions: construction, every configuration form, bad input named."""

from __future__ import annotations

import json

import pytest

from relaycore.sdk import EndpointType, ServiceEndpoint, ServiceOptions, default_retry_delay

A = "Endpoint=http://a.example;AccessKey=ka;Version=1.0;"
B = "Endpoint=https://b.example;AccessKey=kb;Version=1.0;"
C = "Endpoint=http://c.example:8080;AccessKey=kc;Version=1.0;"


def test_endpoint_parses_its_connection_string_and_hides_the_key():
    endpoint = ServiceEndpoint(C, EndpointType.SECONDARY, "west")
    assert endpoint.endpoint == "http://c.example:8080"
    assert endpoint.access_key == "kc"
    assert endpoint.type is EndpointType.SECONDARY
    assert endpoint.identity == "http://c.example:8080"
    assert "kc" not in repr(endpoint) and "kc" not in str(endpoint)


def test_endpoint_type_accepts_names_and_ints():
    assert ServiceEndpoint(A, "secondary").type is EndpointType.SECONDARY  # type: ignore[arg-type]
    assert ServiceEndpoint(A, 0).type is EndpointType.PRIMARY  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="endpoint 'x': endpoint type 'tertiary'"):
        ServiceEndpoint(A, "tertiary", "x")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("Endpoint=http://a;Version=1.0", "AccessKey"),
        ("AccessKey=k;Version=1.0", "Endpoint"),
        ("Endpoint=ftp://a;AccessKey=k", "scheme"),
        ("Endpoint=http://a;AccessKey=k;Port=99999", "Port"),
        ("nonsense", "pair"),
        ("Endpoint=http://a;AuthType=aad", "Entra"),
    ],
)
def test_endpoint_with_bad_connection_string_names_the_problem(text, problem):
    with pytest.raises(ValueError, match=problem) as info:
        ServiceEndpoint(text, name="east")
    assert "endpoint 'east'" in str(info.value)


def test_options_join_connection_string_and_endpoints_deduplicated_preferring_primary():
    options = ServiceOptions(
        connection_string=A,
        endpoints=[
            ServiceEndpoint(B, EndpointType.SECONDARY, "b"),
            ServiceEndpoint(B.replace("kb", "kb2"), EndpointType.PRIMARY, "b-again"),
            ServiceEndpoint(A, EndpointType.SECONDARY, "a-again"),
        ],
    )
    endpoints = options.all_endpoints()
    assert [(e.name, e.type) for e in endpoints] == [
        ("", EndpointType.PRIMARY), ("b-again", EndpointType.PRIMARY)]


def test_options_need_an_endpoint_and_a_primary():
    with pytest.raises(ValueError, match="no endpoint configured"):
        ServiceOptions().all_endpoints()
    with pytest.raises(ValueError, match="no primary endpoint"):
        ServiceOptions(endpoints=[ServiceEndpoint(A, EndpointType.SECONDARY)]).all_endpoints()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("connection_string", "Endpoint=http://a", "pair"),
        ("application_name", "1app", "application_name"),
        ("application_name", "my_app", "application_name 'my_app' is invalid.*no '_'"),
        ("connection_count", -1, "connection_count"),
        ("ack_timeout", 0, "ack_timeout"),
        ("handshake_timeout", "15", "handshake_timeout"),
        ("max_message_size", 0, "max_message_size"),
        ("endpoints", [42], "ServiceEndpoint"),
    ],
)
def test_options_refuse_bad_values_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        ServiceOptions(**{"connection_string": A, field: value})


def test_options_accept_plain_strings_as_endpoints():
    options = ServiceOptions(endpoints=[A])  # type: ignore[list-item]
    assert options.all_endpoints()[0].endpoint == "http://a.example"


def test_from_env_reads_the_default_connection_string():
    options = ServiceOptions.from_env({"Azure__SignalR__ConnectionString": A, "PATH": "/bin"})
    assert options.connection_string == A
    assert options.endpoints == ()


def test_from_env_reads_the_connection_strings_section_as_a_fallback():
    env = {"ConnectionStrings__Azure__SignalR__ConnectionString": B}
    assert ServiceOptions.from_env(env).connection_string == B
    env["Azure__SignalR__ConnectionString"] = A
    assert ServiceOptions.from_env(env).connection_string == A


def test_from_env_reads_named_endpoints_with_roles_and_overrides():
    env = {
        "Azure__SignalR__Endpoints__east": A,
        "Azure__SignalR__Endpoints__west__secondary": B,
        "Azure__SignalR__ConnectionString__north__Primary": C,
        "Azure__SignalR__ApplicationName": "shop",
    }
    options = ServiceOptions.from_env(env, connection_count=2)
    assert options.connection_count == 2
    assert options.application_name == "shop"
    assert sorted((e.name, e.type, e.endpoint) for e in options.endpoints) == [
        ("east", EndpointType.PRIMARY, "http://a.example"),
        ("north", EndpointType.PRIMARY, "http://c.example:8080"),
        ("west", EndpointType.SECONDARY, "https://b.example"),
    ]


def test_from_config_reads_flat_and_nested_keys_case_insensitively():
    flat = ServiceOptions.from_config({
        "azure:signalr:connectionstring": A,
        "Azure:SignalR:Endpoints:west:secondary": B,
        "ConnectionStrings:Azure:SignalR:ConnectionString:south": C,
        "Logging:LogLevel": "Debug",
        "Azure:SignalR:ServerStickyMode": "Required",
    })
    nested = ServiceOptions.from_config({
        "Azure": {"SignalR": {"ConnectionString": A,
                              "Endpoints": {"west": {"secondary": B}}}},
        "ConnectionStrings": {"Azure": {"SignalR": {"ConnectionString": {"south": C}}}},
    })
    for options in (flat, nested):
        assert options.connection_string == A
        assert sorted((e.name, e.type) for e in options.endpoints) == [
            ("south", EndpointType.PRIMARY), ("west", EndpointType.SECONDARY)]


def test_from_config_ignores_empty_values():
    options = ServiceOptions.from_config({
        "Azure:SignalR:ConnectionString": "", "Azure:SignalR:Endpoints:east": "  "})
    assert options.connection_string is None and options.endpoints == ()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("Azure:SignalR:Endpoints:east:tertiary", A, "role 'tertiary' is invalid"),
        ("Azure:SignalR:Endpoints:east:primary:extra", A, "is malformed"),
        ("Azure:SignalR:Endpoints", A, "is malformed"),
        ("Azure:SignalR:Endpoints::primary", A, "is malformed"),
        ("Azure:SignalR:Endpoints:east", "Endpoint=http://a", "invalid connection string"),
        ("Azure:SignalR:ConnectionString", "Endpoint=http://a;Version=1.0", "AccessKey"),
        ("Azure:SignalR:Endpoints:east", 42, "expected a string"),
    ],
)
def test_from_config_rejects_bad_keys_and_strings_naming_the_key(key, value, message):
    with pytest.raises(ValueError, match=message) as info:
        ServiceOptions.from_config({key: value})
    assert repr(key) in str(info.value)


def test_from_env_names_the_configuration_key_of_a_bad_string():
    with pytest.raises(ValueError, match="'Azure:SignalR:Endpoints:east'"):
        ServiceOptions.from_env({"Azure__SignalR__Endpoints__east": "Endpoint=nope"})


def test_default_retry_delay_follows_the_sdk_schedule_with_jitter():
    for failures, base in [(0, 1), (1, 2), (2, 4), (3, 8), (4, 16), (5, 32), (6, 60), (50, 60)]:
        delay = default_retry_delay(failures)
        assert base <= delay <= base + 1


# --- configuration files --------------------------------------------------------------------


JSON_DOC = {"Azure": {"SignalR": {"Endpoints": {"east": A, "west:secondary": B},
                                  "ApplicationName": "shop"}},
            "Logging": {"LogLevel": {"Default": "Information"}}}
TOML_DOC = f"""
[Azure.SignalR]
ApplicationName = "shop"

[Azure.SignalR.Endpoints]
east = "{A}"
"west:secondary" = "{B}"

[Logging.LogLevel]
Default = "Information"
"""


@pytest.mark.parametrize("suffix", [".json", ".toml", ".JSON"])
def test_from_file_reads_json_and_toml_and_watches_the_file(tmp_path, suffix):
    path = tmp_path / f"appsettings{suffix}"
    path.write_text(TOML_DOC if suffix == ".toml" else json.dumps(JSON_DOC))
    options = ServiceOptions.from_file(path, connection_count=3)
    assert options.config_file == str(path)
    assert options.application_name == "shop" and options.connection_count == 3
    assert [(e.name, e.type) for e in options.all_endpoints()] == [
        ("east", EndpointType.PRIMARY), ("west", EndpointType.SECONDARY)]
    assert ServiceOptions.from_file(path, watch=False).config_file is None


def test_from_file_reads_flat_keys(tmp_path):
    path = tmp_path / "relay.toml"
    path.write_text(f'"Azure:SignalR:Endpoints:east" = "{A}"\n'
                    f'"Azure:SignalR:ConnectionString:backup:secondary" = "{B}"\n')
    options = ServiceOptions.from_file(path)
    assert sorted((e.name, e.type) for e in options.endpoints) == [
        ("backup", EndpointType.SECONDARY), ("east", EndpointType.PRIMARY)]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("relay.toml", "[Azure.SignalR\n", r"invalid TOML: .*line 1"),
        ("relay.json", '{"Azure": ', r"invalid JSON: .*line 1"),
        ("relay.json", "[1, 2]", "expected an object of keys, got list"),
        ("relay.yaml", "a: b", "unknown format '.yaml'; expected .json or .toml"),
        ("relay.toml", '[Azure.SignalR.Endpoints.east]\ntertiary = "x"\n',
         "key 'Azure:SignalR:Endpoints:east:tertiary': role 'tertiary' is invalid"),
        ("relay.json", '{"Azure": {"SignalR": {"Endpoints": {"east": "Endpoint=nope"}}}}',
         "key 'Azure:SignalR:Endpoints:east': endpoint 'east': invalid connection string"),
        ("relay.json", '{"Azure": {"SignalR": {"Endpoints": {"east": 5}}}}',
         "key 'Azure:SignalR:Endpoints:east': expected a string, got int"),
    ],
)
def test_from_file_names_the_file_and_the_key_of_a_problem(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        ServiceOptions.from_file(path)
    assert str(info.value).startswith(f"configuration file {str(path)!r}: ")


def test_from_file_names_a_missing_file(tmp_path):
    with pytest.raises(ValueError, match="cannot be read: No such file"):
        ServiceOptions.from_file(tmp_path / "missing.toml")


def test_from_config_refuses_two_endpoints_with_one_name():
    with pytest.raises(ValueError, match="both name endpoint 'East'") as info:
        ServiceOptions.from_config({"Azure:SignalR:Endpoints:east": A,
                                    "Azure:SignalR:ConnectionString:East:secondary": B})
    assert "'Azure:SignalR:Endpoints:east'" in str(info.value)
    assert "'Azure:SignalR:ConnectionString:East:secondary'" in str(info.value)


def test_from_config_refuses_what_is_not_a_mapping():
    with pytest.raises(ValueError, match="configuration must be a mapping"):
        ServiceOptions.from_config([("Azure:SignalR:ConnectionString", A)])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("server_scale_timeout", 0, "server_scale_timeout must be a number of seconds > 0"),
        ("scale_poll_interval", -1, "scale_poll_interval"),
        ("config_reload_interval", "1", "config_reload_interval"),
        ("on_endpoint_status", "print", "on_endpoint_status must be callable"),
    ],
)
def test_options_refuse_bad_endpoint_settings(field, value, message):
    with pytest.raises(ValueError, match=message):
        ServiceOptions(**{"connection_string": A, field: value})


def test_endpoint_str_shows_the_port_of_the_connection():
    endpoint = ServiceEndpoint("Endpoint=http://localhost;Port=8888;AccessKey=k;Version=1.0;",
                               name="dev")
    assert str(endpoint) == "dev http://localhost:8888 [primary]"
