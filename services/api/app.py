"""``create_app(settings)``: the Starlette app and the lifespan that owns every dependency.

The lifespan opens, in order, Redis, the engine client, the Postgres pool, the wait room
(its subscription confirmed before the app serves), and the persistence task (migrations,
then the write-behind flusher); it closes them in reverse. Parked requests are released
either by :class:`DrainHook` (SIGTERM, before uvicorn waits for in-flight requests) or, at
the latest, when the wait room closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response

from services.api.auth import Auth
from services.api.deps import Deps
from services.api.metrics import ApiMetrics, OutcomeMiddleware
from services.api.openapi import docs_html, render_openapi
from services.api.routes import ROUTES
from services.api.schemas import ApiError, ErrorBody, JSONResponse
from services.api.waitroom import WaitRoom
from shared import db
from shared.camunda import CamundaClient
from shared.keys import Keys
from shared.settings import Settings
from shared.store import ProcessStore
from shared.writebehind import Flusher

log = logging.getLogger(__name__)

#: Redis connections one replica may use at once; requests beyond it queue for one (a
#: thousand parked requests re-reading state must not open a thousand connections).
REDIS_MAX_CONNECTIONS = 64
_REDIS_POOL_TIMEOUT_S = 5.0
_MIGRATE_BACKOFF_MAX_S = 10.0
#: How long start-up waits for the migrations before serving without Postgres.
_MIGRATE_AT_START_S = 15.0


class DrainHook:
    """Lets a signal handler release the wait room before uvicorn starts waiting for
    in-flight requests (the lifespan's shutdown runs only after they have finished).

    ``trigger()`` is safe from a signal handler or another thread: it only schedules the
    release on the app's loop. No lock (a handler interrupting a lock holder on the same
    thread would deadlock): each side writes its own flag first and then reads the
    other's, so at least one of them releases (releasing twice is harmless).
    """

    def __init__(self) -> None:
        self._triggered = False
        self._target: tuple[asyncio.AbstractEventLoop, Callable[[], None]] | None = None

    @property
    def triggered(self) -> bool:
        return self._triggered

    def trigger(self) -> None:
        self._triggered = True
        target = self._target
        if target is not None:
            loop, release = target
            with contextlib.suppress(RuntimeError):  # loop already closed: nothing parked
                loop.call_soon_threadsafe(release)

    def attach(self, release: Callable[[], None]) -> None:
        self._target = (asyncio.get_running_loop(), release)
        if self._triggered:
            release()

    def detach(self) -> None:
        self._target = None


def create_app(settings: Settings, *, drain: DrainHook | None = None) -> Starlette:
    auth = Auth(settings.api_keys, settings.complete_token)
    drain = drain or DrainHook()
    metrics = ApiMetrics()
    replica_id = (
        settings.replica_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        keys = Keys(settings.redis_prefix)
        async with contextlib.AsyncExitStack() as stack:
            redis = Redis.from_pool(
                BlockingConnectionPool.from_url(
                    settings.redis_url,
                    max_connections=REDIS_MAX_CONNECTIONS,
                    timeout=_REDIS_POOL_TIMEOUT_S,
                    # Detects a silently dead pub/sub connection (no RST) within ~30 s.
                    health_check_interval=15,
                )
            )
            stack.push_async_callback(redis.aclose)
            camunda = await stack.enter_async_context(
                CamundaClient(
                    settings.camunda_base_url, timeout_s=settings.camunda_timeout_ms / 1000
                )
            )
            pool = await db.open_pool(settings.database_url)
            stack.push_async_callback(pool.close)
            store = ProcessStore(
                redis,
                keys,
                result_ttl_s=settings.result_ttl_s,
                pending_ttl_s=settings.pending_ttl_s,
            )
            waitroom = await stack.enter_async_context(
                WaitRoom(redis, keys, store, metrics=metrics, max_parked=_parking_places(settings))
            )
            flusher = Flusher(
                redis,
                keys,
                pool,
                consumer=replica_id,
                batch=settings.writebehind_batch,
                block_ms=settings.writebehind_block_ms,
                claim_idle_ms=settings.writebehind_claim_idle_ms,
            )
            stop, migrated = asyncio.Event(), asyncio.Event()
            persist = asyncio.create_task(_persist(pool, flusher, stop, migrated), name="persist")
            stack.push_async_callback(
                _stop_persist, persist, stop, flusher, settings.shutdown_grace_s
            )
            # Serve with the schema in place when Postgres answers; if it does not, serve
            # from Redis anyway (readiness says Postgres is down) and migrate when it is back.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_MIGRATE_AT_START_S):
                    await migrated.wait()
            drain.attach(waitroom.release_all)
            stack.callback(drain.detach)
            log.info("api ready", extra={"replica": replica_id})
            yield {
                "deps": Deps(
                    settings=settings,
                    keys=keys,
                    redis=redis,
                    store=store,
                    waitroom=waitroom,
                    camunda=camunda,
                    pool=pool,
                    auth=auth,
                    metrics=metrics,
                    flusher=flusher,
                )
            }
            # Shutdown: anything still parked is answered now, before the flush.
            waitroom.release_all()

    app = Starlette(
        routes=ROUTES,
        lifespan=lifespan,
        middleware=[Middleware(OutcomeMiddleware, metrics=metrics)],
        exception_handlers={
            ApiError: _api_error,
            HTTPException: _http_error,
            RedisError: _unavailable("Redis"),
            psycopg.Error: _unavailable("Postgres"),
            PoolTimeout: _unavailable("Postgres"),
            Exception: _internal_error,
        },
    )
    app.state.openapi = render_openapi(auth)
    app.state.docs_html = docs_html()
    return app


async def _persist(
    pool: AsyncConnectionPool, flusher: Flusher, stop: asyncio.Event, migrated: asyncio.Event
) -> None:
    """Migrate (retrying while Postgres is down: the API serves from Redis meanwhile and the
    stream keeps every entry), then run the flusher until ``stop``."""
    delay_s = 0.5
    while not stop.is_set():
        try:
            version = await db.migrate(pool)
        except (psycopg.Error, PoolTimeout) as exc:
            log.warning("migrations not applied yet; retrying", extra={"error": repr(exc)})
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay_s):
                    await stop.wait()
            delay_s = min(delay_s * 2, _MIGRATE_BACKOFF_MAX_S)
        else:
            log.info("postgres schema ready", extra={"version": version})
            migrated.set()
            await flusher.run(stop)
            return


async def _stop_persist(
    task: asyncio.Task[None], stop: asyncio.Event, flusher: Flusher, grace_s: float
) -> None:
    """Stop following the stream, then write what this replica owes within the grace."""
    stop.set()
    done, _ = await asyncio.wait({task}, timeout=grace_s)
    if not done:
        log.warning("flusher did not stop in time; cancelling it")
        task.cancel()
        await asyncio.wait({task})
    elif not task.cancelled() and (error := task.exception()) is not None:
        log.error("persistence task failed", exc_info=error)
    if not await flusher.drain(grace_s):
        log.warning("write-behind not drained; the rest stays in the stream for other replicas")


# --- errors as JSON --------------------------------------------------------------------------


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.body, status_code=exc.status_code, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 (unknown path, wrong method), keeping headers such as Allow."""
    assert isinstance(exc, HTTPException)
    message = {
        404: f"no such endpoint: {request.url.path}",
        405: f"method {request.method} not allowed",
    }
    body = ErrorBody(error=message.get(exc.status_code, str(exc.detail)))
    return JSONResponse(body, status_code=exc.status_code, headers=dict(exc.headers or {}))


def _unavailable(name: str) -> Callable[[Request, Exception], Any]:
    async def handler(request: Request, exc: Exception) -> Response:
        log.warning("%s unavailable", name, extra={"error": repr(exc), "path": request.url.path})
        body = ErrorBody(error=f"{name} is unavailable; retry later")
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})

    return handler


async def _internal_error(request: Request, exc: Exception) -> Response:
    """A bug: logged with its traceback, answered as JSON like every other error."""
    log.error("unhandled error", exc_info=exc, extra={"path": request.url.path})
    return JSONResponse(ErrorBody(error="internal error"), status_code=500)


#: File descriptors kept for everything but parked requests (pools, logs, new requests).
_FD_RESERVE = 512


def _parking_places(settings: Settings) -> int:
    """MAX_PARKED, within what the open-files limit allows: past it, a request that could
    not get a socket would fail; answering 202 at once is the graceful alternative."""
    open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    places = min(settings.max_parked, max(open_files - _FD_RESERVE, 1))
    if places < settings.max_parked:
        log.warning(
            "MAX_PARKED lowered to fit the open-files limit",
            extra={"maxParked": settings.max_parked, "openFiles": open_files, "places": places},
        )
    return places
