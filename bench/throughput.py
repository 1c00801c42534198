"""4. Start-and-wake throughput and status reads per API process (stand-in engine).

One API process pinned to CPU 0, against the stand-in engine (bench/stubengine.py, mode
``instant``: its start call returns an instance id and completes the state at once through
``RunStore.complete``), so what is measured is the API's HTTP handling, the state path
(claim, attach, complete) and the wait room, not Camunda. wrk (one thread, 64 connections)
on CPU 1 with the stand-in; Redis and PostgreSQL float. Per round (A B C A B C):
start-and-wake; status reads of the states that run created; GET /healthz, the HTTP stack's
own ceiling on this core. (Under load the instant completion lands before the request looks,
so these starts end "settled"; the pub/sub wake path is measured by bench/parked.py.)
The API runs as ``make up`` runs it, its write-behind in a flowgate-flusher process of its
own (floating); a second API with the flusher inside (WRITEBEHIND_IN_API=true, the
setting's default) takes start-and-wake in the same rounds, for the difference. A third
API traces every request (OpenTelemetry, OTEL_TRACES_SAMPLER=always_on, exporting over
OTLP/HTTP to a sink that keeps nothing, bench/otlpsink.py): tracing's cost beside the first,
whose tracing is off (no OTEL_* exporter: the SDK is not imported). A fourth API, a second
replica of the first, runs where ``opentelemetry`` cannot be imported at all (the extra not
installed): off against not installed is what tracing costs a deployment that does not use it.
The CPU share of every process during each run shows who was the limit (1.0 = a saturated
core); a rate per API core is the rate over the API's share (:func:`per_api_core`), the
bar's measure.
"""

from __future__ import annotations

import sys
import uuid
from typing import Any

from bench import ours, profiling, wrk
from bench.harness import LOAD_CPU, SERVER_CPU, CpuMeter, Run, Stack, summary
from bench.profile import Profile
from deploy.local import servers

WAIT_S = "30"
#: The API where the ``opentelemetry`` package cannot be imported (as if not installed).
WITHOUT_SDK = (
    "import runpy, sys; sys.modules['opentelemetry'] = None; "
    "runpy.run_module('flowgate.services.api', run_name='__main__', alter_sys=True)"
)


async def run(run_: Run, stack: Stack, profile: Profile) -> dict[str, Any]:
    if why := wrk.available() or ours.available("flowgate.services.api"):
        return {"skipped": why}
    prefix, inline_prefix = f"bt{uuid.uuid4().hex[:6]}", f"bi{uuid.uuid4().hex[:6]}"
    stub = ours.start_stub(run_, stack, prefix=prefix, mode="instant", cpu=LOAD_CPU)
    database_url = ours.new_schema(stack, "throughput")
    api = ours.start_api(
        run_, stack, engine_url=stub.url, prefix=prefix, database_url=database_url,
        cpu=SERVER_CPU, extra_env={"WRITEBEHIND_IN_API": "false"},
    )  # fmt: skip
    flusher = ours.start_flusher(run_, stack, prefix=prefix, database_url=database_url)
    bare = ours.start_api(
        run_, stack, engine_url=stub.url, prefix=prefix, database_url=database_url,
        cpu=SERVER_CPU, extra_env={"WRITEBEHIND_IN_API": "false"},
        argv=lambda port: [sys.executable, "-c", WITHOUT_SDK],
    )  # fmt: skip
    traced_prefix = f"bx{uuid.uuid4().hex[:6]}"
    sink_port = servers.free_port()
    run_.python(
        "otlp-sink", "bench.otlpsink", str(sink_port),
        ready=lambda: servers.port_open(sink_port),
    )  # fmt: skip
    traced_stub = ours.start_stub(run_, stack, prefix=traced_prefix, mode="instant", cpu=LOAD_CPU)
    traced = ours.start_api(
        run_, stack, engine_url=traced_stub.url, prefix=traced_prefix,
        database_url=database_url, cpu=SERVER_CPU,
        extra_env={
            "WRITEBEHIND_IN_API": "false",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
            "OTEL_TRACES_SAMPLER": "always_on",
            "OTEL_SERVICE_NAME": "flowgate-bench",
        },
    )  # fmt: skip
    traced_flusher = ours.start_flusher(
        run_, stack, prefix=traced_prefix, database_url=database_url
    )
    inline_stub = ours.start_stub(run_, stack, prefix=inline_prefix, mode="instant", cpu=LOAD_CPU)
    inline = ours.start_api(
        run_, stack, engine_url=inline_stub.url, prefix=inline_prefix,
        database_url=ours.new_schema(stack, "throughput_inline"), cpu=SERVER_CPU,
        extra_env={"WRITEBEHIND_IN_API": "true"},
    )  # fmt: skip
    pids = {
        "api": api.pid,
        "flusher": flusher.pid,
        "stand-in engine": stub.pid,
        "redis": stack.redis.pid,
        "postgres": stack.postgres.pid,
    }
    bare_pids = {**pids, "api (no SDK)": bare.pid}
    del bare_pids["api"]
    traced_pids = {
        "api (tracing on)": traced.pid,
        "flusher": traced_flusher.pid,
        "stand-in engine": traced_stub.pid,
        "redis": stack.redis.pid,
        "postgres": stack.postgres.pid,
    }
    inline_pids = {
        "api (flusher inside)": inline.pid,
        "stand-in engine": inline_stub.pid,
        "redis": stack.redis.pid,
        "postgres": stack.postgres.pid,
    }
    conns, seconds = profile.wrk_connections, profile.wrk_seconds
    # Warm-up: imports, connection pools, the first Postgres batches.
    for warming in (api, inline, traced, bare):
        wrk.run("start", warming.url, seconds=min(2, seconds), connections=conns,
                args=("warm", WAIT_S))  # fmt: skip
    runs: dict[str, list[dict[str, Any]]] = {
        "start": [], "start_inline": [], "start_traced": [], "start_bare": [], "status": [],
        "plain": [],
    }  # fmt: skip
    waits_before = ours.waits(api)
    for round_no in range(profile.rounds):
        tag = f"r{round_no}{uuid.uuid4().hex[:6]}"
        with CpuMeter(pids) as meter:
            started = wrk.run(
                "start", api.url, seconds=seconds, connections=conns, args=(tag, WAIT_S)
            )
        runs["start"].append({**started.to_dict(), "cpu_cores": meter.share(), "ok": started.ok()})
        print(f"  start-and-wake: {started.rps:.0f}/s, p99 {started.latency_ms['p99']} ms")
        with CpuMeter(inline_pids) as meter:
            in_api = wrk.run(
                "start", inline.url, seconds=seconds, connections=conns, args=(tag, WAIT_S)
            )
        runs["start_inline"].append(
            {**in_api.to_dict(), "cpu_cores": meter.share(), "ok": in_api.ok()}
        )
        print(f"  start-and-wake, flusher in the API: {in_api.rps:.0f}/s")
        with CpuMeter(traced_pids) as meter:
            on = wrk.run(
                "start", traced.url, seconds=seconds, connections=conns, args=(tag, WAIT_S)
            )
        runs["start_traced"].append({**on.to_dict(), "cpu_cores": meter.share(), "ok": on.ok()})
        print(f"  start-and-wake, every request traced: {on.rps:.0f}/s")
        with CpuMeter(bare_pids) as meter:
            without = wrk.run(
                "start", bare.url, seconds=seconds, connections=conns, args=(f"n{tag}", WAIT_S)
            )
        runs["start_bare"].append(
            {**without.to_dict(), "cpu_cores": meter.share(), "ok": without.ok()}
        )
        print(f"  start-and-wake, opentelemetry not installed: {without.rps:.0f}/s")
        # The last `conns` ids may have been in flight when wrk stopped: leave them out.
        ids = str(max(1, min(started.ok() - conns, 50_000)))
        with CpuMeter(pids) as meter:
            status = wrk.run("status", api.url, seconds=seconds, connections=conns, args=(tag, ids))
        runs["status"].append({**status.to_dict(), "cpu_cores": meter.share(), "ok": status.ok()})
        print(f"  status reads: {status.rps:.0f}/s, p99 {status.latency_ms['p99']} ms")
        with CpuMeter(pids) as meter:
            plain = wrk.run("plain", api.url, seconds=seconds, connections=conns)
        runs["plain"].append({**plain.to_dict(), "cpu_cores": meter.share(), "ok": plain.ok()})
        print(f"  healthz: {plain.rps:.0f}/s")
    waits_after = ours.waits(api)
    result: dict[str, Any] = {
        "method": __doc__,
        "engine": "stand-in (bench/stubengine.py), not Camunda",
        "connections": conns,
        "seconds_per_run": seconds,
        "waits": {k: waits_after.get(k, 0) - waits_before.get(k, 0) for k in waits_after},
    }
    for kind, label in (
        ("start", "start_and_wake"),
        ("start_inline", "start_and_wake_flusher_inside"),
        ("start_traced", "start_and_wake_traced"),
        ("start_bare", "start_and_wake_without_sdk"),
        ("status", "status_reads"),
        ("plain", "healthz"),
    ):
        result[label] = {
            "requests_per_s": summary([r["requests_per_s"] for r in runs[kind]], 1),
            "requests_per_api_core_s": summary([per_api_core(r) for r in runs[kind]], 1),
            "latency_p50_ms": summary([r["latency_ms"]["p50"] for r in runs[kind]]),
            "latency_p99_ms": summary([r["latency_ms"]["p99"] for r in runs[kind]]),
            "non_200": sum(r["requests"] - r["ok"] for r in runs[kind]),
            "runs": runs[kind],
        }
    off_rps = result["start_and_wake"]["requests_per_s"].get("median")
    on_rps = result["start_and_wake_traced"]["requests_per_s"].get("median")
    bare_rps = result["start_and_wake_without_sdk"]["requests_per_s"].get("median")
    result["tracing_cost"] = {
        "off_rps": off_rps,
        "not_installed_rps": bare_rps,
        "on_100pct_rps": on_rps,
        "on_vs_off": round(on_rps / off_rps, 3) if off_rps and on_rps else None,
        # Target: off costs at most 2 % (>= 0.98).
        "off_vs_not_installed": round(off_rps / bare_rps, 3) if off_rps and bare_rps else None,
    }
    if profile.profile_api and profiling.available() is None:
        result["profile"] = {
            "start_and_wake": _profile(api, "start", conns, seconds, ("prof", WAIT_S)),
            "status_reads": _profile(api, "status", conns, seconds, (tag, ids)),
        }
    return result


def per_api_core(run: dict[str, Any]) -> float:
    """Requests per second of one CPU core of the API's: its rate over the share of its core
    it used. The API's core is saturated serving /healthz and status reads, but not always
    starts: their load side (wrk, the stand-in, Redis, the flusher) shares the other core,
    and when that core is the limit the API waits for it."""
    share = float(next(v for k, v in run["cpu_cores"].items() if k.startswith("api")))
    return float(run["requests_per_s"]) / max(share, 0.01)


def _profile(
    api: ours.Api, kind: str, conns: int, seconds: int, args: tuple[str, ...]
) -> dict[str, Any]:
    """Sample the API with py-spy during one more run of ``kind``."""
    spy, out = profiling.start(api.pid, seconds - 2)
    load = wrk.run(kind, api.url, seconds=seconds, connections=conns, args=args)
    found = profiling.finish(spy, out)
    found["during"] = f"{kind}, {load.rps:.0f} req/s"
    return found
