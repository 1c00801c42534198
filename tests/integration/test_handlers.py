"""Handlers as teams write them, on the real engine: a topic an existing model uses and
several processes share, blocking handlers beside async ones, and timeouts that end."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio as aioredis
from pydantic import BaseModel

from flowgate.services.api.metrics import ApiMetrics
from flowgate.services.background.backlog import Backlog
from flowgate.services.worker.registry import Process, Registry, Step
from flowgate.shared.camunda import CamundaClient
from flowgate.shared.keys import Keys
from flowgate.shared.settings import Settings
from flowgate.shared.state import Status
from flowgate.shared.store.runs import RunStore
from flowgate.shared.variables import parse_date
from tests.helpers.engine import EngineAdmin, one_task_bpmn
from tests.helpers.waiting import until
from tests.helpers.worker import RunClient, event_rows, running_worker


class NoInput(BaseModel):
    pass


@pytest.fixture
def settings(make_settings: Callable[..., Settings], engine_url: str) -> Settings:
    return make_settings(
        camunda_base_url=engine_url,
        camunda_async_response_timeout_ms=500,
        camunda_lock_duration_ms=5_000,
        worker_health_port=0,
        worker_shutdown_grace_s=2,
    )


@pytest.fixture
async def client(
    engine_url: str, redis_client: aioredis.Redis, settings: Settings
) -> AsyncIterator[RunClient]:
    async with CamundaClient(engine_url) as camunda:
        store = RunStore(
            redis_client, Keys(settings.redis_prefix), result_ttl_s=600, pending_ttl_s=600
        )
        client = RunClient(camunda, store)
        yield client
        await client.cleanup()


async def one_task(client: RunClient, *, bpmn_topic: str | None = None, **step: Any) -> Process:
    """A deployed process of one external task (on ``bpmn_topic``, else the step's own
    topic), its step ending the run."""
    key = f"h-{uuid.uuid4().hex[:8]}"
    process = Process(key, [Step("work", "done", "Work failed", finishes_run=True, **step)])
    topic = bpmn_topic or process.topic("work")
    await client.camunda.deploy(key, {f"{key}.bpmn": one_task_bpmn(key, topic)})
    return process


async def test_a_topic_shared_by_two_processes_runs_each_ones_handler_and_no_other(
    client: RunClient, settings: Settings, engine_url: str
) -> None:
    topic = f"notify-customer-{uuid.uuid4().hex[:6]}"  # as an existing model names it
    invoices = await one_task(client, topic=topic)
    orders = await one_task(client, topic=topic)
    other_team = await one_task(client, bpmn_topic=topic)  # same topic, served by nobody here

    @invoices.handler("work")
    async def notify_invoice(data: NoInput) -> dict[str, str]:
        return {"notified": "invoice"}

    @orders.handler("work")
    def notify_order(data: NoInput) -> dict[str, str]:
        return {"notified": "order"}

    async with running_worker(settings, Registry.of([invoices, orders])):
        runs = [await client.start(p.key) for p in (invoices, orders, other_team)]
        outcomes = [await client.outcome(cid, timeout_s=15) for cid in runs[:2]]
        await asyncio.sleep(1.0)  # a few more polls: the other team's task stays theirs
        async with EngineAdmin(engine_url) as admin:
            [waiting] = await admin.external_tasks(client.instances[2])

    assert [(o.status, o.data) for o in outcomes] == [
        (Status.OK, {"notified": "invoice"}),
        (Status.OK, {"notified": "order"}),
    ]
    assert waiting["workerId"] is None, "a process this worker does not serve was locked"


async def test_a_blocking_handler_does_not_delay_the_async_ones(
    client: RunClient, settings: Settings
) -> None:
    slow, fast = await one_task(client), await one_task(client)
    blocked_until = 0.0

    @slow.handler("work")
    def blocking(data: NoInput) -> dict[str, bool]:
        nonlocal blocked_until
        time.sleep(3.0)  # a synchronous SDK call
        blocked_until = time.monotonic()
        return {"slow": True}

    @fast.handler("work")
    async def quick(data: NoInput) -> dict[str, bool]:
        return {"fast": True}

    settings = settings.model_copy(update={"worker_concurrency": 4, "worker_threads": 2})
    async with running_worker(settings, Registry.of([slow, fast])):
        slow_run = await client.start(slow.key)
        await asyncio.sleep(0.5)  # the blocking handler is running
        fast_runs = [await client.start(fast.key) for _ in range(20)]
        for cid in fast_runs:
            assert (await client.outcome(cid, timeout_s=15)).status is Status.OK
        fast_done = time.monotonic()
        assert (await client.outcome(slow_run, timeout_s=15)).status is Status.OK
    assert fast_done < blocked_until, "the fast runs waited for the blocking handler"


async def test_a_hung_handler_times_out_is_retried_then_its_run_ends_with_no_lock_left(
    client: RunClient, settings: Settings, redis_client: aioredis.Redis, engine_url: str
) -> None:
    process = await one_task(client, timeout_ms=300, retries=1, retry_backoff_ms=100)
    attempts = 0

    @process.handler("work")
    async def hangs(data: NoInput) -> None:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(60)

    async with running_worker(settings, Registry.of([process])):
        cid = await client.start(process.key)
        state = await client.outcome(cid, timeout_s=20)

    assert state.status is Status.ERROR
    assert "timeout of 300 ms" in state.error
    assert attempts == 2  # the first attempt and its one retry
    rows = await event_rows(redis_client, Keys(settings.redis_prefix), cid)
    assert [r.status for r in rows] == ["retry", "incident"]
    async with EngineAdmin(engine_url) as admin:
        [task] = await admin.external_tasks(client.instances[0])
        incidents = await admin.incidents(client.instances[0])
    assert task["retries"] == 0
    lock = task["lockExpirationTime"]
    assert lock is None or parse_date(lock) <= datetime.now(UTC), "a lock was left"
    assert [i["incidentType"] for i in incidents] == ["failedExternalTask"]


async def test_the_backlog_follows_a_burst_with_no_worker_and_falls_as_one_drains_it(
    client: RunClient, settings: Settings, redis_client: aioredis.Redis, engine_url: str
) -> None:
    process = await one_task(client)

    @process.handler("work")
    async def work(data: NoInput) -> None: ...

    topic = process.topic("work")
    metrics = ApiMetrics()
    stop = asyncio.Event()

    def backlog() -> tuple[float | None, float | None]:
        labels = {"topic": topic}
        return (
            metrics.registry.get_sample_value("flowgate_topic_backlog_tasks", labels),
            metrics.registry.get_sample_value("flowgate_topic_oldest_task_age_seconds", labels),
        )

    async with CamundaClient(engine_url) as camunda:
        sampler = Backlog(
            camunda,
            redis_client,
            Keys(settings.redis_prefix),
            metrics,
            replica_id="sampler",
            interval_s=0.1,
        )
        sampling = asyncio.create_task(sampler.run(stop))
        try:
            runs = [await client.start(process.key) for _ in range(12)]
            await until(lambda: _is(backlog, 12), timeout_s=10, what="a backlog of 12")
            await asyncio.sleep(0.3)
            assert (backlog()[1] or 0) > 0.2, "the oldest task's age"
            async with running_worker(settings, Registry.of([process])):
                for cid in runs:
                    await client.outcome(cid, timeout_s=15)
                await until(lambda: _is(backlog, 0), timeout_s=10, what="the backlog drained")
        finally:
            stop.set()
            await sampling
    assert backlog() == (None, None), "a replica that stops sampling exports nothing stale"


async def _is(backlog: Callable[[], tuple[float | None, float | None]], count: int) -> bool:
    return backlog()[0] == count
