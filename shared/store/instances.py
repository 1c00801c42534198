"""Which engine instance is which run: :class:`InstanceMap`, what the watcher reads.

An attached start maps its instance to its run (``{p}:instances``, in the attach script);
an ended run's instance is forgotten :data:`INSTANCE_LINGER_S` after its end
(``{p}:instances:ended``), so the history the engine commits late for it (the end event
after the last task) is still read and recorded meanwhile.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from flowgate.shared.keys import Keys
from flowgate.shared.redis_client import RedisClient, text
from flowgate.shared.store.schedule import ms

#: How long an ended run's engine instance stays mapped: the engine's history of its last
#: steps (the end event after the finishing task) is still recorded meanwhile.
INSTANCE_LINGER_S = 10.0


class InstanceMap:
    def __init__(self, redis: RedisClient, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys

    async def runs_of(
        self, instance_ids: Sequence[str], *, named: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        """The correlationIds of those engine instances that are mapped to runs.

        ``named``: instance id -> the business key its events name. flowgate starts every
        instance with its run's correlationId as the business key and maps it in that run's
        partition, so such an instance is looked up there alone; any other in every one.
        """
        if not instance_ids:
            return {}
        named = named or {}
        where: dict[str, list[str]] = {}
        anywhere = [i for i in instance_ids if i not in named]
        for instance in instance_ids:
            if instance in named:
                where.setdefault(self._keys.of(named[instance]).instances, []).append(instance)
        if anywhere:
            for partition in self._keys.partitions:
                where.setdefault(partition.instances, []).extend(anywhere)
        lookups = list(where.items())
        async with self._redis.pipeline(transaction=False) as pipe:
            for key, ids in lookups:
                pipe.hmget(key, ids)
            found: list[list[bytes | None]] = await pipe.execute()
        return {
            instance: text(cid)
            for (_, ids), in_partition in zip(lookups, found, strict=True)
            for instance, cid in zip(ids, in_partition, strict=True)
            if cid is not None
        }

    async def count(self) -> int:
        """How many engine instances are mapped to runs now."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for partition in self._keys.partitions:
                pipe.hlen(partition.instances)
            return sum(await pipe.execute())

    async def forget(self, runs: Mapping[str, str]) -> None:
        """Stop mapping these (ended) instances (instance id -> correlationId, as
        :meth:`runs_of` gives them) in :data:`INSTANCE_LINGER_S`."""
        at = ms(datetime.now(UTC)) + int(INSTANCE_LINGER_S * 1000)
        async with self._redis.pipeline(transaction=False) as pipe:
            for instance, cid in runs.items():
                pipe.zadd(self._keys.of(cid).instances_ended, {instance: at})
            await pipe.execute()

    async def forget_ended(self) -> int:
        """Drop the instances whose time to be forgotten has come; how many."""
        now = ms(datetime.now(UTC))
        partitions = self._keys.partitions
        async with self._redis.pipeline(transaction=False) as pipe:
            for partition in partitions:
                pipe.zrangebyscore(partition.instances_ended, "-inf", now, 0, 1000)
            found: list[list[bytes]] = await pipe.execute()
        for partition, due in zip(partitions, found, strict=True):
            if due:
                async with self._redis.pipeline(transaction=True) as pipe:
                    pipe.hdel(partition.instances, *due)
                    pipe.zrem(partition.instances_ended, *due)
                    await pipe.execute()
        return sum(len(due) for due in found)
