"""HTTP bodies: pydantic models at the edge, orjson on the wire.

Field names are the wire names (camelCase, the seed's), so the models, the OpenAPI document
(services/api/openapi.py) and the JSON a client sees are the same thing.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, Field, ValidationInfo, field_validator
from starlette.responses import Response

from shared.eventlog import EventRecord
from shared.state import ProcessState, iso
from shared.variables import VariableError, to_camunda

#: Becomes part of Redis keys, channel names and URLs: no glob characters (the wait room's
#: PSUBSCRIBE pattern), no hash-tag braces, no slash, no whitespace.
CORRELATION_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
#: Engine process keys are NCName-like: letters, digits, ``._-``.
PROCESS_KEY_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"

CorrelationId = Annotated[
    str,
    Field(
        pattern=CORRELATION_ID_PATTERN,
        description="Client-chosen id of one run: letters, digits and `._:-`, 1-128 chars.",
        examples=["user-123-2025-10-28"],
    ),
]
ProcessKey = Annotated[
    str,
    Field(
        pattern=PROCESS_KEY_PATTERN,
        description="Key of a deployed BPMN process definition.",
        examples=["onboard-user"],
    ),
]
Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"})]


def status_url(correlation_id: str) -> str:
    return f"/api/process/status/{correlation_id}"


# --- requests ------------------------------------------------------------------------------


class StartRequest(BaseModel):
    """Unknown fields are ignored, so clients of the original service keep working."""

    processKey: ProcessKey
    # `all` would have /api/process/status/all as its status URL: the list's path.
    correlationId: Annotated[CorrelationId, Field(json_schema_extra={"not": {"const": "all"}})]
    variables: dict[str, Any] | None = Field(
        default=None,
        description="Process variables (a JSON object); nesting is limited in depth.",
        examples=[{"userId": "user-123"}],
    )

    @field_validator("correlationId")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value == "all":
            raise ValueError("'all' is reserved (it names the list of processes)")
        return value

    @field_validator("variables")
    @classmethod
    def _storable(cls, value: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        """Refuse here what the engine's database (or the audit table) would refuse later."""
        if value is None:
            return None
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


class CompleteRequest(BaseModel):
    correlationId: CorrelationId
    status: Literal["ok", "error"]
    data: Any = Field(default=None, description="The result (any JSON); kept for `ok`.")
    error: Any = Field(default=None, description="What went wrong (any JSON) for `error`.")

    @field_validator("data", "error")
    @classmethod
    def _storable(cls, value: Any) -> Any:
        if _holds_nul(value):
            raise ValueError("contains a NUL character")
        return value


#: The engine stores variable names in a 255-character column.
MAX_VARIABLE_NAME_CHARS = 255


def _holds_nul(value: Any) -> bool:
    """Whether a NUL hides in a JSON value's strings or keys (Postgres text refuses it)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            if any("\x00" in key for key in item):
                return True
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


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


class StartOk(BaseModel):
    status: Literal["ok"] = "ok"
    correlationId: str
    result: Any = Field(description="The process result (`data` of the completion).")
    statusUrl: str


class StartFailedBody(BaseModel):
    """The process finished with `error` (HTTP 500, as the seed answers)."""

    status: Literal["error"] = "error"
    correlationId: str
    error: Any = Field(description="What went wrong (`error` of the completion).")
    statusUrl: str


class Pending(BaseModel):
    status: Literal["pending"] = "pending"
    correlationId: str
    statusUrl: str


class ProcessStatus(BaseModel):
    status: Literal["pending", "ok", "error"]
    correlationId: str
    processKey: str | None = None
    data: Any = None
    error: Any = None
    startedAt: Timestamp | None = None
    updatedAt: Timestamp | None = None
    statusUrl: str

    @classmethod
    def of(cls, state: ProcessState) -> ProcessStatus:
        return cls(
            status=state.status.value,
            correlationId=state.correlation_id,
            processKey=state.process_key,
            data=state.data,
            error=state.error,
            startedAt=iso(state.started_at),
            updatedAt=iso(state.updated_at),
            statusUrl=status_url(state.correlation_id),
        )


class StatusPage(BaseModel):
    items: list[ProcessStatus]
    nextCursor: str | None = Field(
        description="Pass as `cursor` for the next page; null at the end."
    )


class CompleteAck(BaseModel):
    received: Literal[True] = True
    changed: bool = Field(description="False when the process had already finished.")


class EventLog(BaseModel):
    # The seed's event_log columns, snake_case as in the table (shared/eventlog.py).
    events: list[EventRecord] = Field(description="In step order.")


class ErrorBody(BaseModel):
    error: str = Field(description="What is wrong, in words.")
    field: str | None = Field(default=None, description="The request field at fault, if one.")


class Health(BaseModel):
    status: Literal["alive"] = "alive"


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
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
