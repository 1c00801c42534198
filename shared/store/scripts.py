"""The store's Lua: every transition of a run, each one script on one hash slot.
(One module past 400 lines: the scripts share their record's Lua helpers, and a reader
checking one transition against another wants them side by side.)

Each script is declared with its KEYS and ARGV by name (shared/lua.py); the rest of the
package calls them with those tuples. A transition changes the run's hash, appends its
write-behind entry to its partition's stream and (for an end, a step, an abandoned start)
publishes on its partition's channel in the same script, so no state is written but never
persisted or never announced. What the scripts return is said above each.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from flowgate.shared.lua import NoArgs, Script
from flowgate.shared.state import STATE_JSON_LUA

# --- claim: create the pending run, or return the one there is --------------------------


class ClaimKeys(NamedTuple):
    state: str
    #: The partition's index of runs by start time.
    runs: str
    stream: str
    starts: str


class ClaimArgs(NamedTuple):
    cid: str
    #: The run's place in its partition's index (ms), and the oldest worth keeping there.
    score: int
    oldest_score: int
    pending_ttl_s: int
    #: When recovery looks after the claim unless its start goes on (ms).
    look_at: int
    #: The new hash's field/value pairs.
    rest: Sequence[str]


#: An abandoned run's record gives way (its version goes on). {created 0|1, state JSON}.
CLAIM = Script(
    "claim",
    ClaimKeys,
    ClaimArgs,
    """
local status = redis.call('HGET', K.state, 'status')
if status and status ~= 'abandoned' then
  return {0, state_json(K.state)}
end
local version = 1
if status then
  version = tonumber(redis.call('HGET', K.state, 'version')) + 1
  redis.call('DEL', K.state)
end
redis.call('HSET', K.state, unpack(A.rest))
redis.call('HSET', K.state, 'version', version)
redis.call('EXPIRE', K.state, A.pending_ttl_s)
redis.call('ZADD', K.runs, A.score, A.cid)
redis.call('ZREMRANGEBYSCORE', K.runs, '-inf', '(' .. A.oldest_score)
redis.call('ZADD', K.starts, A.look_at, A.cid)
local state = state_json(K.state)
redis.call('XADD', K.stream, '*', 'kind', 'state', 'body', state)
return {1, state}
""",
    prelude=STATE_JSON_LUA,
)

# --- sending: the engine start is about to leave ----------------------------------------


class SendingKeys(NamedTuple):
    state: str
    stream: str
    starts: str


class SendingArgs(NamedTuple):
    cid: str
    version: int
    now: str
    look_at: int


#: Only a pending claim at that version without an instance or a start sent. The new
#: version, or false.
SENDING = Script(
    "sending",
    SendingKeys,
    SendingArgs,
    """
local f = redis.call('HMGET', K.state, 'status', 'version', 'instanceId', 'startSentAt')
if f[1] ~= 'pending' or f[2] ~= A.version or (f[3] or '') ~= '' or (f[4] or '') ~= '' then
  return false
end
redis.call('HSET', K.state, 'startSentAt', A.now, 'updatedAt', A.now)
local version = redis.call('HINCRBY', K.state, 'version', 1)
redis.call('XADD', K.stream, '*', 'kind', 'state', 'body', state_json(K.state))
redis.call('ZADD', K.starts, A.look_at, A.cid)
return version
""",
    prelude=STATE_JSON_LUA,
)

# --- attach: the engine's instance id ---------------------------------------------------


class AttachKeys(NamedTuple):
    state: str
    stream: str
    starts: str
    instances: str


class AttachArgs(NamedTuple):
    cid: str
    instance_id: str
    now: str
    #: The audit row ('' = none).
    event: bytes | str


#: The state JSON once recorded (or recorded before), 0 if the run is gone, -1 if it was
#: abandoned or cancelled.
ATTACH = Script(
    "attach",
    AttachKeys,
    AttachArgs,
    """
local f = redis.call('HMGET', K.state, 'status', 'instanceId')
if not f[1] then
  redis.call('ZREM', K.starts, A.cid)
  return 0
end
if f[1] == 'abandoned' or f[1] == 'cancelled' then return -1 end
if f[2] == A.instance_id then return state_json(K.state) end
redis.call('HSET', K.state, 'instanceId', A.instance_id, 'updatedAt', A.now)
redis.call('HINCRBY', K.state, 'version', 1)
local state = state_json(K.state)
redis.call('XADD', K.stream, '*', 'kind', 'state', 'body', state)
if A.event ~= '' then redis.call('XADD', K.stream, '*', 'kind', 'event', 'body', A.event) end
redis.call('ZREM', K.starts, A.cid)
redis.call('HSET', K.instances, A.instance_id, A.cid)
return state
""",
    prelude=STATE_JSON_LUA,
)

# --- a step: recorded once per activity instance ----------------------------------------

#: ``record_step(...)``: a step is recorded once (the worker and the history may both
#: report it), with its audit row, lives as long as the run's state, is written behind to
#: Postgres (where it is read once the run's record in Redis is compacted: see COMPACT), and
#: is announced on the run's channel (shared/contract.py StepRecorded) if ``announce``: while
#: someone follows the run (``{p:n}:followed:{cid}``: every replica receives every
#: announcement, so none is sent that no one waits for), and not by a run's end, whose own
#: message wakes every follower. 1 if it was new.
#: A step a worker has claimed (STEP_CLAIM) is that worker's to record (``worker`` 1): its
#: record has the step's data and name, and its audit row what the handler did, where the
#: engine's report of the same step, which may come first, has neither.
RECORD_STEP_LUA = """
local function record_step(state, steps, seen, claimed, stream, aid, step, audit, max, channel,
    cid, worker, announce)
  if worker == '1' then
    redis.call('HDEL', claimed, aid)
  elseif redis.call('HEXISTS', claimed, aid) == 1 then
    return 0
  end
  if redis.call('SADD', seen, aid) == 0 then return 0 end
  local id = redis.call('XADD', steps, 'MAXLEN', '~', max, '*', 'step', step)
  local ttl = redis.call('PTTL', state)
  if ttl > 0 then
    redis.call('PEXPIRE', steps, ttl)
    redis.call('PEXPIRE', seen, ttl)
  end
  local trace = redis.call('HGET', state, 'traceabilityId') or ''
  redis.call('XADD', stream, '*', 'kind', 'step', 'body', '{"correlationId":' ..
    cjson.encode(cid) .. ',"traceabilityId":' .. cjson.encode(trace) .. ',"id":"' .. id ..
    '","step":' .. step .. '}')
  if audit ~= '' then redis.call('XADD', stream, '*', 'kind', 'event', 'body', audit) end
  if announce then
    redis.call(PUBLISH, channel, cid .. '\\n{"kind":"step","id":"' .. id .. '"}')
  end
  return 1
end
"""


class StepKeys(NamedTuple):
    state: str
    steps: str
    seen: str
    claimed: str
    followed: str
    stream: str
    compact: str


class StepArgs(NamedTuple):
    cid: str
    activity_instance_id: str
    step: bytes | str
    #: The audit row ('' = none).
    event: bytes | str
    max_steps: int
    channel: str
    #: 1: a worker records a step it ran (its claim ends); 0: anyone else (a claimed step
    #: is left to its worker).
    worker: int


#: 1 if the step was new, 0 if known, the run is gone or its steps were compacted (a
#: finished run whose steps left Redis for Postgres: the seen set went with them, so a
#: late report could no longer be told from a new step).
STEP = Script(
    "step",
    StepKeys,
    StepArgs,
    """
local status = redis.call('HGET', K.state, 'status')
if not status then return 0 end
if status ~= 'pending' and redis.call('EXISTS', K.seen) == 0
    and not redis.call('ZSCORE', K.compact, A.cid) then
  return 0
end
return record_step(K.state, K.steps, K.seen, K.claimed, K.stream, A.activity_instance_id,
  A.step, A.event, A.max_steps, A.channel, A.cid, A.worker,
  redis.call('EXISTS', K.followed) == 1)
""",
    prelude=RECORD_STEP_LUA,
    publishes=True,
)


class StepClaimKeys(NamedTuple):
    state: str
    claimed: str


class StepClaimArgs(NamedTuple):
    activity_instance_id: str
    worker_id: str


#: A worker is about to tell the engine a step of a run ended: until it has recorded it (or
#: released it, the engine having refused), the step is its to record. Claimed for as long
#: as the run lives. 1 if claimed, 0 if the run is gone.
STEP_CLAIM = Script(
    "step_claim",
    StepClaimKeys,
    StepClaimArgs,
    """
local ttl = redis.call('PTTL', K.state)
if ttl == -2 then return 0 end
redis.call('HSET', K.claimed, A.activity_instance_id, A.worker_id)
if ttl > 0 then redis.call('PEXPIRE', K.claimed, ttl) end
return 1
""",
)


class StepReleaseKeys(NamedTuple):
    claimed: str


#: The engine refused the worker's report: its claim ends (unless another worker's claim
#: of the same step replaced it), and whoever reports the step next records it.
STEP_RELEASE = Script(
    "step_release",
    StepReleaseKeys,
    StepClaimArgs,
    """
if redis.call('HGET', K.claimed, A.activity_instance_id) == A.worker_id then
  redis.call('HDEL', K.claimed, A.activity_instance_id)
end
return 0
""",
)

# --- finish: the one way a run ends -----------------------------------------------------


class FinishKeys(NamedTuple):
    state: str
    stream: str
    starts: str
    steps: str
    seen: str
    claimed: str
    instances_ended: str
    callbacks: str
    cancel: str
    compact: str


class FinishArgs(NamedTuple):
    cid: str
    status: str
    data: str
    error: str
    now: str
    now_ms: int
    result_ttl_s: int
    channel: str
    #: The audit row ('' = none).
    event: bytes | str
    #: The step that ended the run ('' = none: only a worker ends a run with its step) and
    #: its activity instance.
    step: bytes | str
    activity_instance_id: str
    max_steps: int
    #: When the watcher stops reading the instance's history (ms).
    forget_at: int
    #: How long after the end (by Redis's clock, as the write-behind's entry ids are) the
    #: run's steps may leave Redis: past any late step the engine still reports (ms).
    compact_after_ms: int
    #: The incident that ends the run ('' = none): one a retry resolved does not (REOPEN).
    incident_id: str
    #: The traceparent of the span that ended the run ('' = none), a last line of the message.
    cause: str


#: Only a pending run. 1 if the state changed.
FINISH = Script(
    "finish",
    FinishKeys,
    FinishArgs,
    """
local f0 = redis.call('HMGET', K.state, 'status', 'retriedIncidents')
if f0[1] ~= 'pending' then return 0 end
if A.incident_id ~= '' and f0[2] and
    string.find(',' .. f0[2] .. ',', ',' .. A.incident_id .. ',', 1, true) then
  return 0
end
redis.call('HSET', K.state, 'status', A.status, 'updatedAt', A.now)
-- A field without a value is left out (shared/state.py RunState.to_hash).
for field, value in pairs({data = A.data, error = A.error}) do
  if value == 'null' then redis.call('HDEL', K.state, field)
  else redis.call('HSET', K.state, field, value) end
end
redis.call('HINCRBY', K.state, 'version', 1)
redis.call('EXPIRE', K.state, A.result_ttl_s)
local state = state_json(K.state)
redis.call('XADD', K.stream, '*', 'kind', 'state', 'body', state)
if A.step ~= '' then
  record_step(K.state, K.steps, K.seen, K.claimed, K.stream, A.activity_instance_id, A.step,
    A.event, A.max_steps, A.channel, A.cid, '1', false)
elseif A.event ~= '' then
  redis.call('XADD', K.stream, '*', 'kind', 'event', 'body', A.event)
end
redis.call('EXPIRE', K.steps, A.result_ttl_s)
redis.call('EXPIRE', K.seen, A.result_ttl_s)
redis.call('EXPIRE', K.claimed, A.result_ttl_s)
redis.call('ZREM', K.starts, A.cid)
local f = redis.call('HMGET', K.state, 'instanceId', 'callbackUrl')
if f[1] and f[1] ~= '' then redis.call('ZADD', K.instances_ended, 'NX', A.forget_at, f[1]) end
if f[2] and f[2] ~= '' then redis.call('ZADD', K.callbacks, 'NX', A.now_ms, A.cid) end
redis.call('DEL', K.cancel)
local time = redis.call('TIME')
redis.call('ZADD', K.compact, time[1] * 1000 + math.floor(time[2] / 1000) + A.compact_after_ms,
  A.cid)
local cause = A.cause ~= '' and '\\n' .. A.cause or ''
redis.call(PUBLISH, A.channel, A.cid .. '\\n' .. state .. cause)
return 1
""",
    prelude=STATE_JSON_LUA + RECORD_STEP_LUA,
    publishes=True,
)

# --- reopening: a run ended by an incident, its failed step retried -----------------------


class ReopenKeys(NamedTuple):
    state: str
    stream: str
    steps: str
    seen: str
    claimed: str
    instances: str
    instances_ended: str
    callbacks: str
    compact: str


class ReopenArgs(NamedTuple):
    cid: str
    now: str
    pending_ttl_s: int
    channel: str
    #: The audit row of the retry.
    event: bytes | str
    #: The incidents the retry resolves, comma-separated: the watcher may still report
    #: them, and they must not end the run again (FINISH).
    incidents: str


#: Only an ``error`` run with an engine instance: ``pending`` again, its instance watched
#: again, its steps kept, its callback due at its next end; every replica hears
#: ``reopened`` (its settled-run cache forgets the end). The state JSON, or '' if it was
#: not an error run.
REOPEN = Script(
    "reopen",
    ReopenKeys,
    ReopenArgs,
    """
local f = redis.call('HMGET', K.state, 'status', 'instanceId')
if f[1] ~= 'error' or not f[2] or f[2] == '' then return '' end
redis.call('HSET', K.state, 'status', 'pending', 'updatedAt', A.now,
  'data', '{"step":"retry"}')
redis.call('HDEL', K.state, 'error')
local retried = redis.call('HGET', K.state, 'retriedIncidents')
redis.call('HSET', K.state, 'retriedIncidents',
  (retried and retried ~= '') and (retried .. ',' .. A.incidents) or A.incidents)
redis.call('HINCRBY', K.state, 'version', 1)
redis.call('EXPIRE', K.state, A.pending_ttl_s)
for _, key in ipairs({K.steps, K.seen, K.claimed}) do
  redis.call('EXPIRE', key, A.pending_ttl_s)
end
redis.call('HSET', K.instances, f[2], A.cid)
redis.call('ZREM', K.instances_ended, f[2])
redis.call('ZREM', K.callbacks, A.cid)
redis.call('ZREM', K.compact, A.cid)
local state = state_json(K.state)
redis.call('XADD', K.stream, '*', 'kind', 'state', 'body', state)
redis.call('XADD', K.stream, '*', 'kind', 'event', 'body', A.event)
redis.call(PUBLISH, A.channel, A.cid .. '\\n{"kind":"reopened"}')
return state
""",
    prelude=STATE_JSON_LUA,
    publishes=True,
)

# --- cancelling: the intent, before the engine instance is deleted ----------------------


class CancellingKeys(NamedTuple):
    state: str
    cancel: str


class CancellingArgs(NamedTuple):
    reason: str
    ttl_s: int


#: 1 if the run is pending (the intent is recorded).
CANCELLING = Script(
    "cancelling",
    CancellingKeys,
    CancellingArgs,
    """
if redis.call('HGET', K.state, 'status') ~= 'pending' then return 0 end
redis.call('SET', K.cancel, A.reason, 'EX', A.ttl_s)
return 1
""",
)

# --- abandon: a start that did not reach the engine -------------------------------------


class AbandonKeys(NamedTuple):
    state: str
    #: The partition's index of runs by start time.
    runs: str
    stream: str
    starts: str


class AbandonArgs(NamedTuple):
    cid: str
    version: int
    #: The StartFailed JSON: the run's error, and the message to those who joined.
    failed: bytes | str
    channel: str
    now: str
    result_ttl_s: int
    #: '1' to require that no engine start was sent.
    unsent: str


#: Only a pending claim at that version without an instance. 1 if abandoned.
ABANDON = Script(
    "abandon",
    AbandonKeys,
    AbandonArgs,
    """
local f = redis.call('HMGET', K.state, 'status', 'version', 'instanceId', 'startSentAt')
if f[1] ~= 'pending' or f[2] ~= A.version or (f[3] or '') ~= '' then return 0 end
if A.unsent == '1' and (f[4] or '') ~= '' then return 0 end
redis.call('HSET', K.state, 'status', 'abandoned', 'error', A.failed, 'updatedAt', A.now)
redis.call('HINCRBY', K.state, 'version', 1)
redis.call('EXPIRE', K.state, A.result_ttl_s)
redis.call('ZREM', K.runs, A.cid)
redis.call('ZREM', K.starts, A.cid)
redis.call('XADD', K.stream, '*', 'kind', 'state', 'body', state_json(K.state))
redis.call(PUBLISH, A.channel, A.cid .. '\\n' .. A.failed)
return 1
""",
    prelude=STATE_JSON_LUA,
    publishes=True,
)

# --- look: what a status read shows -----------------------------------------------------


class LookKeys(NamedTuple):
    state: str
    steps: str


#: {state JSON ('' = none), the last step's JSON if the run is pending (else false)}: one
#: command, cheaper than a pipeline of two.
LOOK = Script(
    "look",
    LookKeys,
    NoArgs,
    """
local status = redis.call('HGET', K.state, 'status')
if not status then return {'', false} end
local step = false
if status == 'pending' then
  local last = redis.call('XREVRANGE', K.steps, '+', '-', 'COUNT', 1)[1]
  if last then step = last[2][2] end
end
return {state_json(K.state), step}
""",
    prelude=STATE_JSON_LUA,
)

# --- take: a due item of a schedule, for one replica ------------------------------------


class TakeKeys(NamedTuple):
    schedule: str


class TakeArgs(NamedTuple):
    member: str
    now_ms: int
    #: When it is due again unless dropped or deferred meanwhile (ms).
    again_at: int


#: 1 if taken (so replicas do not all work on the same item).
TAKE = Script(
    "take",
    TakeKeys,
    TakeArgs,
    """
local score = redis.call('ZSCORE', K.schedule, A.member)
if not score or tonumber(score) > tonumber(A.now_ms) then return 0 end
redis.call('ZADD', K.schedule, 'XX', A.again_at, A.member)
return 1
""",
)

# --- page: a partition's runs, newest first ---------------------------------------------


class PageKeys(NamedTuple):
    #: The partition's index of runs by start time.
    runs: str


class PageArgs(NamedTuple):
    #: The partition's state key prefix (the hashes share the index's hash slot).
    prefix: str
    #: The highest score ('+inf' or ms) and the member the last page ended at ('' = none).
    max: str | int
    cursor: str
    limit: int
    #: Entries one call may look at, stale ones included, before it answers short.
    cap: int
    #: Only this tenant's runs ('' = every tenant's); a run without one is the default's.
    tenant: str
    default_tenant: str


#: {next score or false, next member or false, (score, state JSON)...}. Index entries whose
#: hash is gone are removed as met.
PAGE = Script(
    "page",
    PageKeys,
    PageArgs,
    """
local function bytes_before(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
local prefix, max, cursor = A.prefix, A.max, A.cursor
local max_n = tonumber(max)
local limit, cap = tonumber(A.limit), tonumber(A.cap)
local out = {false, false}
local found, scanned, offset = 0, 0, 0
local last_score, last_member = false, false
while true do
  local batch = redis.call('ZREVRANGEBYSCORE', K.runs, max, '-inf', 'WITHSCORES',
    'LIMIT', offset, 100)
  if #batch == 0 then return out end
  local removed = 0
  for i = 1, #batch, 2 do
    local member, score = batch[i], batch[i + 1]
    local seen = cursor ~= '' and tonumber(score) == max_n and not bytes_before(member, cursor)
    if not seen then
      local key = prefix .. member
      local exists = redis.call('EXISTS', key) == 1
      local theirs = false
      if exists and A.tenant ~= '' then
        theirs = (redis.call('HGET', key, 'tenant') or A.default_tenant) ~= A.tenant
      end
      if theirs then
        -- another tenant's run: neither shown nor removed
      elseif exists then
        if found == limit then
          out[1], out[2] = last_score, last_member
          return out
        end
        found = found + 1
        out[#out + 1] = score
        out[#out + 1] = state_json(key)
      else
        redis.call('ZREM', K.runs, member)
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
""",
    prelude=STATE_JSON_LUA,
)

# --- compact: a finished run's steps, once Postgres has them ----------------------------


class CompactKeys(NamedTuple):
    compact: str
    #: The partition's write-behind stream.
    stream: str


class CompactArgs(NamedTuple):
    limit: int
    #: A run's state key is this followed by its correlationId (Partition.state_prefix).
    state_prefix: str
    #: A run's steps stream is this followed by its correlationId (Partition.steps_prefix).
    steps_prefix: str


#: Up to ``limit`` finished runs of one partition whose steps leave Redis now, in one call
#: (every key named is in the partition's hash slot); how many were compacted. Due: by
#: Redis's clock, and every write-behind entry added before they were due is in Postgres
#: (the flusher deletes entries once committed, so the stream's oldest entry says how far it
#: is). Redis keeps what readers need at once (the final state: status, result,
#: idempotency); progress reads the steps from Postgres (services/api/runs.py). A run found
#: pending again (reopened by a retry) keeps its steps: its next end schedules it anew.
COMPACT = Script(
    "compact",
    CompactKeys,
    CompactArgs,
    """
local time = redis.call('TIME')
local upto = time[1] * 1000 + math.floor(time[2] / 1000)
local oldest = redis.call('XRANGE', K.stream, '-', '+', 'COUNT', 1)[1]
if oldest then upto = math.min(upto, tonumber(string.match(oldest[1], '^%d+')) - 1) end
local due = redis.call('ZRANGEBYSCORE', K.compact, '-inf', upto, 'LIMIT', 0, A.limit)
local compacted = 0
for _, cid in ipairs(due) do
  redis.call('ZREM', K.compact, cid)
  local status = redis.call('HGET', A.state_prefix .. cid, 'status')
  if status and status ~= 'pending' then
    local steps = A.steps_prefix .. cid
    redis.call('DEL', steps, steps .. ':seen', steps .. ':claimed')
    compacted = compacted + 1
  end
end
return compacted
""",
)
