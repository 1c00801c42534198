"""Where a client sends a BPMN message to a run, and hears what it caused.

A message may arrive before the run waits for it (the client is quicker than the steps
before the catch event): it is held, for ``MESSAGE_HOLD_MS``, and correlated the moment
the engine shows the wait armed. Exactly once, on any number of replicas:

* every message has a record in Redis (``{p:n}:msg:{correlationId}:{messageId}``; the
  client's ``messageId``, or one made for it): ``holding``, ``sending``, ``correlated`` or
  ``expired``, kept ``RESULT_TTL_S``. The same ``messageId`` again joins that record: it
  never correlates twice, and answers alike;
* one request holds a message at a time (a lease on its record, renewed while it holds);
  it correlates only when the engine lists the wait armed (``GET /event-subscription``),
  marking the record ``sending`` just before and ``correlated`` just after;
* the hold goes on in the replica's task group, so a client that stops waiting does not
  drop its message; if the replica itself dies, the message waits for the client's retry
  with the same ``messageId``, which takes the lapsed lease over. A record left
  ``sending`` by a dead holder is taken as correlated once the engine no longer shows the
  wait (the dead holder's correlation consumed it), and sent again only while it does.

The holder looks again on each step the run records (the wait room) and every
``RECHECK_S``, so a message is correlated within a few milliseconds of its catch event
being armed by a worker's step, and within ``RECHECK_S`` otherwise.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple

import orjson

from flowgate.services.api.pause import Paused, Waits, next_pause
from flowgate.services.api.runs import Runs
from flowgate.services.api.waitroom import WaitRoom
from flowgate.shared.aio import Spawner
from flowgate.shared.camunda import BadRequest, CamundaClient
from flowgate.shared.keys import Keys
from flowgate.shared.lua import Script
from flowgate.shared.redis_client import RedisClient, text
from flowgate.shared.state import RunState
from flowgate.shared.store.runs import RunStore

#: How long a holder's lease lasts without renewal, and how often a holder looks again.
LEASE_S = 5.0
RECHECK_S = 0.25


class Delivery(StrEnum):
    """What became of a message."""

    CORRELATED = "correlated"
    HELD = "held"  # still held when the client's wait ended (202)
    EXPIRED = "expired"  # the run did not wait for it within the hold
    UNKNOWN_RUN = "unknown_run"
    RUN_ENDED = "run_ended"
    CONFLICT = "conflict"  # its messageId names another message


@dataclass(frozen=True, slots=True)
class MessageOutcome:
    delivery: Delivery
    state: RunState | None = None
    paused: Paused | None = None


@dataclass(frozen=True, slots=True)
class Message:
    correlation_id: str
    name: str
    variables: dict[str, Any]
    message_id: str | None = None

    @property
    def fingerprint(self) -> str:
        """What the same messageId must carry again (a retry, not another message)."""
        body = orjson.dumps([self.name, self.variables], option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(body).hexdigest()


class Messages:
    def __init__(
        self,
        store: RunStore,
        runs: Runs,
        camunda: CamundaClient,
        waitroom: WaitRoom,
        redis: RedisClient,
        keys: Keys,
        spawner: Spawner,
        *,
        hold_s: float,
        result_ttl_s: int,
    ) -> None:
        self._store = store
        self._runs = runs
        self._camunda = camunda
        self._waitroom = waitroom
        self._redis = redis
        self._keys = keys
        self._spawner = spawner
        self._hold_s = hold_s
        self._result_ttl_s = result_ttl_s
        self._holder = f"holder-{uuid.uuid4().hex}"
        self._claim_script = CLAIM.bound(redis)

    async def send(self, message: Message, *, wait_s: float, until: str | None) -> MessageOutcome:
        """Deliver ``message`` (see the module docstring) and wait up to ``wait_s`` for what
        it caused: the run's end, the step ``until``, or its next pause. A message still
        held when the wait ends stays held (``HELD``)."""
        cid = message.correlation_id
        state = await self._runs.get(cid)
        if state is None:
            return MessageOutcome(Delivery.UNKNOWN_RUN)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        record = self._keys.message(cid, message.message_id or uuid.uuid4().hex)
        before = Waits()
        if await self._redis.hget(record, "status") != Delivery.CORRELATED.value.encode():
            if state.finished:
                return MessageOutcome(Delivery.RUN_ENDED, state)
            before = await Waits.of(self._camunda, state.instance_id)
        # else: a resend of a message correlated already: answered as it was (the run as
        # it is now, or its next pause), and never sent again (_claim says so).
        delivery = await self._deliver(message, record, deadline)
        if delivery is not Delivery.CORRELATED:
            return MessageOutcome(delivery, await self._runs.get(cid))
        paused = await next_pause(
            waitroom=self._waitroom,
            store=self._store,
            camunda=self._camunda,
            correlation_id=cid,
            before=before,
            wait_s=max(deadline - loop.time(), 0.0),
            until=until,
        )
        return MessageOutcome(Delivery.CORRELATED, paused=paused)

    async def _deliver(self, message: Message, record: str, deadline: float) -> Delivery:
        """The message's fate by ``deadline``: hold it if no one does, else follow whoever
        does; ``HELD`` while it is still held then."""
        loop = asyncio.get_running_loop()
        while True:
            status = await self._claim(message, record)
            if status in ("hold", "take_over"):
                holding = self._spawner.spawn(
                    self._hold(message, record, taken_over=status == "take_over"),
                    name=f"message:{message.correlation_id}",
                )
                try:
                    async with asyncio.timeout_at(deadline):
                        delivered = await asyncio.shield(holding)
                except TimeoutError:
                    return Delivery.HELD  # the hold goes on without this request
                return delivered or Delivery.EXPIRED
            if status != "wait":
                return Delivery(status)
            if loop.time() >= deadline:  # another request holds it, and goes on
                return Delivery.HELD
            await asyncio.sleep(min(RECHECK_S, max(deadline - loop.time(), 0.0)))

    async def _claim(self, message: Message, record: str) -> str:
        """``hold`` (a new record, ours), ``take_over`` (its holder's lease lapsed: ours
        now), ``wait`` (someone holds it), or its end: ``correlated``, ``expired``,
        ``conflict``."""
        now_ms = int(time.time() * 1000)
        answer = await self._claim_script(
            MessageKeys(record=record),
            ClaimArgs(
                name=message.name,
                fingerprint=message.fingerprint,
                holder=self._holder,
                now_ms=now_ms,
                lease_until=now_ms + int(LEASE_S * 1000),
                hold_until=now_ms + int(self._hold_s * 1000),
                ttl_s=int(self._hold_s) + self._result_ttl_s,
            ),
        )
        return text(answer)

    async def _hold(self, message: Message, record: str, *, taken_over: bool) -> Delivery:
        """Correlate the message once the run waits for it, within its hold."""
        cid = message.correlation_id
        hold_until = await self._redis.hget(record, "holdUntil")
        ends_at = int(hold_until) / 1000 if hold_until else time.time() + self._hold_s
        status = await self._redis.hget(record, "status")
        # A holder that died after marking it sending may have correlated it.
        maybe_sent = taken_over and status is not None and text(status) == "sending"
        async with self._waitroom.follow(cid) as follower:
            while time.time() < ends_at:
                lease = int((time.time() + LEASE_S) * 1000)
                await self._redis.hset(record, "leaseUntil", lease)
                state = await self._store.get(cid)
                if state is None or state.finished:
                    break
                armed = await self._armed(state, message.name)
                if maybe_sent and not armed:
                    return await self._mark(record, Delivery.CORRELATED)
                maybe_sent = False
                if armed and await self._correlate(message, record, state):
                    return await self._mark(record, Delivery.CORRELATED)
                await follower.changed(min(RECHECK_S, max(ends_at - time.time(), 0.0)))
        return await self._mark(record, Delivery.EXPIRED)

    async def _armed(self, state: RunState, name: str) -> bool:
        """Whether the run's instance waits for a message ``name`` now."""
        if state.instance_id is None:  # its start is still on its way to the engine
            return False
        waits = await self._camunda.message_waits(state.instance_id)
        return any(wait.message_name == name for wait in waits)

    async def _correlate(self, message: Message, record: str, state: RunState) -> bool:
        """Send it; False when the wait was consumed or disarmed since it was seen."""
        assert state.instance_id is not None
        await self._redis.hset(record, "status", "sending")
        try:
            await self._camunda.correlate_message(
                message.name, instance_id=state.instance_id, variables=message.variables
            )
        except BadRequest:
            await self._redis.hset(record, "status", "holding")
            return False
        return True

    async def _mark(self, record: str, delivery: Delivery) -> Delivery:
        await self._redis.hset(record, "status", delivery.value)
        return delivery


class MessageKeys(NamedTuple):
    record: str


class ClaimArgs(NamedTuple):
    name: str
    fingerprint: str
    holder: str
    now_ms: int
    lease_until: int
    hold_until: int
    ttl_s: int


#: A message's record: created and held, or joined (see :meth:`Messages._claim`).
CLAIM = Script(
    "message-claim",
    MessageKeys,
    ClaimArgs,
    """
local f = redis.call('HMGET', K.record, 'status', 'fingerprint', 'leaseUntil')
if not f[1] then
  redis.call('HSET', K.record, 'status', 'holding', 'name', A.name,
    'fingerprint', A.fingerprint, 'holder', A.holder, 'leaseUntil', A.lease_until,
    'holdUntil', A.hold_until)
  redis.call('EXPIRE', K.record, A.ttl_s)
  return 'hold'
end
if f[2] ~= A.fingerprint then return 'conflict' end
if f[1] == 'correlated' or f[1] == 'expired' then return f[1] end
if tonumber(f[3] or '0') < tonumber(A.now_ms) then
  redis.call('HSET', K.record, 'holder', A.holder, 'leaseUntil', A.lease_until)
  return 'take_over'
end
return 'wait'
""",
)
