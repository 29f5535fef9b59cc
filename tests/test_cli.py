"""``python -m relaycore``: the token command, configuration loading, and what the real
command prints and returns when it cannot start or reach a relay."""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import relaycore
from relaycore.__main__ import main
from relaycore.protocol import TokenValidator, generate_access_token
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


# --- the real command as a new user runs it: exit status, one line on stderr, no traceback ---

def cli_env(**extra: str) -> dict[str, str]:
    """This process's environment without relay settings (a developer's RELAYCORE_PORT must not
    leak into the test), plus ``extra``."""
    keep = ("RELAYCORE_NO_EXTENSIONS", "RELAYCORE_REQUIRE_EXTENSIONS")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAYCORE_") or k in keep}
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # A command that wrongly starts a relay instead of failing is killed by the timeout.
    return subprocess.run([sys.executable, "-m", "relaycore", *args], capture_output=True,
                          text=True, timeout=30, env=env or cli_env())


def one_error_line(result: subprocess.CompletedProcess[str], status: int = 2) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert result.returncode == status, result.stderr
    return lines[0]


@contextlib.contextmanager
def running_relay(
    *args: str, env: dict[str, str] | None = None
) -> Iterator[tuple[int, list[str]]]:
    """``python -m relaycore serve --port 0 ARGS``: yields its port and the lines it printed
    up to and including the connection string; stopped with SIGINT, which must exit 0."""
    errors = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "relaycore", "serve", "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=errors, env=env or cli_env())
    assert proc.stdout is not None

    def stderr() -> str:
        errors.seek(0)
        return errors.read().decode(errors="replace")

    try:
        out = b""
        deadline = time.monotonic() + 30
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            while b"connection string:" not in out or not out.endswith(b"\n"):
                assert selector.select(deadline - time.monotonic()), (
                    f"no start line: {out!r} {stderr()}")
                chunk = os.read(proc.stdout.fileno(), 4096)
                assert chunk, f"serve ended early: {out!r} {stderr()}"
                out += chunk
        lines = out.decode().splitlines()
        port = int(re.search(r"listening on \S+:(\d+) ", lines[0]).group(1))
        yield port, lines
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, stderr()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        errors.close()


def test_serve_on_a_port_in_use_says_so_in_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_error_line(run_cli("serve", "--port", str(port)))
    assert line.startswith(f"relaycore: cannot listen on 127.0.0.1:{port}: ")
    assert "in use" in line


def test_serve_on_an_unresolvable_host_says_so_in_one_line():
    line = one_error_line(run_cli("serve", "--port", "0", "--host", "no-such-host.invalid"))
    assert line.startswith("relaycore: cannot resolve host 'no-such-host.invalid': ")


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        # no --port here: the flag would win over the file's port
        ('[relay]\nport = "abc"\n', "relay.toml: port: expected an integer, got 'abc'"),
        ('[relay]\nport = 0\nclient_timeout = "30"\n',
         "relay.toml: client_timeout: expected a number, got '30'"),
        ("port = 0\ntune_gc = 1\n", "relay.toml: tune_gc: expected a boolean"),
        ("[relay]\nport = 0\nhost = \n", "relay.toml: not valid TOML: Invalid value (at line 3"),
    ],
)
def test_serve_with_a_bad_config_file_names_file_and_setting(tmp_path, toml, expected):
    path = tmp_path / "relay.toml"
    path.write_text(toml)
    line = one_error_line(run_cli("serve", "--config", str(path)))
    assert line.startswith("relaycore: bad configuration: ")
    assert f"{tmp_path}{os.sep}{expected}" in line


def test_serve_with_a_json_config_says_it_wants_toml(tmp_path):
    path = tmp_path / "relay.json"
    path.write_text('{"port": 9000}\n')
    line = one_error_line(run_cli("serve", "--port", "0", "--config", str(path)))
    assert str(path) in line and "looks like JSON; --config takes a TOML file" in line


def test_serve_with_a_missing_config_file_names_it(tmp_path):
    path = tmp_path / "nope.toml"
    line = one_error_line(run_cli("serve", "--port", "0", "--config", str(path)))
    assert line == f"relaycore: cannot read --config {path}: No such file or directory"


def test_serve_with_an_unknown_log_level_names_the_flag():
    line = one_error_line(run_cli("serve", "--port", "0", "--log-level", "verbose"))
    assert "argument --log-level: 'verbose' is not a log level" in line


def test_serve_with_a_port_out_of_range_names_the_flag():
    line = one_error_line(run_cli("serve", "--port", "99999"))
    assert "argument --port: 99999 is not a port number" in line


@pytest.mark.parametrize("value", ["maybe", "2"])
def test_serve_rejects_a_boolean_variable_that_is_neither_true_nor_false(value):
    line = one_error_line(run_cli("serve", "--port", "0", env=cli_env(RELAYCORE_TUNE_GC=value)))
    assert line.startswith("relaycore: bad configuration: RELAYCORE_TUNE_GC: expected a boolean")
    assert repr(value) in line


def test_fault_against_a_relay_that_is_not_running_says_so_in_one_line():
    with socket.socket() as probe:  # a port nothing listens on: bound, never listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        line = one_error_line(run_cli("fault", "--server-connections", "drop", "--port",
                                      str(port), "--admin-key", "a1"), status=1)
    assert line == f"relaycore fault: cannot reach http://127.0.0.1:{port}: connection refused"


def rest_send_status(port: int, key: str) -> int:
    """The status of a REST broadcast to hub ``chat`` signed with ``key``."""
    url = f"http://127.0.0.1:{port}/api/hubs/chat/:send?api-version=2022-06-01"
    token = generate_access_token(key, url, now=time.time())
    return httpx.post(url, json={"target": "t", "arguments": []},
                      headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code


def test_serve_access_key_flag_takes_comma_separated_keys_each_accepted():
    with running_relay("--access-key", "k1, k2") as (port, lines):
        assert lines[1] == (f"connection string: Endpoint=http://127.0.0.1:{port};"
                            "AccessKey=k1;Version=1.0;")
        assert not any("development access key" in line for line in lines)
        assert [rest_send_status(port, key) for key in ("k1", "k2", "k1, k2", "k3")] == [
            202, 202, 401, 401]


def test_fault_that_the_relay_refuses_says_so_in_one_line():
    with running_relay("--access-key", "k1", "--admin-key", "a1") as (port, _):
        wrong_key = one_error_line(run_cli("fault", "--server-connections", "none", "--port",
                                           str(port), "--admin-key", "k1"), status=1)
        right_key = run_cli("fault", "--server-connections", "none", "--port", str(port),
                            "--admin-key", "a1")
    with running_relay("--access-key", "k1") as (port_off, _):
        admin_off = one_error_line(run_cli("fault", "--server-connections", "none", "--port",
                                           str(port_off), "--admin-key", "k1"), status=1)
    # An application's key is not the admin key; without --admin-key the admin API is off.
    assert re.match(rf"relaycore fault: http://127\.0\.0\.1:{port} answered 401 ", wrong_key)
    assert (right_key.returncode, right_key.stdout.strip()) == (0, '{"serverConnections":"none"}')
    assert re.match(rf"relaycore fault: http://127\.0\.0\.1:{port_off} answered 404 .*admin API "
                    "is off", admin_off), admin_off


def test_fault_without_an_admin_key_says_which_flag_is_missing():
    line = one_error_line(run_cli("fault", "--server-connections", "none",
                                  env=cli_env()), status=2)
    assert line.startswith("relaycore fault: the relay's admin key is needed: --admin-key")


def test_serve_drains_on_a_sigint_that_arrives_while_it_prints_its_start_lines():
    # Its stdout is a pipe kept full, so the relay blocks writing its first line once it
    # listens; a SIGINT then must drain it and exit 0 (the handler used to be installed after
    # the start lines: KeyboardInterrupt, a traceback, exit status 1).
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    filled = 0
    with contextlib.suppress(BlockingIOError):
        while True:
            filled += os.write(write_fd, bytes(65536))
    os.set_blocking(write_fd, True)  # the flag is the pipe's: the relay's writes must block
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    errors = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "relaycore", "serve", "--port", str(port)],
                            stdout=write_fd, stderr=errors, env=cli_env())
    os.close(write_fd)
    try:
        deadline = time.monotonic() + 30
        while True:  # wait until it listens: its next step is the blocked write
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "serve did not start"
                time.sleep(0.05)  # poll interval
        proc.send_signal(signal.SIGINT)
        out = b""
        with selectors.DefaultSelector() as selector:
            selector.register(read_fd, selectors.EVENT_READ)
            while chunk := (os.read(read_fd, 65536)
                            if selector.select(deadline - time.monotonic()) else None):
                out += chunk
        assert chunk == b"", "serve did not end after SIGINT"
        status = proc.wait(timeout=30)
        errors.seek(0)
        assert status == 0, errors.read().decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(read_fd)
        errors.close()
    lines = out[filled:].decode().splitlines()
    assert lines[0].startswith(f"relaycore {relaycore.__version__} listening on ")
    assert "relaycore: draining connections" in lines


def test_serve_start_line_says_the_extension_was_disabled():
    with running_relay(env=cli_env(RELAYCORE_NO_EXTENSIONS="1")) as (_, lines):
        assert lines[0].endswith(
            "(fast path: pure Python (disabled by RELAYCORE_NO_EXTENSIONS))"), lines


def test_serve_start_line_says_the_extension_was_not_built(tmp_path):
    # The package as an install without the extension has it: no compiled module beside it.
    shutil.copytree(Path(relaycore.__file__).parent, tmp_path / "relaycore",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__", "*.c"))
    env = cli_env(PYTHONPATH=str(tmp_path))
    env.pop("RELAYCORE_NO_EXTENSIONS", None)
    env.pop("RELAYCORE_REQUIRE_EXTENSIONS", None)
    with running_relay(env=env) as (_, lines):
        assert lines[0].endswith("(fast path: pure Python (extension not built: "
                                 "No module named 'relaycore._fastpath'))"), lines
