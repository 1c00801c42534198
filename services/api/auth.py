"""Who may call what: every endpoint declares an :class:`Access`, and :class:`Auth` checks it.

The endpoint table (services/api/routes.py) gives each endpoint its access level, the
router checks it before the endpoint runs, and the OpenAPI document states it, so no
endpoint can be added without a decision (tests/unit/test_api_endpoints.py).

Credentials are off unless configured (``API_KEYS``, ``COMPLETE_TOKEN``). Secrets are
compared in constant time, and against every configured key, so neither a key's content
nor its position in the list shows in the response time.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from enum import StrEnum

from pydantic import SecretStr
from starlette.requests import Request

from services.api.errors import ApiError


class Access(StrEnum):
    PUBLIC = "public"  # probes and documentation
    CLIENT = "client"  # API_KEYS, when set
    COMPLETER = "completer"  # COMPLETE_TOKEN, when set


class Auth:
    def __init__(self, api_keys: Sequence[SecretStr], complete_token: SecretStr | None) -> None:
        self._api_keys = tuple(key.get_secret_value().encode() for key in api_keys)
        self._complete_token = (
            complete_token.get_secret_value().encode() if complete_token is not None else None
        )

    def required(self, access: Access) -> bool:
        """Whether this deployment asks for credentials at ``access``."""
        if access is Access.CLIENT:
            return bool(self._api_keys)
        if access is Access.COMPLETER:
            return self._complete_token is not None
        return False

    def check(self, access: Access, request: Request) -> None:
        """Raise 401 unless ``request`` carries what ``access`` asks for here."""
        if access is Access.CLIENT:
            self._check_client(request)
        elif access is Access.COMPLETER:
            self._check_completer(request)

    def _check_client(self, request: Request) -> None:
        """``X-API-Key: <key>`` or ``Authorization: Bearer <key>``."""
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

    def _check_completer(self, request: Request) -> None:
        """``Authorization: Bearer <COMPLETE_TOKEN>``."""
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
