"""10. CPU per run: what every process spends on one completed ``onboard-user`` run.

The real stack: one API process (CPU 0), one flowgate worker process, the engine on its own
PostgreSQL, flowgate's PostgreSQL (write-behind), Redis; everything but the API floats. This
process starts ``cost_runs`` runs of ``onboard-user`` (four external tasks each, every one
handled by flowgate's worker) through the API with ``Prefer: wait=60``, 16 in flight, and
checks each answer is 200 ``ok``. Around the batch it reads each process's CPU time from
``/proc`` (a PostgreSQL cluster counts with all its backends; the engine is one JVM), and
divides by the runs completed. The write-behind has caught up when the window closes (its
backlog is waited out), so its Postgres writes are inside it. A warm-up batch runs first.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

from bench import ours
from bench.harness import Run, Stack, cpu_seconds
from bench.profile import Profile
from bench.rawhttp import Pool

CONCURRENCY = 16
WAIT_HEADER = {"Prefer": "wait=60"}


def tree_cpu_seconds(root: int) -> float:
    """CPU time of ``root`` and every live descendant (a PostgreSQL cluster's backends)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        parents[int(stat.parent.name)] = int(fields[1])
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    return sum(cpu_seconds(pid) for pid in tree)


async def _batch(api: Pool, tag: str, runs: int) -> int:
    """Start ``runs`` runs and wait for each; how many ended ``ok``."""
    ids = iter(range(runs))
    done = 0

    async def lane() -> None:
        nonlocal done
        for n in ids:
            body = {
                "processKey": "onboard-user",
                "correlationId": f"{tag}-{n}",
                "variables": {"userId": f"user-{tag}-{n}"},
            }
            response = await api.request("POST", "/api/process/start", body, WAIT_HEADER)
            done += response.status == 200 and response.json().get("status") == "ok"

    await asyncio.gather(*(lane() for _ in range(CONCURRENCY)))
    return done


async def _writebehind_idle(api: ours.Api, timeout_s: float = 60) -> None:
    """Until the API's flusher has nothing left to write (its backlog gauge reads 0)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        samples = await asyncio.to_thread(ours.metrics, api)
        if not samples.get("flowgate_writebehind_backlog", 0):
            return
        await asyncio.sleep(0.2)


async def run(run_: Run, stack: Stack, profile: Profile) -> dict[str, Any]:
    if why := ours.available("services.api") or ours.available("services.worker"):
        return {"skipped": why}
    api, worker = ours.start_gateway(run_, stack, name="cost")
    processes = {
        "api": api.pid,
        "worker": worker.pid,
        "redis": stack.redis.pid,
        "postgres (flowgate)": stack.postgres.pid,
        "engine": stack.extra["engine"].pid,
        "postgres (engine)": stack.extra["engine-postgres"].pid,
    }
    pool = Pool("127.0.0.1", api.port, CONCURRENCY)
    try:
        tag = uuid.uuid4().hex[:6]
        await _batch(pool, f"warm{tag}", max(CONCURRENCY, profile.cost_runs // 10))
        await _writebehind_idle(api)
        before = {name: tree_cpu_seconds(pid) for name, pid in processes.items()}
        t0 = time.perf_counter()
        completed = await _batch(pool, f"run{tag}", profile.cost_runs)
        elapsed = time.perf_counter() - t0
        await _writebehind_idle(api)
        used = {name: tree_cpu_seconds(pid) - before[name] for name, pid in processes.items()}
    finally:
        await pool.close()
    per_run_ms = {name: round(s / max(completed, 1) * 1000, 2) for name, s in used.items()}
    gateway_ms = round(per_run_ms["api"] + per_run_ms["worker"], 2)
    print(f"  {completed}/{profile.cost_runs} ok in {elapsed:.1f} s; CPU ms per run: "
          f"{per_run_ms}; flowgate (api + worker) {gateway_ms}")  # fmt: skip
    return {
        "method": __doc__,
        "runs": profile.cost_runs,
        "completed_ok": completed,
        "runs_per_s": round(completed / elapsed, 1),
        "cpu_ms_per_run": per_run_ms,
        "flowgate_cpu_ms_per_run": gateway_ms,
        "target_flowgate_cpu_ms_per_run": 15,
    }
