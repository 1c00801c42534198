"""Free the tasks that departed workers' abandoned long polls lock after they are gone.

The engine does not notice that a long poll's client went away (a cancelled poll at
shutdown, a killed worker): the request stays pending for its whole asyncResponseTimeout,
and as the oldest pending request it is first in line for new tasks. Whatever it locks is
locked to a worker that no longer exists and would wait out a full lock duration.

So a worker that leaves (and one that replaces a crashed predecessor) records the departed
id in ``{p}:worker:departed`` (a sorted set scored by when the abandoned poll must have
ended), and every live worker of the deployment unlocks what those ids hold, once a second,
until then. With the engine's ``fetch-and-lock-unique-worker-request`` on, the leaving
worker also cancels its own abandoned poll (Worker._bust_abandoned_poll).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.keys import Keys

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 1.0
#: Added to asyncResponseTimeout: the engine answers an expired poll on its next pass.
MARGIN_S = 2.0


class Janitor:
    def __init__(self, redis: Redis, keys: Keys, *, poll_window_s: float) -> None:
        self._redis = redis
        self._key = keys.departed_workers
        self._window_s = poll_window_s + MARGIN_S

    async def departed(self, worker_id: str) -> None:
        """Record that ``worker_id`` is gone; its abandoned poll may lock tasks a while."""
        try:
            async with asyncio.timeout(2):
                await self._redis.zadd(self._key, {worker_id: time.time() + self._window_s})
        except (RedisError, TimeoutError) as exc:
            log.warning("could not record departed worker %s: %s", worker_id, exc)

    async def run(self, own_id: str, unlock: Callable[[str], Awaitable[int]]) -> None:
        """Every second, unlock what departed workers hold (until their window closes)."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            try:
                async with asyncio.timeout(2):
                    now = time.time()
                    await self._redis.zremrangebyscore(self._key, "-inf", now)
                    departed = await self._redis.zrangebyscore(self._key, now, "+inf")
            except (RedisError, TimeoutError) as exc:
                log.warning("departed workers not read: %s", exc)
                continue
            for raw in departed:
                worker_id = raw.decode() if isinstance(raw, bytes) else str(raw)
                if worker_id != own_id:
                    await unlock(worker_id)
