"""Where a run an incident ended goes on from its failed step: the failed external task or
job gets its retries back, and the run is ``pending`` again under the same correlationId
and status URL. Completed steps never run again: the engine resumes where it stopped.

The steps, and why in this order:

1. the engine's open incidents of the run's instance are read: a run that ended ``error``
   otherwise (a BPMN error end, an instance deleted) has none, and is not retried (409);
2. the run is reopened in Redis first (shared/store/scripts.py ``REOPEN``): ``pending``
   again, its instance watched again, its callback due at its next end, every replica
   told; only then does the engine hear of it, so that the step's next outcome, from a
   worker or the watcher, finds a pending run to end;
3. each incident's task or job gets ``retries`` back (WORKER_RETRIES, at least one); if the
   engine refuses, the run is ended again with its error, so nothing half-done stays;
4. the answer waits as a start's does.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from flowgate.services.api.runs import Runs
from flowgate.services.api.waitroom import WaitResult, WaitRoom
from flowgate.shared.camunda import CamundaClient, CamundaError
from flowgate.shared.eventlog import EventRecord
from flowgate.shared.state import RunState, Status
from flowgate.shared.store.runs import RunStore


class RetryOutcome(StrEnum):
    RETRIED = "retried"
    UNKNOWN = "unknown"  # no store knows the id
    NOT_AN_INCIDENT = "not_an_incident"  # not ``error``, or ended by no incident


@dataclass(frozen=True, slots=True)
class RetryResult:
    outcome: RetryOutcome
    #: The run as it was when refused; its wait's end when retried.
    state: RunState | None = None
    waited: WaitResult | None = None


class Retrier:
    def __init__(
        self,
        store: RunStore,
        runs: Runs,
        camunda: CamundaClient,
        waitroom: WaitRoom,
        *,
        retries: int,
    ) -> None:
        self._store = store
        self._runs = runs
        self._camunda = camunda
        self._waitroom = waitroom
        self._retries = max(retries, 1)

    async def retry(self, correlation_id: str, *, wait_s: float, until: str | None) -> RetryResult:
        """Retry the run's failed step and wait up to ``wait_s`` (see the module
        docstring). Engine errors escape, the run ended again as it was."""
        state = await self._runs.get(correlation_id)
        if state is None:
            return RetryResult(RetryOutcome.UNKNOWN)
        if state.status is not Status.ERROR or state.instance_id is None:
            return RetryResult(RetryOutcome.NOT_AN_INCIDENT, state)
        incidents = [
            i for i in await self._camunda.open_incidents(state.instance_id) if i.retryable
        ]
        if not incidents:
            return RetryResult(RetryOutcome.NOT_AN_INCIDENT, state)
        event = EventRecord.of_run(
            state,
            status="retried",
            step_name=incidents[0].activity_id,
            http_method="POST",
            endpoint="/api/process/retry",
            error_message=str(state.error),
            metadata={"incidents": [i.id for i in incidents], "retries": self._retries},
        )
        reopened = await self._store.reopen(
            correlation_id, event, incidents=[i.id for i in incidents]
        )
        if reopened is None:  # ended otherwise meanwhile, or its record has left Redis
            return RetryResult(RetryOutcome.NOT_AN_INCIDENT, state)
        try:
            for incident in incidents:
                await self._camunda.set_retries(incident, self._retries)
        except CamundaError:
            await self._store.finish(correlation_id, Status.ERROR, error=state.error)
            raise
        waited = await self._waitroom.wait(correlation_id, wait_s, until=until)
        return RetryResult(RetryOutcome.RETRIED, reopened, waited)
