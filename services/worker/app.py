"""Open what a worker needs, run it, close everything in reverse: :func:`serve`.

Kept apart from ``__main__`` (which owns signals and logging) so tests run real workers
in-process with their own registry, metrics and stop event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor

import httpx

from flowgate.services.worker.executor import Executor, RetryPolicy
from flowgate.services.worker.identity import claim_identity
from flowgate.services.worker.locks import Locks
from flowgate.services.worker.metrics import WorkerMetrics
from flowgate.services.worker.recorder import Recorder
from flowgate.services.worker.registry import Registry
from flowgate.services.worker.worker import Worker, WorkerOptions
from flowgate.shared.camunda import CamundaClient
from flowgate.shared.health import serve_health
from flowgate.shared.keys import Keys
from flowgate.shared.redis_client import connect, read_topology
from flowgate.shared.settings import Settings
from flowgate.shared.store.runs import RunStore
from flowgate.shared.tracing import Tracing, inject

log = logging.getLogger(__name__)

#: Bound every Redis and outbound HTTP call (handlers may pass their own, shorter ones).
REDIS_TIMEOUT_S = 5.0
HTTP_TIMEOUT_S = 10.0


async def serve(
    settings: Settings,
    registry: Registry,
    *,
    stop: asyncio.Event,
    force: asyncio.Event | None = None,
    name: str | None = None,
    metrics: WorkerMetrics | None = None,
    tracing: Tracing | None = None,
) -> None:
    """Run one worker until ``stop`` is set and it has drained.

    ``name`` is the slot name (``WORKER_NAME``; see services/worker/identity.py);
    ``tracing`` is as the ``OTEL_*`` variables configure it, unless given.
    """
    metrics = metrics or WorkerMetrics()
    tracing = tracing or Tracing.from_environment("flowgate-worker")
    keys = Keys(settings.redis_prefix)
    options = WorkerOptions.of(settings, traced=tracing.on)
    async with contextlib.AsyncExitStack() as stack:
        redis = connect(
            settings.redis_url, cluster=settings.redis_cluster, socket_timeout_s=REDIS_TIMEOUT_S
        )
        stack.push_async_callback(redis.aclose)
        await read_topology(redis)
        camunda = await stack.enter_async_context(CamundaClient.from_settings(settings))
        await camunda.introduce(log)
        stack.push_async_callback(tracing.shutdown)
        # A handler's outbound calls carry its span's trace context (none when off).
        hooks = {"request": [_send_trace]} if tracing.on else {}
        http = await stack.enter_async_context(
            httpx.AsyncClient(timeout=HTTP_TIMEOUT_S, event_hooks=hooks)
        )
        threads = ThreadPoolExecutor(settings.worker_threads, thread_name_prefix="handler")
        # Last out: a synchronous handler abandoned at its timeout is not waited for.
        stack.callback(threads.shutdown, wait=False, cancel_futures=True)
        identity = await stack.enter_async_context(claim_identity(redis, keys, name=name))
        store = RunStore.from_settings(redis, keys, settings)
        recorder = Recorder(redis, keys, store, metrics)
        worker = Worker(
            options=options,
            registry=registry,
            camunda=camunda,
            executor=Executor(
                camunda=camunda,
                worker_id=identity.worker_id,
                retry=RetryPolicy(
                    retries=settings.worker_retries,
                    first_delay_ms=settings.worker_retry_timeout_ms,
                ),
                recorder=recorder,
                metrics=metrics,
                threads=threads,
                tracing=tracing,
            ),
            locks=Locks(
                camunda,
                redis,
                keys,
                worker_id=identity.worker_id,
                topics=Worker.topics(registry, options),
                poll_window_s=options.poll_timeout_ms / 1000,
            ),
            recorder=recorder,
            http=http,
            metrics=metrics,
            worker_id=identity.worker_id,
            previous_id=identity.previous_id,
        )
        await stack.enter_async_context(
            serve_health(
                settings.worker_health_port,
                host=settings.worker_health_host,
                status=worker.health,
                metrics=metrics.render,
                metrics_token=settings.metrics_token,
            )
        )
        await worker.run(stop, force=force)


async def _send_trace(request: httpx.Request) -> None:
    inject(request.headers)
