"""Tests of ``relaycore.protocol._negotiate``: negotiate documents and version parsing."""

from __future__ import annotations

import pytest

from relaycore.protocol._errors import LocalProtocolError, RemoteProtocolError
from relaycore.protocol._negotiate import (
    MAX_NEGOTIATE_VERSION,
    TRANSPORTS_ALL,
    TRANSPORTS_WEBSOCKETS_ONLY,
    available_transports,
    negotiate_error,
    negotiate_redirect,
    negotiate_response,
    parse_negotiate_version,
    transport_names,
)

WEBSOCKETS = [{"transport": "WebSockets", "transferFormats": ["Text", "Binary"]}]


def test_negotiate_response_for_version_0_has_no_connection_token() -> None:
    assert negotiate_response("id-1", "token-1", 0) == {
        "negotiateVersion": 0,
        "connectionId": "id-1",
        "availableTransports": WEBSOCKETS,
    }


def test_negotiate_response_for_version_1_adds_the_connection_token_in_dotnet_order() -> None:
    doc = negotiate_response("id-1", "token-1", 1)
    assert doc == {
        "negotiateVersion": 1,
        "connectionId": "id-1",
        "connectionToken": "token-1",
        "availableTransports": WEBSOCKETS,
    }
    assert list(doc) == [
        "negotiateVersion",
        "connectionId",
        "connectionToken",
        "availableTransports",
    ]


def test_negotiate_response_for_a_version_above_the_highest_answers_the_highest() -> None:
    assert negotiate_response("id", "tok", 7)["negotiateVersion"] == MAX_NEGOTIATE_VERSION == 1


def test_negotiate_response_for_version_1_without_a_token_raises_a_local_error() -> None:
    with pytest.raises(LocalProtocolError, match="connection token"):
        negotiate_response("id", None, 1)


def test_negotiate_response_for_a_negative_version_raises_a_local_error() -> None:
    with pytest.raises(LocalProtocolError, match="parse_negotiate_version"):
        negotiate_response("id", "tok", -1)


def test_negotiate_response_says_stateful_reconnect_only_when_asked() -> None:
    assert "useStatefulReconnect" not in negotiate_response("id", "tok", 1)
    doc = negotiate_response("id", "tok", 1, use_stateful_reconnect=True)
    assert doc["useStatefulReconnect"] is True
    assert list(doc)[-1] == "availableTransports"


def test_negotiate_response_lists_the_given_transports_in_their_order() -> None:
    doc = negotiate_response("id", "tok", 1, transports=TRANSPORTS_ALL)
    assert [t["transport"] for t in doc["availableTransports"]] == [
        "WebSockets",
        "ServerSentEvents",
        "LongPolling",
    ]
    assert doc["availableTransports"][1]["transferFormats"] == ["Text"]


def test_negotiate_response_hands_out_copies_of_the_transport_constants() -> None:
    doc = negotiate_response("id", "tok", 1)
    doc["availableTransports"][0]["transferFormats"].append("Bogus")
    doc["availableTransports"].append({"transport": "Bogus", "transferFormats": []})
    assert TRANSPORTS_WEBSOCKETS_ONLY == WEBSOCKETS
    assert negotiate_response("id", "tok", 1)["availableTransports"] == WEBSOCKETS


def test_negotiate_redirect_carries_the_url_and_access_token() -> None:
    assert negotiate_redirect("https://relay/client/?hub=chat", "jwt") == {
        "url": "https://relay/client/?hub=chat",
        "accessToken": "jwt",
    }


def test_negotiate_redirect_without_a_token_leaves_the_key_out() -> None:
    assert negotiate_redirect("https://relay/client/?hub=chat", None) == {
        "url": "https://relay/client/?hub=chat"
    }


def test_negotiate_error_is_an_error_document() -> None:
    assert negotiate_error("Unauthorized") == {"error": "Unauthorized"}


@pytest.mark.parametrize(
    ("query_value", "version"),
    [(None, 0), ("0", 0), ("1", 1), ("2", 1), ("2147483647", 1), (" 1 ", 1), ("+1", 1), ("01", 1)],
)
def test_parse_negotiate_version_of_a_valid_value_gives_the_version_to_answer(
    query_value: str | None, version: int
) -> None:
    assert parse_negotiate_version(query_value) == version


@pytest.mark.parametrize(
    "query_value", ["", "abc", "1.0", "1_0", "0x1", "\u0663", "2147483648", "9" * 5000, "- 1"]
)
def test_parse_negotiate_version_of_a_non_integer_raises_the_dotnet_text(query_value: str) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        parse_negotiate_version(query_value)
    assert str(caught.value) == f"The client requested an invalid protocol version '{query_value}'"


def test_parse_negotiate_version_of_a_negative_integer_raises_the_dotnet_text() -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        parse_negotiate_version("-1")
    assert str(caught.value) == (
        "The client requested version '-1', but the server does not support this version."
    )


def test_transport_names_are_spelled_as_negotiate_spells_them_once_in_dotnet_order() -> None:
    assert transport_names(["longpolling", " WebSockets ", "LONGPOLLING"]) == [
        "WebSockets", "LongPolling"]
    with pytest.raises(ValueError, match="unknown transport 'ws'"):
        transport_names(["ws"])


def test_available_transports_keep_dotnet_order_and_formats() -> None:
    assert available_transports(["LongPolling", "ServerSentEvents", "WebSockets"]) == TRANSPORTS_ALL
    assert available_transports(["ServerSentEvents"]) == [
        {"transport": "ServerSentEvents", "transferFormats": ["Text"]}]
    listed = available_transports(["WebSockets"])
    listed[0]["transferFormats"].append("Bogus")
    assert available_transports(["WebSockets"]) == WEBSOCKETS
