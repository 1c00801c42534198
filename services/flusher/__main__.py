"""``python -m flowgate.services.flusher`` (or ``flowgate-flusher``): the write-behind on its own.

By default every API replica runs a flusher among its background work
(services/background/).
Under load that flusher takes a share of the core the requests need; with
``WRITEBEHIND_IN_API=false`` the replicas only migrate, and processes of this kind copy the
streams to Postgres instead (``make up``, compose and Kubernetes run one). They share the
streams through the consumer group as replicas do, so any number may run, and every
guarantee of the write-behind holds as it does in a replica. SIGTERM or SIGINT stops
reading and writes what this consumer owes within ``SHUTDOWN_GRACE_S``.

``/healthz`` (and ``/metrics``: this process's own) on ``FLUSHER_HEALTH_PORT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import uuid

import uvloop
from prometheus_client import REGISTRY, generate_latest
from psycopg_pool import AsyncConnectionPool

from flowgate.services.flusher.writebehind import Flusher, stop_flushing
from flowgate.shared import postgres
from flowgate.shared.health import serve_health
from flowgate.shared.keys import Keys
from flowgate.shared.logs import configure_logging
from flowgate.shared.redis_client import connect, read_topology
from flowgate.shared.settings import Settings, load_settings

log = logging.getLogger("flowgate.services.flusher")

#: Bounds every Redis call (a blocked flusher must notice a dead connection).
REDIS_TIMEOUT_S = 10.0


def main() -> None:
    settings = load_settings()
    configure_logging(settings.log_level)
    uvloop.run(_run(settings))


async def _run(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await serve(settings, stop=stop)


async def serve(settings: Settings, *, stop: asyncio.Event) -> None:
    """Flush until ``stop``, then drain what this consumer owes."""
    consumer = f"flusher-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    async with contextlib.AsyncExitStack() as stack:
        redis = connect(
            settings.redis_url, cluster=settings.redis_cluster, socket_timeout_s=REDIS_TIMEOUT_S
        )
        stack.push_async_callback(redis.aclose)
        await read_topology(redis)
        # Unchecked: a batch that meets a dead connection is retried on a new one anyway, and
        # a check would add a round trip to every batch.
        pool = await postgres.open_pool(settings.database_url, checked=False)
        stack.push_async_callback(pool.close)
        flusher = Flusher(
            redis,
            Keys(settings.redis_prefix),
            pool,
            consumer=consumer,
            batch=settings.writebehind_batch,
            idle_ms=settings.writebehind_idle_ms,
            claim_idle_ms=settings.writebehind_claim_idle_ms,
        )
        migrated = asyncio.Event()
        await stack.enter_async_context(
            serve_health(
                settings.flusher_health_port,
                host=settings.flusher_health_host,
                # Alive while it runs; Postgres being away is the backlog's to show.
                status=lambda: (True, {"consumer": consumer, "migrated": migrated.is_set()}),
                metrics=lambda: generate_latest(REGISTRY),
                metrics_token=settings.metrics_token,
            )
        )
        log.info("flusher started", extra={"consumer": consumer})
        async with asyncio.TaskGroup() as tasks:
            flushing = tasks.create_task(_flush(pool, flusher, stop, migrated), name="flush")
            await stop.wait()
            await stop_flushing(flushing, stop, flusher, settings.shutdown_grace_s)
        log.info("flusher stopped", extra={"consumer": consumer})


async def _flush(
    pool: AsyncConnectionPool, flusher: Flusher, stop: asyncio.Event, migrated: asyncio.Event
) -> None:
    """Migrate (retrying while Postgres is down), then copy the streams until ``stop``."""
    if await postgres.migrate_when_up(pool, stop):
        migrated.set()
        await flusher.run(stop)


if __name__ == "__main__":
    main()
