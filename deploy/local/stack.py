"""The whole local stack as native background processes: `make up` / `make down` / `make ps`.
(One module past 400 lines: one command-line tool, its components and their configs.)

    python -m deploy.local.stack [--run-dir DIR] up [NAME ...]     start (what is not running yet)
    python -m deploy.local.stack [--run-dir DIR] down [NAME ...]   stop what `up` started
    python -m deploy.local.stack [--run-dir DIR] ps                name, pid, port, state
    python -m deploy.local.stack [--run-dir DIR] logs [-f] [-n N] [NAME ...]

What runs, in start order: Redis, PostgreSQL (databases `flowgate` and `camunda`), the
Camunda engine on PostgreSQL, a one-shot deployment of bpmn/, the API replicas, the workers,
and nginx in front of the replicas. `up` returns once every one of them is ready. With
`REDIS_CLUSTER=true`, Redis is a Redis Cluster instead: six nodes (three masters with a
replica each, joined once by `redis-cli --cluster create`; they rejoin by themselves).

Everything lives in one run directory (default `.run/` at the repo root): `stack.json`
records each process (pid + kernel start time, so a recycled pid is never taken for ours),
`logs/<name>.log`, `data/` (Redis and the PostgreSQL cluster, kept between runs), `nginx/`
(generated config, temp files). `down` stops only the processes recorded there.

`up` is idempotent: a recorded process that is alive and ready is left alone, a dead one
is started again (so `up api-1` brings back a replica you killed).

Ports come from the environment (a port held by another program stops `up` with a message
naming the variable to change):

    STACK_API_PORT (8000: nginx)       STACK_API_REPLICA_PORTS (8001,8002)
    STACK_ENGINE_PORT (8080)           STACK_WORKER_HEALTH_PORTS (8091,8092)
    STACK_REDIS_PORT (6379)            STACK_POSTGRES_PORT (5432)
    STACK_REDIS_CLUSTER_PORTS (7001,...,7006; bus ports are these + 10000)

Other settings (SYNC_TIMEOUT_MS, MAX_WAIT_MS, ...) pass through to the API and workers.

Where a Docker engine answers, `up`/`down`/`ps`/`logs` drive deploy/compose/compose.yaml
instead (`--native` or FLOWGATE_NO_DOCKER=1 forces the native stack).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deploy.local import servers
from deploy.local.servers import ROOT, Server, ServerError

COMPOSE_FILE = ROOT / "deploy" / "compose" / "compose.yaml"
COMPOSE_PROJECT = "flowgate"
STATE_FILE = "stack.json"


# --- configuration -----------------------------------------------------------------------


def _port(name: str, default: int) -> int:
    raw = os.environ.get(name, str(default))
    try:
        port = int(raw)
    except ValueError:
        raise ServerError(f"{name}={raw!r} is not a port number") from None
    if not 0 < port < 65_536:
        raise ServerError(f"{name}={raw!r} is not a port number")
    return port


def _ports(name: str, default: Sequence[int]) -> list[int]:
    raw = os.environ.get(name)
    if raw is None:
        return list(default)
    try:
        ports = [int(part) for part in raw.split(",") if part.strip()]
    except ValueError:
        raise ServerError(f"{name}={raw!r} is not a comma-separated list of ports") from None
    if not ports:
        raise ServerError(f"{name} is empty: give at least one port")
    return ports


@dataclass(frozen=True)
class Config:
    run_dir: Path
    api_port: int
    engine_port: int
    redis_port: int
    postgres_port: int
    replica_ports: list[int]
    worker_health_ports: list[int]
    #: The write-behind flusher's /healthz (the replicas leave the flushing to it).
    flusher_port: int = 8093
    #: The Redis Cluster's nodes (``REDIS_CLUSTER=true``), or empty: one Redis.
    redis_cluster_ports: list[int] = field(default_factory=list)

    @classmethod
    def from_env(cls, run_dir: Path | None = None) -> Config:
        api = _port("STACK_API_PORT", 8000)
        cluster = _settings().redis_cluster
        return cls(
            run_dir=(run_dir or Path(os.environ.get("STACK_RUN_DIR", ROOT / ".run"))).resolve(),
            api_port=api,
            engine_port=_port("STACK_ENGINE_PORT", 8080),
            redis_port=_port("STACK_REDIS_PORT", 6379),
            postgres_port=_port("STACK_POSTGRES_PORT", 5432),
            replica_ports=_ports("STACK_API_REPLICA_PORTS", [api + 1, api + 2]),
            worker_health_ports=_ports("STACK_WORKER_HEALTH_PORTS", [8091, 8092]),
            flusher_port=_port("STACK_FLUSHER_PORT", 8093),
            redis_cluster_ports=(
                _ports("STACK_REDIS_CLUSTER_PORTS", list(range(7001, 7007))) if cluster else []
            ),
        )

    @property
    def logs(self) -> Path:
        return self.run_dir / "logs"

    @property
    def data(self) -> Path:
        return self.run_dir / "data"

    @property
    def engine_url(self) -> str:
        return f"http://127.0.0.1:{self.engine_port}/engine-rest"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def service_env(self) -> dict[str, str]:
        """What the API replicas and workers need to find the stack's servers."""
        pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        redis_port = self.redis_cluster_ports[0] if self.redis_cluster_ports else self.redis_port
        return {
            "CAMUNDA_BASE_URL": self.engine_url,
            "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "REDIS_CLUSTER": "true" if self.redis_cluster_ports else "false",
            "DATABASE_URL": f"postgresql://flowgate:flowgate@127.0.0.1:{self.postgres_port}/flowgate",
            "PYTHONPATH": pythonpath,
            "PYTHONUNBUFFERED": "1",
            # Callbacks can be tried locally, and reach nothing else unless asked to.
            "CALLBACK_ALLOWED_HOSTS": os.environ.get(
                "CALLBACK_ALLOWED_HOSTS", "127.0.0.1,localhost"
            ),
        }


# --- what runs ---------------------------------------------------------------------------


@dataclass
class Component:
    """One entry of the stack: how to build its server, and which port/env var it owns."""

    name: str
    port: int
    port_var: str
    build: Callable[[], Server]
    start_timeout_s: float = 60.0
    stop_timeout_s: float = 20.0
    # Health URL for `ps` (None: the port answering is enough).
    health_url: str | None = None
    # A one-shot step once it is ready (deploying bpmn/, forming the Redis Cluster).
    then: Callable[[], None] | None = None


def components(cfg: Config) -> list[Component]:
    """The stack in start order (stopped in reverse)."""
    env = cfg.service_env()
    items = _redis_components(cfg)
    items += [
        Component(
            "postgres",
            cfg.postgres_port,
            "STACK_POSTGRES_PORT",
            lambda: _postgres(cfg),
            stop_timeout_s=30,
        ),
        Component(
            "engine",
            cfg.engine_port,
            "STACK_ENGINE_PORT",
            lambda: _engine(cfg),
            start_timeout_s=300,
            stop_timeout_s=30,
            health_url=f"{cfg.engine_url}/engine",
            then=lambda: deploy_bpmn(cfg),
        ),
    ]
    for i, port in enumerate(cfg.replica_ports, 1):
        items.append(
            Component(
                f"api-{i}",
                port,
                "STACK_API_REPLICA_PORTS",
                _service(
                    cfg,
                    f"api-{i}",
                    "flowgate.services.api",
                    f"http://127.0.0.1:{port}/readyz",
                    {
                        **env,
                        "API_HOST": "127.0.0.1",
                        "API_PORT": str(port),
                        "WRITEBEHIND_IN_API": "false",  # the flusher below does it
                    },
                ),
                health_url=f"http://127.0.0.1:{port}/readyz",
                stop_timeout_s=_shutdown_grace_s() + 10,
            )
        )
    for i, port in enumerate(cfg.worker_health_ports, 1):
        items.append(
            Component(
                f"worker-{i}",
                port,
                "STACK_WORKER_HEALTH_PORTS",
                _service(
                    cfg,
                    f"worker-{i}",
                    "flowgate.services.worker",
                    f"http://127.0.0.1:{port}/healthz",
                    {**env, "WORKER_HEALTH_PORT": str(port)},
                ),
                health_url=f"http://127.0.0.1:{port}/healthz",
                stop_timeout_s=_worker_grace_s() + 10,
            )
        )
    flusher_health = f"http://127.0.0.1:{cfg.flusher_port}/healthz"
    items.append(
        Component(
            "flusher",
            cfg.flusher_port,
            "STACK_FLUSHER_PORT",
            _service(
                cfg,
                "flusher",
                "flowgate.services.flusher",
                flusher_health,
                {**env, "FLUSHER_HEALTH_PORT": str(cfg.flusher_port)},
            ),
            health_url=flusher_health,
            stop_timeout_s=_shutdown_grace_s() + 10,
        )
    )
    # nginx is ready when it listens; whether replicas answer behind it is theirs to say.
    items.append(Component("nginx", cfg.api_port, "STACK_API_PORT", lambda: nginx_server(cfg)))
    return items


def _log(cfg: Config, name: str) -> Path:
    return cfg.logs / f"{name}.log"


def _redis_components(cfg: Config) -> list[Component]:
    if not cfg.redis_cluster_ports:
        return [Component("redis", cfg.redis_port, "STACK_REDIS_PORT", lambda: _redis(cfg))]
    nodes = [
        Component(f"redis-{i}", port, "STACK_REDIS_CLUSTER_PORTS", _cluster_node(cfg, i, port))
        for i, port in enumerate(cfg.redis_cluster_ports, 1)
    ]
    nodes[-1].then = lambda: _form_cluster(cfg)
    return nodes


def _redis(cfg: Config) -> Server:
    server = servers.redis_server(cfg.data / "redis", cfg.redis_port)
    server.log = _log(cfg, "redis")
    return server


def _cluster_node(cfg: Config, i: int, port: int) -> Callable[[], Server]:
    def build() -> Server:
        server = servers.cluster_node(cfg.data / "redis-cluster" / str(port), port)
        server.log = _log(cfg, f"redis-{i}")
        return server

    return build


def _form_cluster(cfg: Config) -> None:
    servers.form_cluster(cfg.redis_cluster_ports)
    _say(f"  {'cluster':<10} every slot served by {len(cfg.redis_cluster_ports)} nodes")


def _postgres(cfg: Config) -> Server:
    server = servers.postgres_server(
        cfg.data / "postgres", cfg.postgres_port, databases=("flowgate", "camunda")
    )
    server.log = _log(cfg, "postgres")
    return server


def _engine(cfg: Config) -> Server:
    server = servers.engine_server(
        cfg.data / "engine",
        cfg.engine_port,
        datasource={
            "SPRING_DATASOURCE_URL": f"jdbc:postgresql://127.0.0.1:{cfg.postgres_port}/camunda",
            "SPRING_DATASOURCE_USERNAME": "camunda",
            "SPRING_DATASOURCE_PASSWORD": "camunda",
            # Stop at once on SIGTERM: Spring's graceful shutdown would wait out the
            # workers' parked fetch-and-lock polls (up to 30 s) for nothing.
            "SERVER_SHUTDOWN": "immediate",
        },
        # Its plugin pushes run events to the stack's Redis: the watcher reads no history.
        events_redis=cfg.service_env()["REDIS_URL"],
        events_cluster=bool(cfg.redis_cluster_ports),
    )
    server.log = _log(cfg, "engine")
    return server


def _service(
    cfg: Config, name: str, module: str, ready_url: str, env: dict[str, str]
) -> Callable[[], Server]:
    def build() -> Server:
        argv = [sys.executable, "-m", module]
        return Server(name, argv, _log(cfg, name), lambda: servers.http_ok(ready_url), env=env)

    return build


def _settings() -> Any:
    """The project's settings as the services will read them (validated the same way)."""
    from flowgate.shared.settings import load_settings

    return load_settings()


def _shutdown_grace_s() -> int:
    return int(_settings().shutdown_grace_s)


def _worker_grace_s() -> int:
    return int(_settings().worker_shutdown_grace_s)


def nginx_proxy_timeout_s(max_wait_ms: int) -> int:
    """nginx's read/send timeout: above the longest wait a client may ask for, 75 s at least."""
    return max(75, math.ceil(max_wait_ms / 1000) + 15)


def nginx_conf(cfg: Config, *, starts_per_s: int | None = None) -> str:
    """The load balancer's config: every replica upstream, timeouts above MAX_WAIT_MS, and
    each credential's starts refused past ``starts_per_s`` (TENANT_STARTS_PER_S unless
    given; 0: none)."""
    settings = _settings()
    limit = _StartLimit(settings.tenant_starts_per_s if starts_per_s is None else starts_per_s)
    timeout = nginx_proxy_timeout_s(int(settings.max_wait_ms))
    # Above the API's own limit, so oversized bodies get the API's 413 and its message.
    body_limit = max(2 * int(settings.max_body_bytes), 1_048_576)
    # nginx closes idle upstream connections before uvicorn does (KEEPALIVE_S), never after.
    upstream_idle = max(1, min(60, int(settings.keepalive_s) - 5))
    nginx_dir = cfg.run_dir / "nginx"
    upstreams = "\n".join(
        f"        server 127.0.0.1:{port} max_fails=1 fail_timeout=3s;"
        for port in cfg.replica_ports
    )
    user = "user root;\n" if os.geteuid() == 0 else ""  # temp files live under the run dir
    return f"""# Generated by deploy/local/stack.py; edits are overwritten by the next `make up`.
{user}worker_processes 2;
daemon off;
pid {nginx_dir}/nginx.pid;
error_log {cfg.logs}/nginx-error.log warn;

events {{
    worker_connections 4096;
}}

http {{
    log_format upstream '$remote_addr [$time_iso8601] "$request" $status $body_bytes_sent '
                        'upstream=$upstream_addr upstream_status=$upstream_status '
                        'request_time=$request_time';
    access_log {cfg.logs}/nginx-access.log upstream;

    client_body_temp_path {nginx_dir}/tmp/client_body;
    proxy_temp_path {nginx_dir}/tmp/proxy;
    fastcgi_temp_path {nginx_dir}/tmp/fastcgi;
    uwsgi_temp_path {nginx_dir}/tmp/uwsgi;
    scgi_temp_path {nginx_dir}/tmp/scgi;
{limit.zone}

    upstream flowgate_api {{
        zone flowgate_api 64k;
        least_conn;  # parked requests are long: balance by what each replica holds
{upstreams}
        keepalive 64;
        keepalive_timeout {upstream_idle}s;
    }}

    server {{
        listen 127.0.0.1:{cfg.api_port} backlog=4096;
        client_max_body_size {body_limit};
        keepalive_timeout 75s;

        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $http_host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_set_header X-Request-Id $request_id;
        proxy_connect_timeout 2s;
        # A parked request reads nothing until its outcome:
        # above MAX_WAIT_MS ({settings.max_wait_ms} ms).
        proxy_read_timeout {timeout}s;
        proxy_send_timeout {timeout}s;
        # Another replica when one refuses, fails or times out. nginx resends only what is
        # safe to repeat: reads, and (below) the POSTs that are idempotent by their id.
        proxy_next_upstream error timeout;
        proxy_next_upstream_tries 2;

        location / {{
            proxy_pass http://flowgate_api;
        }}

        # A start is idempotent by its correlationId (a resent one joins the run the first
        # made) and a cancel harmless twice: resent when their replica dies mid-request,
        # its clients never see the death.
        location = /api/process/start {{
            proxy_pass http://flowgate_api;
            proxy_next_upstream error timeout non_idempotent;{limit.check}
        }}{limit.refusal}
        location /api/process/cancel/ {{
            proxy_pass http://flowgate_api;
            proxy_next_upstream error timeout non_idempotent;
        }}

        # Live progress: every event reaches the client as it is sent (the API also says
        # so with X-Accel-Buffering: no); its 15 s pings keep it under the read timeout.
        location /api/process/events/ {{
            proxy_pass http://flowgate_api;
            proxy_buffering off;
            proxy_cache off;
        }}
    }}
}}
"""


@dataclass(frozen=True)
class _StartLimit:
    """A first line against one credential's flood of starts, in front of the replicas.

    The replicas' limit (services/api/limits.py) is the exact one: per tenant, counted in
    Redis, the same on every replica. But each refusal still reaches a replica's event loop,
    where a flood of them delays every other tenant's requests (`make bench` section 13).
    nginx refuses a credential's (an API key's, a bearer token's) starts past the same rate
    before they get there, with a burst twice the replicas' so that it refuses only what they
    would refuse too, and answers as they do: the same 429, its three headers and body, and
    the request id nginx would have sent the replica.
    """

    starts_per_s: int

    @property
    def zone(self) -> str:
        if not self.starts_per_s:
            return ""
        return (
            "\n    # Starts per credential (TENANT_STARTS_PER_S), before they reach a replica;"
            "\n    # refusals logged at info only: a flood does not fill the error log."
            '\n    limit_req_zone "$http_x_api_key$http_authorization" zone=starts:10m'
            f" rate={self.starts_per_s}r/s;"
            "\n    limit_req_status 429;"
            "\n    limit_req_log_level info;"
        )

    @property
    def check(self) -> str:
        if not self.starts_per_s:
            return ""
        from flowgate.services.api.limits import start_burst

        burst = 2 * start_burst(self.starts_per_s)
        return (
            f"\n            limit_req zone=starts burst={burst} nodelay;"
            "\n            error_page 429 @starts_refused;"
        )

    @property
    def refusal(self) -> str:
        if not self.starts_per_s:
            return ""
        from flowgate.services.api.errors import limited_answer
        from flowgate.services.api.limits import Limited

        refused = Limited("starts", self.starts_per_s, window_s=1, retry_after_s=1)
        headers = "".join(
            f"\n            add_header {name} {_quoted(value)} always;"
            for name, value in refused.headers.items()
        )
        body = _quoted(bytes(limited_answer(refused).body).decode())
        return (
            "\n        # A start nginx refused (limit_req above): the replicas' own answer."
            "\n        location @starts_refused {"
            "\n            default_type application/json;"
            f"{headers}"
            "\n            add_header X-Request-Id $request_id always;"
            f"\n            return 429 {body};"
            "\n        }"
        )


def _quoted(value: str) -> str:
    """``value`` as one nginx string."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def write_nginx_conf(cfg: Config, *, starts_per_s: int | None = None) -> Path:
    """Write :func:`nginx_conf` (and its directories), checked by `nginx -t`."""
    binary = servers.require("nginx", "apt-get install nginx-light (or nginx)")
    nginx_dir = cfg.run_dir / "nginx"
    cfg.logs.mkdir(parents=True, exist_ok=True)
    for temp in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (nginx_dir / "tmp" / temp).mkdir(parents=True, exist_ok=True)
    conf = nginx_dir / "nginx.conf"
    conf.write_text(nginx_conf(cfg, starts_per_s=starts_per_s))
    check = subprocess.run(
        [binary, "-t", "-q", "-p", str(nginx_dir), "-c", str(conf),
         "-e", str(cfg.logs / "nginx-error.log")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if check.returncode != 0:
        raise ServerError(f"nginx rejects {conf}:\n{check.stderr}")
    return conf


def nginx_server(cfg: Config, *, starts_per_s: int | None = None) -> Server:
    """nginx on :func:`nginx_conf` (not started)."""
    binary = servers.require("nginx", "apt-get install nginx-light (or nginx)")
    conf = write_nginx_conf(cfg, starts_per_s=starts_per_s)
    argv = [
        binary,
        "-p",
        str(conf.parent),
        "-c",
        str(conf),
        "-e",
        str(cfg.logs / "nginx-error.log"),
    ]
    return Server("nginx", argv, _log(cfg, "nginx"), lambda: servers.port_open(cfg.api_port))


# --- state: what `up` started ------------------------------------------------------------


@dataclass
class Record:
    name: str
    pid: int
    start_time: int | None
    port: int
    log: str
    health_url: str | None = None

    def alive(self) -> bool:
        """Still the very process we started (pid alive and not recycled)."""
        started = servers.process_start_time(self.pid)
        return servers.pid_alive(self.pid) and started == self.start_time

    def ready(self) -> bool:
        if not self.alive():
            return False
        if self.health_url:
            return servers.http_ok(self.health_url)
        return servers.port_open(self.port)


@dataclass
class State:
    mode: str = "native"
    processes: dict[str, Record] = field(default_factory=dict)

    @classmethod
    def load(cls, run_dir: Path) -> State:
        path = run_dir / STATE_FILE
        if not path.exists():
            return cls()
        raw = json.loads(path.read_text())
        records = {name: Record(**rec) for name, rec in raw.get("processes", {}).items()}
        return cls(mode=raw.get("mode", "native"), processes=records)

    def save(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        body = {"mode": self.mode, "processes": {n: asdict(r) for n, r in self.processes.items()}}
        tmp.write_text(json.dumps(body, indent=2) + "\n")
        tmp.replace(path)


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    """One `up`/`down` at a time per run directory."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "stack.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _say(message: str) -> None:
    print(message, flush=True)  # noqa: T201 - a command-line tool


# --- up / down / ps / logs ----------------------------------------------------------------


def up(cfg: Config, names: Sequence[str] = ()) -> None:
    """Start what is not running yet, wait until all of it is ready, deploy bpmn/."""
    with _locked(cfg.run_dir):
        state = State.load(cfg.run_dir)
        wanted = _select(components(cfg), names)
        _check_ports(wanted, state)
        started: list[Record] = []
        try:
            for comp in wanted:
                record = _start(cfg, comp, state)
                if record is not None:
                    started.append(record)
                if comp.then:
                    comp.then()
        except BaseException:
            for record in reversed(started):  # leave nothing half-started behind
                servers.stop_pid(record.pid, 10)
                state.processes.pop(record.name, None)
            state.save(cfg.run_dir)
            raise
    if not names:
        _say(
            f"\nflowgate is up:\n  API (nginx)  {cfg.api_url}\n  engine REST  {cfg.engine_url}"
            f"\n  logs         {cfg.logs}\n  stop with    make down"
        )


def _select(items: list[Component], names: Sequence[str]) -> list[Component]:
    if not names:
        return items
    known = {c.name for c in items}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ServerError(f"unknown process {', '.join(unknown)}; the stack has {', '.join(known)}")
    return [c for c in items if c.name in names]


def _check_ports(wanted: list[Component], state: State) -> None:
    """Every port is free or held by our own recorded process; else say which variable to set."""
    ports: dict[int, str] = {}
    for comp in wanted:
        if comp.port in ports:
            other = ports[comp.port]
            raise ServerError(f"port {comp.port} is given to both {other} and {comp.name}")
        ports[comp.port] = comp.name
        record = state.processes.get(comp.name)
        if record and record.alive():
            continue
        if servers.port_open(comp.port):
            raise ServerError(
                f"port {comp.port} ({comp.name}) is already in use by another program;"
                f" stop it or set {comp.port_var} to a free port"
            )


def _start(cfg: Config, comp: Component, state: State) -> Record | None:
    """Start ``comp`` unless our recorded process is alive; wait until it is ready."""
    record = state.processes.get(comp.name)
    if record and record.alive():
        deadline = time.monotonic() + comp.start_timeout_s
        while not record.ready():
            if time.monotonic() > deadline or not record.alive():
                raise ServerError(
                    f"{comp.name} (pid {record.pid}) runs but is not ready; see {record.log}"
                )
            time.sleep(0.2)
        _say(f"  {comp.name:<10} already running (pid {record.pid}, port {comp.port})")
        return None
    server = comp.build()
    _say(f"  {comp.name:<10} starting on port {comp.port} ...")
    begun = time.monotonic()
    server.start(timeout_s=comp.start_timeout_s)
    record = Record(
        comp.name,
        server.pid,
        servers.process_start_time(server.pid),
        comp.port,
        str(server.log),
        comp.health_url,
    )
    state.processes[comp.name] = record
    state.save(cfg.run_dir)
    _say(f"  {comp.name:<10} ready in {time.monotonic() - begun:.1f} s (pid {server.pid})")
    return record


def deploy_bpmn(cfg: Config) -> None:
    """Deploy bpmn/*.bpmn to the engine (`flowgate-deploy`; duplicates are filtered)."""
    log = _log(cfg, "deploy")
    env = {**os.environ, **cfg.service_env()}
    with log.open("ab") as out:
        result = subprocess.run(
            [sys.executable, "-m", "flowgate.shared.deployment"],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if result.returncode != 0:
        raise ServerError(f"deploying bpmn/ failed; see {log}:\n{servers.tail(log)}")
    _say(f"  {'bpmn/':<10} deployed to {cfg.engine_url}")


def down(cfg: Config, names: Sequence[str] = ()) -> None:
    """Stop the recorded processes (all, or ``names``) in reverse start order."""
    with _locked(cfg.run_dir):
        state = State.load(cfg.run_dir)
        if not state.processes:
            _say("nothing to stop")
            return
        order = [c.name for c in components(cfg)]
        recorded = sorted(
            state.processes.values(), key=lambda r: order.index(r.name) if r.name in order else -1
        )
        timeouts = {c.name: c.stop_timeout_s for c in components(cfg)}
        for record in reversed(recorded):
            if names and record.name not in names:
                continue
            if record.alive():
                begun = time.monotonic()
                servers.stop_pid(record.pid, timeouts.get(record.name, 20.0))
                _say(
                    f"  {record.name:<10} stopped (pid {record.pid},"
                    f" {time.monotonic() - begun:.1f} s)"
                )
            else:
                _say(f"  {record.name:<10} was not running")
            del state.processes[record.name]
            state.save(cfg.run_dir)


def ps(cfg: Config) -> list[tuple[Record, str]]:
    state = State.load(cfg.run_dir)
    rows = [
        (r, "ready" if r.ready() else "alive" if r.alive() else "dead")
        for r in state.processes.values()
    ]
    if not rows:
        _say(f"nothing is running from {cfg.run_dir}")
    for record, status in rows:
        _say(
            f"{record.name:<10} pid {record.pid:<8} port {record.port:<6} {status:<6} {record.log}"
        )
    return rows


def logs(cfg: Config, names: Sequence[str], lines: int, follow: bool) -> None:
    files = sorted(cfg.logs.glob("*.log"))
    if names:
        files = [f for f in files if f.stem in names]
    if not files:
        _say(f"no logs in {cfg.logs}")
        return
    if follow:
        os.execvp("tail", ["tail", "-n", str(lines), "-F", *map(str, files)])
    for path in files:
        if path.stat().st_size:
            _say(f"==> {path} <==\n{servers.tail(path, lines)}\n")


# --- compose (where a Docker engine answers) -----------------------------------------------


def compose_files(mode: str) -> list[Path]:
    """The compose files of a stack brought up in ``mode``: ``compose``, or
    ``compose-cluster`` (REDIS_CLUSTER=true: a Redis Cluster in the place of the one Redis),
    both with the example processes (compose.example.yaml)."""
    cluster = [COMPOSE_FILE.with_name("redis-cluster.yaml")] if mode == "compose-cluster" else []
    return [COMPOSE_FILE, COMPOSE_FILE.with_name("compose.example.yaml"), *cluster]


def _compose(mode: str, *args: str) -> int:
    docker = servers.require("docker", "install the Docker CLI with the compose plugin")
    files = [arg for path in compose_files(mode) for arg in ("-f", str(path))]
    argv = [docker, "compose", "-p", COMPOSE_PROJECT, *files, *args]
    return subprocess.run(argv, check=False).returncode


def compose_refusal() -> str | None:
    """Why the compose stack cannot honour this environment's choices, or None."""
    if servers.ENGINE != "camunda":
        return (
            f"FLOWGATE_ENGINE={servers.ENGINE}: the compose stack runs the official Camunda "
            "image only; bring the native stack up instead (python -m deploy.local.stack "
            "--native up)"
        )
    return None


def compose_command(command: str, cfg: Config, args: argparse.Namespace, mode: str) -> int:
    """`up`/`down`/`ps`/`logs` with docker compose (deploy/compose/)."""
    if command == "up":
        if why := compose_refusal():
            raise ServerError(why)
        code = _compose(mode, "up", "-d", "--build", "--wait")
        if code == 0:
            State(mode=mode).save(cfg.run_dir)  # so `down` knows what to stop
            _say(
                f"\nflowgate is up (docker compose):\n  API (nginx)  {cfg.api_url}"
                f"\n  engine REST  {cfg.engine_url}\n  stop with    make down"
            )
        return code
    if command == "down":
        code = _compose(mode, "down")
        if code == 0:
            (cfg.run_dir / STATE_FILE).unlink(missing_ok=True)
        return code
    if command == "ps":
        return _compose(mode, "ps")
    follow = ["--follow"] if args.follow else []
    return _compose(mode, "logs", "--tail", str(args.lines), *follow, *args.names)


# --- command line --------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.local.stack",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--run-dir", type=Path, help="default: STACK_RUN_DIR or .run/")
    parser.add_argument(
        "--native", action="store_true", help="native processes even where a Docker engine answers"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("up", "down"):
        cmd = sub.add_parser(name)
        cmd.add_argument("names", nargs="*", help="only these processes (e.g. api-1)")
    sub.add_parser("ps")
    logs_cmd = sub.add_parser("logs")
    logs_cmd.add_argument("names", nargs="*")
    logs_cmd.add_argument("-n", "--lines", type=int, default=40)
    logs_cmd.add_argument("-f", "--follow", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = Config.from_env(args.run_dir)
        state = State.load(cfg.run_dir)
        use_compose = state.mode.startswith("compose") or (
            args.command == "up"
            and not args.native
            and not state.processes
            and COMPOSE_FILE.exists()
            and servers.docker_answers()
        )
        if use_compose:
            mode = state.mode if state.mode.startswith("compose") else (
                "compose-cluster" if cfg.redis_cluster_ports else "compose"
            )  # fmt: skip
            return compose_command(args.command, cfg, args, mode)
        if args.command == "up":
            up(cfg, args.names)
        elif args.command == "down":
            down(cfg, args.names)
        elif args.command == "ps":
            ps(cfg)
        else:
            logs(cfg, args.names, args.lines, args.follow)
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `stack logs | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
