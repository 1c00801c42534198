"""12. The HTTP server: uvicorn (httptools, uvloop: what ``python -m flowgate.services.api`` runs)
beside granian (its HTTP in Rust, uvloop), serving the same app (stand-in engine).

Each server runs one API process pinned to CPU 0 (granian: its worker; the supervisor
only watches it) with its own stand-in engine in ``instant`` mode and its own Redis prefix;
wrk (CPU 1) drives start-and-wake, status reads of the runs that start made, and
``/healthz``, the servers taking turns, A B A B. RSS is every process of the server after
the last round. The rule from the performance issue: the faster becomes the default only
at 1.3x or more on starts and status reads, without using more memory.
"""

from __future__ import annotations

import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

from bench import ours, wrk
from bench.harness import LOAD_CPU, SERVER_CPU, CpuMeter, Run, Stack, rss_kb, summary
from bench.profile import Profile

WAIT_S = "30"
SERVERS = ("uvicorn", "granian")


def _granian(port: int) -> list[str]:
    granian = shutil.which("granian", path=str(Path(sys.executable).parent))
    assert granian, "granian is not installed (dependency group bench)"
    return [
        granian, "--interface", "asgi", "--loop", "uvloop", "--workers", "1",
        "--runtime-mode", "st", "--host", "127.0.0.1", "--port", str(port),
        "--no-access-log", "--factory", "flowgate.services.api.app:from_environment",
    ]  # fmt: skip


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(child) for child in text.split()]


async def run(run_: Run, stack: Stack, profile: Profile) -> dict[str, Any]:
    if why := wrk.available():
        return {"skipped": why}
    apis: dict[str, tuple[str, list[int]]] = {}
    for server in SERVERS:
        prefix = f"h{server[0]}{uuid.uuid4().hex[:6]}"
        stub = ours.start_stub(run_, stack, prefix=prefix, mode="instant", cpu=LOAD_CPU)
        api = ours.start_api(
            run_, stack, engine_url=stub.url, prefix=prefix,
            database_url=ours.new_schema(stack, f"http_{server}"), cpu=SERVER_CPU,
            argv=_granian if server == "granian" else None,
        )  # fmt: skip
        apis[server] = (api.url, [api.pid, *_children(api.pid)])
    conns, seconds = profile.wrk_connections, profile.wrk_seconds
    for url, _ in apis.values():  # imports, pools, the first Postgres batches
        wrk.run("start", url, seconds=min(2, seconds), connections=conns, args=("warm", WAIT_S))
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        server: {"start": [], "status": [], "plain": []} for server in SERVERS
    }
    for round_no in range(profile.rounds):
        order = SERVERS if round_no % 2 == 0 else tuple(reversed(SERVERS))
        for server in order:
            url, pids = apis[server]
            tag = f"r{round_no}{uuid.uuid4().hex[:6]}"
            serving = {server: pids[-1]}  # uvicorn's one process, granian's worker
            with CpuMeter(serving) as meter:
                started = wrk.run(
                    "start", url, seconds=seconds, connections=conns, args=(tag, WAIT_S)
                )
            runs[server]["start"].append({**started.to_dict(), "cpu_cores": meter.share()})
            ids = str(max(1, min(started.ok() - conns, 50_000)))
            status = wrk.run("status", url, seconds=seconds, connections=conns, args=(tag, ids))
            runs[server]["status"].append(status.to_dict())
            plain = wrk.run("plain", url, seconds=seconds, connections=conns)
            runs[server]["plain"].append(plain.to_dict())
            print(
                f"  {server}: start {started.rps:.0f}/s, status {status.rps:.0f}/s, "
                f"healthz {plain.rps:.0f}/s"
            )
    result: dict[str, Any] = {"method": __doc__, "servers": {}}
    for server in SERVERS:
        _, pids = apis[server]
        result["servers"][server] = {
            "processes": len(pids),
            "rss_kib": sum(rss_kb(pid) for pid in pids),
            **{
                kind: {
                    "requests_per_s": summary([r["requests_per_s"] for r in runs[server][kind]], 1),
                    "runs": runs[server][kind],
                }
                for kind in ("start", "status", "plain")
            },
        }
    return result
