"""Talking to the real Camunda engine from the benchmarks: start, count, read history, drain.

The engine's REST API is used directly (not through shared/camunda.py) where the benchmark
measures it, so the client's own cost stays as small as it can be.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

import httpx

from bench.rawhttp import Pool, split_url
from flowgate.shared.camunda import CamundaClient
from flowgate.shared.deployment import deploy_directory

TOPIC = "benchmark.noop"
PROCESS = "benchmark"


def engine_time(value: str) -> float:
    """The engine's ``2025-01-01T10:00:00.123+0000`` as epoch seconds."""
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()


async def deploy(engine_url: str) -> list[str]:
    async with CamundaClient(engine_url) as client:
        return await deploy_directory(client)


class Engine:
    """A pool of raw keep-alive connections to …/engine-rest."""

    def __init__(self, engine_url: str, connections: int = 16) -> None:
        host, port, self.base = split_url(engine_url)
        self.pool = Pool(host, port, connections)

    async def close(self) -> None:
        await self.pool.close()

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        response = await self.pool.request(method, self.base + path, body)
        if response.status >= 300:
            raise RuntimeError(f"{method} {path}: {response.status} {response.body[:300]!r}")
        return response.json()

    async def start(self, business_key: str, variables: dict[str, Any] | None = None) -> str:
        body = {"businessKey": business_key, "variables": variables or {}}
        started = await self.call("POST", f"/process-definition/key/{PROCESS}/start", body)
        return str(started["id"])

    async def start_many(self, prefix: str, count: int, concurrency: int = 16) -> float:
        """Start ``count`` instances with business keys ``prefix-i``; returns starts/s."""
        t0 = time.perf_counter()
        queue = iter(range(count))

        async def loop() -> None:
            for i in queue:
                await self.start(f"{prefix}-{i}")

        await asyncio.gather(*(loop() for _ in range(concurrency)))
        return count / (time.perf_counter() - t0)

    async def open_tasks(self) -> int:
        """External tasks of the benchmark topic not yet completed (locked or not)."""
        body = await self.call("GET", f"/external-task/count?topicName={TOPIC}")
        return int(body["count"])

    async def unlock_all(self) -> int:
        """Unlock every locked benchmark task (a stopped client's locks would hold them 20 s)."""
        locked = await self.call(
            "GET", f"/external-task?topicName={TOPIC}&locked=true&maxResults=10000"
        )
        for task in locked:
            await self.pool.request("POST", f"{self.base}/external-task/{task['id']}/unlock")
        return len(locked)

    async def history(self, business_key_like: str) -> list[dict[str, Any]]:
        """Finished instances whose business key matches (SQL LIKE), by end time."""
        rows: list[dict[str, Any]] = []
        page = 1000
        while True:
            query = urlencode(
                {
                    "processInstanceBusinessKeyLike": business_key_like,
                    "finished": "true",
                    "sortBy": "endTime",
                    "sortOrder": "asc",
                    "firstResult": len(rows),
                    "maxResults": page,
                }
            )
            batch = await self.call("GET", f"/history/process-instance?{query}")
            rows += batch
            if len(batch) < page:
                return rows

    async def history_of(self, instance_id: str) -> dict[str, Any] | None:
        response = await self.pool.request(
            "GET", f"{self.base}/history/process-instance/{instance_id}"
        )
        return response.json() if response.status == 200 else None


async def raw_worker_loop(
    engine_url: str,
    *,
    loops: int,
    max_tasks: int,
    until: float,
    in_flight: int | None = None,
    stop_when_empty: bool = False,
    long_poll_ms: int = 1000,
    worker_id: str = "bench-raw",
) -> int:
    """The engine's ceiling: fetchAndLock + complete, no framework. Returns tasks completed.

    ``loops`` concurrent fetch loops. Each keeps up to ``in_flight`` completions running
    (default ``max_tasks``) and fetches again as soon as a slot is free, asking for as many
    tasks as it has free slots (at most ``max_tasks``). Bounded by the monotonic deadline
    ``until`` (and by the first empty fetch with ``stop_when_empty``).
    """
    done = 0
    errors: list[str] = []
    slots_per_loop = in_flight or max_tasks
    limits = httpx.Limits(max_connections=loops * (slots_per_loop + 1))
    async with httpx.AsyncClient(base_url=engine_url, limits=limits, timeout=30) as client:

        async def loop(n: int) -> None:
            nonlocal done
            # One worker id per loop: the engine answers 503 to a second concurrent long
            # poll of the same worker id.
            worker = f"{worker_id}-{n}"
            free = slots_per_loop
            freed = asyncio.Event()
            running: set[asyncio.Task[None]] = set()

            async def complete(task_id: str) -> None:
                nonlocal done, free
                try:
                    response = await client.post(
                        f"/external-task/{task_id}/complete", json={"workerId": worker}
                    )
                    done += response.status_code == 204
                finally:
                    free += 1
                    freed.set()

            while time.monotonic() < until:
                if free == 0:
                    freed.clear()
                    await freed.wait()
                    continue
                remaining_ms = int((until - time.monotonic()) * 1000)
                response = await client.post(
                    "/external-task/fetchAndLock",
                    json={
                        "workerId": worker,
                        "maxTasks": min(max_tasks, free),
                        "asyncResponseTimeout": max(0, min(long_poll_ms, remaining_ms)),
                        "topics": [{"topicName": TOPIC, "lockDuration": 20_000, "variables": []}],
                    },
                )
                if response.status_code != 200:
                    # e.g. the engine's long-poll queue is full (500); back off, go on.
                    errors.append(f"{response.status_code} {response.text[:200]}")
                    await asyncio.sleep(0.05)
                    continue
                tasks = response.json()
                if not tasks and stop_when_empty:
                    break
                for task in tasks:
                    free -= 1
                    job = asyncio.ensure_future(complete(task["id"]))
                    running.add(job)
                    job.add_done_callback(running.discard)
            await asyncio.gather(*running)

        await asyncio.gather(*(loop(n) for n in range(loops)))
    if errors:
        print(f"  raw loop: {len(errors)} failed fetches, e.g. {errors[0]}")
    return done
