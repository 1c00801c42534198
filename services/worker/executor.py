"""Run one locked task: validate its input, call its handler, tell the engine, log it.
(One module past 400 lines: the table below is one mapping, from what a handler did to the
one engine call and the one record it makes, and reads best beside its code.)

=============================  ============================================================
handler ...                    the engine is told
=============================  ============================================================
returns                        ``complete`` with the output (what is not the value the
                               task read already); on a step that finishes the run, the
                               run then ends with that output
raises BusinessRuleError       ``bpmnError`` (its code; errorCode/errorMessage/errorType)
input fails validation         ``bpmnError`` ``VALIDATION_ERROR``
raises anything else           ``failure``, retries counted down, retryTimeout doubling
                               (with jitter); at 0 the engine raises an incident and the
                               run ends ``error`` at once
runs past its step's timeout   as "raises anything else", or ``bpmnError`` with the step's
                               ``timeout_error`` code (errorType ``TIMEOUT``)
=============================  ============================================================

A plain ``def`` handler runs in the worker's thread pool; everything else is the same.

This module is where a run is ended by its steps: only here, and only after the engine
has accepted what ends it (shared/store/runs.py ``finish``).

How the engine's answer to that call is read: 404 means the task is gone (cancelled or
done elsewhere) and 400 "locked by worker" means another worker owns it:
both drop the result. Optimistic locking, deadlocks and an unreachable engine are retried
(the engine rolled back, so repeating is safe). Any other refusal of ``complete`` (a
variable the engine cannot store, a listener that failed) becomes a ``failure``.

Every outcome the engine accepted gets one event-log row, written after the engine's answer
so the log never claims what did not happen.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import functools
import logging
import random
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError

from flowgate.services.worker.context import TaskContext
from flowgate.services.worker.metrics import WorkerMetrics
from flowgate.services.worker.registry import (
    IDENTIFIER_FIELDS,
    BusinessRuleError,
    Handler,
    Step,
    StepResult,
)
from flowgate.shared.aio import Backoff
from flowgate.shared.camunda import (
    BadRequest,
    CamundaError,
    EngineError,
    EngineUnavailable,
    LockedTask,
    NotFound,
)
from flowgate.shared.contract import correlation_id_of, system_value
from flowgate.shared.eventlog import EventRecord
from flowgate.shared.state import Status
from flowgate.shared.steps import StepEvent, StepStatus
from flowgate.shared.tracing import OFF, TRACEPARENT, Tracing, valid_traceparent

log = logging.getLogger(__name__)

#: complete/failure/bpmnError are tried this often on retryable answers.
ENGINE_CALL_ATTEMPTS = 5
VALIDATION_ERROR = "VALIDATION_ERROR"
#: The ``errorType`` of the BPMN error a step's ``timeout_error`` throws.
TIMEOUT_ERROR = "TIMEOUT"
#: The activity type a worker knows its steps by (the engine's history says which kind).
EXTERNAL_TASK = "externalTask"


class Outcome(StrEnum):
    COMPLETED = "completed"
    BPMN_ERROR = "bpmn_error"
    FAILED = "failed"  # a retry is scheduled
    INCIDENT = "incident"  # no retries left
    GONE = "gone"  # 404: cancelled or finished elsewhere
    LOCK_LOST = "lock_lost"  # another worker holds the task now
    UNREPORTED = "unreported"  # the engine could not be told; the lock will expire
    ABANDONED = "abandoned"  # unlocked at shutdown


@dataclass(frozen=True, slots=True)
class _Row:
    """The event-log fields every row of one task shares."""

    handler: Handler
    task: LockedTask
    started: float

    def step(self, status: StepStatus, *, data: Any = None, error: Any = None) -> StepEvent:
        """The step event of this task's activity instance."""
        task = self.task
        return StepEvent(
            step=self.handler.step.name,
            status=status,
            activity_id=task.activity_id,
            # Redelivered tasks keep their activity instance; a task without one (an old
            # engine) is still one step.
            activity_instance_id=task.activity_instance_id or task.id,
            activity_type=EXTERNAL_TASK,
            at=datetime.now(UTC),
            data=data,
            error=error,
        )

    def record(self, status: str, **fields: Any) -> EventRecord:
        variables, step = self.task.variables, self.handler.step
        return EventRecord(
            correlation_id=correlation_id_of(self.task) or "",
            status=status,
            step=self.handler.number,
            step_name=step.name,
            process_name=self.handler.process.key,
            http_method=step.http_method,
            endpoint=step.endpoint,
            batch_id=system_value(variables, "batch_id"),
            traceability_id=system_value(variables, "traceability_id"),
            application_id=system_value(variables, "application_id"),
            target_system=self.handler.process.target_system,
            originating_system=self.handler.process.originating_system,
            execution_time=int((time.monotonic() - self.started) * 1000),
            **fields,
        )


class TaskEngine(Protocol):
    """What the executor tells the engine: a :class:`CamundaClient`, or the test kit's
    recording stand-in (flowgate/testing.py)."""

    async def complete(
        self, task_id: str, *, worker_id: str, variables: Mapping[str, Any] | None = None
    ) -> None: ...

    async def handle_failure(
        self,
        task_id: str,
        *,
        worker_id: str,
        error_message: str,
        error_details: str | None = None,
        retries: int,
        retry_timeout_ms: int,
    ) -> None: ...

    async def handle_bpmn_error(
        self,
        task_id: str,
        *,
        worker_id: str,
        error_code: str,
        error_message: str | None = None,
        variables: Mapping[str, Any] | None = None,
    ) -> None: ...


class RunRecorder(Protocol):
    """Where the executor records what happened (services/worker/recorder.py)."""

    async def ready(self) -> None: ...

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
    ) -> None: ...

    async def step(self, correlation_id: str, step: StepEvent, event: EventRecord) -> None: ...

    async def claim(
        self, correlation_id: str, activity_instance_id: str, worker_id: str
    ) -> None: ...

    async def release(
        self, correlation_id: str, activity_instance_id: str, worker_id: str
    ) -> None: ...

    async def record(self, event: EventRecord) -> None: ...

    async def client_deadline(self, correlation_id: str) -> datetime | None: ...


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How failures are retried (WORKER_RETRIES, WORKER_RETRY_TIMEOUT_MS; a step's own
    ``retries`` and ``retry_backoff_ms`` override them)."""

    #: Re-tries after the first failure: 3 means 4 attempts, 0 an incident at once.
    retries: int = 3
    #: Delay before the first retry; doubles with every further failure.
    first_delay_ms: int = 1_000
    max_delay_ms: int = 300_000
    #: Each delay is drawn within this fraction of it, so the tasks one outage failed
    #: together do not all come back at the same instant.
    jitter: float = 0.2

    def delay_ms(self, failures_before: int) -> int:
        delay = min(self.max_delay_ms, self.first_delay_ms * 2 ** max(failures_before, 0))
        return int(delay * random.uniform(1 - self.jitter, 1 + self.jitter))

    def for_step(self, step: Step) -> RetryPolicy:
        if step.retries is None and step.retry_backoff_ms is None:
            return self
        return dataclasses.replace(
            self,
            retries=self.retries if step.retries is None else step.retries,
            first_delay_ms=step.retry_backoff_ms or self.first_delay_ms,
        )


class HandlerTimeout(Exception):
    """The handler ran past ``ctx.deadline`` and was stopped; ``client_gone``: a step
    ``with_client_deadline`` not started, its client having stopped waiting."""

    def __init__(self, message: str, *, client_gone: bool = False) -> None:
        super().__init__(message)
        self.client_gone = client_gone


@dataclass(slots=True)
class Executor:
    camunda: TaskEngine
    worker_id: str
    retry: RetryPolicy
    recorder: RunRecorder
    metrics: WorkerMetrics
    #: Where synchronous handlers run (WORKER_THREADS); None: the loop's default pool.
    threads: concurrent.futures.Executor | None = None
    #: A span per task, a child of its run's trace (shared/tracing.py; off: nothing).
    tracing: Tracing = OFF

    async def run(
        self,
        handler: Handler,
        ctx: TaskContext[Any],
        slot: contextlib.AbstractAsyncContextManager[Any] | None = None,
    ) -> Outcome:
        """Run the task to an outcome; raises only CancelledError (shutdown). The handler
        runs inside ``slot`` (the worker's concurrency); reporting its outcome does not
        hold one, so engine round trips do not keep business logic waiting."""
        row = _Row(handler, ctx.task, time.monotonic())
        task = ctx.task
        try:
            with self.tracing.span(
                f"handle {handler.topic}",
                parent=valid_traceparent(task.variables.get(TRACEPARENT)),
                kind="consumer",
                attributes={
                    "flowgate.topic": handler.topic,
                    "flowgate.process": task.process_definition_key,
                    "flowgate.activity": task.activity_id,
                },
            ):
                return await self._run(handler, ctx, row, slot or contextlib.nullcontext())
        except CamundaError as exc:
            # Even the fallback failure report did not get through: the lock expires and
            # the task is fetched again, so nothing is lost but time.
            ctx.log.error("could not report the outcome to the engine: %s", exc)
            return Outcome.UNREPORTED

    async def _run(
        self,
        handler: Handler,
        ctx: TaskContext[Any],
        row: _Row,
        slot: contextlib.AbstractAsyncContextManager[Any],
    ) -> Outcome:
        try:
            data = handler.input_model.model_validate(ctx.task.variables)
        except ValidationError as exc:
            problems = exc.errors(include_url=False, include_input=False)
            rule = BusinessRuleError(
                VALIDATION_ERROR,
                f"Input validation failed: {_summary(exc)}",
                error_type=VALIDATION_ERROR,
                details={"errors": problems},
            )
            return await self._bpmn_error(ctx, row, rule, request=ctx.task.variables)

        topic = handler.topic
        stopped = await self._set_deadline(handler, ctx)
        if stopped is not None and stopped.client_gone:
            return await self._timed_out(ctx, row, stopped, request=_dump(data))
        try:
            async with slot:
                with self.metrics.handler_seconds.labels(topic).time():
                    raw = await self._call_handler(handler, data, ctx, stopped)
            output = _output(raw)
        except BusinessRuleError as exc:
            return await self._bpmn_error(ctx, row, exc, request=_dump(data))
        except HandlerTimeout as exc:
            self.metrics.handler_timeouts.labels(topic).inc()
            return await self._timed_out(ctx, row, exc, request=_dump(data))
        except Exception as exc:  # any handler bug or outage: the engine's retry mechanism
            ctx.log.warning("handler failed: %s", exc, exc_info=True)
            return await self._failure(ctx, row, exc, request=_dump(data))

        try:
            answer = await self._call_ending_step(
                "complete",
                lambda: self.camunda.complete(
                    ctx.task.id,
                    worker_id=self.worker_id,
                    variables=changed(ctx.task.variables, output.variables),
                ),
                ctx,
            )
        except EngineError as exc:
            ctx.log.warning("engine refused the completion: %s", exc)
            return await self._failure(ctx, row, exc, request=_dump(data))
        if answer is not None:
            return answer
        event = row.record(
            "success",
            request_data=_dump(data),
            response_data=output.variables,
            identifiers=_identifiers(ctx.task.variables, output.variables),
            result=handler.step.success,
            http_status_code=output.http_status_code or 200,
        )
        step = row.step(StepStatus.OK, data=output.variables)
        if handler.step.finishes_run:
            status = Status.OK if output.run_error is None else Status.ERROR
            await self._finish_run(
                ctx, status, data=output.variables, error=output.run_error, event=event, step=step
            )
        else:
            await self._record_step(ctx, step, event)
        return Outcome.COMPLETED

    async def _set_deadline(self, handler: Handler, ctx: TaskContext[Any]) -> HandlerTimeout | None:
        """Set ``ctx.deadline``; what stops the handler when it passes (``client_gone``: it
        has passed, the step must not start)."""
        step, now = handler.step, datetime.now(UTC)
        stopped = None
        if step.timeout_ms is not None:
            ctx.deadline = now + timedelta(milliseconds=step.timeout_ms)
            stopped = HandlerTimeout(
                f"handler of {step.name!r} stopped at its timeout of {step.timeout_ms} ms"
            )
        if not step.with_client_deadline or ctx.correlation_id is None:
            return stopped
        client = await self.recorder.client_deadline(ctx.correlation_id)
        if client is None or (ctx.deadline is not None and ctx.deadline <= client):
            return stopped
        if client <= now:
            return HandlerTimeout(
                f"the client that started the run stopped waiting at {client.isoformat()},"
                f" before {step.name!r} started",
                client_gone=True,
            )
        ctx.deadline = client
        return HandlerTimeout(
            f"handler of {step.name!r} stopped when the client waiting for its run stopped"
        )

    async def _timed_out(
        self, ctx: TaskContext[Any], row: _Row, exc: HandlerTimeout, *, request: Any
    ) -> Outcome:
        """A step out of time: its ``timeout_error``, else a failure (retried, unless its
        client has gone: then an incident at once)."""
        ctx.log.warning("%s", exc)
        declared = row.handler.step
        if declared.timeout_error is not None:
            rule = BusinessRuleError(declared.timeout_error, str(exc), error_type=TIMEOUT_ERROR)
            return await self._bpmn_error(ctx, row, rule, request=request)
        return await self._failure(ctx, row, exc, request=request, retry=not exc.client_gone)

    async def _call_handler(
        self,
        handler: Handler,
        data: BaseModel,
        ctx: TaskContext[Any],
        stopped: HandlerTimeout | None,
    ) -> Any:
        """The handler's return value; ``stopped`` raised past ``ctx.deadline`` (an async
        handler is cancelled, a synchronous one abandoned to its thread)."""
        args = (data, ctx) if handler.takes_context else (data,)
        if handler.blocking:
            loop = asyncio.get_running_loop()
            call = functools.partial(contextvars.copy_context().run, handler.fn, *args)
            pending: Awaitable[Any] = loop.run_in_executor(self.threads, call)
        else:
            pending = handler.fn(*args)
        timer = asyncio.timeout(ctx.remaining_s())
        try:
            async with timer:
                return await pending
        except TimeoutError:
            if not timer.expired() or stopped is None:
                raise  # the handler's own
            raise stopped from None

    async def _bpmn_error(
        self, ctx: TaskContext[Any], row: _Row, error: BusinessRuleError, *, request: Any
    ) -> Outcome:
        variables = {
            "errorCode": error.code,
            "errorMessage": error.message,
            "errorType": error.error_type,
        }
        try:
            answer = await self._call_ending_step(
                "bpmnError",
                lambda: self.camunda.handle_bpmn_error(
                    ctx.task.id,
                    worker_id=self.worker_id,
                    error_code=error.code,
                    error_message=error.message,
                    variables=variables,
                ),
                ctx,
            )
        except EngineError as exc:
            ctx.log.warning("engine refused the BPMN error: %s", exc)
            return await self._failure(ctx, row, exc, request=request)
        if answer is not None:
            return answer
        ctx.log.info("business error %s: %s", error.code, error.message)
        event = row.record(
            "error",
            request_data=request,
            response_data={"error": error.message},
            error_message=error.message,
            identifiers=_identifiers(ctx.task.variables, {}),
            result=row.handler.step.error,
            metadata={"errorCode": error.code, "errorType": error.error_type, **error.details},
            http_status_code=422 if error.error_type == VALIDATION_ERROR else 400,
        )
        await self._record_step(ctx, row.step(StepStatus.ERROR, error=error.message), event)
        return Outcome.BPMN_ERROR

    async def _failure(
        self,
        ctx: TaskContext[Any],
        row: _Row,
        error: Exception,
        *,
        request: Any,
        retry: bool = True,
    ) -> Outcome:
        task, policy = ctx.task, self.retry.for_step(row.handler.step)
        configured = policy.retries
        # ``retries`` is null until the first failure; then the engine holds what we sent
        # (``configured`` after the first failure, one less after each further one).
        retries = configured if task.retries is None else max(task.retries - 1, 0)
        if not retry:
            retries = 0
        failures_before = 0 if task.retries is None else max(configured - task.retries + 1, 0)
        timeout_ms = policy.delay_ms(failures_before)
        message = f"{type(error).__name__}: {error}"
        # The last failure raises an incident, which ends the run: a report that ends the
        # step, claimed like one so that this worker's end (with the step's own error)
        # comes before the watcher's of the same incident (services/background/watcher.py).
        report = self._call_ending_step if not retries else self._call
        answer = await report(
            "failure",
            lambda: self.camunda.handle_failure(
                task.id,
                worker_id=self.worker_id,
                error_message=message,
                error_details="".join(traceback.format_exception(error)),
                retries=retries,
                retry_timeout_ms=timeout_ms if retries else 0,
            ),
            ctx,
        )
        if answer is not None:
            return answer
        step = row.handler.step
        event = row.record(
            "retry" if retries else "incident",
            request_data=request,
            response_data={"error": message},
            error_message=message,
            identifiers=_identifiers(task.variables, {}),
            result=step.error,
            metadata={"retriesLeft": retries, "retryTimeoutMs": timeout_ms if retries else 0},
            http_status_code=500,
        )
        if retries:
            self.metrics.retries.labels(row.handler.topic).inc()
            await self.recorder.record(event)
            return Outcome.FAILED
        # The engine now shows an incident; the client must not wait for a run that will
        # not go on until someone resolves it.
        ctx.log.error("retries exhausted, incident raised: %s", message)
        client_error = f"{step.error}: {error}"
        failed = row.step(StepStatus.ERROR, error=client_error)
        await self._finish_run(ctx, Status.ERROR, error=client_error, event=event, step=failed)
        return Outcome.INCIDENT

    async def _call_ending_step(
        self, name: str, call: Callable[[], Awaitable[None]], ctx: TaskContext[Any]
    ) -> Outcome | None:
        """:meth:`_call` for a report that ends the task's step: the step is claimed first,
        so that this worker records it (with its data and audit row) although the engine's
        report of it may reach flowgate first; a refused report gives the claim up."""
        cid, activity_instance_id = ctx.correlation_id, ctx.task.activity_instance_id
        if cid is None or activity_instance_id is None:
            return await self._call(name, call, ctx)
        await self.recorder.ready()
        await self.recorder.claim(cid, activity_instance_id, self.worker_id)
        accepted = False
        try:
            answer = await self._call(name, call, ctx)
            accepted = answer is None
            return answer
        finally:
            if not accepted:
                await self.recorder.release(cid, activity_instance_id, self.worker_id)

    async def _call(
        self, name: str, call: Callable[[], Awaitable[None]], ctx: TaskContext[Any]
    ) -> Outcome | None:
        """``None`` once the engine accepted; GONE/LOCK_LOST when it dropped the task.

        Raises :class:`EngineError` for a refusal that repeating cannot fix, and
        :class:`EngineUnavailable` when the engine stayed unreachable.
        """
        # The engine hears of nothing that could not be recorded (services/worker/recorder.py).
        await self.recorder.ready()
        with self.tracing.span(f"camunda {name}", kind="client"):
            return await self._call_engine(name, call, ctx)

    async def _call_engine(
        self, name: str, call: Callable[[], Awaitable[None]], ctx: TaskContext[Any]
    ) -> Outcome | None:
        backoff = Backoff(base_s=0.1, cap_s=2.0)
        for attempt in range(1, ENGINE_CALL_ATTEMPTS + 1):
            try:
                await call()
                return None
            except NotFound:
                ctx.log.info("%s: the task no longer exists; result dropped", name)
                return Outcome.GONE
            except BadRequest as exc:
                if "locked by worker" not in exc.message:
                    raise
                ctx.log.warning("%s: another worker holds the task; result dropped", name)
                if not ctx.lock_lost.is_set():
                    ctx.lock_lost.set()
                    self.metrics.lock_lost.labels(ctx.task.topic_name).inc()
                return Outcome.LOCK_LOST
            except EngineError as exc:
                if (
                    not (exc.is_optimistic_locking or exc.is_deadlock)
                    or attempt == ENGINE_CALL_ATTEMPTS
                ):
                    raise
            except EngineUnavailable:
                if attempt == ENGINE_CALL_ATTEMPTS:
                    raise
            self.metrics.engine_call_retries.labels(name).inc()
            await asyncio.sleep(backoff.next_delay_s())
        raise AssertionError("unreachable")  # the loop returns or raises

    async def _finish_run(
        self,
        ctx: TaskContext[Any],
        status: Status,
        *,
        data: Any = None,
        error: Any = None,
        event: EventRecord,
        step: StepEvent,
    ) -> None:
        """End the task's run with ``event``, its audit row, and ``step`` (a run that has
        ended already stays as it is; a task of no run only gets the row)."""
        if ctx.correlation_id is None:
            ctx.log.warning("this step ends a run, but the task names none")
            await self.recorder.record(event)
            return
        await self.recorder.finish(
            ctx.correlation_id,
            status,
            data=data,
            error=error,
            event=event,
            step=step,
            cause=self.tracing.traceparent(),  # the handler's span, for the wake's link
        )

    async def _record_step(
        self, ctx: TaskContext[Any], step: StepEvent, event: EventRecord
    ) -> None:
        """The step in its run's record, with its audit row (only the row without a run)."""
        if ctx.correlation_id is None:
            await self.recorder.record(event)
        else:
            await self.recorder.step(ctx.correlation_id, step, event)


@dataclass(frozen=True, slots=True)
class _Output:
    variables: dict[str, Any]
    http_status_code: int | None = None
    run_error: Any = None


def _output(raw: object) -> _Output:
    """The handler's return value as variables (and what a StepResult adds)."""
    result = raw if isinstance(raw, StepResult) else StepResult(raw)
    data = result.data
    if data is None:
        variables: dict[str, Any] = {}
    elif isinstance(data, BaseModel):
        variables = data.model_dump(by_alias=True, exclude_none=True)
    elif isinstance(data, Mapping):
        # None would erase a variable an earlier step set: leave those untouched (seed).
        variables = {str(k): v for k, v in data.items() if v is not None}
    else:
        raise TypeError(
            f"a handler returns a pydantic model, a mapping or None, not {type(data)!r}"
        )
    return _Output(variables, result.http_status_code, result.error)


def _identifiers(variables: Mapping[str, Any], output: Mapping[str, Any]) -> dict[str, Any]:
    """An audit row's ``{applicationId, ...}``: the start's, with the business ids the run
    holds or the step produced (seed: "use business identifiers when available"). Made
    here for each row, not kept in the engine's ``identifiers`` variable: rewriting that
    Json variable cost the engine a runtime update, a history row and two byte arrays."""
    identifiers: dict[str, Any] = {}
    if application_id := variables.get("application_id"):
        identifiers["applicationId"] = application_id
    for name in IDENTIFIER_FIELDS:
        if value := output.get(name) or variables.get(name):
            identifiers[name] = value
    return identifiers


def changed(current: Mapping[str, Any], output: Mapping[str, Any]) -> dict[str, Any]:
    """The variables of ``output`` that are not already what the task read (``current``,
    its fetched variables): setting a variable to its value again changes nothing in the
    run, but costs the engine a runtime update, a history row and, for a Json value, two
    byte arrays. A variable the task did not fetch is always sent."""
    return {
        name: value
        for name, value in output.items()
        if name not in current or not _same(current[name], value)
    }


def _same(a: Any, b: Any) -> bool:
    """Equal as the engine would store them: ``True`` is not ``1``, nor ``1.0`` ``1``."""
    return type(a) is type(b) and a == b


def _dump(data: BaseModel) -> dict[str, Any]:
    return data.model_dump(mode="json", by_alias=True)


def _summary(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'input'}: {e['msg']}" for e in exc.errors()
    )
