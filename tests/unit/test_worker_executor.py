"""Outcome mapping: handler result -> engine call -> event row, over a scripted engine."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from pydantic import BaseModel

from flowgate.services.worker.context import TaskContext, task_logger
from flowgate.services.worker.executor import Executor, Outcome, RetryPolicy
from flowgate.services.worker.metrics import WorkerMetrics
from flowgate.services.worker.registry import BusinessRuleError, Handler, Process, Step, StepResult
from flowgate.shared.camunda import CamundaClient, LockedTask
from flowgate.shared.state import Status
from tests.helpers.engine import FakeEngine, engine_error, locked_task
from tests.helpers.worker import RecordedRuns


class In(BaseModel):
    userId: str


class Out(BaseModel):
    userId: str
    customerId: str | None = None
    note: str | None = None


class Harness:
    def __init__(self, engine: FakeEngine, camunda: CamundaClient) -> None:
        self.engine = engine
        self.runs = RecordedRuns()
        self.rows = self.runs.rows
        self.metrics = WorkerMetrics()
        self.executor = Executor(
            camunda=camunda,
            worker_id="w1",
            retry=RetryPolicy(retries=3, first_delay_ms=1_000, jitter=0.0),
            recorder=self.runs,
            metrics=self.metrics,
        )

    async def run(self, handler: Handler, task: LockedTask) -> Outcome:
        async with httpx.AsyncClient() as http:
            ctx = TaskContext(
                task=task,
                http=http,
                log=task_logger(logging.getLogger("test"), task),
                config=None,
            )
            return await self.executor.run(handler, ctx)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    engine = FakeEngine()
    async with engine.client() as camunda:
        yield Harness(engine, camunda)


def handler_for(fn: Any, *, finishes_run: bool = False, **options: Any) -> Handler:
    step = Step("work", success="Worked", error="Work failed", finishes_run=finishes_run, **options)
    process = Process("p", [step])
    process.handler("work")(fn)
    return process.handlers[0]


async def test_a_return_completes_with_its_output_and_its_row_names_the_business_ids(
    harness: Harness,
) -> None:
    async def work(data: In) -> StepResult[Out]:
        return StepResult(Out(userId=data.userId, customerId="c-9"), http_status_code=201)

    outcome = await harness.run(handler_for(work), locked_task(userId="u1"))

    assert outcome is Outcome.COMPLETED
    [(action, body)] = harness.engine.calls()
    assert action == "complete"
    assert body["workerId"] == "w1"
    assert body["variables"]["customerId"] == {"type": "String", "value": "c-9"}
    assert "userId" not in body["variables"]  # what the task read already: nothing to write
    assert "note" not in body["variables"]  # None leaves earlier values alone
    assert "identifiers" not in body["variables"]  # the start's; the row holds the rest
    [row] = harness.rows
    assert row.identifiers == {"applicationId": "app-1", "userId": "u1", "customerId": "c-9"}
    assert (row.status, row.step, row.result, row.http_status_code) == ("success", 1, "Worked", 201)
    assert (row.correlation_id, row.traceability_id, row.batch_id) == (
        "cid-1",
        "trace-1",
        "batch-1",
    )


class Flags(BaseModel):
    userId: str
    score: int
    vip: bool


async def test_only_what_changed_is_written_to_the_engine(harness: Harness) -> None:
    async def work(data: Flags) -> dict[str, Any]:
        return {"userId": data.userId, "score": 2, "vip": 1, "new": "yes"}

    task = locked_task(
        userId="u1", score=1, vip=True, identifiers={"applicationId": "app-1", "userId": "u1"}
    )
    assert await harness.run(handler_for(work), task) is Outcome.COMPLETED
    [(_, body)] = harness.engine.calls()
    # userId unchanged; score changed; vip is now an Integer, not the Boolean it was.
    assert set(body["variables"]) == {"score", "vip", "new"}
    assert body["variables"]["vip"] == {"type": "Integer", "value": 1}
    # The step still says everything the handler returned.
    assert harness.rows[0].response_data == {"userId": "u1", "score": 2, "vip": 1, "new": "yes"}


async def test_a_business_rule_error_is_a_bpmn_error_with_the_seed_variables(
    harness: Harness,
) -> None:
    async def work(data: In) -> None:
        raise BusinessRuleError("NOT_ALLOWED", "no onboarding today")

    assert await harness.run(handler_for(work), locked_task(userId="u1")) is Outcome.BPMN_ERROR
    [(action, body)] = harness.engine.calls()
    assert (action, body["errorCode"], body["errorMessage"]) == (
        "bpmnError",
        "NOT_ALLOWED",
        "no onboarding today",
    )
    assert {k: v["value"] for k, v in body["variables"].items()} == {
        "errorCode": "NOT_ALLOWED",
        "errorMessage": "no onboarding today",
        "errorType": "BUSINESS_RULE_ERROR",
    }
    assert (harness.rows[0].status, harness.rows[0].http_status_code) == ("error", 400)


async def test_invalid_input_is_a_validation_error_and_the_handler_never_runs(
    harness: Harness,
) -> None:
    async def work(data: In) -> None:
        raise AssertionError("must not run")

    assert await harness.run(handler_for(work), locked_task()) is Outcome.BPMN_ERROR
    [(_, body)] = harness.engine.calls()
    assert body["errorCode"] == "VALIDATION_ERROR"
    assert body["errorMessage"].startswith("Input validation failed: userId")
    assert harness.rows[0].http_status_code == 422


@pytest.mark.parametrize(
    ("task_retries", "sent_retries", "sent_timeout_ms", "outcome"),
    [
        (None, 3, 1_000, Outcome.FAILED),  # first failure: WORKER_RETRIES re-tries left
        (3, 2, 2_000, Outcome.FAILED),  # the retryTimeout doubles with each failure
        (2, 1, 4_000, Outcome.FAILED),
        (1, 0, 0, Outcome.INCIDENT),  # last one: incident, and the client is told
    ],
)
async def test_an_exception_is_a_failure_counting_retries_down(
    harness: Harness,
    task_retries: int | None,
    sent_retries: int,
    sent_timeout_ms: int,
    outcome: Outcome,
) -> None:
    async def work(data: In) -> None:
        raise ConnectionError("backend down")

    assert await harness.run(handler_for(work), locked_task(task_retries, userId="u")) is outcome
    [(action, body)] = harness.engine.calls()
    assert action == "failure"
    assert (body["retries"], body["retryTimeout"]) == (sent_retries, sent_timeout_ms)
    assert body["errorMessage"] == "ConnectionError: backend down"
    assert "Traceback" in body["errorDetails"]
    if outcome is Outcome.INCIDENT:
        assert harness.runs.finished == [("cid-1", Status.ERROR, None, "Work failed: backend down")]
        assert harness.rows[0].status == "incident"
    else:
        assert harness.runs.finished == []
        assert harness.rows[0].status == "retry"


async def ok(data: In) -> dict[str, Any]:
    return {"done": True}


async def test_a_steps_own_retries_and_backoff_replace_the_workers(harness: Harness) -> None:
    async def work(data: In) -> None:
        raise ConnectionError("backend down")

    handler = handler_for(work, retries=1, retry_backoff_ms=250)
    assert await harness.run(handler, locked_task(None, userId="u")) is Outcome.FAILED
    assert await harness.run(handler, locked_task(1, userId="u")) is Outcome.INCIDENT
    first, last = harness.engine.bodies("failure")
    assert (first["retries"], first["retryTimeout"]) == (1, 250)
    assert (last["retries"], last["retryTimeout"]) == (0, 0)


def test_retry_delays_are_jittered_within_their_bound() -> None:
    policy = RetryPolicy(retries=3, first_delay_ms=1_000, jitter=0.2)
    delays = {policy.delay_ms(1) for _ in range(200)}
    assert min(delays) >= 1_600
    assert max(delays) <= 2_400
    assert len(delays) > 10, "not one fixed delay"


async def test_a_hung_async_handler_is_cancelled_at_its_timeout_and_retried(
    harness: Harness,
) -> None:
    cancelled = asyncio.Event()

    async def hangs(data: In) -> None:
        try:
            await asyncio.sleep(60)
        finally:
            cancelled.set()

    handler = handler_for(hangs, timeout_ms=50)
    assert await harness.run(handler, locked_task(None, userId="u")) is Outcome.FAILED
    assert cancelled.is_set()
    [body] = harness.engine.bodies("failure")
    assert (
        body["errorMessage"] == "HandlerTimeout: handler of 'work' stopped at its timeout of 50 ms"
    )
    assert body["retries"] == 3
    timeouts = harness.metrics.registry.get_sample_value(
        "flowgate_worker_handler_timeouts_total", {"topic": "p.work"}
    )
    assert timeouts == 1


async def test_a_blocking_handler_past_its_timeout_is_abandoned_and_its_bpmn_error_thrown(
    harness: Harness,
) -> None:
    release = threading.Event()

    def blocks(data: In) -> dict[str, bool]:
        release.wait(5)
        return {"late": True}

    handler = handler_for(blocks, timeout_ms=50, timeout_error="TOO_SLOW")
    try:
        assert await harness.run(handler, locked_task(None, userId="u")) is Outcome.BPMN_ERROR
    finally:
        release.set()
    [(action, body)] = harness.engine.calls()
    assert (action, body["errorCode"]) == ("bpmnError", "TOO_SLOW")
    assert body["variables"]["errorType"]["value"] == "TIMEOUT"


async def test_a_blocking_handler_runs_off_the_loop(harness: Harness) -> None:
    def blocking(data: In) -> dict[str, str]:
        time.sleep(0.2)  # the loop would stall this long if it ran there
        return {"thread": threading.current_thread().name}

    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        assert await harness.run(handler_for(blocking), locked_task(userId="u")) is (
            Outcome.COMPLETED
        )
    finally:
        ticker.cancel()
    assert ticks >= 10, "the loop kept running while the handler blocked"
    [body] = harness.engine.bodies("complete")
    assert body["variables"]["thread"]["value"] != threading.main_thread().name


async def test_complete_on_a_gone_task_drops_the_result(harness: Harness) -> None:
    harness.engine.answer("complete", engine_error(404, "External task with id x does not exist"))
    assert await harness.run(handler_for(ok), locked_task(userId="u")) is Outcome.GONE
    assert harness.engine.actions() == ["complete"]
    assert harness.rows == []
    # Its step was claimed for this worker to record, and is given up: the engine's report
    # of what became of it (a cancelled step) is recorded instead.
    assert harness.runs.released == ["work:1"]
    assert harness.runs.claimed == set()


async def test_a_step_is_claimed_before_the_engine_hears_of_it_and_recorded_after(
    harness: Harness,
) -> None:
    claimed_when_sent: list[set[str]] = []

    async def complete(request: httpx.Request, body: Any) -> httpx.Response:
        claimed_when_sent.append(set(harness.runs.claimed))
        return httpx.Response(204)

    harness.engine.routes["complete"] = complete

    assert await harness.run(handler_for(ok), locked_task(userId="u")) is Outcome.COMPLETED

    assert claimed_when_sent == [{"work:1"}]
    assert [step.activity_instance_id for step in harness.runs.steps] == ["work:1"]
    assert harness.runs.claimed == set()
    assert harness.runs.released == []


async def test_complete_on_a_task_another_worker_locked_drops_the_result(
    harness: Harness,
) -> None:
    harness.engine.answer(
        "complete",
        engine_error(400, "External Task x cannot be completed by worker 'w1'. "
                     "It is locked by worker 'w2'."),
    )  # fmt: skip
    assert await harness.run(handler_for(ok), locked_task(userId="u")) is Outcome.LOCK_LOST
    assert harness.engine.actions() == ["complete"]
    assert (
        harness.metrics.registry.get_sample_value(
            "flowgate_worker_lock_lost_total", {"topic": "p.work"}
        )
        == 1
    )


async def test_optimistic_locking_and_deadlocks_repeat_the_complete(harness: Harness) -> None:
    harness.engine.answer(
        "complete",
        engine_error(500, "OptimisticLockingException", code=1),
        engine_error(500, "deadlock", code=10000),
    )
    assert await harness.run(handler_for(ok), locked_task(userId="u")) is Outcome.COMPLETED
    assert harness.engine.actions() == ["complete", "complete", "complete"]
    assert len(harness.rows) == 1


async def test_a_complete_the_engine_refuses_becomes_a_failure(harness: Harness) -> None:
    harness.engine.answer("complete", engine_error(400, "Cannot convert value to java type"))
    assert await harness.run(handler_for(ok), locked_task(userId="u")) is Outcome.FAILED
    assert harness.engine.actions() == ["complete", "failure"]


async def test_a_step_that_finishes_the_run_ends_it_after_the_engine_accepted(
    harness: Harness,
) -> None:
    async def work(data: In) -> Out:
        assert harness.runs.finished == []
        return Out(userId=data.userId, customerId="c-1")

    handler = handler_for(work, finishes_run=True)
    assert await harness.run(handler, locked_task(userId="u1")) is Outcome.COMPLETED
    assert harness.engine.actions() == ["complete"]
    assert harness.runs.finished == [
        ("cid-1", Status.OK, {"userId": "u1", "customerId": "c-1"}, None)
    ]


async def test_a_finishing_step_may_end_the_run_as_an_error(harness: Harness) -> None:
    async def work(data: In) -> StepResult[dict[str, Any]]:
        return StepResult({"checked": True}, error="Background check failed")

    assert await harness.run(handler_for(work, finishes_run=True), locked_task(userId="u")) is (
        Outcome.COMPLETED
    )
    assert harness.runs.finished == [
        ("cid-1", Status.ERROR, {"checked": True}, "Background check failed")
    ]


async def test_a_finishing_step_the_engine_dropped_does_not_end_the_run(harness: Harness) -> None:
    harness.engine.answer("complete", engine_error(404, "External task with id x does not exist"))
    assert await harness.run(handler_for(ok, finishes_run=True), locked_task(userId="u")) is (
        Outcome.GONE
    )
    assert harness.runs.finished == []


async def test_an_ordinary_step_never_ends_the_run(harness: Harness) -> None:
    assert await harness.run(handler_for(ok), locked_task(userId="u")) is Outcome.COMPLETED
    assert harness.runs.finished == []


async def test_a_step_for_a_waiting_client_does_not_start_once_its_client_has_gone(
    harness: Harness,
) -> None:
    ran = False

    async def sends_a_code(data: In) -> None:
        nonlocal ran
        ran = True

    harness.runs.client_gives_up_at = datetime.now(UTC) - timedelta(seconds=1)
    handler = handler_for(sends_a_code, with_client_deadline=True)
    assert await harness.run(handler, locked_task(None, userId="u")) is Outcome.INCIDENT
    assert not ran
    [body] = harness.engine.bodies("failure")
    assert body["retries"] == 0, "no retry: its client will not come back for it"
    assert "stopped waiting" in body["errorMessage"]


async def test_the_context_deadline_is_the_earlier_of_timeout_and_client(
    harness: Harness,
) -> None:
    seen: list[float | None] = []

    async def waits(data: In, ctx: TaskContext[None]) -> None:
        seen.append(ctx.remaining_s())
        await asyncio.sleep(5)

    harness.runs.client_gives_up_at = datetime.now(UTC) + timedelta(milliseconds=200)
    handler = handler_for(waits, with_client_deadline=True, timeout_ms=10_000)
    assert await harness.run(handler, locked_task(None, userId="u")) is Outcome.FAILED
    [remaining] = seen
    assert remaining is not None
    assert 0 < remaining <= 0.2
    [body] = harness.engine.bodies("failure")
    assert "when the client waiting for its run stopped" in body["errorMessage"]
    # Without the option, the client's deadline is not the step's business.
    harness.engine.requests.clear()
    seen.clear()
    assert await harness.run(handler_for(waits, timeout_ms=100), locked_task(None, userId="u"))
    assert seen[0] is not None
    assert seen[0] > 0.05
