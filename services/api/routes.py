"""The endpoints, and :data:`ENDPOINTS`: the one table the URL map, the access checks and the
OpenAPI document (services/api/openapi.py) are derived from.

Endpoints only read the request and answer: starting is services/api/starter.py, waiting
services/api/waitroom.py, reading services/api/runs.py. Every answer about a run names its
status URL (``Location`` on 202, ``Content-Location`` on 200/500), so a client has one code
path whether the result came at once or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from pydantic import BaseModel
from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from services.api import progress
from services.api.auth import Access, Auth
from services.api.cancel import CancelOutcome
from services.api.deps import Deps, deps
from services.api.errors import RETRY_LATER_S, ApiError
from services.api.metrics import CONTENT_TYPE
from services.api.parsing import check_target, int_param, parse_model, read_json, wait_budget
from services.api.schemas import (
    ID_PATTERN,
    RUN_STATUS,
    CancelRequest,
    CompleteAck,
    CompleteRequest,
    EventLog,
    Health,
    JSONResponse,
    Milestone,
    MilestoneReached,
    Pending,
    ProcessStatus,
    Readiness,
    StartFailedBody,
    StartOk,
    StartRequest,
    StatusPage,
    status_url,
)
from services.api.starter import StartCommand, StartRefused
from services.api.waitroom import WaitEnd, WaitResult
from shared import postgres
from shared.contract import StartFailed
from shared.eventlog import EventRecord
from shared.redis_client import REDIS_ERRORS
from shared.state import RunState, Status
from shared.steps import StepEvent
from shared.store.pages import InvalidCursor
from shared.store.runs import writebehind_backlog

log = logging.getLogger(__name__)

_ID = re.compile(ID_PATTERN)
_STATUS_CODES = {Status.OK: 200, Status.PENDING: 202, Status.ERROR: 500, Status.CANCELLED: 409}
MAX_PAGE = 500
#: A start may take this long for its engine call even when the client asked not to wait.
START_MIN_WAIT_S = 2.0
_RETRY = {"Retry-After": str(RETRY_LATER_S)}
_READY_TIMEOUT_S = 2.0


# --- runs --------------------------------------------------------------------------------------


async def start_process(request: Request) -> Response:
    d = deps(request)
    body = parse_model(
        StartRequest,
        await read_json(request, d.options.max_body_bytes, timeout_s=d.options.body_timeout_s),
        context={"max_depth": d.options.max_variables_depth},
    )
    wait_s, applied = wait_budget(
        request, default_ms=d.options.sync_timeout_ms, max_ms=d.options.max_wait_ms
    )
    if body.callbackUrl is not None and (
        refused := check_target(body.callbackUrl, d.options.callback_allowed_hosts)
    ):
        raise ApiError(400, refused, field="callbackUrl")
    cid, until = body.correlationId, body.waitUntil
    command = StartCommand(
        body.processKey, cid, body.variables, body.fetchVariables, body.callbackUrl
    )
    del body  # parked, a request holds its id and its wait, not its variables
    # The client's wait bounds the start as well as the wait for its end. Without one
    # (respond-async), a short one still lets the engine's refusal (404, 400) come back.
    start_deadline = asyncio.get_running_loop().time() + max(wait_s, START_MIN_WAIT_S)
    # Registered before the claim, so the state the attach reads back is the wait's first.
    async with d.waitroom.expect(cid, wait_s, until=until) as wait:
        result = await wait.result(await _start(d, command, start_deadline))
    return _start_answer(d, cid, result, applied)


async def _start(d: Deps, command: StartCommand, deadline: float) -> RunState | None:
    """Claim the id and, for a fresh claim, start the engine instance: the state as
    attached, or None (joined another start, or the engine call goes on past ``deadline``).
    The engine's refusal is raised as its answer."""
    try:
        async with asyncio.timeout_at(deadline):
            state, created = await d.starter.claim(command)
    except TimeoutError as exc:
        raise ApiError(
            503, "the start could not be recorded in time; retry", headers=_RETRY
        ) from exc
    except StartRefused as exc:
        raise ApiError.of(exc.failed) from exc
    if not created:
        return None
    # In the app's task group: neither the end of this wait nor a client that goes away
    # interrupts the engine call; a late answer still attaches (or abandons) the claim.
    begun = d.spawner.spawn(
        d.starter.begin(state, command.variables), name=f"start:{command.correlation_id}"
    )
    attached = None
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout_at(deadline):
            attached = await asyncio.shield(begun)
    if isinstance(attached, StartFailed):
        raise ApiError.of(attached)
    return attached


async def process_status(request: Request) -> Response:
    d = deps(request)
    correlation_id = _path_id(request, "correlationId")
    until = _query_id(request, "until")
    wait_s, applied = wait_budget(request, default_ms=0, max_ms=d.options.max_wait_ms)
    result = await d.waitroom.wait(correlation_id, wait_s, until=until)
    if isinstance(result.outcome, StartFailed):  # its start never reached the engine
        raise ApiError.of(result.outcome)
    if result.milestone is not None:
        return _milestone_answer(correlation_id, result.milestone, applied)
    state = result.outcome or await d.runs.stored(correlation_id)
    if state is None:
        raise ApiError.unknown_run(correlation_id)
    if state.status is Status.ABANDONED:  # its start never reached the engine: say why
        raise ApiError.of(StartFailed.of(state))
    url = status_url(correlation_id)
    headers = {"Content-Location": url, RUN_STATUS: state.status.value, **applied}
    if state.status is Status.PENDING:  # same headers as the start's 202: one client path
        headers.update({"Location": url, "Retry-After": str(d.options.retry_after_s)})
        if last := result.last_step:  # progress, as the seed shows it
            state = dataclasses.replace(state, data={"step": last.step})
    if result.end is WaitEnd.DRAINED:
        headers["Connection"] = "close"
    code = _STATUS_CODES[state.status]
    return JSONResponse(ProcessStatus.body(state), status_code=code, headers=headers)


async def cancel_process(request: Request) -> Response:
    d = deps(request)
    correlation_id = _path_id(request, "correlationId")
    reason = None
    if _has_body(request):
        raw = await read_json(request, d.options.max_body_bytes, timeout_s=d.options.body_timeout_s)
        reason = parse_model(CancelRequest, raw).reason
    result = await d.canceller.cancel(correlation_id, reason)
    if result.state is None:
        raise ApiError.unknown_run(correlation_id)
    code = 409 if result.outcome is CancelOutcome.FINISHED else 200
    headers = {"Content-Location": status_url(correlation_id), RUN_STATUS: result.state.status}
    return JSONResponse(ProcessStatus.of(result.state), status_code=code, headers=headers)


async def process_events(request: Request) -> Response:
    d = deps(request)
    correlation_id = _path_id(request, "correlationId")
    header, query = request.headers.get("last-event-id"), request.query_params.get("lastEventId")
    for name, given in (("Last-Event-ID", header), ("lastEventId", query)):
        if given and given != progress.END_ID and not progress.STEP_ID.fullmatch(given):
            raise ApiError(400, f"{name} is not an id this stream sent", field=name)
    after = header or query or None
    if after == progress.END_ID:
        return Response(status_code=204)  # it has the end: an EventSource stops here
    if await d.runs.get(correlation_id) is None:
        raise ApiError.unknown_run(correlation_id)
    if not d.waitroom.has_room:
        raise ApiError(503, "this replica follows as many runs as it may", headers=_RETRY)
    return EventSourceResponse(
        progress.events(d, correlation_id, after),
        ping=progress.PING_S,
        send_timeout=progress.SEND_TIMEOUT_S,
        headers={"Content-Location": status_url(correlation_id)},
    )


async def list_processes(request: Request) -> Response:
    d = deps(request)
    limit = int_param(request, "limit", default=50, low=1, high=MAX_PAGE)
    cursor = request.query_params.get("cursor") or None
    try:
        states, next_cursor = await d.store.pages.page(cursor=cursor, limit=limit)
    except InvalidCursor as exc:
        raise ApiError(400, str(exc), field="cursor") from exc
    return JSONResponse(StatusPage.of(states, next_cursor))


async def complete_process(request: Request) -> Response:
    d = deps(request)
    raw = await read_json(request, d.options.max_body_bytes, timeout_s=d.options.body_timeout_s)
    body = parse_model(CompleteRequest, raw)
    state = await d.store.get(body.correlationId)
    changed = state is not None and await d.store.finish(
        body.correlationId,
        Status(body.status),
        data=body.data,
        error=body.error,
        event=_completion_event(state, body),
    )
    if not changed and await d.runs.get(body.correlationId) is None:
        raise ApiError.unknown_run(body.correlationId)
    return JSONResponse(CompleteAck(changed=changed))


async def event_log(request: Request) -> Response:
    """By traceabilityId (the seed's path); by correlationId when no run has that
    traceabilityId, or when asked with ``?by=correlationId``."""
    d = deps(request)
    key = _path_id(request, "id")
    by = request.query_params.get("by", "any")
    if by not in ("any", "traceabilityId", "correlationId"):
        raise ApiError(400, "by must be traceabilityId or correlationId", field="by")
    return JSONResponse(EventLog(eventLog=await d.runs.events(key, by)))


# --- operations --------------------------------------------------------------------------------


async def healthz(request: Request) -> Response:
    return JSONResponse(Health())


async def readyz(request: Request) -> Response:
    """Redis, Postgres, the engine and this replica's subscription; 503 naming what is down."""
    d = deps(request)
    redis_ok, postgres_ok, engine_ok = await asyncio.gather(
        _answers(d.redis.ping()), _answers(postgres.ping(d.pool)), _answers(d.camunda.engine_ok())
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
            d.metrics.writebehind_backlog.set(await writebehind_backlog(d.redis, d.keys))
    except (TimeoutError, OSError, *REDIS_ERRORS) as exc:  # a stale backlog beats a failed scrape
        log.warning("write-behind backlog unavailable", extra={"error": repr(exc)})
    return Response(d.metrics.render(), media_type=CONTENT_TYPE)


async def openapi(request: Request) -> Response:
    spec: bytes = request.app.state.openapi
    return Response(spec, media_type="application/json")


async def docs(request: Request) -> Response:
    page: str = request.app.state.docs_html
    return HTMLResponse(page)


# --- helpers -----------------------------------------------------------------------------------


def _path_id(request: Request, name: str) -> str:
    value: str = request.path_params[name]
    if not _ID.fullmatch(value):
        raise ApiError(400, f"{name}: no control characters, at most 255", field=name)
    return value


def _query_id(request: Request, name: str) -> str | None:
    value = request.query_params.get(name)
    if value is not None and not _ID.fullmatch(value):
        raise ApiError(400, f"{name}: no control characters, no /, at most 255", field=name)
    return value


def _has_body(request: Request) -> bool:
    """Whether the client sent a body (an optional one may be left out)."""
    length = request.headers.get("content-length")
    chunked = "chunked" in request.headers.get("transfer-encoding", "")
    return chunked or (length is not None and length != "0") or "content-type" in request.headers


def _milestone_answer(cid: str, step: StepEvent, applied: dict[str, str]) -> Response:
    url = status_url(cid)
    body = MilestoneReached(correlationId=cid, milestone=Milestone.of(step), statusUrl=url)
    headers = {"Content-Location": url, RUN_STATUS: Status.PENDING.value, **applied}
    return JSONResponse(body, headers=headers)


def _start_answer(d: Deps, cid: str, result: WaitResult, applied: dict[str, str]) -> Response:
    outcome = result.outcome
    url = status_url(cid)
    headers = dict(applied)
    if result.end is WaitEnd.DRAINED:
        headers["Connection"] = "close"  # this replica is going away
    if isinstance(outcome, RunState) and outcome.status is Status.ABANDONED:
        outcome = StartFailed.of(outcome)
    if isinstance(outcome, StartFailed):
        error = ApiError.of(outcome)
        return JSONResponse(error.body, error.status_code, {**headers, **error.headers})
    if result.milestone is not None:
        return _milestone_answer(cid, result.milestone, headers)
    if outcome is None:
        # Redis lost the claim (flushed, or abandoned and its message missed): retrying
        # claims afresh.
        error = ApiError(503, "the run of this correlationId vanished; retry the start")
        headers["Retry-After"] = str(d.options.retry_after_s)
        return JSONResponse(error.body, status_code=503, headers=headers)
    headers[RUN_STATUS] = outcome.status.value
    if outcome.status is Status.OK:
        headers["Content-Location"] = url
        body = StartOk(correlationId=cid, result=outcome.data, statusUrl=url)
        return JSONResponse(body, headers=headers)
    if outcome.status in (Status.ERROR, Status.CANCELLED):
        headers["Content-Location"] = url
        failed = StartFailedBody(
            status=outcome.status.value, correlationId=cid, error=outcome.error, statusUrl=url
        )
        return JSONResponse(failed, status_code=_STATUS_CODES[outcome.status], headers=headers)
    headers.update(
        {"Location": url, "Content-Location": url, "Retry-After": str(d.options.retry_after_s)}
    )
    return JSONResponse(Pending(correlationId=cid, statusUrl=url), 202, headers)


def _completion_event(state: RunState, body: CompleteRequest) -> EventRecord:
    return EventRecord.of_run(
        state,
        status=body.status,
        step_name="complete",
        http_method="POST",
        endpoint="/api/process/complete",
        result=body.data,
        error_message=body.error,
    )


async def _answers(check: Awaitable[object]) -> bool:
    """True when the awaitable finishes in time without an error (readiness)."""
    try:
        async with asyncio.timeout(_READY_TIMEOUT_S):
            result = await check
    except Exception:  # noqa: BLE001 - any failure means "not ready", and says so in the body
        return False
    return result is not False


# --- the table ---------------------------------------------------------------------------------

Endpoint_ = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class Reply:
    """One documented answer: a JSON model (or another media type, or no body) and its headers."""

    description: str
    model: type[BaseModel] | None = None
    media_type: str | None = "application/json"
    headers: tuple[str, ...] = ()
    #: Other models the same status may carry (a milestone beside a final state).
    also: tuple[type[BaseModel], ...] = ()

    @property
    def models(self) -> tuple[type[BaseModel], ...]:
        return (self.model, *self.also) if self.model else self.also


@dataclass(frozen=True, slots=True)
class Endpoint:
    method: str
    path: str
    handler: Endpoint_
    access: Access
    summary: str
    description: str = ""
    parameters: tuple[str, ...] = ()
    body: type[BaseModel] | None = None
    #: False where the body may be left out (cancel's reason).
    body_required: bool = True
    replies: Mapping[int, Reply] = field(default_factory=dict)
    #: Error statuses answered with an ErrorBody (401 is added where credentials apply).
    errors: tuple[int, ...] = ()
    #: The OpenAPI operationId, when the handler's name is taken by another path.
    operation: str | None = None


_RUN_HEADERS = ("Content-Location", RUN_STATUS)
_PENDING_HEADERS = ("Location", "Retry-After", "Content-Location", RUN_STATUS)

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "POST",
        "/api/process/start",
        start_process,
        Access.CLIENT,
        "Start a process; answer with its result, or 202 and a status URL.",
        "Waits up to SYNC_TIMEOUT_MS (or `Prefer: wait=N`) for the outcome. Idempotent by "
        "correlationId: a repeated start joins the running one or returns its stored outcome.",
        parameters=("Prefer",),
        body=StartRequest,
        replies={
            200: Reply(
                "The process finished `ok` within the wait (StartOk), or the step named in "
                "`waitUntil` has finished (MilestoneReached).",
                StartOk,
                headers=(*_RUN_HEADERS, "Preference-Applied"),
                also=(MilestoneReached,),
            ),
            202: Reply(
                "Still running when the wait ended; poll `Location`.",
                Pending,
                headers=(*_PENDING_HEADERS, "Preference-Applied"),
            ),
            500: Reply(
                "The process finished `error` within the wait.",
                StartFailedBody,
                headers=_RUN_HEADERS,
            ),
            409: Reply("The run was cancelled.", StartFailedBody, headers=_RUN_HEADERS),
        },
        errors=(400, 404, 413, 415, 422, 502, 503),
    ),
    Endpoint(
        "GET",
        "/api/process/status/all",
        list_processes,
        Access.CLIENT,
        "Processes Redis holds, newest first, a page at a time.",
        parameters=("limit", "cursor"),
        replies={200: Reply("One page.", StatusPage)},
        errors=(400, 503),
    ),
    Endpoint(
        "GET",
        "/api/process/status/{correlationId}",
        process_status,
        Access.CLIENT,
        "The state of one run (Redis, else Postgres); `?wait=N` long-polls.",
        "With `until=<step>`, a long-poll answers as soon as that step has finished (200 with "
        "`milestone`; the run goes on).",
        parameters=("correlationId", "wait", "until", "Prefer"),
        replies={
            200: Reply(
                "The process is `ok` (ProcessStatus), or the step asked for with `until` has "
                "finished (MilestoneReached).",
                ProcessStatus,
                headers=_RUN_HEADERS,
                also=(MilestoneReached,),
            ),
            202: Reply("The process is `pending`.", ProcessStatus, headers=_PENDING_HEADERS),
            409: Reply("The process was `cancelled`.", ProcessStatus, headers=_RUN_HEADERS),
            500: Reply("The process is `error`.", ProcessStatus, headers=_RUN_HEADERS),
        },
        errors=(400, 404, 503),
    ),
    Endpoint(
        "GET",
        "/api/process/events/{correlationId}",
        process_events,
        Access.CLIENT,
        "Live progress: the run's steps and its end as Server-Sent Events.",
        "`event: step` (data: the step) for every step recorded, then `event: end` (data: the "
        "final status body) and the stream closes. Every event has an `id`; reconnect with "
        "`Last-Event-ID` to resume with nothing lost or repeated (on any replica). A client "
        "that already had the end gets 204.",
        parameters=("correlationId", "Last-Event-ID", "lastEventId"),
        replies={
            200: Reply("The event stream.", media_type="text/event-stream"),
            204: Reply("The end was sent already: nothing follows.", media_type=None),
        },
        errors=(400, 404, 503),
    ),
    Endpoint(
        "POST",
        "/api/process/cancel/{correlationId}",
        cancel_process,
        Access.CLIENT,
        "Cancel a pending run: its engine instance is deleted, its state becomes `cancelled`.",
        "Every request waiting for it (starts, long-polls, event streams, on any replica) is "
        "answered at once. Cancelling twice is harmless. The body is optional.",
        parameters=("correlationId",),
        body=CancelRequest,
        body_required=False,
        replies={
            200: Reply("Cancelled (now or before).", ProcessStatus, headers=_RUN_HEADERS),
            409: Reply(
                "The run had already ended `ok` or `error`.", ProcessStatus, headers=_RUN_HEADERS
            ),
        },
        errors=(400, 404, 413, 415, 502, 503),
    ),
    Endpoint(
        "POST",
        "/api/process/complete",
        complete_process,
        Access.COMPLETER,
        "Record a run's outcome and wake its waiters on every replica.",
        "A completion for a finished process changes nothing (`changed: false`).",
        body=CompleteRequest,
        replies={200: Reply("Received.", CompleteAck)},
        errors=(400, 404, 413, 415, 503),
    ),
    *(
        Endpoint(
            "GET",
            path,
            event_log,
            Access.CLIENT,
            "The audit trail of one run, in step order (an unknown id has none).",
            "By traceabilityId; by correlationId when no run has that traceabilityId, or with "
            "`?by=correlationId`. The seed serves it under both paths.",
            parameters=("id", "by"),
            replies={200: Reply("The events.", EventLog)},
            errors=(400, 503),
            operation=operation,
        )
        for path, operation in (
            ("/api/event-log/{id}", None),
            ("/api/process/event-log/{id}", "processEventLog"),
        )
    ),
    Endpoint(
        "GET", "/healthz", healthz, Access.PUBLIC, "Alive.", replies={200: Reply("Alive.", Health)}
    ),
    Endpoint(
        "GET",
        "/readyz",
        readyz,
        Access.PUBLIC,
        "Redis, Postgres, the engine and the wait room's subscription.",
        replies={
            200: Reply("Ready.", Readiness),
            503: Reply("Not ready; `error` names what is down.", Readiness),
        },
    ),
    Endpoint(
        "GET",
        "/metrics",
        metrics,
        Access.OPERATOR,
        "Prometheus metrics of this replica.",
        replies={200: Reply("Text exposition format.", media_type="text/plain")},
    ),
    Endpoint(
        "GET",
        "/openapi.json",
        openapi,
        Access.PUBLIC,
        "This document.",
        replies={200: Reply("OpenAPI 3.1.")},
    ),
    Endpoint(
        "GET",
        "/docs",
        docs,
        Access.PUBLIC,
        "A readable rendering of this document.",
        replies={200: Reply("HTML.", media_type="text/html")},
    ),
)


def routes(auth: Auth) -> list[Route]:
    """The URL map: each endpoint behind the access check its row declares."""
    return [
        Route(e.path, _guarded(e.handler, e.access, auth), methods=[e.method]) for e in ENDPOINTS
    ]


def _guarded(handler: Endpoint_, access: Access, auth: Auth) -> Endpoint_:
    @functools.wraps(handler)  # keeps the name the metrics label answers by
    async def checked(request: Request) -> Response:
        auth.check(access, request)
        return await handler(request)

    return checked
