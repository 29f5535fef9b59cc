"""Negotiate (``protocol._negotiate.parse_negotiate_version``): the ``negotiateVersion`` query
value, then the document built from it.

Input: the value's bytes as UTF-8 (undecodable bytes replaced), or no value when the input is
empty. Expected: what .NET's ``int.TryParse`` decides (a version, lowered to the highest
supported one) or ``RemoteProtocolError``; relaycore also refuses more than 10 digits.
"""

from __future__ import annotations

from _harness import instrumented, main

with instrumented():
    from relaycore.protocol._errors import RemoteProtocolError
    from relaycore.protocol._negotiate import (
        MAX_NEGOTIATE_VERSION,
        negotiate_response,
        parse_negotiate_version,
    )

_SPACE = " \t\n\v\f\r"


def dotnet_version(value: str) -> int | None:
    text = value.strip(_SPACE)
    digits = text[1:] if text[:1] in ("+", "-") else text
    if not digits or len(digits) > 10 or not all("0" <= c <= "9" for c in digits):
        return None
    number = int(text)
    return number if -(2**31) <= number < 2**31 else None


def test_one_input(data: bytes) -> None:
    value = data.decode("utf-8", "replace") if data else None
    expected = 0 if value is None else dotnet_version(value)
    try:
        version = parse_negotiate_version(value)
    except RemoteProtocolError:
        assert expected is None or expected < 0, (value, expected)
        return
    assert expected is not None and version == min(expected, MAX_NEGOTIATE_VERSION), value
    assert negotiate_response("c", "t", version)["negotiateVersion"] == version


if __name__ == "__main__":
    main(test_one_input)
