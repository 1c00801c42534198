"""HTTP bodies: pydantic models at the edge, orjson on the wire. (One module past 400
lines: every body the API takes or gives, in one place, the OpenAPI document's source.)

Field names are the wire names (camelCase, the seed's), so the models, the OpenAPI document
(services/api/openapi.py) and the JSON a client sees are the same thing. Where the seed's
clients read a shape (the README's "Switching from fastify-camunda"), flowgate keeps it and
only adds beside it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from http import HTTPStatus
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union
from urllib.parse import quote

import orjson
from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    SkipValidation,
    ValidationInfo,
    WithJsonSchema,
    field_serializer,
    field_validator,
)
from starlette.responses import Response
from typing_extensions import TypeAliasType

from flowgate.shared.camunda import UserTask
from flowgate.shared.contract import CORRELATION_ID, PRIORITY, SystemVariables
from flowgate.shared.eventlog import EventRecord
from flowgate.shared.state import RunState, iso
from flowgate.shared.steps import StepEvent
from flowgate.shared.variables import VariableError, to_camunda

#: Any text the seed accepts (its clients use business ids: an e-mail, ``order 42``), but
#: what cannot be one URL path segment or a sane key: a slash, control characters, more
#: than 255 characters. Every URL flowgate returns percent-encodes it.
ID_PATTERN = r"^[^/\x00-\x1f\x7f-\x9f]{1,255}$"
#: A process key goes into the engine's URL path, where a backslash is refused and ``.``
#: or ``..`` is a path step; neither can be a BPMN process id (an XML name) anyway.
_KEY_CHAR = r"[^/\\\x00-\x1f\x7f-\x9f]"
PROCESS_KEY_PATTERN = rf"^{_KEY_CHAR}*[^/\\.\x00-\x1f\x7f-\x9f]{_KEY_CHAR}*$"


def _number_as_text(value: Any) -> Any:
    """The seed's schema coerces a number to its string (Fastify/ajv ``coerceTypes``)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


def _text_or_number(description: str, example: str, pattern: str = ID_PATTERN) -> WithJsonSchema:
    """What a client may send: the text, or a number that stands for it."""
    text = {"type": "string", "pattern": pattern, "maxLength": 255}
    return WithJsonSchema(
        {
            "anyOf": [text, {"type": "number"}],
            "description": description,
            "examples": [example],
        },
        mode="validation",
    )


CorrelationId = Annotated[
    str,
    Field(pattern=ID_PATTERN),
    BeforeValidator(_number_as_text),
    _text_or_number(
        "Client-chosen id of one run (a business id: `user@example.com`, `order 42`); no `/`"
        " or control characters, at most 255 characters; a number stands for its string.",
        "user-123-2025-10-28",
    ),
]
ProcessKey = Annotated[
    str,
    Field(pattern=PROCESS_KEY_PATTERN, max_length=255),
    BeforeValidator(_number_as_text),
    _text_or_number(
        "Key of a deployed BPMN process definition.", "onboard-user", PROCESS_KEY_PATTERN
    ),
]
#: An absolute http(s) URL with a host (a name, IPv4 or [IPv6]) and at most a valid port.
CALLBACK_URL_PATTERN = (
    r"^https?://([A-Za-z0-9._~%!$&'()*+,;=-]+|\[[0-9A-Fa-f:.]+\])"
    r"(:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4}))?"
    r"([/?#]\S*)?$"
)
StepName = Annotated[
    str,
    Field(
        pattern=ID_PATTERN,
        description="A step of the run: an activity id of its BPMN, or for an external task "
        "served by flowgate its step name.",
        examples=["validate-user-information"],
    ),
]
Timestamp = Annotated[
    str, Field(json_schema_extra={"format": "date-time"}, examples=["2025-01-31T12:00:00.123Z"])
]

#: The engine stores variable names in a 255-character column.
MAX_VARIABLE_NAME_CHARS = 255
_NO_NUL = "^[^\\u0000]*$"
_Key = Annotated[str, Field(pattern=_NO_NUL)]
_Name = Annotated[str, Field(max_length=MAX_VARIABLE_NAME_CHARS, pattern=_NO_NUL)]
_CLOSED = Field(json_schema_extra={"additionalProperties": False})
#: What a stored JSON value may hold, as the schema documents it (``JsonValue``): no NUL
#: in a string or a key (Postgres text refuses it), integers within 64 bits (a longer one
#: cannot become a variable). Nesting is limited too (MAX_VARIABLES_DEPTH), which a schema
#: cannot say. Documentation only: the validators below check a body in one pass
#: (``SkipValidation`` spares the recursive walk).
if TYPE_CHECKING:  # the fields below skip its validation: to a type checker it is Any
    JsonValue = Any
else:
    JsonValue = TypeAliasType(
        "JsonValue",
        Union[  # noqa: UP007 - a recursive alias needs the Union form
            bool,
            Annotated[int, Field(ge=-(2**63), le=2**63 - 1)],
            Annotated[float, WithJsonSchema({"type": "number", "not": {"type": "integer"}})],
            Annotated[str, Field(pattern=_NO_NUL)],
            list["JsonValue"],
            Annotated[dict[_Key, "JsonValue"], _CLOSED],
            None,
        ],
    )


#: The header on every answer that carries a run's status (start, status, cancel): the
#: run's status, so a client tells a run that ended ``error`` (HTTP 500, as the seed
#: answers) from a fault of the server (500 without it) without reading the body.
RUN_STATUS = "Flowgate-Run-Status"


def status_url(correlation_id: str) -> str:
    """The run's status URL, its id percent-encoded (a path segment of any text)."""
    return f"/api/process/status/{quote(correlation_id, safe='')}"


# --- requests ------------------------------------------------------------------------------


#: A body's ``variables``: an object when given, checked by :func:`storable`.
Variables = SkipValidation[Annotated[dict[_Name, JsonValue], _CLOSED]]


class StartRequest(BaseModel):
    """Unknown fields are ignored, so clients of the original service keep working."""

    processKey: ProcessKey
    # `all` would have /api/process/status/all as its status URL: the list's path.
    correlationId: Annotated[CorrelationId, Field(json_schema_extra={"not": {"const": "all"}})]
    # An object when given (the seed's schema refuses `null` too).
    variables: Variables = Field(
        default_factory=dict,
        description="Process variables (a JSON object); nesting is limited in depth.",
        examples=[{"userId": "user-123"}],
    )
    fetchVariables: list[Annotated[str, Field(min_length=1, max_length=255)]] | None = Field(
        default=None,
        max_length=1000,
        description="When the engine ends the run (not a step that returns the result), the "
        "result holds only these root variables; without it, all but the system variables.",
        examples=[["userId", "approved"]],
    )
    waitUntil: StepName | None = Field(
        default=None,
        description="Answer as soon as this step has finished (200 with `milestone`) instead "
        "of at the end; the run's end or the wait's end still answer as usual.",
    )
    callbackUrl: str | None = Field(
        default=None,
        max_length=2048,
        # Documented here, checked by _absolute_url with a message a person can act on.
        json_schema_extra={"format": "uri", "pattern": CALLBACK_URL_PATTERN},
        description="An http(s) URL the final status body is POSTed to once the run ends (at "
        "least once; signed when the server has a CALLBACK_SECRET).",
        examples=["https://example.com/hooks/flowgate"],
    )

    readToken: bool = Field(
        default=False,
        strict=True,
        description="Answer with `readToken`: a short-lived token that reads this run's status "
        "and events only (as a bearer token or `?access_token=`), for a browser.",
    )

    @field_validator("callbackUrl")
    @classmethod
    def _absolute_url(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(CALLBACK_URL_PATTERN, value):
            raise ValueError("must be an absolute http:// or https:// URL with a host")
        return value

    @field_validator("correlationId")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value == "all":
            raise ValueError("'all' is reserved (it names the list of processes)")
        return value

    @field_validator("variables")
    @classmethod
    def _no_system_variables(cls, value: Any, info: ValidationInfo) -> Any:
        """A start does not set what flowgate sets on every start (a process opts out with
        SYSTEM_VARIABLES_FROM_CLIENTS). The correlationId itself, given again, is harmless."""
        key, correlation_id = info.data.get("processKey"), info.data.get("correlationId")
        if not isinstance(value, dict) or key in (info.context or {}).get(
            "system_variables_from", ()
        ):
            return value
        for name in SystemVariables.NAMES:
            if name in value and (name != CORRELATION_ID or value[name] != correlation_id):
                raise ValueError(
                    f"{name} is a system variable flowgate sets on every start; rename it "
                    "(or list the process in SYSTEM_VARIABLES_FROM_CLIENTS)"
                )
        return value

    @field_validator("variables")
    @classmethod
    def _storable(cls, value: Any, info: ValidationInfo) -> dict[str, Any]:
        return storable(value, info)


def storable(value: Any, info: ValidationInfo) -> dict[str, Any]:
    """Variables a client sends (a start, a task completion, a message): refused here when
    the engine's database (or the audit table) would refuse them later."""
    if not isinstance(value, dict):
        raise ValueError("must be a JSON object")
    if PRIORITY in value:  # a client's own would jump the queue of every other tenant
        raise ValueError(
            f"{PRIORITY} is the run's fetch order, which flowgate sets fairly across tenants; "
            "rename it"
        )
    limit = (info.context or {}).get("max_depth")
    if limit is not None and json_depth(value) > limit:
        raise ValueError(f"nested deeper than {limit} levels")
    for name, variable in value.items():
        if len(name) > MAX_VARIABLE_NAME_CHARS:
            raise ValueError(
                f"the name {name[:40]!r}... is longer than {MAX_VARIABLE_NAME_CHARS} characters"
            )
        if "\x00" in name or _holds_nul(variable):
            raise ValueError(f"variable {name!r} contains a NUL character")
    try:
        to_camunda(value)
    except VariableError as exc:
        raise ValueError(str(exc)) from exc
    return value


class CompleteTaskRequest(BaseModel):
    variables: Variables = Field(
        default_factory=dict,
        description="Variables the completion sets (task form fields, a decision).",
        examples=[{"approved": True}],
    )
    waitUntil: StepName | None = Field(
        default=None,
        description="Answer once this step has finished, instead of at the run's next pause.",
    )

    @field_validator("variables")
    @classmethod
    def _storable(cls, value: Any, info: ValidationInfo) -> dict[str, Any]:
        return storable(value, info)


class MessageRequest(BaseModel):
    messageName: Annotated[str, Field(min_length=1, max_length=255, pattern=ID_PATTERN)] = Field(
        description="The BPMN message's name, as its catch event or receive task names it.",
        examples=["order-confirmed"],
    )
    variables: Variables = Field(
        default_factory=dict,
        description="Variables the message sets on the run (its payload).",
        examples=[{"paymentReference": "pay-42"}],
    )
    messageId: Annotated[str, Field(min_length=1, max_length=255, pattern=ID_PATTERN)] | None = (
        Field(
            default=None,
            description="Makes a resend harmless: the same messageId is correlated at most "
            "once, and answered alike.",
        )
    )
    waitUntil: StepName | None = Field(
        default=None,
        description="Answer once this step has finished, instead of at the run's next pause.",
    )

    @field_validator("variables")
    @classmethod
    def _storable(cls, value: Any, info: ValidationInfo) -> dict[str, Any]:
        return storable(value, info)


class RetryRequest(BaseModel):
    waitUntil: StepName | None = Field(
        default=None,
        description="Answer once this step has finished (200 with `milestone`), instead of "
        "at the run's end.",
    )


class CancelRequest(BaseModel):
    reason: str | None = Field(
        default=None,
        min_length=1,
        max_length=1000,
        pattern=_NO_NUL,
        description="Why (kept as the cancelled run's `error`).",
        examples=["the customer withdrew"],
    )

    @field_validator("reason")
    @classmethod
    def _storable(cls, value: str | None) -> str | None:
        if value is not None and "\x00" in value:
            raise ValueError("contains a NUL character")
        return value


class CompleteRequest(BaseModel):
    correlationId: CorrelationId
    status: Literal["ok", "error"]
    data: SkipValidation[JsonValue] = Field(
        default=None, description="The result (any JSON); kept for `ok`."
    )
    # A string, as the seed's schema has it (its clients send a message).
    error: str | None = Field(
        default=None, pattern=_NO_NUL, description="What went wrong, for `error`."
    )

    @field_validator("data")
    @classmethod
    def _storable(cls, value: Any) -> Any:
        if _holds_nul(value):
            raise ValueError("contains a NUL character")
        if _holds_long_integer(value):
            raise ValueError("holds an integer beyond 64 bits")
        return value


def _holds_nul(value: Any) -> bool:
    """Whether a NUL hides in a JSON value's strings or keys (Postgres text refuses it)."""
    return any(
        "\x00" in text
        for key, item in _leaves(value)
        for text in (key, item)
        if isinstance(text, str)
    )


def _holds_long_integer(value: Any) -> bool:
    """Whether an integer beyond 64 bits hides in a JSON value (it cannot be stored as one:
    the record's codec refuses it)."""
    return any(isinstance(item, int) and not -(2**63) <= item < 2**63 for _, item in _leaves(value))


def _leaves(value: Any) -> Iterator[tuple[str | None, Any]]:
    """Every value of a JSON value with the key it sits under (iterative: a deep value
    cannot exhaust the stack)."""
    stack: list[tuple[str | None, Any]] = [(None, value)]
    while stack:
        key, item = stack.pop()
        yield key, item
        if isinstance(item, dict):
            stack.extend(item.items())
        elif isinstance(item, list):
            stack.extend((None, child) for child in item)


def json_depth(value: Any) -> int:
    """Nesting depth of a JSON value (a scalar is 0, ``{}`` is 1); iterative, so a deep
    value cannot exhaust the stack."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            deepest = max(deepest, depth)
            continue
        deepest = max(deepest, depth + 1)
        stack.extend((child, depth + 1) for child in children)
    return deepest


# --- responses -----------------------------------------------------------------------------


#: The answer's read token, when its start asked for one (left out otherwise).
ReadToken = Annotated[
    str | None,
    Field(
        exclude_if=lambda token: token is None,
        description="Reads this run's status and events only, until it expires "
        "(READ_TOKEN_TTL_S); present when the start asked for `readToken`.",
    ),
]


class StartOk(BaseModel):
    status: Literal["ok"] = "ok"
    correlationId: str
    result: Any = Field(description="The process result (`data` of the completion).")
    statusUrl: str
    readToken: ReadToken = None


class StartFailedBody(BaseModel):
    """The process finished with `error` (HTTP 500, as the seed answers), or was cancelled
    (409)."""

    status: Literal["error", "cancelled"] = "error"
    correlationId: str
    error: Any = Field(description="What went wrong (`error` of the completion).")
    statusUrl: str
    readToken: ReadToken = None


class Pending(BaseModel):
    status: Literal["pending"] = "pending"
    correlationId: str
    statusUrl: str
    readToken: ReadToken = None


class Milestone(BaseModel):
    """A step of the run that has finished."""

    step: str
    status: str = Field(description="`ok`, `error` (a BPMN error) or `cancelled`.")
    data: Any = Field(default=None, description="What the step returned (flowgate steps).")
    error: Any = None
    at: Timestamp

    @classmethod
    def of(cls, step: StepEvent) -> Milestone:
        return cls(
            step=step.step, status=step.status.value, data=step.data, error=step.error,
            at=iso(step.at),
        )  # fmt: skip


class MilestoneReached(BaseModel):
    """The step waited for has finished; the run goes on (follow `statusUrl`)."""

    status: Literal["pending"] = "pending"
    correlationId: str
    milestone: Milestone
    statusUrl: str
    readToken: ReadToken = None


class ProcessStatus(BaseModel):
    status: Literal["pending", "ok", "error", "cancelled", "abandoned"]
    correlationId: str
    processKey: str | None = None
    data: Any = None
    error: Any = None
    startedAt: Timestamp | None = None
    updatedAt: Timestamp | None = None
    statusUrl: str
    waitingOn: list[dict[str, Any]] | None = Field(
        default=None,
        exclude_if=lambda value: value is None,  # only a pending run's answer has one
        description="A pending run's: what it waits for now, one entry per thing: "
        '`{"type":"externalTask","activity","topic","retries","lockedUntil"?}`, '
        '`{"type":"userTask","activity","taskId","assignee"?}`, '
        '`{"type":"message","activity","messageName"}`, `{"type":"timer","activity","dueAt"}`, '
        '`{"type":"incident","activity","message"}` (read from the engine, at most a second old).',
    )

    @classmethod
    def of(cls, state: RunState) -> ProcessStatus:
        return cls(**cls.body(state))

    @staticmethod
    def body(state: RunState) -> dict[str, Any]:
        """The model's JSON, built without the model: status reads are the hottest path
        (tests/unit/test_api_schemas.py holds the two alike)."""
        return {
            "status": state.status.value,
            "correlationId": state.correlation_id,
            "processKey": state.process_key,
            "data": state.data,
            "error": state.error,
            "startedAt": iso(state.started_at),
            "updatedAt": iso(state.updated_at),
            "statusUrl": status_url(state.correlation_id),
        }


class OpenUserTask(BaseModel):
    """A user task of the run waiting for someone (from the engine's runtime)."""

    id: str
    name: str | None = None
    taskDefinitionKey: str
    assignee: str | None = None
    created: Timestamp | None = None
    formKey: str | None = None

    @classmethod
    def of(cls, task: UserTask) -> OpenUserTask:
        return cls(
            id=task.id,
            name=task.name,
            taskDefinitionKey=task.task_definition_key,
            assignee=task.assignee,
            created=iso(task.created) if task.created else None,
            formKey=task.form_key,
        )


class UserTaskList(BaseModel):
    tasks: list[OpenUserTask]


class RunPaused(ProcessStatus):
    """The run waits for the outside world again: the user tasks open now (a message wait
    shows in ``waitingOn``)."""

    tasks: list[OpenUserTask] = Field(default_factory=list)


class StoredRecord(BaseModel):
    """A run's record as the seed's list shows it (under ``data`` of each item)."""

    status: Literal["pending", "ok", "error", "cancelled", "abandoned"]
    data: Any = None
    error: Any = None
    startedAt: Timestamp
    updatedAt: Timestamp


class ListedProcess(BaseModel):
    """One run of the list, in the seed's shape: its id and its record under ``data``
    (``processes[i].data.status``), with flowgate's ``processKey`` and ``statusUrl`` beside."""

    correlationId: str
    data: StoredRecord
    processKey: str
    statusUrl: str

    @classmethod
    def of(cls, state: RunState) -> ListedProcess:
        record = StoredRecord(
            status=state.status.value,
            data=state.data,
            error=state.error,
            startedAt=iso(state.started_at),
            updatedAt=iso(state.updated_at),
        )
        return cls(
            correlationId=state.correlation_id,
            data=record,
            processKey=state.process_key,
            statusUrl=status_url(state.correlation_id),
        )


class StatusPage(BaseModel):
    """The seed's list (``count``, ``processes``), a page at a time."""

    count: int = Field(description="How many processes this page holds.")
    processes: list[ListedProcess]
    nextCursor: str | None = Field(
        description="Pass as `cursor` for the next page; null at the end."
    )

    @classmethod
    def of(cls, states: list[RunState], next_cursor: str | None) -> StatusPage:
        processes = [ListedProcess.of(state) for state in states]
        return cls(count=len(processes), processes=processes, nextCursor=next_cursor)


class CompleteAck(BaseModel):
    received: Literal[True] = True
    changed: bool = Field(description="False when the process had already finished.")


class EventLog(BaseModel):
    """The seed's answer: its ``event_log`` rows, snake_case as in the table."""

    eventLog: list[EventRecord] = Field(description="In step order.")

    @field_serializer("eventLog")
    def _rows(self, rows: list[EventRecord]) -> list[dict[str, Any]]:
        return [{**row.to_dict(), "created_at": iso(row.created_at)} for row in rows]


class ErrorBody(BaseModel):
    """Fastify's error shape (``statusCode``, ``error``, ``message``), which the seed's
    clients log, plus the field at fault; an unknown run also says ``status: not_found``."""

    statusCode: int
    error: str = Field(description="The status's reason phrase (`Bad Request`).")
    message: str = Field(description="What is wrong, in words; names the field at fault.")
    field: str | None = Field(default=None, description="The request field at fault, if one.")
    status: Literal["not_found"] | None = None
    correlationId: str | None = None

    @classmethod
    def of(cls, status_code: int, message: str, **extra: Any) -> ErrorBody:
        return cls(
            statusCode=status_code, error=HTTPStatus(status_code).phrase, message=message, **extra
        )


class Health(BaseModel):
    status: Literal["alive"] = "alive"


class Readiness(BaseModel):
    status: Literal["ready", "degraded", "not ready"] = Field(
        description="`degraded`: serving, but PostgreSQL or the engine is down (`error` "
        "names which); `not ready` (503): Redis or this replica's subscription is down, or "
        "it is draining."
    )
    checks: dict[str, bool] = Field(description="Each dependency: reachable or not.")
    error: str | None = None


# --- the wire ------------------------------------------------------------------------------


class JSONResponse(Response):
    """orjson on the wire; accepts a model (dumped without nulls only where asked)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        if isinstance(content, BaseModel):
            content = content.model_dump(mode="json", exclude_none=isinstance(content, ErrorBody))
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS)
