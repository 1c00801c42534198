"""Worker slots: distinct for live processes, taken over from a provably dead holder."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import httpx
import redis.asyncio as aioredis

from flowgate.services.worker import identity
from flowgate.services.worker.identity import claim_identity
from flowgate.shared.health import serve_health
from flowgate.shared.keys import Keys


def holder_of(pid: int, ticks: str) -> str:
    return f"{socket.gethostname()}:{pid}:abcd|{ticks}"


def test_a_holder_is_dead_only_when_provably_so() -> None:
    own = identity._start_ticks(os.getpid())
    assert own  # this suite runs on Linux
    assert not identity._holder_is_dead(holder_of(os.getpid(), own))  # that is us
    assert identity._holder_is_dead(holder_of(os.getpid(), "1"))  # our pid, earlier process
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert identity._holder_is_dead(holder_of(int(gone.stdout), "123"))
    assert not identity._holder_is_dead(f"elsewhere:{os.getpid()}:abcd|1")  # another host


async def test_live_workers_get_distinct_slots_and_a_successor_learns_its_predecessor(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    keys = Keys(redis_prefix)
    async with (
        claim_identity(redis_client, keys, name="n") as first,
        claim_identity(redis_client, keys, name="n") as second,
    ):
        assert (first.slot, second.slot) == (0, 1)
        assert first.worker_id != second.worker_id
    # Released on exit: the next worker takes slot 0 and learns who held it last.
    async with claim_identity(redis_client, keys, name="n") as third:
        assert third.slot == 0
        assert third.previous_id == first.worker_id


async def test_health_and_metrics_endpoints() -> None:
    port = identity_free_port()
    health_server = serve_health(
        port, status=lambda: (True, {"workerId": "w"}), metrics=lambda: b"m 1\n", host="127.0.0.1"
    )
    async with health_server, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        health = await http.get("/healthz")
        metrics = await http.get("/metrics")
        missing = await http.get("/nope")
    assert (health.status_code, health.json()) == (200, {"status": "ok", "workerId": "w"})
    assert (metrics.status_code, metrics.text) == (200, "m 1\n")
    assert missing.status_code == 404


def identity_free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
