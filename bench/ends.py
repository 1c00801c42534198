"""7. End detection: how soon a run is answered once the engine ends it, no flowgate worker.

The real stack: one API process pinned to CPU 0 (its watcher reads the engine's history
every ``WATCH_INTERVAL_MS``, 100 ms), the engine on PostgreSQL, Redis; no flowgate worker.
The process is ``bench-approval`` (bench/bpmn/): start, one user task, end. One probe:

1. start a run through the API (``Prefer: respond-async``, 202);
2. long-poll its status URL (``?wait=30``) and let it park;
3. complete the user task through the engine's REST API, as a person in a task list would;
4. latency = the long-poll's 200 read - the instance's ``endTime`` in the engine's history
   (one host, one clock; the engine writes milliseconds).

Probes run one at a time, A B A B:

* A, quiet: nothing else happens in the engine;
* B, busy: ``ends_background`` clients at the same time start runs and complete their tasks
  as fast as they can, so every watcher pass reads many ended steps and instances (the
  history the watcher reads grows with the engine's end rate, not with the runs waiting).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from bench import ours
from bench.engine import Engine, engine_time
from bench.harness import SERVER_CPU, Run, Stack, summary
from bench.profile import Profile
from bench.rawhttp import Pool
from flowgate.shared.camunda import CamundaClient
from flowgate.shared.deployment import deploy_directory

PROCESS = "bench-approval"
BPMN = Path(__file__).parent / "bpmn"
ASYNC = {"Prefer": "respond-async"}
#: Long enough for a long-poll to be parked before the task is completed (not measured).
PARK_S = 0.05


class Failed(Exception):
    """A run did not end as it should (counted, not fatal: it is a finding)."""


async def _start(api: Pool, cid: str) -> None:
    body = {"processKey": PROCESS, "correlationId": cid, "variables": {"amount": 1}}
    response = await api.request("POST", "/api/process/start", body, ASYNC)
    if response.status != 202:
        raise Failed(f"start {response.status} {response.body[:200]!r}")


async def _complete_task(engine: Engine, cid: str) -> None:
    tasks = await engine.call("GET", f"/task?processInstanceBusinessKey={quote(cid)}")
    if len(tasks) != 1:
        raise Failed(f"{cid}: {len(tasks)} open tasks")
    await engine.call("POST", f"/task/{tasks[0]['id']}/complete", {"variables": {}})


async def _probe(api: Pool, poll: Pool, engine: Engine, cid: str) -> float:
    """One run from start to answer; ms from the engine's end to the client's 200."""
    await _start(api, cid)
    parked = asyncio.create_task(
        poll.request("GET", f"/api/process/status/{quote(cid, safe='')}?wait=30")
    )
    try:
        await asyncio.sleep(PARK_S)
        await _complete_task(engine, cid)
        answer = await parked
    finally:
        parked.cancel()
    answered_at = time.time() - (time.perf_counter() - answer.done)
    if answer.status != 200:
        raise Failed(f"{cid}: status {answer.status} {answer.body[:200]!r}")
    [history] = await engine.call(
        "GET", f"/history/process-instance?processInstanceBusinessKey={quote(cid)}"
    )
    return (answered_at - engine_time(history["endTime"])) * 1000


async def _background(api: Pool, engine: Engine, tag: str, stop: asyncio.Event) -> int:
    """Start runs and complete their tasks until ``stop``; how many ended."""
    ended = 0
    while not stop.is_set():
        cid = f"{tag}-{ended}"
        await _start(api, cid)
        await _complete_task(engine, cid)
        ended += 1
    return ended


async def _passes(api: ours.Api) -> tuple[float, float]:
    """The watcher's passes so far: (seconds spent, how many)."""
    samples = await asyncio.to_thread(ours.metrics, api)
    name = "flowgate_api_watch_pass_seconds"
    return samples.get(f"{name}_sum", 0.0), samples.get(f"{name}_count", 0.0)


@dataclass
class _Clients:
    server: ours.Api
    api: Pool  # starts
    poll: Pool  # one long-poll at a time
    engine: Engine

    async def close(self) -> None:
        for pool in (self.api, self.poll):
            await pool.close()
        await self.engine.close()


async def _round(clients: _Clients, side: str, probes: int, background: int) -> dict[str, Any]:
    api, poll, engine = clients.api, clients.poll, clients.engine
    tag = f"{side[0]}{uuid.uuid4().hex[:6]}"
    stop = asyncio.Event()
    busy = [
        asyncio.create_task(_background(api, engine, f"{tag}-bg{n}", stop))
        for n in range(background if side == "busy" else 0)
    ]
    latencies: list[float] = []
    failures: list[str] = []
    spent, passes = await _passes(clients.server)
    t0 = time.perf_counter()
    try:
        for n in range(probes):
            try:
                latencies.append(await _probe(api, poll, engine, f"{tag}-p{n}"))
            except Failed as exc:
                failures.append(str(exc))
    finally:
        stop.set()
        ended = sum(await asyncio.gather(*busy))
    elapsed = time.perf_counter() - t0
    spent_after, passes_after = await _passes(clients.server)
    pass_ms = (spent_after - spent) / max(passes_after - passes, 1) * 1000
    print(
        f"  {side}: p50 {summary(latencies)['median']} ms, {ended / elapsed:.0f} other ends/s, "
        f"watcher pass {pass_ms:.1f} ms"
    )
    return {
        "latencies": latencies,
        "failures": failures,
        "other_ends_per_s": ended / elapsed,
        "pass_ms": pass_ms,
    }


async def run(run_: Run, stack: Stack, profile: Profile) -> dict[str, Any]:
    if why := ours.available("flowgate.services.api"):
        return {"skipped": why}
    async with CamundaClient(stack.engine_url) as client:
        await deploy_directory(client, BPMN)
    prefix = f"be{uuid.uuid4().hex[:6]}"
    server = ours.start_api(
        run_, stack, engine_url=stack.engine_url, prefix=prefix,
        database_url=ours.new_schema(stack, "ends"), cpu=SERVER_CPU,
    )  # fmt: skip
    clients = _Clients(
        server,
        Pool("127.0.0.1", server.port, profile.ends_background + 1),
        Pool("127.0.0.1", server.port, 1),
        Engine(stack.engine_url, connections=profile.ends_background + 2),
    )
    rounds: dict[str, list[dict[str, Any]]] = {"quiet": [], "busy": []}
    try:
        await _round(clients, "quiet", profile.ends_probes // 4 or 1, 0)  # warm-up
        for _ in range(profile.rounds):
            for side in rounds:
                result = await _round(clients, side, profile.ends_probes, profile.ends_background)
                rounds[side].append(result)
    finally:
        await clients.close()
    return {
        "method": __doc__,
        "by_side": {
            side: {
                "latency_ms": summary([v for r in results for v in r["latencies"]]),
                "round_medians_ms": [summary(r["latencies"]).get("median") for r in results],
                "other_ends_per_s": summary([r["other_ends_per_s"] for r in results], 1),
                "watch_pass_ms": summary([r["pass_ms"] for r in results], 1),
                "failed": sum(len(r["failures"]) for r in results),
                "failures_sample": [f for r in results for f in r["failures"]][:3],
            }
            for side, results in rounds.items()
        },
        "background_clients": profile.ends_background,
        "target_p99_ms": 300,
    }
