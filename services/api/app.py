"""``create_app(settings)``: the Starlette app, its routes, its errors and its lifespan;
:func:`from_environment` for ASGI servers that import a factory.

The lifespan is :func:`flowgate.services.api.deps.open_deps`, and beside it what the process runs
alongside the app (a replica's background work, services/background/); the bundle reaches
the endpoints as ``request.state.deps``. Parked requests are released by the
:class:`DrainHook` (SIGTERM, before uvicorn waits for in-flight requests) or, at the latest,
when the lifespan closes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import psycopg
from psycopg_pool import PoolTimeout
from starlette.applications import Starlette
from starlette.middleware import Middleware

from flowgate.services import background
from flowgate.services.api import errors
from flowgate.services.api.auth import Auth
from flowgate.services.api.deps import Deps, open_deps
from flowgate.services.api.drain import DrainHook
from flowgate.services.api.endpoints import ENDPOINTS, START, routes
from flowgate.services.api.metrics import ApiMetrics, OutcomeMiddleware
from flowgate.services.api.oidc import ClaimMapping, OidcVerifier
from flowgate.services.api.openapi import docs_html, render_openapi
from flowgate.services.api.refusals import EarlyRefusals
from flowgate.services.api.requestid import RequestIdMiddleware
from flowgate.shared.logs import configure_logging
from flowgate.shared.redis_client import REDIS_ERRORS
from flowgate.shared.settings import Settings, load_settings
from flowgate.shared.tracing import Tracing

log = logging.getLogger(__name__)


#: What runs beside the app for its lifespan, given what the app opened (a replica's
#: background work: services/background/).
Alongside = Callable[[Deps], AbstractAsyncContextManager[None]]


def create_app(
    settings: Settings,
    *,
    drain: DrainHook | None = None,
    alongside: Alongside | None = None,
    tracing: Tracing | None = None,
) -> Starlette:
    """The app: it serves requests, and runs ``alongside`` for its lifespan. ``tracing``:
    as the ``OTEL_*`` variables configure it, unless given."""
    tracing = tracing or Tracing.from_environment("flowgate-api")
    auth = Auth(
        settings.api_keys, settings.complete_token, settings.metrics_token, oidc=oidc(settings)
    )
    if auth.open_writes:
        log.warning(
            "neither API_KEYS nor COMPLETE_TOKEN is set: any client may finish any run "
            "through /api/process/complete"
        )
    drain = drain or DrainHook()
    metrics = ApiMetrics()
    replica_id = (
        settings.replica_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        async with (
            open_deps(
                settings, auth=auth, metrics=metrics, replica_id=replica_id, tracing=tracing
            ) as deps,
            alongside(deps) if alongside else contextlib.nullcontext(),
            contextlib.aclosing(auth),
        ):
            drain.attach(deps.waitroom.release_all)
            try:
                log.info("api ready", extra={"replica": replica_id, "tracing": tracing.on})
                yield {"deps": deps}
            finally:
                drain.detach()
                await tracing.shutdown()

    app = Starlette(
        routes=routes(auth, tracing),
        lifespan=lifespan,
        middleware=[
            Middleware(RequestIdMiddleware),
            *tracing.asgi_middleware(),
            Middleware(OutcomeMiddleware, metrics=metrics, tracing=tracing),
            *(
                [Middleware(EarlyRefusals, auth=auth, endpoint=START, tracing=tracing)]
                if settings.tenant_starts_per_s
                else []
            ),
        ],
        exception_handlers={
            **errors.HANDLERS,
            **dict.fromkeys(REDIS_ERRORS, errors.redis_unavailable),
            psycopg.Error: errors.unavailable("Postgres"),
            PoolTimeout: errors.unavailable("Postgres"),
            Exception: errors.internal_error,
        },
    )
    app.state.openapi = render_openapi(ENDPOINTS, auth)
    app.state.docs_html = docs_html()
    return app


def oidc(settings: Settings) -> OidcVerifier | None:
    """The verifier of OIDC_ISSUER's bearer tokens, when one is configured."""
    if settings.oidc_issuer is None or settings.oidc_audience is None:
        return None
    return OidcVerifier(
        issuer=settings.oidc_issuer,
        audience=settings.oidc_audience,
        jwks_url=settings.oidc_jwks_url,
        mapping=ClaimMapping(
            tenant_claim=settings.oidc_tenant_claim,
            scopes_claim=settings.oidc_scopes_claim,
            scope_prefix=settings.oidc_scope_prefix,
        ),
        refresh_s=settings.oidc_jwks_refresh_s,
        min_refresh_s=settings.oidc_jwks_min_refresh_s,
    )


def from_environment() -> Starlette:
    """The app with the settings of the environment, for an ASGI server other than the
    one ``python -m flowgate.services.api`` runs (``granian --interface asgi --factory
    flowgate.services.api.app:from_environment``; the benchmark compares them). Parked requests are
    then answered when the lifespan closes, not at the signal."""
    settings = load_settings()
    configure_logging(settings.log_level)
    return create_app(settings, alongside=background.alongside(settings))
