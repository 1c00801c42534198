"""A run's steps in Redis: :class:`StepStore` (``{p}:steps:{cid}``, a bounded stream).

Each activity instance is recorded once, whoever reports it first: a worker for the
external tasks it runs, the watcher for every other step (shared/steps.py). The record
expires with its run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from shared.eventlog import EventRecord
from shared.keys import Keys
from shared.redis_client import RedisClient, text
from shared.steps import MAX_STEPS, StepEvent
from shared.store.scripts import STEP, StepArgs, StepKeys


class StepStore:
    def __init__(self, redis: RedisClient, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self._record = STEP.bound(redis)

    async def record(
        self, correlation_id: str, step: StepEvent, event: EventRecord | None = None
    ) -> bool:
        """Add a step to the run's record (once per activity instance), with its audit row;
        True if it was new."""
        recorded = await self._record(*self._script(correlation_id, step, event))
        return bool(recorded)

    def _script(
        self, cid: str, step: StepEvent, event: EventRecord | None
    ) -> tuple[StepKeys, StepArgs]:
        part = self._keys.of(cid)
        keys = StepKeys(
            state=self._keys.state(cid),
            steps=self._keys.steps(cid),
            seen=self._keys.steps_seen(cid),
            stream=part.writebehind,
        )
        args = StepArgs(
            cid=cid,
            activity_instance_id=step.activity_instance_id,
            step=step.to_json(),
            event=event.to_json() if event else "",
            max_steps=MAX_STEPS,
            channel=part.channel,
        )
        return keys, args

    async def known(self, steps: Sequence[tuple[str, str]]) -> list[bool]:
        """Whether each (correlationId, activity instance id) is recorded already, in one
        round trip: a cheap look before :meth:`record` for steps others may have recorded."""
        if not steps:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for cid, activity_instance_id in steps:
                pipe.sismember(self._keys.steps_seen(cid), activity_instance_id)
            return [bool(found) for found in await pipe.execute()]

    async def after(
        self, correlation_id: str, *, after: str = "-", count: int = MAX_STEPS
    ) -> list[tuple[str, StepEvent]]:
        """The run's steps after stream id ``after`` (exclusive), oldest first, with ids."""
        start = after if after == "-" else f"({after}"
        found = await self._redis.xrange(self._keys.steps(correlation_id), start, "+", count)
        entries = cast(list[tuple[bytes, dict[bytes, bytes]]], found)
        return [(text(entry), StepEvent.from_json(fields[b"step"])) for entry, fields in entries]

    async def find(self, correlation_id: str, name: str) -> StepEvent | None:
        """The first recorded step called ``name`` (its step name or activity id), or None."""
        for _, step in await self.after(correlation_id):
            if name in step.names():
                return step
        return None
