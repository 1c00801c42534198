"""The poll loop: one long poll for every topic, handler slots, shutdown.

Life of a worker (:meth:`Worker.run`):

1. unlock the tasks its predecessor in the same slot still holds (services/worker/identity.py);
2. until ``stop`` is set: wait for room, then one ``fetchAndLock`` for all topics with
   ``maxTasks`` = the room left, raced against ``stop`` so a shutdown cancels the long poll
   instead of waiting it out. Room is ``WORKER_CONCURRENCY`` + ``WORKER_PREFETCH`` tasks
   held: at most ``WORKER_CONCURRENCY`` handlers run (a slot each), the others wait for a
   slot or report their outcome to the engine, which holds no slot. So the next poll is
   open while a batch runs, a freed slot starts its next task without a round trip to the
   engine, and engine latency stops costing handler time (hidden, as the Node client hides
   it, but with the work held bounded). Each task runs in the task group beside a keeper
   that extends its lock (services/worker/locks.py) from the fetch on, so a task waiting
   for a slot keeps it;
3. on stop: drop the tasks still waiting for a slot (they never start), give running
   handlers ``WORKER_SHUTDOWN_GRACE_S``, cancel the rest, and unlock every task still
   locked to this worker id, so another worker takes them at once.

Fetch errors (engine down, "too many requests", 5xx) back off exponentially with jitter
and the loop carries on: a worker never needs a restart because the engine had one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from flowgate.services.worker.context import TaskContext, task_logger
from flowgate.services.worker.executor import Executor, Outcome
from flowgate.services.worker.locks import Locks, lock_kept
from flowgate.services.worker.metrics import WorkerMetrics
from flowgate.services.worker.recorder import Recorder
from flowgate.services.worker.registry import Handler, Registry
from flowgate.shared.aio import (
    Backoff,
    cancel_and_wait,
    grace_then_cancel,
    race_stop,
    sleep_or_stop,
    stop_and_wait,
)
from flowgate.shared.camunda import CamundaClient, CamundaError, LockedTask, TopicRequest
from flowgate.shared.settings import Settings
from flowgate.shared.tracing import TRACEPARENT

log = logging.getLogger(__name__)

#: An empty answer faster than this means the engine is not long-polling (timeout 0):
#: pause between polls instead of spinning.
FAST_EMPTY_POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """What the poll loop needs from the settings (their environment names in comments)."""

    concurrency: int = 10  # WORKER_CONCURRENCY
    prefetch: int = 10  # WORKER_PREFETCH
    max_tasks: int = 10  # CAMUNDA_MAX_TASKS
    lock_duration_ms: int = 20_000  # CAMUNDA_LOCK_DURATION_MS
    poll_timeout_ms: int = 30_000  # CAMUNDA_ASYNC_RESPONSE_TIMEOUT_MS
    shutdown_grace_s: float = 10.0  # WORKER_SHUTDOWN_GRACE_S
    #: Fetch each task's ``traceparent`` too (tracing is on: shared/tracing.py).
    traced: bool = False

    @classmethod
    def of(cls, settings: Settings, *, traced: bool = False) -> WorkerOptions:
        return cls(
            traced=traced,
            concurrency=settings.worker_concurrency,
            prefetch=settings.worker_prefetch,
            max_tasks=settings.camunda_max_tasks,
            lock_duration_ms=settings.camunda_lock_duration_ms,
            poll_timeout_ms=settings.camunda_async_response_timeout_ms,
            shutdown_grace_s=settings.worker_shutdown_grace_s,
        )


class Worker:
    def __init__(
        self,
        *,
        options: WorkerOptions,
        registry: Registry,
        camunda: CamundaClient,
        executor: Executor,
        locks: Locks,
        recorder: Recorder,
        http: httpx.AsyncClient,
        metrics: WorkerMetrics,
        worker_id: str,
        previous_id: str | None = None,
    ) -> None:
        if not len(registry):
            raise ValueError("a worker needs at least one registered handler")
        self.worker_id = worker_id
        self._options = options
        self._registry = registry
        self._camunda = camunda
        self._executor = executor
        self._locks = locks
        self._recorder = recorder
        self._http = http
        self._metrics = metrics
        self._previous_id = previous_id if previous_id != worker_id else None
        self._configs = registry.configs()
        #: Every task fetched and not done; of those, the ones still waiting for a slot.
        self._running: set[asyncio.Task[None]] = set()
        self._waiting: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(options.concurrency)
        metrics.slots.set(options.concurrency)
        self._handling = 0  # handlers running (slots taken)
        self._slot_freed = asyncio.Event()
        self._polling = False
        self._fetch_errors = 0

    @staticmethod
    def topics(registry: Registry, options: WorkerOptions) -> list[TopicRequest]:
        """The fetchAndLock topics of ``registry`` (see :meth:`Registry.fetch_topics`), with
        the run's ``traceparent`` when tracing."""
        topics = registry.fetch_topics(options.lock_duration_ms)
        if not options.traced:
            return topics
        return [
            topic
            if topic.variables is None
            else dataclasses.replace(topic, variables=[*topic.variables, TRACEPARENT])
            for topic in topics
        ]

    # --- lifecycle -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, *, force: asyncio.Event | None = None) -> None:
        """Work until ``stop`` is set, then drain; ``force`` cuts the grace period short."""
        if self._previous_id:
            await self._locks.release_all(self._previous_id, "predecessor")
            # Its abandoned poll may still lock tasks: the live workers keep watch.
            await self._locks.departed(self._previous_id)
        topics = self.topics(self._registry, self._options)
        log.info(
            "worker started",
            extra={"workerId": self.worker_id, "topics": [t.topic_name for t in topics]},
        )
        try:
            async with asyncio.TaskGroup() as group:
                upkeep_stop = asyncio.Event()
                upkeep = [
                    group.create_task(self._locks.sweep_departed(upkeep_stop), name="sweep"),
                    group.create_task(self._recorder.keep_gate(upkeep_stop), name="redis-gate"),
                ]
                self._polling = True
                try:
                    await self._poll(group, stop, topics)
                finally:
                    self._polling = False
                await self._drain(force)
                await stop_and_wait(upkeep_stop, upkeep)
        finally:
            await self._locks.departed(self.worker_id)
            await self._locks.release_all(self.worker_id, "own")
            log.info("worker stopped", extra={"workerId": self.worker_id})

    def health(self) -> tuple[bool, dict[str, object]]:
        """For ``/healthz``: alive while the poll loop runs (engine trouble is not death)."""
        return self._polling, {
            "workerId": self.worker_id,
            "inFlight": self._handling,
            "prefetched": len(self._waiting),
            "consecutiveFetchErrors": self._fetch_errors,
            "redisUp": self._recorder.up,
        }

    # --- polling ---------------------------------------------------------------------------

    async def _poll(
        self, group: asyncio.TaskGroup, stop: asyncio.Event, topics: list[TopicRequest]
    ) -> None:
        options = self._options
        errors, empties = Backoff(base_s=0.5, cap_s=30.0), Backoff(base_s=0.1, cap_s=5.0)
        room = options.concurrency + options.prefetch
        while await self._free_room(stop, room):
            if not self._recorder.up:  # nothing starts whose outcome could not be recorded
                log.warning("Redis unreachable: not fetching until it answers")
                await race_stop(stop, self._recorder.ready())
                continue
            max_tasks = min(room - len(self._running), options.max_tasks)
            started = time.monotonic()
            try:
                tasks = await race_stop(
                    stop,
                    self._camunda.fetch_and_lock(
                        self.worker_id,
                        topics,
                        max_tasks=max_tasks,
                        async_response_timeout_ms=options.poll_timeout_ms,
                    ),
                )
            except (CamundaError, ValueError, KeyError) as exc:  # incl. a garbled answer
                self._fetch_errors += 1
                self._metrics.fetch_errors.inc()
                delay = errors.next_delay_s()
                log.warning("fetchAndLock failed (%s); next poll in %.1f s", exc, delay)
                await sleep_or_stop(stop, delay)
                continue
            if tasks is None:
                return  # stopped while polling; the poll was cancelled
            self._metrics.fetch_seconds.observe(time.monotonic() - started)
            self._fetch_errors = 0
            errors.reset()
            self._metrics.fetched.inc(len(tasks))
            fetched_at = time.time()
            for task in tasks:
                if task.create_time is not None:
                    waited = fetched_at - task.create_time.timestamp()
                    self._metrics.handoff_seconds.observe(max(waited, 0.0))
                self._start(group, task)
            if not tasks:
                self._metrics.empty_polls.inc()
                if time.monotonic() - started < FAST_EMPTY_POLL_S:
                    await sleep_or_stop(stop, empties.next_delay_s())
            else:
                empties.reset()

    async def _free_room(self, stop: asyncio.Event, room: int) -> bool:
        """Wait until fewer than ``room`` tasks are held; False once ``stop`` is set."""
        while not stop.is_set() and len(self._running) >= room:
            self._slot_freed.clear()
            await race_stop(stop, self._slot_freed.wait())
        return not stop.is_set()

    def _start(self, group: asyncio.TaskGroup, task: LockedTask) -> None:
        handler = self._registry.get(task.topic_name, task.process_definition_key)
        if handler is None:  # the fetch's process filter makes this an engine's oddity
            log.error(
                "no handler for a task of %r in process %r: unlocking it",
                task.topic_name,
                task.process_definition_key,
                extra={"taskId": task.id},
            )
            group.create_task(self._unlock(task), name=f"unlock:{task.id}")
            return
        running = group.create_task(self._process(handler, task), name=f"task:{task.id}")
        self._running.add(running)
        self._waiting.add(running)
        running.add_done_callback(self._finished)

    async def _unlock(self, task: LockedTask) -> None:
        with contextlib.suppress(CamundaError):  # else its lock expires
            await self._camunda.unlock(task.id)

    def _finished(self, running: asyncio.Task[None]) -> None:
        self._running.discard(running)
        self._waiting.discard(running)
        self._slot_freed.set()

    # --- one task --------------------------------------------------------------------------

    async def _process(self, handler: Handler, task: LockedTask) -> None:
        ctx = TaskContext(
            task=task,
            http=self._http,
            log=task_logger(log, task),
            config=self._configs[handler.process.key],
        )
        outcome = Outcome.UNREPORTED
        try:
            async with lock_kept(
                self._camunda,
                task,
                worker_id=self.worker_id,
                lock_ms=handler.lock_duration_ms or self._options.lock_duration_ms,
                on_extended=self._metrics.lock_extensions.labels(task.topic_name).inc,
                on_lost=lambda why: self._lose_lock(ctx, why),
            ):
                outcome = await self._executor.run(handler, ctx, self._slot())
        except asyncio.CancelledError:
            outcome = Outcome.ABANDONED  # shutdown: the final sweep unlocks it
            ctx.log.info("handler cancelled at shutdown; the task will be unlocked")
            raise
        except Exception:  # a bug in the framework must not take the other tasks down
            ctx.log.exception("task processing crashed")
        finally:
            self._metrics.tasks.labels(task.topic_name, outcome.value).inc()
        # A completed task is counted (flowgate_worker_tasks_total) and traced; a line each
        # cost a tenth of the worker's CPU, so it is logged at DEBUG; every other outcome,
        # which someone may need to look into, at INFO.
        level = logging.DEBUG if outcome is Outcome.COMPLETED else logging.INFO
        ctx.log.log(level, "task %s", outcome.value, extra={"outcome": outcome.value})

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        """Hold one of the ``WORKER_CONCURRENCY`` handler slots while the handler runs (a
        prefetched task waits here, its lock kept)."""
        async with self._slots:
            current = asyncio.current_task()
            assert current is not None
            self._waiting.discard(current)
            self._handling += 1
            self._metrics.in_flight.inc()
            try:
                yield
            finally:
                self._handling -= 1
                self._metrics.in_flight.dec()

    def _lose_lock(self, ctx: TaskContext[Any], why: str) -> None:
        ctx.log.warning("lock lost: %s", why)
        ctx.lock_lost.set()
        self._metrics.lock_lost.labels(ctx.task.topic_name).inc()

    # --- shutdown --------------------------------------------------------------------------

    async def _drain(self, force: asyncio.Event | None) -> None:
        """Drop what never started; give running handlers the grace period (unless
        ``force``), then cancel the rest."""
        await cancel_and_wait(list(self._waiting))
        if not self._running:
            return
        grace_s = self._options.shutdown_grace_s
        log.info("draining %d running task(s), grace %s s", len(self._running), grace_s)
        await grace_then_cancel(list(self._running), grace_s, cut_short=force)
