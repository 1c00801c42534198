"""Fair fetching across tenants, on the real engine: a tenant's burst of starts queues
behind itself, not in front of another tenant's next run (services/api/limits.py, the
``flowgatePriority`` variable a process uses as its external tasks' priority)."""

from __future__ import annotations

import uuid
from collections.abc import Callable

from pydantic import BaseModel

from flowgate.services.worker.registry import Process, Registry, Step
from flowgate.shared.camunda import CamundaClient
from flowgate.shared.contract import PRIORITY, TASK_PRIORITY
from flowgate.shared.settings import Settings
from tests.helpers.api import Api, cid, running_app, start_body
from tests.helpers.engine import one_task_bpmn
from tests.helpers.waiting import until
from tests.helpers.worker import running_worker

MakeSettings = Callable[..., Settings]
ALPHA, BETA = "alpha-key", "beta-key"
KEYS = f"root-key,{ALPHA}@alpha:start+read,{BETA}@beta:start+read"


class Run(BaseModel):
    correlationId: str


def fair_process(key: str, handled: list[str]) -> Process:
    process = Process(key, [Step("work", "Worked", "Work failed", finishes_run=True)])

    @process.handler("work")
    async def work(data: Run) -> dict[str, bool]:
        handled.append(data.correlationId)
        return {"worked": True}

    return process


async def deploy(engine_url: str, key: str) -> None:
    xml = one_task_bpmn(key, f"{key}.work").replace(
        b'isExecutable="true"',
        f'isExecutable="true" camunda:taskPriority="{TASK_PRIORITY}"'.encode(),
    )
    async with CamundaClient(engine_url) as camunda:
        await camunda.deploy(key, {f"{key}.bpmn": xml})


async def start(api: Api, credential: str, key: str) -> str:
    correlation_id = cid()
    started = await api.client.post(
        "/api/process/start",
        json=start_body(correlation_id, key),
        headers={"X-API-Key": credential, "Prefer": "respond-async"},
    )
    assert started.status_code == 202, started.text
    return correlation_id


async def test_one_tenants_burst_does_not_hold_back_another_tenants_run(
    make_settings: MakeSettings, engine_url: str
) -> None:
    burst = 10
    key = f"fair-{uuid.uuid4().hex[:8]}"
    await deploy(engine_url, key)
    settings = make_settings(
        camunda_base_url=engine_url,
        api_keys=KEYS,
        # One task at a time, each fetched when the last is done: the engine's order shows.
        worker_concurrency=1,
        worker_prefetch=0,
        camunda_max_tasks=1,
        camunda_async_response_timeout_ms=500,
        worker_health_port=0,
    )
    handled: list[str] = []
    async with running_app(settings) as api:
        bursting = [await start(api, ALPHA, key) for _ in range(burst)]
        later = await start(api, BETA, key)
        async with CamundaClient(engine_url) as camunda:
            instance = (await api.deps.store.get(later)).instance_id  # type: ignore[union-attr]
            assert instance is not None
            variables = await camunda.root_variables([instance])
        assert variables[instance][PRIORITY] == 0  # beta's first start in its window
        async with running_worker(settings, Registry.of([fair_process(key, handled)])):
            await until(lambda: len(handled) == burst + 1, timeout_s=30, what="every run")

    # Without priorities the engine hands out the oldest first: beta's run would come last.
    # Alpha's burst counts down from 0 (a new window may start it at 0 once more).
    assert handled.index(later) <= 2, handled
    assert set(handled) == {*bursting, later}
    assert handled[0] == bursting[0]
