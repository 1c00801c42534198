"""A tenant's starts per second on a real Redis (single and Cluster): spread evenly, one
every 1/limit s with a tenth of the limit at once, the same on every replica."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from flowgate.services.api.limits import Limited, Limits, TenantLimits
from flowgate.shared.keys import Keys
from flowgate.shared.redis_client import RedisClient


def limits(redis: RedisClient, prefix: str, per_s: int) -> Limits:
    return Limits(redis, Keys(prefix), TenantLimits(starts_per_s=per_s), pending_ttl_s=60)


async def allowed(replica: Limits, tenant: str, tries: int) -> int:
    refusals: list[Limited] = []
    for _ in range(tries):
        try:
            await replica.start_rate(tenant)
        except Limited as refused:
            refusals.append(refused)
    assert all(r.headers["RateLimit-Policy"] == '"starts";q=20;w=1' for r in refusals)
    return tries - len(refusals)


async def test_a_flood_of_starts_goes_through_one_by_one_on_every_replica(
    redis_client: RedisClient, redis_prefix: str
) -> None:
    one, two = (limits(redis_client, redis_prefix, per_s=20) for _ in range(2))
    # A burst at once: a tenth of the limit goes ahead, whichever replica it reaches.
    assert await allowed(one, "alpha", 10) + await allowed(two, "alpha", 10) == 2
    assert await allowed(one, "beta", 5) == 2  # another tenant's own
    # A flood on both replicas until ten more went through: one start per 50 ms, never
    # more than the burst of two within any stretch (GCRA's bound on Redis's clock). The
    # times here are the client's, seen after a round trip a stalled loop may stretch, so
    # the bound allows one start more.
    went: list[float] = []
    loop = asyncio.get_running_loop()
    began = loop.time()
    while len(went) < 10 and loop.time() - began < 10:
        for replica in (one, two):
            if await allowed(replica, "alpha", 1):
                went.append(loop.time() - began)
        await asyncio.sleep(0.005)
    assert len(went) >= 10, went
    for i, j in itertools.combinations(range(len(went)), 2):
        assert j - i + 1 <= 3 + (went[j] - went[i]) / 0.05, (i, j, went)


@pytest.mark.parametrize("per_s", [1, 3])
async def test_a_low_limit_still_lets_one_start_through(
    redis_client: RedisClient, redis_prefix: str, per_s: int
) -> None:
    replica = limits(redis_client, redis_prefix, per_s=per_s)
    await replica.start_rate("gamma")
    with pytest.raises(Limited):
        await replica.start_rate("gamma")
