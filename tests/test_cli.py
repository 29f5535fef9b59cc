"""``python -m relaycore``: the token command and configuration loading."""

from __future__ import annotations

import json
import time

import pytest

from relaycore.__main__ import main
from relaycore.protocol import TokenValidator
from relaycore.relay import DEVELOPMENT_ACCESS_KEY, RelayConfig


def test_token_command_prints_url_and_a_token_the_relay_accepts(capsys):
    assert main(["token", "--hub", "Chat", "--user", "alice", "--ttl", "60"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["url"] == "http://127.0.0.1:8080/client/?hub=chat"
    claims = TokenValidator([DEVELOPMENT_ACCESS_KEY]).validate(
        out["accessToken"], audiences=["http://127.0.0.1/client/?hub=chat"], now=time.time())
    assert claims["asrs.s.uid"] == "alice"
    assert claims["exp"] - claims["iat"] == 60


def test_token_command_with_connection_string_and_application(capsys):
    cs = "Endpoint=https://relay.example;AccessKey=secret-key;Version=1.0;"
    assert main(["token", "--hub", "chat", "--application", "App",
                 "--connection-string", cs]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["url"] == "https://relay.example/client/?hub=app_chat"
    TokenValidator(["secret-key"]).validate(
        out["accessToken"], audiences=["https://relay.example/client/?hub=app_chat"],
        now=time.time())


def test_token_command_with_bad_hub_fails_with_a_message(capsys):
    assert main(["token", "--hub", "1chat"]) == 2
    assert "hub" in capsys.readouterr().err


def test_config_loads_toml_then_env_then_overrides(tmp_path):
    path = tmp_path / "relay.toml"
    path.write_text('[relay]\nport = 9000\nkeep-alive-interval = 5.0\naccess_key = "from-toml"\n')
    config = RelayConfig.load(toml_path=str(path),
                              env={"RELAYCORE_CLIENT_TIMEOUT": "12", "RELAYCORE_PORT": "9001"},
                              overrides={"host": "0.0.0.0", "port": None})
    assert (config.port, config.keep_alive_interval, config.client_timeout) == (9001, 5.0, 12.0)
    assert config.access_keys == ["from-toml"]
    assert config.host == "0.0.0.0"
    assert config.connection_string() == (
        "Endpoint=http://127.0.0.1:9001;AccessKey=from-toml;Version=1.0;")


def test_config_env_access_keys_are_comma_separated():
    config = RelayConfig.load(env={"RELAYCORE_ACCESS_KEY": "k1, k2"})
    assert config.access_keys == ["k1", "k2"]
    assert not config.uses_development_key


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RELAYCORE_NOPE": "1"}, "RELAYCORE_NOPE"),
        ({"RELAYCORE_PORT": "http"}, "RELAYCORE_PORT"),
        ({"RELAYCORE_CLIENT_TIMEOUT": "0"}, "client_timeout"),
    ],
)
def test_config_rejects_bad_settings_naming_them(env, message):
    with pytest.raises(ValueError, match=message):
        RelayConfig.load(env=env)


def test_config_rejects_unknown_toml_key(tmp_path):
    path = tmp_path / "relay.toml"
    path.write_text("prot = 1\n")
    with pytest.raises(ValueError, match="prot"):
        RelayConfig.load(toml_path=str(path), env={})


def test_the_documented_configuration_file_loads(tmp_path):
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    path = tmp_path / "relay.toml"
    path.write_text(re.search(r"```toml\n(.*?)```", doc, re.S).group(1))
    config = RelayConfig.load(toml_path=str(path), env={})
    assert config.access_keys == ["primary-key", "secondary-key"]
    assert config.upstreams[0]["category_pattern"] == "connections,messages"
