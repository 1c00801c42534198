"""Work every replica shares: :class:`Schedule`, a due-time sorted set per partition.

What is due is handed to one replica at a time (:meth:`Schedule.take`), and comes back by
itself when that replica dies; the store keeps two (shared/store/runs.py): claims whose
start is to be looked after (services/background/recovery.py) and ended runs whose end is
to be delivered to their callbackUrl (services/background/callbacks.py).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from datetime import UTC, datetime

from flowgate.shared.keys import Keys, Partition
from flowgate.shared.redis_client import RedisClient, text
from flowgate.shared.store.scripts import TAKE, TakeArgs, TakeKeys


class Schedule:
    """correlationIds scored by when each is due, a sorted set per partition (``key``
    names a partition's set).

    :meth:`take` hands a due item to one replica and makes it due again later, so an item
    whose taker dies comes back by itself; the taker :meth:`drop` s it when done, or
    :meth:`defer` s it to a time of its choosing.
    """

    def __init__(self, redis: RedisClient, keys: Keys, key: Callable[[Partition], str]) -> None:
        self._redis = redis
        self._keys = keys
        self._key = key
        self._take = TAKE.bound(redis)

    async def due(self, limit: int) -> list[str]:
        """Items whose time has come, the longest due first (at most ``limit`` of each
        partition are looked at)."""
        now_ms = ms(datetime.now(UTC))
        async with self._redis.pipeline(transaction=False) as pipe:
            for partition in self._keys.partitions:
                pipe.zrangebyscore(self._key(partition), "-inf", now_ms, 0, limit, withscores=True)
            found: list[list[tuple[bytes, float]]] = await pipe.execute()
        merged = heapq.merge(*found, key=lambda item: item[1])
        return [text(cid) for cid, _ in merged][:limit]

    async def take(self, correlation_id: str, *, again_s: float) -> bool:
        """Take a due item; it is due again in ``again_s`` unless dropped or deferred
        meanwhile. False if another replica took it first (or it is gone)."""
        now_ms = ms(datetime.now(UTC))
        taken = await self._take(
            TakeKeys(schedule=self._key_of(correlation_id)),
            TakeArgs(member=correlation_id, now_ms=now_ms, again_at=now_ms + int(again_s * 1000)),
        )
        return bool(taken)

    async def defer(self, correlation_id: str, *, delay_s: float) -> None:
        """Make a taken item due in ``delay_s`` (only if it is still scheduled)."""
        at = ms(datetime.now(UTC)) + int(delay_s * 1000)
        await self._redis.zadd(self._key_of(correlation_id), {correlation_id: at}, xx=True)

    async def drop(self, correlation_id: str) -> None:
        await self._redis.zrem(self._key_of(correlation_id), correlation_id)

    def _key_of(self, correlation_id: str) -> str:
        return self._key(self._keys.of(correlation_id))


def ms(moment: datetime) -> int:
    """A moment as Unix milliseconds (the scores of the store's sorted sets)."""
    return int(moment.timestamp() * 1000)
