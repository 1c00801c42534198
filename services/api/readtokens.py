"""Read tokens: a short-lived signed token that reads one run's status and events.

A start with ``"readToken": true`` answers one (``readToken``), so a browser can follow its
own run (``EventSource`` cannot set headers: ``?access_token=`` carries it) without holding
a client's key. It is an HS256 JWT whose subject is the run, issued and checked with PyJWT.
The key is ``READ_TOKEN_SECRET`` or, unset, a random key the first replica to need one
keeps in Redis for every other.
"""

from __future__ import annotations

import secrets
import time

import jwt
from pydantic import SecretStr

from flowgate.shared.keys import Keys
from flowgate.shared.redis_client import RedisClient
from flowgate.shared.tenancy import Principal, Scope

ISSUER = "flowgate"
AUDIENCE = "flowgate:read"
_ALGORITHM = "HS256"


class ReadTokens:
    def __init__(
        self, redis: RedisClient, keys: Keys, *, secret: SecretStr | None, ttl_s: int
    ) -> None:
        self._redis = redis
        self._key_name = keys.read_token_key
        self._secret = secret.get_secret_value().encode() if secret is not None else None
        self.ttl_s = ttl_s

    async def issue(self, correlation_id: str, tenant: str) -> str:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": correlation_id,
            "tenant": tenant,
            "iat": now,
            "exp": now + self.ttl_s,
        }
        return jwt.encode(claims, await self._key(), algorithm=_ALGORITHM)

    async def principal(self, token: str) -> Principal | None:
        """The token's principal (``read`` on its one run), or None when it is not a valid,
        unexpired read token of this deployment."""
        try:
            claims = jwt.decode(
                token,
                await self._key(),
                algorithms=[_ALGORITHM],
                audience=AUDIENCE,
                issuer=ISSUER,
                options={"require": ["exp", "sub", "tenant"]},
            )
        except jwt.InvalidTokenError:
            return None
        return Principal(
            str(claims["tenant"]),
            frozenset({Scope.READ}),
            subject=f"read-token:{claims['sub']}",
            run=str(claims["sub"]),
        )

    async def _key(self) -> bytes:
        if self._secret is None:
            fresh = secrets.token_urlsafe(32)
            await self._redis.set(self._key_name, fresh, nx=True)
            kept = await self._redis.get(self._key_name)
            self._secret = kept if isinstance(kept, bytes) else str(kept).encode()
        return self._secret


def is_read_token(token: str) -> bool:
    """Whether ``token`` looks like a read token (its unverified issuer is flowgate's)."""
    try:
        return jwt.decode(token, options={"verify_signature": False}).get("iss") == ISSUER
    except jwt.InvalidTokenError:
        return False
