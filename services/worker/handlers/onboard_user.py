"""``onboard-user``: the example process (the README's "Bring your own processes").

validate-user-information -> run-background-check -> call-onboarding-api -> prepare-response;
a BPMN error on any step goes to handle-error. Every decision is deterministic:

* a ``userId`` containing ``invalid`` (any case) fails validation -> the run ends ``error``
  with "User <id> failed validation";
* the background check's risk score is derived from a hash of the user id: 0-49 for an
  ordinary id (passes), 80-99 for an id containing ``highrisk`` (fails, and the run ends
  ``error`` with "Background check failed");
* the onboarding system is called over HTTP when ``ONBOARDING_API_URL`` is set
  (``POST {url}/onboarding/complete`` with ``{userId, riskScore}``, answering
  ``{onboarded?, reason?, customerId?}``); without it the decision is local: onboarded when
  the risk score is below 75.

prepare-response and handle-error are the steps that end the run (``finishes_run``): the
framework ends it with their output once the engine has accepted them.
"""

from __future__ import annotations

import hashlib

import httpx
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from flowgate.handlers import BusinessRuleError, Process, Step, StepResult, TaskContext


class OnboardingConfig(BaseSettings):
    """The example process's own settings (environment, read once at worker start-up)."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    #: Base URL of the onboarding system (ONBOARDING_API_URL); without one the decision
    #: is local.
    onboarding_api_url: str | None = None


process = Process(
    "onboard-user",
    [
        Step(
            "validate-user-information",
            success="User information validated",
            error="User information validation failed",
        ),
        Step(
            "run-background-check",
            http_method="POST",
            endpoint="/background-check/verify",
            success="Background check completed",
            error="Background check failed",
        ),
        Step(
            "call-onboarding-api",
            http_method="POST",
            endpoint="/onboarding/complete",
            success="Onboarding API call successful",
            error="Onboarding API call failed",
        ),
        Step(
            "prepare-response",
            success="Response prepared",
            error="Response preparation failed",
            finishes_run=True,
        ),
        Step(
            "handle-error",
            success="Error handled and client notified",
            error="Error handler failed",
            finishes_run=True,
        ),
    ],
    config=OnboardingConfig,
)

#: A background check passes below this score; onboarding (local decision) below the next.
PASS_BELOW = 80
ONBOARD_BELOW = 75
ONBOARDING_TIMEOUT_S = 10.0


def risk_score(user_id: str) -> int:
    """Deterministic: 0-49 for ordinary ids, 80-99 for ids containing ``highrisk``."""
    digest = int.from_bytes(hashlib.sha256(user_id.encode()).digest()[:4], "big")
    return 80 + digest % 20 if "highrisk" in user_id.lower() else digest % 50


# --- validate-user-information -------------------------------------------------------------


class ValidateInput(BaseModel):
    userId: str = Field(min_length=1)
    email: str | None = None


class ValidateOutput(BaseModel):
    userId: str
    validated: bool
    normalizedUserId: str


@process.handler("validate-user-information")
async def validate_user_information(data: ValidateInput) -> ValidateOutput:
    if "invalid" in data.userId.lower():
        raise BusinessRuleError("VALIDATION_FAILED", f"User {data.userId} failed validation")
    return ValidateOutput(
        userId=data.userId, validated=True, normalizedUserId=data.userId.strip().lower()
    )


# --- run-background-check ------------------------------------------------------------------


class BackgroundCheckInput(BaseModel):
    userId: str
    validated: bool


class BackgroundCheckOutput(BaseModel):
    backgroundCheckPassed: bool
    riskScore: int


@process.handler("run-background-check")
async def run_background_check(data: BackgroundCheckInput) -> BackgroundCheckOutput:
    if not data.validated:
        raise BusinessRuleError(
            "VALIDATION_REQUIRED", "User must be validated before running background check"
        )
    score = risk_score(data.userId)
    return BackgroundCheckOutput(backgroundCheckPassed=score < PASS_BELOW, riskScore=score)


# --- call-onboarding-api -------------------------------------------------------------------


class OnboardingInput(BaseModel):
    userId: str
    validated: bool
    backgroundCheckPassed: bool
    riskScore: int


class OnboardingOutput(BaseModel):
    onboarded: bool
    reason: str | None = None
    customerId: str | None = None


@process.handler("call-onboarding-api")
async def call_onboarding_api(
    data: OnboardingInput, ctx: TaskContext[OnboardingConfig]
) -> OnboardingOutput | StepResult[OnboardingOutput]:
    if not data.validated:
        raise BusinessRuleError("VALIDATION_REQUIRED", "User must be validated before onboarding")
    if not data.backgroundCheckPassed:
        return OnboardingOutput(onboarded=False, reason="Background check failed")
    base_url = (ctx.config.onboarding_api_url or "").rstrip("/")
    if not base_url:
        onboarded = data.riskScore < ONBOARD_BELOW
        return OnboardingOutput(
            onboarded=onboarded, reason=None if onboarded else "Risk score too high to onboard"
        )
    return await _call_onboarding(ctx.http, base_url, data, ctx.idempotency_key)


async def _call_onboarding(
    http: httpx.AsyncClient, base_url: str, data: OnboardingInput, idempotency_key: str
) -> StepResult[OnboardingOutput]:
    """POST to the onboarding system: 4xx is its decision (BPMN error), 5xx/network retried.

    The same ``Idempotency-Key`` on every delivery of the task: a worker that crashed after
    this call made it once already, and the system drops the repeat.
    """
    response = await http.post(
        f"{base_url}{process.steps[2].endpoint}",
        json={"userId": data.userId, "riskScore": data.riskScore},
        headers={"Idempotency-Key": idempotency_key},
        timeout=ONBOARDING_TIMEOUT_S,
    )
    if response.is_client_error:
        raise BusinessRuleError(
            "ONBOARDING_REJECTED",
            f"Onboarding API refused user {data.userId} (HTTP {response.status_code})",
            details={"status": response.status_code, "body": response.text[:500]},
        )
    response.raise_for_status()  # 5xx: a failure, so the engine retries it
    body = response.json() if response.content else {}
    body = body if isinstance(body, dict) else {}
    onboarded = body.get("onboarded")
    if not isinstance(onboarded, bool):
        onboarded = data.riskScore < ONBOARD_BELOW
    reason = body.get("reason") or (None if onboarded else "Risk score too high to onboard")
    customer_id = body.get("customerId")
    return StepResult(
        OnboardingOutput(
            onboarded=onboarded,
            reason=reason,
            customerId=str(customer_id) if customer_id is not None else None,
        ),
        http_status_code=response.status_code,
    )


# --- prepare-response ----------------------------------------------------------------------


class PrepareResponseInput(BaseModel):
    userId: str
    validated: bool
    backgroundCheckPassed: bool
    onboarded: bool
    riskScore: int
    reason: str | None = None


class OnboardingResult(BaseModel):
    """The run's result (and the step's output variables)."""

    userId: str
    validated: bool
    backgroundCheckPassed: bool
    onboarded: bool
    riskScore: int
    reason: str | None = None
    success: bool


@process.handler("prepare-response")
async def prepare_response(data: PrepareResponseInput) -> StepResult[OnboardingResult]:
    success = data.validated and data.backgroundCheckPassed and data.onboarded
    result = OnboardingResult(
        userId=data.userId,
        validated=data.validated,
        backgroundCheckPassed=data.backgroundCheckPassed,
        onboarded=data.onboarded,
        riskScore=data.riskScore,
        reason=data.reason,
        success=success,
    )
    error = None if success else data.reason or "Onboarding process failed"
    return StepResult(result, error=error)


# --- handle-error --------------------------------------------------------------------------


class HandleErrorInput(BaseModel):
    errorCode: str | None = None
    errorMessage: str | None = None
    errorType: str | None = None


class HandleErrorOutput(BaseModel):
    errorHandled: bool


@process.handler("handle-error")
async def handle_error(
    data: HandleErrorInput, ctx: TaskContext[OnboardingConfig]
) -> StepResult[HandleErrorOutput]:
    message = data.errorMessage or "Process failed"
    ctx.log.info(
        "process error %s: %s", data.errorCode, message, extra={"errorType": data.errorType}
    )
    return StepResult(HandleErrorOutput(errorHandled=True), error=message)
