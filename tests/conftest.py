"""Real servers for the test suite.

Redis, PostgreSQL and the engine come from, in order of preference:
1. ``REDIS_URL`` / ``DATABASE_URL`` / ``CAMUNDA_BASE_URL`` when set;
2. testcontainers, where a Docker engine answers (the engine: Camunda's official image);
3. native processes on free ports (deploy/local/servers.py), started once per session.

The engine is Camunda 7 unless ``FLOWGATE_ENGINE=operaton``; every test that uses it is
marked ``engine``, so ``pytest -m engine`` (``make test-operaton``) runs them all.

A server that cannot start fails the run with a message saying what is missing: a
missing server is never a skip in this project.

Each test gets its own Redis key prefix and its own Postgres schema, so tests never see
each other's state while sharing one set of servers.

A module marked ``redis_both`` runs each of its tests twice: on the single Redis and on a
native Redis Cluster of three masters with a replica each (``REDIS_CLUSTER_URL`` names one
to use instead), through :func:`redis_target`, which ``make_settings`` and ``redis_client``
follow. ``FLOWGATE_TEST_REDIS=cluster`` (``make test-cluster``) runs every other test on
the cluster too, except those marked ``single_redis`` (they cut one Redis off through a
proxy; a cluster client would follow the nodes' own addresses around it).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest

from deploy.local import servers
from flowgate.shared.redis_client import RedisClient, connect
from flowgate.shared.settings import Settings

ENGINE_IMAGE = "camunda/camunda-bpm-platform:run-7.24.0"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "engine_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.engine)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "redis_kind" in metafunc.fixturenames and metafunc.definition.get_closest_marker(
        "redis_both"
    ):
        metafunc.parametrize("redis_kind", ["single", "cluster"], indirect=True)


@pytest.fixture(scope="session")
def server_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("servers")


@pytest.fixture(scope="session")
def docker_available() -> bool:
    return servers.docker_answers()


@pytest.fixture(scope="session")
def redis_service(
    server_dir: Path, docker_available: bool
) -> Iterator[tuple[str, servers.Server | None]]:
    """(url, native server or None): tests that simulate an outage stop and start it."""
    if url := os.environ.get("REDIS_URL"):
        yield url, None
    elif docker_available:
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7") as container:
            host, port = container.get_container_host_ip(), container.get_exposed_port(6379)
            yield f"redis://{host}:{port}/0", None
    else:
        port = servers.free_port()
        server = servers.redis_server(server_dir / "redis", port).start()
        yield f"redis://127.0.0.1:{port}/0", server
        server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_service: tuple[str, servers.Server | None]) -> str:
    return redis_service[0]


@pytest.fixture(scope="session")
def redis_cluster_url(server_dir: Path) -> Iterator[str]:
    """A Redis Cluster for the session (three masters, one replica each)."""
    if url := os.environ.get("REDIS_CLUSTER_URL"):
        yield url
    else:
        cluster = servers.redis_cluster(server_dir / "redis-cluster")
        yield cluster.url
        cluster.stop()


@dataclass(frozen=True)
class RedisTarget:
    url: str
    cluster: bool


@pytest.fixture
def redis_kind(request: pytest.FixtureRequest) -> str:
    """``single`` or ``cluster``; ``cluster`` too in modules marked ``redis_both``, and
    never in those marked ``single_redis``."""
    if request.node.get_closest_marker("single_redis"):
        return "single"
    kind: str = getattr(request, "param", os.environ.get("FLOWGATE_TEST_REDIS", "single"))
    return kind


@pytest.fixture
def redis_target(request: pytest.FixtureRequest, redis_kind: str) -> RedisTarget:
    """The Redis this test runs on (the cluster is started only if a test asks for it)."""
    if redis_kind == "cluster":
        return RedisTarget(request.getfixturevalue("redis_cluster_url"), cluster=True)
    return RedisTarget(request.getfixturevalue("redis_url"), cluster=False)


@pytest.fixture(scope="session")
def postgres_service(
    server_dir: Path, docker_available: bool
) -> Iterator[tuple[str, servers.Server | None]]:
    """(url, native server or None): tests that simulate an outage stop and start it."""
    if url := os.environ.get("DATABASE_URL"):
        yield url, None
    elif docker_available:
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16", driver=None) as container:
            yield container.get_connection_url(), None
    else:
        port = servers.free_port()
        server = servers.postgres_server(server_dir / "postgres", port).start()
        yield f"postgresql://flowgate:flowgate@127.0.0.1:{port}/flowgate", server
        server.stop()


@pytest.fixture(scope="session")
def database_url(postgres_service: tuple[str, servers.Server | None]) -> str:
    return postgres_service[0]


@pytest.fixture(scope="session")
def engine_url(server_dir: Path, docker_available: bool, redis_url: str) -> Iterator[str]:
    """Base URL of a real engine's REST API (…/engine-rest), once per session.

    A native engine pushes its run events to the session's Redis (its plugin); the
    official image does not have the plugin, and every replica reads its history.
    """
    if url := os.environ.get("CAMUNDA_BASE_URL"):
        yield url.rstrip("/")
    elif docker_available and servers.ENGINE == "camunda":
        from testcontainers.core.container import DockerContainer
        from testcontainers.core.waiting_utils import wait_for_logs

        with DockerContainer(ENGINE_IMAGE).with_exposed_ports(8080) as container:
            wait_for_logs(container, "Started CamundaBpmRun", timeout=180)
            host, port = container.get_container_host_ip(), container.get_exposed_port(8080)
            yield f"http://{host}:{port}/engine-rest"
    else:
        port = servers.free_port()
        engine = servers.engine_server(server_dir / "engine", port, events_redis=redis_url)
        server = engine.start(timeout_s=180)
        yield f"http://127.0.0.1:{port}/engine-rest"
        server.stop()


# --- per-test isolation ------------------------------------------------------------------


@pytest.fixture
def redis_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def schema_url(database_url: str) -> Iterator[str]:
    """A database URL whose search_path is a fresh schema, dropped after the test."""
    schema = f"t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    separator = "&" if "?" in database_url else "?"
    yield f"{database_url}{separator}options={quote(f'-csearch_path={schema}')}"
    with (
        contextlib.suppress(psycopg.OperationalError),
        psycopg.connect(database_url, autocommit=True) as conn,
    ):
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def make_settings(
    redis_target: RedisTarget, schema_url: str, redis_prefix: str
) -> Callable[..., Settings]:
    """Settings pointing at the test servers; keyword arguments override any field.

    The engine URL is filled in only by tests that ask for ``engine_url`` (so unit
    and Redis-only tests never start the engine).
    """

    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "redis_url": redis_target.url,
            "redis_cluster": redis_target.cluster,
            "database_url": schema_url,
            "redis_prefix": redis_prefix,
            **overrides,
        }
        return Settings(**values)

    return build


@pytest.fixture
async def redis_client(redis_target: RedisTarget, redis_prefix: str) -> AsyncIterator[RedisClient]:
    """A client on the test's Redis; keys under this test's prefix are deleted afterwards."""
    client = connect(redis_target.url, cluster=redis_target.cluster)
    yield client
    keys = [key async for key in client.scan_iter(match=f"*{redis_prefix}*", count=1000)]
    for start in range(0, len(keys), 1000):
        await client.delete(*keys[start : start + 1000])  # a cluster client splits by slot
    await client.aclose()
