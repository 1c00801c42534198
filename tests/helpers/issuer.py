"""A real local OIDC issuer: an HTTP server (uvicorn) serving a discovery document and a
JWKS, with RSA keys made here; tokens are signed here with the current key.

``rotate()`` adds a new key and signs with it from then on; ``down()`` makes every request
answer 503 (an outage), ``up()`` ends it. ``reads`` counts the JWKS reads.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.helpers.net import serving

AUDIENCE = "flowgate-api"


@dataclass
class LocalIssuer:
    url: str = ""
    keys: dict[str, rsa.RSAPrivateKey] = field(default_factory=dict)
    kid: str = ""
    reads: int = 0
    serving: bool = True

    def rotate(self) -> str:
        self.kid = uuid.uuid4().hex[:12]
        self.keys[self.kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return self.kid

    def down(self) -> None:
        self.serving = False

    def up(self) -> None:
        self.serving = True

    def token(
        self,
        *,
        tenant: str | None = "shop",
        scope: str = "start read",
        audience: str = AUDIENCE,
        expires_in_s: int = 300,
        kid: str | None = None,
        key: rsa.RSAPrivateKey | None = None,
        **claims: Any,
    ) -> str:
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": self.url,
            "aud": audience,
            "sub": "user-1",
            "iat": now,
            "exp": now + expires_in_s,
            "scope": scope,
            **claims,
        }
        if tenant is not None:
            body["tenant"] = tenant
        signing = key or self.keys[kid or self.kid]
        return jwt.encode(body, signing, algorithm="RS256", headers={"kid": kid or self.kid})

    def _jwks(self) -> dict[str, Any]:
        found = []
        for kid, private in self.keys.items():
            public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
            found.append({**public, "kid": kid, "alg": "RS256", "use": "sig"})
        return {"keys": found}

    def app(self) -> Starlette:
        async def discovery(request: Request) -> Response:
            if not self.serving:
                return Response(status_code=503)
            return JSONResponse({"issuer": self.url, "jwks_uri": f"{self.url}/jwks"})

        async def jwks(request: Request) -> Response:
            if not self.serving:
                return Response(status_code=503)
            self.reads += 1
            return JSONResponse(self._jwks())

        return Starlette(
            routes=[
                Route("/.well-known/openid-configuration", discovery),
                Route("/jwks", jwks),
            ]
        )


@contextlib.asynccontextmanager
async def local_issuer() -> AsyncIterator[LocalIssuer]:
    issuer = LocalIssuer()
    issuer.rotate()
    async with serving(issuer.app()) as url:
        issuer.url = url
        yield issuer
