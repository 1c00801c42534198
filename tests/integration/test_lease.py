"""A lease answers its holder from memory within a quarter of its time to live, and asks
Redis again after that (shared/lease.py)."""

from __future__ import annotations

from flowgate.shared.lease import Lease
from flowgate.shared.redis_client import RedisClient


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_holder_asks_redis_again_only_after_a_quarter_of_the_ttl(
    redis_client: RedisClient, redis_prefix: str
) -> None:
    clock, redis, key = Clock(), redis_client, f"{redis_prefix}:lease"
    ours = Lease(redis, key, holder="a", ttl_s=4.0, clock=clock)
    theirs = Lease(redis, key, holder="b", ttl_s=4.0, clock=clock)
    assert await ours.hold()
    assert not await theirs.hold()
    # Taken out behind our back: within a second (a quarter of 4 s) we do not look ...
    await redis.delete(key)
    clock.now += 0.9
    assert await ours.hold()
    assert await redis.get(key) is None
    # ... after it we do, and renew.
    clock.now += 0.2
    assert await ours.hold()
    assert await redis.get(key) == b"a"
    assert 3000 < await redis.pttl(key) <= 4000


async def test_a_lease_lost_or_given_up_is_asked_for_again_at_once(
    redis_client: RedisClient, redis_prefix: str
) -> None:
    clock, key = Clock(), f"{redis_prefix}:lease"
    ours = Lease(redis_client, key, holder="a", ttl_s=4.0, clock=clock)
    theirs = Lease(redis_client, key, holder="b", ttl_s=4.0, clock=clock)
    assert await ours.hold()
    await ours.release()
    assert await theirs.hold()
    assert not await ours.hold()  # asked Redis: not answered from memory
    clock.now += 0.1
    assert not await ours.hold()
