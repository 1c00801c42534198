"""What a handler can reach besides its input: the task, settings, the store, HTTP.

Handlers take it as an optional second parameter (``async def step(data: In, ctx:
TaskContext)``). It is built per task by the worker, so nothing here is global.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from shared.camunda import LockedTask
from shared.settings import Settings
from shared.store import Status


class CompletionStore(Protocol):
    """The part of :class:`shared.store.ProcessStore` handlers use (fakes in unit tests)."""

    async def complete(
        self, correlation_id: str, status: Status, *, data: Any = None, error: Any = None
    ) -> bool: ...


class TaskLogger(logging.LoggerAdapter[logging.Logger]):
    """Adds the task's correlationId, topic and task id to every record (JSON fields)."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return msg, kwargs


@dataclass(slots=True)
class TaskContext:
    """One locked task and the services its handler may use."""

    task: LockedTask
    settings: Settings
    store: CompletionStore
    http: httpx.AsyncClient
    log: TaskLogger
    #: Set when the worker could not extend the lock: another worker may now hold the task,
    #: and the engine will probably reject this one's result. Long handlers may check it.
    lock_lost: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def correlation_id(self) -> str:
        """The API's correlationId (the variable, else the business key the API sets)."""
        value = self.task.variables.get("correlationId") or self.task.business_key
        return str(value) if value else ""


def task_logger(logger: logging.Logger, task: LockedTask) -> TaskLogger:
    cid = task.variables.get("correlationId") or task.business_key
    return TaskLogger(logger, {"correlationId": cid, "topic": task.topic_name, "taskId": task.id})
