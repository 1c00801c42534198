"""Outcome mapping: handler result -> engine call -> event row, over a scripted engine."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from pydantic import BaseModel

from services.worker.context import TaskContext, task_logger
from services.worker.executor import Executor, Outcome
from services.worker.metrics import WorkerMetrics
from services.worker.registry import BusinessRuleError, Handler, Process, Step, StepResult
from shared.camunda import CamundaClient, LockedTask
from shared.eventlog import EventRecord
from shared.settings import Settings
from shared.store import Status


class Engine:
    """Records each external-task call; answers 204 unless a response is queued for it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.queued: dict[str, list[httpx.Response]] = {}

    def answer(self, action: str, *responses: httpx.Response) -> None:
        self.queued.setdefault(action, []).extend(responses)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        action = request.url.path.rsplit("/", 1)[-1]
        self.calls.append((action, orjson.loads(request.content) if request.content else None))
        queue = self.queued.get(action)
        return queue.pop(0) if queue else httpx.Response(204)

    def actions(self) -> list[str]:
        return [action for action, _ in self.calls]


def engine_error(status: int, message: str, code: int | None = None) -> httpx.Response:
    return httpx.Response(status, json={"type": "X", "message": message, "code": code})


class Store:
    def __init__(self) -> None:
        self.completions: list[tuple[str, Status, Any, Any]] = []

    async def complete(
        self, correlation_id: str, status: Status, *, data: Any = None, error: Any = None
    ) -> bool:
        self.completions.append((correlation_id, status, data, error))
        return True


class In(BaseModel):
    userId: str


class Out(BaseModel):
    userId: str
    customerId: str | None = None
    note: str | None = None


def make_task(retries: int | None = None, **variables: Any) -> LockedTask:
    return LockedTask(
        id="task-1",
        topic_name="p.work",
        worker_id="w1",
        process_instance_id="pi-1",
        process_definition_key="p",
        business_key="cid-1",
        activity_id="work",
        retries=retries,
        priority=0,
        lock_expiration_time=None,
        variables={
            "correlationId": "cid-1",
            "application_id": "app-1",
            "traceability_id": "trace-1",
            "batch_id": "batch-1",
            "identifiers": {"applicationId": "app-1"},
            **variables,
        },
    )


class Harness:
    def __init__(self, engine: Engine, http: httpx.AsyncClient) -> None:
        self.engine = engine
        self.store = Store()
        self.rows: list[EventRecord] = []
        self.settings = Settings(worker_retries=3, worker_retry_timeout_ms=1_000)
        self.metrics = WorkerMetrics()

        async def events(record: EventRecord) -> None:
            self.rows.append(record)

        self.executor = Executor(
            camunda=CamundaClient("http://engine", http=http),
            worker_id="w1",
            settings=self.settings,
            store=self.store,
            events=events,
            metrics=self.metrics,
        )
        self.http = http

    async def run(self, handler: Handler, task: LockedTask) -> Outcome:
        ctx = TaskContext(
            task=task,
            settings=self.settings,
            store=self.store,
            http=self.http,
            log=task_logger(logging.getLogger("test"), task),
        )
        return await self.executor.run(handler, ctx)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    engine = Engine()
    async with httpx.AsyncClient(transport=httpx.MockTransport(engine)) as http:
        yield Harness(engine, http)


def handler_for(fn: Any) -> Handler:
    process = Process("p", [Step("work", success="Worked", error="Work failed")])
    process.handler("work")(fn)
    return process.handlers[0]


async def test_a_return_completes_with_output_and_identifiers(harness: Harness) -> None:
    async def work(data: In) -> StepResult[Out]:
        return StepResult(Out(userId=data.userId, customerId="c-9"), http_status_code=201)

    outcome = await harness.run(handler_for(work), make_task(userId="u1"))

    assert outcome is Outcome.COMPLETED
    [(action, body)] = harness.engine.calls
    assert action == "complete"
    assert body["workerId"] == "w1"
    assert body["variables"]["userId"] == {"type": "String", "value": "u1"}
    assert "note" not in body["variables"]  # None leaves earlier values alone
    identifiers = orjson.loads(body["variables"]["identifiers"]["value"])
    assert identifiers == {"applicationId": "app-1", "userId": "u1", "customerId": "c-9"}
    [row] = harness.rows
    assert (row.status, row.step, row.result, row.http_status_code) == ("success", 1, "Worked", 201)
    assert (row.correlation_id, row.traceability_id, row.batch_id) == (
        "cid-1",
        "trace-1",
        "batch-1",
    )


async def test_a_business_rule_error_is_a_bpmn_error_with_the_seed_variables(
    harness: Harness,
) -> None:
    async def work(data: In) -> None:
        raise BusinessRuleError("NOT_ALLOWED", "no onboarding today")

    assert await harness.run(handler_for(work), make_task(userId="u1")) is Outcome.BPMN_ERROR
    [(action, body)] = harness.engine.calls
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

    assert await harness.run(handler_for(work), make_task()) is Outcome.BPMN_ERROR
    [(_, body)] = harness.engine.calls
    assert body["errorCode"] == "VALIDATION_ERROR"
    assert body["errorMessage"].startswith("Input validation failed: userId")
    assert harness.rows[0].http_status_code == 422


@pytest.mark.parametrize(
    ("task_retries", "sent_retries", "sent_timeout_ms", "outcome"),
    [
        (None, 3, 1_000, Outcome.FAILED),  # first failure: WORKER_RETRIES re-tries left
        (3, 2, 1_000, Outcome.FAILED),
        (2, 1, 2_000, Outcome.FAILED),  # the retryTimeout doubles
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

    assert await harness.run(handler_for(work), make_task(task_retries, userId="u")) is outcome
    [(action, body)] = harness.engine.calls
    assert action == "failure"
    assert (body["retries"], body["retryTimeout"]) == (sent_retries, sent_timeout_ms)
    assert body["errorMessage"] == "ConnectionError: backend down"
    assert "Traceback" in body["errorDetails"]
    if outcome is Outcome.INCIDENT:
        assert harness.store.completions == [
            ("cid-1", Status.ERROR, None, "Work failed: backend down")
        ]
        assert harness.rows[0].status == "incident"
    else:
        assert harness.store.completions == []
        assert harness.rows[0].status == "retry"


async def ok(data: In) -> dict[str, Any]:
    return {"done": True}


async def test_complete_on_a_gone_task_drops_the_result(harness: Harness) -> None:
    harness.engine.answer("complete", engine_error(404, "External task with id x does not exist"))
    assert await harness.run(handler_for(ok), make_task(userId="u")) is Outcome.GONE
    assert harness.engine.actions() == ["complete"]
    assert harness.rows == []


async def test_complete_on_a_task_another_worker_locked_drops_the_result(
    harness: Harness,
) -> None:
    harness.engine.answer(
        "complete",
        engine_error(400, "External Task x cannot be completed by worker 'w1'. "
                     "It is locked by worker 'w2'."),
    )  # fmt: skip
    assert await harness.run(handler_for(ok), make_task(userId="u")) is Outcome.LOCK_LOST
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
    assert await harness.run(handler_for(ok), make_task(userId="u")) is Outcome.COMPLETED
    assert harness.engine.actions() == ["complete", "complete", "complete"]
    assert len(harness.rows) == 1


async def test_a_complete_the_engine_refuses_becomes_a_failure(harness: Harness) -> None:
    harness.engine.answer("complete", engine_error(400, "Cannot convert value to java type"))
    assert await harness.run(handler_for(ok), make_task(userId="u")) is Outcome.FAILED
    assert harness.engine.actions() == ["complete", "failure"]
