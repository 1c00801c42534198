"""The endpoint table, :data:`ENDPOINTS`: the one place the URL map, the access checks and
the OpenAPI document (services/api/openapi.py) are derived from.

A row names the method and path, the function that serves it (services/api/routes.py), who
may call it (services/api/auth.py), and what it answers, documented once.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from flowgate.services.api.auth import Access, Auth
from flowgate.services.api.deps import deps
from flowgate.services.api.routes import (
    cancel_process,
    complete_process,
    complete_user_task,
    docs,
    event_log,
    healthz,
    list_processes,
    list_user_tasks,
    metrics,
    openapi,
    process_events,
    process_status,
    readyz,
    retry_process,
    send_message,
    start_process,
)
from flowgate.services.api.schemas import (
    RUN_STATUS,
    CancelRequest,
    CompleteAck,
    CompleteRequest,
    CompleteTaskRequest,
    ErrorBody,
    EventLog,
    Health,
    MessageRequest,
    MilestoneReached,
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
)
from flowgate.shared.tenancy import Scope
from flowgate.shared.tracing import OFF, Tracing

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
    #: The scope a client credential must hold here (client endpoints only).
    scope: Scope | None = None
    #: Whether a run's read token is accepted (services/api/readtokens.py).
    read_token: bool = False
    #: Whether a tenant's limits can refuse it (429: services/api/limits.py).
    limited: bool = False


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
        errors=(400, 404, 408, 413, 415, 422, 502, 503),
        scope=Scope.START,
        limited=True,
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
        scope=Scope.READ,
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
        scope=Scope.READ,
        read_token=True,
        limited=True,
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
        scope=Scope.READ,
        read_token=True,
        limited=True,
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
        errors=(400, 404, 408, 413, 415, 502, 503),
        scope=Scope.CANCEL,
    ),
    Endpoint(
        "POST",
        "/api/process/message/{correlationId}",
        send_message,
        Access.CLIENT,
        "Send a BPMN message to the run, and answer with what it caused.",
        "Correlated to the run's engine instance. One that arrives before the run waits for it "
        "is held (MESSAGE_HOLD_MS) and correlated the moment the wait is armed, exactly once; "
        "`messageId` makes a resend harmless. The answer waits (SYNC_TIMEOUT_MS, or "
        "`Prefer: wait=N`) until the run ends, reaches `waitUntil`, or pauses again.",
        parameters=("correlationId", "Prefer"),
        body=MessageRequest,
        replies={
            200: Reply(
                "Correlated; the run paused again (RunPaused, with its open tasks), ended "
                "`ok` (ProcessStatus), or finished the step asked for (MilestoneReached).",
                RunPaused,
                headers=(*_RUN_HEADERS, "Preference-Applied"),
                also=(ProcessStatus, MilestoneReached),
            ),
            202: Reply(
                "Correlated (or still held) and the run goes on past the wait (poll `Location`).",
                RunPaused,
                headers=(*_PENDING_HEADERS, "Preference-Applied"),
            ),
            409: Reply(
                "The run had ended (its status body), or did not wait for the message "
                "within MESSAGE_HOLD_MS (an error body naming it).",
                ProcessStatus,
                also=(ErrorBody,),
            ),
            500: Reply("The run ended `error`.", ProcessStatus, headers=_RUN_HEADERS),
        },
        errors=(400, 404, 408, 413, 415, 422, 502, 503),
        scope=Scope.MESSAGE,
        limited=True,
    ),
    Endpoint(
        "POST",
        "/api/process/retry/{correlationId}",
        retry_process,
        Access.CLIENT,
        "Retry a run an incident ended, from its failed step.",
        "For a run that ended `error` because a task or job ran out of retries: it gets its "
        "retries back, the run is `pending` again under the same correlationId (its waiters, "
        "event streams and callback work again) and the answer waits as a start's does. "
        "Completed steps do not run again. The body is optional.",
        parameters=("correlationId", "Prefer"),
        body=RetryRequest,
        body_required=False,
        replies={
            200: Reply(
                "The run ended `ok` within the wait (StartOk), or the step named in "
                "`waitUntil` has finished (MilestoneReached).",
                StartOk,
                headers=(*_RUN_HEADERS, "Preference-Applied"),
                also=(MilestoneReached,),
            ),
            202: Reply(
                "Retried; still running when the wait ended (poll `Location`).",
                Pending,
                headers=(*_PENDING_HEADERS, "Preference-Applied"),
            ),
            409: Reply(
                "The run is not `error`, or ended `error` by no incident (a BPMN error end, "
                "a cancel): its status body.",
                ProcessStatus,
                headers=_RUN_HEADERS,
            ),
            500: Reply(
                "The run failed again within the wait.", StartFailedBody, headers=_RUN_HEADERS
            ),
        },
        errors=(400, 404, 408, 413, 415, 502, 503),
        scope=Scope.START,
        limited=True,
    ),
    Endpoint(
        "GET",
        "/api/process/tasks/{correlationId}",
        list_user_tasks,
        Access.CLIENT,
        "The run's open user tasks, read from the engine (consistent at once).",
        "None once the run has ended.",
        parameters=("correlationId",),
        replies={200: Reply("The open user tasks, oldest first.", UserTaskList)},
        errors=(400, 404, 502, 503),
        scope=Scope.READ,
    ),
    Endpoint(
        "POST",
        "/api/process/tasks/{correlationId}/{taskId}/complete",
        complete_user_task,
        Access.CLIENT,
        "Complete a user task of the run, and answer with what came of it.",
        "The answer waits (SYNC_TIMEOUT_MS, or `Prefer: wait=N`) until the run ends, reaches "
        "the step named in `waitUntil`, or pauses again: a new open user task or a message "
        "wait (200 with the open `tasks`). Of two completions of one task, one is 200 and "
        "the other 409. The body is optional.",
        parameters=("correlationId", "taskId", "Prefer"),
        body=CompleteTaskRequest,
        body_required=False,
        replies={
            200: Reply(
                "The run paused again (RunPaused, with its open tasks), ended `ok` "
                "(ProcessStatus), or finished the step asked for (MilestoneReached).",
                RunPaused,
                headers=(*_RUN_HEADERS, "Preference-Applied"),
                also=(ProcessStatus, MilestoneReached),
            ),
            202: Reply(
                "Completed; the run goes on past the wait (poll `Location`).",
                RunPaused,
                headers=(*_PENDING_HEADERS, "Preference-Applied"),
            ),
            409: Reply(
                "The run had ended (its status body), or the task was completed already "
                "(an error body).",
                ProcessStatus,
                also=(ErrorBody,),
            ),
            500: Reply("The run ended `error`.", ProcessStatus, headers=_RUN_HEADERS),
        },
        errors=(400, 404, 408, 413, 415, 502, 503),
        scope=Scope.MESSAGE,
        limited=True,
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
        errors=(400, 404, 408, 413, 415, 503),
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
            scope=Scope.READ,
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
        "Whether this replica can serve: Redis and its subscription, not draining.",
        "PostgreSQL and the engine are reported (`degraded`, with `error` naming them) "
        "but keep the replica ready: their outage shows in the answers that need them.",
        replies={
            200: Reply("Ready, or degraded.", Readiness),
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


#: The start, which services/api/refusals.py may answer before routing.
START = next(e for e in ENDPOINTS if e.handler is start_process)


def routes(auth: Auth, tracing: Tracing = OFF) -> list[Route]:
    """The URL map: each endpoint behind the access check its row declares."""
    return [Route(e.path, _guarded(e, auth, tracing), methods=[e.method]) for e in ENDPOINTS]


def _guarded(endpoint: Endpoint, auth: Auth, tracing: Tracing) -> Endpoint_:
    """The endpoint behind its access check: the caller's principal is
    ``request.state.principal`` for the endpoint (routes.principal)."""
    handler, access, scope = endpoint.handler, endpoint.access, endpoint.scope

    @functools.wraps(handler)
    async def checked(request: Request) -> Response:
        tracing.name_request(endpoint.method, endpoint.path)
        read_tokens = (lambda: deps(request).read_tokens) if endpoint.read_token else None
        request.state.principal = await auth.principal(
            request, access, scope, read_tokens=read_tokens
        )
        return await handler(request)

    # What the metrics label the answer by (services/api/metrics.py): the route template.
    checked.route = endpoint.path  # type: ignore[attr-defined]
    return checked
