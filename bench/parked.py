"""2. Wake latency and 3. parked capacity, on one API replica (stand-in engine, park mode).

The API is pinned to CPU 0; this process (the clients and the completer) to CPU 1. Requests
are started through the API (``Prefer: wait=120``) against the stand-in engine in ``park``
mode, which never completes anything, so they stay parked until the benchmark completes
their state itself with ``RunStore.finish`` (the worker's path: state write + PUBLISH
in one Lua script).

* Wake latency: with L requests parked (L - 1 in the background plus one probe), the probe
  is completed, and the time from the ``complete`` call's return (Redis has run the script,
  PUBLISH included, and answered) to the probe's response headers arriving at the client is
  recorded; the time from the call's start (adding the completer's own Redis round trip) is
  kept too, as an upper bound. One probe at a time, each checked for status and result.
* Memory: the API's RSS at 0 parked (after a warm-up) and at each step of the ramp.
* Capacity: at the top level every parked request is completed within one second (evenly
  paced, 10 ms ticks, each tick's completions pipelined), and every response must be a 200
  carrying its own correlationId and result.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from typing import Any

from redis.asyncio import Redis

from bench import ours
from bench.harness import LOAD_CPU, SERVER_CPU, CpuMeter, Run, Stack, rss_kb, summary
from bench.profile import Profile
from bench.rawhttp import Connection, Response
from flowgate.shared.keys import Keys
from flowgate.shared.redis_client import RedisClient
from flowgate.shared.state import Status
from flowgate.shared.store.runs import RunStore

WAIT_HEADER = {"Prefer": "wait=120"}
PARKED_GAUGE = "flowgate_api_parked_requests"
CONNECT_CONCURRENCY = 200


class Parker:
    """Parks requests on the API and completes them."""

    def __init__(self, api: ours.Api, redis: RedisClient, keys: Keys) -> None:
        self.api = api
        self.redis = redis
        self.keys = keys
        self.store = RunStore(redis, keys, result_ttl_s=3600, pending_ttl_s=3600)
        self.waiting: dict[str, tuple[Connection, asyncio.Task[Response]]] = {}

    async def park(self, cid: str) -> None:
        conn = Connection("127.0.0.1", self.api.port)
        body = {"processKey": "benchmark", "correlationId": cid}
        sent = await conn.send("POST", "/api/process/start", body, WAIT_HEADER)
        self.waiting[cid] = (conn, asyncio.ensure_future(conn.receive(sent)))

    async def park_many(self, cids: list[str]) -> None:
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def one(cid: str) -> None:
            async with gate:
                await self.park(cid)

        await asyncio.gather(*(one(cid) for cid in cids))

    async def parked(self) -> int | None:
        """The API's parked gauge; None while /metrics waits behind a queue of starts."""
        try:
            samples = await asyncio.to_thread(ours.metrics, self.api)
        except OSError:  # includes timeouts
            return None
        return int(samples.get(PARKED_GAUGE, 0))

    async def until_parked(self, count: int) -> None:
        deadline = time.monotonic() + 60 + count / 50  # starts run at hundreds per second
        while (now := await self.parked()) is None or now < count:
            early = [cid for cid, (_, task) in self.waiting.items() if task.done()]
            if early:
                task = self.waiting[early[0]][1]
                raise RuntimeError(f"{len(early)} requests answered before completion, e.g. "
                                   f"{task.exception() or task.result()}")  # fmt: skip
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {now} of {count} requests parked")
            await asyncio.sleep(0.05 if count > 10 else 0.002)

    async def close(self) -> None:
        for conn, task in self.waiting.values():
            task.cancel()
            await conn.close()
        self.waiting.clear()


def _check(cid: str, response: Response, marker: Any) -> bool:
    body = response.json() if response.status == 200 else None
    return bool(
        body and body.get("correlationId") == cid and body.get("result") == {"marker": marker}
    )


async def probe(parker: Parker, background: int) -> tuple[float, float, float, bool]:
    """Park one more request and complete it. Returns (wake ms from the completion call's
    return, wake ms from its start, the call's ms, whether the answer was right)."""
    cid = f"probe-{uuid.uuid4().hex[:16]}"
    await parker.park(cid)
    await parker.until_parked(background + 1)
    await asyncio.sleep(0.002)  # it registered; let it reach its await
    conn, task = parker.waiting.pop(cid)
    t0 = time.perf_counter()
    await parker.store.finish(cid, Status.OK, data={"marker": cid})
    t1 = time.perf_counter()
    try:
        response = await asyncio.wait_for(task, 30)
    finally:
        await conn.close()
    first = response.first_byte
    return (first - t1) * 1000, (first - t0) * 1000, (t1 - t0) * 1000, _check(cid, response, cid)


async def _complete_all(parker: Parker, spread_s: float) -> dict[str, Any]:
    """Complete every parked request, evenly over ``spread_s``; check every answer."""
    items = list(parker.waiting.items())
    # The same RunStore.finish, queued on a pipeline: a burst of completions goes out in
    # one round trip instead of costing this process one each (a single Redis's pipeline:
    # a cluster's cannot run scripts).
    assert isinstance(parker.redis, Redis)
    pipeline = parker.redis.pipeline(transaction=False)
    queued = RunStore(pipeline, parker.keys, result_ttl_s=3600, pending_ttl_s=3600)
    completed_at: dict[str, float] = {}
    ticks = max(1, int(spread_s / 0.01))
    per_tick = -(-len(items) // ticks)
    t_start = time.perf_counter()
    for tick in range(ticks):
        batch = items[tick * per_tick : (tick + 1) * per_tick]
        if not batch:
            break
        target = t_start + tick * spread_s / ticks
        if (delay := target - time.perf_counter()) > 0:
            await asyncio.sleep(delay)
        for cid, _ in batch:
            await queued.finish(cid, Status.OK, data={"marker": cid})
        now = time.perf_counter()
        for cid, _ in batch:
            completed_at[cid] = now
        await pipeline.execute()
    t_completed = time.perf_counter()
    tasks = [task for _, (_, task) in items]
    done, pending = await asyncio.wait(tasks, timeout=60)
    wakes, wrong, lost = [], 0, len(pending)
    last = t_start
    for cid, (_, task) in items:
        if task not in done or task.exception() is not None:
            lost += task in done
            continue
        response = task.result()
        if not _check(cid, response, cid):
            wrong += 1
        wakes.append((response.first_byte - completed_at[cid]) * 1000)
        last = max(last, response.first_byte)
    await parker.close()
    return {
        "parked": len(items),
        "answered_ok": len(items) - wrong - lost,
        "wrong": wrong,
        "lost": lost,
        "completion_spread_s": round(t_completed - t_start, 3),
        "last_answer_after_s": round(last - t_start, 3),
        "wake_ms": summary(wakes),
    }


def _ramp(levels: tuple[int, ...]) -> list[int]:
    """RSS steps: the levels plus quarters of the top one (for the memory plot)."""
    top = levels[-1]
    return sorted({*levels, *(top * q // 4 for q in (1, 2, 3)), 0} - {0})


async def run(run_: Run, stack: Stack, profile: Profile) -> dict[str, Any]:
    if why := ours.available("flowgate.services.api"):
        return {"skipped": why}
    prefix = f"bp{uuid.uuid4().hex[:6]}"
    stub = ours.start_stub(run_, stack, prefix=prefix, mode="park", cpu=LOAD_CPU)
    api = ours.start_api(
        run_, stack, engine_url=stub.url, prefix=prefix,
        database_url=ours.new_schema(stack, "parked"), cpu=SERVER_CPU,
        extra_env={"MAX_PARKED": str(profile.parked_levels[-1] + 100)},
    )  # fmt: skip
    redis = Redis.from_url(stack.redis_url)
    parker = Parker(api, redis, Keys(prefix))
    try:
        # Warm-up: a few hundred start-wake cycles, so the baseline has its imports and pools.
        await parker.park_many([f"warm-{i}-{uuid.uuid4().hex[:8]}" for i in range(200)])
        await parker.until_parked(200)
        await _complete_all(parker, 0.2)
        await asyncio.sleep(0.5)
        baseline = rss_kb(api.pid)
        rss = {0: baseline}
        wake: dict[int, dict[str, Any]] = {}
        for step in _ramp(profile.parked_levels):
            # At a wake level the probe is the last of `step` parked requests.
            target = step - 1 if step in profile.parked_levels else step
            missing = max(0, target - len(parker.waiting))
            await parker.park_many([f"bg-{uuid.uuid4().hex[:16]}" for _ in range(missing)])
            await parker.until_parked(len(parker.waiting))
            if parker.waiting:
                await asyncio.sleep(0.3)
                rss[len(parker.waiting)] = rss_kb(api.pid)
            if step in profile.parked_levels:
                wake[step] = await _wake_level(parker, profile.wake_probes)
                print(f"  wake with {step} parked: p50 {wake[step]['wake_ms'].get('median')} ms")
        # The capacity test holds exactly the top level (the last probe has been answered).
        top = profile.parked_levels[-1]
        await parker.park_many(
            [f"bg-{uuid.uuid4().hex[:16]}" for _ in range(top - len(parker.waiting))]
        )
        await parker.until_parked(top)
        await asyncio.sleep(0.3)
        rss_top = rss_kb(api.pid)
        pids = {"api": api.pid, "bench client": os.getpid(), "redis": stack.redis.pid}
        with CpuMeter(pids) as meter:
            capacity = await _complete_all(parker, 1.0)
        capacity["cpu_cores"] = meter.share()
        capacity["rss_kb_at_top"] = rss_top
        print(f"  capacity: {capacity['answered_ok']}/{capacity['parked']} answered correctly")
    finally:
        await parker.close()
        await redis.aclose()
    per_request = (rss_top - baseline) / top if top else 0.0
    return {
        "method": __doc__,
        "engine": "stand-in (bench/stubengine.py, park mode), not Camunda",
        "wake": wake,
        "memory": {
            "rss_kb_by_parked": rss,
            "baseline_kb": baseline,
            "per_request_kb": round(per_request, 2),
            "parked": top,
            "note": "RSS of the API process; kernel socket buffers are not included",
        },
        "capacity": capacity,
    }


async def _wake_level(parker: Parker, probes: int) -> dict[str, Any]:
    background = len(parker.waiting)
    wakes, upper, calls, wrong = [], [], [], 0
    for _ in range(probes):
        wake_ms, upper_ms, call_ms, correct = await probe(parker, background)
        wakes.append(wake_ms)
        upper.append(upper_ms)
        calls.append(call_ms)
        wrong += not correct
    return {
        "parked": background + 1,
        "wake_ms": summary(wakes),
        "wake_from_call_start_ms": summary(upper),
        "complete_call_ms": summary(calls),
        "wrong": wrong,
    }
