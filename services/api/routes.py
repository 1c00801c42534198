"""The endpoints: each reads its request, calls one use case, and answers. (One module
past 500 lines: the endpoints share the helpers that shape an answer about a run, and a
reader compares them side by side.)

Starting is services/api/starter.py, waiting services/api/waitroom.py, reading
services/api/runs.py, cancelling services/api/cancel.py, completing
services/api/complete.py. Which path each serves, with which access, is the table in
services/api/endpoints.py. Every answer about a run names its
status URL (``Location`` on 202, ``Content-Location`` on 200/500), so a client has one code
path whether the result came at once or not.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable

from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from flowgate.services.api import progress
from flowgate.services.api.cancel import CancelOutcome
from flowgate.services.api.complete import complete
from flowgate.services.api.deps import Deps, deps
from flowgate.services.api.errors import RETRY_LATER_S, ApiError
from flowgate.services.api.messages import Delivery, Message
from flowgate.services.api.parsing import (
    check_target,
    int_param,
    parse_model,
    read_json,
    wait_budget,
)
from flowgate.services.api.pause import Paused
from flowgate.services.api.retry import RetryOutcome
from flowgate.services.api.schemas import (
    ID_PATTERN,
    RUN_STATUS,
    CancelRequest,
    CompleteAck,
    CompleteRequest,
    CompleteTaskRequest,
    EventLog,
    Health,
    JSONResponse,
    MessageRequest,
    Milestone,
    MilestoneReached,
    OpenUserTask,
    Pending,
    ProcessStatus,
    Readiness,
    RetryRequest,
    RunPaused,
    StartFailedBody,
    StartOk,
    StartRequest,
    StatusPage,
    UserTaskList,
    status_url,
)
from flowgate.services.api.starter import StartCommand
from flowgate.services.api.usertasks import Refusal
from flowgate.services.api.waitroom import RoomFull, WaitEnd, WaitResult
from flowgate.shared import postgres
from flowgate.shared.contract import StartFailed, failed_start
from flowgate.shared.logs import CORRELATION_ID
from flowgate.shared.redis_client import REDIS_ERRORS
from flowgate.shared.state import RunState, Status
from flowgate.shared.steps import StepEvent
from flowgate.shared.store.pages import InvalidCursor
from flowgate.shared.store.runs import writebehind_backlog
from flowgate.shared.tenancy import Principal

log = logging.getLogger(__name__)

_ID = re.compile(ID_PATTERN)
_STATUS_CODES = {Status.OK: 200, Status.PENDING: 202, Status.ERROR: 500, Status.CANCELLED: 409}
MAX_PAGE = 500
_RETRY = {"Retry-After": str(RETRY_LATER_S)}
_READY_TIMEOUT_S = 2.0


# --- runs --------------------------------------------------------------------------------------


async def start_process(request: Request) -> Response:
    d = deps(request)
    who = principal(request)
    await d.limits.start_rate(who.tenant)
    body = parse_model(
        StartRequest,
        await read_json(request, d.options.max_body_bytes, timeout_s=d.options.body_timeout_s),
        context={
            "max_depth": d.options.max_variables_depth,
            "system_variables_from": d.options.system_variables_from_clients,
        },
    )
    wait_s, applied = wait_budget(
        request, default_ms=d.options.sync_timeout_ms, max_ms=d.options.max_wait_ms
    )
    if body.callbackUrl is not None and (
        refused := check_target(body.callbackUrl, d.options.callback_allowed_hosts)
    ):
        raise ApiError(400, refused, field="callbackUrl")
    cid = body.correlationId
    CORRELATION_ID.set(cid)
    command = StartCommand(
        process_key=body.processKey,
        correlation_id=cid,
        variables=body.variables,
        fetch_variables=body.fetchVariables,
        callback_url=body.callbackUrl,
        principal=who,
        traceparent=request.headers.get("traceparent"),
        priority=await d.limits.fetch_priority(who.tenant),
    )
    until, wants_token = body.waitUntil, body.readToken
    del body  # parked, a request holds its id and its wait, not its variables
    await d.limits.run_place(who.tenant, cid)
    async with d.limits.parked(who.tenant, wait_s):
        result = await d.starter.start(command, wait_s=wait_s, until=until)
    token = await d.read_tokens.issue(cid, who.tenant) if wants_token else None
    return _start_answer(d, cid, result, applied, read_token=token)


async def process_status(request: Request) -> Response:
    d = deps(request)
    correlation_id = await _run_id(request, d)
    until = _query_id(request, "until")
    wait_s, applied = wait_budget(request, default_ms=0, max_ms=d.options.max_wait_ms)
    async with d.limits.parked(principal(request).tenant, wait_s):
        result = await d.waitroom.wait(correlation_id, wait_s, until=until)
    if result.milestone is not None:
        return _milestone_answer(correlation_id, result.milestone, applied)
    outcome = result.outcome or await d.runs.stored(correlation_id)
    if failed := failed_start(outcome):  # its start never reached the engine: say why
        raise ApiError.of(failed)
    if not isinstance(outcome, RunState):
        raise ApiError.unknown_run(correlation_id)
    state = outcome
    url = status_url(correlation_id)
    headers = {"Content-Location": url, RUN_STATUS: state.status.value, **applied}
    body = ProcessStatus.body(state)
    if state.status is Status.PENDING:  # same headers as the start's 202: one client path
        headers.update({"Location": url, "Retry-After": str(d.pace.retry_after_s(state))})
        if last := result.last_step:  # progress, as the seed shows it
            body["data"] = {"step": last.step}
        if (waits := await d.waiting.of(state)) is not None:
            body["waitingOn"] = waits
    if result.end is WaitEnd.DRAINED:
        headers["Connection"] = "close"
    return JSONResponse(body, status_code=_STATUS_CODES[state.status], headers=headers)


async def cancel_process(request: Request) -> Response:
    d = deps(request)
    correlation_id = await _run_id(request, d)
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
    correlation_id = await _run_id(request, d)
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
    place = await d.limits.stream(principal(request).tenant)
    return EventSourceResponse(
        progress.events(d, correlation_id, after, place),
        ping=progress.PING_S,
        send_timeout=progress.SEND_TIMEOUT_S,
        headers={"Content-Location": status_url(correlation_id)},
    )


async def list_processes(request: Request) -> Response:
    d = deps(request)
    limit = int_param(request, "limit", default=50, low=1, high=MAX_PAGE)
    cursor = request.query_params.get("cursor") or None
    try:
        states, next_cursor = await d.store.pages.page(
            cursor=cursor, limit=limit, tenant=_tenant_filter(principal(request))
        )
    except InvalidCursor as exc:
        raise ApiError(400, str(exc), field="cursor") from exc
    return JSONResponse(StatusPage.of(states, next_cursor))


async def complete_process(request: Request) -> Response:
    d = deps(request)
    raw = await read_json(request, d.options.max_body_bytes, timeout_s=d.options.body_timeout_s)
    body = parse_model(CompleteRequest, raw)
    changed = await complete(
        d.store, d.runs, body.correlationId, Status(body.status), data=body.data, error=body.error
    )
    if changed is None:
        raise ApiError.unknown_run(body.correlationId)
    return JSONResponse(CompleteAck(changed=changed))


# --- talking to a running process --------------------------------------------------------------


async def list_user_tasks(request: Request) -> Response:
    d = deps(request)
    correlation_id = await _run_id(request, d)
    tasks = await d.usertasks.open(correlation_id)
    if tasks is None:
        raise ApiError.unknown_run(correlation_id)
    return JSONResponse(UserTaskList(tasks=[OpenUserTask.of(task) for task in tasks]))


async def complete_user_task(request: Request) -> Response:
    d = deps(request)
    correlation_id = await _run_id(request, d)
    task_id = _path_id(request, "taskId")
    body = CompleteTaskRequest()
    if _has_body(request):
        raw = await read_json(request, d.options.max_body_bytes, timeout_s=d.options.body_timeout_s)
        body = parse_model(
            CompleteTaskRequest, raw, context={"max_depth": d.options.max_variables_depth}
        )
    wait_s, applied = wait_budget(
        request, default_ms=d.options.sync_timeout_ms, max_ms=d.options.max_wait_ms
    )
    try:
        async with d.limits.parked(principal(request).tenant, wait_s):
            done = await d.usertasks.complete(
                correlation_id,
                task_id,
                variables=body.variables,
                wait_s=wait_s,
                until=body.waitUntil,
            )
    except RoomFull:
        raise ApiError(503, "this replica waits for too many requests; retry later") from None
    if done.refused is Refusal.UNKNOWN_RUN:
        raise ApiError.unknown_run(correlation_id)
    if done.refused is Refusal.NOT_THIS_RUNS:
        raise ApiError(
            404, f"run {correlation_id!r} has no open user task {task_id!r}", field="taskId"
        )
    if done.refused is Refusal.TAKEN:
        raise ApiError(409, f"user task {task_id!r} was completed already", field="taskId")
    if done.refused is Refusal.RUN_ENDED:
        assert done.state is not None
        return _run_answer(done.state, applied, code=409)
    assert done.paused is not None
    return await _pause_answer(d, correlation_id, done.paused, applied)


async def send_message(request: Request) -> Response:
    d = deps(request)
    correlation_id = await _run_id(request, d)
    raw = await read_json(request, d.options.max_body_bytes, timeout_s=d.options.body_timeout_s)
    body = parse_model(MessageRequest, raw, context={"max_depth": d.options.max_variables_depth})
    wait_s, applied = wait_budget(
        request, default_ms=d.options.sync_timeout_ms, max_ms=d.options.max_wait_ms
    )
    message = Message(correlation_id, body.messageName, body.variables, body.messageId)
    try:
        async with d.limits.parked(principal(request).tenant, wait_s):
            sent = await d.messages.send(message, wait_s=wait_s, until=body.waitUntil)
    except RoomFull:
        raise ApiError(503, "this replica waits for too many requests; retry later") from None
    delivery, state = sent.delivery, sent.state
    if delivery is Delivery.UNKNOWN_RUN or (state is None and sent.paused is None):
        raise ApiError.unknown_run(correlation_id)
    if delivery is Delivery.CONFLICT:
        raise ApiError(
            422, "messageId: already names another message to this run", field="messageId"
        )
    if delivery is Delivery.CORRELATED:
        assert sent.paused is not None
        return await _pause_answer(d, correlation_id, sent.paused, applied)
    assert state is not None
    if state.finished:  # ended before (or while) the message could be delivered
        return _run_answer(state, applied, code=409)
    if delivery is Delivery.EXPIRED:
        raise ApiError(
            409,
            f"message {body.messageName!r}: the run did not wait for it within MESSAGE_HOLD_MS",
            field="messageName",
        )
    # Still held: the run has not armed its wait yet, and the hold goes on.
    return await _pause_answer(d, correlation_id, Paused(state, timed_out=True), applied)


async def retry_process(request: Request) -> Response:
    d = deps(request)
    correlation_id = await _run_id(request, d)
    until = None
    if _has_body(request):
        raw = await read_json(request, d.options.max_body_bytes, timeout_s=d.options.body_timeout_s)
        until = parse_model(RetryRequest, raw).waitUntil
    wait_s, applied = wait_budget(
        request, default_ms=d.options.sync_timeout_ms, max_ms=d.options.max_wait_ms
    )
    async with d.limits.parked(principal(request).tenant, wait_s):
        result = await d.retrier.retry(correlation_id, wait_s=wait_s, until=until)
    if result.outcome is RetryOutcome.UNKNOWN:
        raise ApiError.unknown_run(correlation_id)
    if result.outcome is RetryOutcome.NOT_AN_INCIDENT:
        assert result.state is not None
        return _run_answer(result.state, applied, code=409)
    assert result.waited is not None
    return _start_answer(d, correlation_id, result.waited, applied)


async def _pause_answer(d: Deps, cid: str, paused: Paused, applied: dict[str, str]) -> Response:
    """What an action on a running process answers once its wait ended (pause.py)."""
    state = paused.state
    if state is None:
        raise ApiError.unknown_run(cid)
    if paused.milestone is not None:
        return _milestone_answer(cid, paused.milestone, applied)
    if state.finished:
        return _run_answer(state, applied, code=_STATUS_CODES.get(state.status, 200))
    if paused.waiting_on is not None:
        await d.waiting.share(state, paused.waiting_on)
    body = RunPaused(
        **ProcessStatus.body(state),
        tasks=[OpenUserTask.of(t) for t in paused.waits.tasks],
        waitingOn=paused.waiting_on,
    )
    url = status_url(cid)
    headers = {"Content-Location": url, RUN_STATUS: state.status.value, **applied}
    if not paused.timed_out:
        return JSONResponse(body, headers=headers)
    headers.update({"Location": url, "Retry-After": str(d.pace.retry_after_s(state))})
    return JSONResponse(body, status_code=202, headers=headers)


def _run_answer(state: RunState, applied: dict[str, str], *, code: int) -> Response:
    """The run's status body, as a status read shows it, with ``code``."""
    headers = {
        "Content-Location": status_url(state.correlation_id),
        RUN_STATUS: state.status.value,
        **applied,
    }
    return JSONResponse(ProcessStatus.body(state), status_code=code, headers=headers)


async def event_log(request: Request) -> Response:
    """By traceabilityId (the seed's path); by correlationId when no run has that
    traceabilityId, or when asked with ``?by=correlationId``."""
    d = deps(request)
    key = _path_id(request, "id")
    by = request.query_params.get("by", "any")
    if by not in ("any", "traceabilityId", "correlationId"):
        raise ApiError(400, "by must be traceabilityId or correlationId", field="by")
    events = await d.runs.events(key, by)
    who = principal(request)
    if not who.every_tenant:  # another tenant's rows are no rows
        runs = {event.correlation_id for event in events}
        mine = {cid for cid in runs if await d.runs.visible(cid, who)}
        events = [event for event in events if event.correlation_id in mine]
    return JSONResponse(EventLog(eventLog=events))


# --- operations --------------------------------------------------------------------------------


async def healthz(request: Request) -> Response:
    return JSONResponse(Health())


async def readyz(request: Request) -> Response:
    """200 while this replica can serve; 503 naming why not (Redis, its subscription, draining).

    PostgreSQL and the engine are reported, not required: the write-behind rides out a
    PostgreSQL outage, finished runs are read from Redis and a start without an engine
    answers 503 itself, so their outage must not empty the Service of every replica.
    """
    d = deps(request)
    checks = await _dependencies(d)
    down = [name for name in _REQUIRED if not checks[name]]
    if d.waitroom.draining:
        down.append("draining")
    if down:
        body = Readiness(status="not ready", checks=checks, error="down: " + ", ".join(down))
        return JSONResponse(body, status_code=503, headers=_RETRY)
    if degraded := [name for name, ok in checks.items() if not ok]:
        body = Readiness(status="degraded", checks=checks, error="down: " + ", ".join(degraded))
        return JSONResponse(body)
    return JSONResponse(Readiness(status="ready", checks=checks))


#: What this replica cannot serve without; the other checks only degrade it.
_REQUIRED = ("redis", "subscription")


async def metrics(request: Request) -> Response:
    d = deps(request)
    try:
        async with asyncio.timeout(_READY_TIMEOUT_S):
            d.metrics.writebehind_backlog.set(await writebehind_backlog(d.redis, d.keys))
    except (TimeoutError, OSError, *REDIS_ERRORS) as exc:  # a stale backlog beats a failed scrape
        log.warning("write-behind backlog unavailable", extra={"error": repr(exc)})
    await _dependencies(d)
    body, media_type = d.metrics.exposition(request.headers.get("accept", ""))
    return Response(body, media_type=media_type)


async def _dependencies(d: Deps) -> dict[str, bool]:
    """Whether each dependency answers now; kept in ``flowgate_api_dependency_up`` too."""
    redis_ok, postgres_ok, engine_ok = await asyncio.gather(
        _answers(d.redis.ping()), _answers(postgres.ping(d.pool)), _answers(d.camunda.engine_ok())
    )
    checks = {
        "redis": redis_ok,
        "postgres": postgres_ok,
        "engine": engine_ok,
        "subscription": d.waitroom.ready,
    }
    for name, ok in checks.items():
        d.metrics.dependency_up.labels(name).set(ok)
    return checks


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
    if name == "correlationId":
        CORRELATION_ID.set(value)  # every log line of this request names its run
    return value


def principal(request: Request) -> Principal:
    """Who is asking (set by the access check: services/api/endpoints.py)."""
    who: Principal = request.state.principal
    return who


async def _run_id(request: Request, d: Deps) -> str:
    """The path's correlationId, once the caller may see its run: a run of another tenant
    (or, for a read token, another run) is answered exactly as no run (404)."""
    correlation_id = _path_id(request, "correlationId")
    if not await d.runs.visible(correlation_id, principal(request)):
        raise ApiError.unknown_run(correlation_id)
    return correlation_id


def _tenant_filter(who: Principal) -> str | None:
    """The tenant whose runs a list shows (None: every tenant's, for an admin)."""
    return None if who.every_tenant else who.tenant


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


def _milestone_answer(
    cid: str, step: StepEvent, applied: dict[str, str], *, read_token: str | None = None
) -> Response:
    url = status_url(cid)
    body = MilestoneReached(
        correlationId=cid, milestone=Milestone.of(step), statusUrl=url, readToken=read_token
    )
    headers = {"Content-Location": url, RUN_STATUS: Status.PENDING.value, **applied}
    return JSONResponse(body, headers=headers)


def _start_answer(
    d: Deps,
    cid: str,
    result: WaitResult,
    applied: dict[str, str],
    *,
    read_token: str | None = None,
) -> Response:
    outcome = result.outcome
    url = status_url(cid)
    headers = dict(applied)
    if result.end is WaitEnd.DRAINED:
        headers["Connection"] = "close"  # this replica is going away
    if given_up := result.failed_start:
        error = ApiError.of(given_up)
        return JSONResponse(error.body, error.status_code, {**headers, **error.headers})
    assert not isinstance(outcome, StartFailed)
    if result.milestone is not None:
        return _milestone_answer(cid, result.milestone, headers, read_token=read_token)
    if outcome is None:
        # Redis lost the claim (flushed, or abandoned and its message missed): retrying
        # claims afresh.
        error = ApiError(503, "the run of this correlationId vanished; retry the start")
        headers["Retry-After"] = str(d.options.retry_after_s)
        return JSONResponse(error.body, status_code=503, headers=headers)
    headers[RUN_STATUS] = outcome.status.value
    if outcome.status is Status.OK:
        headers["Content-Location"] = url
        body = StartOk(correlationId=cid, result=outcome.data, statusUrl=url, readToken=read_token)
        return JSONResponse(body, headers=headers)
    if outcome.status in (Status.ERROR, Status.CANCELLED):
        headers["Content-Location"] = url
        failed = StartFailedBody(
            status=outcome.status.value,
            correlationId=cid,
            error=outcome.error,
            statusUrl=url,
            readToken=read_token,
        )
        return JSONResponse(failed, status_code=_STATUS_CODES[outcome.status], headers=headers)
    retry_after = d.pace.retry_after_s(outcome)
    headers.update({"Location": url, "Content-Location": url, "Retry-After": str(retry_after)})
    pending = Pending(correlationId=cid, statusUrl=url, readToken=read_token)
    return JSONResponse(pending, 202, headers)


async def _answers(check: Awaitable[object]) -> bool:
    """True when the awaitable finishes in time without an error (readiness)."""
    try:
        async with asyncio.timeout(_READY_TIMEOUT_S):
            result = await check
    except Exception:  # noqa: BLE001 - any failure means "not ready", and says so in the body
        return False
    return result is not False
