"""The client's public surface and its settings, without a server: what ``relaycore.client``
exports, what the builder passes on, which settings are refused and why, the retry policies,
and the URL rules of negotiate (the modules' own examples)."""

from __future__ import annotations

import doctest
import inspect
import ssl
import types

import anyio
import pytest

import relaycore.client
from relaycore.client import (
    DEFAULT_RECONNECT_DELAYS,
    HubConnection,
    HubConnectionBuilder,
    HubConnectionError,
    HubConnectionState,
    HubException,
    NegotiateError,
    RetryContext,
    ServerClosedError,
    TransportError,
    _negotiate,
    _retry,
    _transports,
)
from relaycore.protocol import MessagePackHubProtocol


def test_the_package_lists_exactly_its_public_names_each_with_a_docstring():
    module = relaycore.client
    assert len(module.__all__) == len(set(module.__all__))
    public = {name for name, value in vars(module).items()
              if not name.startswith("_") and not isinstance(value, types.ModuleType)
              and name != "annotations"}
    assert public == set(module.__all__)
    # A type alias (``RetryPolicy = Callable[...]``) is not a class, though Python 3.10's
    # isinstance says a subscripted generic is a type.
    undocumented = [name for name in module.__all__
                    if inspect.isclass(getattr(module, name))
                    and not isinstance(getattr(module, name), types.GenericAlias)
                    and not getattr(module, name).__doc__]
    assert undocumented == []


def test_errors_come_in_two_families():
    for error in (NegotiateError("x"), TransportError("x"), ServerClosedError("x")):
        assert isinstance(error, HubConnectionError)
        assert isinstance(error, ConnectionError)
    assert not isinstance(HubException("x"), HubConnectionError)
    assert HubException("Unknown hub method 'x'").error == "Unknown hub method 'x'"


def test_the_builder_passes_every_setting_to_the_connection():
    context = ssl.create_default_context()

    def policy(retry: RetryContext) -> float | None:
        return None

    connection = (HubConnectionBuilder()
                  .with_url("https://app.example/hubs/chat", access_token_factory=lambda: "t",
                            headers={"X-A": "1"}, http_timeout=5, ssl_context=context,
                            transport=["longpolling", "WebSockets"])
                  .with_hub_protocol("messagepack")
                  .with_automatic_reconnect(policy)
                  .with_stateful_reconnect(5000)
                  .with_server_timeout(60)
                  .with_keep_alive_interval(20)
                  .build())
    assert connection.url == "https://app.example/hubs/chat"
    assert connection.protocol == "messagepack"
    assert connection.state is HubConnectionState.DISCONNECTED
    assert connection.connection_id is None
    assert (connection.server_timeout, connection.keep_alive_interval,
            connection.http_timeout) == (60, 20, 5)
    assert connection._retry is policy
    assert connection._headers == (("X-A", "1"),)
    assert connection._transports == ("LongPolling", "WebSockets")
    assert connection._stateful_size == 5000
    assert connection.transport is None  # not connected
    assert "messagepack Disconnected" in repr(connection)

    plain = HubConnection("http://relay/client/?hub=chat", protocol=MessagePackHubProtocol())
    assert plain.protocol == "messagepack"
    assert plain._retry is None
    assert plain._stateful_size is None
    assert (plain.server_timeout, plain.keep_alive_interval) == (30, 15)


def test_automatic_reconnect_defaults_to_the_js_clients_delays_then_gives_up():
    policy = _retry.retry_policy(True)
    assert policy is not None
    delays = [policy(RetryContext(count, 0.0, OSError())) for count in range(5)]
    assert delays == [*DEFAULT_RECONNECT_DELAYS, None] == [0, 2, 10, 30, None]
    built = HubConnectionBuilder().with_url("http://x/hub").with_automatic_reconnect().build()
    assert built._retry is not None and built._retry(RetryContext(1, 0.0, OSError())) == 2
    listed = HubConnection("http://x/hub", reconnect=[1, 0.5])._retry
    assert listed is not None
    assert [listed(RetryContext(n, 0.0, OSError())) for n in range(3)] == [1.0, 0.5, None]


@pytest.mark.parametrize(("build", "message"), [
    (lambda: HubConnectionBuilder().build(), "with_url"),
    (lambda: HubConnection("relay:8080/hub"), "absolute http"),
    (lambda: HubConnection("ws://relay/client/?hub=chat"), "skip_negotiation=True"),
    (lambda: HubConnection("http://x/hub", protocol="xml"), "unknown hub protocol 'xml'"),
    (lambda: HubConnection("http://x/hub", keep_alive_interval=0), "keep_alive_interval"),
    (lambda: HubConnection("http://x/hub", server_timeout=float("inf")), "server_timeout"),
    (lambda: HubConnection("http://x/hub", reconnect=[0, -1]), "reconnect delays"),
    (lambda: HubConnection("http://x/hub", reconnect=["soon"]), "reconnect delays"),
    (lambda: HubConnection("http://x/hub", transport="carrier-pigeon"),
     "unknown transport 'carrier-pigeon'; expected one of WebSockets, ServerSentEvents, "
     "LongPolling"),
    (lambda: HubConnection("http://x/hub", transport=[]), "at least one transport"),
    (lambda: HubConnection("http://x/hub", skip_negotiation=True, transport="LongPolling"),
     "skip_negotiation works with the WebSockets transport only"),
    (lambda: HubConnection("http://x/hub", stateful_reconnect=0), "stateful_reconnect must"),
    (lambda: HubConnection("http://x/hub", stateful_reconnect="big"),
     "stateful_reconnect must"),
])
def test_wrong_settings_are_refused_with_the_reason(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_a_connection_that_is_not_started_refuses_calls():
    async def main():
        connection = HubConnection("http://127.0.0.1:9/hub")
        for call in (connection.send("x"), connection.invoke("x")):
            with pytest.raises(HubConnectionError, match="Cannot send data if the connection "
                               "is not in the 'Connected' State."):
                await call
        with pytest.raises(HubConnectionError):
            await connection.stream("x").__anext__()
        await connection.stop()  # nothing to stop
        assert connection.state is HubConnectionState.DISCONNECTED
        with pytest.raises(TypeError, match="callable"):
            connection.on("x", "not a function")

    anyio.run(main)


def test_negotiate_and_connect_urls_follow_the_js_client():
    failures, tried = doctest.testmod(_negotiate)
    assert tried >= 4 and failures == 0
    failures, tried = doctest.testmod(_transports)
    assert tried >= 2 and failures == 0
    assert _negotiate.negotiate_url("http://a/hub?negotiateVersion=0") == \
        "http://a/hub/negotiate?negotiateVersion=0"
    assert _negotiate.connect_url("https://a/client/?hub=chat&asrs.op=%2Fhubs", "t-1") == \
        "wss://a/client/?hub=chat&asrs.op=%2Fhubs&id=t-1"
    assert _negotiate.connect_url("http://a/hub", None) == "ws://a/hub"
