"""A lease in Redis: :class:`Lease`, held by one process at a time, until it lapses.

The engine watcher needs one (one API replica watches the engine at a time:
services/background/watcher.py), so do the loops :func:`lead` runs (the backlog sampler, the
stall check) and a worker's slot (one live process per slot: services/worker/identity.py).
The holder renews its lease well within its time to live; a holder that dies stops
renewing and the lease lapses, so another takes over. Renewing and giving up check the
holder first, so a process never extends or drops another's lease. A holder asking again
within a quarter of the time to live is answered from memory: the lease cannot have lapsed
yet, and the loops that ask every pass (the watcher's, ten times a second) cost Redis a
round trip a quarter as often as they ask.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from flowgate.shared.aio import Backoff, sleep_or_stop
from flowgate.shared.lua import Script
from flowgate.shared.redis_client import REDIS_ERRORS, RedisClient

log = logging.getLogger(__name__)


class LeaseKeys(NamedTuple):
    lease: str


class HoldArgs(NamedTuple):
    holder: str
    ttl_ms: int


class ReleaseArgs(NamedTuple):
    holder: str


#: Take a free lease or renew one's own. 1 if held.
HOLD = Script(
    "lease-hold",
    LeaseKeys,
    HoldArgs,
    """
local holder = redis.call('GET', K.lease)
if not holder then
  redis.call('SET', K.lease, A.holder, 'PX', A.ttl_ms)
  return 1
end
if holder == A.holder then
  redis.call('PEXPIRE', K.lease, A.ttl_ms)
  return 1
end
return 0
""",
)

#: Give one's own lease up. 1 if it was held.
RELEASE = Script(
    "lease-release",
    LeaseKeys,
    ReleaseArgs,
    """
if redis.call('GET', K.lease) == A.holder then return redis.call('DEL', K.lease) end
return 0
""",
)


class Lease:
    def __init__(
        self,
        redis: RedisClient,
        key: str,
        *,
        holder: str,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._keys = LeaseKeys(lease=key)
        self._holder = holder
        self._ttl_ms = int(ttl_s * 1000)
        self._hold = HOLD.bound(redis)
        self._release = RELEASE.bound(redis)
        #: When this process last took or renewed the lease (monotonic; None: not ours).
        self._held_since: float | None = None
        self._clock = clock

    async def hold(self) -> bool:
        """Take the lease if it is free, or renew it if it is ours; whether it is ours."""
        asked = self._clock()
        if self._held_since is not None and asked - self._held_since < self._ttl_ms / 4000:
            return True
        ours = bool(
            await self._hold(self._keys, HoldArgs(holder=self._holder, ttl_ms=self._ttl_ms))
        )
        # From before the round trip: Redis counts the time to live from later.
        self._held_since = asked if ours else None
        return ours

    async def release(self) -> None:
        """Give it up if it is ours (so another may take it at once)."""
        self._held_since = None
        await self._release(self._keys, ReleaseArgs(holder=self._holder))


async def lead(
    lease: Lease,
    stop: asyncio.Event,
    *,
    every_s: float,
    work: Callable[[], Awaitable[object]],
    errors: tuple[type[Exception], ...],
    what: str,
    idle: Callable[[], None] = lambda: None,
) -> None:
    """Run ``work`` every ``every_s`` while this process holds ``lease``, until ``stop``
    (``idle`` while another holds it, and at the end). ``errors`` (and Redis's) are logged
    and tried again after a backoff, never raised; the lease is given up at the end."""
    backoff = Backoff(base_s=every_s, cap_s=60.0)
    caught: tuple[type[BaseException], ...] = (*errors, *REDIS_ERRORS, OSError, TimeoutError)
    try:
        while not stop.is_set():
            pause = every_s
            try:
                if await lease.hold():
                    await work()
                else:
                    idle()
                backoff.reset()
            except caught as exc:
                log.warning("%s failed", what, extra={"error": str(exc)})
                pause = backoff.next_delay_s()
            await sleep_or_stop(stop, pause)
    finally:
        idle()
        try:
            await asyncio.shield(lease.release())
        except (*REDIS_ERRORS, OSError, TimeoutError):
            pass  # it lapses on its own
