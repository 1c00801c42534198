"""1. Gateway overhead: a synchronous start through flowgate vs the engine's own time.

The real stack: one API process pinned to CPU 0, one flowgate worker process, the Camunda
engine on PostgreSQL, Redis; the worker, the engine and the databases float. This process
(the client) runs on CPU 1 with raw keep-alive connections, ``c`` requests in flight.

For each concurrency, A B A B:

* A, gateway: ``POST /api/process/start`` of ``benchmark`` (one external task whose handler
  completes at once) with ``Prefer: wait=30``; latency = request written -> 200 read.
* B, engine only (the best a client can do without the gateway): start through the engine's
  REST API, then poll ``GET /history/process-instance/{id}`` every 5 ms until it has an
  ``endTime``; latency = start written -> the poll that saw the end.

Engine-intrinsic time of every instance, both sides: ``durationInMillis`` from the engine's
history (end - start inside the engine, which includes the worker's fetch and complete).
Overhead = client latency - engine-intrinsic time, per request.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from bench import ours
from bench.engine import Engine
from bench.harness import Run, Stack, summary
from bench.profile import Profile
from bench.rawhttp import Pool

POLL_INTERVAL_S = 0.005
DIRECT_TIMEOUT_S = 60
WAIT_HEADER = {"Prefer": "wait=30"}


class Failed(Exception):
    """One request did not end as it should (counted, not fatal: it is a finding)."""


async def _gateway_one(api: Pool, cid: str) -> float:
    response = await api.request(
        "POST", "/api/process/start", {"processKey": "benchmark", "correlationId": cid}, WAIT_HEADER
    )
    if response.status != 200:
        raise Failed(f"{response.status} {response.body[:200]!r}")
    return response.latency_ms


async def _direct_one(engine: Engine, cid: str) -> float:
    t0 = time.perf_counter()
    instance_id = await engine.start(cid)
    deadline = time.monotonic() + DIRECT_TIMEOUT_S
    while time.monotonic() < deadline:
        found = await engine.history_of(instance_id)
        if found and found.get("endTime"):
            return (time.perf_counter() - t0) * 1000
        await asyncio.sleep(POLL_INTERVAL_S)
    raise Failed(f"instance {instance_id} had not ended after {DIRECT_TIMEOUT_S} s")


async def _batch(
    one: Callable[[str], Awaitable[float]], tag: str, count: int, concurrency: int
) -> tuple[dict[str, float], list[str]]:
    """``count`` requests, ``concurrency`` in flight: (correlationId -> latency ms, failures)."""
    latencies: dict[str, float] = {}
    failures: list[str] = []
    ids = iter(range(count))

    async def loop() -> None:
        for i in ids:
            cid = f"{tag}-{i}"
            try:
                latencies[cid] = await one(cid)
            except Failed as exc:
                failures.append(str(exc))

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return latencies, failures


async def _engine_times(engine: Engine, tag: str) -> dict[str, float]:
    return {
        row["businessKey"]: float(row["durationInMillis"])
        for row in await engine.history(f"{tag}-%")
        if row.get("durationInMillis") is not None
    }


@dataclass
class Round:
    latencies: dict[str, float]  # correlationId -> client latency ms
    engine_ms: dict[str, float]  # correlationId -> the engine's durationInMillis
    requests_per_s: float
    failures: list[str]

    def overheads(self) -> list[float]:
        return [lat - self.engine_ms[c] for c, lat in self.latencies.items() if c in self.engine_ms]


def _summarize(rounds: list[Round]) -> dict[str, Any]:
    """All rounds pooled, plus each round's medians (to see the A B A B spread)."""
    latencies = [v for r in rounds for v in r.latencies.values()]
    engine = [r.engine_ms[c] for r in rounds for c in r.latencies if c in r.engine_ms]
    overheads = [v for r in rounds for v in r.overheads()]
    return {
        "latency_ms": summary(latencies),
        "engine_ms": summary(engine),
        "overhead_ms": summary(overheads),
        "missing_history": len(latencies) - len(engine),
        "failed": sum(len(r.failures) for r in rounds),
        "failures_sample": [f for r in rounds for f in r.failures][:3],
        "requests_per_s": summary([r.requests_per_s for r in rounds], 1),
        "round_medians_ms": [
            {
                "latency": summary(list(r.latencies.values()))["median"],
                "overhead": summary(r.overheads()).get("median"),
            }
            for r in rounds
        ],
    }


async def run(run_: Run, stack: Stack, profile: Profile) -> dict[str, Any]:
    if why := ours.available("flowgate.services.api") or ours.available("flowgate.services.worker"):
        return {"skipped": why}
    warm_tag = uuid.uuid4().hex[:6]
    api, _ = ours.start_gateway(run_, stack, name="gateway")
    engine = Engine(stack.engine_url, connections=max(profile.gateway_requests) + 4)
    pools: dict[int, Pool] = {}
    sides: dict[str, dict[int, list[Round]]] = {"gateway": {}, "engine_only": {}}
    try:
        warm = Pool("127.0.0.1", api.port, 16)
        pools[0] = warm
        await _batch(partial(_gateway_one, warm), f"warm{warm_tag}", profile.gateway_warmup, 16)
        await _batch(partial(_direct_one, engine), f"warmd{warm_tag}", profile.gateway_warmup, 16)
        for concurrency, count in profile.gateway_requests.items():
            pool = pools[concurrency] = Pool("127.0.0.1", api.port, concurrency)
            for round_no in range(profile.rounds):
                for side in ("gateway", "engine_only"):
                    tag = f"{side[0]}{concurrency}r{round_no}{uuid.uuid4().hex[:6]}"
                    one: Callable[[str], Awaitable[float]] = (
                        partial(_gateway_one, pool)
                        if side == "gateway"
                        else partial(_direct_one, engine)
                    )
                    t0 = time.perf_counter()
                    latencies, failures = await _batch(one, tag, count, concurrency)
                    rate = count / (time.perf_counter() - t0)
                    result = Round(latencies, await _engine_times(engine, tag), rate, failures)
                    sides[side].setdefault(concurrency, []).append(result)
                    p50 = summary(list(latencies.values()))["median"]
                    failed = len(failures)
                    print(f"  c={concurrency} {side}: p50 {p50} ms, {rate:.0f}/s, {failed} failed")
    finally:
        for pool in pools.values():
            await pool.close()
        await engine.close()
    return {
        "method": __doc__,
        "poll_interval_ms": POLL_INTERVAL_S * 1000,
        "by_concurrency": {
            c: {side: _summarize(sides[side][c]) for side in sides}
            for c in profile.gateway_requests
        },
    }
