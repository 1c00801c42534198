"""6. Write-behind: lag from a state change to its row in Postgres, and drain after an outage.

Same set-up as item 4 (one API on CPU 0, the stand-in engine completing at once, wrk on CPU
1), the write-behind in a flowgate-flusher process of its own as ``make up`` runs it; the
lag is measured again with a second API that runs its flusher inside (the setting's
default), after the first. Lag: PostgreSQL runs with ``track_commit_timestamp=on``; for
every process the load finished, lag = commit time of its ``process_store`` row
(``pg_xact_commit_timestamp(xmin)``) minus the ``updatedAt`` of its final state (set when
the completion was written to Redis), so every row is a sample and nothing polls. Outage:
Postgres is stopped (fast shutdown), the same load runs against the API, the streams'
backlog (XLEN of every ``{p:n}:wb``) is read, Postgres is started again, and the backlog
is sampled every 50 ms until it is empty. Every process the load finished must then have
its final row.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time
import uuid
from typing import Any

import psycopg
from redis.asyncio import Redis

from bench import ours, wrk
from bench.harness import LOAD_CPU, SERVER_CPU, Run, Stack, summary
from bench.profile import Profile
from deploy.local.servers import pid_alive
from flowgate.shared.keys import Keys

WAIT_S = "30"

_LAG_SQL = """
SELECT EXTRACT(EPOCH FROM pg_xact_commit_timestamp(xmin) - updated_at) * 1000
FROM process_store WHERE correlation_id LIKE %s AND status = 'ok'
"""


async def _backlog(redis: Redis, keys: Keys) -> int:
    """Entries not in Postgres yet, over every partition's stream."""
    async with redis.pipeline(transaction=False) as pipe:
        for partition in keys.partitions:
            pipe.xlen(partition.writebehind)
        return sum(await pipe.execute())


async def _until_empty(redis: Redis, keys: Keys, timeout_s: float) -> list[tuple[float, int]]:
    """Sample the backlog every 50 ms until it is empty; returns (monotonic, length)."""
    samples = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        length = await _backlog(redis, keys)
        samples.append((time.monotonic(), length))
        if length == 0:
            break
        await asyncio.sleep(0.05)
    return samples


def _lags_ms(database_url: str, tag: str) -> list[float]:
    with psycopg.connect(database_url) as conn:
        return [float(row[0]) for row in conn.execute(_LAG_SQL, (f"{tag}-%",)).fetchall()]


def _wait_for_table(database_url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with psycopg.connect(database_url) as conn:
            if conn.execute("SELECT to_regclass('process_store')").fetchone() != (None,):
                return
        time.sleep(0.2)
    raise TimeoutError("the API never created process_store")


def _stop_postgres(run_: Run, stack: Stack) -> None:
    """Fast shutdown (SIGINT: disconnect clients, no waiting for them), then forget it."""
    server = stack.postgres
    os.killpg(server.pid, signal.SIGINT)
    deadline = time.monotonic() + 30
    while pid_alive(server.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    run_.stop(server)


async def _lag(
    api: ours.Api, redis: Redis, keys: Keys, conns: int, seconds: int
) -> tuple[wrk.WrkResult, list[float]]:
    tag = f"lag{uuid.uuid4().hex[:6]}"
    load = wrk.run("start", api.url, seconds=seconds, connections=conns, args=(tag, WAIT_S))
    await _until_empty(redis, keys, 60)
    return load, await asyncio.to_thread(_lags_ms, api.database_url, tag)


def _lag_result(load: wrk.WrkResult, lags: list[float]) -> dict[str, Any]:
    return {
        "load_starts_per_s": round(load.rps, 1),
        "rows": len(lags),
        "finished_by_load": load.ok(),
        "lag_ms": summary(lags),
    }


async def _lag_flusher_inside(
    run_: Run, stack: Stack, redis: Redis, conns: int, seconds: int
) -> dict[str, Any]:
    """The same lag with the flusher inside the API process (WRITEBEHIND_IN_API=true)."""
    prefix = f"bi{uuid.uuid4().hex[:6]}"
    stub = ours.start_stub(run_, stack, prefix=prefix, mode="instant", cpu=LOAD_CPU)
    api = ours.start_api(
        run_, stack, engine_url=stub.url, prefix=prefix,
        database_url=ours.new_schema(stack, "writebehind_inside"), cpu=SERVER_CPU,
        extra_env={"WRITEBEHIND_IN_API": "true"},
    )  # fmt: skip
    await asyncio.to_thread(_wait_for_table, api.database_url)
    load, lags = await _lag(api, redis, Keys(prefix), conns, seconds)
    median = summary(lags).get("median")
    print(f"  ... with the flusher inside the API: {load.rps:.0f} starts/s, lag {median} ms")
    run_.stop(api.server)
    run_.stop(stub.server)
    return _lag_result(load, lags)


async def run(run_: Run, stack: Stack, profile: Profile) -> dict[str, Any]:
    if why := wrk.available() or ours.available("flowgate.services.api"):
        return {"skipped": why}
    prefix = f"bw{uuid.uuid4().hex[:6]}"
    keys = Keys(prefix)
    stub = ours.start_stub(run_, stack, prefix=prefix, mode="instant", cpu=LOAD_CPU)
    database_url = ours.new_schema(stack, "writebehind")
    api = ours.start_api(
        run_, stack, engine_url=stub.url, prefix=prefix, database_url=database_url,
        cpu=SERVER_CPU, extra_env={"WRITEBEHIND_IN_API": "false"},
    )  # fmt: skip
    ours.start_flusher(run_, stack, prefix=prefix, database_url=database_url)
    await asyncio.to_thread(_wait_for_table, database_url)
    redis = Redis.from_url(stack.redis_url)
    conns, seconds = profile.wrk_connections, profile.wrk_seconds
    try:
        # Lag under the load of item 4.
        load, lags = await _lag(api, redis, keys, conns, seconds)
        print(f"  write-behind lag under {load.rps:.0f} starts/s: {summary(lags).get('median')} ms")
        inside = await _lag_flusher_inside(run_, stack, redis, conns, seconds)

        # Outage: Postgres down while the same load runs, then back.
        _stop_postgres(run_, stack)
        tag = f"out{uuid.uuid4().hex[:6]}"
        outage = wrk.run(
            "start", api.url, seconds=profile.outage_seconds, connections=conns, args=(tag, WAIT_S)
        )
        backlog = await _backlog(redis, keys)
        t_restart = time.monotonic()
        stack.postgres = run_.start(run_.share(dataclasses.replace(stack.postgres, proc=None)))
        t_ready = time.monotonic()
        samples = await _until_empty(redis, keys, 120)
        drained = samples[-1][1] == 0
        first_write = next((t for t, n in samples if n < backlog), None)
        t_empty = samples[-1][0]
        rows = len(await asyncio.to_thread(_lags_ms, database_url, tag))
    finally:
        await redis.aclose()
    # From "Postgres is ready" to "backlog empty": includes the flusher noticing it is back.
    drain_s = t_empty - t_ready
    print(f"  backlog of {backlog} drained: {drained}, {drain_s:.2f} s after Postgres was ready")
    return {
        "method": __doc__,
        "engine": "stand-in (bench/stubengine.py), not Camunda",
        "lag": _lag_result(load, lags),
        "lag_flusher_inside": inside,
        "outage": {
            "load_starts_per_s": round(outage.rps, 1),
            "finished_by_load": outage.ok(),
            "backlog_entries": backlog,
            "postgres_restart_s": round(t_ready - t_restart, 3),
            "first_write_after_ready_s": (
                round(first_write - t_ready, 3) if first_write is not None else None
            ),
            "drain_s": round(drain_s, 3),
            "drain_entries_per_s": round(backlog / drain_s, 1) if drain_s > 0 else None,
            "drain_after_first_write_s": (
                round(t_empty - first_write, 3) if first_write is not None else None
            ),
            "drain_entries_per_s_after_first_write": (
                round(backlog / (t_empty - first_write), 1)
                if first_write is not None and t_empty > first_write
                else None
            ),
            "drained": drained,
            "rows_after_drain": rows,
            "backlog_series": [
                (round(t - t_restart, 3), n) for t, n in samples[:: max(1, len(samples) // 100)]
            ],
        },
    }
