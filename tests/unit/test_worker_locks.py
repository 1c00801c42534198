"""A task's lock is kept while its handler runs, and nothing is done for one that ends sooner
than half its lock (over a scripted engine)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from flowgate.services.worker.locks import lock_kept
from tests.helpers.engine import FakeEngine, engine_error, locked_task


async def keep_for(
    engine: FakeEngine,
    *,
    lock_ms: int,
    busy_s: float,
    meanwhile: Callable[[], None] = lambda: None,
) -> tuple[int, list[str]]:
    """Run a "handler" of ``busy_s`` (then ``meanwhile``) under :func:`lock_kept`;
    extensions counted, losses."""
    extended, lost = 0, list[str]()

    def on_extended() -> None:
        nonlocal extended
        extended += 1

    async with (
        engine.client() as camunda,
        lock_kept(
            camunda,
            locked_task(),
            worker_id="w1",
            lock_ms=lock_ms,
            on_extended=on_extended,
            on_lost=lost.append,
        ),
    ):
        await asyncio.sleep(busy_s)
        meanwhile()
    return extended, lost


async def test_a_handler_done_within_half_its_lock_costs_no_call_and_no_task() -> None:
    engine = FakeEngine()
    tasks = len(asyncio.all_tasks())

    def no_task_started() -> None:
        assert len(asyncio.all_tasks()) == tasks

    assert await keep_for(engine, lock_ms=400, busy_s=0.1, meanwhile=no_task_started) == (0, [])
    await asyncio.sleep(0.2)  # past the half: the timer was cancelled with the body
    assert engine.actions() == []


async def test_a_long_handler_has_its_lock_extended_at_half_its_duration() -> None:
    engine = FakeEngine()
    extended, lost = await keep_for(engine, lock_ms=200, busy_s=0.45)
    assert lost == []
    # At about 100, 200, 300 and 400 ms, each for another full lock.
    assert 3 <= extended <= 4
    assert engine.actions() == ["extendLock"] * extended
    assert {body["newDuration"] for body in engine.bodies("extendLock")} == {200}


async def test_a_refused_extension_is_a_lost_lock() -> None:
    engine = FakeEngine()
    engine.answer("extendLock", engine_error(404, "task gone"))
    extended, lost = await keep_for(engine, lock_ms=200, busy_s=0.3)
    assert extended == 0
    assert len(lost) == 1
    assert lost[0].startswith("extension refused")
    assert engine.actions() == ["extendLock"]
