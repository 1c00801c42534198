"""The whole local stack (`make up`), once per session, on free ports in a temp run dir.

It runs exactly what a developer's `make up` runs (`python -m deploy.local.stack up`:
Redis, PostgreSQL, the engine, bpmn/ deployed, two API replicas, two workers, nginx), but
never clashes with one: its own run directory, its own ports. Tests reach the API only
through the load balancer, except where a test aims at one replica on purpose.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from deploy.local import servers
from tests.helpers.stack import Stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    run_dir = tmp_path_factory.mktemp("stack")
    replica_ports = [servers.free_port(), servers.free_port()]
    api_port, engine_port = servers.free_port(), servers.free_port()
    env = {
        **os.environ,
        "STACK_API_PORT": str(api_port),
        "STACK_ENGINE_PORT": str(engine_port),
        "STACK_REDIS_PORT": str(servers.free_port()),
        "STACK_POSTGRES_PORT": str(servers.free_port()),
        "STACK_API_REPLICA_PORTS": ",".join(map(str, replica_ports)),
        "STACK_WORKER_HEALTH_PORTS": f"{servers.free_port()},{servers.free_port()}",
        "STACK_FLUSHER_PORT": str(servers.free_port()),
        "SHUTDOWN_GRACE_S": "10",
    }
    for name in ("REDIS_URL", "DATABASE_URL", "CAMUNDA_BASE_URL", "API_KEYS", "COMPLETE_TOKEN"):
        env.pop(name, None)  # the stack's own servers, no auth
    handle = Stack(
        run_dir=run_dir,
        env=env,
        api_url=f"http://127.0.0.1:{api_port}",
        engine_url=f"http://127.0.0.1:{engine_port}/engine-rest",
        replica_ports=replica_ports,
    )
    try:
        handle.command("up")
        yield handle
    finally:
        handle.command("down", timeout_s=180)


@pytest.fixture
def healthy_stack(stack: Stack) -> Iterator[Stack]:
    """The stack with every process running before and after the test."""
    stack.ensure_up()
    yield stack
    stack.ensure_up()
