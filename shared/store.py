"""Process state in Redis: one hash per run, every transition one Lua script.

A transition changes the hash, appends its write-behind entry to its partition's stream
``{p:n}:wb`` and (for a finish, a step or an abandoned start) publishes on the partition's
channel ``{p:n}:run`` in the same script, so there is no window in which a state is written
but never persisted or never announced. A subscriber that receives a message can read the
new state at once: Redis delivers the publish only after the script has finished. Every key
a script touches is in the run's partition (shared/keys.py), so each script runs on a Redis
Cluster as it does on one Redis; what spans partitions (paging, the schedules, the
instance map) is read partition by partition, pipelined.

A run's life in transitions: :meth:`~ProcessStore.claim` (``pending``), then
:meth:`~ProcessStore.sending` (the engine start is about to be sent), then
:meth:`~ProcessStore.attach_instance`, and at the end :meth:`~ProcessStore.finish` (``ok`` |
``error``); or, for a start that never reached the engine, :meth:`~ProcessStore.abandon`.
Claims without an instance sit in ``{p}:starts`` until attached, finished or abandoned, so
that a replica that dies mid-start leaves nothing stranded (services/api/starter.py).

The record and its shapes (hash, wire object, row) are in shared/state.py; the completion
channel's messages in shared/contract.py. Stream entries have the fields ``kind``
(``state`` | ``event``) and ``body`` (JSON). The stream is never trimmed with MAXLEN (that
would drop entries Postgres has not seen); the flusher deletes entries once committed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import heapq
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, cast

from shared.contract import QUEUED, StartFailed, SystemVariables
from shared.eventlog import EventRecord
from shared.keys import Keys, Partition
from shared.redis_client import RedisClient, publish_verb
from shared.state import STATE_JSON_LUA, ProcessState, Status, dump_json, iso
from shared.steps import MAX_STEPS, StepEvent

#: How long an ended run's engine instance stays watched: the engine's history of its last
#: steps (the end event after the finishing task) is still recorded meanwhile.
INSTANCE_LINGER_S = 10.0

# KEYS: state, index, stream, starts. ARGV: cid, index score (ms), pending TTL (s), oldest
# index score worth keeping (ms), when to look after the claim (ms), then the new hash's
# field/value pairs. An abandoned run's record gives way (its version goes on). Returns
# {created (0|1), state JSON}.
_CLAIM_LUA = (
    STATE_JSON_LUA
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if status and status ~= 'abandoned' then
  return {0, state_json(KEYS[1])}
end
local version = 1
if status then
  version = tonumber(redis.call('HGET', KEYS[1], 'version')) + 1
  redis.call('DEL', KEYS[1])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
redis.call('HSET', KEYS[1], 'version', version)
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[4])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[1])
local state = state_json(KEYS[1])
redis.call('XADD', KEYS[3], '*', 'kind', 'state', 'body', state)
return {1, state}
"""
)

# KEYS: state, stream, starts. ARGV: version, now (ISO), when to look after it (ms), cid.
# Marks the engine start as sent, only for a pending claim at that version that has neither
# an instance nor a start sent. Returns the new version, or false.
_SENDING_LUA = (
    STATE_JSON_LUA
    + """
local f = redis.call('HMGET', KEYS[1], 'status', 'version', 'instanceId', 'startSentAt')
if f[1] ~= 'pending' or f[2] ~= ARGV[1] or (f[3] or '') ~= '' or (f[4] or '') ~= '' then
  return false
end
redis.call('HSET', KEYS[1], 'startSentAt', ARGV[2], 'updatedAt', ARGV[2])
local version = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('XADD', KEYS[2], '*', 'kind', 'state', 'body', state_json(KEYS[1]))
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
return version
"""
)

# record_step(state, steps, seen, stream, activity instance id, step JSON, audit JSON, max,
# channel, cid): a step is recorded once (the worker and the history may both report it),
# with its audit row, lives as long as the run's state, and is announced on the run's
# channel (shared/contract.py StepRecorded). Returns 1 if it was new.
_RECORD_STEP_LUA = """
local function record_step(state, steps, seen, stream, aid, step, audit, max, channel, cid)
  if redis.call('SADD', seen, aid) == 0 then return 0 end
  local id = redis.call('XADD', steps, 'MAXLEN', '~', max, '*', 'step', step)
  local ttl = redis.call('PTTL', state)
  if ttl > 0 then
    redis.call('PEXPIRE', steps, ttl)
    redis.call('PEXPIRE', seen, ttl)
  end
  if audit ~= '' then redis.call('XADD', stream, '*', 'kind', 'event', 'body', audit) end
  redis.call(PUBLISH, channel, cid .. '\\n{"kind":"step","id":"' .. id .. '"}')
  return 1
end
"""

# KEYS: state, stream, starts, instances. ARGV: instance id, now (ISO), event body ('' =
# none), cid. Returns the state JSON once recorded (or recorded before), 0 if the run is
# gone, -1 if it was abandoned or cancelled.
_ATTACH_LUA = (
    STATE_JSON_LUA
    + """
local f = redis.call('HMGET', KEYS[1], 'status', 'instanceId')
if not f[1] then
  redis.call('ZREM', KEYS[3], ARGV[4])
  return 0
end
if f[1] == 'abandoned' or f[1] == 'cancelled' then return -1 end
if f[2] == ARGV[1] then return state_json(KEYS[1]) end
redis.call('HSET', KEYS[1], 'instanceId', ARGV[1], 'updatedAt', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'version', 1)
local state = state_json(KEYS[1])
redis.call('XADD', KEYS[2], '*', 'kind', 'state', 'body', state)
if ARGV[3] ~= '' then redis.call('XADD', KEYS[2], '*', 'kind', 'event', 'body', ARGV[3]) end
redis.call('ZREM', KEYS[3], ARGV[4])
redis.call('HSET', KEYS[4], ARGV[1], ARGV[4])
return state
"""
)

# KEYS: state, stream, starts, steps, steps seen, instances ended, callbacks, cancel. ARGV: status,
# data JSON, error JSON, now (ISO), result TTL (s), channel, audit body ('' = none), cid, step
# JSON ('' = none), its activity instance id, max steps, when to forget the instance (ms),
# now (ms). Returns 1 if the state changed.
_FINISH_LUA = (
    STATE_JSON_LUA
    + _RECORD_STEP_LUA
    + """
if redis.call('HGET', KEYS[1], 'status') ~= 'pending' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'data', ARGV[2], 'error', ARGV[3],
  'updatedAt', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('EXPIRE', KEYS[1], ARGV[5])
local state = state_json(KEYS[1])
redis.call('XADD', KEYS[2], '*', 'kind', 'state', 'body', state)
if ARGV[9] ~= '' then
  record_step(KEYS[1], KEYS[4], KEYS[5], KEYS[2], ARGV[10], ARGV[9], ARGV[7], ARGV[11],
    ARGV[6], ARGV[8])
elseif ARGV[7] ~= '' then
  redis.call('XADD', KEYS[2], '*', 'kind', 'event', 'body', ARGV[7])
end
redis.call('EXPIRE', KEYS[4], ARGV[5])
redis.call('EXPIRE', KEYS[5], ARGV[5])
redis.call('ZREM', KEYS[3], ARGV[8])
local f = redis.call('HMGET', KEYS[1], 'instanceId', 'callbackUrl')
if f[1] and f[1] ~= '' then redis.call('ZADD', KEYS[6], 'NX', ARGV[12], f[1]) end
if f[2] and f[2] ~= '' then redis.call('ZADD', KEYS[7], 'NX', ARGV[13], ARGV[8]) end
redis.call('DEL', KEYS[8])
redis.call(PUBLISH, ARGV[6], ARGV[8] .. '\\n' .. state)
return 1
"""
)

# KEYS: state, cancel. ARGV: reason, TTL (s). Records that a cancel was asked for a pending
# run. Returns 1 if the run is pending.
_CANCELLING_LUA = """
if redis.call('HGET', KEYS[1], 'status') ~= 'pending' then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
return 1
"""

# KEYS: state, steps, steps seen, stream. ARGV: activity instance id, step JSON, audit body
# ('' = none), max steps, channel, cid. Returns 1 if the step was new, 0 if known or the run is
# gone.
_STEP_LUA = (
    _RECORD_STEP_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
return record_step(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[3], ARGV[4],
  ARGV[5], ARGV[6])
"""
)

# KEYS: state, index, stream, starts. ARGV: cid, version, StartFailed JSON, channel, now
# (ISO), TTL (s), '1' to require that no engine start was sent. Only a pending claim at that
# version without an instance. Returns 1 if abandoned.
_ABANDON_LUA = (
    STATE_JSON_LUA
    + """
local f = redis.call('HMGET', KEYS[1], 'status', 'version', 'instanceId', 'startSentAt')
if f[1] ~= 'pending' or f[2] ~= ARGV[2] or (f[3] or '') ~= '' then return 0 end
if ARGV[7] == '1' and (f[4] or '') ~= '' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'abandoned', 'error', ARGV[3], 'updatedAt', ARGV[5])
redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('XADD', KEYS[3], '*', 'kind', 'state', 'body', state_json(KEYS[1]))
redis.call(PUBLISH, ARGV[4], ARGV[1] .. '\\n' .. ARGV[3])
return 1
"""
)

# KEYS: schedule. ARGV: member, now (ms), when it is due again (ms). Takes a due item for a
# while (so replicas do not all work on the same one). Returns 1 if taken.
_TAKE_LUA = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], 'XX', ARGV[3], ARGV[1])
return 1
"""

# KEYS: state, steps. What a status read shows, in one command (cheaper than a pipeline):
# {state JSON ('' = none), the last step's JSON if the run is pending (else false)}.
_LOOK_LUA = (
    STATE_JSON_LUA
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'', false} end
local step = false
if status == 'pending' then
  local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
  if last then step = last[2][2] end
end
return {state_json(KEYS[1]), step}
"""
)

# KEYS: a partition's index. ARGV: its proc key prefix, max score ('+inf' or ms), cursor
# member ('' = none), limit, scan cap. Newest first; index entries whose hash is gone are
# removed as met. The scan cap bounds one call's work: at the cap it answers short, with a
# cursor. Returns {next score or false, next member or false, (score, state JSON)...}. Reads the
# hashes by computed names, which share the index's hash slot.
_PAGE_LUA = (
    STATE_JSON_LUA
    + """
local function bytes_before(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
local prefix, max, cursor = ARGV[1], ARGV[2], ARGV[3]
local max_n = tonumber(max)
local limit, cap = tonumber(ARGV[4]), tonumber(ARGV[5])
local out = {false, false}
local found, scanned, offset = 0, 0, 0
local last_score, last_member = false, false
while true do
  local batch = redis.call('ZREVRANGEBYSCORE', KEYS[1], max, '-inf', 'WITHSCORES',
    'LIMIT', offset, 100)
  if #batch == 0 then return out end
  local removed = 0
  for i = 1, #batch, 2 do
    local member, score = batch[i], batch[i + 1]
    local seen = cursor ~= '' and tonumber(score) == max_n and not bytes_before(member, cursor)
    if not seen then
      local key = prefix .. member
      if redis.call('EXISTS', key) == 1 then
        if found == limit then
          out[1], out[2] = last_score, last_member
          return out
        end
        found = found + 1
        out[#out + 1] = score
        out[#out + 1] = state_json(key)
      else
        redis.call('ZREM', KEYS[1], member)
        removed = removed + 1
      end
      last_score, last_member = score, member
      scanned = scanned + 1
      if scanned >= cap then
        out[1], out[2] = last_score, last_member
        return out
      end
    end
  end
  offset = offset + #batch / 2 - removed
end
"""
)

# Stale entries one page call may clean up before it answers with what it has.
_PAGE_SCAN_CAP = 1_000


class InvalidCursor(ValueError):
    """A paging cursor that :meth:`ProcessStore.page` did not produce (answer 400)."""


def _encode_cursor(score: str, member: str) -> str:
    raw = f"{int(float(score))}|{member}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        score, member = raw.split("|", 1)
        return int(score), member
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise InvalidCursor(f"invalid cursor {cursor!r}") from exc


class Abandoned(Exception):
    """An engine instance arrived for a run that must not have one: its claim was given up
    meanwhile, or it was cancelled."""


class Schedule:
    """Work every replica shares: a sorted set per partition of correlationIds scored by
    when each is due (``key`` names a partition's set).

    :meth:`take` hands a due item to one replica and makes it due again later, so an item
    whose taker dies comes back by itself; the taker :meth:`drop` s it when done, or
    :meth:`defer` s it to a time of its choosing.
    """

    def __init__(self, redis: RedisClient, keys: Keys, key: Callable[[Partition], str]) -> None:
        self._redis = redis
        self._keys = keys
        self._key = key
        self._take = redis.register_script(_TAKE_LUA)

    async def due(self, limit: int) -> list[str]:
        """Items whose time has come, the longest due first (at most ``limit`` of each
        partition are looked at)."""
        now_ms = _ms(datetime.now(UTC))
        async with self._redis.pipeline(transaction=False) as pipe:
            for partition in self._keys.partitions:
                pipe.zrangebyscore(self._key(partition), "-inf", now_ms, 0, limit, withscores=True)
            found: list[list[tuple[bytes | str, float]]] = await pipe.execute()
        merged = heapq.merge(*found, key=lambda item: item[1])
        return [_text(cid) for cid, _ in merged][:limit]

    async def take(self, correlation_id: str, *, again_s: float) -> bool:
        """Take a due item; it is due again in ``again_s`` unless dropped or deferred
        meanwhile. False if another replica took it first (or it is gone)."""
        now_ms = _ms(datetime.now(UTC))
        taken = await self._take(
            keys=[self._key_of(correlation_id)],
            args=[correlation_id, now_ms, now_ms + int(again_s * 1000)],
        )
        return bool(taken)

    async def defer(self, correlation_id: str, *, delay_s: float) -> None:
        """Make a taken item due in ``delay_s`` (only if it is still scheduled)."""
        at = _ms(datetime.now(UTC)) + int(delay_s * 1000)
        await self._redis.zadd(self._key_of(correlation_id), {correlation_id: at}, xx=True)

    async def drop(self, correlation_id: str) -> None:
        await self._redis.zrem(self._key_of(correlation_id), correlation_id)

    def _key_of(self, correlation_id: str) -> str:
        return self._key(self._keys.of(correlation_id))


class ProcessStore:
    """Run state transitions; see the module docstring.

    Works with a client created with or without ``decode_responses``.
    """

    def __init__(
        self, redis: RedisClient, keys: Keys, *, result_ttl_s: int, pending_ttl_s: int
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._result_ttl_s = result_ttl_s
        self._pending_ttl_s = pending_ttl_s
        # The scripts that announce a change publish with the verb this Redis wants.
        publishing = f"local PUBLISH = '{publish_verb(redis)}'\n"
        self._claim = redis.register_script(_CLAIM_LUA)
        self._sending = redis.register_script(_SENDING_LUA)
        self._attach = redis.register_script(_ATTACH_LUA)
        self._finish = redis.register_script(publishing + _FINISH_LUA)
        self._step = redis.register_script(publishing + _STEP_LUA)
        self._cancelling = redis.register_script(_CANCELLING_LUA)
        self._abandon = redis.register_script(publishing + _ABANDON_LUA)
        #: Claims without an engine instance yet, due for a look (services/api/starter.py).
        self.starts = Schedule(redis, keys, lambda partition: partition.starts)
        #: Ended runs whose end is to be delivered to their callbackUrl (callbacks.py).
        self.callbacks = Schedule(redis, keys, lambda partition: partition.callbacks)
        self._page = redis.register_script(_PAGE_LUA)
        self._look = redis.register_script(_LOOK_LUA)

    async def claim(
        self,
        ids: SystemVariables,
        process_key: str,
        request_hash: str,
        *,
        fetch_variables: list[str] | None = None,
        callback_url: str | None = None,
        look_after_s: float = 5.0,
    ) -> tuple[ProcessState, bool]:
        """Create the ``pending`` state, or return the one that exists.

        Exactly one of any number of concurrent callers gets ``created=True``; the others
        join it (and must compare ``request_hash`` themselves). The index entry lets
        :meth:`page` list newest first; entries older than any hash can live are dropped
        here, so the index stays bounded without a sweeper. The claim is due for a look
        (:meth:`due`) after ``look_after_s`` unless its start goes on by then.
        """
        now = datetime.now(UTC)
        state = ProcessState(
            correlation_id=ids.correlation_id,
            status=Status.PENDING,
            process_key=process_key,
            request_hash=request_hash,
            instance_id=None,
            traceability_id=ids.traceability_id,
            batch_id=ids.batch_id,
            application_id=ids.application_id,
            data=QUEUED,
            error=None,
            started_at=now,
            updated_at=now,
            version=1,
            fetch_variables=fetch_variables,
            callback_url=callback_url,
        )
        now_ms = _ms(now)
        oldest_ms = now_ms - (self._pending_ttl_s + self._result_ttl_s) * 1000
        fields = [text for pair in state.to_hash().items() for text in pair]
        part = self._keys.of(ids.correlation_id)
        created, stored = await self._claim(
            keys=[self._state(ids.correlation_id), part.index, part.writebehind, part.starts],
            args=[ids.correlation_id, now_ms, self._pending_ttl_s, oldest_ms,
                  now_ms + int(look_after_s * 1000), *fields],
        )  # fmt: skip
        return ProcessState.from_json(stored), bool(created)

    async def sending(self, state: ProcessState, *, look_after_s: float) -> ProcessState | None:
        """Mark the engine start of a fresh claim as sent; the state now, or None when the
        claim changed meanwhile (abandoned by recovery: do not send)."""
        now = datetime.now(UTC)
        part = self._keys.of(state.correlation_id)
        version = await self._sending(
            keys=[self._state(state.correlation_id), part.writebehind, part.starts],
            args=[state.version, iso(now), _ms(now) + int(look_after_s * 1000),
                  state.correlation_id],
        )  # fmt: skip
        if not version:
            return None
        return dataclasses.replace(state, start_sent_at=now, updated_at=now, version=int(version))

    async def attach_instance(
        self, correlation_id: str, instance_id: str, event: EventRecord | None = None
    ) -> ProcessState | None:
        """Record the engine's instance id (also after a finish that beat the start's
        response) and, in the same step, its audit ``event``; the state as it is then (a
        start's wait begins from it), or None when the run no longer exists. Raises
        :class:`Abandoned` when its claim was given up or cancelled meanwhile."""
        part = self._keys.of(correlation_id)
        attached = await self._attach(
            keys=[self._state(correlation_id), part.writebehind, part.starts, part.instances],
            args=[instance_id, iso(datetime.now(UTC)), event.to_json() if event else "",
                  correlation_id],
        )  # fmt: skip
        if attached == -1:
            raise Abandoned(correlation_id)
        return ProcessState.from_json(attached) if attached else None

    async def finish(
        self,
        correlation_id: str,
        status: Status,
        *,
        data: Any = None,
        error: Any = None,
        event: EventRecord | None = None,
        step: StepEvent | None = None,
    ) -> bool:
        """End a ``pending`` run and wake its waiters; True if this call changed it.

        The one way a run ends, whoever ends it (the ``/complete`` endpoint, a worker's
        finishing step, an incident, the engine's end). ``event`` is its audit row and
        ``step`` the step that ended it, both written in the same step. A second finish,
        or one for an unknown (never claimed or expired) id, changes nothing and returns
        False: the first outcome wins. The run's engine instance stays watched for
        :data:`INSTANCE_LINGER_S` more, for its last steps.
        """
        if status not in (Status.OK, Status.ERROR, Status.CANCELLED):
            raise ValueError("finish() needs a terminal status (ok, error or cancelled)")
        cid = correlation_id
        now = datetime.now(UTC)
        part = self._keys.of(cid)
        changed = await self._finish(
            keys=[self._state(cid), part.writebehind, part.starts, self._keys.steps(cid),
                  self._keys.steps_seen(cid), part.instances_ended, part.callbacks,
                  self._keys.cancel(cid)],
            args=[
                status.value,
                dump_json(data),
                dump_json(error),
                iso(now),
                self._result_ttl_s,
                part.channel,
                event.to_json() if event else "",
                cid,
                step.to_json() if step else "",
                step.activity_instance_id if step else "",
                MAX_STEPS,
                _ms(now) + int(INSTANCE_LINGER_S * 1000),
                _ms(now),
            ],
        )  # fmt: skip
        return bool(changed)

    async def cancelling(self, correlation_id: str, reason: str) -> bool:
        """Record that a cancel was asked for this pending run (before its engine instance is
        deleted): whoever sees the deletion ends the run ``cancelled`` with ``reason``.
        False when the run is not pending."""
        cid = correlation_id
        asked = await self._cancelling(
            keys=[self._state(cid), self._keys.cancel(cid)], args=[reason, self._pending_ttl_s]
        )
        return bool(asked)

    async def cancel_reasons(self, correlation_ids: Sequence[str]) -> dict[str, str]:
        """The reasons of the cancels asked for among these runs (see :meth:`cancelling`)."""
        if not correlation_ids:
            return {}
        async with self._redis.pipeline(transaction=False) as pipe:
            for cid in correlation_ids:
                pipe.get(self._keys.cancel(cid))
            found = await pipe.execute()
        return {cid: _text(r) for cid, r in zip(correlation_ids, found, strict=True) if r}

    async def record_step(
        self, correlation_id: str, step: StepEvent, event: EventRecord | None = None
    ) -> bool:
        """Add a step to the run's record (once per activity instance), with its audit row;
        True if it was new."""
        cid = correlation_id
        part = self._keys.of(cid)
        recorded = await self._step(
            keys=[self._state(cid), self._keys.steps(cid), self._keys.steps_seen(cid),
                  part.writebehind],
            args=[step.activity_instance_id, step.to_json(), event.to_json() if event else "",
                  MAX_STEPS, part.channel, cid],
        )  # fmt: skip
        return bool(recorded)

    async def steps(
        self, correlation_id: str, *, after: str = "-", count: int = MAX_STEPS
    ) -> list[tuple[str, StepEvent]]:
        """The run's steps after stream id ``after`` (exclusive), oldest first, with ids."""
        start = after if after == "-" else f"({after}"
        entries = await self._redis.xrange(self._keys.steps(correlation_id), start, "+", count)
        return [(_text(entry_id), _step_of(fields)) for entry_id, fields in _entries(entries)]

    async def find_step(self, correlation_id: str, name: str) -> StepEvent | None:
        """The first recorded step called ``name`` (its step name or activity id), or None."""
        for _, step in await self.steps(correlation_id):
            if name in step.names():
                return step
        return None

    async def look(self, correlation_id: str) -> tuple[ProcessState | None, StepEvent | None]:
        """The state in Redis (as :meth:`get`) and the step the run recorded last (None:
        nothing has run yet, or the run is over), in one round trip: what a status read
        shows."""
        keys = [self._state(correlation_id), self._keys.steps(correlation_id)]
        state, step = await self._look(keys=keys)
        return (
            ProcessState.from_json(state) if state else None,
            StepEvent.from_json(step) if step else None,
        )

    async def runs_of(self, instance_ids: Sequence[str]) -> dict[str, str]:
        """The correlationIds of those engine instances that are runs not ended yet."""
        if not instance_ids:
            return {}
        ids = list(instance_ids)
        async with self._redis.pipeline(transaction=False) as pipe:
            for partition in self._keys.partitions:
                pipe.hmget(partition.instances, ids)
            found: list[list[bytes | str | None]] = await pipe.execute()
        return {
            instance: _text(cid)
            for in_partition in found
            for instance, cid in zip(ids, in_partition, strict=True)
            if cid is not None
        }

    async def watched(self) -> int:
        """How many engine instances the watcher maps to runs now."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for partition in self._keys.partitions:
                pipe.hlen(partition.instances)
            return sum(await pipe.execute())

    async def forget_instances(self, runs: Mapping[str, str]) -> None:
        """Stop mapping these (ended) instances (instance id -> correlationId, as
        :meth:`runs_of` gives them) to their runs in :data:`INSTANCE_LINGER_S`: history the
        engine commits late for them is still read meanwhile."""
        at = _ms(datetime.now(UTC)) + int(INSTANCE_LINGER_S * 1000)
        async with self._redis.pipeline(transaction=False) as pipe:
            for instance, cid in runs.items():
                pipe.zadd(self._keys.of(cid).instances_ended, {instance: at})
            await pipe.execute()

    async def forget_ended(self) -> int:
        """Drop the instances whose time to be forgotten has come; how many."""
        now = _ms(datetime.now(UTC))
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

    async def abandon(self, version: int, failed: StartFailed, *, unsent: bool = False) -> bool:
        """Give up a claim whose start did not reach the engine; True if it was given up.

        Only while the state is ``pending`` at ``version`` without an instance (a finish or
        an attach wins), and with ``unsent`` only if no engine start was sent. The record
        stays (``abandoned``, with ``failed`` as its error) so that status answers what
        happened; a new start with the same id claims it afresh. Requests that joined are
        told ``failed``.
        """
        cid = failed.correlation_id
        part = self._keys.of(cid)
        abandoned = await self._abandon(
            keys=[self._state(cid), part.index, part.writebehind, part.starts],
            args=[cid, version, failed.to_json(), part.channel,
                  iso(datetime.now(UTC)), self._result_ttl_s, "1" if unsent else "0"],
        )  # fmt: skip
        return bool(abandoned)

    async def get(self, correlation_id: str) -> ProcessState | None:
        """The state in Redis, or None (never existed, or aged out: try Postgres)."""
        fields = await self._redis.hgetall(self._state(correlation_id))
        return ProcessState.from_hash(fields) if fields else None

    async def get_many(self, correlation_ids: Sequence[str]) -> dict[str, ProcessState]:
        """The states Redis holds of these runs (one round trip)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for cid in correlation_ids:
                pipe.hgetall(self._state(cid))
            found = await pipe.execute()
        return {
            cid: ProcessState.from_hash(fields)
            for cid, fields in zip(correlation_ids, found, strict=True)
            if fields
        }

    async def page(
        self, *, cursor: str | None, limit: int
    ) -> tuple[list[ProcessState], str | None]:
        """Newest first by start time; returns the page and the cursor of the next (None at
        the end). Walks the partitions' indexes, never the keyspace, and merges them.
        Raises :class:`InvalidCursor`."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        max_score, member = ("+inf", "") if cursor is None else _decode_cursor(cursor)
        pages = await asyncio.gather(
            *(
                self._page(
                    keys=[partition.index],
                    args=[partition.state_prefix, max_score, member, limit, _PAGE_SCAN_CAP],
                )
                for partition in self._keys.partitions
            )
        )
        return _merge_pages(pages, limit)

    def _state(self, correlation_id: str) -> str:
        return self._keys.state(correlation_id)


def _merge_pages(
    pages: Sequence[Sequence[Any]], limit: int
) -> tuple[list[ProcessState], str | None]:
    """One page of at most ``limit`` runs from the partitions' pages, newest first, and the
    cursor of the next. A partition that answered short (it has more, or hit the scan cap)
    has been read down to its own cursor only, so the merged page ends where the highest
    of those cursors is: below it, that partition's runs are not known yet."""
    found: list[tuple[tuple[int, bytes], ProcessState]] = []
    read_down_to: list[tuple[int, bytes]] = []
    for next_score, next_member, *rest in pages:
        for score, raw in zip(rest[::2], rest[1::2], strict=True):
            state = ProcessState.from_json(raw)
            found.append(((int(float(_text(score))), state.correlation_id.encode()), state))
        if next_score:
            read_down_to.append((int(float(_text(next_score))), _text(next_member).encode()))
    found.sort(key=lambda item: item[0], reverse=True)
    cut = max(read_down_to, default=None)
    if cut is not None:
        found = [item for item in found if item[0] >= cut]
    page = found[:limit]
    if len(found) > limit or (page and cut is not None and len(page) == limit):
        position: tuple[int, bytes] | None = page[-1][0]
    else:
        position = cut
    cursor = _encode_cursor(str(position[0]), position[1].decode()) if position else None
    return [state for _, state in page], cursor


def _entries(response: Any) -> list[tuple[Any, dict[Any, Any]]]:
    return cast(list[tuple[Any, dict[Any, Any]]], response)


def _step_of(fields: dict[Any, Any]) -> StepEvent:
    """The step of a steps-stream entry (read with or without decode_responses)."""
    return StepEvent.from_json(fields.get(b"step") or fields["step"])


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
