"""The contract between the API and the workers, in one place.

* the **system variables** the API sets on every engine instance it starts (the seed's
  names), and how a task names the run it belongs to;
* the **run channel's messages** (a partition's channel ``{p:n}:run``, shared/keys.py): the
  run's correlationId, a newline, then a finished run's state, the news that the start a
  request joined has failed (:class:`StartFailed`), or that a step was recorded
  (:class:`StepRecorded`); a finish may add a newline and the traceparent of the span that
  ended the run. shared/store/scripts.py's Lua publishes them.

Producers and consumers import these names from here, so a rename fails at import time in
both services, not at runtime in one.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from flowgate.shared.camunda import LockedTask
from flowgate.shared.state import RunState, Status
from flowgate.shared.tracing import TRACEPARENT, valid_traceparent

#: The variable holding the run's correlationId (the engine's businessKey holds it too).
CORRELATION_ID = "correlationId"
#: The variable a named tenant's run carries its workers' fetch order in: 0, or less the more
#: runs its tenant started just before (services/api/limits.py). A process uses it as its
#: external tasks' priority (``camunda:taskPriority``, see :data:`TASK_PRIORITY`).
PRIORITY = "flowgatePriority"
#: The process attribute that makes the engine hand tasks out in that order (a run started
#: elsewhere, without the variable, gets 0).
TASK_PRIORITY = (
    f"${{execution.getVariable('{PRIORITY}') != null ? execution.getVariable('{PRIORITY}') : 0}}"
)
#: A pending run's ``data`` until a step reports progress (the seed's).
QUEUED: dict[str, Any] = {"step": "queued"}


@dataclass(frozen=True, slots=True)
class SystemVariables:
    """The ids every run carries through the engine (seed: ``batch_id``,
    ``traceability_id``, ``application_id`` as UUIDs, ``identifiers`` as Json)."""

    correlation_id: str
    batch_id: str
    traceability_id: str
    application_id: str

    #: The variable names, as the engine and the handlers see them.
    NAMES = (CORRELATION_ID, "batch_id", "traceability_id", "application_id", "identifiers")

    @classmethod
    def new(cls, correlation_id: str) -> SystemVariables:
        return cls(correlation_id, str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4()))

    @classmethod
    def of(cls, state: RunState) -> SystemVariables:
        return cls(
            state.correlation_id,
            state.batch_id or "",
            state.traceability_id or "",
            state.application_id or "",
        )

    @property
    def identifiers(self) -> dict[str, str]:
        return {"applicationId": self.application_id}

    @classmethod
    def result_of(cls, variables: Mapping[str, Any], fetch: list[str] | None) -> dict[str, Any]:
        """A run's result from its root variables, when the engine ended it: those named
        in ``fetch`` (the start's ``fetchVariables``), or all of them but these, the run's
        ``traceparent`` and its fetch priority."""
        if fetch is not None:
            return {name: variables[name] for name in fetch if name in variables}
        return {k: v for k, v in variables.items() if k not in cls.NAMES and k not in _CARRIED}

    def to_variables(self) -> dict[str, Any]:
        return {
            CORRELATION_ID: self.correlation_id,
            "batch_id": self.batch_id,
            "traceability_id": self.traceability_id,
            "application_id": self.application_id,
            "identifiers": self.identifiers,
        }


#: What the engine carries for flowgate besides the system variables: never a result.
_CARRIED = frozenset({TRACEPARENT, PRIORITY})


def correlation_id_of(task: LockedTask) -> str | None:
    """The correlationId of the run a task belongs to: its variable, else the business key
    (a task fetched without its variables still names its run)."""
    value = task.variables.get(CORRELATION_ID) or task.business_key
    return str(value) if value else None


def system_value(variables: Mapping[str, Any], name: str) -> str | None:
    """One system variable as text (None when the run was not started through flowgate)."""
    value = variables.get(name)
    return None if value is None else str(value)


# --- the run channel -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartFailed:
    """The start a request joined did not reach the engine: answer what its starter did."""

    correlation_id: str
    status_code: int
    error: str
    field: str | None = None

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "kind": "startFailed",
                "correlationId": self.correlation_id,
                "statusCode": self.status_code,
                "error": self.error,
                "field": self.field,
            }
        )

    @classmethod
    def of(cls, state: RunState) -> StartFailed:
        """The answer an abandoned run's starter gave (kept as the run's ``error``)."""
        error = state.error if isinstance(state.error, dict) else {}
        return cls._from_object({**error, "correlationId": state.correlation_id})

    @classmethod
    def _from_object(cls, obj: Mapping[str, Any]) -> StartFailed:
        code = obj.get("statusCode")
        field = obj.get("field")
        return cls(
            correlation_id=str(obj["correlationId"]),
            status_code=code if isinstance(code, int) and 400 <= code <= 599 else 503,
            error=str(obj.get("error") or "the start this request joined failed"),
            field=field if isinstance(field, str) else None,
        )


def failed_start(outcome: RunState | StartFailed | None) -> StartFailed | None:
    """The answer of a start that was given up, read either way: the message its starter
    published, or its ``abandoned`` record (whose error keeps that answer). None otherwise."""
    if isinstance(outcome, StartFailed):
        return outcome
    if outcome is not None and outcome.status is Status.ABANDONED:
        return StartFailed.of(outcome)
    return None


@dataclass(frozen=True, slots=True)
class StepRecorded:
    """A step was added to the run's record; ``id`` is its entry there (the message is
    written by the store's Lua: ``{"kind":"step","id":...}``)."""

    id: str


@dataclass(frozen=True, slots=True)
class Reopened:
    """A run that had ended ``error`` is ``pending`` again: its failed step is retried
    (``{"kind":"reopened"}``, written by the store's Lua)."""


@dataclass(frozen=True, slots=True)
class Stalled:
    """A run has sat at a step past its threshold (services/background/stalls.py): its
    streams have a ``stalled`` event to send (``{"kind":"stalled"}``)."""


Message = RunState | StartFailed | StepRecorded | Reopened | Stalled
#: The body of a ``reopened`` message, as the store's Lua writes it.
REOPENED = b'{"kind":"reopened"}'
STALLED = b'{"kind":"stalled"}'


def correlation_id_of_message(raw: bytes) -> tuple[str, bytes]:
    """Split a run-channel message into its run's correlationId and the rest, so that a
    replica decodes only the messages of runs it has waiting."""
    cid, _, rest = raw.partition(b"\n")
    return cid.decode(), rest


def cause_of_message(rest: bytes) -> tuple[bytes, str | None]:
    """A message's body and the traceparent of the span that sent it (a finish's last line,
    when tracing: the span a waiter's wake links to). JSON bodies hold no raw newline."""
    body, _, cause = rest.partition(b"\n")
    return body, valid_traceparent(cause.decode()) if cause else None


def ends_with_callback(body: bytes) -> bool:
    """Whether a run-channel message is a run's end to be POSTed to its callbackUrl: a byte
    search, so that no replica decodes the ends of runs nobody waits for (a result that
    holds the same text costs only a needless look, services/background/callbacks.py)."""
    return b'"callbackUrl":"' in body


def decode_message(raw: bytes | str) -> Message:
    """A run-channel message's body: a finished state, a start that failed, a new step, or a
    run reopened."""
    obj = orjson.loads(raw)
    kind = obj.get("kind")
    if kind == "startFailed":
        return StartFailed._from_object(obj)
    if kind == "step":
        return StepRecorded(str(obj["id"]))
    if kind == "reopened":
        return Reopened()
    if kind == "stalled":
        return Stalled()
    return RunState.from_dict(obj)
