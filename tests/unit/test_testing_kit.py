"""flowgate.testing: what run_step reports is what the worker tells the engine."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import BaseModel

from flowgate.handlers import BusinessRuleError, Process, Step, StepResult
from flowgate.testing import Completed, Failed, ThrewBpmnError, run_step


class In(BaseModel):
    amount: int


def process_with(fn: object, **options: object) -> Process:
    process = Process("kit", [Step("work", "ok", "failed", **options)])  # type: ignore[arg-type]
    process.handler("work")(fn)  # type: ignore[arg-type]
    return process


async def test_output_is_completed_without_what_the_task_already_held() -> None:
    async def work(data: In) -> dict[str, int]:
        return {"amount": data.amount, "doubled": data.amount * 2}

    told = await run_step(process_with(work), "work", {"amount": 2})
    assert told == Completed({"doubled": 4})


async def test_a_step_result_completes_with_its_data() -> None:
    async def work(data: In) -> StepResult[dict[str, int]]:
        return StepResult({"total": data.amount}, http_status_code=201)

    assert await run_step(process_with(work), "work", {"amount": 3}) == Completed({"total": 3})


async def test_a_business_rule_is_its_bpmn_error_with_the_error_variables() -> None:
    def work(data: In) -> None:  # a synchronous handler, run in a thread as a worker does
        raise BusinessRuleError("TOO_MUCH", f"{data.amount} is too much")

    told = await run_step(process_with(work), "work", {"amount": 9})
    assert told == ThrewBpmnError(
        "TOO_MUCH",
        "9 is too much",
        {
            "errorCode": "TOO_MUCH",
            "errorMessage": "9 is too much",
            "errorType": "BUSINESS_RULE_ERROR",
        },
    )


async def test_failures_count_retries_down_with_the_steps_own_policy() -> None:
    async def work(data: In) -> None:
        raise ConnectionError("down")

    process = process_with(work, retries=2, retry_backoff_ms=500)
    assert await run_step(process, "work", {"amount": 1}) == Failed(
        "ConnectionError: down", retries=2, retry_timeout_ms=500
    )
    assert await run_step(process, "work", {"amount": 1}, retries=2) == Failed(
        "ConnectionError: down", retries=1, retry_timeout_ms=1_000
    )
    assert await run_step(process, "work", {"amount": 1}, retries=1) == Failed(
        "ConnectionError: down", retries=0, retry_timeout_ms=0
    )


async def test_a_timeout_is_what_the_step_declares() -> None:
    async def work(data: In) -> None:
        await asyncio.sleep(10)

    retried = await run_step(process_with(work, timeout_ms=20), "work", {"amount": 1})
    assert isinstance(retried, Failed)
    assert "timeout of 20 ms" in retried.message
    thrown = await run_step(
        process_with(work, timeout_ms=20, timeout_error="SLOW"), "work", {"amount": 1}
    )
    assert isinstance(thrown, ThrewBpmnError)
    assert thrown.code == "SLOW"


async def test_an_unknown_step_is_named() -> None:
    async def work(data: In) -> None: ...

    with pytest.raises(ValueError, match="no handler for step 'nope'"):
        await run_step(process_with(work), "nope", {})
