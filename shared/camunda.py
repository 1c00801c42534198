"""CamundaClient: a typed async client for the Camunda 7 REST API (``…/engine-rest``).
(One module past 400 lines: the engine's vocabulary, its records and its error tree are one
client's, as httpx keeps its client in one module.)

It speaks the engine's vocabulary one to one (``fetch_and_lock``, ``complete``,
``handle_failure``, ...), puts units in parameter names, and takes and returns plain Python
values for variables: :mod:`flowgate.shared.variables` types them on the way out and decodes them on
the way in. The engine semantics each method relies on are noted where it is defined.

Errors, so callers catch at the level they care about::

    CamundaError                  anything this client raises for a request
    ├── EngineUnavailable         no engine answer: connect/read failure, timeout, or a
    │                             502/503/504 without an engine error body (a proxy speaking);
    │                             ``request_sent`` says whether the engine may have got it
    └── EngineError               the engine refused: status_code, type, message, code
        ├── BadRequest            400: bad variable, wrong worker, expired lock, ...
        └── NotFound              404: no such task or instance (e.g. cancelled, done)
            └── DefinitionNotFound  404 on start: no process definition with that key

Values that cannot become Camunda variables raise :class:`flowgate.shared.variables.VariableError`
(a ``ValueError``) before any request is sent.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import orjson
from pyreqwest.client import Client, ClientBuilder
from pyreqwest.exceptions import ConnectError, RequestError
from pyreqwest.middleware.types import Middleware

from flowgate.shared.aio import concurrently
from flowgate.shared.settings import Settings
from flowgate.shared.state import iso
from flowgate.shared.variables import format_date, from_camunda, parse_date, to_camunda

#: Added to ``asyncResponseTimeout`` for the HTTP read timeout of a long poll, so the
#: engine's empty answer arrives before our own timeout fires.
LONG_POLL_MARGIN_S = 5.0
#: Idle pooled connections are dropped after this, long before the engine's server would.
IDLE_CONNECTION_S = 5.0
#: The engine keeps only this many characters of a failure's errorMessage.
MAX_ERROR_MESSAGE_CHARS = 666

JsonObject = dict[str, Any]
QueryValue = str | int | bool


# --- errors -------------------------------------------------------------------------------


class CamundaError(Exception):
    """Base class: anything this client raises for a request."""


class EngineUnavailable(CamundaError):
    """The engine did not answer (transport error, timeout, or a proxy's 502/503/504).

    ``request_sent`` is False only when the request provably never left (no connection
    could be made): otherwise the engine may have received it, and may still act on it.
    """

    def __init__(self, message: str, *, request_sent: bool = True) -> None:
        super().__init__(message)
        self.request_sent = request_sent


class EngineError(CamundaError):
    """The engine answered with an error body ``{"type", "message", "code"}``."""

    def __init__(self, status_code: int, type: str, message: str, code: int | None) -> None:
        super().__init__(f"{status_code} {type}: {message}")
        self.status_code = status_code
        self.type = type
        self.message = message
        self.code = code

    @property
    def is_optimistic_locking(self) -> bool:
        """A concurrent change rolled the transaction back: retrying is safe."""
        return self.code == 1 or self.type == "OptimisticLockingException"

    @property
    def is_deadlock(self) -> bool:
        """The database chose this transaction as a deadlock victim: retrying is safe."""
        return self.code == 10000


class BadRequest(EngineError):
    """400: the engine rejected the request (variables, worker id, expired lock, ...)."""


class NotFound(EngineError):
    """404: the task, instance or definition does not exist (any more)."""


class DefinitionNotFound(NotFound):
    """404 on start: the engine has no process definition with that key."""


# --- what goes over the wire --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TopicRequest:
    """One topic of a fetchAndLock; ``variables=None`` fetches all of them, ``[]`` none.

    ``business_key`` and ``process_definition_key(s)`` restrict the topic to matching tasks.
    """

    topic_name: str
    lock_duration_ms: int
    variables: Sequence[str] | None = None
    local_variables: bool = False
    business_key: str | None = None
    process_definition_key: str | None = None
    process_definition_keys: Sequence[str] | None = None

    def to_body(self) -> JsonObject:
        """The topic as the request body holds it."""
        body: JsonObject = {
            "topicName": self.topic_name,
            "lockDuration": self.lock_duration_ms,
            "localVariables": self.local_variables,
        }
        if self.variables is not None:
            body["variables"] = list(self.variables)
        if self.business_key is not None:
            body["businessKey"] = self.business_key
        if self.process_definition_key is not None:
            body["processDefinitionKey"] = self.process_definition_key
        if self.process_definition_keys is not None:
            body["processDefinitionKeyIn"] = list(self.process_definition_keys)
        return body


@dataclass(frozen=True, slots=True)
class LockedTask:
    """An external task as fetchAndLock (or the task query) returns it.

    ``retries`` is ``None`` until the first failure; ``variables`` are decoded Python values
    (empty for tasks read from the query, which does not return variables).
    """

    id: str
    topic_name: str
    worker_id: str | None
    process_instance_id: str
    process_definition_key: str
    business_key: str | None
    activity_id: str
    retries: int | None
    priority: int
    lock_expiration_time: datetime | None
    variables: dict[str, Any] = field(default_factory=dict)
    activity_instance_id: str | None = None
    #: When the engine created the task (None from an engine that does not say).
    create_time: datetime | None = None

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> LockedTask:
        lock_expiration = body.get("lockExpirationTime")
        created = body.get("createTime")
        return cls(
            id=body["id"],
            topic_name=body["topicName"],
            worker_id=body.get("workerId"),
            process_instance_id=body["processInstanceId"],
            process_definition_key=body["processDefinitionKey"],
            business_key=body.get("businessKey"),
            activity_id=body["activityId"],
            retries=body.get("retries"),
            priority=body.get("priority") or 0,
            lock_expiration_time=parse_date(lock_expiration) if lock_expiration else None,
            variables=from_camunda(body.get("variables") or {}),
            activity_instance_id=body.get("activityInstanceId"),
            create_time=parse_date(created) if created else None,
        )


@dataclass(frozen=True, slots=True)
class ProcessInstance:
    """A started process instance; ``ended`` is true when it finished without waiting."""

    id: str
    definition_id: str
    business_key: str | None
    ended: bool


@dataclass(frozen=True, slots=True)
class EndedInstance:
    """A process instance's history record once it has ended.

    ``state``: COMPLETED (reached an end), EXTERNALLY_TERMINATED (deleted), or
    INTERNALLY_TERMINATED (ended by a terminate event or an unhandled error).
    """

    id: str
    business_key: str | None
    state: str
    end_time: datetime
    delete_reason: str | None

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> EndedInstance:
        return cls(
            id=body["id"],
            business_key=body.get("businessKey"),
            state=str(body.get("state")),
            end_time=parse_date(body["endTime"]),
            delete_reason=body.get("deleteReason"),
        )


@dataclass(frozen=True, slots=True)
class EndedActivity:
    """One activity instance (a step: a task, an event, a gateway) once it has ended."""

    id: str
    activity_id: str
    activity_name: str | None
    activity_type: str
    process_definition_key: str | None
    process_instance_id: str
    root_process_instance_id: str
    end_time: datetime
    canceled: bool

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> EndedActivity:
        return cls(
            id=body["id"],
            activity_id=body["activityId"],
            activity_name=body.get("activityName"),
            activity_type=str(body.get("activityType")),
            process_definition_key=body.get("processDefinitionKey"),
            process_instance_id=body["processInstanceId"],
            root_process_instance_id=body.get("rootProcessInstanceId") or body["processInstanceId"],
            end_time=parse_date(body["endTime"]),
            canceled=bool(body.get("canceled")),
        )


@dataclass(frozen=True, slots=True)
class Incident:
    """An incident's history record (a job or external task out of retries, ...)."""

    id: str
    process_instance_id: str | None
    root_process_instance_id: str | None
    activity_id: str | None
    incident_type: str
    message: str | None
    create_time: datetime

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Incident:
        return cls(
            id=body["id"],
            process_instance_id=body.get("processInstanceId"),
            root_process_instance_id=body.get("rootProcessInstanceId")
            or body.get("processInstanceId"),
            activity_id=body.get("activityId"),
            incident_type=str(body.get("incidentType")),
            message=body.get("incidentMessage"),
            create_time=parse_date(body["createTime"]),
        )


@dataclass(frozen=True, slots=True)
class UserTask:
    """An open user task (``GET /task``)."""

    id: str
    name: str | None
    task_definition_key: str
    assignee: str | None
    created: datetime | None
    form_key: str | None
    process_instance_id: str | None

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> UserTask:
        created = body.get("created")
        return cls(
            id=body["id"],
            name=body.get("name"),
            task_definition_key=body.get("taskDefinitionKey") or "",
            assignee=body.get("assignee"),
            created=parse_date(created) if created else None,
            form_key=body.get("formKey"),
            process_instance_id=body.get("processInstanceId"),
        )


@dataclass(frozen=True, slots=True)
class MessageWait:
    """A message an instance waits for (a message event subscription)."""

    activity_id: str
    message_name: str


@dataclass(frozen=True, slots=True)
class InstanceWaits:
    """Everything an instance waits for at one moment (:meth:`CamundaClient.waits`)."""

    tasks: tuple[UserTask, ...]
    messages: tuple[MessageWait, ...]
    #: One entry per thing, as ``waitingOn`` shows it (services/api/waiting.py).
    entries: list[JsonObject]


@dataclass(frozen=True, slots=True)
class OpenIncident:
    """An incident open now (``GET /incident``): ``configuration`` is the failed external
    task's or job's id."""

    id: str
    incident_type: str
    activity_id: str | None
    configuration: str
    message: str | None

    #: The incidents a retry resolves by giving their task or job retries back.
    RETRYABLE = frozenset({"failedExternalTask", "failedJob"})

    @property
    def retryable(self) -> bool:
        return self.incident_type in self.RETRYABLE and bool(self.configuration)

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> OpenIncident:
        return cls(
            id=body["id"],
            incident_type=str(body.get("incidentType")),
            activity_id=body.get("activityId"),
            configuration=str(body.get("configuration") or ""),
            message=body.get("incidentMessage"),
        )


@dataclass(frozen=True, slots=True)
class DeployedDefinition:
    id: str
    key: str
    version: int


@dataclass(frozen=True, slots=True)
class Deployment:
    """A deployment; ``process_definitions`` holds only the versions it created (none for
    a duplicate the engine filtered out)."""

    id: str
    name: str | None
    process_definitions: tuple[DeployedDefinition, ...]


# --- the client ---------------------------------------------------------------------------


class CamundaClient:
    """Async client for one engine; use as ``async with CamundaClient(url) as camunda:``.

    HTTP is pyreqwest's (``make bench`` item 9: a tenth of httpx's CPU per call, and the
    engine call is on every start and every task); tests pass a pyreqwest ``middleware``
    that answers in its place. ``timeout_s`` bounds every request except a long poll, which
    may take its ``asyncResponseTimeout`` more.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 10.0,
        authorization: str | None = None,
        middleware: Middleware | None = None,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        builder = (
            ClientBuilder()
            .connect_timeout(timedelta(seconds=timeout_s))
            # Idle connections go long before the engine's server would close them, so a
            # request never meets a connection closed under it.
            .pool_idle_timeout(timedelta(seconds=IDLE_CONNECTION_S))
        )
        if authorization is not None:
            builder = builder.default_headers({"authorization": authorization})
        if middleware is not None:
            builder = builder.with_middleware(middleware)
        self._http: Client = builder.build()
        self._timeout_s = timeout_s

    @classmethod
    def from_settings(cls, settings: Settings, *, middleware: Middleware | None = None) -> Self:
        """The client every service uses: CAMUNDA_BASE_URL, its timeout and credentials."""
        return cls(
            settings.camunda_base_url,
            timeout_s=settings.camunda_timeout_ms / 1000,
            authorization=settings.camunda_authorization,
            middleware=middleware,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.close()

    # --- engine and processes -----------------------------------------------------------

    async def version(self) -> str:
        """The engine's version (``GET /version``; Camunda 7 and Operaton serve it)."""
        answer = await self._send("GET", "/version")
        return str(orjson.loads(answer.content).get("version"))

    async def introduce(self, log: logging.Logger, *, timeout_s: float = 5.0) -> None:
        """Say once, at start-up, which engine answers and whether it takes flowgate's
        credentials. Never fails the start: the engine may come up after flowgate."""
        try:
            async with asyncio.timeout(timeout_s):
                version = await self.version()
        except EngineError as exc:
            refused = exc.status_code in (401, 403)
            log.log(logging.ERROR if refused else logging.WARNING, "engine: %s", exc)
        except (EngineUnavailable, TimeoutError) as exc:
            log.warning("engine not reachable yet at %s: %s", self._base_url, exc)
        else:
            log.info("engine %s at %s", version, self._base_url)

    async def engine_ok(self) -> bool:
        """True when the engine answers its engine list (for readiness probes)."""
        try:
            await self._send("GET", "/engine")
        except CamundaError:
            return False
        return True

    async def start_process(
        self,
        key: str,
        *,
        business_key: str | None = None,
        variables: Mapping[str, Any] | None = None,
    ) -> ProcessInstance:
        """Start the latest version of ``key``; raises :class:`DefinitionNotFound` if none."""
        body: JsonObject = {"variables": to_camunda(variables or {})}
        if business_key is not None:
            body["businessKey"] = business_key
        try:
            response = await self._send(
                "POST", f"/process-definition/key/{_segment(key)}/start", json=body
            )
        except NotFound as exc:
            raise DefinitionNotFound(exc.status_code, exc.type, exc.message, exc.code) from exc
        instance = _body(response)
        return ProcessInstance(
            id=instance["id"],
            definition_id=instance["definitionId"],
            business_key=instance.get("businessKey"),
            ended=bool(instance.get("ended")),
        )

    async def deploy(
        self,
        name: str,
        files: Mapping[str, bytes],
        *,
        duplicate_filtering: bool = True,
        changed_only: bool = True,
    ) -> Deployment:
        """Deploy resources named by their keys (the engine uses the filename as name)."""
        form = {
            "deployment-name": name,
            "enable-duplicate-filtering": _flag(duplicate_filtering),
            "deploy-changed-only": _flag(changed_only),
        }
        parts = [(resource, (resource, content)) for resource, content in files.items()]
        content, content_type = _multipart(form, parts)
        response = await self._send(
            "POST", "/deployment/create", content=content, content_type=content_type
        )
        body = _body(response)
        definitions = (body.get("deployedProcessDefinitions") or {}).values()
        return Deployment(
            id=body["id"],
            name=body.get("name"),
            process_definitions=tuple(
                DeployedDefinition(id=d["id"], key=d["key"], version=d["version"])
                for d in definitions
            ),
        )

    # --- external tasks -----------------------------------------------------------------

    async def fetch_and_lock(
        self,
        worker_id: str,
        topics: Sequence[TopicRequest],
        *,
        max_tasks: int,
        async_response_timeout_ms: int | None,
        use_priority: bool = True,
    ) -> list[LockedTask]:
        """Lock up to ``max_tasks`` tasks across ``topics``; long-polls when a timeout is given.

        With ``async_response_timeout_ms`` the engine holds the request until a task appears
        or the time is up (then it answers ``[]``); the HTTP read timeout is set above it.
        Oldest tasks first (after priority): unsorted, the engine hands out waiting tasks in
        no particular order and some starve under load (measured p99 10 s at 64 in flight).
        """
        body: JsonObject = {
            "workerId": worker_id,
            "maxTasks": max_tasks,
            "usePriority": use_priority,
            "sorting": [{"sortBy": "createTime", "sortOrder": "asc"}],
            "topics": [topic.to_body() for topic in topics],
        }
        read_s = self._timeout_s
        if async_response_timeout_ms is not None:
            body["asyncResponseTimeout"] = async_response_timeout_ms
            read_s = max(read_s, async_response_timeout_ms / 1000 + LONG_POLL_MARGIN_S)
        response = await self._send(
            "POST", "/external-task/fetchAndLock", json=body, timeout_s=read_s
        )
        return [LockedTask.from_json(task) for task in _body(response)]

    async def complete(
        self,
        task_id: str,
        *,
        worker_id: str,
        variables: Mapping[str, Any] | None = None,
        local_variables: Mapping[str, Any] | None = None,
    ) -> None:
        """Complete a task locked by ``worker_id``; ``local_variables`` stay on its scope."""
        body: JsonObject = {"workerId": worker_id}
        if variables:
            body["variables"] = to_camunda(variables)
        if local_variables:
            body["localVariables"] = to_camunda(local_variables)
        await self._send("POST", f"/external-task/{_segment(task_id)}/complete", json=body)

    async def handle_failure(
        self,
        task_id: str,
        *,
        worker_id: str,
        error_message: str,
        error_details: str | None = None,
        retries: int,
        retry_timeout_ms: int,
    ) -> None:
        """Report a failure. ``retries`` is what is left: at 0 the engine raises an incident.

        It is always sent, because an omitted ``retries`` means 0 to the engine.
        """
        if retries < 0 or retry_timeout_ms < 0:
            raise ValueError(f"retries ({retries}) and retry_timeout_ms must be >= 0")
        body: JsonObject = {
            "workerId": worker_id,
            "errorMessage": error_message[:MAX_ERROR_MESSAGE_CHARS],
            "retries": retries,
            "retryTimeout": retry_timeout_ms,
        }
        if error_details is not None:
            body["errorDetails"] = error_details
        await self._send("POST", f"/external-task/{_segment(task_id)}/failure", json=body)

    async def handle_bpmn_error(
        self,
        task_id: str,
        *,
        worker_id: str,
        error_code: str,
        error_message: str | None = None,
        variables: Mapping[str, Any] | None = None,
    ) -> None:
        """Throw a BPMN error from the task; a boundary error event catches it."""
        body: JsonObject = {"workerId": worker_id, "errorCode": error_code}
        if error_message is not None:
            body["errorMessage"] = error_message
        if variables:
            body["variables"] = to_camunda(variables)
        await self._send("POST", f"/external-task/{_segment(task_id)}/bpmnError", json=body)

    async def extend_lock(self, task_id: str, *, worker_id: str, new_duration_ms: int) -> None:
        """Lock until now + ``new_duration_ms``; :class:`BadRequest` once the lock is lost."""
        body = {"workerId": worker_id, "newDuration": new_duration_ms}
        await self._send("POST", f"/external-task/{_segment(task_id)}/extendLock", json=body)

    async def unlock(self, task_id: str) -> None:
        """Release a task (any worker's) so it can be fetched again at once."""
        await self._send("POST", f"/external-task/{_segment(task_id)}/unlock")

    async def locked_tasks(self, worker_id: str) -> list[LockedTask]:
        """Tasks still locked by ``worker_id`` (without variables), e.g. to unlock on start."""
        params: dict[str, QueryValue] = {"workerId": worker_id, "locked": True}
        response = await self._send("GET", "/external-task", params=params)
        return [LockedTask.from_json(task) for task in _body(response)]

    # --- people and messages --------------------------------------------------------------

    async def user_tasks(self, instance_id: str) -> list[UserTask]:
        """The instance's open user tasks, oldest first (from the runtime: consistent at
        once, unlike a search index)."""
        params: dict[str, QueryValue] = {
            "processInstanceId": instance_id,
            "sortBy": "created",
            "sortOrder": "asc",
        }
        return [
            UserTask.from_json(t) for t in _objects(await self._send("GET", "/task", params=params))
        ]

    async def complete_user_task(self, task_id: str, *, variables: Mapping[str, Any]) -> None:
        """Complete a user task: the engine then runs the instance on to its next wait."""
        body = {"variables": to_camunda(variables)}
        await self._send("POST", f"/task/{_segment(task_id)}/complete", json=body)

    async def correlate_message(
        self, name: str, *, instance_id: str, variables: Mapping[str, Any]
    ) -> None:
        """Deliver the message ``name`` to the instance; :class:`BadRequest` when it does
        not wait for one of that name."""
        body: JsonObject = {"messageName": name, "processInstanceId": instance_id}
        if variables:
            body["processVariables"] = to_camunda(variables)
        await self._send("POST", "/message", json=body)

    async def message_waits(self, instance_id: str) -> list[MessageWait]:
        """The messages the instance waits for now (armed catch events and receive tasks)."""
        params: dict[str, QueryValue] = {"processInstanceId": instance_id, "eventType": "message"}
        answer = await self._send("GET", "/event-subscription", params=params)
        return [
            MessageWait(
                activity_id=s.get("activityId") or "", message_name=s.get("eventName") or ""
            )
            for s in _objects(answer)
        ]

    async def waits(
        self,
        instance_id: str,
        *,
        tasks: Sequence[UserTask] | None = None,
        messages: Sequence[MessageWait] | None = None,
    ) -> InstanceWaits:
        """What the instance waits for now: its external tasks, user tasks, message waits,
        timers and incidents, from the runtime (five reads, at once). ``tasks`` and
        ``messages``: its user tasks and message waits as the caller has just read them,
        not read again."""
        of = {"processInstanceId": instance_id}
        async with concurrently() as reads:
            externals = reads.create_task(self._send("GET", "/external-task", params=of))
            tasks_read = (
                None if tasks is not None else reads.create_task(self.user_tasks(instance_id))
            )
            messages_read = (
                None if messages is not None else reads.create_task(self.message_waits(instance_id))
            )
            timers = reads.create_task(self._send("GET", "/job", params={**of, "timers": True}))
            incidents = reads.create_task(self._send("GET", "/incident", params=of))
        tasks = tuple(tasks_read.result() if tasks_read is not None else tasks or ())
        messages = tuple(messages_read.result() if messages_read is not None else messages or ())
        waits: list[JsonObject] = [
            {
                "type": "externalTask",
                "activity": e.get("activityId"),
                "topic": e.get("topicName"),
                "retries": e.get("retries"),
                **(
                    {"lockedUntil": _iso(e["lockExpirationTime"])}
                    if e.get("lockExpirationTime")
                    else {}
                ),
            }
            for e in _objects(externals.result())
        ]
        waits += [
            {
                "type": "userTask",
                "activity": task.task_definition_key,
                "taskId": task.id,
                **({"assignee": task.assignee} if task.assignee else {}),
            }
            for task in tasks
        ]
        waits += [
            {"type": "message", "activity": m.activity_id, "messageName": m.message_name}
            for m in messages
        ]
        for job in _objects(timers.result()):
            definition = _body(
                await self._send("GET", f"/job-definition/{_segment(job['jobDefinitionId'])}")
            )
            waits.append(
                {
                    "type": "timer",
                    "activity": definition.get("activityId"),
                    "dueAt": _iso(job["dueDate"]) if job.get("dueDate") else None,
                }
            )
        waits += [
            {
                "type": "incident",
                "activity": i.get("activityId"),
                "message": i.get("incidentMessage"),
            }
            for i in _objects(incidents.result())
        ]
        return InstanceWaits(tasks, messages, waits)

    # --- incidents ------------------------------------------------------------------------

    async def open_incidents(self, instance_id: str) -> list[OpenIncident]:
        """The incidents open now in the instance (and the instances it called)."""
        params: dict[str, QueryValue] = {"processInstanceId": instance_id}
        answer = await self._send("GET", "/incident", params=params)
        return [OpenIncident.from_json(body) for body in _objects(answer)]

    async def set_retries(self, incident: OpenIncident, retries: int) -> None:
        """Give the external task or job an incident stopped its retries back: the engine
        resolves the incident and tries it again."""
        kind = "external-task" if incident.incident_type == "failedExternalTask" else "job"
        body = {"retries": retries}
        await self._send("PUT", f"/{kind}/{_segment(incident.configuration)}/retries", json=body)

    # --- queries -----------------------------------------------------------------------

    async def historic_process_instances_with(
        self, *, business_key: str, variables_equal: Mapping[str, str]
    ) -> list[JsonObject]:
        """History records of ``business_key`` whose variables have these values.

        The POST form of the query: the GET form packs conditions into ``name_op_value``
        strings, which cannot express a variable name that contains ``_``.
        """
        body = {
            "processInstanceBusinessKey": business_key,
            "variables": [
                {"name": name, "operator": "eq", "value": value}
                for name, value in variables_equal.items()
            ],
        }
        return _objects(await self._send("POST", "/history/process-instance", json=body))

    async def historic_process_instance(self, instance_id: str) -> JsonObject | None:
        """The instance's history record, or None when the engine kept none."""
        path = f"/history/process-instance/{_segment(instance_id)}"
        try:
            record: JsonObject = _body(await self._send("GET", path))
        except NotFound:
            return None
        return record

    async def variable_updates(self, instance_id: str, *, max_results: int) -> list[JsonObject]:
        """The instance's recorded variable changes (history level ``full`` records them)."""
        params: dict[str, QueryValue] = {
            "processInstanceId": instance_id,
            "variableUpdates": True,
            "maxResults": max_results,
        }
        return _objects(await self._send("GET", "/history/detail", params=params))

    async def delete_history(self, instance_id: str) -> None:
        """Delete an ended instance's history."""
        await self._send("DELETE", f"/history/process-instance/{_segment(instance_id)}")

    async def waiting_topics(self) -> list[str]:
        """The topics that have tasks no worker has locked and that have retries left."""
        params: dict[str, QueryValue] = {"withUnlockedTasks": True, "withRetriesLeft": True}
        return [
            str(name)
            for name in _body(await self._send("GET", "/external-task/topic-names", params=params))
        ]

    async def waiting_tasks(self, topic: str) -> tuple[int, datetime | None]:
        """How many tasks of ``topic`` wait for a worker (unlocked, retries left), and when
        the oldest of them was created (None: none, or an engine that does not say)."""
        params: dict[str, QueryValue] = {
            "topicName": topic,
            "notLocked": True,
            "withRetriesLeft": True,
        }
        async with concurrently() as reads:
            counting = reads.create_task(self._send("GET", "/external-task/count", params=params))
            oldest = reads.create_task(
                self._send(
                    "GET",
                    "/external-task",
                    params={**params, "sortBy": "createTime", "sortOrder": "asc", "maxResults": 1},
                )
            )
        count = int(_body(counting.result())["count"])
        first = _objects(oldest.result())
        created = first[0].get("createTime") if first else None
        return count, parse_date(created) if created else None

    # --- what happened: history, for the runs whose steps flowgate did not run ----------

    async def ended_instances(self, after: datetime, *, max_results: int) -> list[EndedInstance]:
        """Process instances that ended at or after ``after``, oldest end first."""
        params = _since("finishedAfter", after, max_results, "endTime")
        response = await self._send("GET", "/history/process-instance", params=params)
        return [EndedInstance.from_json(item) for item in _body(response)]

    async def ended_activities(self, after: datetime, *, max_results: int) -> list[EndedActivity]:
        """Activity instances (of every process) that ended at or after ``after``."""
        params = _since("finishedAfter", after, max_results, "endTime")
        response = await self._send("GET", "/history/activity-instance", params=params)
        return [EndedActivity.from_json(item) for item in _body(response)]

    async def incidents_since(self, after: datetime, *, max_results: int) -> list[Incident]:
        """Incidents (open, or resolved since) created at or after ``after``."""
        params = _since("createTimeAfter", after, max_results, "createTime")
        response = await self._send("GET", "/history/incident", params=params)
        return [Incident.from_json(item) for item in _body(response)]

    async def open_activities(
        self, activity_id: str, *, started_before: datetime, max_results: int = 200
    ) -> list[JsonObject]:
        """Activity instances of ``activity_id`` (in any process) still open that started
        before ``started_before``, oldest first: what a stall threshold looks for."""
        params: dict[str, QueryValue] = {
            "activityId": activity_id,
            "unfinished": True,
            "startedBefore": format_date(started_before),
            "sortBy": "startTime",
            "sortOrder": "asc",
            "maxResults": max_results,
        }
        return _objects(await self._send("GET", "/history/activity-instance", params=params))

    async def latest_definitions(self) -> list[JsonObject]:
        """The latest version of every deployed process definition."""
        params: dict[str, QueryValue] = {"latestVersion": True}
        return _objects(await self._send("GET", "/process-definition", params=params))

    async def definition_xml(self, definition_id: str) -> str:
        """A process definition's BPMN 2.0 XML."""
        path = f"/process-definition/{_segment(definition_id)}/xml"
        return str(_body(await self._send("GET", path))["bpmn20Xml"])

    async def business_keys(self, instance_ids: Sequence[str]) -> dict[str, str]:
        """Instance id -> business key (history: ended instances too)."""
        if not instance_ids:
            return {}
        body = {"processInstanceIds": list(instance_ids)}
        found = _objects(await self._send("POST", "/history/process-instance", json=body))
        return {
            str(item["id"]): str(item["businessKey"]) for item in found if item.get("businessKey")
        }

    async def root_variables(self, instance_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Each instance's process-level variables (not those of its inner scopes), decoded,
        from history: this works for instances that have ended."""
        if not instance_ids:
            return {}
        body = {"processInstanceIdIn": list(instance_ids)}
        response = await self._send(
            "POST", "/history/variable-instance", json=body, params={"deserializeValues": False}
        )
        found: dict[str, dict[str, Mapping[str, Any]]] = {i: {} for i in instance_ids}
        for variable in _body(response):
            instance = variable.get("processInstanceId")
            if instance in found and variable.get("activityInstanceId") == instance:
                found[instance][variable["name"]] = variable
        return {instance: from_camunda(variables) for instance, variables in found.items()}

    async def delete_process_instance(self, instance_id: str) -> None:
        """Delete a running instance (its history stays, EXTERNALLY_TERMINATED)."""
        await self._send("DELETE", f"/process-instance/{_segment(instance_id)}")

    async def instance_running(self, instance_id: str) -> bool:
        """Whether the instance still runs (False once it has ended or never existed)."""
        try:
            await self._send("GET", f"/process-instance/{_segment(instance_id)}")
        except NotFound:
            return False
        return True

    # --- plumbing -----------------------------------------------------------------------

    async def _send(
        self,
        method: str,
        path: str,
        *,
        json: object = None,
        params: Mapping[str, QueryValue] | None = None,
        timeout_s: float | None = None,
        content: bytes | None = None,
        content_type: str = "application/json",
    ) -> _Answer:
        """One request; raises the error tree above for anything but a 2xx."""
        if json is not None:
            content = orjson.dumps(json)
        request = (
            self._http.request(method, self._base_url + path)
            .header("accept", "application/json")
            .timeout(timedelta(seconds=timeout_s or self._timeout_s))
        )
        if content is not None:
            request = request.header("content-type", content_type).body_bytes(content)
        if params:
            request = request.query({k: _query_value(v) for k, v in params.items()})
        try:
            response = await request.build().send()
            answer = _Answer(response.status, bytes(await response.bytes()))
        except RequestError as exc:
            # Only a refused connection proves the engine never got the request: pyreqwest
            # reports a request that reached the engine and then timed out as a *connect*
            # timeout (0.15), so every other failure counts as maybe received.
            raise EngineUnavailable(
                f"{method} {path}: {type(exc).__name__}: {exc}",
                request_sent=not isinstance(exc, ConnectError),
            ) from exc
        if not 200 <= answer.status_code < 300:
            raise _error(answer, f"{method} {path}")
        return answer


@dataclass(frozen=True, slots=True)
class _Answer:
    status_code: int
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")


def _query_value(value: QueryValue) -> str:
    return _flag(value) if isinstance(value, bool) else str(value)


def _multipart(
    form: Mapping[str, str], files: Sequence[tuple[str, tuple[str, bytes]]]
) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body of text fields and files, and its content type."""
    boundary = uuid.uuid4().hex
    start = f"--{boundary}\r\nContent-Disposition: form-data; name="
    parts = [f'{start}"{name}"\r\n\r\n{value}\r\n'.encode() for name, value in form.items()]
    for name, (filename, data) in files:
        head = f'{start}"{name}"; filename="{filename}"\r\n'
        parts.append(f"{head}Content-Type: application/octet-stream\r\n\r\n".encode())
        parts.append(data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _error(response: _Answer, what: str) -> CamundaError:
    """The exception for an error response (see the tree in the module docstring)."""
    body = _error_body(response)
    status = response.status_code
    if body is None:
        if status in (502, 503, 504):
            return EngineUnavailable(f"{what}: HTTP {status} without an engine error body")
        body = {"type": "", "message": response.text[:500]}
    if status in (401, 403):
        body["message"] = (
            f"{what}: the engine refused flowgate's credentials (HTTP {status}; set "
            f"CAMUNDA_USERNAME and CAMUNDA_PASSWORD, or CAMUNDA_TOKEN): {body.get('message')}"
        )
    error_class = {400: BadRequest, 404: NotFound}.get(status, EngineError)
    return error_class(
        status, str(body.get("type") or ""), str(body.get("message")), body.get("code")
    )


def _error_body(response: _Answer) -> JsonObject | None:
    """The engine's ``{"type", "message", "code"}``, or ``None`` when someone else answered."""
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return None
    return body if isinstance(body, dict) and "message" in body else None


def _body(response: _Answer) -> Any:
    return orjson.loads(response.content)


def _objects(response: _Answer) -> list[JsonObject]:
    """A query's answer: a JSON array of objects."""
    objects: list[JsonObject] = _body(response)
    return objects


def _since(name: str, after: datetime, max_results: int, sort_by: str) -> dict[str, QueryValue]:
    """A history query's parameters: from ``after`` on, oldest first, one page."""
    return {
        name: format_date(after),
        "sortBy": sort_by,
        "sortOrder": "asc",
        "maxResults": max_results,
    }


def _iso(engine_date: str) -> str:
    """An engine date as flowgate writes every timestamp (JavaScript's ISO form, UTC)."""
    return iso(parse_date(engine_date))


def _segment(value: str) -> str:
    """A path segment, escaped: keys and ids come from callers."""
    return quote(value, safe="")


def _flag(value: bool) -> str:
    return "true" if value else "false"
