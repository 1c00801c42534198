"""The worker against the real engine and Redis, run in-process.

The engine is shared by the whole session, so each test serves its own copy of a process:
bpmn/onboard-user.bpmn is deployed under a unique key whose topics carry that key, and the
production handlers are bound to those topics. Nothing else can take this test's tasks, and
this test's worker cannot take anyone else's.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from pydantic import BaseModel

from flowgate.services.worker.handlers import onboard_user
from flowgate.services.worker.metrics import WorkerMetrics
from flowgate.services.worker.registry import Process, Registry, Step
from flowgate.shared.camunda import CamundaClient
from flowgate.shared.deployment import deploy_directory
from flowgate.shared.keys import Keys
from flowgate.shared.settings import Settings
from flowgate.shared.state import Status
from flowgate.shared.store.runs import RunStore
from tests.helpers.engine import EngineAdmin, clone, onboard_user_bpmn, one_task_bpmn
from tests.helpers.waiting import until
from tests.helpers.worker import RunClient, event_rows, running_worker

# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture
async def camunda(engine_url: str) -> AsyncIterator[CamundaClient]:
    async with CamundaClient(engine_url) as client:
        await deploy_directory(client)
        yield client


@pytest.fixture
def settings(make_settings: Callable[..., Settings], engine_url: str) -> Settings:
    # Short polls: a lock that expires or a retry that becomes due is not signalled to
    # pending long polls (the engine re-checks only every 30 s), so re-poll often.
    return make_settings(
        camunda_base_url=engine_url,
        camunda_async_response_timeout_ms=500,
        camunda_lock_duration_ms=5_000,
        worker_health_port=0,
        worker_retry_timeout_ms=100,
        worker_shutdown_grace_s=2,
    )


@pytest.fixture
async def client(
    camunda: CamundaClient, redis_client: aioredis.Redis, settings: Settings
) -> AsyncIterator[RunClient]:
    store = RunStore(redis_client, Keys(settings.redis_prefix), result_ttl_s=600, pending_ttl_s=600)
    client = RunClient(camunda, store)
    yield client
    await client.cleanup()


@pytest.fixture
async def onboarding(camunda: CamundaClient) -> Process:
    """A private copy of onboard-user (see the module docstring)."""
    key = f"onboard-user-{uuid.uuid4().hex[:8]}"
    await camunda.deploy(key, {f"{key}.bpmn": onboard_user_bpmn(key)})
    return clone(onboard_user.process, key)


# --- the example process --------------------------------------------------------------------


async def test_ordinary_user_ends_ok_with_one_event_row_per_step(
    onboarding: Process, client: RunClient, settings: Settings, redis_client: aioredis.Redis
) -> None:
    async with running_worker(settings, Registry.of([onboarding])):
        cid = await client.start(onboarding.key, userId="user-123", email="u@example.com")
        state = await client.outcome(cid, timeout_s=15)

    assert state.status is Status.OK
    assert state.data == {
        "userId": "user-123",
        "validated": True,
        "backgroundCheckPassed": True,
        "onboarded": True,
        "riskScore": onboard_user.risk_score("user-123"),
        "success": True,
    }
    rows = await event_rows(redis_client, Keys(settings.redis_prefix), cid)
    assert [(r.step, r.step_name, r.status) for r in rows] == [
        (1, "validate-user-information", "success"),
        (2, "run-background-check", "success"),
        (3, "call-onboarding-api", "success"),
        (4, "prepare-response", "success"),
    ]
    first = rows[0]
    assert first.result == "User information validated"
    assert first.request_data["userId"] == "user-123"
    assert rows[1].http_method == "POST"
    assert rows[1].endpoint == "/background-check/verify"
    assert all(r.process_name == onboarding.key and r.http_status_code == 200 for r in rows)
    assert all(r.traceability_id and r.batch_id and r.application_id for r in rows)
    # userId, the run's business id, is named by every step's row.
    assert all(
        r.identifiers == {"applicationId": r.application_id, "userId": "user-123"} for r in rows
    )


async def test_invalid_user_ends_error_with_the_message(
    onboarding: Process,
    client: RunClient,
    settings: Settings,
    redis_client: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="flowgate.services.worker.worker")
    async with running_worker(settings, Registry.of([onboarding])):
        cid = await client.start(onboarding.key, userId="invalid-user-9")
        state = await client.outcome(cid, timeout_s=15)
    # A completed task is counted, not logged at INFO; any other outcome is.
    outcomes = [
        (r.levelno, r.getMessage())
        for r in caplog.records
        if getattr(r, "correlationId", None) == cid and r.getMessage().startswith("task ")
    ]
    assert sorted(outcomes) == [
        (logging.DEBUG, "task completed"),
        (logging.INFO, "task bpmn_error"),
    ]

    assert state.status is Status.ERROR
    assert state.error == "User invalid-user-9 failed validation"
    rows = await event_rows(redis_client, Keys(settings.redis_prefix), cid)
    assert [(r.step_name, r.status) for r in rows] == [
        ("validate-user-information", "error"),
        ("handle-error", "success"),
    ]
    assert rows[0].result == "User information validation failed"
    assert rows[0].http_status_code == 400
    assert rows[0].metadata == {
        "errorCode": "VALIDATION_FAILED",
        "errorType": "BUSINESS_RULE_ERROR",
    }


async def test_missing_input_is_a_validation_bpmn_error(
    onboarding: Process, client: RunClient, settings: Settings, redis_client: aioredis.Redis
) -> None:
    async with running_worker(settings, Registry.of([onboarding])):
        cid = await client.start(onboarding.key)  # no userId
        state = await client.outcome(cid, timeout_s=15)

    assert state.status is Status.ERROR
    assert state.error.startswith("Input validation failed: userId")
    rows = await event_rows(redis_client, Keys(settings.redis_prefix), cid)
    assert rows[0].metadata["errorType"] == "VALIDATION_ERROR"
    assert rows[0].http_status_code == 422


# --- failures, retries, locks ---------------------------------------------------------------


class NoInput(BaseModel):
    pass


async def deploy_one_task(camunda: CamundaClient) -> tuple[Process, str]:
    key = f"wt-{uuid.uuid4().hex[:8]}"
    process = Process(key, [Step("work", success="done", error="Work failed")])
    await camunda.deploy(key, {f"{key}.bpmn": one_task_bpmn(key, process.topic("work"))})
    return process, key


async def test_exhausted_retries_raise_an_incident_and_tell_the_client_at_once(
    camunda: CamundaClient, client: RunClient, make_settings: Callable[..., Settings],
    settings: Settings, redis_client: aioredis.Redis, engine_url: str,
) -> None:  # fmt: skip
    process, key = await deploy_one_task(camunda)
    calls: list[float] = []

    @process.handler("work")
    async def always_fails(data: NoInput) -> None:
        calls.append(time.monotonic())
        raise RuntimeError("downstream is down")

    settings = make_settings(**{**settings.model_dump(), "worker_retries": 2})
    async with running_worker(settings, Registry.of([process])):
        cid = await client.start(key)
        # Three attempts, 100 ms then 200 ms retryTimeout: far below a sync wait.
        state = await client.outcome(cid, timeout_s=10)

    assert state.status is Status.ERROR
    assert state.error == "Work failed: downstream is down"
    assert len(calls) == 3
    # At least the retryTimeout apart (its doubling is checked in test_worker_executor.py;
    # here the engine's re-poll cadence dominates the spacing).
    assert min(b - a for a, b in itertools.pairwise(calls)) >= 0.1
    async with EngineAdmin(engine_url) as admin:
        incidents = await admin.incidents(client.instances[0])
    assert [i["incidentType"] for i in incidents] == ["failedExternalTask"]
    assert "downstream is down" in incidents[0]["incidentMessage"]
    rows = await event_rows(redis_client, Keys(settings.redis_prefix), cid)
    assert [r.status for r in rows] == ["retry", "retry", "incident"]


async def test_a_handler_running_three_times_its_lock_keeps_the_task(
    camunda: CamundaClient, client: RunClient, make_settings: Callable[..., Settings],
    settings: Settings, engine_url: str,
) -> None:  # fmt: skip
    process, key = await deploy_one_task(camunda)
    calls = 0

    @process.handler("work")
    async def slow(data: NoInput) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(3.0)
        return {"slow": True}

    settings = make_settings(**{**settings.model_dump(), "camunda_lock_duration_ms": 1_000})
    metrics, other = WorkerMetrics(), WorkerMetrics()
    # A second worker polls the same topic throughout: it would take the task the moment
    # the lock lapsed.
    async with (
        running_worker(settings, Registry.of([process]), metrics),
        running_worker(settings, Registry.of([process]), other),
    ):
        await client.start(key)
        instance = client.instances[0]
        await until(lambda: _ended(engine_url, instance), timeout_s=15, what="the instance to end")

    assert calls == 1
    topic = process.topic("work")
    assert metrics.count(topic, "completed") + other.count(topic, "completed") == 1
    extensions = sum(
        m.registry.get_sample_value("flowgate_worker_lock_extensions_total", {"topic": topic}) or 0
        for m in (metrics, other)
    )
    assert extensions >= 4  # every 0.5 s for 3 s


async def _ended(engine_url: str, instance_id: str) -> bool:
    async with EngineAdmin(engine_url) as admin:
        history = await admin.historic_process_instance(instance_id)
    return history is not None and history["state"] == "COMPLETED"


async def test_engine_outage_is_survived_without_a_restart(
    onboarding: Process, client: RunClient, make_settings: Callable[..., Settings],
    settings: Settings, engine_url: str,
) -> None:  # fmt: skip
    """Polls fail while the engine is unreachable, back off, and recover when it answers."""
    proxy = await _Proxy.start(engine_url)
    try:
        settings = make_settings(**{**settings.model_dump(), "camunda_base_url": proxy.url})
        metrics = WorkerMetrics()
        proxy.down = True
        async with running_worker(settings, Registry.of([onboarding]), metrics):
            await until(
                lambda: _at_least(metrics, "flowgate_worker_fetch_errors_total", 2),
                timeout_s=10,
                what="failed polls",
            )
            proxy.down = False
            cid = await client.start(onboarding.key, userId="after-outage")
            state = await client.outcome(cid, timeout_s=40)
        assert state.status is Status.OK
    finally:
        await proxy.close()


async def _at_least(metrics: WorkerMetrics, name: str, value: float) -> bool:
    return (metrics.registry.get_sample_value(name) or 0) >= value


class _Proxy:
    """A TCP proxy to the engine that can play dead (answers 503 like a load balancer)."""

    def __init__(self, server: asyncio.Server, target: tuple[str, int], path: str) -> None:
        self.server = server
        self.target = target
        self.down = False
        port = server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}{path}"

    @classmethod
    async def start(cls, engine_url: str) -> _Proxy:
        from urllib.parse import urlsplit

        parts = urlsplit(engine_url)
        target = (parts.hostname or "127.0.0.1", parts.port or 80)
        proxy: _Proxy

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if proxy.down:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                    b"Connection: close\r\n\r\n"
                )
                await writer.drain()
                writer.close()
                return
            up_reader, up_writer = await asyncio.open_connection(*target)

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                with contextlib.suppress(OSError):
                    while data := await src.read(65536):
                        dst.write(data)
                        await dst.drain()
                dst.close()

            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        proxy = cls(server, target, parts.path)
        return proxy

    async def close(self) -> None:
        self.server.close()
