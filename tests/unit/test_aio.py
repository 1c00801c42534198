"""shared/aio.py: the building blocks the loops rely on."""

from __future__ import annotations

import asyncio

import pytest

from flowgate.shared.aio import concurrently


async def test_concurrently_raises_the_failure_itself_and_cancels_the_rest() -> None:
    cancelled = asyncio.Event()

    async def slow() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def failing() -> None:
        raise LookupError("no such thing")

    async def both() -> None:
        async with concurrently() as group:
            group.create_task(slow())
            group.create_task(failing())

    with pytest.raises(LookupError, match="no such thing"):
        await both()
    assert cancelled.is_set()


async def test_concurrently_returns_every_result() -> None:
    async with concurrently() as group:
        tasks = [group.create_task(asyncio.sleep(0.01, result=n)) for n in range(3)]
    assert [task.result() for task in tasks] == [0, 1, 2]
