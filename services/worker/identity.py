"""The worker's id, and how a restarted worker finds the id its predecessor used.

Each process has a fresh ``workerId`` = ``host:pid:random`` (unique, never shared: the
engine ties every lock to it). To unlock tasks that a crashed predecessor still holds, a
worker must know the predecessor's id, so ids are recorded per **slot**: a stable name
(``WORKER_NAME``, default the host name) and a number. On start a worker takes the lowest
free slot of its name and reads the id last recorded there:

* ``{p}:worker:{name}:{slot}:lease`` — the id of the live holder, with a short TTL the
  holder refreshes. A slot whose lease exists is taken, unless its holder is provably dead:
  same host, and its pid is gone or now belongs to a process that started at another time
  (``/proc/<pid>/stat``; this covers a container restart, where the new process gets the
  same pid 1). A dead holder's slot is taken over at once, not after the TTL.
* ``{p}:worker:{name}:{slot}:last`` — the last id that held the slot (kept for a week).
  The new holder unlocks what that id still holds.

So N workers of one name (``make up`` runs several on one host) get slots 0..N-1, a crashed
worker's replacement on the same host or in the same container (or pod, whose host name
survives a container restart) recovers its predecessor's tasks immediately, and two live
processes never share a slot (which would let one unlock the other's tasks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from flowgate.shared.aio import sleep_or_stop, stop_and_wait
from flowgate.shared.keys import Keys
from flowgate.shared.lease import Lease
from flowgate.shared.lua import Script
from flowgate.shared.redis_client import REDIS_ERRORS, RedisClient, text

log = logging.getLogger(__name__)

MAX_SLOTS = 256
LEASE_S = 10.0
LAST_ID_TTL_S = 7 * 86_400


class SlotKeys(NamedTuple):
    lease: str
    last: str


class AcquireArgs(NamedTuple):
    holder: str
    lease_ms: int
    last_ttl_s: int
    #: The holder value to replace ('' = only a free slot).
    replace: str


#: Take a free slot (or one whose holder is ``replace``) and move its last id on.
#: {1, previous id or ''} or {0, current holder}.
ACQUIRE = Script(
    "slot-acquire",
    SlotKeys,
    AcquireArgs,
    """
local holder = redis.call('GET', K.lease)
if holder and holder ~= A.replace then return {0, holder} end
redis.call('SET', K.lease, A.holder, 'PX', A.lease_ms)
local previous = redis.call('GET', K.last) or ''
redis.call('SET', K.last, A.holder, 'EX', A.last_ttl_s)
return {1, previous}
""",
)


@dataclass(frozen=True, slots=True)
class Identity:
    worker_id: str
    name: str
    slot: int
    #: The id that held this slot before (its tasks are unlocked on start), if any.
    previous_id: str | None


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


@contextlib.asynccontextmanager
async def claim_identity(
    redis: RedisClient, keys: Keys, *, name: str | None = None, lease_s: float = LEASE_S
) -> AsyncIterator[Identity]:
    """Hold a slot of ``name`` for the duration of the block (lease refreshed meanwhile)."""
    name = name or socket.gethostname()
    worker_id = new_worker_id()
    holder = f"{worker_id}|{_start_ticks(os.getpid())}"
    slot, previous = await _acquire(redis, keys, name, holder, lease_s)
    identity = Identity(worker_id, name, slot, previous.split("|")[0] if previous else None)
    log.info(
        "worker identity",
        extra={"workerId": worker_id, "slot": f"{name}/{slot}", "previousId": identity.previous_id},
    )
    lease = Lease(redis, keys.worker_slot(name, slot, "lease"), holder=holder, ttl_s=lease_s)
    done = asyncio.Event()
    async with asyncio.TaskGroup() as tasks:
        refresher = tasks.create_task(_refresh(lease, lease_s, done), name="slot-lease")
        try:
            yield identity
        finally:
            await stop_and_wait(done, [refresher])
            # A failed release only means the slot frees itself when the lease expires.
            with contextlib.suppress(*REDIS_ERRORS, TimeoutError):
                async with asyncio.timeout(2):
                    await lease.release()


async def _acquire(
    redis: RedisClient, keys: Keys, name: str, holder: str, lease_s: float
) -> tuple[int, str | None]:
    acquire = ACQUIRE.bound(redis)
    for slot in range(MAX_SLOTS):
        slot_keys = SlotKeys(
            lease=keys.worker_slot(name, slot, "lease"), last=keys.worker_slot(name, slot, "last")
        )
        replace = ""
        while True:
            ok, value = await acquire(
                slot_keys,
                AcquireArgs(
                    holder=holder,
                    lease_ms=int(lease_s * 1000),
                    last_ttl_s=LAST_ID_TTL_S,
                    replace=replace,
                ),
            )
            value = text(value)
            if ok:
                return slot, value or None
            if replace or not _holder_is_dead(value):
                break  # a live holder (or a race we lost): try the next slot
            replace = value
    raise RuntimeError(f"all {MAX_SLOTS} worker slots of {name!r} are taken")


async def _refresh(lease: Lease, lease_s: float, done: asyncio.Event) -> None:
    """Renew the lease at a third of its TTL until ``done``; errors are logged and retried,
    never fatal."""
    while not await sleep_or_stop(done, lease_s / 3):
        try:
            async with asyncio.timeout(lease_s / 3):
                ours = await lease.hold()
            if not ours:
                log.error("worker slot lease taken by another process")
        except (*REDIS_ERRORS, TimeoutError) as exc:
            log.warning("worker slot lease not renewed: %s", exc)


def _holder_is_dead(holder: str) -> bool:
    """True only when the holder provably no longer runs (same host, pid gone or reused)."""
    worker_id, _, ticks = holder.partition("|")
    host, _, rest = worker_id.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if ticks:  # the holder recorded its start time, so /proc works on this host
        return _start_ticks(pid) != ticks  # "" when gone, another time when pid was reused
    if pid == os.getpid():
        return False  # cannot tell our own start from a predecessor's: stay safe
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _start_ticks(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), or '' if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else ""
