"""How much each benchmark does: the full run (``make bench``) and the smoke run (CI).

The smoke run exercises every code path with tiny counts so the suite cannot rot; its
figures mean nothing. Every load loop is bounded by these counts and durations.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    name: str
    #: Each comparison runs A B A B ...: this many rounds of each side.
    rounds: int
    # 1. gateway overhead: requests per round, by concurrency
    gateway_requests: dict[int, int]
    gateway_warmup: int
    # 2./3. parked requests: levels (the last is the capacity test), wake probes per level
    parked_levels: tuple[int, ...]
    wake_probes: int
    # 4. throughput: wrk duration per measurement, connections
    wrk_seconds: int
    wrk_connections: int
    # 6. write-behind: how long the load runs while Postgres is down
    outage_seconds: float
    # 5. workers: instances to drain per client run, and the longest a client may take
    worker_instances: int
    worker_deadline_s: float
    # 7. end detection: probes per round, clients ending other runs meanwhile (busy side)
    ends_probes: int
    ends_background: int
    # 8. live progress and callbacks: probes per round, other streams open (B side)
    progress_probes: int
    progress_streams: int
    # 9. engine HTTP clients: calls per client per round, in flight at once
    client_calls: int
    client_concurrency: int
    # 10. cost per run beside the reference gateway: onboard-user runs by concurrency (16 is
    # the cost window), after a warm-up
    cost_runs: dict[int, int]
    cost_warmup: int
    # ... and the engine warmed before the first round by each side in turn, this often
    cost_engine_warm_turns: int
    # ... again with this many finished runs in the engine's history and each gateway's
    # store; the watcher's history read timed this often at each size
    cost_history_runs: int
    cost_reads: int
    # 11. Redis Cluster: requests parked while probing wake latency, runs finished to count
    # each replica's messages
    cluster_parked: int
    cluster_messages: int
    # 14. talking to a running process: probes per round, other runs waiting at a user task
    conversation_probes: int
    conversation_background: int
    # pyinstrument/py-spy profiles of the API under load (full run only)
    profile_api: bool


FULL = Profile(
    name="full",
    rounds=2,
    gateway_requests={1: 100, 16: 400, 64: 800},
    gateway_warmup=128,
    parked_levels=(1, 1_000, 10_000),
    wake_probes=100,
    wrk_seconds=10,
    wrk_connections=64,
    outage_seconds=5.0,
    worker_instances=1_000,
    worker_deadline_s=12.0,
    ends_probes=100,
    ends_background=4,
    progress_probes=100,
    progress_streams=1_000,
    client_calls=5_000,
    client_concurrency=16,
    cost_runs={1: 100, 16: 800, 64: 800},
    cost_warmup=160,
    cost_engine_warm_turns=3,
    cost_history_runs=100_000,
    cost_reads=50,
    cluster_parked=1_000,
    cluster_messages=2_000,
    conversation_probes=20,
    conversation_background=1_000,
    profile_api=True,
)

SMOKE = Profile(
    name="smoke",
    rounds=1,
    gateway_requests={1: 3, 16: 16, 64: 64},
    gateway_warmup=8,
    parked_levels=(1, 50, 200),
    wake_probes=5,
    wrk_seconds=1,
    wrk_connections=16,
    outage_seconds=0.5,
    worker_instances=20,
    worker_deadline_s=3.0,
    ends_probes=4,
    ends_background=1,
    progress_probes=4,
    progress_streams=20,
    client_calls=50,
    client_concurrency=4,
    cost_runs={1: 3, 16: 16, 64: 64},
    cost_warmup=16,
    cost_engine_warm_turns=1,
    cost_history_runs=300,
    cost_reads=3,
    cluster_parked=50,
    cluster_messages=50,
    conversation_probes=2,
    conversation_background=20,
    profile_api=False,
)
