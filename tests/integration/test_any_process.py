"""Any process the engine runs, started through the API, ends when its engine instance ends:
user tasks, Java expressions, failing jobs, other teams' workers, deletions; whether the
engine pushes what it does (its plugin) or the watcher reads its history.

Each test deploys its own BPMN, from its own folder, under a unique key: nothing here is
part of flowgate, and no flowgate worker serves these processes.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from deploy.local.servers import free_port
from flowgate.services.background import watcher
from flowgate.services.background.events import Happened
from flowgate.services.background.watcher import Watcher
from flowgate.shared import postgres
from flowgate.shared.camunda import CamundaClient, TopicRequest
from flowgate.shared.deployment import deploy_directory
from flowgate.shared.redis_client import RedisClient
from flowgate.shared.settings import Settings
from tests.helpers.api import Api, cid, running_app
from tests.helpers.engine import EngineAdmin, single, team_env, team_package
from tests.helpers.streams import entries
from tests.helpers.waiting import until
from tests.helpers.worker import ROOT, WorkerProcess

pytestmark = pytest.mark.slow

MakeSettings = Callable[..., Settings]


@pytest.fixture
def folder(tmp_path: Path, engine_url: str) -> Callable[..., Any]:
    """Deploys BPMN from a folder of the test's own (as BPMN_DIR would)."""
    directory = tmp_path / "bpmn"
    directory.mkdir()

    async def deploy(key: str, text: str) -> str:
        (directory / f"{key}.bpmn").write_text(text)
        async with CamundaClient(engine_url) as camunda:
            await deploy_directory(camunda, directory)
        return key

    return deploy


@pytest.fixture(params=["pushed", "history"])
async def api(
    request: pytest.FixtureRequest, make_settings: MakeSettings, engine_url: str
) -> AsyncIterator[Api]:
    """A replica that learns what the engine did from the events it pushes (its plugin),
    or, as with any other engine, from its history: every test runs both ways."""
    stream = {"history": ""}.get(request.param, Settings().engine_events_stream)
    settings = make_settings(
        camunda_base_url=engine_url, sync_timeout_ms=1_000, engine_events_stream=stream
    )
    async with running_app(settings) as running:
        yield running


def key_of(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


async def start(api: Api, key: str, correlation_id: str, **body: Any) -> Any:
    return await api.client.post(
        "/api/process/start",
        json={"processKey": key, "correlationId": correlation_id, **body},
        headers={"Prefer": "wait=1"},
    )


async def status(api: Api, correlation_id: str, wait_s: int = 30) -> Any:
    return await api.client.get(
        f"/api/process/status/{quote(correlation_id, safe='')}", params={"wait": wait_s}
    )


async def test_a_user_task_run_ends_ok_with_its_variables_when_the_task_is_done(
    api: Api, folder: Callable[..., Any], engine_url: str
) -> None:
    key = key_of("approval")
    await folder(key, single(key, 'userTask id="step" name="Approve"'))
    correlation_id = cid()
    accepted = await start(api, key, correlation_id, variables={"userId": "u-7"})
    assert accepted.status_code == 202
    instance = await instance_of(api, correlation_id)
    await complete_user_task(engine_url, instance, {"approved": True})
    done = await status(api, correlation_id)
    assert done.status_code == 200
    assert done.json()["data"] == {"userId": "u-7", "approved": True}  # no system variables

    # Every step is in the run's record, though no worker ran any; the audit trail lists
    # the work done: the start call and the user task, not the BPMN's events.
    async def recorded() -> bool:
        steps = await api.deps.store.steps.after(correlation_id)
        return [step.step for _, step in steps] == ["start", "step", "end"]

    await until(recorded, timeout_s=15, what="the run's steps")

    async def audited() -> bool:
        rows = await postgres.events_by_correlation(api.deps.pool, correlation_id)
        return [row.step_name for row in rows] == ["start", "step"]

    await until(audited, timeout_s=15, what="the user task's audit row")


async def test_a_run_without_a_wait_state_answers_200_at_once(
    api: Api, folder: Callable[..., Any]
) -> None:
    key = key_of("compute")
    await folder(
        key,
        single(
            key,
            'serviceTask id="step" camunda:expression="${execution.setVariable(\'answer\', 42)}"',
        ),
    )
    answer = await start(api, key, cid(), variables={"question": "life"})
    assert answer.status_code == 200
    assert answer.json()["result"] == {"question": "life", "answer": 42}
    only = await start(api, key, cid(), variables={"question": "x"}, fetchVariables=["answer"])
    assert only.json()["result"] == {"answer": 42}


async def test_a_failing_engine_job_ends_the_run_as_error(
    api: Api, folder: Callable[..., Any]
) -> None:
    key = key_of("failing")
    await folder(
        key,
        single(
            key,
            'serviceTask id="step" camunda:asyncBefore="true" '
            'camunda:expression="${noSuchBean.call()}"><bpmn:extensionElements>'
            "<camunda:failedJobRetryTimeCycle>R1/PT1S</camunda:failedJobRetryTimeCycle>"
            "</bpmn:extensionElements",
        ),
    )
    correlation_id = cid()
    assert (await start(api, key, correlation_id)).status_code in (202, 500)  # fails fast
    failed = await status(api, correlation_id, wait_s=60)
    assert failed.status_code == 500
    assert failed.json()["error"].startswith("incident at step:")


async def test_an_instance_deleted_outside_flowgate_ends_its_run_as_error(
    api: Api, folder: Callable[..., Any], engine_url: str
) -> None:
    key = key_of("deleted")
    await folder(key, single(key, 'userTask id="step"'))
    correlation_id = cid()
    await start(api, key, correlation_id)
    state = await api.deps.store.get(correlation_id)
    assert state is not None
    async with EngineAdmin(engine_url) as admin:
        await admin.delete_process_instance(str(state.instance_id))
    ended = await status(api, correlation_id)
    assert ended.status_code == 500
    assert "deleted outside flowgate" in ended.json()["error"]


async def test_another_teams_worker_does_the_step_and_its_incident_ends_the_run(
    api: Api, folder: Callable[..., Any], engine_url: str
) -> None:
    """Their steps are recorded from the engine's history, audit row included: also the
    step of a worker that died after the engine accepted it, before it wrote its row."""
    key = key_of("other-team")
    topic = TopicRequest(f"{key}.work", lock_duration_ms=60_000)
    await folder(
        key,
        single(key, f'serviceTask id="step" camunda:type="external" camunda:topic="{key}.work"'),
    )
    ok_id, failing_id = cid(), cid()
    await start(api, key, ok_id, variables={"n": 1})
    await start(api, key, failing_id, variables={"n": 2})
    async with CamundaClient(engine_url) as camunda:
        tasks = await camunda.fetch_and_lock("other-team", [topic], max_tasks=2,
                                             async_response_timeout_ms=5_000)  # fmt: skip
        assert len(tasks) == 2
        for task in tasks:
            if task.business_key == ok_id:
                await camunda.complete(task.id, worker_id="other-team", variables={"done": 1})
            else:
                await camunda.handle_failure(
                    task.id, worker_id="other-team", error_message="their system is down",
                    retries=0, retry_timeout_ms=0,
                )  # fmt: skip
    done, failed = await status(api, ok_id), await status(api, failing_id)
    assert (done.status_code, done.json()["data"]) == (200, {"n": 1, "done": 1})
    assert failed.status_code == 500
    assert "their system is down" in failed.json()["error"]

    async def audited() -> bool:
        rows = await postgres.events_by_correlation(api.deps.pool, ok_id)
        return any(r.step_name == "step" and r.originating_system == "engine" for r in rows)

    await until(audited, timeout_s=15, what="the other team's step in the audit trail")


async def test_an_incident_at_a_claimed_step_is_left_to_its_worker_then_ended_without_it(
    api: Api, folder: Callable[..., Any], engine_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker claims the step it reports out of retries, to end the run with the step's
    own error; one that died before it could leaves the run to the watcher, after a grace."""
    monkeypatch.setattr(watcher, "INCIDENT_GRACE_S", 1.0)
    key = key_of("claimed")
    topic = TopicRequest(f"{key}.work", lock_duration_ms=60_000)
    await folder(
        key,
        single(key, f'serviceTask id="step" camunda:type="external" camunda:topic="{key}.work"'),
    )
    correlation_id = cid()
    await start(api, key, correlation_id)
    async with CamundaClient(engine_url) as camunda:
        [task] = await camunda.fetch_and_lock("doomed", [topic], max_tasks=1,
                                              async_response_timeout_ms=5_000)  # fmt: skip
        assert task.activity_instance_id is not None
        await api.deps.store.steps.claim(correlation_id, task.activity_instance_id, "doomed")
        await camunda.handle_failure(
            task.id, worker_id="doomed", error_message="down", retries=0, retry_timeout_ms=0
        )  # ... and the worker dies before it ends the run
    redis, left = api.deps.redis, api.deps.keys.watcher_incidents

    async def left_to_the_worker() -> bool:
        return any(correlation_id.encode() in m for m in await redis.zrange(left, 0, -1))

    await until(left_to_the_worker, timeout_s=15, what="the incident left to its worker")
    state = await api.deps.store.get(correlation_id)
    assert state is not None
    assert state.status == "pending"
    failed = await status(api, correlation_id)
    assert failed.status_code == 500
    assert failed.json()["error"] == "incident at step: down"
    await until(lambda: _empty(redis, left), timeout_s=5, what="the left incident taken out")


async def _empty(redis: RedisClient, key: str) -> bool:
    return not await redis.zcard(key)


async def test_an_unexpected_error_in_a_watch_pass_does_not_stop_the_replica(
    make_settings: MakeSettings,
    folder: Callable[..., Any],
    engine_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """uvloop raises RuntimeError writing to a Redis connection closed under it (a master
    killed): the watcher logs it and carries on instead of taking the replica down."""
    settings = make_settings(camunda_base_url=engine_url)
    key = key_of("survives")
    await folder(key, single(key, 'userTask id="step"'))
    original, raised = Watcher.watch_once, asyncio.Event()

    async def fails_once(self: Watcher) -> None:
        if not raised.is_set():
            raised.set()
            raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")
        await original(self)

    monkeypatch.setattr(Watcher, "watch_once", fails_once)
    async with running_app(settings) as api:
        correlation_id = cid()
        assert (await start(api, key, correlation_id)).status_code == 202
        await asyncio.wait_for(raised.wait(), 30)
        instance = await instance_of(api, correlation_id)
        await complete_user_task(engine_url, instance, {"from": "engine"})
        ended = await status(api, correlation_id, wait_s=20)
        assert (ended.status_code, ended.json()["data"]) == (200, {"from": "engine"})


@pytest.mark.single_redis  # the engine pushes to the session's one Redis
async def test_pushed_events_a_failed_pass_read_are_read_again_by_the_next(
    make_settings: MakeSettings,
    folder: Callable[..., Any],
    engine_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The events' position moves on only once a pass has handled them: a pass that fails
    (or a watcher that dies) mid-way leaves them to the next, so a run's end is not lost."""
    settings = make_settings(camunda_base_url=engine_url)
    key = key_of("reread")
    await folder(key, single(key, 'userTask id="step"'))
    original, raised = Watcher._apply, asyncio.Event()

    async def fails_at_the_end(self: Watcher, happened: Happened) -> None:
        if happened.instances and not raised.is_set():
            raised.set()
            raise RuntimeError("the pass fails after reading the run's end")
        await original(self, happened)

    monkeypatch.setattr(Watcher, "_apply", fails_at_the_end)
    async with running_app(settings) as api:
        correlation_id = cid()
        assert (await start(api, key, correlation_id)).status_code == 202
        instance = await instance_of(api, correlation_id)
        await complete_user_task(engine_url, instance, {"read": "twice"})
        ended = await status(api, correlation_id, wait_s=20)
        assert raised.is_set()
        assert (ended.status_code, ended.json()["data"]) == (200, {"read": "twice"})


async def instance_of(api: Api, correlation_id: str) -> str:
    """The engine instance of a started run."""
    state = await api.deps.store.get(correlation_id)
    assert state is not None
    assert state.instance_id is not None
    return state.instance_id


async def complete_user_task(engine_url: str, instance_id: str, variables: dict[str, Any]) -> None:
    """Complete the one user task the instance waits on, in the engine (as a person would)."""
    async with EngineAdmin(engine_url) as admin:
        [task] = await admin.user_tasks(instance_id)
        await admin.complete_user_task(task["id"], variables)


def watching(api: Api) -> bool:
    return api.deps.metrics.registry.get_sample_value("flowgate_api_watching") == 1


async def test_when_the_watching_replica_stops_another_takes_the_watch_over(
    make_settings: MakeSettings, folder: Callable[..., Any], engine_url: str
) -> None:
    settings = make_settings(camunda_base_url=engine_url)
    key = key_of("handover")
    await folder(key, single(key, 'userTask id="step"'))
    first_up, first_stop = asyncio.Event(), asyncio.Event()
    holder: list[Api] = []

    async def first_replica() -> None:
        async with running_app(settings) as api:
            holder.append(api)
            first_up.set()
            await first_stop.wait()

    first = asyncio.create_task(first_replica())
    await asyncio.wait_for(first_up.wait(), 30)
    await until(lambda: watching(holder[0]), what="the first replica to watch")
    async with running_app(settings) as second:
        assert not watching(second)
        correlation_id = cid()
        await start(second, key, correlation_id)
        first_stop.set()
        await first
        instance = await instance_of(second, correlation_id)
        await complete_user_task(engine_url, instance, {"late": True})
        ended = await status(second, correlation_id, wait_s=15)
        assert (ended.status_code, ended.json()["data"]) == (200, {"late": True})
        assert watching(second)


@pytest.mark.single_redis  # the engine pushes to the session's one Redis
async def test_pushed_events_no_replica_read_are_read_when_one_starts(
    make_settings: MakeSettings, folder: Callable[..., Any], engine_url: str
) -> None:
    """The engine pushes a run's end while no replica watches; the next one to start reads
    it from where the last one stopped."""
    settings = make_settings(camunda_base_url=engine_url)
    key = key_of("offline")
    await folder(key, single(key, 'userTask id="step"'))
    correlation_id = cid()
    async with running_app(settings) as first:
        assert (await start(first, key, correlation_id)).status_code == 202
        await until(lambda: watching(first), what="the replica to watch")
        instance = await instance_of(first, correlation_id)
    await complete_user_task(engine_url, instance, {"while": "away"})
    async with running_app(settings) as second:
        ended = await status(second, correlation_id, wait_s=15)
        assert (ended.status_code, ended.json()["data"]) == (200, {"while": "away"})


@pytest.mark.single_redis  # the engine pushes to the session's one Redis
async def test_events_the_engine_could_not_push_are_read_from_its_history(
    make_settings: MakeSettings,
    folder: Callable[..., Any],
    engine_url: str,
    redis_client: RedisClient,
) -> None:
    """A run ends while its events never reach the stream (the plugin's queue overflowed
    while Redis was away, and says so): the watcher reads the history back over the gap."""
    settings = make_settings(camunda_base_url=engine_url)
    stream = settings.engine_events_stream
    key = key_of("lost")
    await folder(key, single(key, 'userTask id="step"'))
    correlation_id = cid()
    async with running_app(settings) as first:
        assert (await start(first, key, correlation_id)).status_code == 202
        await until(lambda: watching(first), what="the replica to watch")
        instance = await instance_of(first, correlation_id)
    await complete_user_task(engine_url, instance, {"from": "history"})

    async def pushed() -> bool:
        newest = await entries(redis_client, stream)
        return any(instance.encode() in fields[b"e"] for _, fields in newest[-20:])

    await until(pushed, what="the engine to push the run's end")
    await redis_client.xtrim(stream, maxlen=0)  # lost, as the plugin then says:
    await redis_client.set(f"{stream}:lost", str(uuid.uuid4()))
    async with running_app(settings) as second:
        ended = await status(second, correlation_id, wait_s=15)
        assert (ended.status_code, ended.json()["data"]) == (200, {"from": "history"})


# --- your handlers, your BPMN ---------------------------------------------------------------


async def test_a_teams_own_package_and_bpmn_run_through_the_real_stack(
    make_settings: MakeSettings, engine_url: str, tmp_path: Path
) -> None:
    key, name = key_of("greeter"), f"team_{uuid.uuid4().hex[:6]}"
    bpmn_dir = team_package(tmp_path, name, key)
    settings = make_settings(camunda_base_url=engine_url)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
        **team_env(settings, name=name, bpmn_dir=bpmn_dir),
    }
    deployed = subprocess_run([sys.executable, "-m", "flowgate.shared.deployment"], env)
    assert key in deployed
    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        await worker.ready()
        async with running_app(settings) as api:
            answer = await api.client.post(
                "/api/process/start",
                json={"processKey": key, "correlationId": cid(), "variables": {"name": "Ada"}},
                headers={"Prefer": "wait=20"},
            )
        assert answer.status_code == 200
        assert answer.json()["result"] == {"greeting": "hello, Ada"}
    finally:
        worker.stop()


@pytest.mark.parametrize(
    ("processes", "named"),
    [
        ("no_such_module_xyz:process", "cannot import 'no_such_module_xyz'"),
        ("flowgate.services.worker.handlers:NOPE", "has no 'NOPE'"),
        ("flowgate.services.worker.handlers.onboard_user:ONBOARD_BELOW", "is a int"),
        (
            "flowgate.services.worker.handlers:PROCESSES,flowgate.services.worker.handlers.benchmark:process",
            "topic 'benchmark.noop' is registered twice",
        ),
        ("nocolon", "is not module:attribute"),
    ],
)
async def test_a_worker_that_cannot_serve_what_it_is_told_stops_naming_it(
    make_settings: MakeSettings, engine_url: str, tmp_path: Path, processes: str, named: str
) -> None:
    settings = make_settings(camunda_base_url=engine_url)
    env = {
        **os.environ,
        "REDIS_URL": settings.redis_url,
        "REDIS_CLUSTER": str(settings.redis_cluster).lower(),
        "CAMUNDA_BASE_URL": engine_url,
        "WORKER_PROCESSES": processes,
        "WORKER_HEALTH_PORT": str(free_port()),
    }
    worker = WorkerProcess(env, tmp_path / "worker.log")
    assert await worker.exited(timeout_s=30) == 1
    assert named in (tmp_path / "worker.log").read_text()


def subprocess_run(argv: list[str], env: dict[str, str]) -> str:
    result = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout
