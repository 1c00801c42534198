"""The asyncio building blocks every long-running loop of flowgate uses.

* :class:`Backoff` — jittered exponential delays between failed attempts;
* :func:`sleep_or_stop` — a pause that a stop event cuts short;
* :func:`race_stop` — await some work unless a stop event comes first;
* :func:`cancel_and_wait` — cancel tasks and wait until they have really finished;
* :func:`grace_then_cancel` — let tasks finish within a grace, then cancel the rest;
* :func:`stop_and_wait` — end loops by their stop event first, by cancellation last;
* :class:`Spawner` — work that outlives the request that started it, in a task group;
* :func:`concurrently` — a task group for a few awaits at once, whose failure is raised as
  itself (callers handle errors by type, not as an ExceptionGroup).

Background tasks themselves always live in an :class:`asyncio.TaskGroup` owned by a
lifespan (the API's ``open_deps``, the worker's ``serve``), so none can outlive its owner.
Their loops run ``while not stop.is_set()`` and pause with :func:`sleep_or_stop`: a loop that
ends on its event does not depend on every library it awaits passing a cancellation on
(redis-py 8.1 on Python 3.11 can return a reply to a task whose cancellation arrived
meanwhile, and the cancellation is lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Backoff:
    """``next_delay_s()`` grows ``base_s * 2**n`` up to ``cap_s``; ``reset()`` after a success.

    "Equal jitter" (a random delay between half and all of the step) spreads the retries of
    many clients that failed together, without ever collapsing to almost no delay while the
    other side is overloaded.
    """

    base_s: float = 0.5
    cap_s: float = 30.0
    attempt: int = field(default=0, init=False)

    def next_delay_s(self) -> float:
        ceiling = min(self.cap_s, self.base_s * 2**self.attempt)
        self.attempt = min(self.attempt + 1, 32)  # 2**32 is far past any cap
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


async def sleep_or_stop(stop: asyncio.Event, delay_s: float) -> bool:
    """Sleep ``delay_s`` unless ``stop`` is set first; True if stopping."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(delay_s):
            await stop.wait()
    return stop.is_set()


async def race_stop(stop: asyncio.Event, work: Awaitable[T]) -> T | None:
    """``work``'s result, or ``None`` if ``stop`` is set first (``work`` is then cancelled).

    ``work`` is cancelled too when the caller is, so it never runs on unobserved.
    """
    job = asyncio.ensure_future(work)
    if stop.is_set():
        await cancel_and_wait([job])
        return None
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({job, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_and_wait([stopper, *([] if job.done() else [job])])
    if job.cancelled():
        return None
    return job.result()


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel ``tasks`` and wait until each has finished (a cancelled task may still run its
    ``finally`` blocks: returning before they are done would let it outlive its owner)."""
    pending = [task for task in tasks if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)


@contextlib.asynccontextmanager
async def concurrently() -> AsyncIterator[asyncio.TaskGroup]:
    """``async with concurrently() as group:`` a TaskGroup that raises its first failure as
    itself; the other tasks are cancelled and awaited, as in any TaskGroup."""
    try:
        async with asyncio.TaskGroup() as group:
            yield group
    except ExceptionGroup as failed:
        raise failed.exceptions[0] from None


async def grace_then_cancel(
    tasks: Iterable[asyncio.Future[Any]],
    grace_s: float,
    *,
    cut_short: asyncio.Event | None = None,
) -> None:
    """Give ``tasks`` ``grace_s`` to end (less if ``cut_short`` is set), then cancel what is
    left and wait until it has ended."""
    pending = {task for task in tasks if not task.done()}
    if pending:
        waiting = asyncio.ensure_future(asyncio.wait(pending, timeout=grace_s))
        await race_stop(cut_short or asyncio.Event(), waiting)
    await cancel_and_wait(pending)


async def stop_and_wait(
    stop: asyncio.Event, tasks: Iterable[asyncio.Future[Any]], *, timeout_s: float = 10.0
) -> None:
    """Set ``stop``, give ``tasks`` ``timeout_s`` to end on it, then cancel what is left."""
    stop.set()
    await grace_then_cancel(tasks, timeout_s)


class Spawner:
    """Starts work in its owner's task group that outlives the request that started it.

    A spawned coroutine never takes the group down: an exception is logged and the task's
    result is ``None``. At shutdown :meth:`drain` gives what runs a grace, then cancels it.
    """

    def __init__(self, group: asyncio.TaskGroup) -> None:
        self._group = group
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, work: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T | None]:
        async def guarded() -> T | None:
            try:
                return await work
            except Exception:
                log.exception("background task %s failed", name)
                return None

        task = self._group.create_task(guarded(), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self, grace_s: float) -> None:
        """Wait up to ``grace_s`` for what runs, then cancel the rest."""
        await grace_then_cancel(set(self._tasks), grace_s)
