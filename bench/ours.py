"""Starting our own services for a benchmark: the API (``python -m flowgate.services.api``), the
worker (``python -m flowgate.services.worker``) and the standalone write-behind flusher (``python -m
flowgate.services.flusher``), each its own subprocess."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from bench.harness import SERVER_CPU, Run, Stack
from deploy.local import servers
from deploy.local.servers import Server


def available(module: str) -> str | None:
    """None when ``python -m module`` exists, else why not."""
    try:
        found = importlib.util.find_spec(f"{module}.__main__")
    except ModuleNotFoundError:
        found = None
    return None if found else f"{module} has no __main__ yet"


def new_schema(stack: Stack, name: str) -> str:
    """A fresh schema in flowgate's database; returns a DATABASE_URL that uses it."""
    schema = f"b_{name}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    return stack.schema_url(schema)


@dataclass
class Served:
    """A process of ours listening on a loopback port."""

    server: Server
    port: int

    #: What follows host:port in :attr:`url`.
    path = ""

    @property
    def pid(self) -> int:
        return self.server.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"


@dataclass
class Api(Served):
    prefix: str
    database_url: str


def start_api(
    run: Run,
    stack: Stack,
    *,
    engine_url: str,
    prefix: str,
    database_url: str,
    cpu: int | None,
    extra_env: dict[str, str] | None = None,
    argv: Callable[[int], list[str]] | None = None,
) -> Api:
    """``python -m flowgate.services.api`` on a free port, or ``argv(port)`` (another server)."""
    port = servers.free_port()
    env = {
        "API_HOST": "127.0.0.1",
        "API_PORT": str(port),
        "REDIS_URL": stack.redis_url,
        "REDIS_CLUSTER": str(stack.redis_cluster).lower(),
        "REDIS_PREFIX": prefix,
        "DATABASE_URL": database_url,
        "CAMUNDA_BASE_URL": engine_url,
        "LOG_LEVEL": "warning",
        "MAX_WAIT_MS": "120000",
        "MAX_PARKED": "20000",
        "REPLICA_ID": f"bench-{port}",
        **(extra_env or {}),
    }
    command = argv(port) if argv else [sys.executable, "-m", "flowgate.services.api"]
    ready = lambda: servers.http_ok(f"http://127.0.0.1:{port}/healthz")  # noqa: E731
    server = run.spawn("api", command, env=env, cpu=cpu, ready=ready)
    return Api(server, port, prefix, database_url)


def start_flusher(
    run: Run,
    stack: Stack,
    *,
    prefix: str,
    database_url: str,
    extra_env: dict[str, str] | None = None,
) -> Server:
    """The write-behind on its own (for an API started with WRITEBEHIND_IN_API=false),
    floating, as ``make up`` runs it beside the replicas."""
    port = servers.free_port()
    env = {
        "REDIS_URL": stack.redis_url,
        "REDIS_CLUSTER": str(stack.redis_cluster).lower(),
        "REDIS_PREFIX": prefix,
        "DATABASE_URL": database_url,
        "FLUSHER_HEALTH_PORT": str(port),
        "LOG_LEVEL": "warning",
        **(extra_env or {}),
    }
    ready = lambda: servers.http_ok(f"http://127.0.0.1:{port}/healthz")  # noqa: E731
    return run.python("flusher", "flowgate.services.flusher", env=env, cpu=None, ready=ready)


def start_worker(
    run: Run,
    stack: Stack,
    *,
    engine_url: str,
    prefix: str,
    database_url: str,
    cpu: int | None,
    extra_env: dict[str, str] | None = None,
) -> Server:
    env = {
        "REDIS_URL": stack.redis_url,
        "REDIS_CLUSTER": str(stack.redis_cluster).lower(),
        "REDIS_PREFIX": prefix,
        "DATABASE_URL": database_url,
        "CAMUNDA_BASE_URL": engine_url,
        "WORKER_HEALTH_PORT": "0",
        "LOG_LEVEL": "warning",
        **(extra_env or {}),
    }
    return run.python("worker", "flowgate.services.worker", env=env, cpu=cpu)


def start_gateway(run: Run, stack: Stack, *, name: str) -> tuple[Api, Server]:
    """flowgate on the real engine: one API (CPU 0) and one worker (floating), sharing a
    fresh Redis prefix and Postgres schema."""
    prefix = f"{name[:2]}{uuid.uuid4().hex[:6]}"
    database_url = new_schema(stack, name)
    engine_url = stack.engine_url
    api = start_api(run, stack, engine_url=engine_url, prefix=prefix, database_url=database_url,
                    cpu=SERVER_CPU)  # fmt: skip
    worker = start_worker(run, stack, engine_url=engine_url, prefix=prefix,
                          database_url=database_url, cpu=None)  # fmt: skip
    return api, worker


@dataclass
class Stub(Served):
    """The stand-in engine (bench/stubengine.py), for the micro-benchmarks only."""

    path = "/engine-rest"


def start_stub(run: Run, stack: Stack, *, prefix: str, mode: str, cpu: int | None) -> Stub:
    port = servers.free_port()
    server = run.python(
        "stand-in-engine",
        "bench.stubengine",
        str(port),
        stack.redis_url,
        prefix,
        mode,
        *(["cluster"] if stack.redis_cluster else []),
        cpu=cpu,
        ready=lambda: servers.port_open(port),
    )
    return Stub(server, port)


def metrics(api: Api) -> dict[str, float]:
    """The API's Prometheus samples: ``name{labels}`` -> value."""
    with urllib.request.urlopen(f"{api.url}/metrics", timeout=30) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                samples[name] = float(value)
    return samples


def waits(api: Api) -> dict[str, int]:
    """How parked requests ended so far (flowgate_api_waits_total by ``how``)."""
    found = {}
    for name, value in metrics(api).items():
        if name.startswith("flowgate_api_waits_total{"):
            found[name.split('how="', 1)[1].split('"', 1)[0]] = int(value)
    return found
