"""The poll loop over a scripted engine and a real Redis: backpressure, backoff, shutdown,
lock extension, and no fetching while Redis is away."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
import redis.asyncio as aioredis
from pydantic import BaseModel

from flowgate.services.worker.context import TaskContext
from flowgate.services.worker.executor import Executor, RetryPolicy
from flowgate.services.worker.locks import Locks
from flowgate.services.worker.metrics import WorkerMetrics
from flowgate.services.worker.recorder import Recorder
from flowgate.services.worker.registry import Process, Registry, Step
from flowgate.services.worker.worker import Worker, WorkerOptions
from flowgate.shared.camunda import CamundaClient
from flowgate.shared.keys import Keys
from flowgate.shared.store.runs import RunStore
from tests.helpers.engine import FakeEngine, task_json
from tests.helpers.net import TcpProxy
from tests.helpers.waiting import until


class In(BaseModel):
    pass


def worker_for(
    camunda: CamundaClient,
    redis: aioredis.Redis,
    handler: Callable[..., Awaitable[Any]],
    *,
    concurrency: int = 10,
    prefetch: int = 0,
    max_tasks: int = 10,
    lock_duration_ms: int = 20_000,
) -> tuple[Worker, WorkerMetrics]:
    options = WorkerOptions(
        concurrency=concurrency,
        prefetch=prefetch,
        max_tasks=max_tasks,
        lock_duration_ms=lock_duration_ms,
        poll_timeout_ms=1_000,
        shutdown_grace_s=1,
    )
    process = Process("p", [Step("work", success="ok", error="failed")])
    process.handler("work")(handler)
    registry = Registry.of([process])
    metrics = WorkerMetrics()
    keys = Keys(f"t{uuid.uuid4().hex[:8]}")
    store = RunStore(redis, keys, result_ttl_s=60, pending_ttl_s=60)
    recorder = Recorder(redis, keys, store, metrics)
    executor = Executor(
        camunda=camunda,
        worker_id="w1",
        retry=RetryPolicy(),
        recorder=recorder,
        metrics=metrics,
    )
    locks = Locks(
        camunda,
        redis,
        keys,
        worker_id="w1",
        topics=Worker.topics(registry, options),
        poll_window_s=1,
    )
    worker = Worker(
        options=options,
        registry=registry,
        camunda=camunda,
        executor=executor,
        locks=locks,
        recorder=recorder,
        http=httpx.AsyncClient(),
        metrics=metrics,
        worker_id="w1",
    )
    return worker, metrics


async def empty_list(request: httpx.Request, body: Any) -> httpx.Response:
    return httpx.Response(200, json=[])


async def test_max_tasks_is_the_number_of_free_slots(redis_client: aioredis.Redis) -> None:
    release = asyncio.Event()
    handed_out = 0

    async def fetch(request: httpx.Request, body: Any) -> httpx.Response:
        nonlocal handed_out
        if handed_out == 0:
            handed_out = 1
            return httpx.Response(200, json=[task_json("t1", "p.work")])
        await asyncio.sleep(0.05)
        return httpx.Response(200, json=[])

    async def work(data: In) -> None:
        await release.wait()

    engine = FakeEngine({"fetchAndLock": fetch, "external-task": empty_list})
    async with engine.client() as camunda:
        worker, _ = worker_for(camunda, redis_client, work, concurrency=3, max_tasks=10)
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


async def test_prefetched_tasks_wait_for_a_slot_and_never_start_after_stop(
    redis_client: aioredis.Redis,
) -> None:
    """Two slots and two tasks locked ahead: a poll asks for up to four; two run, two
    wait (locks kept) and start as slots free; at stop, what still waits never starts."""
    waiting = [task_json(f"t{i}") for i in range(8)]
    started: list[str] = []

    async def fetch(request: httpx.Request, body: Any) -> httpx.Response:
        if waiting:
            handed = waiting[: body["maxTasks"]]
            del waiting[: len(handed)]
            return httpx.Response(200, json=handed)
        await asyncio.sleep(0.05)
        return httpx.Response(200, json=[])

    async def work(data: In, ctx: TaskContext[None]) -> None:
        started.append(ctx.task.id)
        if int(ctx.task.id[1:]) >= 4:  # t4 on: hold the slot until stopped
            await asyncio.Event().wait()

    engine = FakeEngine({"fetchAndLock": fetch, "external-task": empty_list})
    async with engine.client() as camunda:
        worker, metrics = worker_for(camunda, redis_client, work, concurrency=2, prefetch=2)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        await until(lambda: not waiting and len(started) == 6, timeout_s=5)
        await asyncio.sleep(0.2)
        assert sorted(started) == [f"t{i}" for i in range(6)]
        health = worker.health()[1]
        assert (health["inFlight"], health["prefetched"]) == (2, 2)
        stop.set()
        await asyncio.wait_for(running, 5)
    assert len(started) == 6  # t6 and t7 never started
    asked = [body["maxTasks"] for body in engine.bodies("fetchAndLock")]
    assert asked[0] == 4  # two slots and two ahead
    assert max(asked) == 4, asked  # (a 0: the lock sweeper's probe)
    assert metrics.count("p.work", "completed") == 4


async def test_fetch_errors_back_off_and_the_loop_recovers(redis_client: aioredis.Redis) -> None:
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
            return httpx.Response(200, json=[task_json("t1", "p.work")])
        await asyncio.sleep(0.05)
        return httpx.Response(200, json=[])

    async def work(data: In) -> None:
        done.set()

    engine = FakeEngine({"fetchAndLock": fetch, "external-task": empty_list})
    async with engine.client() as camunda:
        worker, metrics = worker_for(camunda, redis_client, work)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        await asyncio.wait_for(done.wait(), 10)
        stop.set()
        await asyncio.wait_for(running, 5)
    assert metrics.registry.get_sample_value("flowgate_worker_fetch_errors_total") == 2
    assert metrics.count("p.work", "completed") == 1


async def test_stop_cancels_the_long_poll_and_unlocks_what_is_still_held(
    redis_client: aioredis.Redis,
) -> None:
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
        return httpx.Response(200, json=[task_json("late", "p.work")] if sweeps == 1 else [])

    async def work(data: In) -> None: ...

    engine = FakeEngine({"fetchAndLock": fetch, "external-task": held})
    async with engine.client() as camunda:
        worker, _ = worker_for(camunda, redis_client, work)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        await asyncio.wait_for(polling.wait(), 5)
        started = time.monotonic()
        stop.set()
        await asyncio.wait_for(running, 5)
    assert time.monotonic() - started < 1.5
    assert [name for name in engine.actions() if name == "unlock"] == ["unlock"]


async def test_a_refused_lock_extension_marks_the_lock_lost(redis_client: aioredis.Redis) -> None:
    seen_lost: list[bool] = []
    finished = asyncio.Event()
    handed_out = False

    async def fetch(request: httpx.Request, body: Any) -> httpx.Response:
        nonlocal handed_out
        if not handed_out:
            handed_out = True
            return httpx.Response(200, json=[task_json("t1", "p.work")])
        await asyncio.sleep(0.05)
        return httpx.Response(200, json=[])

    async def extend(request: httpx.Request, body: Any) -> httpx.Response:
        body = {"type": "BadUserRequestException", "message": "Cannot extend a lock that expired"}
        return httpx.Response(400, json=body)

    async def work(data: In, ctx: TaskContext[None]) -> None:
        await asyncio.sleep(0.5)
        seen_lost.append(ctx.lock_lost.is_set())
        finished.set()

    engine = FakeEngine({"fetchAndLock": fetch, "extendLock": extend, "external-task": empty_list})
    async with engine.client() as camunda:
        worker, metrics = worker_for(camunda, redis_client, work, lock_duration_ms=200)
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


async def test_no_work_is_fetched_while_redis_is_away_and_it_resumes_after(redis_url: str) -> None:
    """A worker that could not record an outcome must not take work (nor burn retries)."""
    target = urlsplit(redis_url)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 6379)
    await proxy.up()
    redis = aioredis.Redis(port=proxy.port, socket_timeout=1, socket_connect_timeout=1)
    fetched = 0

    async def fetch(request: httpx.Request, body: Any) -> httpx.Response:
        nonlocal fetched
        fetched += 1
        await asyncio.sleep(0.05)
        return httpx.Response(200, json=[])

    async def work(data: In) -> None: ...

    engine = FakeEngine({"fetchAndLock": fetch, "external-task": empty_list})
    try:
        async with engine.client() as camunda:
            worker, metrics = worker_for(camunda, redis, work)
            stop = asyncio.Event()
            running = asyncio.create_task(worker.run(stop))
            await until(lambda: fetched > 0, what="a first poll")
            await proxy.down()
            await until(lambda: not worker.health()[1]["redisUp"], what="Redis missed")
            during = fetched
            await asyncio.sleep(1.5)
            assert fetched <= during + 1  # at most the poll already on its way
            assert metrics.registry.get_sample_value("flowgate_worker_redis_up") == 0
            await proxy.up()
            await until(lambda: fetched > during + 1, timeout_s=10, what="polling again")
            stop.set()
            await asyncio.wait_for(running, 10)
    finally:
        await redis.aclose()
        await proxy.down()
