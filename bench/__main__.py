"""``python -m bench``: measure flowgate on this machine and write what it measured.

    python -m bench                  the full run (``make bench``, < 15 min), writes docs/
    python -m bench --smoke          seconds-long version of every benchmark (CI)
    python -m bench --out DIR        write results.json, benchmarks.md and PNGs under DIR
    python -m bench --only a,b       just these (gateway, parked, throughput, writebehind,
                                     progress, clients, redis, cluster, http, tenants,
                                     workers, ends, cost, conversation)
    python -m bench --render         regenerate benchmarks.md and the plots from results.json

Every server and process is started here on free loopback ports and stopped on exit
(also on Ctrl-C). Results: ``<out>/bench/results.json`` (machine, versions, every figure),
``<out>/benchmarks.md`` and ``<out>/bench/*.png``; ``<out>`` defaults to docs/ (the smoke
run's to bench/results/smoke/, so it never overwrites the real figures).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import (
    asgi,
    clients,
    cluster,
    conversation,
    cost,
    ends,
    gateway,
    machine,
    parked,
    progress,
    redisclients,
    report,
    tenants,
    throughput,
    workers,
    writebehind,
)
from bench.engine import deploy
from bench.harness import LOAD_CPU, Run, Stack, pin_self, raise_fd_limit
from bench.profile import FULL, SMOKE, Profile
from deploy.local.servers import ROOT

Scenario = Callable[[Run, Stack, Profile], Awaitable[dict[str, Any]]]

#: name -> (needs the real engine, coroutine). Engine-free ones run first, before the
#: engine's JVM is even started, so it cannot disturb the micro-benchmarks.
SCENARIOS: dict[str, tuple[bool, Scenario]] = {
    "throughput": (False, throughput.run),
    "parked": (False, parked.run),
    "writebehind": (False, writebehind.run),
    "progress": (False, progress.run),
    "clients": (False, clients.run),
    "cluster": (False, cluster.run),
    "http": (False, asgi.run),
    "tenants": (False, tenants.run),
    "redis": (False, redisclients.run),
    "gateway": (True, gateway.run),
    "workers": (True, workers.run),
    "ends": (True, ends.run),
    "cost": (True, cost.run),
    "conversation": (True, conversation.run),
}


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny counts: checks, not figures")
    parser.add_argument(
        "--out",
        type=Path,
        help="where results go (default: docs/, or bench/results/smoke/ with --smoke)",
    )
    parser.add_argument("--only", default="", help=f"comma-separated subset of {list(SCENARIOS)}")
    parser.add_argument("--keep", action="store_true", help="keep the run directory (logs)")
    parser.add_argument(
        "--render",
        action="store_true",
        help="measure nothing: regenerate benchmarks.md and the plots from results.json",
    )
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()] or list(SCENARIOS)
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {list(SCENARIOS)}")
    args.only = [name for name in SCENARIOS if name in chosen]
    if args.out is None:
        args.out = ROOT / "bench" / "results" / "smoke" if args.smoke else ROOT / "docs"
    return args


def _event_loop_run(coro: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    try:
        import uvloop

        return uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    if args.render:
        written = report.rerender(args.out)
        print(f"bench: wrote {', '.join(str(p) for p in written)}")
        return 0
    profile = SMOKE if args.smoke else FULL
    fd_soft, fd_hard = raise_fd_limit()
    pin_self(LOAD_CPU)
    started = time.monotonic()
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    print(f"bench: {profile.name} run of {', '.join(args.only)}; fd limit {fd_soft}/{fd_hard}")
    with Run(keep=args.keep) as run, ThreadPoolExecutor(max_workers=1) as pool:
        meta = machine.describe(fd_limit=(fd_soft, fd_hard), profile=profile.name)
        stack = run.start_stack(engine=False)
        engine: Future[str] | None = None
        if args.smoke and any(SCENARIOS[name][0] for name in args.only):
            # Figures do not matter in a smoke run: start the JVM while the others run.
            engine = pool.submit(run.start_engine, run.workdir / "data")
        for name in args.only:
            needs_engine, scenario = SCENARIOS[name]
            t0 = time.monotonic()
            print(f"bench: {name} ...", flush=True)
            try:
                if needs_engine and not stack.engine_url:
                    engine = engine or pool.submit(run.start_engine, run.workdir / "data")
                    stack.engine_url = engine.result()
                    meta["engine"] = _event_loop_run(_deploy(stack.engine_url))
                with run.scope():
                    results[name] = _event_loop_run(scenario(run, stack, profile))
                results[name]["elapsed_s"] = round(time.monotonic() - t0, 1)
            except Exception:
                errors[name] = traceback.format_exc()
                print(f"bench: {name} FAILED\n{errors[name]}", file=sys.stderr, flush=True)
        if args.keep:
            print(f"bench: logs kept in {run.logs}")
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    meta["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    written = report.write(args.out, meta, results, errors, merge=args.only != list(SCENARIOS))
    print(f"bench: done in {meta['elapsed_s']} s; wrote {', '.join(str(p) for p in written)}")
    return 1 if errors else 0


async def _deploy(engine_url: str) -> dict[str, Any]:
    from bench.engine import Engine

    names = await deploy(engine_url)
    engine = Engine(engine_url, connections=1)
    try:
        version = await engine.call("GET", "/version")
    finally:
        await engine.close()
    return {"version": version.get("version"), "deployed": names}


if __name__ == "__main__":
    sys.exit(main())
