"""12. Fair limits: one tenant's burst against another tenant's starts (stand-in engine).

One API process (pinned to CPU 0) with two tenants' keys and ``TENANT_STARTS_PER_S``
(``LIMIT``); the stand-in engine completes every start at once, so what is measured is the
API. Tenant B starts at a steady ``B_RATE`` per second (below the limit), each start timed
from its request to its answer. Per round, A B: B alone ("solo"), then B while tenant A sends
ten times its limit ("burst"; B measured from a second after A began to a second before it
ends, so A's client starting up is not counted). Every answer A gets is counted: 202 within
its limit, 429 beyond it, and every 429 must carry ``Retry-After``, ``RateLimit-Policy``
and ``RateLimit``.
The target: B's start p99 under A's burst within 1.2x of its solo p99, each over every
round's starts together (a round's 200 starts make a p99 of its third-worst). The burst's
client runs at the lowest scheduling priority: it shares the load core with B's client,
whose delays would otherwise be counted as the API's. The CPU share of
the API and Redis during each burst is kept beside it. Whose the rise is was checked ad hoc
(bench/ANALYSIS.md): the same flood sent to a bare socket server instead of the API barely
moves B's p99, so the rise is the API's refusals, bunched as A's client gets the load core.

Each round measures both ways in: straight to the replica, and through nginx as ``make up``
deploys it with ``TENANT_STARTS_PER_S`` (deploy/local/stack.py: it refuses a credential's
starts past the limit before they reach a replica; the replica's limit stays the exact
one). nginx runs on the load core. The target is the second: the system as deployed.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable
from typing import Any, TypeVar

from bench import ours
from bench.harness import LOAD_CPU, SERVER_CPU, CpuMeter, Run, Stack, pinned
from bench.profile import Profile
from bench.rawhttp import Connection
from deploy.local import servers, stack as local_stack
from deploy.local.servers import ROOT

T = TypeVar("T")
LIMIT = 50  # starts per second per tenant
B_RATE = 20
A_RATE = 10 * LIMIT
KEYS = "alpha-key@alpha:start+read,beta-key@beta:start+read"
HEADERS_429 = ("retry-after", "ratelimit-policy", "ratelimit")
#: B is measured from this long after A's burst began until this long before it ends: while
#: A floods, not while its client process starts up or opens its connections.
BURST_LEAD_S = 1.0


async def run(run_: Run, stack: Stack, profile: Profile) -> dict[str, Any]:
    prefix = f"tn{uuid.uuid4().hex[:6]}"
    stub = ours.start_stub(run_, stack, prefix=prefix, mode="instant", cpu=LOAD_CPU)
    api = ours.start_api(
        run_, stack, engine_url=stub.url, prefix=prefix,
        database_url=ours.new_schema(stack, "tenants"), cpu=SERVER_CPU,
        extra_env={"API_KEYS": KEYS, "TENANT_STARTS_PER_S": str(LIMIT)},
    )  # fmt: skip
    port = _nginx(run_, api)
    seconds = max(2, profile.wrk_seconds)
    ways = {"replica": api.port, "nginx": port}
    await _tenant(port, "beta-key", B_RATE, seconds=1)  # warm-up, both ways
    measured: dict[str, list[dict[str, Any]]] = {way: [] for way in ways}
    for number in range(profile.rounds):
        for way, to in ways.items():
            solo = await _tenant(to, "beta-key", B_RATE, seconds=seconds)
            with CpuMeter({"api": api.pid, "redis": stack.redis.pid}) as meter:
                b, a = await asyncio.gather(
                    _after(BURST_LEAD_S, _tenant(to, "beta-key", B_RATE, seconds=seconds)),
                    _burst(to, "alpha-key", A_RATE, seconds=seconds + 2 * BURST_LEAD_S),
                )
            cpu = meter.share()
            measured[way].append({"solo": solo, "burst": {"beta": b, "alpha": a}, "cpu": cpu})
            print(
                f"  round {number}, {way}: B p99 solo {solo['p99_ms']} ms, under A's burst "
                f"{b['p99_ms']} ms; A {a['codes']}; CPU {cpu}"
            )
    at_replica = _figures(measured["replica"])
    return {
        "method": __doc__,
        "limit_per_s": LIMIT,
        "b_rate_per_s": B_RATE,
        "a_rate_per_s": A_RATE,
        "seconds": seconds,
        "target_ratio": 1.2,
        **_figures(measured["nginx"]),
        "at_replica": at_replica,
    }


def _figures(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """B's p99 alone and under the burst over ``rounds``, what was refused, and the rounds
    (their own figures, not their samples)."""
    solo_p99 = _pooled([r["solo"] for r in rounds])
    burst_p99 = _pooled([r["burst"]["beta"] for r in rounds])
    for r in rounds:
        r["solo"].pop("latencies_ms")
        r["burst"]["beta"].pop("latencies_ms")
    return {
        "b_p99_solo_ms": solo_p99,
        "b_p99_burst_ms": burst_p99,
        "ratio": round(burst_p99 / solo_p99, 3) if solo_p99 and burst_p99 else None,
        "b_refused": sum(
            r["solo"]["codes"].get("429", 0) + r["burst"]["beta"]["codes"].get("429", 0)
            for r in rounds
        ),
        "a_429_without_headers": sum(r["burst"]["alpha"]["bare_429"] for r in rounds),
        "rounds": rounds,
    }


def _nginx(run_: Run, api: ours.Api) -> int:
    """nginx as ``make up`` configures it for ``LIMIT``, in front of ``api``, on the load
    core; its port."""
    port = servers.free_port()
    cfg = local_stack.Config(
        run_dir=run_.workdir / "nginx", api_port=port, engine_port=0, redis_port=0,
        postgres_port=0, replica_ports=[api.port], worker_health_ports=[],
    )  # fmt: skip
    nginx = local_stack.nginx_server(cfg, starts_per_s=LIMIT)
    nginx.argv = pinned(nginx.argv, LOAD_CPU)
    run_.start(nginx)
    return port


def _pooled(measured: list[dict[str, Any]]) -> float | None:
    """The p99 of the starts of every round together."""
    latencies = sorted(ms for m in measured for ms in m["latencies_ms"])
    return round(latencies[int(len(latencies) * 0.99)], 2) if latencies else None


async def _after(delay_s: float, work: Awaitable[T]) -> T:
    await asyncio.sleep(delay_s)
    return await work


async def _burst(port: int, key: str, rate: int, *, seconds: float) -> dict[str, Any]:
    """:func:`_tenant` in a process of its own (on the load CPU, at the lowest priority),
    so the burst's own client work does not delay the measured tenant's client."""
    argv = [sys.executable, "-m", "bench.tenants", str(port), key, str(rate), str(seconds)]
    sent = await asyncio.create_subprocess_exec(
        *pinned(["nice", "-n", "19", *argv], LOAD_CPU),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    output, _ = await sent.communicate()
    result: dict[str, Any] = json.loads(output)
    return result


async def _tenant(port: int, key: str, rate: int, *, seconds: float) -> dict[str, Any]:
    """Starts at ``rate`` per second for ``seconds`` to ``port``, each on a connection of its
    own pool; their latencies and answers."""
    latencies: list[float] = []
    codes: Counter[str] = Counter()
    bare = 0
    pool = [Connection("127.0.0.1", port) for _ in range(max(4, rate // 10))]
    free: asyncio.Queue[Connection] = asyncio.Queue()
    for conn in pool:
        free.put_nowait(conn)

    async def one() -> None:
        nonlocal bare
        conn = await free.get()
        try:
            body = {"processKey": "benchmark", "correlationId": f"t-{uuid.uuid4().hex}"}
            answer = await conn.request(
                "POST", "/api/process/start", body, {"X-API-Key": key, "Prefer": "wait=5"}
            )
        finally:
            free.put_nowait(conn)
        codes[str(answer.status)] += 1
        if answer.status == 429:
            bare += not all(name in answer.headers for name in HEADERS_429)
        else:
            latencies.append(answer.latency_ms)

    began = time.perf_counter()
    tasks = []
    for n in range(int(rate * seconds)):
        await asyncio.sleep(max(0.0, began + n / rate - time.perf_counter()))
        tasks.append(asyncio.ensure_future(one()))
    await asyncio.gather(*tasks)
    for conn in pool:
        await conn.close()
    latencies.sort()
    return {
        "codes": dict(codes),
        "bare_429": bare,
        "p50_ms": round(latencies[len(latencies) // 2], 2) if latencies else None,
        "p99_ms": round(latencies[int(len(latencies) * 0.99)], 2) if latencies else None,
        "latencies_ms": latencies,
    }


if __name__ == "__main__":
    port, key, rate, seconds = sys.argv[1:5]
    answered = asyncio.run(_tenant(int(port), key, int(rate), seconds=float(seconds)))
    answered.pop("latencies_ms")  # A's are not measured
    print(json.dumps(answered))
