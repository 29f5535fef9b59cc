"""Who may call: the tokens of every face of the relay (client, server, REST, admin).

A token is a JWT signed with one of the access keys (``protocol._auth``); its audience is the URL
it was made for, as the caller saw the relay: the relay's public endpoint or the ``Host`` the
request names, over http or https. Failures are counted and answered with 401 and a JSON body
saying why (``HttpError``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from ..protocol._auth import TokenError, TokenValidator
from ._http import HttpError, Request, bearer_token
from ._stats import RelayStats


class RequestAuth:
    """Checks the tokens of requests to one relay node."""

    def __init__(self, validator: TokenValidator, stats: RelayStats,
                 endpoint: Callable[[], str]) -> None:
        self.validator = validator
        self.stats = stats
        #: The relay's public base URL, read when needed (the port is known once listening).
        self._endpoint = endpoint

    def authenticate(self, request: Request, kind: str, hub: str) -> dict[str, Any]:
        """Validate the token of ``request`` for ``{endpoint}/{kind}/?hub={hub}``: from the
        ``Authorization`` header, or the ``access_token`` query parameter (browsers)."""
        token = bearer_token(request) or request.arg("access_token")
        return self.check_token(token, self.audiences(request, f"{kind}/?hub={hub}"))

    def check_token(self, token: str | None, audiences: list[str],
                    validator: TokenValidator | None = None) -> dict[str, Any]:
        try:
            return (validator or self.validator).validate(token, audiences=audiences,
                                                          now=time.time())
        except TokenError as exc:
            self.stats.auth_failures += 1
            raise HttpError(401, str(exc), code=f"Unauthorized.{exc.reason}") from None

    def audiences(self, request: Request, suffix: str) -> list[str]:
        hosts = {urlsplit(self._endpoint()).hostname or ""}
        host_header = request.headers.get("host", "")
        if host_header:
            try:
                hosts.add(urlsplit(f"//{host_header}").hostname or "")
            except ValueError:
                raise HttpError(400, f"invalid Host header {host_header[:100]!r}") from None
        return [f"{scheme}://{host}/{suffix}" for host in hosts if host
                for scheme in ("http", "https")]
