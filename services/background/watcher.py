"""Where a run ends when the engine says so, whatever ran its steps.

A flowgate worker ends a run at once when a step declared ``finishes_run`` is accepted (the
fast path). Every other run ends here: processes whose steps are user tasks, Java
delegates, timers or other teams' workers. :class:`Watcher` reads the engine's history and:

* records each step that ended in a run's record (shared/steps.py), with its audit row,
  unless a worker recorded it already;
* ends a run whose instance **completed** as ``ok``, its result the root variables less the
  system variables (or only the start's ``fetchVariables``);
* ends a run whose instance was **deleted** outside flowgate, or ended by an unhandled error
  or a terminate event, as ``error`` naming that;
* ends a run as ``error`` when an **incident** appears anywhere in it (a job or an external
  task out of retries), with the incident's message. An incident at a step a flowgate
  worker has claimed is that worker's to end the run with (its message is the step's own
  error): the watcher leaves it, in ``{p}:watcher:incidents``, and ends the run itself only
  if the worker has not within ``INCIDENT_GRACE_S`` (it died between its report and its
  record). Whichever replica watches then does, so no run is left waiting on it.

Its cost does not grow with the runs in flight: each pass is three history queries (steps,
ends, incidents) from a watermark on, however many runs wait, and none while no run is
watched. One replica watches at a time, holding a lease in Redis (``{p}:watcher``); when it
dies another takes over within seconds, from the watermark it left (``{p}:watcher:mark``).
Records become visible at commit, not in the order of their times, so each pass reads back
a second before the mark and every few seconds a pass reads back further; finishing and
recording steps are idempotent (shared/store/runs.py), so reading something twice is harmless.
Its cost grows with the engine's rate of ends instead (``make bench``, "End detection").
An instance stays mapped to its run until a while after its
end, so that its last steps are recorded even when a worker ended the run first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar, cast

import orjson

from flowgate.services.api.metrics import ApiMetrics
from flowgate.services.background.events import EngineEvents, Happened
from flowgate.shared.aio import Backoff, concurrently, sleep_or_stop
from flowgate.shared.camunda import (
    CamundaClient,
    CamundaError,
    EndedActivity,
    EndedInstance,
    Incident,
)
from flowgate.shared.contract import SystemVariables
from flowgate.shared.eventlog import EventRecord
from flowgate.shared.keys import Keys
from flowgate.shared.lease import Lease
from flowgate.shared.redis_client import REDIS_ERRORS, RedisClient, text
from flowgate.shared.state import RunState, Status, iso, parse_iso
from flowgate.shared.steps import StepEvent, StepStatus
from flowgate.shared.store.instances import INSTANCE_LINGER_S
from flowgate.shared.store.runs import RunStore

log = logging.getLogger(__name__)

#: How far a pass reads back before the watermark. The engine stamps a record when its
#: transaction ends it and it becomes visible at commit, so records appear out of time order:
#: every pass reads the last RECENT again (a commit a little slower than the one before),
#: one pass in DEEP_EVERY_S reads the last OVERLAP (a commit much slower).
#: An ended run's instance stays watched through two of them.
OVERLAP = timedelta(seconds=INSTANCE_LINGER_S / 2)
DEEP_EVERY_S = 5.0
RECENT = timedelta(seconds=1)
WRITES_AT_ONCE = 16
#: Activity types that get an audit row (the event log lists work done, as the seed's did);
#: every activity, events and gateways too, goes in the run's step record.
AUDITED_TYPES = frozenset({"task", "callActivity"})
#: Where a watcher with no watermark starts reading (the overlap goes back further): with
#: no watermark there has been no watcher, and so no run it could have missed.
FIRST_LOOK_BACK = timedelta(0)
#: History records one query returns (more are read page by page).
PAGE = 500
LEASE_S = 3.0
#: How often ended runs' instances are looked at (to stop mapping them).
FORGET_EVERY_S = 1.0
#: How often a replica that does not watch checks whether the watcher is gone.
FOLLOWER_INTERVAL_S = 1.0
#: How long an incident at a claimed step is left to the worker that claimed it.
INCIDENT_GRACE_S = 10.0


class _Record(Protocol):
    @property
    def id(self) -> str: ...


R = TypeVar("R", bound=_Record)


class Watcher:
    def __init__(
        self,
        store: RunStore,
        camunda: CamundaClient,
        redis: RedisClient,
        keys: Keys,
        metrics: ApiMetrics,
        *,
        replica_id: str,
        interval_s: float,
        events: EngineEvents | None = None,
    ) -> None:
        self._store = store
        self._camunda = camunda
        self._redis = redis
        self._keys = keys
        self._metrics = metrics
        self._replica_id = replica_id
        self._interval_s = interval_s
        self._events = events
        self._lease = Lease(redis, keys.watcher, holder=replica_id, ttl_s=LEASE_S)
        #: History records handled within the overlap, by id: not handled again.
        self._handled: dict[str, datetime] = {}
        self._deep_at = 0.0
        self._forget_at = 0.0
        #: The watermark as this replica last read or moved it (None: read it from Redis).
        self._marked: datetime | None = None
        #: Bounds the Redis writes of one pass in flight at once.
        self._writes = asyncio.Semaphore(WRITES_AT_ONCE)
        self.leading = False

    async def run(self, stop: asyncio.Event) -> None:
        """Watch while this replica holds the lease, until ``stop``; never raises for Redis
        or engine trouble (it logs, backs off and carries on)."""
        backoff = Backoff(base_s=self._interval_s, cap_s=5.0)
        try:
            while not stop.is_set():
                pause = FOLLOWER_INTERVAL_S
                try:
                    self._lead_changed(await self._lease.hold())
                    if self.leading:
                        began = asyncio.get_running_loop().time()
                        await self.watch_once()
                        # Passes start every interval, however long one took.
                        took = asyncio.get_running_loop().time() - began
                        pause = max(self._interval_s - took, 0.0)
                    backoff.reset()
                except (CamundaError, *REDIS_ERRORS, OSError, TimeoutError) as exc:
                    log.warning("engine watch failed; trying again", extra={"error": str(exc)})
                    pause = backoff.next_delay_s()
                except Exception:
                    # Not ours to take the replica down for: uvloop, for one, raises
                    # RuntimeError where redis-py expects OSError (a Redis killed mid-write).
                    log.exception("engine watch pass failed; trying again")
                    pause = backoff.next_delay_s()
                await sleep_or_stop(stop, pause)
        finally:
            if self.leading:
                await self._resign_quietly()

    async def watch_once(self) -> None:
        """What happened since the last look: from the events the engine pushes, or else
        from its history."""
        now = asyncio.get_running_loop().time()
        if now >= self._forget_at:
            self._forget_at = now + FORGET_EVERY_S
            await self._store.instances.forget_ended()
            await self._incidents_left_over()
        batch = await self._events.read() if self._events else None
        if batch is not None:
            if batch.gap:  # the push broke off somewhere: read the history back once
                with self._metrics.watch_pass_seconds.time():
                    await self._pass(deep=True)
            if batch.position is not None:
                with self._metrics.watch_pass_seconds.time():
                    if batch.happened:
                        await self._apply(batch.happened)
                    await self._advance(batch.happened, events_at=batch.position)
            return
        if await self._store.instances.count():
            with self._metrics.watch_pass_seconds.time():
                await self._pass()

    async def _pass(self, *, deep: bool = False) -> None:
        """One pass over the history: steps, ends and incidents since the watermark."""
        now = asyncio.get_running_loop().time()
        if deep or now >= self._deep_at:
            self._deep_at = now + DEEP_EVERY_S
            deep = True
        mark, _ = await self._mark()
        since = mark - (OVERLAP if deep else RECENT)
        async with concurrently() as reads:
            reading_instances = reads.create_task(self._read(self._camunda.ended_instances, since))
            reading_incidents = reads.create_task(self._read(self._camunda.incidents_since, since))
        # Activities after instances: an instance read as ended has its last steps committed
        # (in its own transaction or before), so they are read too, and recorded before its
        # run ends. Read at the same time, the activities could be read before that commit.
        happened = Happened(
            await self._read(self._camunda.ended_activities, since),
            reading_instances.result(),
            reading_incidents.result(),
        )
        await self._apply(happened)
        for handled in (happened.activities, happened.instances, happened.incidents):
            self._handled.update((record.id, mark) for record in handled)
        newest = await self._advance(happened)
        self._handled = {k: at for k, at in self._handled.items() if at >= newest - 2 * OVERLAP}

    async def _apply(self, happened: Happened) -> None:
        """Record the steps of the runs among ``happened``, then end those that ended."""
        activities, instances, incidents = (
            happened.activities,
            happened.instances,
            happened.incidents,
        )
        roots = {a.root_process_instance_id for a in activities}
        roots |= {i.id for i in instances}
        roots |= {i.root_process_instance_id for i in incidents if i.root_process_instance_id}
        named = {r: k for r, k in happened.business_keys.items() if r in roots}
        runs = await self._store.instances.runs_of(sorted(roots), named=named)
        by_key = {r: k for r, k in named.items() if r not in runs}
        states = await self._store.get_many(sorted(set(by_key.values())))
        # A start's own steps, before its replica has attached the instance: the run of that
        # correlationId, still pending, without another instance.
        runs |= {
            root: cid
            for root, cid in by_key.items()
            if _pending(state := states.get(cid)) and state and state.instance_id in (None, root)
        }
        if not runs:
            return
        ended = [i for i in instances if i.id in runs]
        # Most steps a worker has recorded already: look first, in one round trip.
        ours = [a for a in activities if a.root_process_instance_id in runs]
        known = await self._store.steps.known(
            [(runs[a.root_process_instance_id], a.id) for a in ours]
        )
        new = [activity for activity, recorded in zip(ours, known, strict=True) if not recorded]
        # The states of the runs this pass writes to only: a new step's audit row, an end
        # still pending (most ended runs a worker ended already: their status says so).
        pending = await self._store.pending_among(
            sorted({runs[i.id] for i in ended} - states.keys())
        )
        audited = {runs[a.root_process_instance_id] for a in new if _audited(a.activity_type)}
        states |= await self._store.get_many(sorted((audited | pending) - states.keys()))
        # The result of a run the engine completed, unless a worker ended it already.
        completed = [
            i.id for i in ended if i.state == "COMPLETED" and _pending(states.get(runs[i.id]))
        ]
        # A run's steps are in its record before it ends; its result is read meanwhile.
        async with concurrently() as group:
            for activity in new:
                group.create_task(self._step(activity, runs, states))
            reading = group.create_task(self._camunda.root_variables(completed))
        await self._ended(ended, runs, states, reading.result())
        for incident in incidents:
            await self._incident(incident, runs)

    async def _advance(self, happened: Happened, *, events_at: str | None = None) -> datetime:
        """Move the watermark on to the newest record of ``happened``, and with ``events_at``
        the pushed events' position past them (both in one round trip); the watermark."""
        mark, marked = await self._mark()
        times = [
            *(a.end_time for a in happened.activities),
            *(i.end_time for i in happened.instances),
            *(i.create_time for i in happened.incidents),
        ]
        newest = max([mark, *times])
        moved = newest > mark or not marked
        if moved or events_at is not None:
            async with self._redis.pipeline(transaction=False) as pipe:
                if moved:
                    pipe.set(self._keys.watcher_mark, iso(newest))
                if events_at is not None and self._events is not None:
                    pipe.set(self._events.position_key, events_at)
                await pipe.execute()
            if moved:
                self._marked = newest
            if events_at is not None and self._events is not None:
                self._events.saved(events_at)
        return newest

    # --- what happened ---------------------------------------------------------------------

    async def _step(
        self, activity: EndedActivity, runs: dict[str, str], states: dict[str, RunState]
    ) -> None:
        cid = runs[activity.root_process_instance_id]
        # The step's audit row is made from its run's state (read above for these only);
        # any other step's record needs none (the script skips a run that is gone).
        state = states.get(cid)
        if state is None and _audited(activity.activity_type):
            return
        status = StepStatus.CANCELLED if activity.canceled else StepStatus.OK
        step = StepEvent(
            step=activity.activity_id,
            status=status,
            activity_id=activity.activity_id,
            activity_instance_id=activity.id,
            activity_type=activity.activity_type,
            at=activity.end_time,
        )
        event = (
            None
            if state is None or not _audited(activity.activity_type)
            else EventRecord.of_run(
                state,
                status=status.value,
                step_name=activity.activity_id,
                # The called process's, for a step of a call activity.
                process_name=activity.process_definition_key or state.process_key,
                target_system="CamundaEngine",
                originating_system="engine",
                result=activity.activity_name,
                metadata={"activityType": activity.activity_type, "source": "engine history"},
                created_at=activity.end_time,
            )
        )
        async with self._writes:
            await self._store.steps.record(cid, step, event)

    async def _ended(
        self,
        instances: Sequence[EndedInstance],
        runs: dict[str, str],
        states: dict[str, RunState],
        variables: dict[str, dict[str, Any]],
    ) -> None:
        await self._store.instances.forget({i.id: runs[i.id] for i in instances})
        # Only runs still pending end here (most a worker ended already).
        instances = [i for i in instances if _pending(states.get(runs[i.id]))]
        cancels = await self._store.cancel_reasons([runs[i.id] for i in instances])
        for instance in instances:
            cid = runs[instance.id]
            state = states[cid]
            if instance.state == "COMPLETED":
                result = SystemVariables.result_of(
                    variables.get(instance.id, {}), state.fetch_variables
                )
                changed = await self._store.finish(cid, Status.OK, data=result)
            elif cid in cancels:  # deleted by a cancel whose replica did not get to end it
                changed = await self._store.finish(cid, Status.CANCELLED, error=cancels[cid])
            else:
                changed = await self._store.finish(cid, Status.ERROR, error=_why(instance))
            if changed:
                self._metrics.engine_ends.labels(instance.state.lower()).inc()

    async def _incident(self, incident: Incident, runs: dict[str, str]) -> None:
        cid = runs.get(incident.root_process_instance_id or "")
        if cid is None:
            return
        where = f" at {incident.activity_id}" if incident.activity_id else ""
        left = _LeftIncident(
            cid, incident.id, f"incident{where}: {incident.message or incident.incident_type}"
        )
        if incident.activity_id and await self._store.steps.claimed_at(cid, incident.activity_id):
            due_ms = int((time.time() + INCIDENT_GRACE_S) * 1000)
            await self._redis.zadd(self._keys.watcher_incidents, {left.to_json(): due_ms}, nx=True)
            return
        await self._end_by(left)

    async def _incidents_left_over(self) -> None:
        """End the runs of incidents left to a worker that has not ended them in time."""
        key, now_ms = self._keys.watcher_incidents, int(time.time() * 1000)
        due = await self._redis.zrangebyscore(key, "-inf", now_ms, start=0, num=PAGE)
        for raw in cast(list[bytes], due):
            await self._end_by(_LeftIncident.from_json(raw))
            await self._redis.zrem(key, raw)

    async def _end_by(self, incident: _LeftIncident) -> None:
        """End a run by an incident (unless it has ended, or a retry resolved the incident)."""
        ended = await self._store.finish(
            incident.cid, Status.ERROR, error=incident.error, incident_id=incident.id
        )
        if ended:
            self._metrics.engine_ends.labels("incident").inc()

    # --- plumbing --------------------------------------------------------------------------

    async def _read(self, query: Callable[..., Awaitable[list[R]]], since: datetime) -> list[R]:
        """Every record from ``since`` on, page by page, less those handled already."""
        found: dict[str, R] = {}
        after = since
        while True:
            page = await query(after, max_results=PAGE)
            found.update((r.id, r) for r in page if r.id not in self._handled)
            last = _time(page[-1]) if page else after
            if len(page) < PAGE or last <= after:
                return list(found.values())
            after = last

    async def _mark(self) -> tuple[datetime, bool]:
        """The watermark, and whether one was stored (else one starts now); read from Redis
        once per lead (only the leader moves it on)."""
        if self._marked is not None:
            return self._marked, True
        raw = await self._redis.get(self._keys.watcher_mark)
        if raw is None:
            return datetime.now(UTC) - FIRST_LOOK_BACK, False
        self._marked = parse_iso(text(raw))
        return self._marked, True

    def _lead_changed(self, leading: bool) -> None:
        if leading != self.leading:
            log.info("watching the engine" if leading else "no longer watching the engine")
            self._metrics.watching.set(int(leading))
            self._handled.clear()
            self._marked = None
            if self._events:
                self._events.forget()
        self.leading = leading

    async def _resign_quietly(self) -> None:
        try:
            async with asyncio.timeout(2):
                await self._lease.release()
        except (*REDIS_ERRORS, OSError, TimeoutError) as exc:
            log.warning("could not hand the watch over; it lapses", extra={"error": str(exc)})
        self._lead_changed(False)


@dataclass(frozen=True, slots=True)
class _LeftIncident:
    """What ends a run by an incident: its run, the incident, the run's error."""

    cid: str
    id: str
    error: str

    def to_json(self) -> bytes:
        return orjson.dumps({"cid": self.cid, "id": self.id, "error": self.error})

    @classmethod
    def from_json(cls, raw: bytes | str) -> _LeftIncident:
        body = orjson.loads(raw)
        return cls(cid=body["cid"], id=body["id"], error=body["error"])


def _time(record: object) -> datetime:
    if isinstance(record, Incident):
        return record.create_time
    assert isinstance(record, EndedActivity | EndedInstance)
    return record.end_time


def _pending(state: RunState | None) -> bool:
    return state is not None and state.status is Status.PENDING


def _audited(activity_type: str) -> bool:
    return activity_type.endswith("Task") or activity_type in AUDITED_TYPES


def _why(instance: EndedInstance) -> str:
    if instance.state == "EXTERNALLY_TERMINATED":
        reason = f" ({instance.delete_reason})" if instance.delete_reason else ""
        return f"the process instance was deleted outside flowgate{reason}"
    return f"the process instance ended without completing ({instance.state.lower()})"
