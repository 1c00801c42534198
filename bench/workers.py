"""5. Worker throughput: how fast each client drains pre-created tasks of the real engine.

For every client: start N ``benchmark`` instances (no worker running), start the client,
wait until the topic has no open task (or the deadline), stop it. Tasks/s is read from the
engine's own history: (completions - 1) / (last end time - first end time) of the instances
the client finished, so a client's start-up time does not count against it (``drain_s``,
from spawn to the last completion, shows it). What a slow client leaves behind is drained
by the raw loop before the next client runs. Clients alternate in every round (A B C A B C).

Clients, all configured like the seed's workers (maxTasks 10, lock 20 s, long poll 30 s),
each process pinned to the load core (CPU 1); the engine and its PostgreSQL float:

* ours with 1 and 2 processes, and 1 process with 32 slots;
* camunda-external-task-client-python3 4.5.0 (its synchronous worker);
* camunda-external-task-client-js 3.1.0, seed config (300 ms poll interval) and interval 0;
* the raw loop (plain httpx, no framework): fetch as soon as a completion slot is free, with
  the others' 10 slots, and with 2 loops x 32 slots as the engine's ceiling.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench import ours
from bench.engine import Engine, engine_time, raw_worker_loop
from bench.harness import LOAD_CPU, Run, Stack, summary
from bench.profile import Profile
from bench.reference import NODE_DIR, node_missing

MAX_TASKS = 10


@dataclass(frozen=True)
class Client:
    name: str
    label: str
    processes: int
    missing: Callable[[], str | None]
    argv: Callable[[str, str], list[str]]  # (engine_url, worker_id) -> argv
    env: Callable[[Stack, str], dict[str, str]] | None = None  # (stack, engine_url) -> env
    polls: int = 1  # long polls each process keeps open at once


def _py(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def _py3_missing() -> str | None:
    if importlib.util.find_spec("camunda") is None:
        return "camunda-external-task-client-python3 is not installed (dependency group bench)"
    return None


def _ours_env(
    stack: Stack, engine_url: str, slots: int = MAX_TASKS, prefetch: int = MAX_TASKS
) -> dict[str, str]:
    return {
        "REDIS_URL": stack.redis_url,
        "REDIS_PREFIX": "bw",
        "DATABASE_URL": stack.database_url,
        "CAMUNDA_BASE_URL": engine_url,
        "WORKER_HEALTH_PORT": "0",
        "LOG_LEVEL": "warning",
        "CAMUNDA_MAX_TASKS": str(slots),
        "WORKER_CONCURRENCY": str(slots),
        "WORKER_PREFETCH": str(prefetch),
    }


def clients(raw_loops: tuple[tuple[int, int], ...]) -> list[Client]:
    node = ["node", str(NODE_DIR / "runner.mjs")]
    found: list[Client] = [
        Client(
            "ours-1",
            "flowgate worker, 1 process",
            1,
            lambda: ours.available("flowgate.services.worker"),
            lambda url, wid: _py("flowgate.services.worker"),
            _ours_env,
        ),
        Client(
            "ours-1-noprefetch",
            "flowgate worker, 1 process, no prefetch (WORKER_PREFETCH=0)",
            1,
            lambda: ours.available("flowgate.services.worker"),
            lambda url, wid: _py("flowgate.services.worker"),
            lambda stack, url: _ours_env(stack, url, prefetch=0),
        ),
        Client(
            "ours-2",
            "flowgate worker, 2 processes",
            2,
            lambda: ours.available("flowgate.services.worker"),
            lambda url, wid: _py("flowgate.services.worker"),
            _ours_env,
        ),
        Client(
            "ours-1-32",
            "flowgate worker, 1 process, 32 slots (WORKER_CONCURRENCY=CAMUNDA_MAX_TASKS=32)",
            1,
            lambda: ours.available("flowgate.services.worker"),
            lambda url, wid: _py("flowgate.services.worker"),
            lambda stack, url: _ours_env(stack, url, 32),
        ),
        Client(
            "python3-client",
            "camunda-external-task-client-python3 4.5.0 (sync worker)",
            1,
            _py3_missing,
            lambda url, wid: _py("bench.runners.py3client", url, wid, str(MAX_TASKS)),
        ),
        Client(
            "js-client-seed",
            "camunda-external-task-client-js 3.1.0, seed config (interval 300 ms)",
            1,
            node_missing,
            lambda url, wid: [*node, url, wid, str(MAX_TASKS)],
        ),
        Client(
            "js-client-interval0",
            "camunda-external-task-client-js 3.1.0, interval 0",
            1,
            node_missing,
            lambda url, wid: [*node, url, wid, str(MAX_TASKS), "0"],
        ),
    ]
    for loops, in_flight in raw_loops:
        found.append(
            Client(
                f"raw-{loops}x{in_flight}",
                f"raw loop (httpx, no framework): {loops} fetch loop(s), "
                f"{in_flight} completions in flight each",
                1,
                lambda: None,
                lambda url, wid, n=loops, k=in_flight: _py(  # type: ignore[misc]
                    "bench.runners.rawloop", url, str(n), str(MAX_TASKS), str(k), "600"
                ),
                polls=loops,
            )
        )
    return found


async def _drain_leftovers(engine: Engine, engine_url: str) -> None:
    """Complete whatever a client left, so the next one starts from an empty topic.

    A stopped client's tasks stay locked for the lock duration, and its long poll may still
    be pending in the engine (which hands it the next unlocked task, for nobody): unlock and
    drain until nothing is open.
    """
    until = time.monotonic() + 120
    while await engine.open_tasks() and time.monotonic() < until:
        await engine.unlock_all()
        done = await raw_worker_loop(
            engine_url, loops=4, max_tasks=50, until=min(until, time.monotonic() + 2),
            stop_when_empty=True, long_poll_ms=0, worker_id="bench-cleanup",
        )  # fmt: skip
        if not done:
            await asyncio.sleep(0.05)  # locked by a ghost a moment ago: unlock again


async def _flush_ghosts(engine: Engine, engine_url: str, polls: int) -> None:
    """Feed decoy tasks to the long polls a stopped client left pending in the engine.

    The engine answers a pending poll only when a task appears (or after its 30 s): until
    then it would lock up to maxTasks of the next client's tasks for nobody. Decoys are
    taken by those ghosts, then unlocked and completed by :func:`_drain_leftovers`.
    """
    await engine.start_many(f"decoy{uuid.uuid4().hex[:6]}", MAX_TASKS * polls)
    await asyncio.sleep(0.2)
    await _drain_leftovers(engine, engine_url)


async def run_client(
    run: Run, stack: Stack, engine: Engine, client: Client, profile: Profile
) -> dict[str, Any]:
    n = profile.worker_instances
    tag = f"wk{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    create_rate = await engine.start_many(tag, n)
    t1 = time.monotonic()
    t_spawn = time.time()
    procs = []
    try:
        for i in range(client.processes):
            env = client.env(stack, stack.engine_url) if client.env else {}
            argv = client.argv(stack.engine_url, f"bench-{client.name}-{i}-{tag}")
            procs.append(run.spawn(client.name, argv, env=env, cpu=LOAD_CPU))
        until = time.monotonic() + profile.worker_deadline_s
        remaining = n
        while time.monotonic() < until:
            remaining = await engine.open_tasks()
            if remaining == 0:
                break
            await asyncio.sleep(0.1)
        t_stop = time.time()
    finally:
        t_kill = time.monotonic()
        for proc in procs:
            run.stop(proc)
        stop_s = time.monotonic() - t_kill
    t2 = time.monotonic()
    await _flush_ghosts(engine, stack.engine_url, client.processes * client.polls)
    t3 = time.monotonic()
    ends = sorted(
        t
        for row in await engine.history(f"{tag}-%")
        if row.get("state") == "COMPLETED" and (t := engine_time(row["endTime"])) <= t_stop
    )
    done = len(ends)
    rate = (done - 1) / (ends[-1] - ends[0]) if done > 1 and ends[-1] > ends[0] else 0.0
    return {
        "client": client.name,
        "instances": n,
        "completed_by_client": done,
        "tasks_per_s": round(rate, 1),
        "drain_s": round(ends[-1] - t_spawn, 3) if done == n else None,
        "hit_deadline": remaining > 0,
        "engine_starts_per_s": round(create_rate, 1),
        "phases_s": {
            "create": round(t1 - t0, 2),
            "run": round(t_kill - t1, 2),
            "stop": round(stop_s, 2),
            "cleanup": round(t3 - t2, 2),
            "history": round(time.monotonic() - t3, 2),
        },
    }


async def run(run_: Run, stack: Stack, profile: Profile) -> dict[str, Any]:
    engine = Engine(stack.engine_url, connections=16)
    # (fetch loops, completions in flight per loop): the first has the others' 10 slots.
    raw_loops = ((1, 10), (2, 32)) if profile.name == "full" else ((1, 10),)
    roster = clients(raw_loops)
    skipped = {c.name: why for c in roster if (why := c.missing())}
    active = [c for c in roster if c.name not in skipped]
    samples: dict[str, list[dict[str, Any]]] = {c.name: [] for c in active}
    try:
        # The gateway benchmark's worker may have left a long poll behind.
        await _flush_ghosts(engine, stack.engine_url, 4)
        # One unmeasured pass first: the engine's JIT warms on its first thousand tasks,
        # which the first client measured would otherwise pay for.
        warm_up = next(c for c in clients(((1, MAX_TASKS),)) if c.name.startswith("raw-"))
        await run_client(run_, stack, engine, warm_up, profile)
        for round_no in range(profile.rounds):
            order = active if round_no % 2 == 0 else list(reversed(active))
            for client in order:
                result = await run_client(run_, stack, engine, client, profile)
                print(
                    f"  workers round {round_no + 1} {client.name}: {result['tasks_per_s']} tasks/s"
                    f" ({result['completed_by_client']}/{result['instances']})"
                )
                samples[client.name].append(result)
    finally:
        await engine.close()
    table = {}
    for client in active:
        rates = [s["tasks_per_s"] for s in samples[client.name]]
        table[client.name] = {
            "label": client.label,
            "processes": client.processes,
            "tasks_per_s": summary(rates, 1),
            "runs": samples[client.name],
        }
    return {
        "method": __doc__,
        "instances_per_run": profile.worker_instances,
        "max_tasks": MAX_TASKS,
        "clients": table,
        "clients_not_run": skipped,
        "labels": {c.name: c.label for c in roster},
    }
