"""11. A Redis Cluster beside a single Redis: start-and-wake, wake latency, message load.

A native Redis Cluster (three masters with a replica each) runs beside the run's single
Redis; the same API code runs on both (``REDIS_CLUSTER``). Per round, single then cluster
(A B A B), each side with a fresh prefix:

* start-and-wake per API process: wrk against one API (CPU 0) with the stand-in engine in
  ``instant`` mode, as in item 4;
* wake latency with ``cluster_parked`` requests parked on one API, as in item 2: each probe
  is completed with ``RunStore.finish`` (its publish is an ``SPUBLISH`` on the cluster),
  timed from the call's return to the probe's response;
* message load per replica: 1, 2 and 3 API replicas on one prefix, ``cluster_messages`` runs
  claimed and finished from this process; each replica's
  ``flowgate_api_pubsub_messages_total`` grows by how many run-channel messages it received,
  reported per run finished. Every replica receives each run's end once on either Redis, so
  the figure stays at 1 as replicas are added (what grows is what Redis sends in total).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from typing import Any

from bench import ours, parked, wrk
from bench.harness import LOAD_CPU, SERVER_CPU, CpuMeter, Run, Stack, summary
from bench.profile import Profile
from flowgate.shared.contract import SystemVariables
from flowgate.shared.keys import Keys
from flowgate.shared.redis_client import connect, read_topology
from flowgate.shared.state import Status
from flowgate.shared.store.runs import RunStore

MESSAGES = "flowgate_api_pubsub_messages_total"
REPLICAS = (1, 2, 3)


async def run(run_: Run, stack: Stack, profile: Profile) -> dict[str, Any]:
    if why := wrk.available() or ours.available("flowgate.services.api"):
        return {"skipped": why}
    url, nodes = run_.start_redis_cluster()
    sides = {
        "single": stack,
        "cluster": dataclasses.replace(stack, redis_url=url, redis_cluster=True, redis=nodes[0]),
    }
    rounds: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for _ in range(profile.rounds):
        for side, on in sides.items():
            with run_.scope():
                measured: dict[str, Any] = {
                    "start_and_wake": _start_and_wake(run_, on, profile),
                    "wake": await _wake(run_, on, profile),
                    "messages_per_run": await _message_load(run_, on, profile),
                }
            rounds[side].append(measured)
            print(
                f"  {side}: start-and-wake {measured['start_and_wake']['rps']:.0f}/s,"
                f" wake p50 {measured['wake']['wake_ms'].get('median')} ms,"
                f" messages per run per replica {measured['messages_per_run']}"
            )
    return {"method": __doc__, "masters": len(nodes) // 2, "rounds": rounds}


def _start_and_wake(run_: Run, stack: Stack, profile: Profile) -> dict[str, Any]:
    prefix = f"bc{uuid.uuid4().hex[:6]}"
    stub = ours.start_stub(run_, stack, prefix=prefix, mode="instant", cpu=LOAD_CPU)
    api = ours.start_api(
        run_, stack, engine_url=stub.url, prefix=prefix,
        database_url=ours.new_schema(stack, "cluster"), cpu=SERVER_CPU,
    )  # fmt: skip
    conns = profile.wrk_connections
    wrk.run("start", api.url, seconds=1, connections=conns, args=("warm", "30"))
    with CpuMeter({"api": api.pid, "redis (first node)": stack.redis.pid}) as meter:
        result = wrk.run(
            "start", api.url, seconds=profile.wrk_seconds, connections=conns, args=("m", "30")
        )
    return {"rps": result.rps, "latency_ms": result.latency_ms, "ok": result.ok(),
            "cpu_cores": meter.share()}  # fmt: skip


async def _wake(run_: Run, stack: Stack, profile: Profile) -> dict[str, Any]:
    prefix = f"bw{uuid.uuid4().hex[:6]}"
    stub = ours.start_stub(run_, stack, prefix=prefix, mode="park", cpu=LOAD_CPU)
    api = ours.start_api(
        run_, stack, engine_url=stub.url, prefix=prefix,
        database_url=ours.new_schema(stack, "cluster"), cpu=SERVER_CPU,
    )  # fmt: skip
    redis = connect(stack.redis_url, cluster=stack.redis_cluster)
    parker = parked.Parker(api, redis, Keys(prefix))
    try:
        background = profile.cluster_parked - 1
        await parker.park_many([f"bg-{uuid.uuid4().hex[:16]}" for _ in range(background)])
        await parker.until_parked(background)
        wakes, wrong = [], 0
        for _ in range(profile.wake_probes):
            wake_ms, _, _, correct = await parked.probe(parker, background)
            wakes.append(wake_ms)
            wrong += not correct
    finally:
        await parker.close()
        await redis.aclose()
    return {"parked": background + 1, "wake_ms": summary(wakes), "wrong": wrong}


async def _message_load(run_: Run, stack: Stack, profile: Profile) -> dict[int, float]:
    """Messages each replica received per run finished, by the number of replicas."""
    per_run: dict[int, float] = {}
    for count in REPLICAS:
        prefix = f"bm{uuid.uuid4().hex[:6]}"
        database_url = ours.new_schema(stack, "cluster")
        with run_.scope():
            apis = [
                ours.start_api(run_, stack, engine_url="http://127.0.0.1:9/engine-rest",
                               prefix=prefix, database_url=database_url, cpu=None)
                for _ in range(count)
            ]  # fmt: skip
            before = [ours.metrics(api).get(MESSAGES, 0.0) for api in apis]
            await _finish_runs(stack, prefix, profile.cluster_messages)
            expected = [b + profile.cluster_messages for b in before]
            deadline = time.monotonic() + 30
            while (now := [ours.metrics(api).get(MESSAGES, 0.0) for api in apis]) != expected:
                if time.monotonic() > deadline:
                    break  # reported as it is: fewer means messages were lost
                await asyncio.sleep(0.1)
            received = [n - b for n, b in zip(now, before, strict=True)]
            per_run[count] = round(sum(received) / count / profile.cluster_messages, 3)
    return per_run


async def _finish_runs(stack: Stack, prefix: str, count: int) -> None:
    redis = connect(stack.redis_url, cluster=stack.redis_cluster, max_connections=64)
    store = RunStore(redis, Keys(prefix), result_ttl_s=600, pending_ttl_s=600)
    gate = asyncio.Semaphore(32)

    async def one(n: int) -> None:
        async with gate:
            ids = SystemVariables.new(f"m-{n}-{uuid.uuid4().hex[:8]}")
            await store.claim(ids, "benchmark", "h")
            await store.finish(ids.correlation_id, Status.OK, data={"n": n})

    try:
        await read_topology(redis)
        await asyncio.gather(*(one(n) for n in range(count)))
    finally:
        await redis.aclose()
