"""Access tokens and audiences (``protocol._auth``): ``TokenValidator.validate`` of any string,
and ``audience_matches`` of the token's text as an audience.

Input: the token's bytes as Latin-1 text (so every byte is one character). Expected: claims, or
``TokenError`` with one of its reasons; an audience comparison answers True or False.
"""

from __future__ import annotations

from _harness import instrumented, main

with instrumented():
    from relaycore.protocol._auth import TokenError, TokenValidator, audience_matches

KEY = "fuzz-access-key"
VALIDATOR = TokenValidator([KEY, "another-key"])
AUDIENCES = ["http://127.0.0.1/client/?hub=chat", "https://h/api/hubs/chat/users/u/:send"]
REASONS = {"missing", "malformed", "expired", "bad_signature", "wrong_audience", "not_yet_valid"}


def test_one_input(data: bytes) -> None:
    text = data.decode("latin-1")
    for now in (0.0, 1.7e9):
        try:
            claims = VALIDATOR.validate(text, audiences=AUDIENCES, now=now)
        except TokenError as exc:
            assert exc.reason in REASONS
        else:
            assert isinstance(claims, dict)
    half = len(text) // 2
    assert audience_matches(text[:half], [text[half:], *AUDIENCES], query_optional=True) in (
        True, False)


if __name__ == "__main__":
    main(test_one_input)
