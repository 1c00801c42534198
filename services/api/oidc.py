"""Bearer JWTs of an OIDC issuer: :class:`OidcVerifier` checks one and names its principal.

PyJWT checks the signature and the claims; this module keeps the issuer's keys. They are
read at the first token, again every ``OIDC_JWKS_REFRESH_S``, and at once (at most every
``OIDC_JWKS_MIN_REFRESH_S``) when a token names a key id they lack, so a rotated key
works from its first token. A failed read keeps the keys already known: an issuer outage
does not lock every client out while their tokens' keys are cached.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import jwt

from flowgate.shared.tenancy import DEFAULT_TENANT, Principal, Scope, parse_scopes

log = logging.getLogger(__name__)

#: Asymmetric algorithms only: an issuer's public key must never verify an HMAC token.
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA")
_FETCH_TIMEOUT_S = 5.0
#: After a failed read of the keys, the next is tried this much later (or at an unknown kid).
RETRY_FAILED_READ_S = 30.0
#: Clock skew allowed on ``exp``/``nbf``/``iat``.
LEEWAY_S = 30


class TokenRefused(Exception):
    """The token is not one this deployment accepts; the message says why (401)."""


class TokenWithoutGrant(Exception):
    """A valid token whose claims map to no tenant or scope (403)."""


@dataclass(frozen=True, slots=True)
class ClaimMapping:
    tenant_claim: str  # "": every token is the default tenant's
    scopes_claim: str
    scope_prefix: str = ""

    def principal(self, claims: Mapping[str, Any]) -> Principal:
        tenant = DEFAULT_TENANT
        if self.tenant_claim:
            value = claims.get(self.tenant_claim)
            if not isinstance(value, str) or not value:
                raise TokenWithoutGrant(f"the token names no tenant (claim {self.tenant_claim!r})")
            tenant = value
        raw = claims.get(self.scopes_claim, [])
        names = raw.split() if isinstance(raw, str) else [str(name) for name in raw]
        prefix = self.scope_prefix
        ours = [name.removeprefix(prefix) for name in names if name.startswith(prefix)]
        known = [name for name in ours if name in Scope.__members__.values()]
        return Principal(tenant, parse_scopes(known), subject=str(claims.get("sub", "token")))


class OidcVerifier:
    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        jwks_url: str | None,
        mapping: ClaimMapping,
        refresh_s: float,
        min_refresh_s: float,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self._issuer = issuer
        self._audience = audience
        self._jwks_url = jwks_url
        self._mapping = mapping
        self._refresh_s = refresh_s
        self._min_refresh_s = min_refresh_s
        self._http = http or httpx.AsyncClient(timeout=_FETCH_TIMEOUT_S)
        self._keys: dict[str, jwt.PyJWK] = {}
        self._due = float("-inf")  # when the keys are read again
        self._tried_at = float("-inf")
        self._reading = asyncio.Lock()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def principal(self, token: str) -> Principal:
        """The token's principal. Raises :class:`TokenRefused` or :class:`TokenWithoutGrant`."""
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.InvalidTokenError as exc:
            raise TokenRefused(f"not a JWT: {exc}") from None
        key = await self._key(kid)
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[key.algorithm_name] if key.algorithm_name in ALGORITHMS else [],
                audience=self._audience,
                issuer=self._issuer,
                leeway=LEEWAY_S,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.InvalidTokenError as exc:
            raise TokenRefused(str(exc)) from None
        return self._mapping.principal(claims)

    async def _key(self, kid: object) -> jwt.PyJWK:
        if not isinstance(kid, str):
            raise TokenRefused("the token's header names no key id (kid)")
        if time.monotonic() >= self._due or kid not in self._keys:
            await self._read_keys(kid)
        if (key := self._keys.get(kid)) is None:
            raise TokenRefused(f"the issuer has no key {kid!r}")
        return key

    async def _read_keys(self, kid: str) -> None:
        """Read the issuer's keys (one reader at a time); keep the known ones on failure."""
        async with self._reading:
            now = time.monotonic()
            due = now >= self._due
            if not due and (kid in self._keys or now - self._tried_at < self._min_refresh_s):
                return  # another request just read them, or unknown kids come too often
            self._tried_at = now
            try:
                url = self._jwks_url or await self._discover()
                answer = await self._http.get(url)
                answer.raise_for_status()
                found = jwt.PyJWKSet.from_dict(answer.json()).keys
            except (httpx.HTTPError, ValueError, jwt.PyJWKError) as exc:
                # The outage rides on the cached keys; try again soon, not on every request.
                self._due = now + min(self._refresh_s, RETRY_FAILED_READ_S)
                log.warning(
                    "could not read the OIDC issuer's keys; keeping the cached ones",
                    extra={"error": repr(exc), "cached": len(self._keys)},
                )
                return
            self._keys = {key.key_id: key for key in found if key.key_id}
            self._due = now + self._refresh_s

    async def _discover(self) -> str:
        answer = await self._http.get(
            self._issuer.rstrip("/") + "/.well-known/openid-configuration"
        )
        answer.raise_for_status()
        url = answer.json().get("jwks_uri")
        if not isinstance(url, str):
            raise ValueError("the issuer's discovery document names no jwks_uri")
        self._jwks_url = url
        return url
