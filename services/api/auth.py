"""Who may call what: client API keys and the completion callback's token.

Both are off unless configured (``API_KEYS``, ``COMPLETE_TOKEN``). Secrets are compared in
constant time, and against every configured key, so neither a key's content nor its position
in the list shows in the response time.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from pydantic import SecretStr
from starlette.requests import Request

from services.api.schemas import ApiError


class Auth:
    def __init__(self, api_keys: Sequence[SecretStr], complete_token: SecretStr | None) -> None:
        self._api_keys = tuple(key.get_secret_value().encode() for key in api_keys)
        self._complete_token = (
            complete_token.get_secret_value().encode() if complete_token is not None else None
        )

    @property
    def clients_need_key(self) -> bool:
        return bool(self._api_keys)

    @property
    def completion_needs_token(self) -> bool:
        return self._complete_token is not None

    def check_client(self, request: Request) -> None:
        """Client endpoints: ``X-API-Key: <key>`` or ``Authorization: Bearer <key>``."""
        if not self._api_keys:
            return
        offered = [
            value.encode()
            for value in (request.headers.get("x-api-key"), _bearer(request))
            if value
        ]
        matched = False
        for candidate in offered:
            for key in self._api_keys:
                matched |= hmac.compare_digest(candidate, key)
        if not matched:
            raise ApiError(
                401,
                "missing or invalid API key (send X-API-Key or Authorization: Bearer)",
                headers={"WWW-Authenticate": 'Bearer realm="flowgate"'},
            )

    def check_completer(self, request: Request) -> None:
        """``/api/process/complete``: ``Authorization: Bearer <COMPLETE_TOKEN>``."""
        if self._complete_token is None:
            return
        token = _bearer(request)
        if token is None or not hmac.compare_digest(token.encode(), self._complete_token):
            raise ApiError(
                401,
                "missing or invalid completion token (send Authorization: Bearer)",
                headers={"WWW-Authenticate": 'Bearer realm="flowgate-internal"'},
            )


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None
