"""The real servers the suite depends on answer (a failure here explains every other one)."""

from __future__ import annotations

import httpx
import psycopg
import redis.asyncio as aioredis

from deploy.local import servers


async def test_redis_answers(redis_client: aioredis.Redis) -> None:
    assert await redis_client.ping() is True


def test_postgres_answers(schema_url: str) -> None:
    with psycopg.connect(schema_url) as conn:
        row = conn.execute("SELECT current_schema()").fetchone()
    assert row is not None
    assert row[0].startswith("t_")


def test_engine_answers(engine_url: str) -> None:
    response = httpx.get(f"{engine_url}/engine")
    assert response.status_code == 200
    assert {"name": "default"} in response.json()


def test_the_engine_is_the_one_asked_for(engine_url: str) -> None:
    """FLOWGATE_ENGINE picks the engine the suite runs against; this says which answered."""
    version = httpx.get(f"{engine_url}/version").json()["version"]
    assert version.startswith({"camunda": "7.24.", "operaton": "1.0."}[servers.ENGINE])
