"""Where a run is started: claim its correlationId, start its engine instance, record it.

:meth:`Starter.start` is the use case behind ``POST /api/process/start`` (the endpoint only
parses the body and answers from the wait room):

1. **claim** the correlationId in Redis (shared/store.py): exactly one of any number of
   concurrent starts creates the ``pending`` state, the others join it;
2. for a fresh claim, **start** the engine instance with the system variables
   (shared/contract.py) and the correlationId as business key;
3. **attach** the instance id and write the ``started`` audit row; or, when the engine did
   not take the start, **abandon** the claim so that nothing stays ``pending`` and a retry
   with the same id starts afresh; requests that joined get the same answer.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from services.api.metrics import ApiMetrics
from shared.camunda import (
    CamundaClient,
    CamundaError,
    DefinitionNotFound,
    EngineError,
    EngineUnavailable,
)
from shared.contract import StartFailed, SystemVariables
from shared.eventlog import EventRecord, EventSink
from shared.state import ProcessState, Status
from shared.store import ProcessStore
from shared.variables import VariableError

log = logging.getLogger(__name__)

#: A claim still without an engine instance this many engine timeouts after it was made
#: was orphaned by a replica that died mid-start: the start call and the lost-answer
#: lookup are each bounded by CAMUNDA_TIMEOUT_MS, so no call of the claimant is in flight.
ORPHANED_AFTER_TIMEOUTS = 3


@dataclass(frozen=True, slots=True)
class StartCommand:
    """What a client asked to start."""

    process_key: str
    correlation_id: str
    variables: dict[str, Any]

    @property
    def request_hash(self) -> str:
        """Identifies the request: a repeated start must ask for the same thing."""
        canonical = orjson.dumps(self.variables, option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(self.process_key.encode() + b"\0" + canonical).hexdigest()


class StartRefused(Exception):
    """The start did not reach the engine, or asked for something else than the run its
    correlationId already names; ``failed`` is the answer (and what joiners were told)."""

    def __init__(self, failed: StartFailed) -> None:
        super().__init__(failed.error)
        self.failed = failed


class Starter:
    def __init__(
        self,
        store: ProcessStore,
        camunda: CamundaClient,
        events: EventSink,
        metrics: ApiMetrics,
        *,
        engine_timeout_ms: int,
    ) -> None:
        self._store = store
        self._camunda = camunda
        self._events = events
        self._metrics = metrics
        self._orphaned_after = timedelta(milliseconds=ORPHANED_AFTER_TIMEOUTS * engine_timeout_ms)

    async def claim(self, command: StartCommand) -> tuple[ProcessState, bool]:
        """Claim the id (or join its claim); True when this call created it.

        Raises :class:`StartRefused` (422) when the id names a run of another request.
        """
        state, created = await self._claim(command)
        if not created and state.request_hash != command.request_hash:
            raise StartRefused(
                StartFailed(
                    command.correlation_id,
                    422,
                    f"correlationId {command.correlation_id!r} is already used by a start"
                    " with another processKey or other variables",
                    field="correlationId",
                )
            )
        return state, created

    async def begin(self, state: ProcessState, variables: dict[str, Any]) -> None:
        """Start the engine instance of a fresh claim and attach it; on failure abandon the
        claim and raise :class:`StartRefused` with the answer."""
        ids = SystemVariables.of(state)
        try:
            instance_id = await self._start_instance(state, {**variables, **ids.to_variables()})
        except (CamundaError, VariableError) as exc:
            failed = _refusal(exc, state)
            await self._store.abandon(state.version, failed)
            raise StartRefused(failed) from exc
        await self._store.attach_instance(state.correlation_id, instance_id)
        await self._events(
            EventRecord(
                correlation_id=state.correlation_id,
                status="started",
                step=0,
                step_name="start",
                process_name=state.process_key,
                http_method="POST",
                endpoint="/api/process/start",
                request_data=variables,
                batch_id=ids.batch_id,
                traceability_id=ids.traceability_id,
                application_id=ids.application_id,
                identifiers=ids.identifiers,
                metadata={"instanceId": instance_id},
            )
        )

    async def _claim(self, command: StartCommand) -> tuple[ProcessState, bool]:
        """Claim, taking over a claim orphaned before the engine call."""
        for _ in range(2):
            state, created = await self._store.claim(
                SystemVariables.new(command.correlation_id),
                command.process_key,
                command.request_hash,
            )
            orphaned = (
                not created
                and state.status is Status.PENDING
                and state.instance_id is None
                and datetime.now(UTC) - state.started_at > self._orphaned_after
            )
            if not orphaned:
                break
            # The replica that claimed it died between its claim and the engine's answer: no
            # engine call of its can still be in flight (they time out long before), so
            # nobody would ever finish this run. Version-guarded, so a late attach wins.
            log.warning(
                "taking over an orphaned claim", extra={"correlationId": command.correlation_id}
            )
            error = "the start this request joined was interrupted; retry"
            await self._store.abandon(state.version, StartFailed(state.correlation_id, 503, error))
        return state, created

    async def _start_instance(self, state: ProcessState, variables: dict[str, Any]) -> str:
        """Start the engine instance; its id.

        A start whose answer was lost (a read timeout, a dropped connection) may still have
        started the instance. Before calling it failed, and so letting a retry start a second
        one, look the instance up by this attempt's traceability id.
        """
        cid = state.correlation_id
        try:
            with self._metrics.engine_start_seconds.time():
                instance = await self._camunda.start_process(
                    state.process_key, business_key=cid, variables=variables
                )
        except EngineUnavailable:
            if state.traceability_id is None:  # every claim sets it; nothing to look up by
                raise
            found = await self._camunda.historic_process_instances_with(
                business_key=cid, variables_equal={"traceability_id": state.traceability_id}
            )
            if not found:
                raise
            log.warning(
                "recovered an instance whose start answer was lost", extra={"correlationId": cid}
            )
            return str(found[0]["id"])
        return instance.id


def _refusal(exc: CamundaError | VariableError, state: ProcessState) -> StartFailed:
    """The caller's mistakes are 4xx naming the field; the engine's are 502/503."""
    cid = state.correlation_id
    if isinstance(exc, VariableError):
        return StartFailed(cid, 400, str(exc), field="variables")
    if isinstance(exc, DefinitionNotFound):
        error = f"no process definition with key {state.process_key!r}"
        return StartFailed(cid, 404, error, field="processKey")
    if isinstance(exc, EngineUnavailable):
        return StartFailed(cid, 503, "the process engine is unreachable; retry later")
    if isinstance(exc, EngineError) and exc.status_code == 400:
        field = "variables" if "variable" in exc.message.lower() else None
        return StartFailed(cid, 400, f"the engine rejected the start: {exc.message}", field=field)
    message = exc.message if isinstance(exc, EngineError) else str(exc)
    return StartFailed(cid, 502, f"the process engine failed to start the process: {message}")
