"""10. Cost per run, beside the reference gateway on the same engine.

One engine (Camunda on its own PostgreSQL, both observed), and in turn, A B A B, the two
gateways of ``onboard-user`` (four external tasks a run): A is flowgate as deployed (one API
replica, one flusher process, one worker, Redis), B the reference gateway of the seed's
design (bench/node/gateway.mjs, one Node process). Only one side runs at a time: both serve
the same topics. Each side's processes are started fresh for its round and warmed up.

For each concurrency (1, 16, 64) a batch of runs through ``POST /api/process/start``
(waiting for the result), every answer checked to be 200 ``ok``: runs/s and latency. At 16
in flight the batch is also the cost window, and every figure is per completed run:

* CPU ms of every process: the engine's JVM, the engine's PostgreSQL cluster, the gateway's
  PostgreSQL cluster, Redis, and each of the gateway's own processes (from ``/proc``; a
  cluster counts with all its backends);
* the engine's REST calls by endpoint (its access log);
* the statements the engine's database ran and the rows it wrote (``pg_stat_statements``,
  ``pg_stat_database``);
* the step hand-off, a task's creation in the engine to its fetch by a worker (flowgate:
  the worker's histogram; the reference: its handler's own clock).

Everything that writes behind (flowgate's flusher, the reference's un-awaited inserts) has
caught up before a window closes.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from bench import ours, reference
from bench.harness import Run, Stack, cpu_seconds, summary
from bench.profile import Profile
from bench.rawhttp import Pool
from deploy.local import servers

WAIT_HEADER = {"Prefer": "wait=60"}
COST_CONCURRENCY = 16
#: An engine path with its ids as ``{id}`` (ids are UUIDs), without the ``/engine-rest``.
_ID = re.compile(r"/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


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


@dataclass
class Side:
    """One gateway, started for one round: where to send starts, what to count."""

    name: str
    port: int
    #: The gateway's own processes (name -> pid).
    processes: dict[str, int]
    #: Hand-offs (ms) since the last call.
    handoffs: Callable[[], Awaitable[list[float]]]
    #: Until everything it writes behind has reached its database.
    settled: Callable[[], Awaitable[None]]
    extra: dict[str, Any] = field(default_factory=dict)


# --- the two sides -------------------------------------------------------------------------


def start_flowgate(run_: Run, stack: Stack) -> Side:
    """flowgate as ``make up`` runs it: the write-behind in a flusher process of its own."""
    prefix = f"co{uuid.uuid4().hex[:6]}"
    database_url = ours.new_schema(stack, "cost")
    engine = stack.engine_url
    api = ours.start_api(
        run_, stack, engine_url=engine, prefix=prefix, database_url=database_url, cpu=None,
        extra_env={"WRITEBEHIND_IN_API": "false"},
    )  # fmt: skip
    flusher = ours.start_flusher(run_, stack, prefix=prefix, database_url=database_url)
    health = servers.free_port()
    worker = ours.start_worker(
        run_, stack, engine_url=engine, prefix=prefix, database_url=database_url, cpu=None,
        extra_env={"WORKER_HEALTH_PORT": str(health)},
    )  # fmt: skip
    before: dict[float, float] = {}

    async def handoffs() -> list[float]:
        buckets = await asyncio.to_thread(_histogram, health, "flowgate_worker_handoff_seconds")
        since = {le: count - before.get(le, 0) for le, count in buckets.items()}
        before.update(buckets)
        return _samples_ms(since)

    async def settled() -> None:
        await _until_zero(lambda: ours.metrics(api).get("flowgate_writebehind_backlog", 0))

    processes = {"api": api.pid, "flusher": flusher.pid, "worker": worker.pid}
    return Side("flowgate", api.port, processes, handoffs, settled)


def start_reference(run_: Run, stack: Stack) -> Side:
    gateway = reference.start_reference(
        run_, stack, database_url=ours.new_schema(stack, "reference")
    )

    async def handoffs() -> list[float]:
        return await asyncio.to_thread(gateway.handoffs_ms)

    async def settled() -> None:
        await asyncio.sleep(1)  # its inserts are not awaited: give them their moment

    return Side("reference", gateway.port, {"gateway": gateway.pid}, handoffs, settled)


SIDES: dict[str, Callable[[Run, Stack], Side]] = {
    "flowgate": start_flowgate,
    "reference": start_reference,
}


# --- one round of one side -----------------------------------------------------------------


async def _batch(pool: Pool, tag: str, runs: int, concurrency: int) -> tuple[list[float], int]:
    """``runs`` starts of onboard-user, ``concurrency`` in flight: latencies (ms) of the
    runs that ended ``ok``, and how many did not."""
    ids = iter(range(runs))
    latencies: list[float] = []
    failed = 0

    async def lane() -> None:
        nonlocal failed
        for n in ids:
            body = {
                "processKey": "onboard-user",
                "correlationId": f"{tag}-{n}",
                "variables": {"userId": f"user-{tag}-{n}"},
            }
            response = await pool.request("POST", "/api/process/start", body, WAIT_HEADER)
            answer = response.json() if response.status == 200 else None
            if answer and answer.get("status") == "ok":
                latencies.append(response.latency_ms)
            else:
                failed += 1

    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return latencies, failed


async def measure_side(
    run_: Run, stack: Stack, profile: Profile, name: str, observed: Mapping[str, int]
) -> dict[str, Any]:
    """Start one side, warm it up, run each concurrency's batch, stop it."""
    with run_.scope():
        side = SIDES[name](run_, stack)
        pool = Pool("127.0.0.1", side.port, max(profile.cost_runs))
        try:
            tag = f"{name[:3]}{uuid.uuid4().hex[:6]}"
            await _batch(pool, f"warm-{tag}", profile.cost_warmup, COST_CONCURRENCY)
            await side.settled()
            await side.handoffs()  # forget the warm-up's
            by_concurrency: dict[int, Any] = {}
            for concurrency, runs in profile.cost_runs.items():
                window = Window(stack, {**observed, **side.processes}) if (
                    concurrency == COST_CONCURRENCY
                ) else None  # fmt: skip
                if window:
                    await window.open()
                t0 = time.perf_counter()
                latencies, failed = await _batch(pool, f"{tag}-c{concurrency}", runs, concurrency)
                elapsed = time.perf_counter() - t0
                measured: dict[str, Any] = {
                    "runs": runs,
                    "failed": failed,
                    "runs_per_s": round(len(latencies) / elapsed, 1),
                    "latency_ms": summary(latencies, 1),
                }
                if window:
                    await side.settled()
                    measured["cost"] = await window.close(len(latencies))
                measured["handoff_ms"] = summary(await side.handoffs(), 2)
                by_concurrency[concurrency] = measured
                p50 = measured["latency_ms"].get("median")
                print(f"  {name} c={concurrency}: {measured['runs_per_s']} runs/s, p50 {p50} ms")
        finally:
            await pool.close()
    return {"by_concurrency": by_concurrency, "own_processes": list(side.processes)}


class Window:
    """What every process, the engine's REST API and its database did over a window."""

    def __init__(self, stack: Stack, processes: Mapping[str, int]) -> None:
        self._stack = stack
        self._processes = dict(processes)
        self._cpu: dict[str, float] = {}
        self._calls = 0
        self._rows: dict[str, int] = {}

    async def open(self) -> None:
        self._calls = len(_engine_calls(self._stack))
        self._rows = (await asyncio.to_thread(_engine_database, self._stack, reset=True))[0]
        self._cpu = {name: tree_cpu_seconds(pid) for name, pid in self._processes.items()}

    async def close(self, completed: int) -> dict[str, Any]:
        used = {n: tree_cpu_seconds(pid) - self._cpu[n] for n, pid in self._processes.items()}
        await asyncio.sleep(1.5)  # PostgreSQL flushes its statistics at most once a second
        rows, statements = await asyncio.to_thread(_engine_database, self._stack, reset=False)
        calls = Counter(_endpoint(line) for line in _engine_calls(self._stack)[self._calls :])
        per = max(completed, 1)
        written = {kind: rows[kind] - self._rows.get(kind, 0) for kind in rows}
        written = {kind: n for kind, n in written.items() if n or not kind.startswith("rows w")}
        return {
            "completed": completed,
            "cpu_ms_per_run": {name: round(s * 1000 / per, 2) for name, s in used.items()},
            "engine_calls_per_run": {e: round(n / per, 2) for e, n in calls.most_common()},
            "engine_sql_per_run": {
                k: round(n / per, 1) for k, n in {**statements, **written}.items()
            },
        }


def _engine_calls(stack: Stack) -> list[str]:
    assert stack.engine_calls is not None, "the engine was started without its access log"
    return stack.engine_calls.read_text().splitlines() if stack.engine_calls.exists() else []


def _endpoint(line: str) -> str:
    """``POST /engine-rest/external-task/<id>/complete 204`` becomes
    ``POST /external-task/{id}/complete``."""
    method, path, *_ = line.split()
    return f"{method} {_ID.sub('/{id}', path.removeprefix('/engine-rest'))}"


def _engine_database(stack: Stack, *, reset: bool) -> tuple[dict[str, int], dict[str, int]]:
    """The rows the engine's database has written so far, and the statements it ran since
    the last reset, in all and by kind (select, insert, update, delete)."""
    with psycopg.connect(stack.engine_database_url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        if reset:
            conn.execute("SELECT pg_stat_statements_reset()")
        row = conn.execute(
            "SELECT tup_inserted, tup_updated, tup_deleted FROM pg_stat_database"
            " WHERE datname = current_database()"
        ).fetchone()
        kinds = conn.execute(
            "SELECT lower(split_part(ltrim(query), ' ', 1)), sum(calls)::bigint"
            " FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database"
            " WHERE datname = current_database()) GROUP BY 1"
        ).fetchall()
        tables = conn.execute(
            "SELECT lower(relname), n_tup_ins + n_tup_upd + n_tup_del FROM pg_stat_user_tables"
        ).fetchall()
    assert row is not None
    rows = {"rows inserted": row[0], "rows updated": row[1], "rows deleted": row[2]}
    rows |= {f"rows written {table}": int(n) for table, n in tables}
    by_kind = {f"{kind}s": int(n) for kind, n in kinds if kind in _STATEMENTS}
    return rows, {"statements": sum(by_kind.values()), **by_kind}


_STATEMENTS = ("select", "insert", "update", "delete")


def _histogram(port: int, name: str) -> dict[float, float]:
    """A Prometheus histogram's cumulative bucket counts (``le`` -> count) from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float(le)] = float(line.rsplit(" ", 1)[1])
    return buckets


def _samples_ms(cumulative: Mapping[float, float]) -> list[float]:
    """Stand-in samples (ms) from cumulative bucket counts: each observation at the middle
    of its bucket (linear interpolation, as Prometheus's histogram_quantile assumes)."""
    samples: list[float] = []
    lower, below = 0.0, 0.0
    for le in sorted(cumulative):
        count = int(cumulative[le] - below)
        upper = le if le != float("inf") else lower * 2
        for i in range(count):
            samples.append((lower + (upper - lower) * (i + 0.5) / count) * 1000)
        lower, below = upper, cumulative[le]
    return samples


async def _until_zero(read: Callable[[], float], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not await asyncio.to_thread(read):
            return
        await asyncio.sleep(0.2)


# --- the benchmark -------------------------------------------------------------------------


async def run(run_: Run, stack: Stack, profile: Profile) -> dict[str, Any]:
    if why := reference.node_missing() or ours.available("services.api"):
        return {"skipped": why}
    observed = {
        "engine": stack.extra["engine"].pid,
        "postgres (engine)": stack.extra["engine-postgres"].pid,
        "postgres (gateway)": stack.postgres.pid,
        "redis": stack.redis.pid,
    }
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in SIDES}
    for _ in range(profile.rounds):
        for name in SIDES:  # A B A B
            rounds[name].append(await measure_side(run_, stack, profile, name, observed))
    return {"method": __doc__, "rounds": rounds, "ratios": ratios(rounds)}


#: What the reference's figures are set beside: the processes on the engine's side, and
#: each gateway's own (its database included).
ENGINE_SIDE = ("engine", "postgres (engine)")
OWN = {
    "flowgate": ("api", "flusher", "worker", "redis", "postgres (gateway)"),
    "reference": ("gateway", "postgres (gateway)"),
}


def ratios(rounds: Mapping[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """flowgate beside the reference, each figure the mean of its rounds."""

    def mean(name: str, *path: Any) -> float | None:
        found = [_at(measured, path) for measured in rounds[name]]
        values = [v for v in found if isinstance(v, int | float)]
        return sum(values) / len(values) if values else None

    def cpu(name: str, processes: tuple[str, ...]) -> float | None:
        cost = ("by_concurrency", COST_CONCURRENCY, "cost", "cpu_ms_per_run")
        parts = [mean(name, *cost, process) for process in processes]
        return sum(p for p in parts if p is not None) if parts[0] is not None else None

    figures: dict[str, dict[str, float | None]] = {
        **{
            f"runs/s at {c}": {n: mean(n, "by_concurrency", c, "runs_per_s") for n in rounds}
            for c in (1, COST_CONCURRENCY, 64)
        },
        "latency p50 at 1 (ms)": {
            n: mean(n, "by_concurrency", 1, "latency_ms", "median") for n in rounds
        },
        "engine + PostgreSQL CPU ms per run": {n: cpu(n, ENGINE_SIDE) for n in rounds},
        "own CPU ms per run": {n: cpu(n, OWN[n]) for n in rounds},
        **{
            f"hand-off p50 at {c} (ms)": {
                n: mean(n, "by_concurrency", c, "handoff_ms", "median") for n in rounds
            }
            for c in (1, COST_CONCURRENCY)
        },
    }
    return {
        figure: {**sides, "ratio": _ratio(sides.get("flowgate"), sides.get("reference"))}
        for figure, sides in figures.items()
    }


def _at(obj: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key, obj.get(str(key)))
    return obj


def _ratio(ours_: float | None, theirs: float | None) -> float | None:
    return round(ours_ / theirs, 2) if ours_ is not None and theirs else None
