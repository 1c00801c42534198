"""Workers for tests: a recording run finisher, a real worker run in-process, and a client
that starts runs the way the API does."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from redis.asyncio import Redis

from services.worker.app import serve
from services.worker.metrics import WorkerMetrics
from services.worker.registry import Registry
from shared.camunda import CamundaClient
from shared.contract import SystemVariables
from shared.eventlog import EventRecord
from shared.keys import Keys
from shared.settings import Settings
from shared.state import ProcessState, Status
from shared.store import ProcessStore
from tests.helpers.streams import entries


class RecordedOutcomes:
    """Records what an executor records (instead of services/worker/recorder.py)."""

    def __init__(self) -> None:
        self.finished: list[tuple[str, Status, Any, Any]] = []
        self.rows: list[EventRecord] = []

    async def ready(self) -> None:
        return None

    async def finish(
        self,
        correlation_id: str,
        status: Status,
        *,
        data: Any = None,
        error: Any = None,
        event: EventRecord | None = None,
    ) -> None:
        self.finished.append((correlation_id, status, data, error))
        if event is not None:
            self.rows.append(event)

    async def record(self, event: EventRecord) -> None:
        self.rows.append(event)


@contextlib.asynccontextmanager
async def running_worker(
    settings: Settings, registry: Registry, metrics: WorkerMetrics | None = None
) -> AsyncIterator[asyncio.Task[None]]:
    """A real worker (services.worker.app.serve) until the block ends, then drained."""
    stop = asyncio.Event()
    task = asyncio.create_task(
        serve(settings, registry, stop=stop, name=f"it-{uuid.uuid4().hex[:6]}", metrics=metrics)
    )
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


class RunClient:
    """What the API does around a run, without the API: claim the state, start the engine
    instance with the system variables, attach it, and await the run's end."""

    def __init__(self, camunda: CamundaClient, store: ProcessStore) -> None:
        self.camunda = camunda
        self.store = store
        self.instances: list[str] = []

    async def start(self, key: str, **variables: Any) -> str:
        ids = SystemVariables.new(f"it-{uuid.uuid4().hex[:12]}")
        await self.store.claim(ids, key, "hash")
        instance = await self.camunda.start_process(
            key,
            business_key=ids.correlation_id,
            variables={**ids.to_variables(), **variables},
        )
        self.instances.append(instance.id)
        await self.store.attach_instance(ids.correlation_id, instance.id)
        return ids.correlation_id

    async def outcome(self, cid: str, timeout_s: float) -> ProcessState:
        """The finished state, or fail after ``timeout_s`` (what a waiting client sees)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = await self.store.get(cid)
            if state is not None and state.finished:
                return state
            await asyncio.sleep(0.05)
        raise AssertionError(f"{cid} still pending after {timeout_s} s")

    async def cleanup(self) -> None:
        for instance_id in self.instances:
            with contextlib.suppress(Exception):
                if await self.camunda.process_instance(instance_id) is not None:
                    await self.camunda.delete_process_instance(instance_id)


async def event_rows(redis: Redis, keys: Keys, cid: str) -> list[EventRecord]:
    """The event-log rows of ``cid`` queued in the write-behind stream, in stream order."""
    rows = []
    for _, fields in await entries(redis, keys.writebehind):
        if fields[b"kind"] == b"event":
            record = EventRecord.from_json(fields[b"body"])
            if record.correlation_id == cid:
                rows.append(record)
    return rows
