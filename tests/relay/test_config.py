"""``RelayConfig``: every setting checked against its declared type, wherever it comes from,
and every error naming the file, key or variable it came from; and the upstream rules."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from relaycore.relay import RelayConfig
from relaycore.relay._config import UpstreamRule, parse_rules, split_access_keys


def write(tmp_path, text, name="relay.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_split_access_keys_drops_blanks_around_and_between_keys():
    assert split_access_keys("k1,k2") == ["k1", "k2"]
    assert split_access_keys(" k1 , k2 ,, ") == ["k1", "k2"]
    assert split_access_keys("one") == ["one"]


@pytest.mark.parametrize("raw", ["k1,k2", "k1, k2", " k1 ,k2 "])
def test_access_keys_split_the_same_from_env_flag_and_toml_string(tmp_path, raw):
    from_env = RelayConfig.load(env={"RELAYCORE_ACCESS_KEY": raw})
    from_flag = RelayConfig.load(env={}, overrides={"access_key": raw})
    from_toml = RelayConfig.load(toml_path=write(tmp_path, f"access_key = {raw!r}\n"), env={})
    assert from_env.access_keys == from_flag.access_keys == from_toml.access_keys == ["k1", "k2"]


def test_access_key_flag_of_only_commas_is_rejected():
    with pytest.raises(ValueError, match="at least one non-empty access key"):
        RelayConfig.load(env={}, overrides={"access_key": " , "})


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('port = "abc"', "port: expected an integer, got 'abc'"),
        ("port = 80.5", "port: expected an integer, got 80.5"),
        ("port = true", "port: expected an integer, got True"),
        ('client_timeout = "30"', "client_timeout: expected a number, got '30'"),
        ('tune_gc = "yes"', "tune_gc: expected a boolean"),
        ("tune_gc = 1", "tune_gc: expected a boolean"),
        ("host = 127", "host: expected a string, got 127"),
        ("public_endpoint = 1", "public_endpoint: expected a string, got 1"),
        ('cors_origins = "*"', "cors_origins: expected a list of strings, got '*'"),
        ("cors_origins = [1]", "cors_origins: expected a list of strings, got [1]"),
        ("access_keys = [1, 2]", "access_keys: expected a list of strings"),
        ("log_level = 10", "log_level: expected a string, got 10"),
        ('log_level = "verbose"', "log_level must be one of DEBUG, INFO"),
        ("capacity = -1", "capacity must be >= 0"),
    ],
)
def test_toml_value_of_the_wrong_type_names_the_file_and_key(tmp_path, toml, message):
    path = write(tmp_path, f"[relay]\n{toml}\n")
    with pytest.raises(ValueError) as caught:
        RelayConfig.load(toml_path=path, env={})
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)


def test_every_field_is_type_checked():
    # A field whose declared type the checker does not know would pass anything unnoticed.
    hints = typing.get_type_hints(RelayConfig)
    for field in dataclasses.fields(RelayConfig):
        wrong = object()
        with pytest.raises(ValueError, match=field.name):
            RelayConfig(**{field.name: wrong})
        assert hints[field.name] is not typing.Any


def test_an_integer_is_a_fine_number_of_seconds():
    config = RelayConfig(close_timeout=1, client_timeout=3)
    assert config.close_timeout == 1.0 and isinstance(config.close_timeout, float)


def test_direct_construction_with_a_wrong_type_names_the_setting():
    with pytest.raises(ValueError, match="port: expected an integer, got '8080'"):
        RelayConfig(port="8080")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("1", True), ("true", True), ("YES", True), ("On", True),
     ("0", False), ("false", False), ("no", False), ("OFF", False)],
)
def test_boolean_variables_take_the_usual_spellings(raw, expected):
    assert RelayConfig.load(env={"RELAYCORE_TUNE_GC": raw}).tune_gc is expected


@pytest.mark.parametrize("raw", ["maybe", "", "2", "enabled", "nope"])
def test_boolean_variable_with_another_value_is_rejected_naming_it(raw):
    with pytest.raises(ValueError, match=r"RELAYCORE_TUNE_GC: expected a boolean .*got"):
        RelayConfig.load(env={"RELAYCORE_TUNE_GC": raw})


def test_every_boolean_setting_rejects_an_unknown_spelling():
    hints = typing.get_type_hints(RelayConfig)
    flags = [name for name, hint in hints.items() if hint is bool]
    assert flags  # tune_gc at least
    for name in flags:
        variable = f"RELAYCORE_{name.upper()}"
        with pytest.raises(ValueError, match=variable):
            RelayConfig.load(env={variable: "maybe"})


def test_env_value_out_of_range_names_the_variable():
    with pytest.raises(ValueError, match=r"^RELAYCORE_PORT: port must be 0\.\.65535"):
        RelayConfig.load(env={"RELAYCORE_PORT": "70000"})


def test_a_later_source_that_fixes_a_value_wins(tmp_path):
    path = write(tmp_path, 'port = "abc"\n')
    assert RelayConfig.load(toml_path=path, env={}, overrides={"port": 0}).port == 0


def test_toml_syntax_error_names_the_file_and_line(tmp_path):
    path = write(tmp_path, "[relay]\nport = 9000\nhost = \n")
    with pytest.raises(ValueError, match=r"relay\.toml: not valid TOML: .*line 3") as caught:
        RelayConfig.load(toml_path=path, env={})
    assert str(caught.value).startswith(path)


def test_json_file_given_as_config_is_called_json(tmp_path):
    path = write(tmp_path, '{"relay": {"port": 9000}}\n', name="relay.json")
    with pytest.raises(ValueError, match="looks like JSON; --config takes a TOML file"):
        RelayConfig.load(toml_path=path, env={})


def test_relay_that_is_not_a_table_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"\[relay\] must be a table"):
        RelayConfig.load(toml_path=write(tmp_path, "relay = 5\n"), env={})


def test_missing_config_file_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        RelayConfig.load(toml_path=str(tmp_path / "nope.toml"), env={})


# -- upstream rules -----------------------------------------------------------------------------


def test_rule_patterns_match_names_lists_and_stars():
    rule = UpstreamRule("http://x/{hub}/{category}/{event}", hub_pattern="chat, news",
                        category_pattern="messages", event_pattern="*")
    assert rule.url_for("news", "messages", "send") == "http://x/news/messages/send"
    assert rule.url_for("other", "messages", "send") is None
    assert rule.url_for("chat", "connections", "connected") is None


def test_rule_placeholders_are_url_escaped():
    rule = UpstreamRule("http://x/{event}")
    assert rule.url_for("h", "messages", "a b/c") == "http://x/a%20b%2Fc"


def test_bad_upstream_settings_are_rejected_naming_the_entry():
    with pytest.raises(ValueError, match="upstream #2"):
        parse_rules(["http://ok/{event}", "ftp://nope"])
    with pytest.raises(ValueError, match="unknown upstream settings"):
        parse_rules([{"url_template": "http://x", "hub": "chat"}])


# -- transports -----------------------------------------------------------------------------------


def test_every_transport_is_served_by_default():
    assert RelayConfig().transports == ["WebSockets", "ServerSentEvents", "LongPolling"]


@pytest.mark.parametrize("source", ["env", "toml", "flag"])
def test_transports_come_from_every_source_spelled_as_negotiate_spells_them(tmp_path, source):
    from relaycore.__main__ import build_parser

    if source == "env":
        config = RelayConfig.load(env={"RELAYCORE_TRANSPORTS": "longpolling, WEBSOCKETS"})
    elif source == "toml":
        path = write(tmp_path, 'transports = ["longpolling", "WEBSOCKETS"]\n')
        config = RelayConfig.load(toml_path=path, env={})
    else:
        args = build_parser().parse_args(["serve", "--transports", "longpolling,WEBSOCKETS"])
        config = RelayConfig.load(env={}, overrides={"transports": args.transports})
    assert config.transports == ["WebSockets", "LongPolling"]


@pytest.mark.parametrize(("value", "says"), [
    ("Polling", "unknown transport 'Polling'"),
    ("", "at least one transport"),
])
def test_a_bad_transport_setting_names_the_variable(value, says):
    with pytest.raises(ValueError, match=says) as raised:
        RelayConfig.load(env={"RELAYCORE_TRANSPORTS": value})
    assert "RELAYCORE_TRANSPORTS" in str(raised.value)


def test_the_transports_flag_refuses_an_unknown_name(capsys):
    from relaycore.__main__ import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--transports", "WebSockets,Carrier-Pigeon"])
    assert "argument --transports: unknown transport 'Carrier-Pigeon'" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["poll_timeout", "poll_idle_timeout"])
def test_poll_times_must_be_positive(name):
    with pytest.raises(ValueError, match=f"{name} must be > 0"):
        RelayConfig(**{name: 0})
