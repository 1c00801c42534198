"""What the server answers, as plain dataclasses (parsed from its JSON bodies)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class Milestone:
    """A step of the run that has finished."""

    step: str
    status: str
    data: Any
    error: Any
    at: datetime | None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Milestone:
        return cls(
            step=str(body["step"]),
            status=str(body.get("status", "ok")),
            data=body.get("data"),
            error=body.get("error"),
            at=_time(body.get("at")),
        )


@dataclass(frozen=True, slots=True)
class UserTask:
    """A user task of a run, open in the engine."""

    id: str
    task_definition_key: str
    name: str | None = None
    assignee: str | None = None
    created: datetime | None = None
    form_key: str | None = None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> UserTask:
        return cls(
            id=str(body["id"]),
            task_definition_key=str(body.get("taskDefinitionKey", "")),
            name=body.get("name"),
            assignee=body.get("assignee"),
            created=_time(body.get("created")),
            form_key=body.get("formKey"),
        )


@dataclass(frozen=True, slots=True)
class RunStatus:
    """One run as the server last saw it: what a start, a status read or a cancel answers.

    ``status`` is ``pending``, ``ok``, ``error`` or ``cancelled``; ``data`` the result (the
    run's ``data``, or a start's ``result``); ``milestone`` the step a milestone wait asked
    for, when that is what ended the wait (the run is still ``pending`` then).
    """

    status: str
    correlation_id: str
    data: Any = None
    error: Any = None
    status_url: str | None = None
    milestone: Milestone | None = None
    process_key: str | None = None
    started_at: datetime | None = None
    updated_at: datetime | None = None
    #: The user tasks open when an action (a task completed, a message sent) paused the run.
    tasks: tuple[UserTask, ...] = ()
    #: A start's read token, when it asked for one (reads this run's status and events).
    read_token: str | None = None

    @property
    def finished(self) -> bool:
        return self.status != "pending"

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> RunStatus:
        milestone = body.get("milestone")
        return cls(
            status=str(body["status"]),
            correlation_id=str(body["correlationId"]),
            data=body["result"] if "result" in body else body.get("data"),
            error=body.get("error"),
            status_url=body.get("statusUrl"),
            milestone=Milestone.from_json(milestone) if isinstance(milestone, dict) else None,
            process_key=body.get("processKey"),
            started_at=_time(body.get("startedAt")),
            updated_at=_time(body.get("updatedAt")),
            tasks=tuple(UserTask.from_json(task) for task in body.get("tasks") or ()),
            read_token=body.get("readToken"),
        )


@dataclass(frozen=True, slots=True)
class Event:
    """One live-progress event: ``kind`` is ``step`` (``data`` the step) or ``end``
    (``data`` the final status body, also as ``run``)."""

    id: str
    kind: str
    data: Any

    @property
    def run(self) -> RunStatus | None:
        return RunStatus.from_json(self.data) if self.kind == "end" else None

    @property
    def step(self) -> Milestone | None:
        return Milestone.from_json(self.data) if self.kind == "step" else None


def _time(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else None
