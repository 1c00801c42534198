"""Where a worker records what happened: a run's end, its steps and audit rows, in Redis.

Redis may be away for a while, and neither a task's outcome nor its retries may be lost
to that:

* :meth:`Recorder.keep_gate` (in the worker's task group) pings Redis every second and keeps
  a gate: open while Redis answers, closed while it does not;
* the poll loop waits at the gate before it fetches, so no new work starts whose outcome
  could not be recorded;
* the executor waits at the gate before it tells the engine (the lock keeper holds the
  task meanwhile), so a Redis outage never turns into a failure that burns the task's
  retries, nor into an engine that moved on while nobody could hear of it;
* :meth:`finish` and :meth:`record` retry until Redis takes them, so what the engine
  accepted reaches its run and the audit trail once Redis is back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from flowgate.services.worker.metrics import WorkerMetrics
from flowgate.shared.aio import Backoff, sleep_or_stop
from flowgate.shared.eventlog import EventRecord, append_event
from flowgate.shared.keys import Keys
from flowgate.shared.redis_client import REDIS_ERRORS, RedisClient
from flowgate.shared.state import Status
from flowgate.shared.steps import StepEvent
from flowgate.shared.store.runs import RunStore

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 1.0


class Recorder:
    def __init__(
        self, redis: RedisClient, keys: Keys, store: RunStore, metrics: WorkerMetrics
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._store = store
        self._metrics = metrics
        self._up = asyncio.Event()
        self._up.set()  # until a ping or a write says otherwise

    @property
    def up(self) -> bool:
        return self._up.is_set()

    async def ready(self) -> None:
        """Return once Redis answers (at once while it does)."""
        await self._up.wait()

    async def keep_gate(self, stop: asyncio.Event) -> None:
        """Keep the gate: ping Redis every second until ``stop``."""
        while True:
            try:
                await self._redis.ping()
            except (*REDIS_ERRORS, OSError, TimeoutError) as exc:
                self._down(exc)
            else:
                self._back()
            if await sleep_or_stop(stop, WATCH_INTERVAL_S):
                return

    async def finish(
        self,
        correlation_id: str,
        status: Status,
        *,
        data: Any = None,
        error: Any = None,
        event: EventRecord | None = None,
        step: StepEvent | None = None,
        cause: str | None = None,
    ) -> None:
        """End the run (with its audit row and its last step), retrying until Redis takes it;
        ``cause``: the traceparent of the span that ended it (the wake's link)."""
        await self._until_written(
            lambda: self._store.finish(
                correlation_id,
                status,
                data=data,
                error=error,
                event=event,
                step=step,
                cause=cause,
            )
        )

    async def step(self, correlation_id: str, step: StepEvent, event: EventRecord) -> None:
        """Add a step to the run's record with its audit row, retrying until Redis takes it."""
        await self._until_written(
            lambda: self._store.steps.record(correlation_id, step, event, worker=True)
        )

    async def claim(self, correlation_id: str, activity_instance_id: str, worker_id: str) -> None:
        """Claim a step before telling the engine it ended (shared/store/steps.py), retrying
        until Redis takes it."""
        await self._until_written(
            lambda: self._store.steps.claim(correlation_id, activity_instance_id, worker_id)
        )

    async def release(self, correlation_id: str, activity_instance_id: str, worker_id: str) -> None:
        """Give up the claim of a step the engine did not take, retrying until Redis takes it."""
        await self._until_written(
            lambda: self._store.steps.release(correlation_id, activity_instance_id, worker_id)
        )

    async def client_deadline(self, correlation_id: str) -> datetime | None:
        """When the client that started the run stops waiting (None: it did not wait, or
        Redis cannot say now: the step then runs as if no client waited)."""
        try:
            return await self._store.client_deadline(correlation_id)
        except (*REDIS_ERRORS, OSError, TimeoutError) as exc:
            self._down(exc)
            return None

    async def record(self, event: EventRecord) -> None:
        """Queue an audit row, retrying until Redis takes it."""
        await self._until_written(lambda: append_event(self._redis, self._keys, event))

    async def _until_written(self, write: Callable[[], Awaitable[object]]) -> None:
        backoff = Backoff(base_s=0.2, cap_s=5.0)
        while True:
            try:
                await write()
            except (*REDIS_ERRORS, OSError, TimeoutError) as exc:
                self._down(exc)
                self._metrics.record_retries.inc()
                await asyncio.sleep(backoff.next_delay_s())
            else:
                self._back()
                return

    def _down(self, exc: BaseException) -> None:
        if self._up.is_set():
            log.error("Redis unreachable: no new work until it answers (%s)", exc)
            self._up.clear()
            self._metrics.redis_up.set(0)

    def _back(self) -> None:
        if not self._up.is_set():
            log.info("Redis answers again")
            self._up.set()
            self._metrics.redis_up.set(1)
