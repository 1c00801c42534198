"""The endpoints; the URL map is ``ROUTES`` at the bottom.

Every answer about a process names its status URL (``Location`` on 202, ``Content-Location``
on 200/500), so a client has one code path whether the result came at once or not.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import uuid
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from services.api.deps import Deps, deps
from services.api.metrics import CONTENT_TYPE
from services.api.prefer import parse_prefer
from services.api.schemas import (
    CORRELATION_ID_PATTERN,
    ApiError,
    CompleteAck,
    CompleteRequest,
    ErrorBody,
    EventLog,
    Health,
    JSONResponse,
    Pending,
    ProcessStatus,
    Readiness,
    StartFailedBody,
    StartOk,
    StartRequest,
    StatusPage,
    joined_failure,
    start_failed_reason,
    status_url,
)
from services.api.waitroom import WaitEnd, WaitResult
from shared import db
from shared.camunda import CamundaError, DefinitionNotFound, EngineError, EngineUnavailable
from shared.eventlog import EventRecord, append_event
from shared.store import InvalidCursor, ProcessState, StartFailed, Status
from shared.variables import VariableError

log = logging.getLogger(__name__)

Model = TypeVar("Model", bound=BaseModel)

_CORRELATION_ID = re.compile(CORRELATION_ID_PATTERN)
_STATUS_CODES = {Status.OK: 200, Status.PENDING: 202, Status.ERROR: 500}
MAX_PAGE = 500
#: A claim still without an engine instance this many engine timeouts after it was made
#: was orphaned by a replica that died mid-start: the start call and the lost-answer
#: lookup are each bounded by CAMUNDA_TIMEOUT_MS, so no call of the claimant is in flight.
ORPHANED_AFTER_TIMEOUTS = 3
_READY_TIMEOUT_S = 2.0


# --- process endpoints ---------------------------------------------------------------------


async def start_process(request: Request) -> Response:
    d = deps(request)
    d.auth.check_client(request)
    start = _parse(
        StartRequest,
        await _read_json(request, d.settings.max_body_bytes),
        context={"max_depth": d.settings.max_variables_depth},
    )
    wait_s, applied = _wait_budget(request, d, default_ms=d.settings.sync_timeout_ms)
    variables = start.variables or {}
    request_hash = hashlib.sha256(
        start.processKey.encode() + b"\0" + orjson.dumps(variables, option=orjson.OPT_SORT_KEYS)
    ).hexdigest()
    state, created = await _claim(d, start.correlationId, start.processKey, request_hash)
    if not created and state.request_hash != request_hash:
        raise ApiError(
            422,
            f"correlationId {start.correlationId!r} is already used by a start with another "
            "processKey or other variables",
            field="correlationId",
        )
    if created:
        # Shielded: a client that goes away must not cancel the engine call half-way, which
        # would leave a claim nobody started or abandoned.
        await asyncio.shield(_begin(d, state, variables))
    result = await d.waitroom.wait(start.correlationId, wait_s)
    return _start_answer(d, start.correlationId, result, applied)


async def process_status(request: Request) -> Response:
    d = deps(request)
    d.auth.check_client(request)
    correlation_id = request.path_params["correlationId"]
    if not _CORRELATION_ID.fullmatch(correlation_id):
        raise ApiError(
            400, f"correlationId must match {CORRELATION_ID_PATTERN}", field="correlationId"
        )
    wait_s, applied = _wait_budget(request, d, default_ms=0)
    result = await d.waitroom.wait(correlation_id, wait_s)
    state = result.outcome if isinstance(result.outcome, ProcessState) else None
    if state is None:
        state = await _stored(d, correlation_id)
    if state is None:
        raise ApiError(
            404, f"no process with correlationId {correlation_id!r}", field="correlationId"
        )
    code = _STATUS_CODES[state.status]
    headers = {"Content-Location": status_url(correlation_id), **applied}
    if state.status is Status.PENDING:  # same headers as the start's 202: one client path
        headers["Location"] = status_url(correlation_id)
        headers["Retry-After"] = str(d.settings.retry_after_s)
    if result.end is WaitEnd.DRAINED:
        headers["Connection"] = "close"
    return JSONResponse(ProcessStatus.of(state), status_code=code, headers=headers)


async def list_processes(request: Request) -> Response:
    d = deps(request)
    d.auth.check_client(request)
    limit = _int_param(request, "limit", default=50, low=1, high=MAX_PAGE)
    cursor = request.query_params.get("cursor") or None
    try:
        states, next_cursor = await d.store.page(cursor=cursor, limit=limit)
    except InvalidCursor as exc:
        raise ApiError(400, str(exc), field="cursor") from exc
    page = StatusPage(items=[ProcessStatus.of(s) for s in states], nextCursor=next_cursor)
    return JSONResponse(page)


async def complete_process(request: Request) -> Response:
    d = deps(request)
    d.auth.check_completer(request)
    body = _parse(CompleteRequest, await _read_json(request, d.settings.max_body_bytes))
    status = Status(body.status)
    changed = await d.store.complete(body.correlationId, status, data=body.data, error=body.error)
    if changed:
        await _log_completion(d, body)
    elif await d.store.get(body.correlationId) is None and (
        await _stored(d, body.correlationId) is None
    ):
        raise ApiError(
            404, f"no process with correlationId {body.correlationId!r}", field="correlationId"
        )
    return JSONResponse(CompleteAck(changed=changed))


async def event_log(request: Request) -> Response:
    """By traceabilityId (the seed's path); by correlationId when no run has that
    traceabilityId, or when asked with ``?by=correlationId``."""
    d = deps(request)
    d.auth.check_client(request)
    key = request.path_params["id"]
    if not _CORRELATION_ID.fullmatch(key):
        raise ApiError(400, f"the id must match {CORRELATION_ID_PATTERN}", field="id")
    by = request.query_params.get("by", "any")
    if by not in ("any", "traceabilityId", "correlationId"):
        raise ApiError(400, "by must be traceabilityId or correlationId", field="by")
    events: list[EventRecord] = []
    if by in ("any", "traceabilityId"):
        events = await db.events_by_traceability(d.pool, key)
    if not events and by in ("any", "correlationId"):
        events = await db.events_by_correlation(d.pool, key)
    return JSONResponse(EventLog(events=events))


# --- operations ----------------------------------------------------------------------------


async def healthz(request: Request) -> Response:
    return JSONResponse(Health())


async def readyz(request: Request) -> Response:
    """Redis, Postgres, the engine and this replica's subscription; 503 naming what is down."""
    d = deps(request)
    redis_ok, postgres_ok, engine_ok = await asyncio.gather(
        _answers(d.redis.ping()), _answers(db.ping(d.pool)), _answers(d.camunda.engine_ok())
    )
    checks = {
        "redis": redis_ok,
        "postgres": postgres_ok,
        "engine": engine_ok,
        "subscription": d.waitroom.ready,
    }
    down = [name for name, ok in checks.items() if not ok]
    if d.waitroom.draining:
        down.append("draining")
    if down:
        body = Readiness(status="not ready", checks=checks, error="down: " + ", ".join(down))
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
    return JSONResponse(Readiness(status="ready", checks=checks))


async def metrics(request: Request) -> Response:
    d = deps(request)
    try:
        async with asyncio.timeout(_READY_TIMEOUT_S):
            d.metrics.writebehind_backlog.set(await d.flusher.backlog())
    except (TimeoutError, OSError, RedisError) as exc:  # a stale backlog beats a failed scrape
        log.warning("write-behind backlog unavailable", extra={"error": repr(exc)})
    return Response(d.metrics.render(), media_type=CONTENT_TYPE)


async def openapi(request: Request) -> Response:
    spec: bytes = request.app.state.openapi
    return Response(spec, media_type="application/json")


async def docs(request: Request) -> Response:
    page: str = request.app.state.docs_html
    return HTMLResponse(page)


# --- helpers -------------------------------------------------------------------------------


async def _stored(d: Deps, correlation_id: str) -> ProcessState | None:
    """Postgres's copy of a process Redis no longer holds.

    A ``pending`` row without an engine instance is a start that failed: its claim was
    abandoned in Redis and the delete is still on its way through the write-behind.
    """
    state = await db.get_process(d.pool, correlation_id)
    if state is not None and state.status is Status.PENDING and state.instance_id is None:
        return None
    return state


async def _claim(
    d: Deps, correlation_id: str, process_key: str, request_hash: str
) -> tuple[ProcessState, bool]:
    """Claim the id (or join its claim); take over a claim orphaned before the engine call."""
    orphaned_after = timedelta(milliseconds=ORPHANED_AFTER_TIMEOUTS * d.settings.camunda_timeout_ms)
    for _ in range(2):
        state, created = await d.store.claim(
            correlation_id,
            process_key,
            request_hash,
            traceability_id=str(uuid.uuid4()),
            batch_id=str(uuid.uuid4()),
            application_id=str(uuid.uuid4()),
        )
        orphaned = (
            not created
            and state.status is Status.PENDING
            and state.instance_id is None
            and datetime.now(UTC) - state.started_at > orphaned_after
        )
        if not orphaned:
            break
        # The replica that claimed it died between its claim and the engine's answer: no
        # engine call of its can still be in flight (they time out long before), so nobody
        # would ever finish this run. Version-guarded, so a late attach wins.
        log.warning("taking over an orphaned claim", extra={"correlationId": correlation_id})
        error = ErrorBody(error="the start this request joined was interrupted; retry")
        await d.store.abandon(correlation_id, state.version, reason=start_failed_reason(503, error))
    return state, created


async def _begin(d: Deps, state: ProcessState, variables: dict[str, Any]) -> None:
    """Start the engine instance for a fresh claim; on failure undo the claim and raise the
    answer (so nothing stays ``pending`` and the caller may retry with the same id)."""
    cid = state.correlation_id
    system = {
        "correlationId": cid,
        "batch_id": state.batch_id,
        "traceability_id": state.traceability_id,
        "application_id": state.application_id,
        "identifiers": {"applicationId": state.application_id},
    }
    try:
        instance_id = await _start_instance(d, state, {**variables, **system})
    except (CamundaError, VariableError) as exc:
        error = _engine_failure(exc, state.process_key)
        await d.store.abandon(
            cid, state.version, reason=start_failed_reason(error.status_code, error.body)
        )
        raise error from exc
    await d.store.attach_instance(cid, instance_id)
    await append_event(
        d.redis,
        d.keys,
        EventRecord(
            correlation_id=cid,
            status="started",
            step=0,
            step_name="start",
            process_name=state.process_key,
            http_method="POST",
            endpoint="/api/process/start",
            request_data=variables,
            batch_id=state.batch_id,
            traceability_id=state.traceability_id,
            application_id=state.application_id,
            identifiers=system["identifiers"],
            metadata={"instanceId": instance_id},
        ),
    )


async def _start_instance(d: Deps, state: ProcessState, variables: dict[str, Any]) -> str:
    """Start the engine instance; its id.

    A start whose answer was lost (a read timeout, a dropped connection) may still have
    started the instance. Before calling it failed, and so letting a retry start a second
    one, look the instance up by this attempt's traceability id.
    """
    cid = state.correlation_id
    try:
        with d.metrics.engine_start_seconds.time():
            instance = await d.camunda.start_process(
                state.process_key, business_key=cid, variables=variables
            )
    except EngineUnavailable:
        if state.traceability_id is None:  # every claim sets it; nothing to look up by
            raise
        found = await d.camunda.historic_process_instances_with(
            business_key=cid, variables_equal={"traceability_id": state.traceability_id}
        )
        if not found:
            raise
        log.warning(
            "recovered an instance whose start answer was lost", extra={"correlationId": cid}
        )
        return str(found[0]["id"])
    return instance.id


def _engine_failure(exc: CamundaError | VariableError, process_key: str) -> ApiError:
    """The caller's mistakes are 4xx naming the field; the engine's are 502/503 + Retry-After."""
    retry = {"Retry-After": "5"}
    if isinstance(exc, VariableError):
        return ApiError(400, str(exc), field="variables")
    if isinstance(exc, DefinitionNotFound):
        return ApiError(404, f"no process definition with key {process_key!r}", field="processKey")
    if isinstance(exc, EngineUnavailable):
        return ApiError(503, "the process engine is unreachable; retry later", headers=retry)
    if isinstance(exc, EngineError) and exc.status_code == 400:
        field = "variables" if "variable" in exc.message.lower() else None
        return ApiError(400, f"the engine rejected the start: {exc.message}", field=field)
    message = exc.message if isinstance(exc, EngineError) else str(exc)
    return ApiError(
        502, f"the process engine failed to start the process: {message}", headers=retry
    )


def _start_answer(d: Deps, cid: str, result: WaitResult, applied: dict[str, str]) -> Response:
    outcome = result.outcome
    url = status_url(cid)
    headers = dict(applied)
    if result.end is WaitEnd.DRAINED:
        headers["Connection"] = "close"  # this replica is going away
    if isinstance(outcome, StartFailed):
        code, error = joined_failure(outcome)
        return JSONResponse(error, status_code=code, headers=headers)
    if outcome is None:
        # Redis lost the claim (flushed, or abandoned and its message missed): retrying
        # claims afresh.
        error = ErrorBody(error="the run of this correlationId vanished; retry the start")
        headers["Retry-After"] = str(d.settings.retry_after_s)
        return JSONResponse(error, status_code=503, headers=headers)
    if outcome.status is Status.OK:
        headers["Content-Location"] = url
        body = StartOk(correlationId=cid, result=outcome.data, statusUrl=url)
        return JSONResponse(body, headers=headers)
    if outcome.status is Status.ERROR:
        headers["Content-Location"] = url
        failed = StartFailedBody(correlationId=cid, error=outcome.error, statusUrl=url)
        return JSONResponse(failed, status_code=500, headers=headers)
    headers.update(
        {"Location": url, "Content-Location": url, "Retry-After": str(d.settings.retry_after_s)}
    )
    return JSONResponse(Pending(correlationId=cid, statusUrl=url), 202, headers)


def _wait_budget(request: Request, d: Deps, *, default_ms: int) -> tuple[float, dict[str, str]]:
    """This request's wait in seconds and its ``Preference-Applied`` header (if any).

    ``?wait=N`` beats ``Prefer: wait=N`` beats the default; all are capped by MAX_WAIT_MS.
    ``Prefer: respond-async`` (without a wait) means do not wait at all.
    """
    cap_s = d.settings.max_wait_ms / 1000
    prefs = parse_prefer(request.headers.getlist("prefer"))
    headers = {"Vary": "Prefer"}
    query_wait = _int_param(request, "wait", default=None, low=0, high=None)
    if query_wait is not None:
        return min(float(query_wait), cap_s), headers
    if prefs.wait_s is not None:
        wait_s = min(float(prefs.wait_s), cap_s)
        return wait_s, {**headers, "Preference-Applied": f"wait={int(wait_s)}"}
    if prefs.respond_async:
        return 0.0, {**headers, "Preference-Applied": "respond-async"}
    return min(default_ms / 1000, cap_s), headers


def _int_param(
    request: Request, name: str, *, default: int | None, low: int, high: int | None
) -> Any:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    bound = f"between {low} and {high}" if high is not None else f"at least {low}"
    if not (raw.isascii() and raw.isdigit()) or not (
        low <= int(raw) <= (high if high is not None else int(raw))
    ):
        raise ApiError(400, f"{name} must be an integer {bound}", field=name)
    return int(raw)


async def _read_json(request: Request, limit: int) -> Any:
    """The body as JSON: 415 unless it is declared JSON, 413 beyond ``limit`` bytes (checked
    while reading, so a lying or missing Content-Length cannot get past it), 400 if broken."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise ApiError(415, "Content-Type must be application/json")
    declared = request.headers.get("content-length", "")
    too_large = ApiError(413, f"the body is larger than {limit} bytes")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    try:
        return orjson.loads(b"".join(chunks))
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"malformed JSON: {exc}") from exc


def _parse(model: type[Model], obj: Any, context: dict[str, Any] | None = None) -> Model:
    """Validate a body; 400 naming the first field at fault."""
    try:
        return model.model_validate(obj, context=context)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        field = ".".join(str(part) for part in first["loc"]) or None
        if field is None:
            raise ApiError(400, "the body must be a JSON object") from exc
        message = first["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"{field}: {message}", field=field) from exc


async def _log_completion(d: Deps, body: CompleteRequest) -> None:
    state = await d.store.get(body.correlationId)
    await append_event(
        d.redis,
        d.keys,
        EventRecord(
            correlation_id=body.correlationId,
            status=body.status,
            step_name="complete",
            process_name=state.process_key if state else None,
            http_method="POST",
            endpoint="/api/process/complete",
            result=body.data,
            error_message=None if body.error is None else str(body.error),
            batch_id=state.batch_id if state else None,
            traceability_id=state.traceability_id if state else None,
            application_id=state.application_id if state else None,
        ),
    )


async def _answers(check: Awaitable[object]) -> bool:
    """True when the awaitable finishes in time without an error (readiness)."""
    try:
        async with asyncio.timeout(_READY_TIMEOUT_S):
            result = await check
    except Exception:  # noqa: BLE001 - any failure means "not ready", and says so in the body
        return False
    return result is not False


ROUTES = [
    Route("/api/process/start", start_process, methods=["POST"]),
    Route("/api/process/status/all", list_processes, methods=["GET"]),
    Route("/api/process/status/{correlationId}", process_status, methods=["GET"]),
    Route("/api/process/complete", complete_process, methods=["POST"]),
    Route("/api/event-log/{id}", event_log, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"], include_in_schema=False),
    Route("/docs", docs, methods=["GET"], include_in_schema=False),
]
