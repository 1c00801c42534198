"""Test a handler without the stack: :func:`run_step` runs one step's handler as a worker
would, through the worker's own executor, and returns what the engine would be told.

::

    from flowgate.testing import Completed, Failed, ThrewBpmnError, run_step

    async def test_a_valid_user_is_validated() -> None:
        told = await run_step(onboard_user, "validate-user-information", {"userId": "u-1"})
        assert told == Completed({"validated": True, ...})

    async def test_a_flaky_downstream_is_retried() -> None:
        told = await run_step(onboard_user, "call-onboarding-api", {...}, http=mock_transport)
        assert isinstance(told, Failed) and told.retries == 3

Everything a worker does to the task happens here too: input validation (a bad input is the
BPMN error ``VALIDATION_ERROR``), the step's timeout, the output's variables (only those the
task did not already hold), its retries and backoff (without jitter, so the delay is exact),
and ``StepResult``. No engine, Redis or network is needed; ``http`` lets a handler's
``ctx.http`` calls be answered by an httpx transport of the test's (``httpx.MockTransport``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

from flowgate.services.worker.context import TaskContext, task_logger
from flowgate.services.worker.executor import Executor, RetryPolicy
from flowgate.services.worker.metrics import WorkerMetrics
from flowgate.services.worker.registry import Process
from flowgate.shared.camunda import LockedTask
from flowgate.shared.contract import SystemVariables
from flowgate.shared.eventlog import EventRecord
from flowgate.shared.state import Status
from flowgate.shared.steps import StepEvent

__all__ = ["Completed", "Failed", "ThrewBpmnError", "Told", "run_step"]

_WORKER = "flowgate-testing"
#: The system variables of the run a task belongs to: fixed, so that what a step sends
#: does not change from one test run to the next.
RUN = SystemVariables("test-run", "test-batch", "test-traceability", "test-application")


@dataclass(frozen=True, slots=True)
class Completed:
    """``complete``: the variables the task sets (what it read unchanged is left out)."""

    variables: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ThrewBpmnError:
    """``bpmnError``: the code the process models (``VALIDATION_ERROR`` for a bad input)."""

    code: str
    message: str | None
    variables: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Failed:
    """``failure``: ``retries`` left (0: the engine raises an incident) and the delay before
    the next attempt."""

    message: str
    retries: int
    retry_timeout_ms: int


Told = Completed | ThrewBpmnError | Failed


async def run_step(
    process: Process,
    step: str,
    variables: Mapping[str, Any],
    *,
    config: object = None,
    retries: int | None = None,
    http: httpx.AsyncBaseTransport | None = None,
    worker_retries: int = 3,
    worker_retry_timeout_ms: int = 1_000,
    client_deadline: datetime | None = None,
) -> Told:
    """Run ``step``'s handler of ``process`` on a task holding ``variables`` (and the system
    variables a run started through flowgate has); what the worker would tell the engine.

    ``retries`` is what the engine says is left (None: the first attempt). ``config``
    stands in for the process's config object (default: built by the process, as a worker
    does). ``worker_retries`` and ``worker_retry_timeout_ms`` are the worker's settings
    (WORKER_RETRIES, WORKER_RETRY_TIMEOUT_MS) a step without its own falls back on.
    ``client_deadline`` is when the client that started the run stops waiting (for a step
    ``with_client_deadline``).
    """
    handler = next((h for h in process.handlers if h.step.name == step), None)
    if handler is None:
        raise ValueError(f"process {process.key!r} has no handler for step {step!r}")
    task = LockedTask(
        id=str(uuid.uuid4()),
        topic_name=handler.topic,
        worker_id=_WORKER,
        process_instance_id=str(uuid.uuid4()),
        process_definition_key=process.key,
        business_key=RUN.correlation_id,
        activity_id=step,
        retries=retries,
        priority=0,
        lock_expiration_time=None,
        variables={**RUN.to_variables(), **variables},
        activity_instance_id=f"{step}:{uuid.uuid4()}",
        create_time=datetime.now(UTC),
    )
    engine = _TellingEngine()
    executor = Executor(
        camunda=engine,
        worker_id=_WORKER,
        retry=RetryPolicy(
            retries=worker_retries, first_delay_ms=worker_retry_timeout_ms, jitter=0.0
        ),
        recorder=_NoRecords(client_deadline),
        metrics=WorkerMetrics(),
    )
    async with httpx.AsyncClient(transport=http) as client:
        ctx = TaskContext(
            task=task,
            http=client,
            log=task_logger(logging.getLogger(f"flowgate.testing.{process.key}"), task),
            config=process.load_config() if config is None else config,
        )
        await executor.run(handler, ctx)
    assert engine.told is not None, "the executor always tells the engine something"
    return engine.told


@dataclass(slots=True)
class _TellingEngine:
    """Keeps the last thing the executor told the engine (a refused ``complete`` is followed
    by a ``failure``, as with a real engine; this one refuses nothing)."""

    told: Told | None = None

    async def complete(
        self, task_id: str, *, worker_id: str, variables: Mapping[str, Any] | None = None
    ) -> None:
        self.told = Completed(dict(variables or {}))

    async def handle_failure(
        self,
        task_id: str,
        *,
        worker_id: str,
        error_message: str,
        error_details: str | None = None,
        retries: int,
        retry_timeout_ms: int,
    ) -> None:
        self.told = Failed(error_message, retries, retry_timeout_ms)

    async def handle_bpmn_error(
        self,
        task_id: str,
        *,
        worker_id: str,
        error_code: str,
        error_message: str | None = None,
        variables: Mapping[str, Any] | None = None,
    ) -> None:
        self.told = ThrewBpmnError(error_code, error_message, dict(variables or {}))


class _NoRecords:
    """The run's record and audit rows are the framework's, not the handler's: not kept."""

    def __init__(self, client_deadline: datetime | None) -> None:
        self._client_deadline = client_deadline

    async def client_deadline(self, correlation_id: str) -> datetime | None:
        return self._client_deadline

    async def ready(self) -> None:
        return None

    async def finish(
        self,
        correlation_id: str,
        status: Status,
        *,
        data: Any = None,
        error: Any = None,
        event: EventRecord | None = None,
        step: StepEvent | None = None,
        cause: str | None = None,
    ) -> None:
        return None

    async def step(self, correlation_id: str, step: StepEvent, event: EventRecord) -> None:
        return None

    async def claim(self, correlation_id: str, activity_instance_id: str, worker_id: str) -> None:
        return None

    async def release(self, correlation_id: str, activity_instance_id: str, worker_id: str) -> None:
        return None

    async def record(self, event: EventRecord) -> None:
        return None
