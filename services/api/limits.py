"""Fair limits per tenant: starts per second, runs in flight, parked waits, open streams.

Counted in Redis, so every replica enforces the same limit; each tenant's counters share
one hash slot (``{prefix:t:tenant}``), so each check is one script on a Redis Cluster too.
A refusal is :class:`Limited`, answered 429 with ``Retry-After`` and the IETF
``RateLimit-Policy`` / ``RateLimit`` headers (draft-ietf-httpapi-ratelimit-headers).

- **Starts per second**: spread evenly (GCRA, the cell rate algorithm of redis-cell and
  most gateways): one start every 1/limit s, up to a tenth of the limit at once, so the
  starts a flood gets through come one by one, not all at the top of each second where
  they would queue up another tenant's. The tenant's next allowed time is one key; a
  replica refused until a time refuses until then itself (a flood costs it no Redis call).
- **Runs in flight, parked waits, open streams**: a sorted set per tenant of what holds a
  place, scored by when the place lapses by itself, so a replica that dies cannot leak
  places: a parked wait lapses at its deadline, a stream's place is renewed while it is
  open. A run's place is taken by its start and lapses when the run is no longer pending:
  a full set is checked against the runs' states before a start is refused, so no end
  path (worker, watcher, cancel, expiry) has to remember to give it back.

A limit of 0 is none, and costs nothing: no Redis call is made for it.

**Fair fetching**: a named tenant's run carries its place in the workers' fetch order
(:func:`Limits.fetch_priority`, the engine variable ``flowgatePriority``, which a process
uses as its external tasks' priority): 0 for a tenant's first start in a
:data:`SHARE_WINDOW_S` window, one less for each further one. The engine hands the
highest priority out first, then the oldest, so a tenant that starts a thousand runs
queues them behind one another, not in front of another tenant's next run.
"""

from __future__ import annotations

import contextlib
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import NamedTuple, cast

from flowgate.shared.keys import Keys
from flowgate.shared.lua import Script
from flowgate.shared.redis_client import RedisClient, text
from flowgate.shared.state import Status
from flowgate.shared.tenancy import DEFAULT_TENANT

#: How long a stream's place lasts unless the stream renews it (it does every event or so).
STREAM_LEASE_S = 60.0
#: Tenants whose last second over the limit a replica keeps in memory (then it forgets all).
MAX_TENANTS_KEPT = 10_000
#: A parked wait's place outlives its deadline by this much (the answer is still written).
PARKED_SLACK_S = 5.0
#: The window a tenant's starts are counted in for their fetch priority.
SHARE_WINDOW_S = 10


def start_burst(starts_per_s: int) -> int:
    """How many starts a tenant may make at once: a tenth of its limit per second."""
    return max(1, math.ceil(starts_per_s / 10))


class Limited(Exception):
    """A tenant's limit is reached: answer 429 with :attr:`headers`."""

    def __init__(self, name: str, limit: int, window_s: int, retry_after_s: int) -> None:
        super().__init__(f"this tenant's limit of {limit} {_WHAT[name]} is reached; retry later")
        self.headers = {
            "Retry-After": str(retry_after_s),
            "RateLimit-Policy": f'"{name}";q={limit};w={window_s}',
            "RateLimit": f'"{name}";r=0;t={retry_after_s}',
        }


_WHAT = {
    "starts": "starts per second",
    "runs": "runs in flight",
    "parked": "requests waiting",
    "streams": "open event streams",
}


@dataclass(frozen=True, slots=True)
class TenantLimits:
    """The settings (0: no limit)."""

    starts_per_s: int = 0  # TENANT_STARTS_PER_S
    runs_in_flight: int = 0  # TENANT_RUNS_IN_FLIGHT
    parked: int = 0  # TENANT_PARKED
    streams: int = 0  # TENANT_STREAMS


class RateKeys(NamedTuple):
    counter: str


class RateArgs(NamedTuple):
    #: One start per this many µs, and this many µs of them at once (the burst).
    interval_us: int
    tolerance_us: int


#: GCRA on the key's theoretical arrival time (µs, Redis's clock): 0 if the start may go
#: ahead (counted), else the µs until one may.
RATE = Script(
    "rate",
    RateKeys,
    RateArgs,
    """
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local tat = math.max(tonumber(redis.call('GET', K.counter) or '0'), now)
local wait = tat - tonumber(A.tolerance_us) - now
if wait > 0 then return wait end
tat = tat + tonumber(A.interval_us)
redis.call('SET', K.counter, string.format('%d', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
return 0
""",
)


class CountArgs(NamedTuple):
    window_s: int


#: Count one more start in a window; the count so far.
COUNT = Script(
    "count",
    RateKeys,
    CountArgs,
    """
local n = redis.call('INCR', K.counter)
if n == 1 then redis.call('EXPIRE', K.counter, tonumber(A.window_s) + 1) end
return n
""",
)


class PlaceKeys(NamedTuple):
    places: str


class PlaceArgs(NamedTuple):
    member: str
    now: int
    lapses: int
    limit: int


#: Take a place (or renew the one ``member`` holds) unless the set is full; 1 if taken.
PLACE = Script(
    "place",
    PlaceKeys,
    PlaceArgs,
    """
redis.call('ZREMRANGEBYSCORE', K.places, '-inf', A.now)
local held = redis.call('ZSCORE', K.places, A.member)
if held or redis.call('ZCARD', K.places) < tonumber(A.limit) then
  redis.call('ZADD', K.places, A.lapses, A.member)
  redis.call('PEXPIRE', K.places, A.lapses - A.now + 1000)
  return 1
end
return 0
""",
)


class Limits:
    def __init__(
        self, redis: RedisClient, keys: Keys, limits: TenantLimits, *, pending_ttl_s: int
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._limits = limits
        self._pending_ttl_s = pending_ttl_s
        self._rate = RATE.bound(redis)
        self._count = COUNT.bound(redis)
        self._place = PLACE.bound(redis)
        #: tenant -> until when (time.time()) its starts are refused here, without asking
        #: Redis: none is allowed before then, whoever asks.
        self._over: dict[str, float] = {}

    async def start_rate(self, tenant: str) -> None:
        """Count a start; raises :class:`Limited` past starts per second (checked before
        the body is read: a refused burst costs the replica as little as it can)."""
        if limit := self._limits.starts_per_s:
            if (refused := self.refused_start(tenant)) is not None:
                raise refused
            now = time.time()
            interval_us = 1_000_000 // limit
            wait_us = await self._rate(
                RateKeys(counter=f"{self._keys.tenant(tenant)}:starts"),
                RateArgs(
                    interval_us=interval_us,
                    tolerance_us=interval_us * (start_burst(limit) - 1),
                ),
            )
            if not wait_us:
                return
            if len(self._over) > MAX_TENANTS_KEPT:
                self._over.clear()
            self._over[tenant] = now + int(wait_us) / 1_000_000
            raise Limited("starts", limit, window_s=1, retry_after_s=1)

    def refused_start(self, tenant: str) -> Limited | None:
        """The refusal a start of ``tenant`` gets from this replica's memory, if any: no
        start is allowed before the time Redis last named, whoever asks
        (services/api/refusals.py answers these before routing)."""
        limit = self._limits.starts_per_s
        if limit and self._over.get(tenant, 0.0) > time.time():
            return Limited("starts", limit, window_s=1, retry_after_s=1)
        return None

    async def fetch_priority(self, tenant: str) -> int | None:
        """The fetch priority of a run the named ``tenant`` starts now (see the module
        docstring); None for the default tenant: its runs carry nothing (priority 0)."""
        if tenant == DEFAULT_TENANT:
            return None
        window = int(time.time()) // SHARE_WINDOW_S
        started = await self._count(
            RateKeys(counter=f"{self._keys.tenant(tenant)}:share:{window}"),
            CountArgs(window_s=SHARE_WINDOW_S),
        )
        return 1 - int(cast(int, started))

    async def run_place(self, tenant: str, correlation_id: str) -> None:
        """Hold a place among the tenant's runs in flight for this run (its own place, if
        it holds one already); raises :class:`Limited` when they are taken."""
        if limit := self._limits.runs_in_flight:
            places = f"{self._keys.tenant(tenant)}:runs"
            lapses_s = self._pending_ttl_s
            if not await self.take(places, correlation_id, lapses_s, limit):
                await self._drop_ended(places)
                if not await self.take(places, correlation_id, lapses_s, limit):
                    raise Limited("runs", limit, window_s=1, retry_after_s=1)

    @contextlib.asynccontextmanager
    async def parked(self, tenant: str, wait_s: float) -> AsyncIterator[None]:
        """Hold one of the tenant's parked places for a wait of ``wait_s``; raises
        :class:`Limited` when they are taken. A wait of 0 parks nothing."""
        if wait_s <= 0:
            yield
            return
        place = await self._hold("parked", self._limits.parked, tenant, wait_s + PARKED_SLACK_S)
        try:
            yield
        finally:
            await place.release()

    async def stream(self, tenant: str) -> Place:
        """One of the tenant's stream places, for as long as the stream renews it (at
        least every :data:`STREAM_LEASE_S`) and until it is released. Raises
        :class:`Limited` when they are taken."""
        return await self._hold("streams", self._limits.streams, tenant, STREAM_LEASE_S)

    async def _hold(self, name: str, limit: int, tenant: str, lapses_s: float) -> Place:
        if not limit:
            return Place(None)
        places = f"{self._keys.tenant(tenant)}:{name}"
        place = Place(self, places, member=uuid.uuid4().hex, lapses_s=lapses_s, limit=limit)
        if not await place.renew():
            raise Limited(name, limit, window_s=int(lapses_s), retry_after_s=1)
        return place

    async def take(self, places: str, member: str, lapses_s: float, limit: int) -> bool:
        """Take a place in ``places`` (or renew the one ``member`` holds); False when full."""
        now = int(time.time() * 1000)
        taken = await self._place(
            PlaceKeys(places=places),
            PlaceArgs(member=member, now=now, lapses=now + int(lapses_s * 1000), limit=limit),
        )
        return bool(taken)

    async def give_back(self, places: str, member: str) -> None:
        await self._redis.zrem(places, member)

    async def _drop_ended(self, places: str) -> None:
        """Give back the places of runs no longer pending (ended, or gone from Redis)."""
        held = cast("list[bytes]", await self._redis.zrange(places, 0, -1))
        members = [text(member) for member in held]
        async with self._redis.pipeline(transaction=False) as pipe:
            for cid in members:
                pipe.hget(self._keys.state(cid), "status")
            statuses = await pipe.execute()
        ended = [
            cid
            for cid, status in zip(members, statuses, strict=True)
            if status is None or text(status) != Status.PENDING.value
        ]
        if ended:
            await self._redis.zrem(places, *ended)


@dataclass(slots=True)
class Place:
    """A place held in one of a tenant's sets (nothing, when ``limits`` is None)."""

    limits: Limits | None
    places: str = ""
    member: str = ""
    lapses_s: float = 0.0
    limit: int = 0

    async def renew(self) -> bool:
        """Keep the place (or take it again, if it lapsed and one is free); False if not."""
        if self.limits is None:
            return True
        return await self.limits.take(self.places, self.member, self.lapses_s, self.limit)

    async def release(self) -> None:
        if self.limits is not None:
            await self.limits.give_back(self.places, self.member)
