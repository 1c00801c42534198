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
  drop its message. The record keeps the message (name and variables) and sits in its
  partition's ``msgs:held`` set, scored by when its holder's lease lapses; if the replica
  dies, one replica at a time (a lease, as the stall check's) takes such messages over
  every ``LEASE_S`` and holds them on, as a client's retry with the same ``messageId``
  would. A record left ``sending`` by a dead holder is taken as correlated once the engine
  no longer shows the wait (the dead holder's correlation consumed it), and sent again
  only while it does.

The holder looks again on each step the run records (the wait room) and every
``RECHECK_S``, so a message is correlated within a few milliseconds of its catch event
being armed by a worker's step, and within ``RECHECK_S`` otherwise.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple, cast

import orjson

from flowgate.services.api.pause import Paused, Waits, next_pause
from flowgate.services.api.runs import Runs
from flowgate.services.api.waitroom import WaitRoom
from flowgate.shared.aio import Spawner
from flowgate.shared.camunda import BadRequest, CamundaClient, CamundaError, MessageWait
from flowgate.shared.keys import Keys
from flowgate.shared.lease import Lease, lead
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
        self._renew = RENEW.bound(redis)

    async def run(self, stop: asyncio.Event) -> None:
        """Take over held messages whose holder died, while this replica holds the lease,
        until ``stop`` (run it in the replica's task group)."""
        lease = Lease(
            self._redis, self._keys.messages_lease, holder=self._holder, ttl_s=3 * LEASE_S
        )
        await lead(
            lease, stop, every_s=LEASE_S, work=self.sweep, errors=(CamundaError,),
            what="taking over held messages",
        )  # fmt: skip

    async def sweep(self) -> int:
        """Hold on every message whose holder's lease lapsed (in the task group, as a retry
        of its client would); how many were taken over."""
        taken = 0
        now_ms = int(time.time() * 1000)
        for part in self._keys.partitions:
            lapsed = await self._redis.zrangebyscore(part.messages_held, "-inf", now_ms, 0, 1000)
            for record in map(text, cast("list[bytes]", lapsed)):
                message = await self._held(record)
                if message is None:
                    await self._redis.zrem(part.messages_held, record)
                elif await self._claim(message, record) == "take_over":
                    holding = self._hold(message, record, taken_over=True)
                    self._spawner.spawn(holding, name=f"message:{message.correlation_id}")
                    taken += 1
        return taken

    async def _held(self, record: str) -> Message | None:
        """The message a record keeps, while it is held or being sent (else None)."""
        status, cid, message_id, name, variables = await self._redis.hmget(
            record, ["status", "cid", "messageId", "name", "variables"]
        )
        if status is None or text(status) not in ("holding", "sending") or cid is None:
            return None
        return Message(
            correlation_id=text(cid),
            name=text(name or b""),
            variables=orjson.loads(variables or b"{}"),
            message_id=text(message_id or b""),
        )

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
        message_id = message.message_id or uuid.uuid4().hex
        message = dataclasses.replace(message, message_id=message_id)  # the record keeps it
        record = self._keys.message(cid, message_id)
        before = Waits()
        if await self._redis.hget(record, "status") != Delivery.CORRELATED.value.encode():
            if state.finished:
                return MessageOutcome(Delivery.RUN_ENDED, state)
            before = await Waits.of(self._camunda, state.instance_id)
        # else: a resend of a message correlated already: answered as it was (the run as
        # it is now, or its next pause), and never sent again (_claim says so).
        delivery = await self._deliver(message, record, deadline, armed=before.messages)
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

    async def _deliver(
        self,
        message: Message,
        record: str,
        deadline: float,
        *,
        armed: tuple[MessageWait, ...] = (),
    ) -> Delivery:
        """The message's fate by ``deadline``: hold it if no one does, else follow whoever
        does; ``HELD`` while it is still held then. ``armed``: the waits the instance showed
        a moment ago (a fresh hold correlates on them without reading them again)."""
        loop = asyncio.get_running_loop()
        while True:
            status = await self._claim(message, record)
            if status in ("hold", "take_over"):
                holding = self._spawner.spawn(
                    self._hold(
                        message,
                        record,
                        taken_over=status == "take_over",
                        seen=armed if status == "hold" else (),
                    ),
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
            MessageKeys(record=record, held=self._keys.of(message.correlation_id).messages_held),
            ClaimArgs(
                cid=message.correlation_id,
                message_id=message.message_id or "",
                variables=orjson.dumps(message.variables),
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

    async def _hold(
        self,
        message: Message,
        record: str,
        *,
        taken_over: bool,
        seen: tuple[MessageWait, ...] = (),
    ) -> Delivery:
        """Correlate the message once the run waits for it, within its hold; ``seen``: the
        waits shown a moment ago, which spare the first look a read when they hold it."""
        cid = message.correlation_id
        hold_until = await self._redis.hget(record, "holdUntil")
        ends_at = int(hold_until) / 1000 if hold_until else time.time() + self._hold_s
        status = await self._redis.hget(record, "status")
        # A holder that died after marking it sending may have correlated it.
        maybe_sent = taken_over and status is not None and text(status) == "sending"
        async with self._waitroom.follow(cid) as follower:
            while time.time() < ends_at:
                lease = int((time.time() + LEASE_S) * 1000)
                await self._renew(self._message_keys(message, record), RenewArgs(lease_until=lease))
                state = await self._store.get(cid)
                if state is None or state.finished:
                    break
                armed = any(w.message_name == message.name for w in seen) or await self._armed(
                    state, message.name
                )
                seen = ()
                if maybe_sent and not armed:
                    return await self._mark(message, record, Delivery.CORRELATED)
                maybe_sent = False
                if armed and await self._correlate(message, record, state):
                    return await self._mark(message, record, Delivery.CORRELATED)
                await follower.changed(min(RECHECK_S, max(ends_at - time.time(), 0.0)))
        return await self._mark(message, record, Delivery.EXPIRED)

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

    async def _mark(self, message: Message, record: str, delivery: Delivery) -> Delivery:
        """The message's end, and no longer held (a sweep finding it marked drops it too)."""
        await self._redis.hset(record, "status", delivery.value)
        await self._redis.zrem(self._message_keys(message, record).held, record)
        return delivery

    def _message_keys(self, message: Message, record: str) -> MessageKeys:
        return MessageKeys(record=record, held=self._keys.of(message.correlation_id).messages_held)


class MessageKeys(NamedTuple):
    record: str
    #: The partition's records held now, by when their lease lapses.
    held: str


class ClaimArgs(NamedTuple):
    cid: str
    message_id: str
    variables: bytes
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
    'holdUntil', A.hold_until, 'cid', A.cid, 'messageId', A.message_id,
    'variables', A.variables)
  redis.call('EXPIRE', K.record, A.ttl_s)
  redis.call('ZADD', K.held, A.lease_until, K.record)
  return 'hold'
end
if f[2] ~= A.fingerprint then return 'conflict' end
if f[1] == 'correlated' or f[1] == 'expired' then return f[1] end
if tonumber(f[3] or '0') < tonumber(A.now_ms) then
  redis.call('HSET', K.record, 'holder', A.holder, 'leaseUntil', A.lease_until)
  redis.call('ZADD', K.held, A.lease_until, K.record)
  return 'take_over'
end
return 'wait'
""",
)


class RenewArgs(NamedTuple):
    lease_until: int


#: A holder's lease on a message goes on (the record and its place in the held set).
RENEW = Script(
    "message-renew",
    MessageKeys,
    RenewArgs,
    """
redis.call('HSET', K.record, 'leaseUntil', A.lease_until)
redis.call('ZADD', K.held, 'XX', A.lease_until, K.record)
""",
)
