"""Real ``python -m flowgate.services.api`` processes: two replicas on one Redis (and on a Redis
Cluster), and SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psycopg
import pytest

from flowgate.shared.settings import Settings
from tests.helpers.api import cid, start_body
from tests.helpers.engine import deploy_bpmn as deploy
from tests.helpers.replica import replica
from tests.helpers.waiting import until

pytestmark = pytest.mark.slow

MakeSettings = Callable[..., Settings]
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.redis_both
async def test_two_replicas_share_waits_and_state(
    make_settings: MakeSettings, engine_url: str, tmp_path: Path
) -> None:
    await deploy(engine_url)
    settings = make_settings(camunda_base_url=engine_url)
    async with (
        replica(settings, tmp_path, "a") as a,
        replica(settings, tmp_path, "b") as b,
        httpx.AsyncClient(timeout=60) as client,
    ):
        correlation_id = cid()
        start = asyncio.create_task(
            client.post(
                f"{a.url}/api/process/start",
                json=start_body(correlation_id, userId="u1"),
                headers={"Prefer": "wait=30"},
            )
        )
        await until(lambda: _is(a.parked(client), 1), timeout_s=30)

        # Pending reads the same on both, once the watcher has recorded the start event
        # (until then a read on each side of that moment would differ in its progress).
        async def start_recorded() -> bool:
            status = await client.get(f"{b.url}/api/process/status/{correlation_id}")
            return bool(status.json()["data"] == {"step": "start"})

        await until(start_recorded, timeout_s=30)
        on_a = await client.get(f"{a.url}/api/process/status/{correlation_id}")
        on_b = await client.get(f"{b.url}/api/process/status/{correlation_id}")
        assert on_a.status_code == on_b.status_code == 202
        assert on_a.json() == on_b.json()

        # Parked on A, completed through B.
        began = time.monotonic()
        done = await client.post(
            f"{b.url}/api/process/complete",
            json={"correlationId": correlation_id, "status": "ok", "data": {"via": "b"}},
        )
        assert done.json() == {"received": True, "changed": True}
        response = await start
        assert time.monotonic() - began < 2
        assert response.status_code == 200
        assert response.json()["result"] == {"via": "b"}

        on_a = await client.get(f"{a.url}/api/process/status/{correlation_id}")
        on_b = await client.get(f"{b.url}/api/process/status/{correlation_id}")
        assert on_a.status_code == on_b.status_code == 200
        assert on_a.json() == on_b.json()

        # A long-poll on B is woken by a completion through A, too.
        other = cid()
        started = await client.post(
            f"{a.url}/api/process/start",
            json=start_body(other),
            headers={"Prefer": "respond-async"},
        )
        assert started.status_code == 202
        poll = asyncio.create_task(client.get(f"{b.url}/api/process/status/{other}?wait=30"))
        await until(lambda: _is(b.parked(client), 1), timeout_s=30)
        await client.post(
            f"{a.url}/api/process/complete",
            json={"correlationId": other, "status": "error", "error": "no"},
        )
        assert (await poll).status_code == 500


async def test_sigterm_answers_every_parked_request_with_202_then_flushes_and_exits(
    make_settings: MakeSettings, engine_url: str, tmp_path: Path, schema_url: str
) -> None:
    await deploy(engine_url)
    settings = make_settings(camunda_base_url=engine_url, sync_timeout_ms=60_000)
    async with replica(settings, tmp_path, "draining", MAX_WAIT_MS="120000") as server:
        async with httpx.AsyncClient(timeout=60) as client:
            starts = [cid() for _ in range(5)]
            requests = [
                asyncio.create_task(
                    client.post(f"{server.url}/api/process/start", json=start_body(c))
                )
                for c in starts
            ]
            await until(lambda: _is(server.parked(client), 5), timeout_s=30)
            requests += [
                asyncio.create_task(
                    client.get(f"{server.url}/api/process/status/{c}", params={"wait": 60})
                )
                for c in starts
                for _ in range(4)
            ]
            await until(lambda: _is(server.parked(client), 25), timeout_s=30)

            began = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            responses = await asyncio.gather(*requests)
            assert time.monotonic() - began < 3, "parked requests must not wait for their deadline"
        for response in responses:
            assert response.status_code == 202
            correlation_id = response.json()["correlationId"]
            assert response.headers["location"] == f"/api/process/status/{correlation_id}"
            assert response.headers["retry-after"].isdigit()
        # uvicorn re-raises the signal once it has shut down cleanly.
        async with asyncio.timeout(30):
            assert await server.process.wait() in (0, -signal.SIGTERM)
        assert "Application shutdown complete." in server.log.read_text()

    # What it owed Postgres was written before it exited.
    with psycopg.connect(schema_url) as conn:
        rows = conn.execute(
            "SELECT correlation_id, status, instance_id FROM process_store"
            " WHERE correlation_id = ANY(%s)",
            (starts,),
        ).fetchall()
    assert sorted(row[0] for row in rows) == sorted(starts)
    assert all(row[1] == "pending" and row[2] for row in rows)


async def _is(value: object, expected: float) -> bool:
    assert asyncio.iscoroutine(value)
    return bool(await value == expected)


async def test_a_client_gone_mid_body_is_no_error_and_a_stalled_body_gets_408(
    make_settings: MakeSettings, engine_url: str, tmp_path: Path
) -> None:
    """Reached directly (no load balancer to buffer bodies), a replica neither treats a
    client that left as a bug nor keeps an incomplete body forever."""
    settings = make_settings(camunda_base_url=engine_url)
    async with replica(settings, tmp_path, "bodies", BODY_TIMEOUT_S="1") as server:
        port = int(server.url.rsplit(":", 1)[1])
        head = (
            b"POST /api/process/start HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"processKey":'
        )
        # Gone mid-body.
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head)
        await writer.drain()
        writer.close()
        # Stalled mid-body: answered 408 within the body timeout.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head)
        await writer.drain()
        async with asyncio.timeout(5):
            status_line = await reader.readline()
        writer.close()
        assert status_line.startswith(b"HTTP/1.1 408")
        async with httpx.AsyncClient(timeout=5) as client:
            assert (await client.get(f"{server.url}/healthz")).status_code == 200
    log = server.log.read_text()
    assert "Traceback" not in log
    assert "unhandled error" not in log


async def test_a_start_failing_with_503_is_logged_with_its_run(
    make_settings: MakeSettings, tmp_path: Path
) -> None:
    settings = make_settings(camunda_base_url="http://127.0.0.1:9/engine-rest")
    correlation_id = cid()
    async with (
        replica(settings, tmp_path, "logs", ready_path="/healthz") as server,
        httpx.AsyncClient(timeout=30) as client,
    ):
        answer = await client.post(
            f"{server.url}/api/process/start", json=start_body(correlation_id)
        )
        assert answer.status_code == 503
    lines = [line for line in server.log.read_text().splitlines() if correlation_id in line]
    assert any("engine start failed" in line and "Connect" in line for line in lines), lines
