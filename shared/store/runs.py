"""Runs in Redis: :class:`RunStore`, one hash per run, every transition one Lua script.

A run's life in transitions: :meth:`~RunStore.claim` (``pending``), then
:meth:`~RunStore.sending` (the engine start is about to be sent), then
:meth:`~RunStore.attach_instance`, and at the end :meth:`~RunStore.finish` (``ok`` | ``error``
| ``cancelled``); or, for a start that never reached the engine, :meth:`~RunStore.abandon`.
Claims without an instance sit in ``{p}:starts`` until attached, finished or abandoned, so a
replica that dies mid-start leaves nothing stranded (services/background/recovery.py).

A transition changes the hash, appends its write-behind entry to its partition's stream
``{p:n}:wb`` and (for an end, a step, an abandoned start) publishes on the partition's
channel ``{p:n}:run`` in the same script (shared/store/scripts.py): no state is written but
never persisted or never announced, and a subscriber that hears of a change can read it at
once (Redis delivers a publish after the script has finished). Every key a script touches is
in the run's partition (shared/keys.py), so it runs on a Redis Cluster as on one Redis.

The store's other rooms hang off it: :attr:`~RunStore.steps` (shared/store/steps.py),
:attr:`~RunStore.instances` (the watcher's instance map, shared/store/instances.py),
:attr:`~RunStore.pages` (the list, shared/store/pages.py), and two schedules,
:attr:`~RunStore.starts` and :attr:`~RunStore.callbacks` (shared/store/schedule.py). The
record itself is shared/state.py; the channel's messages shared/contract.py. Stream entries
have the fields ``kind`` (``state`` | ``step`` | ``event``) and ``body`` (JSON); the stream is never
trimmed with MAXLEN (that would drop entries Postgres has not seen): the flusher deletes
entries once committed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from flowgate.shared.contract import QUEUED, StartFailed, SystemVariables
from flowgate.shared.eventlog import EventRecord
from flowgate.shared.keys import Keys
from flowgate.shared.lua import NoArgs
from flowgate.shared.redis_client import RedisClient, text
from flowgate.shared.settings import Settings
from flowgate.shared.state import RunState, Status, dump_json, iso
from flowgate.shared.steps import MAX_STEPS, StepEvent
from flowgate.shared.store.instances import INSTANCE_LINGER_S, InstanceMap
from flowgate.shared.store.pages import Pages
from flowgate.shared.store.schedule import Schedule, ms
from flowgate.shared.store.scripts import (
    ABANDON,
    ATTACH,
    CANCELLING,
    CLAIM,
    FINISH,
    LOOK,
    REOPEN,
    SENDING,
    AbandonArgs,
    AbandonKeys,
    AttachArgs,
    AttachKeys,
    CancellingArgs,
    CancellingKeys,
    ClaimArgs,
    ClaimKeys,
    FinishArgs,
    FinishKeys,
    LookKeys,
    ReopenArgs,
    ReopenKeys,
    SendingArgs,
    SendingKeys,
)
from flowgate.shared.store.steps import StepStore


async def writebehind_backlog(redis: RedisClient, keys: Keys) -> int:
    """Write-behind entries not yet in Postgres, undelivered or delivered but not yet
    acknowledged: the streams' length, since the flusher deletes entries once committed."""
    async with redis.pipeline(transaction=False) as pipe:
        for partition in keys.partitions:
            pipe.xlen(partition.writebehind)
        return sum(await pipe.execute())


class Abandoned(Exception):
    """An engine instance arrived for a run that must not have one: its claim was given up
    meanwhile, or it was cancelled."""


#: Fields of the run's hash beside the record (not RunState fields: they never reach
#: Postgres or a client). When the starting client stops waiting, in ms:
CLIENT_DEADLINE = "clientDeadline"
#: The incidents retries resolved (comma-separated ids; shared/store/scripts.py REOPEN):
RETRIED_INCIDENTS = "retriedIncidents"
BESIDE_THE_RECORD = (CLIENT_DEADLINE, RETRIED_INCIDENTS)


class RunStore:
    """Run state transitions and reads; see the module docstring."""

    @classmethod
    def from_settings(cls, redis: RedisClient, keys: Keys, settings: Settings) -> RunStore:
        return cls(
            redis,
            keys,
            result_ttl_s=settings.result_ttl_s,
            pending_ttl_s=settings.pending_ttl_s,
            steps_in_redis_s=settings.steps_in_redis_s,
        )

    def __init__(
        self,
        redis: RedisClient,
        keys: Keys,
        *,
        result_ttl_s: int,
        pending_ttl_s: int,
        steps_in_redis_s: float = 3 * INSTANCE_LINGER_S,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._result_ttl_s = result_ttl_s
        self._pending_ttl_s = pending_ttl_s
        #: A finished run's steps leave Redis this long after its end (StepStore.compact):
        #: past the last steps the engine reports for it (INSTANCE_LINGER_S).
        self._steps_in_redis_ms = int(steps_in_redis_s * 1000)
        self._claim = CLAIM.bound(redis)
        self._sending = SENDING.bound(redis)
        self._attach = ATTACH.bound(redis)
        self._finish = FINISH.bound(redis)
        self._reopen = REOPEN.bound(redis)
        self._cancelling = CANCELLING.bound(redis)
        self._abandon = ABANDON.bound(redis)
        self._look = LOOK.bound(redis)
        self.steps = StepStore(redis, keys)
        self.instances = InstanceMap(redis, keys)
        self.pages = Pages(redis, keys)
        #: Claims without an engine instance yet, due for a look (recovery).
        self.starts = Schedule(redis, keys, lambda partition: partition.starts)
        #: Ended runs whose end is to be delivered to their callbackUrl.
        self.callbacks = Schedule(redis, keys, lambda partition: partition.callbacks)

    async def claim(
        self,
        ids: SystemVariables,
        process_key: str,
        request_hash: str,
        *,
        fetch_variables: list[str] | None = None,
        callback_url: str | None = None,
        tenant: str | None = None,
        principal: str | None = None,
        traceparent: str | None = None,
        look_after_s: float = 5.0,
        client_deadline: datetime | None = None,
    ) -> tuple[RunState, bool]:
        """Create the ``pending`` state, or return the one that exists.

        Exactly one of any number of concurrent callers gets ``created=True``; the others
        join it (and must compare ``request_hash`` themselves). The index entry lets the
        list page newest first; entries older than any hash can live are dropped here, so
        the index stays bounded without a sweeper. The claim is due for a look after
        ``look_after_s`` unless its start goes on by then. ``client_deadline`` (when the
        starting client stops waiting) goes in the hash beside the state, for the steps
        that give up with their client (:meth:`client_deadline`).
        """
        now = datetime.now(UTC)
        state = RunState(
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
            tenant=tenant,
            principal=principal,
            traceparent=traceparent,
        )
        now_ms = ms(now)
        part = self._keys.of(ids.correlation_id)
        created, stored = await self._claim(
            ClaimKeys(
                state=part.state_prefix + ids.correlation_id,
                runs=part.index,
                stream=part.writebehind,
                starts=part.starts,
            ),
            ClaimArgs(
                cid=ids.correlation_id,
                score=now_ms,
                oldest_score=now_ms - (self._pending_ttl_s + self._result_ttl_s) * 1000,
                pending_ttl_s=self._pending_ttl_s,
                look_at=now_ms + int(look_after_s * 1000),
                rest=[value for pair in state.to_hash().items() for value in pair]
                + ([CLIENT_DEADLINE, str(ms(client_deadline))] if client_deadline else []),
            ),
        )
        return RunState.from_json(stored), bool(created)

    async def reopen(
        self, correlation_id: str, event: EventRecord, *, incidents: list[str]
    ) -> RunState | None:
        """Make a run that ended ``error`` ``pending`` again (its failed step is being
        retried: services/api/retry.py), with ``event`` as its audit row; the state now, or
        None when it was not an ``error`` run with an engine instance. ``incidents``, the
        ones the retry resolves, no longer end the run (:meth:`finish` ``incident_id``)."""
        cid = correlation_id
        part = self._keys.of(cid)
        state = await self._reopen(
            ReopenKeys(
                state=self._keys.state(cid),
                stream=part.writebehind,
                steps=self._keys.steps(cid),
                seen=self._keys.steps_seen(cid),
                claimed=self._keys.steps_claimed(cid),
                instances=part.instances,
                instances_ended=part.instances_ended,
                callbacks=part.callbacks,
                compact=part.compact,
            ),
            ReopenArgs(
                cid=cid,
                now=iso(datetime.now(UTC)),
                pending_ttl_s=self._pending_ttl_s,
                channel=part.channel,
                event=event.to_json(),
                incidents=",".join(incidents),
            ),
        )
        return RunState.from_json(state) if state else None

    async def stalls(self, correlation_id: str, *, after: int = 0) -> list[dict[str, Any]]:
        """The run's stalls (services/background/stalls.py) from the ``after``-th on."""
        raw = await self._redis.lrange(self._keys.stalls(correlation_id), after, -1)
        return [orjson.loads(item) for item in raw]

    async def status_and_tenant(self, correlation_id: str) -> tuple[str | None, str | None]:
        """The run's status and tenant as Redis holds them (None, None: it holds no run)."""
        status, tenant = await self._redis.hmget(
            self._keys.state(correlation_id), ["status", "tenant"]
        )
        return (text(status) if status is not None else None), (
            text(tenant) if tenant is not None else None
        )

    async def client_deadline(self, correlation_id: str) -> datetime | None:
        """When the client that started the run stops waiting for it (None: it did not
        wait, or the run is gone)."""
        raw = await self._redis.hget(self._keys.state(correlation_id), CLIENT_DEADLINE)
        return None if raw is None else datetime.fromtimestamp(int(raw) / 1000, UTC)

    async def sending(self, state: RunState, *, look_after_s: float) -> RunState | None:
        """Mark the engine start of a fresh claim as sent; the state now, or None when the
        claim changed meanwhile (abandoned by recovery: do not send)."""
        now = datetime.now(UTC)
        part = self._keys.of(state.correlation_id)
        version = await self._sending(
            SendingKeys(
                state=self._keys.state(state.correlation_id),
                stream=part.writebehind,
                starts=part.starts,
            ),
            SendingArgs(
                cid=state.correlation_id,
                version=state.version,
                now=iso(now),
                look_at=ms(now) + int(look_after_s * 1000),
            ),
        )
        if not version:
            return None
        return dataclasses.replace(state, start_sent_at=now, updated_at=now, version=int(version))

    async def attach_instance(
        self, correlation_id: str, instance_id: str, event: EventRecord | None = None
    ) -> RunState | None:
        """Record the engine's instance id (also after a finish that beat the start's
        response) and, in the same step, its audit ``event``; the state as it is then (a
        start's wait begins from it), or None when the run no longer exists. Raises
        :class:`Abandoned` when its claim was given up or cancelled meanwhile."""
        part = self._keys.of(correlation_id)
        attached = await self._attach(
            AttachKeys(
                state=self._keys.state(correlation_id),
                stream=part.writebehind,
                starts=part.starts,
                instances=part.instances,
            ),
            AttachArgs(
                cid=correlation_id,
                instance_id=instance_id,
                now=iso(datetime.now(UTC)),
                event=event.to_json() if event else "",
            ),
        )
        if attached == -1:
            raise Abandoned(correlation_id)
        return RunState.from_json(attached) if attached else None

    async def finish(
        self,
        correlation_id: str,
        status: Status,
        *,
        data: Any = None,
        error: Any = None,
        event: EventRecord | None = None,
        step: StepEvent | None = None,
        incident_id: str | None = None,
        cause: str | None = None,
    ) -> bool:
        """End a ``pending`` run and wake its waiters; True if this call changed it.

        The one way a run ends, whoever ends it (the ``/complete`` endpoint, a worker's
        finishing step, an incident, the engine's end, a cancel). ``event`` is its audit row
        and ``step`` the step that ended it, both written in the same step. A second finish,
        or one for an unknown (never claimed or expired) id, changes nothing and returns
        False: the first outcome wins. The run's engine instance stays mapped for
        :data:`INSTANCE_LINGER_S` more, for its last steps. ``cause``: the traceparent of the
        span that ended it, sent with the wake (a waiter's span links to it).
        """
        if status not in (Status.OK, Status.ERROR, Status.CANCELLED):
            raise ValueError("finish() needs a terminal status (ok, error or cancelled)")
        cid = correlation_id
        now = datetime.now(UTC)
        part = self._keys.of(cid)
        changed = await self._finish(
            FinishKeys(
                state=self._keys.state(cid),
                stream=part.writebehind,
                starts=part.starts,
                steps=self._keys.steps(cid),
                seen=self._keys.steps_seen(cid),
                claimed=self._keys.steps_claimed(cid),
                instances_ended=part.instances_ended,
                callbacks=part.callbacks,
                cancel=self._keys.cancel(cid),
                compact=part.compact,
            ),
            FinishArgs(
                cid=cid,
                status=status.value,
                data=dump_json(data),
                error=dump_json(error),
                now=iso(now),
                now_ms=ms(now),
                result_ttl_s=self._result_ttl_s,
                channel=part.channel,
                event=event.to_json() if event else "",
                step=step.to_json() if step else "",
                activity_instance_id=step.activity_instance_id if step else "",
                max_steps=MAX_STEPS,
                forget_at=ms(now) + int(INSTANCE_LINGER_S * 1000),
                incident_id=incident_id or "",
                compact_after_ms=self._steps_in_redis_ms,
                cause=cause or "",
            ),
        )
        return bool(changed)

    async def cancelling(self, correlation_id: str, reason: str) -> bool:
        """Record that a cancel was asked for this pending run (before its engine instance is
        deleted): whoever sees the deletion ends the run ``cancelled`` with ``reason``.
        False when the run is not pending."""
        cid = correlation_id
        asked = await self._cancelling(
            CancellingKeys(state=self._keys.state(cid), cancel=self._keys.cancel(cid)),
            CancellingArgs(reason=reason, ttl_s=self._pending_ttl_s),
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
        return {cid: text(r) for cid, r in zip(correlation_ids, found, strict=True) if r}

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
            AbandonKeys(
                state=self._keys.state(cid),
                runs=part.index,
                stream=part.writebehind,
                starts=part.starts,
            ),
            AbandonArgs(
                cid=cid,
                version=version,
                failed=failed.to_json(),
                channel=part.channel,
                now=iso(datetime.now(UTC)),
                result_ttl_s=self._result_ttl_s,
                unsent="1" if unsent else "0",
            ),
        )
        return bool(abandoned)

    async def get(self, correlation_id: str) -> RunState | None:
        """The state in Redis, or None (never existed, or aged out: try Postgres)."""
        fields = await self._redis.hgetall(self._keys.state(correlation_id))
        return RunState.from_hash(fields) if fields else None

    async def pending_among(self, correlation_ids: Sequence[str]) -> set[str]:
        """Which of these runs are ``pending`` (one round trip, their status only)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for cid in correlation_ids:
                pipe.hget(self._keys.state(cid), "status")
            found = await pipe.execute()
        return {
            cid
            for cid, status in zip(correlation_ids, found, strict=True)
            if status is not None and text(status) == Status.PENDING.value
        }

    async def get_many(self, correlation_ids: Sequence[str]) -> dict[str, RunState]:
        """The states Redis holds of these runs (one round trip)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for cid in correlation_ids:
                pipe.hgetall(self._keys.state(cid))
            found = await pipe.execute()
        return {
            cid: RunState.from_hash(fields)
            for cid, fields in zip(correlation_ids, found, strict=True)
            if fields
        }

    async def look(self, correlation_id: str) -> tuple[RunState | None, StepEvent | None]:
        """The state in Redis (as :meth:`get`) and the step the run recorded last (None:
        nothing has run yet, or the run is over), in one round trip: what a status read
        shows."""
        state, step = await self._look(
            LookKeys(
                state=self._keys.state(correlation_id), steps=self._keys.steps(correlation_id)
            ),
            NoArgs(),
        )
        return (
            RunState.from_json(state) if state else None,
            StepEvent.from_json(step) if step else None,
        )
