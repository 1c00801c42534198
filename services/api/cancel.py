"""Where a run is cancelled: its engine instance deleted, its state ``cancelled``.

The steps, and why in this order:

1. the cancel is recorded first (``{p}:cancel:{cid}``, shared/store/runs.py ``cancelling``), so
   that if this replica dies after the engine deleted the instance, the watcher, which sees
   the deletion in the engine's history, ends the run ``cancelled`` rather than ``error``;
2. the engine instance is deleted (a run whose start is still in flight has none yet: the
   starter deletes the instance that arrives for a cancelled run);
3. the run is ended ``cancelled`` with the one Lua transition every end goes through, which
   wakes every parked start, long-poll and event stream for it on every replica.

A run that ends some other way meanwhile keeps that end: the transition only changes a
``pending`` run, so a cancel racing a completion ends in exactly one terminal state.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from enum import StrEnum

from flowgate.services.api.metrics import ApiMetrics
from flowgate.services.api.runs import Runs
from flowgate.services.api.waitroom import WaitRoom
from flowgate.shared.aio import Backoff
from flowgate.shared.camunda import CamundaClient, EngineError, NotFound
from flowgate.shared.eventlog import EventRecord
from flowgate.shared.state import RunState, Status
from flowgate.shared.store.runs import RunStore

log = logging.getLogger(__name__)

#: How long a cancel waits for the run's end when the engine says its instance is gone
#: already (it completed a moment ago: the watcher ends the run within a pass or two).
ENDING_WAIT_S = 2.0
DEFAULT_REASON = "cancelled by the client"
DELETE_ATTEMPTS = 5


class CancelOutcome(StrEnum):
    """How a cancel ended (also the ``outcome`` label of the cancel metric)."""

    CANCELLED = "cancelled"  # this call cancelled it
    ALREADY = "already"  # it was cancelled before
    FINISHED = "finished"  # it had ended another way: nothing to cancel
    UNKNOWN = "unknown"  # no store knows the id


@dataclass(frozen=True, slots=True)
class CancelResult:
    outcome: CancelOutcome
    state: RunState | None


class Canceller:
    def __init__(
        self,
        store: RunStore,
        runs: Runs,
        camunda: CamundaClient,
        waitroom: WaitRoom,
        metrics: ApiMetrics,
    ) -> None:
        self._store = store
        self._runs = runs
        self._camunda = camunda
        self._waitroom = waitroom
        self._metrics = metrics

    async def cancel(self, correlation_id: str, reason: str | None) -> CancelResult:
        """Cancel the run if it is pending; see the module docstring. Engine errors other
        than "not found" escape (the run stays pending: the client may try again)."""
        result = await self._cancel(correlation_id, reason or DEFAULT_REASON)
        self._metrics.cancels.labels(result.outcome.value).inc()
        return result

    async def _cancel(self, cid: str, reason: str) -> CancelResult:
        state = await self._runs.get(cid)
        if state is None or state.finished:
            return _settled(state)
        if not await self._store.cancelling(cid, reason):  # it ended meanwhile
            return _settled(await self._runs.get(cid))
        if state.instance_id:
            try:
                await self._delete(state.instance_id)
            except NotFound:
                # Ended in the engine a moment ago: its own end is the truth.
                ended = await self._waitroom.wait(cid, ENDING_WAIT_S)
                if isinstance(ended.outcome, RunState) and ended.outcome.finished:
                    return _settled(ended.outcome)
        changed = await self._store.finish(
            cid, Status.CANCELLED, error=reason, event=_cancel_event(state, reason)
        )
        now = await self._runs.get(cid)
        if changed:
            log.info("run cancelled", extra={"correlationId": cid})
            return CancelResult(CancelOutcome.CANCELLED, now)
        return _settled(now)

    async def _delete(self, instance_id: str) -> None:
        """Delete the instance, again while it races a step that changes it (the engine
        refuses one of two concurrent changes; a moment later the delete goes through).

        Raises NotFound when the instance is gone, also when the engine refused the delete
        because the instance was ending meanwhile (it answers 500 "cannot restore state of
        process instance" then): its own end is the truth.
        """
        backoff = Backoff(base_s=0.05, cap_s=1.0)
        for attempt in range(DELETE_ATTEMPTS):
            try:
                await self._camunda.delete_process_instance(instance_id)
                return
            except NotFound:
                raise
            except EngineError as exc:
                if not await self._camunda.instance_running(instance_id):
                    raise NotFound(404, exc.type, exc.message, exc.code) from exc
                retry = exc.is_optimistic_locking or exc.is_deadlock
                if not retry or attempt == DELETE_ATTEMPTS - 1:
                    raise
            await asyncio.sleep(backoff.next_delay_s())


def _settled(state: RunState | None) -> CancelResult:
    """What a cancel answers for a run that is not (or no longer) pending."""
    if state is None:
        return CancelResult(CancelOutcome.UNKNOWN, None)
    if state.status is Status.CANCELLED:
        return CancelResult(CancelOutcome.ALREADY, state)
    return CancelResult(CancelOutcome.FINISHED, state)


def _cancel_event(state: RunState, reason: str) -> EventRecord:
    return EventRecord.of_run(
        state,
        status=Status.CANCELLED.value,
        step_name="cancel",
        http_method="POST",
        endpoint="/api/process/cancel",
        error_message=reason,
        metadata={"instanceId": state.instance_id},
    )
