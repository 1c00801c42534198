"""Task locks: keep them while a handler runs, give them back when a worker leaves.

* :func:`lock_kept` keeps one task's lock while its handler runs: :func:`keep_lock` extends
  it at half its duration, started only for a handler that runs that long.
* :class:`Locks` unlocks what a worker id still holds: the worker's own tasks when it stops,
  a crashed predecessor's when it starts (services/worker/identity.py), and, through the
  departed-workers register, whatever a departed worker's abandoned long poll locks after it
  is gone.

Why that register: the engine does not notice that a long poll's client went away (a poll
cancelled at shutdown, a killed worker). The request stays pending for its whole
asyncResponseTimeout and, as the oldest pending request, is first in line for new tasks,
which it locks to a worker that no longer exists. So a leaving worker records its id in
``{p}:worker:departed`` (a sorted set scored by when that poll must have ended), and every
live worker unlocks what those ids hold, once a second, until then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import cast

from flowgate.shared.aio import sleep_or_stop, stop_and_wait
from flowgate.shared.camunda import (
    BadRequest,
    CamundaClient,
    CamundaError,
    LockedTask,
    NotFound,
    TopicRequest,
)
from flowgate.shared.keys import Keys
from flowgate.shared.redis_client import REDIS_ERRORS, RedisClient, text

log = logging.getLogger(__name__)

#: Unlocking at start-up and shutdown gets this long per pass.
UNLOCK_TIMEOUT_S = 10.0
#: Passes of the final unlock, and the pause after each (see Locks.release_all).
RELEASE_PASSES = 4
RELEASE_PAUSE_S = 0.2
SWEEP_INTERVAL_S = 1.0
#: Added to asyncResponseTimeout: the engine answers an expired poll on its next pass.
POLL_MARGIN_S = 2.0


@contextlib.asynccontextmanager
async def lock_kept(
    camunda: CamundaClient,
    task: LockedTask,
    *,
    worker_id: str,
    lock_ms: int,
    on_extended: Callable[[], None],
    on_lost: Callable[[str], None],
) -> AsyncIterator[None]:
    """Keep ``task``'s lock (taken now) while the body runs (see :func:`keep_lock`).

    Until half the lock's duration has passed only a timer waits: most handlers are done
    long before, and a task started for every task to extend a lock that never needed it
    cost the worker about 40 µs of CPU each.
    """
    locked_at = time.monotonic()
    done = asyncio.Event()
    async with asyncio.TaskGroup() as group:
        keeping: list[asyncio.Task[None]] = []

        def keep() -> None:
            extending = keep_lock(
                camunda,
                task,
                done=done,
                locked_at=locked_at,
                worker_id=worker_id,
                lock_ms=lock_ms,
                on_extended=on_extended,
                on_lost=on_lost,
            )
            keeping.append(group.create_task(extending, name=f"lock:{task.id}"))

        timer = asyncio.get_running_loop().call_later(lock_ms / 2000, keep)
        try:
            yield
        finally:
            timer.cancel()
            await stop_and_wait(done, keeping)


async def keep_lock(
    camunda: CamundaClient,
    task: LockedTask,
    *,
    done: asyncio.Event,
    locked_at: float,
    worker_id: str,
    lock_ms: int,
    on_extended: Callable[[], None],
    on_lost: Callable[[str], None],
) -> None:
    """Extend ``task``'s lock, taken at ``locked_at`` (monotonic), at half its duration
    until ``done``.

    A refusal (404: the task is gone; 400: the lock expired or another worker has it) means
    the lock is lost: ``on_lost(why)`` and return. A transient error is retried until the
    lock would expire.
    """
    lock_s = lock_ms / 1000
    expires = locked_at + lock_s
    next_try = expires - lock_s / 2
    while not await sleep_or_stop(done, max(0.0, next_try - time.monotonic())):
        sent = time.monotonic()
        try:
            async with asyncio.timeout(max(0.1, expires - sent)):
                await camunda.extend_lock(task.id, worker_id=worker_id, new_duration_ms=lock_ms)
        except (NotFound, BadRequest) as exc:
            on_lost(f"extension refused: {exc}")
            return
        except (CamundaError, TimeoutError) as exc:
            now = time.monotonic()
            if now >= expires:
                on_lost(f"not extended before it expired: {exc}")
                return
            next_try = now + min(1.0, (expires - now) / 4)
            continue
        on_extended()
        expires = sent + lock_s  # the engine counts from its receipt, after `sent`
        next_try = expires - lock_s / 2


class Locks:
    """Gives back the tasks a worker id holds; see the module docstring."""

    def __init__(
        self,
        camunda: CamundaClient,
        redis: RedisClient,
        keys: Keys,
        *,
        worker_id: str,
        topics: Sequence[TopicRequest],
        poll_window_s: float,
    ) -> None:
        self._camunda = camunda
        self._redis = redis
        self._departed_key = keys.departed_workers
        self._worker_id = worker_id
        self._topics = topics
        self._window_s = poll_window_s + POLL_MARGIN_S

    async def release_all(self, worker_id: str, whose: str) -> None:
        """Unlock everything locked to ``worker_id``, until nothing is.

        Why more than one pass: the departed worker's abandoned long poll is first in line
        for the tasks the first pass unlocks. It hands them to nobody and is then gone, so
        the next pass frees them for good.
        """
        if worker_id == self._worker_id:
            await self._bust_abandoned_poll()
        for _ in range(RELEASE_PASSES):
            if not await self.unlock_held_by(worker_id, whose):
                return
            await asyncio.sleep(RELEASE_PAUSE_S)  # let the engine hand them out (or not)

    async def departed(self, worker_id: str) -> None:
        """Record that ``worker_id`` is gone; its abandoned poll may lock tasks a while."""
        try:
            async with asyncio.timeout(2):
                await self._redis.zadd(
                    self._departed_key, {worker_id: time.time() + self._window_s}
                )
        except (*REDIS_ERRORS, TimeoutError) as exc:
            log.warning("could not record departed worker %s: %s", worker_id, exc)

    async def sweep_departed(self, stop: asyncio.Event) -> None:
        """Every second until ``stop``, unlock what departed workers hold (until their window
        closes)."""
        while not await sleep_or_stop(stop, SWEEP_INTERVAL_S):
            try:
                async with asyncio.timeout(2):
                    now = time.time()
                    await self._redis.zremrangebyscore(self._departed_key, "-inf", now)
                    departed = cast(
                        list[bytes],
                        await self._redis.zrangebyscore(self._departed_key, now, "+inf"),
                    )
            except (*REDIS_ERRORS, TimeoutError) as exc:
                log.warning("departed workers not read: %s", exc)
                continue
            for raw in departed:
                worker_id = text(raw)
                if worker_id != self._worker_id:
                    await self.unlock_held_by(worker_id, "departed")

    async def unlock_held_by(self, worker_id: str, whose: str) -> int:
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

    async def _bust_abandoned_poll(self) -> None:
        """Replace our pending long poll in the engine with one that cannot lock anything.

        Effective where the engine runs with ``fetch-and-lock-unique-worker-request``
        (a new poll of a worker id cancels its older one); harmless elsewhere.
        """
        with contextlib.suppress(CamundaError, TimeoutError):
            async with asyncio.timeout(2):
                await self._camunda.fetch_and_lock(
                    self._worker_id, self._topics, max_tasks=0, async_response_timeout_ms=1
                )
