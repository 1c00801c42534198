"""Who may call what: every endpoint declares an :class:`Access` (and, for a client endpoint,
the :class:`~flowgate.shared.tenancy.Scope` it needs), and :class:`Auth` names the caller's
:class:`~flowgate.shared.tenancy.Principal` or refuses.

The endpoint table (services/api/endpoints.py) gives each endpoint its access and scope,
the router checks them before the endpoint runs, and the OpenAPI document states them, so
no endpoint can be added without a decision (tests/unit/test_api_endpoints.py). Which runs
a principal sees is the endpoints' business (services/api/ownership.py): another tenant's
run answers 404, exactly like no run.

A client credential is one of:

- an ``API_KEYS`` entry (``X-API-Key``, or ``Authorization: Bearer``), compared in constant
  time against every configured key, so neither a key's content nor its position in the
  list shows in the response time;
- a bearer JWT of ``OIDC_ISSUER`` (services/api/oidc.py);
- a run's read token (services/api/readtokens.py), where the endpoint accepts one; also as
  ``?access_token=``, since a browser's ``EventSource`` cannot set headers.

Credentials are off unless configured: every caller is then
:data:`~flowgate.shared.tenancy.ANONYMOUS` (one tenant, every scope).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum

from pydantic import SecretStr
from starlette.requests import Request

from flowgate.services.api.errors import ApiError
from flowgate.services.api.oidc import OidcVerifier, TokenRefused, TokenWithoutGrant
from flowgate.services.api.readtokens import ReadTokens, is_read_token
from flowgate.shared.tenancy import ALL_SCOPES, ANONYMOUS, ApiKey, Principal, Scope


class Access(StrEnum):
    """What an endpoint asks for. Each internal level falls back to an ``admin`` client
    credential when its own token is not set, so turning on client credentials never leaves
    a write or metrics endpoint open."""

    PUBLIC = "public"  # probes and documentation
    CLIENT = "client"  # API_KEYS or OIDC, when configured, holding the endpoint's scope
    COMPLETER = "completer"  # COMPLETE_TOKEN; without one, an admin client credential
    OPERATOR = "operator"  # METRICS_TOKEN; without one, an admin client credential


#: Who holds an internal endpoint's own token.
_INTERNAL = Principal("internal", ALL_SCOPES, "internal")


class Auth:
    def __init__(
        self,
        api_keys: Sequence[SecretStr],
        complete_token: SecretStr | None = None,
        metrics_token: SecretStr | None = None,
        *,
        oidc: OidcVerifier | None = None,
    ) -> None:
        self._api_keys = tuple(
            (ApiKey.parse(entry.get_secret_value()), n) for n, entry in enumerate(api_keys, 1)
        )
        self._tokens = {
            Access.COMPLETER: _secret(complete_token),
            Access.OPERATOR: _secret(metrics_token),
        }
        self.oidc = oidc

    async def aclose(self) -> None:
        if self.oidc is not None:
            await self.oidc.aclose()

    @property
    def clients_identified(self) -> bool:
        """Whether client credentials are configured (else every client is ANONYMOUS)."""
        return bool(self._api_keys) or self.oidc is not None

    def scheme(self, access: Access) -> str | None:
        """What this deployment asks for at ``access``: ``"token"`` (its own bearer token),
        ``"key"`` (a client credential) or None (nothing)."""
        if access is Access.PUBLIC:
            return None
        if access is not Access.CLIENT and self._tokens[access] is not None:
            return "token"
        return "key" if self.clients_identified else None

    def required(self, access: Access) -> bool:
        """Whether this deployment asks for credentials at ``access``."""
        return self.scheme(access) is not None

    @property
    def open_writes(self) -> bool:
        """Anyone may finish any run (neither COMPLETE_TOKEN nor client credentials)."""
        return self.scheme(Access.COMPLETER) is None

    async def principal(
        self,
        request: Request,
        access: Access,
        scope: Scope | None,
        *,
        read_tokens: Callable[[], ReadTokens] | None = None,
    ) -> Principal:
        """The caller, holding ``scope`` (internal levels: ``admin``); 401 without a valid
        credential, 403 naming the scope it lacks. ``read_tokens``: where the endpoint
        accepts a run's read token (they are looked up only when one is offered)."""
        scheme = self.scheme(access)
        if scheme is None:
            return ANONYMOUS
        if scheme == "token":
            self._check_token(access, request)
            return _INTERNAL
        principal = await self._client(request, read_tokens)
        needed = scope if access is Access.CLIENT else Scope.ADMIN
        if needed is not None and not principal.may(needed):
            raise ApiError(403, f"this credential lacks the {needed.value!r} scope")
        return principal

    def key_holder(self, headers: Mapping[str, str]) -> Principal | None:
        """The client these headers name without anything but memory: an API key's holder,
        or ANONYMOUS where no credential is asked for; None where only :meth:`principal`
        can tell (a JWT, a read token, a wrong credential or none)."""
        if not self.clients_identified:
            return ANONYMOUS
        return self._key(_offered_keys(headers))

    async def _client(
        self, request: Request, read_tokens: Callable[[], ReadTokens] | None
    ) -> Principal:
        if (key := self._key(_offered_keys(request.headers))) is not None:
            return key
        bearer = _bearer(request.headers)
        query = request.query_params.get("access_token")
        token = bearer or (query if read_tokens is not None else None)
        if token is not None and is_read_token(token):
            if read_tokens is None:
                raise ApiError(403, "a read token reads its run's status and events only")
            if (principal := await read_tokens().principal(token)) is None:
                raise _unauthorized("the read token is invalid or has expired")
            return principal
        if token is not None and self.oidc is not None:
            try:
                return await self.oidc.principal(token)
            except TokenRefused as exc:
                raise _unauthorized(f"the bearer token was refused: {exc}") from None
            except TokenWithoutGrant as exc:
                raise ApiError(403, str(exc)) from None
        what = " or ".join(
            name
            for name, configured in (("API key", self._api_keys), ("bearer token", self.oidc))
            if configured
        )
        send = "X-API-Key or Authorization: Bearer" if self._api_keys else "Authorization: Bearer"
        raise _unauthorized(f"missing or invalid {what} (send {send})")

    def _key(self, offered: list[str]) -> Principal | None:
        """The principal of the API key offered, checked against every key in constant time."""
        found: Principal | None = None
        for candidate in (value.encode() for value in offered):
            for key, number in self._api_keys:
                if hmac.compare_digest(candidate, key.secret):
                    found = Principal(key.tenant, key.scopes, subject=f"key:{number}")
        return found

    def _check_token(self, access: Access, request: Request) -> None:
        token, expected = _bearer(request.headers), self._tokens[access]
        assert expected is not None
        if token is None or not hmac.compare_digest(token.encode(), expected):
            raise ApiError(
                401,
                f"missing or invalid {access.value} token (send Authorization: Bearer)",
                headers={"WWW-Authenticate": 'Bearer realm="flowgate-internal"'},
            )


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, headers={"WWW-Authenticate": 'Bearer realm="flowgate"'})


def _secret(value: SecretStr | None) -> bytes | None:
    return value.get_secret_value().encode() if value is not None else None


def _offered_keys(headers: Mapping[str, str]) -> list[str]:
    """What may be an API key: ``X-API-Key``, or the bearer token."""
    return [value for value in (headers.get("x-api-key"), _bearer(headers)) if value]


def _bearer(headers: Mapping[str, str]) -> str | None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None
