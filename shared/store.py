"""Process state in Redis: one hash per process, every transition one Lua script.

A transition changes the hash, appends its write-behind entry to ``{p}:wb`` and (for a
completion or an abandoned start) publishes on ``{p}:done:{cid}`` in the same script, so
there is no window in which a state is written but never persisted or never announced.
A subscriber that receives a message can read the new state at once: Redis delivers the
publish only after the script has finished.

Formats (shared with services/api/waitroom.py and shared/writebehind.py):

* hash fields: ``correlationId status processKey requestHash instanceId traceabilityId
  batchId applicationId data error startedAt updatedAt version``; ``data``/``error`` hold
  JSON text, times are ISO 8601 UTC with milliseconds (``2025-01-31T12:00:00.123+00:00``).
* state JSON (stream body of ``kind=state`` and the completion message): an object with the
  same camelCase names, ``data``/``error`` embedded as JSON values, ``version`` a number,
  missing values ``null``.
* start-failed message: ``{"kind": "startFailed", "correlationId": ..., "reason": ...}``.
* stream entries: fields ``kind`` (``state`` | ``delete`` | ``event``) and ``body`` (JSON);
  a delete's body is ``{"correlationId": ..., "version": n}``.

The stream is never trimmed with MAXLEN (that would drop entries Postgres has not seen);
the flusher deletes entries after they are committed.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import orjson
from redis.asyncio import Redis

from shared.keys import Keys

# Builds the state JSON from the hash by concatenation: ``data``/``error`` are already JSON
# text and are embedded verbatim (cjson would turn [] into {} and round large integers).
_STATE_JSON_LUA = """
local function json_str(v)
  if v == nil or v == false or v == '' then return 'null' end
  return cjson.encode(v)
end
local function json_raw(v)
  if v == nil or v == false or v == '' then return 'null' end
  return v
end
local function state_json(key)
  local flat = redis.call('HGETALL', key)
  local h = {}
  for i = 1, #flat, 2 do h[flat[i]] = flat[i + 1] end
  return '{"correlationId":' .. json_str(h.correlationId)
    .. ',"status":' .. json_str(h.status)
    .. ',"processKey":' .. json_str(h.processKey)
    .. ',"requestHash":' .. json_str(h.requestHash)
    .. ',"instanceId":' .. json_str(h.instanceId)
    .. ',"traceabilityId":' .. json_str(h.traceabilityId)
    .. ',"batchId":' .. json_str(h.batchId)
    .. ',"applicationId":' .. json_str(h.applicationId)
    .. ',"data":' .. json_raw(h.data)
    .. ',"error":' .. json_raw(h.error)
    .. ',"startedAt":' .. json_str(h.startedAt)
    .. ',"updatedAt":' .. json_str(h.updatedAt)
    .. ',"version":' .. json_raw(h.version) .. '}'
end
"""

# KEYS: proc, index, stream. ARGV: cid, processKey, requestHash, traceabilityId, batchId,
# applicationId, now (ISO), now (ms), pending TTL (s), oldest index score worth keeping (ms).
# Returns {created (0|1), state JSON}.
_CLAIM_LUA = (
    _STATE_JSON_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0, state_json(KEYS[1])}
end
redis.call('HSET', KEYS[1],
  'correlationId', ARGV[1], 'status', 'pending', 'processKey', ARGV[2],
  'requestHash', ARGV[3], 'traceabilityId', ARGV[4], 'batchId', ARGV[5],
  'applicationId', ARGV[6], 'data', 'null', 'error', 'null',
  'startedAt', ARGV[7], 'updatedAt', ARGV[7], 'version', 1)
redis.call('EXPIRE', KEYS[1], ARGV[9])
redis.call('ZADD', KEYS[2], ARGV[8], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[10])
local state = state_json(KEYS[1])
redis.call('XADD', KEYS[3], '*', 'kind', 'state', 'body', state)
return {1, state}
"""
)

# KEYS: proc, stream. ARGV: instance id, now (ISO). Returns 1 if recorded.
_ATTACH_LUA = (
    _STATE_JSON_LUA
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
_COMPLETE_LUA = (
    _STATE_JSON_LUA
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

# KEYS: proc, index, stream. ARGV: cid, version, reason JSON, channel. Returns 1 if deleted.
_ABANDON_LUA = """
local flat = redis.call('HMGET', KEYS[1], 'status', 'version')
if flat[1] ~= 'pending' or flat[2] ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
local cid = cjson.encode(ARGV[1])
redis.call('XADD', KEYS[3], '*', 'kind', 'delete',
  'body', '{"correlationId":' .. cid .. ',"version":' .. ARGV[2] .. '}')
redis.call('PUBLISH', ARGV[4],
  '{"kind":"startFailed","correlationId":' .. cid .. ',"reason":' .. ARGV[3] .. '}')
return 1
"""

# KEYS: index. ARGV: proc key prefix, max score ('+inf' or ms), cursor member ('' = none),
# limit, scan cap. Newest first; index entries whose hash is gone are removed as met.
# The scan cap bounds one call's work: at the cap it answers short, with a cursor.
# Returns {next score or false, next member or false, state JSON...}.
# Reads the hashes by computed names: fine on a single Redis (the deployment this targets);
# Redis Cluster would need the hashes and the index in one hash slot.
_PAGE_LUA = (
    _STATE_JSON_LUA
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


class Status(StrEnum):
    PENDING = "pending"
    OK = "ok"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class ProcessState:
    """One process as Redis holds it; times are aware UTC datetimes (millisecond precision)."""

    correlation_id: str
    status: Status
    process_key: str
    data: Any
    error: Any
    started_at: datetime
    updated_at: datetime
    version: int
    instance_id: str | None
    traceability_id: str | None
    batch_id: str | None
    application_id: str | None
    request_hash: str | None

    @property
    def finished(self) -> bool:
        return self.status is not Status.PENDING

    def to_dict(self) -> dict[str, Any]:
        """The state JSON object (camelCase, ISO times): what Redis stores and publishes."""
        return {
            "correlationId": self.correlation_id,
            "status": self.status.value,
            "processKey": self.process_key,
            "requestHash": self.request_hash,
            "instanceId": self.instance_id,
            "traceabilityId": self.traceability_id,
            "batchId": self.batch_id,
            "applicationId": self.application_id,
            "data": self.data,
            "error": self.error,
            "startedAt": iso(self.started_at),
            "updatedAt": iso(self.updated_at),
            "version": self.version,
        }

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> ProcessState:
        return cls(
            correlation_id=obj["correlationId"],
            status=Status(obj["status"]),
            process_key=obj["processKey"],
            data=obj.get("data"),
            error=obj.get("error"),
            started_at=datetime.fromisoformat(obj["startedAt"]),
            updated_at=datetime.fromisoformat(obj["updatedAt"]),
            version=int(obj["version"]),
            instance_id=obj.get("instanceId"),
            traceability_id=obj.get("traceabilityId"),
            batch_id=obj.get("batchId"),
            application_id=obj.get("applicationId"),
            request_hash=obj.get("requestHash"),
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> ProcessState:
        return cls.from_dict(orjson.loads(raw))


@dataclass(frozen=True, slots=True)
class StartFailed:
    """Published by :meth:`ProcessStore.abandon`: joined waiters answer with ``reason``."""

    correlation_id: str
    reason: Any


class InvalidCursor(ValueError):
    """A paging cursor that :meth:`ProcessStore.page` did not produce (answer 400)."""


def decode_message(raw: bytes | str) -> ProcessState | StartFailed:
    """Decode a ``{p}:done:{cid}`` message: a finished state, or a start that failed."""
    obj = orjson.loads(raw)
    if obj.get("kind") == "startFailed":
        return StartFailed(correlation_id=obj["correlationId"], reason=obj.get("reason"))
    return ProcessState.from_dict(obj)


def iso(moment: datetime) -> str:
    """The one timestamp format of the store: ISO 8601, UTC, milliseconds."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")


def dump_json(value: Any) -> str:
    """JSON text for ``data``/``error``/reasons; unknown types become their ``str``."""
    return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


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
    """Process state transitions; see the module docstring for the formats.

    Works with a client created with or without ``decode_responses``.
    """

    def __init__(self, redis: Redis, keys: Keys, *, result_ttl_s: int, pending_ttl_s: int) -> None:
        self._redis = redis
        self._keys = keys
        self._result_ttl_s = result_ttl_s
        self._pending_ttl_s = pending_ttl_s
        self._claim = redis.register_script(_CLAIM_LUA)
        self._attach = redis.register_script(_ATTACH_LUA)
        self._complete = redis.register_script(_COMPLETE_LUA)
        self._abandon = redis.register_script(_ABANDON_LUA)
        self._page = redis.register_script(_PAGE_LUA)

    async def claim(
        self,
        correlation_id: str,
        process_key: str,
        request_hash: str,
        *,
        traceability_id: str,
        batch_id: str,
        application_id: str,
    ) -> tuple[ProcessState, bool]:
        """Create the ``pending`` state (version 1), or return the one that exists.

        Exactly one of any number of concurrent callers gets ``created=True``; the others
        join it (and must compare ``request_hash`` themselves). The index entry lets
        :meth:`page` list newest first; entries older than any hash can live are dropped
        here, so the index stays bounded without a sweeper.
        """
        now = datetime.now(UTC)
        now_ms = int(now.timestamp() * 1000)
        oldest_ms = now_ms - (self._pending_ttl_s + self._result_ttl_s) * 1000
        created, state = await self._claim(
            keys=[
                self._keys.process(correlation_id),
                self._keys.index,
                self._keys.writebehind,
            ],
            args=[
                correlation_id,
                process_key,
                request_hash,
                traceability_id,
                batch_id,
                application_id,
                iso(now),
                now_ms,
                self._pending_ttl_s,
                oldest_ms,
            ],
        )
        return ProcessState.from_json(state), bool(created)

    async def attach_instance(self, correlation_id: str, instance_id: str) -> None:
        """Record the engine's instance id (also after a completion that beat the start's
        response); ignored when the state no longer exists."""
        await self._attach(
            keys=[self._keys.process(correlation_id), self._keys.writebehind],
            args=[instance_id, iso(datetime.now(UTC))],
        )

    async def complete(
        self, correlation_id: str, status: Status, *, data: Any = None, error: Any = None
    ) -> bool:
        """Finish a ``pending`` process and wake its waiters; True if this call changed it.

        The one completion path for the ``/complete`` endpoint and the worker. A second
        completion, or one for an unknown (never claimed or expired) id, changes nothing
        and returns False: there is no claim to attach the result to, and a late duplicate
        must not overwrite the first outcome.
        """
        if status is Status.PENDING:
            raise ValueError("complete() needs a terminal status (ok or error)")
        changed = await self._complete(
            keys=[self._keys.process(correlation_id), self._keys.writebehind],
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

    async def abandon(self, correlation_id: str, version: int, *, reason: Any) -> bool:
        """Undo a claim whose start never reached the engine, so the caller may retry.

        Only when the state is still ``pending`` at ``version`` (a completion or another
        change wins). Publishes a :class:`StartFailed` with ``reason`` so requests that
        joined this start answer with the same error. True if the state was deleted.
        """
        deleted = await self._abandon(
            keys=[
                self._keys.process(correlation_id),
                self._keys.index,
                self._keys.writebehind,
            ],
            args=[correlation_id, version, dump_json(reason), self._keys.done(correlation_id)],
        )
        return bool(deleted)

    async def get(self, correlation_id: str) -> ProcessState | None:
        """The state in Redis, or None (never existed, or aged out: try Postgres)."""
        fields = await self._redis.hgetall(self._keys.process(correlation_id))
        if not fields:
            return None
        return ProcessState.from_dict(
            _hash_to_dict({_text(k): _text(v) for k, v in fields.items()})
        )

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
            args=[self._keys.process(""), max_score, member, limit, _PAGE_SCAN_CAP],
        )
        next_cursor = _encode_cursor(_text(next_score), _text(next_member)) if next_score else None
        return [ProcessState.from_json(s) for s in states], next_cursor


def _hash_to_dict(fields: dict[str, str]) -> dict[str, Any]:
    """Hash fields (all text) to the state JSON object's types."""
    return {
        **{k: (v or None) for k, v in fields.items()},
        "data": orjson.loads(fields.get("data") or "null"),
        "error": orjson.loads(fields.get("error") or "null"),
    }
