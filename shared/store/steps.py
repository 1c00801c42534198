"""A run's steps in Redis: :class:`StepStore` (``{p}:steps:{cid}``, a bounded stream).

Each activity instance is recorded once, whoever reports it first: a worker for the
external tasks it runs, the watcher for every other step (shared/steps.py). Each step is
also written behind to Postgres (``run_step``); once a run has ended and Postgres has all of
its steps, :meth:`StepStore.compact` takes them out of Redis (the run's final state stays
for its retention), and readers find them in Postgres (services/api/runs.py).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import cast

from flowgate.shared.eventlog import EventRecord
from flowgate.shared.keys import Keys
from flowgate.shared.redis_client import RedisClient, text
from flowgate.shared.steps import MAX_STEPS, StepEvent
from flowgate.shared.store.scripts import (
    COMPACT,
    STEP,
    STEP_CLAIM,
    STEP_RELEASE,
    CompactArgs,
    CompactKeys,
    StepArgs,
    StepClaimArgs,
    StepClaimKeys,
    StepKeys,
    StepReleaseKeys,
)


class StepStore:
    def __init__(self, redis: RedisClient, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self._record = STEP.bound(redis)
        self._claim = STEP_CLAIM.bound(redis)
        self._release = STEP_RELEASE.bound(redis)
        self._compact = COMPACT.bound(redis)

    async def record(
        self,
        correlation_id: str,
        step: StepEvent,
        event: EventRecord | None = None,
        *,
        worker: bool = False,
    ) -> bool:
        """Add a step to the run's record (once per activity instance), with its audit row;
        True if it was new. ``worker``: a worker records a step it ran and claimed (see
        :meth:`claim`); anyone else leaves a claimed step to its worker."""
        cid = correlation_id
        part = self._keys.of(cid)
        keys = StepKeys(
            state=self._keys.state(cid),
            steps=self._keys.steps(cid),
            seen=self._keys.steps_seen(cid),
            claimed=self._keys.steps_claimed(cid),
            followed=self._keys.followed(cid),
            stream=part.writebehind,
            compact=part.compact,
        )
        args = StepArgs(
            cid=cid,
            activity_instance_id=step.activity_instance_id,
            step=step.to_json(),
            event=event.to_json() if event else "",
            max_steps=MAX_STEPS,
            channel=part.channel,
            worker=int(worker),
        )
        return bool(await self._record(keys, args))

    async def follow(self, correlation_id: str, *, for_s: float) -> None:
        """Have the run's new steps announced on its channel for ``for_s`` at least (another
        follower's shorter wish does not shorten it); they are not otherwise."""
        key, ms = self._keys.followed(correlation_id), math.ceil(for_s * 1000)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(key, 1, px=ms, nx=True)
            pipe.pexpire(key, ms, gt=True)
            await pipe.execute()

    async def claim(self, correlation_id: str, activity_instance_id: str, worker_id: str) -> None:
        """Before a worker tells the engine a step ended: the step is that worker's to
        record, though the engine's report of it (the watcher's) may come first."""
        await self._claim(
            StepClaimKeys(
                state=self._keys.state(correlation_id),
                claimed=self._keys.steps_claimed(correlation_id),
            ),
            StepClaimArgs(activity_instance_id=activity_instance_id, worker_id=worker_id),
        )

    async def release(self, correlation_id: str, activity_instance_id: str, worker_id: str) -> None:
        """The engine refused the worker's report: the step is anyone's to record again."""
        await self._release(
            StepReleaseKeys(claimed=self._keys.steps_claimed(correlation_id)),
            StepClaimArgs(activity_instance_id=activity_instance_id, worker_id=worker_id),
        )

    async def claimed_at(self, correlation_id: str, activity_id: str) -> bool:
        """Whether a worker has claimed a step of activity ``activity_id`` and not recorded it
        yet (an engine's activity instance id starts with its activity id and a colon)."""
        claimed = await self._redis.hkeys(self._keys.steps_claimed(correlation_id))
        return any(text(aid).startswith(f"{activity_id}:") for aid in claimed)

    async def known(self, steps: Sequence[tuple[str, str]]) -> list[bool]:
        """Whether each (correlationId, activity instance id) is recorded already, in one
        round trip: a cheap look before :meth:`record` for steps others may have recorded."""
        if not steps:
            return []
        by_run: dict[str, list[str]] = {}
        for cid, activity_instance_id in steps:
            by_run.setdefault(cid, []).append(activity_instance_id)
        async with self._redis.pipeline(transaction=False) as pipe:
            for cid, ids in by_run.items():  # one command per run, not per step
                pipe.smismember(self._keys.steps_seen(cid), ids)
            found = await pipe.execute()
        recorded = {
            (cid, aid): bool(flag)
            for (cid, ids), flags in zip(by_run.items(), found, strict=True)
            for aid, flag in zip(ids, flags, strict=True)
        }
        return [recorded[step] for step in steps]

    async def after(
        self, correlation_id: str, *, after: str | None = None, count: int = MAX_STEPS
    ) -> list[tuple[str, StepEvent]]:
        """The run's steps after stream id ``after`` (exclusive; None: from the first),
        oldest first, with ids."""
        start = "-" if after is None else f"({after}"
        found = await self._redis.xrange(self._keys.steps(correlation_id), start, "+", count)
        entries = cast(list[tuple[bytes, dict[bytes, bytes]]], found)
        return [(text(entry), StepEvent.from_json(fields[b"step"])) for entry, fields in entries]

    async def find(self, correlation_id: str, name: str) -> StepEvent | None:
        """The first recorded step called ``name`` (its step name or activity id), or None."""
        for _, step in await self.after(correlation_id):
            if name in step.names():
                return step
        return None

    async def compact(self, *, limit: int = 500) -> int:
        """Take out of Redis the steps of up to ``limit`` finished runs per partition whose
        steps are all in Postgres (shared/store/scripts.py COMPACT), one call per partition,
        all in one round trip (made in one turn: shared/lua.py); how many.

        Idempotent, so every flusher may run it: two that pick the same run compact it once.
        """
        compacted = await asyncio.gather(
            *(
                self._compact(
                    CompactKeys(compact=partition.compact, stream=partition.writebehind),
                    CompactArgs(
                        limit=limit,
                        state_prefix=partition.state_prefix,
                        steps_prefix=partition.steps_prefix,
                    ),
                )
                for partition in self._keys.partitions
            )
        )
        return sum(compacted)
