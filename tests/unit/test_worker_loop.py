"""The poll loop over a scripted engine: backpressure, backoff, shutdown, lock extension."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson
from pydantic import BaseModel

from services.worker.context import TaskContext
from services.worker.executor import Executor
from services.worker.metrics import WorkerMetrics
from services.worker.registry import Process, Registry, Step
from services.worker.worker import Worker
from shared.camunda import CamundaClient
from shared.settings import Settings
from tests.unit.test_worker_executor import Store

Route = Callable[[httpx.Request, Any], Awaitable[httpx.Response]]


def task_json(task_id: str) -> dict[str, Any]:
    return {
        "id": task_id,
        "topicName": "p.work",
        "workerId": "w1",
        "processInstanceId": "pi",
        "processDefinitionKey": "p",
        "businessKey": None,
        "activityId": "work",
        "retries": None,
        "priority": 0,
        "variables": {},
    }


class Engine:
    """Routes by the last path segment to an async function; records every request."""

    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = routes
        self.calls: list[tuple[str, Any]] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        action = request.url.path.rsplit("/", 1)[-1]
        body = orjson.loads(request.content) if request.content else None
        self.calls.append((action, body))
        route = self.routes.get(action)
        return await route(request, body) if route else httpx.Response(204)

    def bodies(self, action: str) -> list[Any]:
        return [body for name, body in self.calls if name == action]


class In(BaseModel):
    pass


def worker_for(
    engine: Engine,
    http: httpx.AsyncClient,
    handler: Callable[..., Awaitable[Any]],
    **overrides: Any,
) -> tuple[Worker, WorkerMetrics]:
    settings = Settings(
        camunda_async_response_timeout_ms=1_000,
        worker_shutdown_grace_s=1,
        worker_health_port=0,
        **overrides,
    )
    process = Process("p", [Step("work", success="ok", error="failed")])
    process.handler("work")(handler)
    camunda = CamundaClient("http://engine", http=http)
    store, metrics = Store(), WorkerMetrics()
    executor = Executor(
        camunda=camunda,
        worker_id="w1",
        settings=settings,
        store=store,
        events=_discard,
        metrics=metrics,
    )
    worker = Worker(
        settings=settings,
        registry=Registry.of([process]),
        camunda=camunda,
        executor=executor,
        store=store,
        http=http,
        metrics=metrics,
        worker_id="w1",
    )
    return worker, metrics


async def _discard(record: object) -> None:
    return None


async def empty_list(request: httpx.Request, body: Any) -> httpx.Response:
    return httpx.Response(200, json=[])


async def test_max_tasks_is_the_number_of_free_slots() -> None:
    release = asyncio.Event()
    handed_out = 0

    async def fetch(request: httpx.Request, body: Any) -> httpx.Response:
        nonlocal handed_out
        if handed_out == 0:
            handed_out = 1
            return httpx.Response(200, json=[task_json("t1")])
        await asyncio.sleep(0.05)
        return httpx.Response(200, json=[])

    async def work(data: In) -> None:
        await release.wait()

    engine = Engine({"fetchAndLock": fetch, "external-task": empty_list})
    async with httpx.AsyncClient(transport=httpx.MockTransport(engine)) as http:
        worker, _ = worker_for(engine, http, work, worker_concurrency=3, camunda_max_tasks=10)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        await asyncio.sleep(0.3)
        release.set()
        stop.set()
        await asyncio.wait_for(running, 5)
    max_tasks = [body["maxTasks"] for body in engine.bodies("fetchAndLock")]
    assert max_tasks[0] == 3
    assert max_tasks[1] == 2  # one slot busy
    assert all(
        topic["topicName"] == "p.work" for topic in engine.bodies("fetchAndLock")[0]["topics"]
    )


async def test_fetch_errors_back_off_and_the_loop_recovers() -> None:
    answers = [
        httpx.Response(
            500, json={"type": "InvalidRequestException", "message": "too many requests"}
        ),
        httpx.Response(503, text="proxy says no"),
    ]
    done = asyncio.Event()

    async def fetch(request: httpx.Request, body: Any) -> httpx.Response:
        if answers:
            return answers.pop(0)
        if not done.is_set():
            return httpx.Response(200, json=[task_json("t1")])
        await asyncio.sleep(0.05)
        return httpx.Response(200, json=[])

    async def work(data: In) -> None:
        done.set()

    engine = Engine({"fetchAndLock": fetch, "external-task": empty_list})
    async with httpx.AsyncClient(transport=httpx.MockTransport(engine)) as http:
        worker, metrics = worker_for(engine, http, work)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        await asyncio.wait_for(done.wait(), 10)
        stop.set()
        await asyncio.wait_for(running, 5)
    assert metrics.registry.get_sample_value("flowgate_worker_fetch_errors_total") == 2
    assert metrics.count("p.work", "completed") == 1


async def test_stop_cancels_the_long_poll_and_unlocks_what_is_still_held() -> None:
    polling = asyncio.Event()
    sweeps = 0

    async def fetch(request: httpx.Request, body: Any) -> httpx.Response:
        if body["maxTasks"] == 0:  # the shutdown's poll replacement
            return httpx.Response(200, json=[])
        polling.set()
        await asyncio.sleep(3600)  # a long poll that never answers
        raise AssertionError("unreachable")

    async def held(request: httpx.Request, body: Any) -> httpx.Response:
        nonlocal sweeps
        sweeps += 1
        assert request.url.params["workerId"] == "w1"
        return httpx.Response(200, json=[task_json("late")] if sweeps == 1 else [])

    async def work(data: In) -> None: ...

    engine = Engine({"fetchAndLock": fetch, "external-task": held})
    async with httpx.AsyncClient(transport=httpx.MockTransport(engine)) as http:
        worker, _ = worker_for(engine, http, work)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        await asyncio.wait_for(polling.wait(), 5)
        started = time.monotonic()
        stop.set()
        await asyncio.wait_for(running, 5)
    assert time.monotonic() - started < 1.5
    assert [name for name, _ in engine.calls if name == "unlock"] == ["unlock"]


async def test_a_refused_lock_extension_marks_the_lock_lost() -> None:
    seen_lost: list[bool] = []
    finished = asyncio.Event()
    handed_out = False

    async def fetch(request: httpx.Request, body: Any) -> httpx.Response:
        nonlocal handed_out
        if not handed_out:
            handed_out = True
            return httpx.Response(200, json=[task_json("t1")])
        await asyncio.sleep(0.05)
        return httpx.Response(200, json=[])

    async def extend(request: httpx.Request, body: Any) -> httpx.Response:
        body = {"type": "BadUserRequestException", "message": "Cannot extend a lock that expired"}
        return httpx.Response(400, json=body)

    async def work(data: In, ctx: TaskContext) -> None:
        await asyncio.sleep(0.5)
        seen_lost.append(ctx.lock_lost.is_set())
        finished.set()

    engine = Engine({"fetchAndLock": fetch, "extendLock": extend, "external-task": empty_list})
    async with httpx.AsyncClient(transport=httpx.MockTransport(engine)) as http:
        worker, metrics = worker_for(engine, http, work, camunda_lock_duration_ms=200)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        await asyncio.wait_for(finished.wait(), 5)
        stop.set()
        await asyncio.wait_for(running, 5)
    assert seen_lost == [True]
    assert (
        metrics.registry.get_sample_value("flowgate_worker_lock_lost_total", {"topic": "p.work"})
        == 1
    )
