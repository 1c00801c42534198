"""The poll loop: one long poll for every topic, handler slots, lock extension, shutdown.

Life of a worker (:meth:`Worker.run`):

1. unlock the tasks its predecessor in the same slot still holds (services/worker/identity.py);
2. until ``stop`` is set: wait for a free slot, then one ``fetchAndLock`` for all topics
   with ``maxTasks`` = free slots (never more work than it can start), raced against
   ``stop`` so a shutdown cancels the long poll instead of waiting it out; each task runs
   in the task group with a watchdog that extends its lock at half its duration;
3. on stop: give running handlers ``WORKER_SHUTDOWN_GRACE_S``, cancel the rest, and unlock
   every task still locked to this worker id, so another worker takes them at once (this
   also catches tasks the engine locked for a poll that was cancelled in flight); then
   the live workers keep unlocking what that abandoned poll may still lock
   (services/worker/janitor.py).

Fetch errors (engine down, "too many requests", 5xx) back off exponentially with jitter
and the loop carries on: a worker never needs a restart because the engine had one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import httpx

from services.worker.backoff import Backoff
from services.worker.context import CompletionStore, TaskContext, task_logger
from services.worker.executor import Executor, Outcome
from services.worker.janitor import Janitor
from services.worker.metrics import WorkerMetrics
from services.worker.registry import Handler, Registry
from shared.camunda import (
    BadRequest,
    CamundaClient,
    CamundaError,
    LockedTask,
    NotFound,
    TopicRequest,
)
from shared.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Unlocking at start-up and shutdown gets this long in all.
UNLOCK_TIMEOUT_S = 10.0
#: Passes of the final unlock, and the pause after each (see Worker._release_all).
RELEASE_PASSES = 4
RELEASE_PAUSE_S = 0.2
#: An empty answer faster than this means the engine is not long-polling (timeout 0):
#: pause between polls instead of spinning.
FAST_EMPTY_POLL_S = 0.05


class Worker:
    def __init__(
        self,
        *,
        settings: Settings,
        registry: Registry,
        camunda: CamundaClient,
        executor: Executor,
        store: CompletionStore,
        http: httpx.AsyncClient,
        metrics: WorkerMetrics,
        worker_id: str,
        previous_id: str | None = None,
        janitor: Janitor | None = None,
    ) -> None:
        if not len(registry):
            raise ValueError("a worker needs at least one registered handler")
        self.worker_id = worker_id
        self._settings = settings
        self._registry = registry
        self._camunda = camunda
        self._executor = executor
        self._store = store
        self._http = http
        self._metrics = metrics
        self._previous_id = previous_id
        self._janitor = janitor
        self._running: set[asyncio.Task[None]] = set()
        self._slot_freed = asyncio.Event()
        self._polling = False
        self._fetch_errors = 0
        self._topics = [
            TopicRequest(h.topic, self._lock_ms(h), variables=h.variables) for h in registry
        ]

    # --- lifecycle -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, *, force: asyncio.Event | None = None) -> None:
        """Work until ``stop`` is set, then drain; ``force`` cuts the grace period short."""
        predecessor = self._previous_id if self._previous_id != self.worker_id else None
        if predecessor:
            await self._release_all(predecessor, "predecessor")
            if self._janitor:  # its abandoned poll may still lock tasks: peers keep watch
                await self._janitor.departed(predecessor)
        log.info(
            "worker started",
            extra={"workerId": self.worker_id, "topics": [t.topic_name for t in self._topics]},
        )
        try:
            async with asyncio.TaskGroup() as group:
                janitor = group.create_task(self._sweep_departed())
                self._polling = True
                try:
                    await self._poll(group, stop)
                finally:
                    self._polling = False
                await self._drain(force)
                janitor.cancel()
        finally:
            if self._janitor:
                await self._janitor.departed(self.worker_id)
            await self._release_all(self.worker_id, "own")
            log.info("worker stopped", extra={"workerId": self.worker_id})

    def health(self) -> tuple[bool, dict[str, object]]:
        """For ``/healthz``: alive while the poll loop runs (engine trouble is not death)."""
        return self._polling, {
            "workerId": self.worker_id,
            "inFlight": len(self._running),
            "consecutiveFetchErrors": self._fetch_errors,
        }

    # --- polling ---------------------------------------------------------------------------

    async def _poll(self, group: asyncio.TaskGroup, stop: asyncio.Event) -> None:
        settings = self._settings
        errors, empties = Backoff(base_s=0.5, cap_s=30.0), Backoff(base_s=0.1, cap_s=5.0)
        while await self._free_slot(stop):
            max_tasks = min(
                settings.worker_concurrency - len(self._running), settings.camunda_max_tasks
            )
            started = time.monotonic()
            try:
                tasks = await _unless_stopped(
                    stop,
                    self._camunda.fetch_and_lock(
                        self.worker_id,
                        self._topics,
                        max_tasks=max_tasks,
                        async_response_timeout_ms=settings.camunda_async_response_timeout_ms,
                    ),
                )
            except (
                CamundaError,
                ValueError,
                KeyError,
            ) as exc:  # incl. a garbled answer: keep polling
                self._fetch_errors += 1
                self._metrics.fetch_errors.inc()
                delay = errors.next_delay_s()
                log.warning("fetchAndLock failed (%s); next poll in %.1f s", exc, delay)
                await _unless_stopped(stop, asyncio.sleep(delay))
                continue
            if tasks is None:
                return  # stopped while polling; the poll was cancelled
            self._metrics.fetch_seconds.observe(time.monotonic() - started)
            self._fetch_errors = 0
            errors.reset()
            self._metrics.fetched.inc(len(tasks))
            for task in tasks:
                self._start(group, task)
            if not tasks:
                self._metrics.empty_polls.inc()
                if time.monotonic() - started < FAST_EMPTY_POLL_S:
                    await _unless_stopped(stop, asyncio.sleep(empties.next_delay_s()))
            else:
                empties.reset()

    async def _free_slot(self, stop: asyncio.Event) -> bool:
        """Wait until a handler slot is free; False once ``stop`` is set."""
        while not stop.is_set() and len(self._running) >= self._settings.worker_concurrency:
            self._slot_freed.clear()
            await _unless_stopped(stop, self._slot_freed.wait())
        return not stop.is_set()

    def _start(self, group: asyncio.TaskGroup, task: LockedTask) -> None:
        handler = self._registry.get(task.topic_name)
        running = group.create_task(self._process(handler, task), name=f"task:{task.id}")
        self._running.add(running)
        self._metrics.in_flight.inc()
        running.add_done_callback(self._finished)

    def _finished(self, running: asyncio.Task[None]) -> None:
        self._running.discard(running)
        self._metrics.in_flight.dec()
        self._slot_freed.set()

    # --- one task --------------------------------------------------------------------------

    async def _process(self, handler: Handler, task: LockedTask) -> None:
        ctx = TaskContext(
            task=task,
            settings=self._settings,
            store=self._store,
            http=self._http,
            log=task_logger(log, task),
        )
        keeper = asyncio.create_task(self._keep_lock(task, self._lock_ms(handler), ctx))
        outcome = Outcome.UNREPORTED
        try:
            outcome = await self._executor.run(handler, ctx)
        except asyncio.CancelledError:
            outcome = Outcome.ABANDONED  # shutdown: the final sweep unlocks it
            ctx.log.info("handler cancelled at shutdown; the task will be unlocked")
            raise
        except Exception:  # a bug in the framework must not take the other tasks down
            ctx.log.exception("task processing crashed")
        finally:
            keeper.cancel()
            self._metrics.tasks.labels(task.topic_name, outcome.value).inc()
        ctx.log.info("task %s", outcome.value, extra={"outcome": outcome.value})

    async def _keep_lock(self, task: LockedTask, lock_ms: int, ctx: TaskContext) -> None:
        """Extend the lock at half its duration while the handler runs.

        A refusal (404: the task is gone; 400: the lock expired or another worker has it)
        marks the lock lost. A transient error is retried until the lock would expire.
        """
        lock_s = lock_ms / 1000
        expires = time.monotonic() + lock_s
        next_try = expires - lock_s / 2
        while True:
            await asyncio.sleep(max(0.0, next_try - time.monotonic()))
            sent = time.monotonic()
            try:
                async with asyncio.timeout(max(0.1, expires - sent)):
                    await self._camunda.extend_lock(
                        task.id, worker_id=self.worker_id, new_duration_ms=lock_ms
                    )
            except (NotFound, BadRequest) as exc:
                self._lose_lock(ctx, f"extension refused: {exc}")
                return
            except (CamundaError, TimeoutError) as exc:
                now = time.monotonic()
                if now >= expires:
                    self._lose_lock(ctx, f"not extended before it expired: {exc}")
                    return
                next_try = now + min(1.0, (expires - now) / 4)
                continue
            self._metrics.lock_extensions.labels(task.topic_name).inc()
            expires = sent + lock_s  # the engine counts from its receipt, after `sent`
            next_try = expires - lock_s / 2

    def _lose_lock(self, ctx: TaskContext, why: str) -> None:
        ctx.log.warning("lock lost: %s", why)
        ctx.lock_lost.set()
        self._metrics.lock_lost.labels(ctx.task.topic_name).inc()

    def _lock_ms(self, handler: Handler) -> int:
        return handler.lock_duration_ms or self._settings.camunda_lock_duration_ms

    # --- shutdown --------------------------------------------------------------------------

    async def _drain(self, force: asyncio.Event | None) -> None:
        """Give running handlers the grace period, then cancel what is left."""
        if not self._running:
            return
        grace_s = self._settings.worker_shutdown_grace_s
        log.info("draining %d running task(s), grace %s s", len(self._running), grace_s)
        waiters: set[asyncio.Future[Any]] = set(self._running)
        forced = asyncio.ensure_future(force.wait()) if force else None
        if forced:
            waiters.add(forced)
        try:
            deadline = time.monotonic() + grace_s
            while self._running and (forced is None or not forced.done()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                await asyncio.wait(
                    {*self._running, *([forced] if forced else [])},
                    timeout=remaining,
                    return_when=asyncio.FIRST_COMPLETED,
                )
        finally:
            if forced:
                forced.cancel()
        for running in list(self._running):
            running.cancel()  # the task group waits for them to finish cancelling

    async def _release_all(self, worker_id: str, whose: str) -> None:
        """Unlock everything locked to ``worker_id``, until nothing is.

        Why more than one pass: a long poll whose client went away (cancelled at shutdown,
        or a killed predecessor's) stays pending in the engine, which does not notice the
        closed connection; being the oldest request it is first in line for the tasks the
        first pass unlocks. It hands them to nobody and is then gone, so the next pass
        frees them for good.
        """
        if worker_id == self.worker_id:
            await self._bust_abandoned_poll()
        for _ in range(RELEASE_PASSES):
            if not await self._unlock_held_by(worker_id, whose):
                return
            await asyncio.sleep(RELEASE_PAUSE_S)  # let the engine hand them out (or not)

    async def _sweep_departed(self) -> None:
        """Unlock what departed workers' abandoned polls lock (services/worker/janitor.py)."""
        if self._janitor:
            await self._janitor.run(
                self.worker_id, lambda worker_id: self._unlock_held_by(worker_id, "departed")
            )

    async def _bust_abandoned_poll(self) -> None:
        """Replace our pending long poll in the engine with one that cannot lock anything.

        Effective where the engine runs with ``fetch-and-lock-unique-worker-request``
        (a new poll of a worker id cancels its older one); harmless elsewhere.
        """
        with contextlib.suppress(CamundaError, TimeoutError):
            async with asyncio.timeout(2):
                await self._camunda.fetch_and_lock(
                    self.worker_id, self._topics, max_tasks=0, async_response_timeout_ms=1
                )

    async def _unlock_held_by(self, worker_id: str, whose: str) -> int:
        """Unlock every task the engine still has locked to ``worker_id``; how many."""
        try:
            async with asyncio.timeout(UNLOCK_TIMEOUT_S):
                held = await self._camunda.locked_tasks(worker_id)
                for task in held:
                    with contextlib.suppress(NotFound):  # finished meanwhile
                        await self._camunda.unlock(task.id)
        except (CamundaError, TimeoutError) as exc:
            # Their locks expire on their own; this only makes them available sooner.
            log.warning("could not unlock the %s tasks of %s: %s", whose, worker_id, exc)
            return 0
        if held:
            log.info(
                "unlocked %d task(s) held by %s (%s)",
                len(held),
                worker_id,
                whose,
                extra={"taskIds": [t.id for t in held]},
            )
        return len(held)


async def _unless_stopped(stop: asyncio.Event, work: Coroutine[Any, Any, T]) -> T | None:
    """``work``'s result, or ``None`` if ``stop`` is set first (``work`` is then cancelled)."""
    if stop.is_set():
        work.close()
        return None
    job = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({job, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not job.done():
            job.cancel()  # also when we are cancelled ourselves: never leave it running
    if not job.done():
        return None
    return job.result()
