"""What a handler can reach besides its input: its task, its process's config, HTTP, a log.

Handlers take it as an optional second parameter (``async def step(data: In, ctx:
TaskContext[MyConfig])``). It is built per task by the worker, so nothing here is global,
and it holds nothing a handler should not touch: no store, no engine client, no settings
but its own process's (``Process(..., config=MyConfig)``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import httpx

from flowgate.shared.camunda import LockedTask
from flowgate.shared.contract import correlation_id_of

ConfigT = TypeVar("ConfigT")


class TaskLogger(logging.LoggerAdapter[logging.Logger]):
    """Adds the task's correlationId, topic and task id to every record (JSON fields)."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return msg, kwargs


@dataclass(slots=True)
class TaskContext(Generic[ConfigT]):
    """One locked task and what its handler may use."""

    task: LockedTask
    http: httpx.AsyncClient
    log: TaskLogger
    #: The process's own settings object (``Process(..., config=...)``), or None.
    config: ConfigT
    #: Set when the worker could not extend the lock: another worker may now hold the task,
    #: and the engine will probably reject this one's result. Long handlers may check it.
    lock_lost: asyncio.Event = field(default_factory=asyncio.Event)
    #: When the handler is stopped: its step's ``timeout_ms`` from its start, or, for a step
    #: ``with_client_deadline``, the waiting client's deadline if that comes first. None:
    #: no bound. Pass what is left on to slow calls (:meth:`remaining_s`).
    deadline: datetime | None = None

    def remaining_s(self) -> float | None:
        """Seconds until :attr:`deadline` (never below 0), or None without one."""
        if self.deadline is None:
            return None
        return max((self.deadline - datetime.now(UTC)).total_seconds(), 0.0)

    @property
    def correlation_id(self) -> str | None:
        """The correlationId of the run this task belongs to (None outside flowgate runs)."""
        return correlation_id_of(self.task)

    @property
    def idempotency_key(self) -> str:
        """The same on every delivery of this task (the engine's task id): send it with a
        side effect so that the system on the other side can drop a repeat after a crash."""
        return self.task.id


def task_logger(logger: logging.Logger, task: LockedTask) -> TaskLogger:
    extra = {"correlationId": correlation_id_of(task), "topic": task.topic_name, "taskId": task.id}
    return TaskLogger(logger, extra)
