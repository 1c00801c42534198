"""The example process's handlers, tested as a team tests its own: with flowgate.testing,
no engine, Redis or network."""

from __future__ import annotations

import httpx

from flowgate.services.worker.handlers.onboard_user import (
    OnboardingConfig,
    process,
    risk_score,
)
from flowgate.testing import Completed, Failed, ThrewBpmnError, run_step

CHECKED = {"userId": "ada", "validated": True, "backgroundCheckPassed": True, "riskScore": 10}
WITH_API = OnboardingConfig(onboarding_api_url="http://onboarding.test")


async def test_a_valid_user_is_validated() -> None:
    told = await run_step(process, "validate-user-information", {"userId": " Ada "})
    # What it read unchanged (userId) is not sent back.
    assert told == Completed({"validated": True, "normalizedUserId": "ada"})


async def test_an_invalid_user_is_the_models_validation_error() -> None:
    told = await run_step(process, "validate-user-information", {"userId": "invalid-7"})
    assert isinstance(told, ThrewBpmnError)
    assert (told.code, told.message) == ("VALIDATION_FAILED", "User invalid-7 failed validation")


async def test_a_task_without_a_user_id_fails_input_validation() -> None:
    told = await run_step(process, "validate-user-information", {"email": "a@b.c"})
    assert isinstance(told, ThrewBpmnError)
    assert told.code == "VALIDATION_ERROR"
    assert "userId" in (told.message or "")


async def test_the_background_check_scores_deterministically() -> None:
    told = await run_step(process, "run-background-check", {"userId": "ada", "validated": True})
    assert told == Completed({"backgroundCheckPassed": True, "riskScore": risk_score("ada")})
    risky = await run_step(
        process, "run-background-check", {"userId": "highrisk-1", "validated": True}
    )
    assert isinstance(risky, Completed)
    assert risky.variables["backgroundCheckPassed"] is False


async def test_the_onboarding_system_is_called_with_the_tasks_idempotency_key() -> None:
    seen: list[httpx.Request] = []

    def onboarding(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(201, json={"onboarded": True, "customerId": "c-42"})

    told = await run_step(
        process,
        "call-onboarding-api",
        CHECKED,
        config=WITH_API,
        http=httpx.MockTransport(onboarding),
    )
    assert isinstance(told, Completed)
    assert (told.variables["onboarded"], told.variables["customerId"]) == (True, "c-42")
    [request] = seen
    assert request.url == "http://onboarding.test/onboarding/complete"
    assert request.headers["Idempotency-Key"]


async def test_an_onboarding_outage_is_retried_and_a_refusal_is_the_models_error() -> None:
    down = httpx.MockTransport(lambda request: httpx.Response(503))
    told = await run_step(process, "call-onboarding-api", CHECKED, config=WITH_API, http=down)
    assert isinstance(told, Failed)
    assert (told.retries, told.retry_timeout_ms) == (3, 1_000)
    assert "503" in told.message
    last = await run_step(
        process, "call-onboarding-api", CHECKED, config=WITH_API, http=down, retries=1
    )
    assert isinstance(last, Failed)
    assert last.retries == 0  # the engine raises an incident; the run ends error
    refused = httpx.MockTransport(lambda request: httpx.Response(422, text="no"))
    told = await run_step(process, "call-onboarding-api", CHECKED, config=WITH_API, http=refused)
    assert isinstance(told, ThrewBpmnError)
    assert told.code == "ONBOARDING_REJECTED"
