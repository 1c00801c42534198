"""A real ``python -m flowgate.services.api`` process on a free port, as a test's replica (or
another of the services, such as the standalone flusher)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from deploy.local.servers import free_port
from flowgate.shared.settings import Settings
from tests.helpers.waiting import until

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Replica:
    url: str
    process: asyncio.subprocess.Process
    log: Path

    async def parked(self, client: httpx.AsyncClient) -> float:
        text = (await client.get(f"{self.url}/metrics")).text
        match = re.search(r"^flowgate_api_parked_requests (\S+)$", text, re.MULTILINE)
        assert match, text
        return float(match[1])


@contextlib.asynccontextmanager
async def replica(
    settings: Settings,
    tmp_path: Path,
    name: str,
    *,
    module: str = "flowgate.services.api",
    port_setting: str = "API_PORT",
    ready_path: str = "/readyz",
    **env: str,
) -> AsyncIterator[Replica]:
    """``python -m <module>`` with ``settings``, its ``port_setting`` a free port, once
    ``ready_path`` answers 200 there; stopped afterwards."""
    port = free_port()
    environment = {
        **os.environ,
        "REDIS_URL": settings.redis_url,
        "REDIS_CLUSTER": str(settings.redis_cluster).lower(),
        "DATABASE_URL": settings.database_url,
        "REDIS_PREFIX": settings.redis_prefix,
        "CAMUNDA_BASE_URL": settings.camunda_base_url,
        "SYNC_TIMEOUT_MS": str(settings.sync_timeout_ms),
        "API_HOST": "127.0.0.1",
        port_setting: str(port),
        "REPLICA_ID": name,
        "LOG_LEVEL": "INFO",
        **env,
    }
    log = tmp_path / f"{name}.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", module, cwd=ROOT, env=environment, stdout=out, stderr=out
        )
    running = Replica(f"http://127.0.0.1:{port}", process, log)
    try:
        async with httpx.AsyncClient(timeout=2) as client:

            async def ready() -> bool:
                assert process.returncode is None, log.read_text()
                try:
                    return (await client.get(running.url + ready_path)).status_code == 200
                except httpx.HTTPError:
                    return False

            await until(ready, timeout_s=60)
        yield running
    finally:
        if process.returncode is None:
            process.terminate()
            async with asyncio.timeout(30):
                await process.wait()
