"""Connection strings (``protocol._auth.ConnectionString.parse``).

Input: the string's bytes as UTF-8 (undecodable bytes replaced). Expected: a connection string
whose derived URLs can be computed and which parses back from ``str()``, or
``ConnectionStringError``.
"""

from __future__ import annotations

from _harness import instrumented, main

with instrumented():
    from relaycore.protocol._auth import ConnectionString, ConnectionStringError


def test_one_input(data: bytes) -> None:
    try:
        parsed = ConnectionString.parse(data.decode("utf-8", "replace"))
    except ConnectionStringError:
        return
    for value in (parsed.audience_base, parsed.connection_base, parsed.client_url("chat"),
                  parsed.server_audience("chat")):
        assert isinstance(value, str)
    again = ConnectionString.parse(str(parsed))
    assert again == ConnectionString.parse(str(again))


if __name__ == "__main__":
    main(test_one_input)
