"""10. Cost per run, beside the reference gateway on the same engine.

One engine (Camunda on its own PostgreSQL, both observed), and in turn, A B A B, the two
gateways of ``onboard-user`` (four external tasks a run): A is flowgate as deployed (one API
replica, one flusher process, one worker, Redis), B the reference gateway of the seed's
design (bench/node/gateway.mjs, one Node process); with an empty history also C, flowgate
with ``make up``'s two worker processes, so that what a second worker costs the engine shows
(A B C A B C). Only one side runs at a time: all serve the same topics. Each side's
processes are started fresh for its round and warmed up.

For each concurrency (1, 16, 64) a batch of runs through ``POST /api/process/start``
(waiting for the result), every answer checked to be 200 ``ok``: runs/s and latency. At 16
in flight the batch is also the cost window, and every figure is per completed run:

* CPU ms of every process: the engine's JVM, the engine's PostgreSQL cluster, the gateway's
  PostgreSQL cluster, Redis, and each of the gateway's own processes (from ``/proc``; a
  cluster counts with all its backends);
* the engine's REST calls by endpoint (its access log);
* the statements the engine's database ran and the rows they wrote (``pg_stat_statements``);
* the step hand-off, a task's creation in the engine to its fetch by a worker (flowgate:
  the worker's histogram; the reference: its handler's own clock).

Everything that writes behind (flowgate's flusher, the reference's un-awaited inserts) has
caught up before a window closes.
"""

from __future__ import annotations

import asyncio
import functools
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

from bench import history, ours, reference
from bench.harness import Run, Stack, cpu_seconds, summary
from bench.profile import Profile
from bench.rawhttp import Pool
from deploy.local import servers
from flowgate.shared.keys import Keys
from flowgate.shared.redis_client import RedisClient, connect
from flowgate.shared.settings import Settings

WAIT_HEADER = {"Prefer": "wait=60"}
COST_CONCURRENCY = 16
#: The stream the engine's plugin pushes to (the harness's engine: the default).
ENGINE_EVENTS = Settings.model_fields["engine_events_stream"].default
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
    #: Its store grown to hold this many more finished runs.
    grow: Callable[[int], Awaitable[None]]


# --- the two sides -------------------------------------------------------------------------


@dataclass
class Stores:
    """Where each side keeps its runs: fresh ones for each round (empty), or the grown ones
    of section "With work already done", shared by that phase's rounds."""

    flowgate_prefix: str = field(default_factory=lambda: f"co{uuid.uuid4().hex[:6]}")
    flowgate_database: str = ""
    reference_database: str = ""
    #: Finished runs to hold before measuring (0: as they come), and the sides grown so.
    grown_to: int = 0
    grown: set[str] = field(default_factory=set)


def start_flowgate(
    run_: Run, stack: Stack, stores: Stores, env: Mapping[str, str] = {}, *, workers: int = 1
) -> Side:
    """flowgate as ``make up`` runs it: the write-behind in a flusher process of its own;
    ``workers`` worker processes (``make up`` runs two)."""
    prefix = stores.flowgate_prefix
    database_url = stores.flowgate_database or ours.new_schema(stack, "cost")
    engine = stack.engine_url
    api = ours.start_api(
        run_, stack, engine_url=engine, prefix=prefix, database_url=database_url, cpu=None,
        extra_env={"WRITEBEHIND_IN_API": "false", **env},
    )  # fmt: skip
    flusher = ours.start_flusher(
        run_, stack, prefix=prefix, database_url=database_url, extra_env=dict(env)
    )
    processes = {"api": api.pid, "flusher": flusher.pid}
    health: list[int] = []
    for n in range(1, workers + 1):
        health.append(servers.free_port())
        worker = ours.start_worker(
            run_, stack, engine_url=engine, prefix=prefix, database_url=database_url, cpu=None,
            extra_env={"WORKER_HEALTH_PORT": str(health[-1]), **env},
        )  # fmt: skip
        processes["worker" if n == 1 else f"worker {n}"] = worker.pid
    before: dict[float, float] = {}

    async def handoffs() -> list[float]:
        buckets: Counter[float] = Counter()
        for port in health:
            buckets.update(
                await asyncio.to_thread(_histogram, port, "flowgate_worker_handoff_seconds")
            )
        since = {le: count - before.get(le, 0) for le, count in buckets.items()}
        before.update(buckets)
        return _samples_ms(since)

    async def settled() -> None:
        await _until_zero(lambda: ours.metrics(api).get("flowgate_writebehind_backlog", 0))

    async def grow(runs: int) -> None:
        await history.grow_flowgate(
            stack.redis_url, cluster=stack.redis_cluster, prefix=prefix, runs=runs
        )

    name = "flowgate" if workers == 1 else f"flowgate, {workers} workers"
    return Side(name, api.port, processes, handoffs, settled, grow)


def start_reference(run_: Run, stack: Stack, stores: Stores, env: Mapping[str, str] = {}) -> Side:
    database_url = stores.reference_database or ours.new_schema(stack, "reference")
    gateway = reference.start_reference(run_, stack, database_url=database_url)

    async def handoffs() -> list[float]:
        return await asyncio.to_thread(gateway.handoffs_ms)

    async def settled() -> None:
        await asyncio.sleep(1)  # its inserts are not awaited: give them their moment

    async def grow(runs: int) -> None:
        for table in ("process_store", "event_log"):
            per_run = 1 if table == "process_store" else 4
            await asyncio.to_thread(
                history.grow_table, database_url, table, "correlation_id", runs * per_run
            )

    return Side("reference", gateway.port, {"gateway": gateway.pid}, handoffs, settled, grow)


SIDES: dict[str, Callable[[Run, Stack, Stores], Side]] = {
    "flowgate": start_flowgate,
    "reference": start_reference,
}
#: ``make up``'s two workers, beside the two (empty history only): what a second worker
#: process costs the engine (deploy/camunda's long-poll handler takes their fetches one at
#: a time).
TWO_WORKERS = "flowgate, 2 workers"
WITH_TWO_WORKERS: dict[str, Callable[[Run, Stack, Stores], Side]] = {
    **SIDES,
    TWO_WORKERS: functools.partial(start_flowgate, workers=2),
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
    run_: Run,
    stack: Stack,
    profile: Profile,
    name: str,
    start: Callable[[Run, Stack, Stores], Side],
    observed: Mapping[str, int],
    stores: Stores,
) -> dict[str, Any]:
    """Start one side, warm it up (growing its store first where asked), run each
    concurrency's batch, stop it."""
    with run_.scope():
        side = start(run_, stack, stores)
        pool = Pool("127.0.0.1", side.port, max(profile.cost_runs))
        try:
            tag = f"{name[:3]}{uuid.uuid4().hex[:6]}"
            await _batch(pool, f"warm-{tag}", profile.cost_warmup, COST_CONCURRENCY)
            if stores.grown_to and name not in stores.grown:
                await side.grow(stores.grown_to)
                stores.grown.add(name)
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

    async def open(self) -> None:
        self._calls = len(engine_calls(self._stack))
        await asyncio.to_thread(_engine_database, self._stack, reset=True)
        self._cpu = {name: tree_cpu_seconds(pid) for name, pid in self._processes.items()}

    async def close(self, completed: int) -> dict[str, Any]:
        used = {n: tree_cpu_seconds(pid) - self._cpu[n] for n, pid in self._processes.items()}
        sql = await asyncio.to_thread(_engine_database, self._stack, reset=False)
        calls = Counter(endpoint(line) for line in engine_calls(self._stack)[self._calls :])
        per = max(completed, 1)
        return {
            "completed": completed,
            "cpu_ms_per_run": {name: round(s * 1000 / per, 2) for name, s in used.items()},
            "engine_calls_per_run": {e: round(n / per, 2) for e, n in calls.most_common()},
            "engine_sql_per_run": {k: round(n / per, 1) for k, n in sql.items()},
        }


def engine_calls(stack: Stack) -> list[str]:
    assert stack.engine_calls is not None, "the engine was started without its access log"
    return stack.engine_calls.read_text().splitlines() if stack.engine_calls.exists() else []


def endpoint(line: str) -> str:
    """``POST /engine-rest/external-task/<id>/complete 204`` becomes
    ``POST /external-task/{id}/complete``."""
    method, path, *_ = line.split()
    return f"{method} {_ID.sub('/{id}', path.removeprefix('/engine-rest'))}"


def _engine_database(stack: Stack, *, reset: bool) -> dict[str, int]:
    """The statements the engine's database ran since the last reset, by kind, and the rows
    they wrote, by kind and by table.

    All from ``pg_stat_statements``, which counts as each statement ends; the per-table
    counters of ``pg_stat_database`` lag by up to ten seconds (a backend flushes them when it
    has been idle that long), which shifted rows from one side's window into the next.
    """
    with psycopg.connect(stack.engine_database_url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        if reset:
            conn.execute("SELECT pg_stat_statements_reset()")
        statements = conn.execute(
            "SELECT query, calls, rows FROM pg_stat_statements WHERE dbid ="
            " (SELECT oid FROM pg_database WHERE datname = current_database())"
        ).fetchall()
    by_kind: Counter[str] = Counter()
    written: Counter[str] = Counter()
    for query, calls, rows in statements:
        kind = query.lstrip().split(" ", 1)[0].lower()
        if kind not in _STATEMENTS:
            continue
        by_kind[f"{kind}s"] += calls
        if target := _WRITE.match(query):
            written[f"rows {_WRITTEN[kind]}"] += rows
            written[f"rows written {target[1].lower()}"] += rows
    return {"statements": sum(by_kind.values()), **by_kind, **written}


#: The table a write names: ``insert into ACT_HI_VARINST``, ``update ACT_RU_EXECUTION``,
#: ``delete from ACT_RU_VARIABLE``.
_WRITE = re.compile(r"\s*(?:insert\s+into|update|delete\s+from)\s+(\w+)", re.IGNORECASE)
_WRITTEN = {"insert": "inserted", "update": "updated", "delete": "deleted"}
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


async def _until_zero(read: Callable[[], float], timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not await asyncio.to_thread(read):
            return
        await asyncio.sleep(0.2)


# --- the benchmark -------------------------------------------------------------------------


async def run(run_: Run, stack: Stack, profile: Profile) -> dict[str, Any]:
    if why := reference.node_missing() or ours.available("flowgate.services.api"):
        return {"skipped": why}
    observed = {
        "engine": stack.extra["engine"].pid,
        "postgres (engine)": stack.extra["engine-postgres"].pid,
        "postgres (gateway)": stack.postgres.pid,
        "redis": stack.redis.pid,
    }
    await _warm_engine(run_, stack, profile)
    watcher_empty = await history.watcher_reads(stack.engine_url, reads=profile.cost_reads)
    rounds = await _rounds(run_, stack, profile, observed, lambda: Stores(), WITH_TWO_WORKERS)
    memory = await measure_memory(run_, stack, profile)

    print(f"  growing the engine's history to {profile.cost_history_runs} finished runs")
    t0 = time.perf_counter()
    finished = await asyncio.to_thread(
        history.grow_engine_history, stack.engine_database_url, profile.cost_history_runs
    )
    grown = Stores(
        flowgate_database=ours.new_schema(stack, "grown"),
        reference_database=ours.new_schema(stack, "grown_reference"),
        grown_to=profile.cost_history_runs,
    )
    grown_rounds = await _rounds(run_, stack, profile, observed, lambda: grown, SIDES)
    watcher_grown = await history.watcher_reads(stack.engine_url, reads=profile.cost_reads)
    empty_ratios, grown_ratios = ratios(rounds), ratios(grown_rounds)
    return {
        "method": __doc__,
        "rounds": rounds,
        "ratios": empty_ratios,
        "memory": memory,
        "history": {
            "finished_runs": finished,
            "grown_in_s": round(time.perf_counter() - t0, 1),
            "rounds": grown_rounds,
            "ratios": grown_ratios,
            **changes(empty_ratios, grown_ratios),
            "watcher_pass_ms": {"empty": watcher_empty, "grown": watcher_grown},
        },
    }


async def _rounds(
    run_: Run,
    stack: Stack,
    profile: Profile,
    observed: Mapping[str, int],
    stores: Callable[[], Stores],
    sides: Mapping[str, Callable[[Run, Stack, Stores], Side]],
) -> dict[str, list[dict[str, Any]]]:
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    for _ in range(profile.rounds):
        for name, start in sides.items():  # A B A B
            measured = await measure_side(run_, stack, profile, name, start, observed, stores())
            rounds[name].append(measured)
    return rounds


async def _warm_engine(run_: Run, stack: Stack, profile: Profile) -> None:
    """Runs through the engine before the first round, by each side in turn, so that no
    side meets a cold JIT: the two call the engine differently (flowgate's fetches sort by
    priority and creation and name their variables), and a path only one side takes is
    compiled in that side's first round otherwise. Several turns each (the profile's): after
    one, flowgate's first round still found the engine spending 1.6x the CPU per run of its
    second (15.3 against 9.6 ms; the reference's rounds 9.4 and 9.3): the JIT at work."""
    for name in [*SIDES] * profile.cost_engine_warm_turns:
        with run_.scope():
            side = SIDES[name](run_, stack, Stores())
            pool = Pool("127.0.0.1", side.port, COST_CONCURRENCY)
            try:
                await _batch(pool, f"engine-warm-{uuid.uuid4().hex[:6]}",
                             3 * profile.cost_warmup, COST_CONCURRENCY)  # fmt: skip
            finally:
                await pool.close()


async def measure_memory(run_: Run, stack: Stack, profile: Profile) -> dict[str, Any]:
    """Redis memory per retained finished run: flowgate's Redis before and after a batch,
    once every run has ended, its write-behind has reached Postgres and its steps have
    left Redis (STEPS_IN_REDIS_S=1 here, so that it happens within the measurement). The
    engine's event stream (bounded by the plugin's max length, whatever the retention) is
    counted apart."""
    runs = profile.cost_runs[COST_CONCURRENCY]
    redis = connect(stack.redis_url, cluster=stack.redis_cluster)
    stores = Stores()
    partitions = Keys(stores.flowgate_prefix).partitions
    compacting = [key for p in partitions for key in (p.compact, p.instances_ended)]

    async def until_retained() -> None:
        """Until the side's runs are as Redis retains them: written behind, compacted, their
        engine instances no longer watched."""
        await side.settled()
        for _ in range(900):  # at most three minutes
            if not sum([await redis.zcard(key) for key in compacting]):
                return
            await asyncio.sleep(0.2)

    with run_.scope():
        side = start_flowgate(run_, stack, stores, env={"STEPS_IN_REDIS_S": "1"})
        pool = Pool("127.0.0.1", side.port, COST_CONCURRENCY)
        try:
            await _batch(pool, f"mem-warm-{uuid.uuid4().hex[:6]}", profile.cost_warmup,
                         COST_CONCURRENCY)  # fmt: skip
            await until_retained()
            before = await _redis_memory(redis, stores.flowgate_prefix)
            latencies, failed = await _batch(pool, f"mem-{uuid.uuid4().hex[:6]}", runs,
                                             COST_CONCURRENCY)  # fmt: skip
            await until_retained()
            after = await _redis_memory(redis, stores.flowgate_prefix)
        finally:
            await pool.close()
            await redis.aclose()
    per = max(len(latencies), 1)
    grew = {name: after[name] - before[name] for name in after}
    return {
        "runs": len(latencies),
        "failed": failed,
        "bytes_per_run": round((grew["used_memory"] - grew["engine_events"]) / per),
        "keys_per_run": round(grew["keys"] / per, 2),
        "key_bytes_per_run": round(grew["key_bytes"] / per),
        "keyspace_tables_bytes_per_run": round(grew["keyspace_tables"] / per),
        "engine_events_bytes_per_run": round(grew["engine_events"] / per),
    }


async def _redis_memory(redis: RedisClient, prefix: str) -> dict[str, int]:
    """Redis's memory; the engine's event stream's; the keys under ``prefix``, how many and
    what they take themselves; and Redis's keyspace tables (which double as keys are added:
    a step that lands on whichever batch crosses a power of two)."""
    info = await redis.info("memory")
    # Every entry counted (SAMPLES 0): the stream is at its length cap by now, trimmed as it
    # grows, and the default five-entry estimate moved kilobytes per run between it and the
    # runs' own figure.
    events = await redis.memory_usage(ENGINE_EVENTS, samples=0) or 0
    keys = [key async for key in redis.scan_iter(match=f"{{{prefix}:*", count=1000)]
    async with redis.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.memory_usage(key, samples=0)
        key_bytes = sum(used or 0 for used in await pipe.execute())
    tables = 0
    for name, db in (await redis.memory_stats()).items():
        if str(name).startswith("db.") and isinstance(db, dict):
            tables += sum(int(db.get(table, 0)) for table in _KEYSPACE_TABLES)
    return {"used_memory": int(info["used_memory"]), "keys": len(keys),
            "key_bytes": int(key_bytes), "keyspace_tables": tables,
            "engine_events": int(events)}  # fmt: skip


#: MEMORY STATS's per-database figures for the keyspace's own hash tables.
_KEYSPACE_TABLES = ("overhead.hashtable.main", "overhead.hashtable.expires")


#: What the reference's figures are set beside: the processes on the engine's side, and
#: each gateway's own (its database included).
ENGINE_SIDE = ("engine", "postgres (engine)")
OWN = {
    "flowgate": ("api", "flusher", "worker", "redis", "postgres (gateway)"),
    TWO_WORKERS: ("api", "flusher", "worker", "worker 2", "redis", "postgres (gateway)"),
    "reference": ("gateway", "postgres (gateway)"),
}


def changes(empty: Mapping[str, Any], grown: Mapping[str, Any]) -> dict[str, Any]:
    """Each figure of each side with work already done beside an empty history, as a
    relative change; ``worst_change``: flowgate's largest, either way."""
    found: dict[str, dict[str, float]] = {}
    for figure, sides in grown.items():
        for name in SIDES:
            was, now = (empty.get(figure) or {}).get(name), sides.get(name)
            if was and now is not None:
                found.setdefault(figure, {})[name] = round(now / was - 1, 3)
    ours_ = [by_side["flowgate"] for by_side in found.values() if "flowgate" in by_side]
    return {"changes": found, "worst_change": max(ours_, key=abs) if ours_ else None}


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
