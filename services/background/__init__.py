"""What an API replica does besides answering requests, composed beside the HTTP app by the
process's entry point (services/api/__main__.py, :func:`alongside`):

=============  ==============================================================================
watcher.py     ends the runs the engine ended and records their steps, from the events it
               pushes (events.py) or else its history (one replica at a time, with a lease)
recovery.py    settles the starts a replica left behind (died, stalled, lost the engine's
               answer): gives up what never reached the engine, finds what did
callbacks.py   delivers ended runs to their callbackUrl, at least once
backlog.py     samples the engine's waiting tasks by topic for the workers' autoscaler (one
               replica at a time, with a lease)
stalls.py      raises ``stalled`` once for a run past a step's declared threshold (one
               replica at a time, with a lease)
services/api/messages.py
               takes over the messages held for a run whose holder died (one replica at a
               time, with a lease)
services/flusher/writebehind.py
               copies the write-behind streams to Postgres, when ``WRITEBEHIND_IN_API`` keeps
               it inside the replica (the deployments run it as a process of its own)
=============  ==============================================================================

Every loop runs in one task group for as long as the app's lifespan, and ends on its stop
event before the app's resources close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import httpx

from flowgate.services.api.deps import Deps
from flowgate.services.background.backlog import Backlog
from flowgate.services.background.callbacks import Deliverer
from flowgate.services.background.events import EngineEvents
from flowgate.services.background.recovery import Recovery
from flowgate.services.background.stalls import Stalls
from flowgate.services.background.watcher import Watcher
from flowgate.services.flusher.writebehind import Flusher, stop_flushing
from flowgate.shared.aio import race_stop, stop_and_wait
from flowgate.shared.settings import Settings

log = logging.getLogger(__name__)


def alongside(settings: Settings) -> Callable[[Deps], AbstractAsyncContextManager[None]]:
    """The replica's background work, for ``create_app(..., alongside=...)``."""
    return lambda deps: running(deps, settings)


@contextlib.asynccontextmanager
async def running(deps: Deps, settings: Settings) -> AsyncIterator[None]:
    """Run the replica's background work for the duration of the block."""
    async with contextlib.AsyncExitStack() as stack:
        callback_http = await stack.enter_async_context(
            httpx.AsyncClient(follow_redirects=False, trust_env=False)
        )
        secret = settings.callback_secret
        if not settings.callback_allowed_hosts:
            log.warning(
                "CALLBACK_ALLOWED_HOSTS is empty: callbacks are off, and a start naming a "
                "callbackUrl is refused (name the hosts, CIDRs, or * for any)"
            )
        deliverer = Deliverer(
            deps.store,
            deps.runs,
            deps.redis,
            deps.keys,
            deps.metrics,
            callback_http,
            secret=secret.get_secret_value() if secret else None,
            allowed_hosts=settings.callback_allowed_hosts,
            max_attempts=settings.callback_max_attempts,
            timeout_s=settings.callback_timeout_ms / 1000,
            tracing=deps.tracing,
        )
        deps.waitroom.on_callback_due(deliverer.nudge)
        watcher = Watcher(
            deps.store,
            deps.camunda,
            deps.redis,
            deps.keys,
            deps.metrics,
            replica_id=deps.replica_id,
            interval_s=settings.watch_interval_ms / 1000,
            events=(
                EngineEvents(deps.redis, deps.keys, settings.engine_events_stream)
                if settings.engine_events_stream
                else None
            ),
        )
        recovery = Recovery(
            deps.store, deps.starter, start_window_s=settings.engine_start_window_ms / 1000
        )
        stop, flush_stop = asyncio.Event(), asyncio.Event()
        async with asyncio.TaskGroup() as tasks:
            loops = [
                tasks.create_task(recovery.run(stop), name="recover-starts"),
                tasks.create_task(watcher.run(stop), name="watch-engine"),
                tasks.create_task(deliverer.run(stop), name="deliver-callbacks"),
                tasks.create_task(deps.messages.run(stop), name="take-over-messages"),
            ]
            if settings.backlog_interval_ms:
                backlog = Backlog(
                    deps.camunda,
                    deps.redis,
                    deps.keys,
                    deps.metrics,
                    replica_id=deps.replica_id,
                    interval_s=settings.backlog_interval_ms / 1000,
                )
                loops.append(tasks.create_task(backlog.run(stop), name="sample-backlog"))
            if settings.stall_interval_ms:
                stalls = Stalls(
                    deps.camunda,
                    deps.redis,
                    deps.keys,
                    deps.runs,
                    deps.metrics,
                    replica_id=deps.replica_id,
                    interval_s=settings.stall_interval_ms / 1000,
                    remember_s=settings.pending_ttl_s,
                )
                loops.append(tasks.create_task(stalls.run(stop), name="look-for-stalls"))
            flusher = None
            if settings.writebehind_in_api:
                flusher = Flusher(
                    deps.redis,
                    deps.keys,
                    deps.pool,
                    consumer=deps.replica_id,
                    batch=settings.writebehind_batch,
                    idle_ms=settings.writebehind_idle_ms,
                    claim_idle_ms=settings.writebehind_claim_idle_ms,
                )
                flushing = tasks.create_task(_flush(deps, flusher, flush_stop), name="flush")
            try:
                yield
            finally:
                if flusher is not None:
                    await stop_flushing(flushing, flush_stop, flusher, settings.shutdown_grace_s)
                await stop_and_wait(stop, loops)


async def _flush(deps: Deps, flusher: Flusher, stop: asyncio.Event) -> None:
    """The flusher, once the replica has migrated the schema."""
    if await race_stop(stop, deps.migrated.wait()):
        await flusher.run(stop)
