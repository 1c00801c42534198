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

from flowgate.services.api.errors import ApiError


class Access(StrEnum):
    """What an endpoint asks for. Each level falls back to the client keys when its own
    token is not set, so turning on API_KEYS never leaves a write or metrics endpoint open."""

    PUBLIC = "public"  # probes and documentation
    CLIENT = "client"  # API_KEYS, when set
    COMPLETER = "completer"  # COMPLETE_TOKEN; without one, a client key (when API_KEYS is set)
    OPERATOR = "operator"  # METRICS_TOKEN; without one, a client key (when API_KEYS is set)


class Auth:
    def __init__(
        self,
        api_keys: Sequence[SecretStr],
        complete_token: SecretStr | None = None,
        metrics_token: SecretStr | None = None,
    ) -> None:
        self._api_keys = tuple(key.get_secret_value().encode() for key in api_keys)
        self._tokens = {
            Access.COMPLETER: _secret(complete_token),
            Access.OPERATOR: _secret(metrics_token),
        }

    def scheme(self, access: Access) -> str | None:
        """What this deployment asks for at ``access``: ``"token"`` (its own bearer token),
        ``"key"`` (a client key) or None (nothing)."""
        if access is Access.PUBLIC:
            return None
        if access is not Access.CLIENT and self._tokens[access] is not None:
            return "token"
        return "key" if self._api_keys else None

    def required(self, access: Access) -> bool:
        """Whether this deployment asks for credentials at ``access``."""
        return self.scheme(access) is not None

    @property
    def open_writes(self) -> bool:
        """Anyone may finish any run (neither COMPLETE_TOKEN nor API_KEYS is set)."""
        return self.scheme(Access.COMPLETER) is None

    def check(self, access: Access, request: Request) -> None:
        """Raise 401 unless ``request`` carries what ``access`` asks for here."""
        scheme = self.scheme(access)
        if scheme == "key":
            self._check_key(request)
        elif scheme == "token":
            token, expected = _bearer(request), self._tokens[access]
            assert expected is not None
            if token is None or not hmac.compare_digest(token.encode(), expected):
                raise ApiError(
                    401,
                    f"missing or invalid {access.value} token (send Authorization: Bearer)",
                    headers={"WWW-Authenticate": 'Bearer realm="flowgate-internal"'},
                )

    def _check_key(self, request: Request) -> None:
        """``X-API-Key: <key>`` or ``Authorization: Bearer <key>``."""
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


def _secret(value: SecretStr | None) -> bytes | None:
    return value.get_secret_value().encode() if value is not None else None


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None
