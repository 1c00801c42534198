"""Workers for tests: a recording run finisher, a real worker run in-process, and a client
that starts runs the way the API does."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from flowgate.services.worker.app import serve
from flowgate.services.worker.metrics import WorkerMetrics
from flowgate.services.worker.registry import Registry
from flowgate.shared.camunda import CamundaClient, NotFound
from flowgate.shared.contract import SystemVariables
from flowgate.shared.eventlog import EventRecord
from flowgate.shared.keys import Keys
from flowgate.shared.redis_client import RedisClient
from flowgate.shared.settings import Settings
from flowgate.shared.state import RunState, Status
from flowgate.shared.steps import StepEvent
from flowgate.shared.store.runs import RunStore
from flowgate.shared.tracing import Tracing
from tests.helpers.streams import entries

ROOT = Path(__file__).resolve().parents[2]


class RecordedRuns:
    """Records what an executor records (instead of services/worker/recorder.py)."""

    def __init__(self) -> None:
        self.finished: list[tuple[str, Status, Any, Any]] = []
        self.rows: list[EventRecord] = []
        self.steps: list[StepEvent] = []
        #: Steps claimed and not yet recorded or released, by activity instance id.
        self.claimed: set[str] = set()
        self.released: list[str] = []
        #: What the run's hash says of its starting client's deadline.
        self.client_gives_up_at: datetime | None = None

    async def ready(self) -> None:
        return None

    async def claim(self, correlation_id: str, activity_instance_id: str, worker_id: str) -> None:
        self.claimed.add(activity_instance_id)

    async def release(self, correlation_id: str, activity_instance_id: str, worker_id: str) -> None:
        self.claimed.discard(activity_instance_id)
        self.released.append(activity_instance_id)

    async def finish(
        self,
        correlation_id: str,
        status: Status,
        *,
        data: Any = None,
        error: Any = None,
        event: EventRecord | None = None,
        step: StepEvent | None = None,
        cause: str | None = None,
    ) -> None:
        self.finished.append((correlation_id, status, data, error))
        if event is not None:
            self.rows.append(event)
        if step is not None:
            self.steps.append(step)
            self.claimed.discard(step.activity_instance_id)

    async def step(self, correlation_id: str, step: StepEvent, event: EventRecord) -> None:
        self.steps.append(step)
        self.rows.append(event)
        self.claimed.discard(step.activity_instance_id)

    async def client_deadline(self, correlation_id: str) -> datetime | None:
        return self.client_gives_up_at

    async def record(self, event: EventRecord) -> None:
        self.rows.append(event)


@contextlib.asynccontextmanager
async def running_worker(
    settings: Settings,
    registry: Registry,
    metrics: WorkerMetrics | None = None,
    *,
    tracing: Tracing | None = None,
) -> AsyncIterator[asyncio.Task[None]]:
    """A real worker (flowgate.services.worker.app.serve) until the block ends, then drained."""
    stop = asyncio.Event()
    name = f"it-{uuid.uuid4().hex[:6]}"
    task = asyncio.create_task(
        serve(settings, registry, stop=stop, name=name, metrics=metrics, tracing=tracing)
    )
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


class RunClient:
    """What the API does around a run, without the API: claim the state, start the engine
    instance with the system variables, attach it, and await the run's end."""

    def __init__(self, camunda: CamundaClient, store: RunStore) -> None:
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

    async def outcome(self, cid: str, timeout_s: float) -> RunState:
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
            with contextlib.suppress(NotFound):  # ended already
                await self.camunda.delete_process_instance(instance_id)


async def event_rows(redis: RedisClient, keys: Keys, cid: str) -> list[EventRecord]:
    """The event-log rows of ``cid`` queued in the write-behind stream, in stream order."""
    rows = []
    for _, fields in await entries(redis, keys.of(cid).writebehind):
        if fields[b"kind"] == b"event":
            record = EventRecord.from_json(fields[b"body"])
            if record.correlation_id == cid:
                rows.append(record)
    return rows


class WorkerProcess:
    """One ``python -m flowgate.services.worker`` subprocess; its stderr goes to a log file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        self.health_port = int(env["WORKER_HEALTH_PORT"])
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "flowgate.services.worker"],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    async def ready(self, timeout_s: float = 20.0) -> None:
        async with httpx.AsyncClient() as http:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, f"worker exited:\n{self.log.read_text()[-3000:]}"
                with contextlib.suppress(httpx.HTTPError):
                    response = await http.get(f"http://127.0.0.1:{self.health_port}/healthz")
                    if response.status_code == 200:
                        return
                await asyncio.sleep(0.1)
        raise AssertionError(f"worker not healthy:\n{self.log.read_text()[-3000:]}")

    async def metric(self, name: str, labels: dict[str, str]) -> float:
        async with httpx.AsyncClient() as http:
            response = await http.get(f"http://127.0.0.1:{self.health_port}/metrics")
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return sample.value
        return 0.0

    async def exited(self, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while (code := self.proc.poll()) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"worker still running after {timeout_s} s")
            await asyncio.sleep(0.05)
        return code

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
