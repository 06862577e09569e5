"""Phase 1, Identify: the bearer token (or Anthropic's ``x-api-key``) becomes a ``Caller``.

Owns nothing but the call into the token store: 401 for a missing or unknown token, 403 for a revoked or
expired one. Never: logs, records or echoes the token.
"""

from __future__ import annotations

from appliance.http import Request
from appliance.identity import Caller, TokenStore


class Identify:
    def __init__(self, tokens: TokenStore) -> None:
        self._tokens = tokens

    def __call__(self, request: Request) -> Caller:
        headers = request.headers
        return self._tokens.authenticate(headers.get("authorization"), headers.get("x-api-key"))
