"""What an endpoint can reach: one frozen bundle, opened by the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis
from starlette.requests import Request

from services.api.auth import Auth
from services.api.metrics import ApiMetrics
from services.api.waitroom import WaitRoom
from shared.camunda import CamundaClient
from shared.keys import Keys
from shared.settings import Settings
from shared.store import ProcessStore
from shared.writebehind import Flusher


@dataclass(frozen=True, slots=True)
class Deps:
    settings: Settings
    keys: Keys
    redis: Redis
    store: ProcessStore
    waitroom: WaitRoom
    camunda: CamundaClient
    pool: AsyncConnectionPool
    auth: Auth
    metrics: ApiMetrics
    flusher: Flusher


def deps(request: Request) -> Deps:
    """The lifespan's bundle for this request (``yield {"deps": ...}`` in app.py)."""
    bundle: Deps = request.state.deps
    return bundle
