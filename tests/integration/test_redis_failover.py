"""A Redis Cluster master killed under load: its replica takes over and nothing is lost.

Two real API replicas on a fresh native cluster (three masters, a replica each) and the
real engine. Requests are parked on both replicas and runs are being completed and
started when one master is SIGKILLed; the cluster promotes its replica. Every client must
still get its own run's answer (200, or 202 and then the right status), every run must
reach Postgres through the write-behind, and every correlationId must have exactly one
engine instance.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from deploy.local import servers
from flowgate.shared.settings import Settings
from tests.helpers.api import cid, start_body
from tests.helpers.engine import deploy_bpmn
from tests.helpers.replica import Replica, replica
from tests.helpers.waiting import until

pytestmark = pytest.mark.slow

MakeSettings = Callable[..., Settings]
#: Runs parked before the kill, and runs started while the cluster fails over.
PARKED, STARTED_DURING = 30, 10


async def test_a_master_killed_under_load_loses_and_doubles_nothing(
    make_settings: MakeSettings, engine_url: str, schema_url: str, tmp_path: Path
) -> None:
    cluster = servers.redis_cluster(tmp_path / "cluster")
    try:
        await deploy_bpmn(engine_url)
        # A start whose `sending` mark the killed master wrote but never confirmed is looked
        # for over the whole start window before its client may start again (the guarantee:
        # one instance per id); a short window keeps that case inside the test's patience.
        settings = make_settings(
            redis_url=cluster.url, redis_cluster=True, camunda_base_url=engine_url
        )
        window = {"CAMUNDA_TIMEOUT_MS": "10000", "ENGINE_START_WINDOW_MS": "20000"}
        async with (
            replica(settings, tmp_path, "a", **window) as a,
            replica(settings, tmp_path, "b", **window) as b,
            httpx.AsyncClient(timeout=120) as client,
        ):
            load = _Load(client, [a, b], engine_url)
            ids = [cid() for _ in range(PARKED + STARTED_DURING)]
            parked = [asyncio.create_task(load.answer(n, c)) for n, c in enumerate(ids[:PARKED])]
            await until(lambda: load.parked_total(PARKED), timeout_s=30)
            for n, c in enumerate(ids[:10]):
                await load.complete(n, c)

            victim = cluster.nodes[1]  # a master (``--cluster create`` lists masters first)
            os.kill(victim.pid, signal.SIGKILL)
            started = [
                asyncio.create_task(load.answer(n, c))
                for n, c in enumerate(ids[PARKED:], start=PARKED)
            ]
            await asyncio.gather(*(load.complete(n, c) for n, c in enumerate(ids) if n >= 10))
            answers = await asyncio.gather(*parked, *started)

            await until(lambda: _promoted(cluster, victim), timeout_s=30)
            assert answers == [{"n": n} for n in range(len(ids))]

        rows = await _rows_when_flushed(schema_url, len(ids))
        assert rows == {c: ("ok", {"n": n}) for n, c in enumerate(ids)}
        async with httpx.AsyncClient(base_url=engine_url, timeout=30) as engine:
            for c in ids:
                count = await engine.get(
                    "/history/process-instance/count", params={"processInstanceBusinessKey": c}
                )
                assert count.json() == {"count": 1}, c
    finally:
        cluster.stop()


class _Load:
    """What the clients do: each follows the README (start; after a 202 long-poll the status
    URL; after a 502 or 503, at the start or there, start again with the same id), and the
    completer ends each run once its engine instance exists."""

    def __init__(self, client: httpx.AsyncClient, replicas: list[Replica], engine_url: str) -> None:
        self._client = client
        self._replicas = replicas
        self._engine_url = engine_url

    async def answer(self, n: int, correlation_id: str) -> Any:
        """The run's result, as its client gets it."""
        url = self._replicas[n % 2].url
        while True:
            response = await self._client.post(
                f"{url}/api/process/start",
                json=start_body(correlation_id),
                headers={"Prefer": "wait=60"},
            )
            while response.status_code == 202:
                response = await self._client.get(
                    f"{url}/api/process/status/{correlation_id}", params={"wait": 30}
                )
            if response.status_code == 200:
                return response.json()["result"]
            # Redis unavailable (the failed shard), or a start given up meanwhile.
            assert response.status_code in (502, 503), response.text
            await asyncio.sleep(0.2)

    async def complete(self, n: int, correlation_id: str) -> None:
        """Complete the run through the other replica once its engine instance exists, as
        a worker would (a start made during the failover may still be retrying; completing
        a claim whose start was never sent would end it without an instance)."""
        url = self._replicas[(n + 1) % 2].url
        body = {"correlationId": correlation_id, "status": "ok", "data": {"n": n}}
        await until(lambda: self._has_instance(correlation_id), timeout_s=120)
        while True:
            try:
                response = await self._client.post(f"{url}/api/process/complete", json=body)
                if response.status_code == 200 and response.json()["received"]:
                    status = await self._client.get(f"{url}/api/process/status/{correlation_id}")
                    if status.status_code == 200:
                        return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)

    async def _has_instance(self, correlation_id: str) -> bool:
        count = await self._client.get(
            f"{self._engine_url}/process-instance/count", params={"businessKey": correlation_id}
        )
        return bool(count.json()["count"])

    async def parked_total(self, expected: int) -> bool:
        counts = [await r.parked(self._client) for r in self._replicas]
        return sum(counts) == expected


def _promoted(cluster: servers.RedisCluster, victim: servers.Server) -> bool:
    """Every slot is served again, as the surviving nodes see it."""
    survivors = [p for p, n in zip(cluster.ports, cluster.nodes, strict=True) if n is not victim]
    return all(servers.cluster_ok(port) for port in survivors)


async def _rows_when_flushed(database_url: str, count: int) -> dict[str, tuple[str, Any]]:
    """process_store once the write-behind has written ``count`` finished runs."""
    found: dict[str, tuple[str, Any]] = {}

    async def flushed() -> bool:
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            cursor = await conn.execute(
                "SELECT correlation_id, status, data FROM process_store WHERE status = 'ok'"
            )
            found.clear()
            found.update({c: (s, d) for c, s, d in await cursor.fetchall()})
        return len(found) == count

    await until(flushed, timeout_s=60)
    return found
