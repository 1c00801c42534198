"""What an endpoint can reach, and the one place that opens and closes it all.

:func:`open_deps` opens, in order, Redis, the engine client, the Postgres pool (migrating
in the background until Postgres answers) and the wait room (its subscription confirmed
before the app serves); it closes them in reverse, answering what is parked first. Its
tasks live in one task group, so none outlives the app. What a replica does besides
serving requests is services/background/, composed beside the app by the process's entry
point.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
from collections.abc import AsyncIterator
from dataclasses import dataclass

from psycopg_pool import AsyncConnectionPool
from starlette.requests import Request

from flowgate.services.api.auth import Auth
from flowgate.services.api.cancel import Canceller
from flowgate.services.api.limits import Limits, TenantLimits
from flowgate.services.api.messages import Messages
from flowgate.services.api.metrics import ApiMetrics
from flowgate.services.api.pace import Pace
from flowgate.services.api.readtokens import ReadTokens
from flowgate.services.api.retry import Retrier
from flowgate.services.api.runs import Runs
from flowgate.services.api.settled import Settled
from flowgate.services.api.starter import Starter
from flowgate.services.api.usertasks import UserTasks
from flowgate.services.api.waiting import WaitingOn
from flowgate.services.api.waitroom import WaitRoom
from flowgate.shared import postgres
from flowgate.shared.aio import Spawner, stop_and_wait
from flowgate.shared.camunda import CamundaClient
from flowgate.shared.keys import Keys
from flowgate.shared.redis_client import RedisClient, connect, read_topology
from flowgate.shared.settings import Settings
from flowgate.shared.store.runs import RunStore
from flowgate.shared.tracing import OFF, Tracing

log = logging.getLogger(__name__)

#: Redis connections one replica may use at once; requests beyond it queue for one (a
#: thousand parked requests re-reading state must not open a thousand connections).
REDIS_MAX_CONNECTIONS = 64
_REDIS_POOL_TIMEOUT_S = 5.0
#: How long start-up waits for the migrations before serving without Postgres.
_MIGRATE_AT_START_S = 15.0
_SUBSCRIBE_TIMEOUT_S = 10.0
#: File descriptors kept for everything but parked requests (pools, logs, new requests).
_FD_RESERVE = 512


@dataclass(frozen=True, slots=True)
class ApiOptions:
    """What the endpoints need from the settings (their environment names in comments)."""

    sync_timeout_ms: int = 25_000  # SYNC_TIMEOUT_MS
    max_wait_ms: int = 60_000  # MAX_WAIT_MS
    retry_after_s: int = 2  # RETRY_AFTER_S
    max_body_bytes: int = 1_048_576  # MAX_BODY_BYTES
    body_timeout_s: float = 10.0  # BODY_TIMEOUT_S
    max_variables_depth: int = 32  # MAX_VARIABLES_DEPTH
    callback_allowed_hosts: tuple[str, ...] = ()  # CALLBACK_ALLOWED_HOSTS
    system_variables_from_clients: tuple[str, ...] = ()  # SYSTEM_VARIABLES_FROM_CLIENTS

    @classmethod
    def of(cls, settings: Settings) -> ApiOptions:
        return cls(
            sync_timeout_ms=settings.sync_timeout_ms,
            max_wait_ms=settings.max_wait_ms,
            retry_after_s=settings.retry_after_s,
            max_body_bytes=settings.max_body_bytes,
            body_timeout_s=settings.body_timeout_s,
            max_variables_depth=settings.max_variables_depth,
            callback_allowed_hosts=settings.callback_allowed_hosts,
            system_variables_from_clients=settings.system_variables_from_clients,
        )


@dataclass(frozen=True, slots=True)
class Deps:
    options: ApiOptions
    auth: Auth
    metrics: ApiMetrics
    keys: Keys
    replica_id: str
    redis: RedisClient
    camunda: CamundaClient
    pool: AsyncConnectionPool
    #: Set once Postgres has the schema (it may come later than the app: see open_deps).
    migrated: asyncio.Event
    store: RunStore
    runs: Runs
    starter: Starter
    waitroom: WaitRoom
    canceller: Canceller
    usertasks: UserTasks
    retrier: Retrier
    messages: Messages
    waiting: WaitingOn
    #: How long each process's runs take: the Retry-After of a 202 (pace.py).
    pace: Pace
    #: Spans of this replica (shared/tracing.py; off unless OTEL_* asks for them).
    tracing: Tracing
    #: Each tenant's limits (limits.py) and the runs' read tokens (readtokens.py).
    limits: Limits
    read_tokens: ReadTokens
    #: Work that outlives its request (an engine start whose client stopped waiting).
    spawner: Spawner


def deps(request: Request) -> Deps:
    """The lifespan's bundle for this request (``yield {"deps": ...}`` in app.py)."""
    bundle: Deps = request.state.deps
    return bundle


@contextlib.asynccontextmanager
async def open_deps(
    settings: Settings,
    *,
    auth: Auth,
    metrics: ApiMetrics,
    replica_id: str,
    tracing: Tracing = OFF,
) -> AsyncIterator[Deps]:
    """Everything the endpoints use, open for the duration of the block."""
    keys = Keys(settings.redis_prefix)
    async with contextlib.AsyncExitStack() as stack:
        redis = connect(
            settings.redis_url,
            cluster=settings.redis_cluster,
            max_connections=REDIS_MAX_CONNECTIONS,
            pool_timeout_s=_REDIS_POOL_TIMEOUT_S,
            # Detects a silently dead pub/sub connection (no RST) within ~30 s.
            health_check_interval=15,
        )
        stack.push_async_callback(redis.aclose)
        await read_topology(redis)
        camunda = await stack.enter_async_context(CamundaClient.from_settings(settings))
        await camunda.introduce(log)
        pool = await postgres.open_pool(settings.database_url)
        stack.push_async_callback(pool.close)
        store = RunStore.from_settings(redis, keys, settings)
        pace = Pace(default_s=settings.retry_after_s)
        settled = Settled(
            result_ttl_s=settings.result_ttl_s, max_bytes=settings.settled_cache_mb * 2**20
        )
        waitroom = WaitRoom(
            redis,
            keys,
            store,
            metrics=metrics,
            max_parked=_parking_places(settings),
            settled=settled,
            pace=pace,
            tracing=tracing,
        )
        runs = Runs(store, pool, settled=settled)
        stop, migrated = asyncio.Event(), asyncio.Event()
        async with asyncio.TaskGroup() as tasks:
            spawner = Spawner(tasks)
            listening = tasks.create_task(waitroom.listen(stop), name="waitroom")
            migrating = tasks.create_task(_migrate(pool, stop, migrated), name="migrate")
            try:
                await waitroom.subscribed(_SUBSCRIBE_TIMEOUT_S)
                # Serve with the schema in place when Postgres answers; if it does not, serve
                # from Redis anyway (readiness says Postgres is down) and migrate when it is
                # back.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_MIGRATE_AT_START_S):
                        await migrated.wait()
                yield Deps(
                    options=ApiOptions.of(settings),
                    auth=auth,
                    metrics=metrics,
                    keys=keys,
                    replica_id=replica_id,
                    redis=redis,
                    camunda=camunda,
                    pool=pool,
                    migrated=migrated,
                    store=store,
                    runs=runs,
                    starter=Starter(
                        store,
                        camunda,
                        waitroom,
                        spawner,
                        metrics,
                        engine_timeout_s=settings.camunda_timeout_ms / 1000,
                        tracing=tracing,
                    ),
                    waitroom=waitroom,
                    canceller=Canceller(store, runs, camunda, waitroom, metrics),
                    usertasks=UserTasks(
                        store,
                        runs,
                        camunda,
                        waitroom,
                        redis,
                        keys,
                        result_ttl_s=settings.result_ttl_s,
                    ),
                    retrier=Retrier(
                        store, runs, camunda, waitroom, retries=settings.worker_retries
                    ),
                    messages=Messages(
                        store,
                        runs,
                        camunda,
                        waitroom,
                        redis,
                        keys,
                        spawner,
                        hold_s=settings.message_hold_ms / 1000,
                        result_ttl_s=settings.result_ttl_s,
                    ),
                    waiting=WaitingOn(camunda, redis, keys),
                    pace=pace,
                    tracing=tracing,
                    limits=Limits(
                        redis,
                        keys,
                        TenantLimits(
                            starts_per_s=settings.tenant_starts_per_s,
                            runs_in_flight=settings.tenant_runs_in_flight,
                            parked=settings.tenant_parked,
                            streams=settings.tenant_streams,
                        ),
                        pending_ttl_s=settings.pending_ttl_s,
                    ),
                    read_tokens=ReadTokens(
                        redis,
                        keys,
                        secret=settings.read_token_secret,
                        ttl_s=settings.read_token_ttl_s,
                    ),
                    spawner=spawner,
                )
            finally:
                # Anything still parked is answered now; engine starts in flight get the
                # grace to attach (what does not, recovery on another replica settles).
                waitroom.release_all()
                await spawner.drain(settings.shutdown_grace_s)
                await stop_and_wait(stop, [listening, migrating])


async def _migrate(pool: AsyncConnectionPool, stop: asyncio.Event, migrated: asyncio.Event) -> None:
    if await postgres.migrate_when_up(pool, stop):
        migrated.set()


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
