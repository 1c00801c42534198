"""CamundaClient against the real engine, with bpmn/ deployed.

The engine is shared by the whole session, so every test uses its own business key and
worker id, filters fetches by business key, and deletes the instances it started.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest

from flowgate.shared.camunda import (
    BadRequest,
    CamundaClient,
    DefinitionNotFound,
    LockedTask,
    NotFound,
    ProcessInstance,
    TopicRequest,
)
from flowgate.shared.deployment import deploy_directory
from tests.helpers.engine import EngineAdmin

VALIDATE = "onboard-user.validate-user-information"
BACKGROUND_CHECK = "onboard-user.run-background-check"
HANDLE_ERROR = "onboard-user.handle-error"


class Run:
    """One test's view of the engine: its business key, its worker, its instances."""

    def __init__(self, camunda: CamundaClient, admin: EngineAdmin) -> None:
        self.camunda = camunda
        self.admin = admin
        self.business_key = f"it-{uuid.uuid4().hex[:12]}"
        self.worker_id = f"it-worker-{uuid.uuid4().hex[:8]}"
        self.instances: list[str] = []

    async def start(self, **variables: Any) -> ProcessInstance:
        instance = await self.camunda.start_process(
            "onboard-user", business_key=self.business_key, variables=variables
        )
        self.instances.append(instance.id)
        return instance

    async def fetch(
        self, topic: str, *, worker_id: str | None = None, wait_ms: int | None = 5_000
    ) -> list[LockedTask]:
        """This run's tasks on ``topic``, locked for 30 s."""
        return await self.camunda.fetch_and_lock(
            worker_id or self.worker_id,
            [TopicRequest(topic, 30_000, business_key=self.business_key)],
            max_tasks=5,
            async_response_timeout_ms=wait_ms,
        )

    async def fetch_one(self, topic: str, *, worker_id: str | None = None) -> LockedTask:
        tasks = await self.fetch(topic, worker_id=worker_id)
        assert len(tasks) == 1, tasks
        return tasks[0]


@pytest.fixture
async def camunda(engine_url: str) -> AsyncIterator[CamundaClient]:
    async with CamundaClient(engine_url) as client:
        await deploy_directory(client)
        yield client


@pytest.fixture
async def run(camunda: CamundaClient, engine_url: str) -> AsyncIterator[Run]:
    async with EngineAdmin(engine_url) as admin:
        run = Run(camunda, admin)
        yield run
        for instance_id in run.instances:
            await admin.delete_process_instance(instance_id)


async def engine_types(engine_url: str, instance_id: str) -> dict[str, str]:
    """The type the engine stored for each variable of a running instance."""
    async with httpx.AsyncClient() as http:
        response = await http.get(
            f"{engine_url}/process-instance/{instance_id}/variables",
            params={"deserializeValues": "false"},
        )
    response.raise_for_status()
    return {name: variable["type"] for name, variable in response.json().items()}


async def test_deploying_again_is_filtered_as_duplicate(run: Run) -> None:
    """The fixture deployed bpmn/ already; unchanged files create no new versions."""
    camunda = run.camunda
    for key in ("onboard-user", "benchmark"):
        definitions = await run.admin.process_definitions(key)
        assert definitions
        assert {d["historyTimeToLive"] for d in definitions} == {7}
    assert await deploy_directory(camunda) == []


async def test_long_poll_returns_as_soon_as_the_task_exists(run: Run, engine_url: str) -> None:
    born = datetime(1990, 5, 17, 8, 30, 0, 250000, tzinfo=timezone(timedelta(hours=2)))
    poll = asyncio.create_task(run.fetch(VALIDATE, wait_ms=20_000))
    await asyncio.sleep(1.0)  # the engine has parked the poll by now
    assert not poll.done()

    started_at = time.monotonic()
    instance = await run.start(
        user={"id": "u-1", "tags": ["a", "b"]}, age=36, followers=2**40, active=True, born=born
    )
    tasks = await poll
    assert time.monotonic() - started_at < 5.0

    [task] = tasks
    assert task.topic_name == VALIDATE
    assert task.business_key == run.business_key
    assert task.process_instance_id == instance.id
    assert task.process_definition_key == "onboard-user"
    assert task.activity_id == "validate_user_information"
    assert task.retries is None
    assert task.lock_expiration_time is not None
    assert task.lock_expiration_time > datetime.now(UTC)
    assert task.variables == {
        "user": {"id": "u-1", "tags": ["a", "b"]},
        "age": 36,
        "followers": 2**40,
        "active": True,
        "born": born,
    }
    assert await engine_types(engine_url, instance.id) == {
        "user": "Json",
        "age": "Integer",
        "followers": "Long",
        "active": "Boolean",
        "born": "Date",
    }


async def test_complete_hands_typed_variables_to_the_next_step(run: Run, engine_url: str) -> None:
    instance = await run.start(userId="u-2")
    task = await run.fetch_one(VALIDATE)
    checked_at = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    await run.camunda.complete(
        task.id,
        worker_id=run.worker_id,
        variables={
            "validated": True,
            "riskScore": 12,
            "budget": 2**33,
            "ratio": 0.5,
            "profile": {"country": "NL", "scores": [1, 2]},
            "checkedAt": checked_at,
            "note": None,
        },
    )

    next_task = await run.fetch_one(BACKGROUND_CHECK)
    assert next_task.process_instance_id == instance.id
    assert next_task.variables == {
        "userId": "u-2",
        "validated": True,
        "riskScore": 12,
        "budget": 2**33,
        "ratio": 0.5,
        "profile": {"country": "NL", "scores": [1, 2]},
        "checkedAt": checked_at,
        "note": None,
    }
    assert await run.admin.process_variables(instance.id) == next_task.variables
    types = await engine_types(engine_url, instance.id)
    assert (types["budget"], types["profile"], types["checkedAt"]) == ("Long", "Json", "Date")


async def test_failures_count_retries_down_to_an_incident(run: Run) -> None:
    instance = await run.start(userId="u-3")
    task = await run.fetch_one(VALIDATE)
    await run.camunda.handle_failure(
        task.id, worker_id=run.worker_id, error_message="first", retries=1, retry_timeout_ms=0
    )
    again = await run.fetch_one(VALIDATE)
    assert (again.id, again.retries) == (task.id, 1)
    assert await run.admin.incidents(instance.id) == []

    await run.camunda.handle_failure(
        task.id,
        worker_id=run.worker_id,
        error_message="x" * 1000,
        error_details="Traceback ...",
        retries=0,
        retry_timeout_ms=0,
    )
    [incident] = await run.admin.incidents(instance.id)
    assert incident["incidentType"] == "failedExternalTask"
    assert incident["incidentMessage"] == "x" * 666
    assert await run.fetch(VALIDATE, wait_ms=None) == []

    await run.admin.set_retries(task.id, 1)  # resolves the incident
    assert await run.admin.incidents(instance.id) == []
    assert [t.id for t in await run.fetch(VALIDATE)] == [task.id]


async def test_bpmn_error_routes_to_handle_error(run: Run) -> None:
    instance = await run.start(userId="u-4")
    task = await run.fetch_one(VALIDATE)
    await run.camunda.complete(task.id, worker_id=run.worker_id)
    check = await run.fetch_one(BACKGROUND_CHECK)
    await run.camunda.handle_bpmn_error(
        check.id,
        worker_id=run.worker_id,
        error_code="BACKGROUND_CHECK_FAILED",
        error_message="record found",
        variables={"reason": "record found"},
    )

    handler = await run.fetch_one(HANDLE_ERROR)
    assert handler.process_instance_id == instance.id
    assert handler.variables["errorCode"] == "BACKGROUND_CHECK_FAILED"
    assert handler.variables["errorMessage"] == "record found"
    assert handler.variables["reason"] == "record found"
    await run.camunda.complete(handler.id, worker_id=run.worker_id)

    history = await run.admin.historic_process_instance(instance.id)
    assert history is not None
    assert history["state"] == "COMPLETED"
    assert await run.admin.process_instance(instance.id) is None
    assert (await run.admin.historic_variables(instance.id))["reason"] == "record found"


async def test_extend_lock_and_only_by_the_owner(run: Run) -> None:
    await run.start(userId="u-5")
    task = await run.fetch_one(VALIDATE)
    assert task.lock_expiration_time is not None
    await run.camunda.extend_lock(task.id, worker_id=run.worker_id, new_duration_ms=600_000)
    [locked] = await run.camunda.locked_tasks(run.worker_id)
    assert locked.id == task.id
    assert locked.lock_expiration_time is not None
    assert locked.lock_expiration_time > task.lock_expiration_time + timedelta(minutes=5)

    with pytest.raises(BadRequest, match="locked by worker") as caught:
        await run.camunda.extend_lock(task.id, worker_id="someone-else", new_duration_ms=1_000)
    assert caught.value.status_code == 400
    await run.camunda.complete(task.id, worker_id=run.worker_id)


async def test_unlock_lets_another_worker_fetch_the_task(run: Run) -> None:
    await run.start(userId="u-6")
    task = await run.fetch_one(VALIDATE)
    other = f"{run.worker_id}-other"
    assert await run.fetch(VALIDATE, worker_id=other, wait_ms=None) == []

    await run.camunda.unlock(task.id)
    refetched = await run.fetch_one(VALIDATE, worker_id=other)
    assert (refetched.id, refetched.worker_id) == (task.id, other)

    with pytest.raises(BadRequest, match="locked by worker"):
        await run.camunda.complete(task.id, worker_id=run.worker_id)
    await run.camunda.complete(task.id, worker_id=other)
    assert await run.camunda.locked_tasks(other) == []


async def test_unknown_process_key_is_definition_not_found(camunda: CamundaClient) -> None:
    key = f"no-such-process-{uuid.uuid4().hex[:6]}"
    with pytest.raises(DefinitionNotFound, match=key) as caught:
        await camunda.start_process(key, variables={"a": 1})
    assert caught.value.status_code == 404
    assert caught.value.type == "RestException"


async def test_completing_a_missing_task_is_not_found(camunda: CamundaClient) -> None:
    with pytest.raises(NotFound) as caught:
        await camunda.complete(str(uuid.uuid4()), worker_id="nobody")
    assert caught.value.status_code == 404
    assert not isinstance(caught.value, DefinitionNotFound)
