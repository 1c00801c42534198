"""Where the events the engine pushes are read: :class:`EngineEvents`.

An engine with flowgate's plugin (deploy/camunda, ``RunEventsPlugin``) writes every
activity end, instance end and incident to a Redis stream (``ENGINE_EVENTS_STREAM``) once
its transaction has committed, in the history REST API's own shape, and keeps
``<stream>:alive`` set to its boot id while it runs. The watcher (watcher.py) reads that
stream instead of the engine's history: the engine does no work for it.

Pushed events can be missed only where the stream's continuity breaks, and :meth:`read` says
when, so that the watcher reads the history back over the gap once:

* the engine restarted (another boot id): its last events may never have been sent;
* the plugin could not queue some (``<stream>:lost`` moved on: Redis was away too long);
* this deployment read nothing for so long that the stream was trimmed past its position;
* it reads the stream for the first time.

Without the plugin (no ``alive`` key) :meth:`read` answers None, and the watcher reads the
history as it does for any engine. One reader per deployment (the watcher's lease holder);
its position and the boot id it knows are kept in Redis, so its successor goes on from them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, cast

import orjson

from flowgate.shared.camunda import EndedActivity, EndedInstance, Incident
from flowgate.shared.keys import Keys
from flowgate.shared.redis_client import RedisClient, stream_entries, text

#: Events read at most at once.
BATCH = 500
#: How often the reader checks that the engine pushes, and that nothing broke off.
CHECK_EVERY_S = 1.0


@dataclass
class Happened:
    """What the engine reports, by kind (as the history queries return it)."""

    activities: list[EndedActivity] = field(default_factory=list)
    instances: list[EndedInstance] = field(default_factory=list)
    incidents: list[Incident] = field(default_factory=list)
    #: Root instance id -> its business key (a run's correlationId), where the event said:
    #: a start's own steps come before flowgate knows the instance's id.
    business_keys: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.activities or self.instances or self.incidents)

    def add(self, event: dict[str, Any]) -> None:
        if (key := event.get("businessKey")) and (root := event.get("rootProcessInstanceId")):
            self.business_keys[root] = key
        kind = event.get("kind")
        if kind == "step":
            self.activities.append(EndedActivity.from_json(event))
        elif kind == "end":
            self.instances.append(EndedInstance.from_json(event))
        elif kind == "incident":
            self.incidents.append(Incident.from_json(event))


@dataclass
class Batch:
    happened: Happened
    #: The stream's continuity broke: read the history back over the gap.
    gap: bool
    #: Where the next read starts once this batch is handled (None: where it started);
    #: handed back through :meth:`EngineEvents.saved` once Redis keeps it.
    position: str | None = None


class EngineEvents:
    def __init__(self, redis: RedisClient, keys: Keys, stream: str) -> None:
        self._redis = redis
        self._keys = keys
        self._stream = stream
        #: Where this deployment has read to, and the engine and lost marker it knows of.
        self._position: str | None = None
        self._boot: str | None = None
        self._lost: str | None = None
        #: Whether the engine pushes, as last checked, and when to check again.
        self._pushing = False
        self._check_at = 0.0

    def forget(self) -> None:
        """Read the position again from Redis (another replica may have moved it on)."""
        self._position = None
        self._check_at = 0.0

    async def read(self) -> Batch | None:
        """The events since the last read (:meth:`saved` moves on past them), or None when
        the engine does not push them.

        Whether it pushes, and whether the stream went on unbroken, is checked once a
        second; in between a read is one command.
        """
        gap = False
        now = asyncio.get_running_loop().time()
        if now >= self._check_at:
            self._check_at = now + CHECK_EVERY_S
            gap = await self._check()
        if not self._pushing:
            return None
        assert self._position is not None
        answer = await self._redis.xread({self._stream: self._position}, count=BATCH)
        happened, position = Happened(), self._position
        for entry_id, fields in stream_entries(answer):
            position = text(entry_id)
            happened.add(orjson.loads(fields[b"e"]))
        return Batch(happened, gap, position if position != self._position else None)

    @property
    def position_key(self) -> str:
        """Where the reader's position is kept (the watcher writes it with its watermark)."""
        return self._keys.watcher_events

    def saved(self, position: str) -> None:
        """A batch is handled and Redis keeps ``position``: read on from there. Until then
        the same events are read again (at least once: a reader that dies while it handles
        them leaves them to its successor)."""
        self._position = position

    async def _check(self) -> bool:
        """Whether the engine pushes (into ``_pushing``); True when the stream broke off
        since the last check (see the module docstring)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(f"{self._stream}:alive")
            pipe.get(f"{self._stream}:lost")
            pipe.xrange(self._stream, "-", "+", count=1)
            if self._position is None:
                pipe.get(self._keys.watcher_events)
                pipe.get(self._keys.watcher_boot)
                pipe.get(self._keys.watcher_lost)
            alive, lost, first, *stored = await pipe.execute()
        self._pushing = alive is not None
        if alive is None:
            return False
        if self._position is None:
            position, self._boot, self._lost = (text(v) if v else None for v in stored)
            self._position = position or await self._last_id()
        boot, lost = text(alive), text(lost) if lost else None
        gap = boot != self._boot or lost != self._lost
        if first and _before(self._position, text(first[0][0])):
            gap = True  # trimmed past what this deployment had read
        if gap:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.set(self._keys.watcher_events, self._position)
                pipe.set(self._keys.watcher_boot, boot)
                if lost is not None:
                    pipe.set(self._keys.watcher_lost, lost)
                await pipe.execute()
            self._boot, self._lost = boot, lost
        return gap

    async def _last_id(self) -> str:
        """Where a first reader starts: after the newest event (the history covers the rest)."""
        last = cast(list[tuple[bytes, Any]], await self._redis.xrevrange(self._stream, count=1))
        return text(last[0][0]) if last else "0-0"


def _before(position: str, first: str) -> bool:
    """Whether stream id ``position`` comes before ``first``, the oldest entry still kept
    (then entries after the position may have been trimmed: read the history instead)."""
    return position != "0-0" and _id(position) < _id(first)


def _id(entry: str) -> tuple[int, int]:
    ms, _, seq = entry.partition("-")
    return int(ms), int(seq or 0)
