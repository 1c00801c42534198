"""Process state in Redis: one hash per run, every transition one Lua script.

A transition changes the hash, appends its write-behind entry to ``{p}:wb`` and (for a
finish or an abandoned start) publishes on ``{p}:done:{cid}`` in the same script, so there
is no window in which a state is written but never persisted or never announced. A
subscriber that receives a message can read the new state at once: Redis delivers the
publish only after the script has finished.

The record and its shapes (hash, wire object, row) are in shared/state.py; the completion
channel's messages in shared/contract.py. Stream entries have the fields ``kind``
(``state`` | ``delete`` | ``event``) and ``body`` (JSON); a delete's body is
``{"correlationId": ..., "version": n}``. The stream is never trimmed with MAXLEN (that would
drop entries Postgres has not seen); the flusher deletes entries once they are committed.
"""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis

from shared.contract import StartFailed, SystemVariables
from shared.keys import Keys
from shared.state import STATE_JSON_LUA, ProcessState, Status, dump_json, iso

# KEYS: proc, index, stream. ARGV: cid, index score (ms), pending TTL (s), oldest index score
# worth keeping (ms), then the new hash's field/value pairs. Returns {created (0|1), state}.
_CLAIM_LUA = (
    STATE_JSON_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0, state_json(KEYS[1])}
end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[4])
local state = state_json(KEYS[1])
redis.call('XADD', KEYS[3], '*', 'kind', 'state', 'body', state)
return {1, state}
"""
)

# KEYS: proc, stream. ARGV: instance id, now (ISO). Returns 1 if recorded.
_ATTACH_LUA = (
    STATE_JSON_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'instanceId', ARGV[1], 'updatedAt', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('XADD', KEYS[2], '*', 'kind', 'state', 'body', state_json(KEYS[1]))
return 1
"""
)

# KEYS: proc, stream. ARGV: status, data JSON, error JSON, now (ISO), result TTL (s), channel.
# Returns 1 if the state changed.
_FINISH_LUA = (
    STATE_JSON_LUA
    + """
if redis.call('HGET', KEYS[1], 'status') ~= 'pending' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'data', ARGV[2], 'error', ARGV[3],
  'updatedAt', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('EXPIRE', KEYS[1], ARGV[5])
local state = state_json(KEYS[1])
redis.call('XADD', KEYS[2], '*', 'kind', 'state', 'body', state)
redis.call('PUBLISH', ARGV[6], state)
return 1
"""
)

# KEYS: proc, index, stream. ARGV: cid, version, StartFailed JSON, channel. 1 if deleted.
_ABANDON_LUA = """
local flat = redis.call('HMGET', KEYS[1], 'status', 'version')
if flat[1] ~= 'pending' or flat[2] ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('XADD', KEYS[3], '*', 'kind', 'delete',
  'body', '{"correlationId":' .. cjson.encode(ARGV[1]) .. ',"version":' .. ARGV[2] .. '}')
redis.call('PUBLISH', ARGV[4], ARGV[3])
return 1
"""

# KEYS: index. ARGV: proc key prefix, max score ('+inf' or ms), cursor member ('' = none),
# limit, scan cap. Newest first; index entries whose hash is gone are removed as met.
# The scan cap bounds one call's work: at the cap it answers short, with a cursor.
# Returns {next score or false, next member or false, state JSON...}.
# Reads the hashes by computed names: fine on a single Redis (the deployment this targets);
# Redis Cluster would need the hashes and the index in one hash slot.
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


class ProcessStore:
    """Run state transitions; see the module docstring.

    Works with a client created with or without ``decode_responses``.
    """

    def __init__(self, redis: Redis, keys: Keys, *, result_ttl_s: int, pending_ttl_s: int) -> None:
        self._redis = redis
        self._keys = keys
        self._result_ttl_s = result_ttl_s
        self._pending_ttl_s = pending_ttl_s
        self._claim = redis.register_script(_CLAIM_LUA)
        self._attach = redis.register_script(_ATTACH_LUA)
        self._finish = redis.register_script(_FINISH_LUA)
        self._abandon = redis.register_script(_ABANDON_LUA)
        self._page = redis.register_script(_PAGE_LUA)

    async def claim(
        self, ids: SystemVariables, process_key: str, request_hash: str
    ) -> tuple[ProcessState, bool]:
        """Create the ``pending`` state (version 1), or return the one that exists.

        Exactly one of any number of concurrent callers gets ``created=True``; the others
        join it (and must compare ``request_hash`` themselves). The index entry lets
        :meth:`page` list newest first; entries older than any hash can live are dropped
        here, so the index stays bounded without a sweeper.
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
            data=None,
            error=None,
            started_at=now,
            updated_at=now,
            version=1,
        )
        now_ms = int(now.timestamp() * 1000)
        oldest_ms = now_ms - (self._pending_ttl_s + self._result_ttl_s) * 1000
        fields = [text for pair in state.to_hash().items() for text in pair]
        created, stored = await self._claim(
            keys=[self._keys.state(ids.correlation_id), self._keys.index, self._keys.writebehind],
            args=[ids.correlation_id, now_ms, self._pending_ttl_s, oldest_ms, *fields],
        )
        return ProcessState.from_json(stored), bool(created)

    async def attach_instance(self, correlation_id: str, instance_id: str) -> None:
        """Record the engine's instance id (also after a finish that beat the start's
        response); ignored when the state no longer exists."""
        await self._attach(
            keys=[self._keys.state(correlation_id), self._keys.writebehind],
            args=[instance_id, iso(datetime.now(UTC))],
        )

    async def finish(
        self, correlation_id: str, status: Status, *, data: Any = None, error: Any = None
    ) -> bool:
        """End a ``pending`` run and wake its waiters; True if this call changed it.

        The one way a run ends, whoever ends it (the ``/complete`` endpoint, a worker's
        finishing step, an incident). A second finish, or one for an unknown (never claimed
        or expired) id, changes nothing and returns False: the first outcome wins.
        """
        if status is Status.PENDING:
            raise ValueError("finish() needs a terminal status (ok or error)")
        changed = await self._finish(
            keys=[self._keys.state(correlation_id), self._keys.writebehind],
            args=[
                status.value,
                dump_json(data),
                dump_json(error),
                iso(datetime.now(UTC)),
                self._result_ttl_s,
                self._keys.done(correlation_id),
            ],
        )
        return bool(changed)

    async def abandon(self, version: int, failed: StartFailed) -> bool:
        """Undo a claim whose start never reached the engine, so the caller may retry.

        Only when the state is still ``pending`` at ``version`` (a finish or another change
        wins). Publishes ``failed`` so requests that joined this start answer the same.
        True if the state was deleted.
        """
        cid = failed.correlation_id
        deleted = await self._abandon(
            keys=[self._keys.state(cid), self._keys.index, self._keys.writebehind],
            args=[cid, version, failed.to_json(), self._keys.done(cid)],
        )
        return bool(deleted)

    async def get(self, correlation_id: str) -> ProcessState | None:
        """The state in Redis, or None (never existed, or aged out: try Postgres)."""
        fields = await self._redis.hgetall(self._keys.state(correlation_id))
        return ProcessState.from_hash(fields) if fields else None

    async def page(
        self, *, cursor: str | None, limit: int
    ) -> tuple[list[ProcessState], str | None]:
        """Newest first by start time; returns the page and the cursor of the next (None at
        the end). Walks the index, never the keyspace. Raises :class:`InvalidCursor`."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        max_score, member = ("+inf", "") if cursor is None else _decode_cursor(cursor)
        next_score, next_member, *states = await self._page(
            keys=[self._keys.index],
            args=[self._keys.state(""), max_score, member, limit, _PAGE_SCAN_CAP],
        )
        next_cursor = _encode_cursor(_text(next_score), _text(next_member)) if next_score else None
        return [ProcessState.from_json(s) for s in states], next_cursor


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
