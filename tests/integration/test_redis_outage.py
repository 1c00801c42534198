"""A Redis outage longer than any retry budget strands nothing: the worker holds what it
has, tells the engine nothing it could not record, and finishes when Redis is back."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
from pydantic import BaseModel

from flowgate.services.worker.metrics import WorkerMetrics
from flowgate.services.worker.recorder import Recorder
from flowgate.services.worker.registry import Process, Registry, Step
from flowgate.shared.camunda import CamundaClient
from flowgate.shared.contract import SystemVariables
from flowgate.shared.eventlog import EventRecord
from flowgate.shared.keys import Keys
from flowgate.shared.settings import Settings
from flowgate.shared.state import Status
from flowgate.shared.store.runs import RunStore
from tests.helpers.engine import EngineAdmin, one_task_bpmn
from tests.helpers.net import TcpProxy
from tests.helpers.waiting import until
from tests.helpers.worker import RunClient, event_rows, running_worker

# A Redis Cluster losing a master: test_redis_failover.py.
pytestmark = [pytest.mark.slow, pytest.mark.single_redis]


class NoInput(BaseModel):
    pass


@pytest.fixture
async def redis_proxy(redis_url: str) -> AsyncIterator[TcpProxy]:
    """The test Redis behind a proxy that can go down, for the worker alone."""
    target = urlsplit(redis_url)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 6379)
    await proxy.up()
    yield proxy
    await proxy.down()


async def test_a_finishing_step_waits_out_the_outage_and_ends_its_run_after(
    engine_url: str,
    redis_client: aioredis.Redis,
    redis_proxy: TcpProxy,
    make_settings: Callable[..., Settings],
) -> None:
    key = f"ro-{uuid.uuid4().hex[:8]}"
    process = Process(key, [Step("work", success="done", error="failed", finishes_run=True)])
    in_handler, may_return = asyncio.Event(), asyncio.Event()

    @process.handler("work")
    async def work(data: NoInput) -> dict[str, Any]:
        in_handler.set()
        await may_return.wait()
        return {"done": True}

    settings = make_settings(
        camunda_base_url=engine_url,
        redis_url=f"redis://127.0.0.1:{redis_proxy.port}/0",
        camunda_async_response_timeout_ms=500,
        camunda_lock_duration_ms=2_000,  # extended several times while Redis is away
        worker_retries=1,
        worker_retry_timeout_ms=100,
        worker_health_port=0,
    )
    async with CamundaClient(engine_url) as camunda:
        await camunda.deploy(key, {f"{key}.bpmn": one_task_bpmn(key, process.topic("work"))})
        keys = Keys(settings.redis_prefix)
        store = RunStore(redis_client, keys, result_ttl_s=60, pending_ttl_s=60)
        client = RunClient(camunda, store)
        metrics = WorkerMetrics()
        async with running_worker(settings, Registry.of([process]), metrics):
            cid = await client.start(key)
            await asyncio.wait_for(in_handler.wait(), 15)
            await redis_proxy.down()
            await until(
                lambda: metrics.registry.get_sample_value("flowgate_worker_redis_up") == 0,
                what="the worker to miss Redis",
            )
            may_return.set()
            await asyncio.sleep(4)  # twice the lock, far past the retry budget
            # Nothing was reported to the engine meanwhile: the task is still in hand and
            # has burnt no retry; the run is still pending.
            state = await client.store.get(cid)
            assert state is not None
            assert state.status is Status.PENDING
            async with EngineAdmin(engine_url) as admin:
                assert await admin.incidents(client.instances[0]) == []
            await redis_proxy.up()
            finished = await client.outcome(cid, timeout_s=15)
        assert finished.status is Status.OK
        assert finished.data == {"done": True}
        rows = await event_rows(redis_client, keys, cid)
        assert [(r.step_name, r.status) for r in rows] == [("work", "success")]
        await client.cleanup()


async def test_what_the_engine_accepted_reaches_the_run_once_redis_is_back(
    redis_client: aioredis.Redis, redis_proxy: TcpProxy, redis_prefix: str
) -> None:
    """A step the engine accepted (an incident, say) whose end could not be written at once."""
    keys = Keys(redis_prefix)
    direct = RunStore(redis_client, keys, result_ttl_s=60, pending_ttl_s=60)
    cid = f"ro-{uuid.uuid4().hex[:8]}"
    await direct.claim(SystemVariables.new(cid), "p", "h")

    proxied = aioredis.Redis(port=redis_proxy.port, socket_timeout=1, socket_connect_timeout=1)
    store = RunStore(proxied, keys, result_ttl_s=60, pending_ttl_s=60)
    recorder = Recorder(proxied, keys, store, WorkerMetrics())
    try:
        await redis_proxy.down()
        event = EventRecord(correlation_id=cid, status="incident", step_name="work")
        finishing = asyncio.create_task(
            recorder.finish(cid, Status.ERROR, error="Work failed: boom", event=event)
        )
        await asyncio.sleep(2)
        assert not finishing.done()
        await redis_proxy.up()
        await asyncio.wait_for(finishing, 15)
    finally:
        await proxied.aclose()
    state = await direct.get(cid)
    assert state is not None
    assert (state.status, state.error) == (Status.ERROR, "Work failed: boom")
    assert [r.status for r in await event_rows(redis_client, keys, cid)] == ["incident"]
