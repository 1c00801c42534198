"""Start the real servers as native processes: Redis, PostgreSQL, the Camunda engine.
(One module past 400 lines: how each server is started, the same way, by tests, the stack
and the benchmarks.)

No Docker engine runs on the machines this project is built on, so the test suite
(`tests/conftest.py`) and the local stack (`deploy/local/stack.py`) start the same
Debian/Maven-built servers through this module. Standard library only.

A server that cannot start raises :class:`ServerError` saying what is missing; callers
let it fail the run (never a skip).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENGINE_DIR = ROOT / "deploy" / "camunda"
#: The engines deploy/camunda/pom.xml builds (one Maven profile each).
ENGINES = ("camunda", "operaton")
#: Which one the tests and the local stack run: ``FLOWGATE_ENGINE`` (default camunda).
ENGINE = os.environ.get("FLOWGATE_ENGINE", "camunda")


class ServerError(RuntimeError):
    """A server could not be started; the message says what is missing."""


#: Ports free_port() has handed out in this process: the kernel may offer a just-closed port
#: again, and two servers of one stack must never be given the same one.
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on, never the same one twice in this process."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


@dataclass
class Server:
    """One background process, its log file, and how to tell it is ready."""

    name: str
    argv: list[str]
    log: Path
    ready: Callable[[], bool]
    env: Mapping[str, str] = field(default_factory=dict)
    user: str | None = None  # run as this user (PostgreSQL refuses to run as root)
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> Server:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        argv = self.argv
        if self.user:
            argv = ["runuser", "-u", self.user, "--", *argv]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env},
                start_new_session=True,  # our Ctrl-C is not theirs; we stop them ourselves
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(
                    f"{self.name} exited with {self.proc.returncode} while starting;"
                    f" its log ({self.log}) ends with:\n{tail(self.log)}"
                )
            if self.ready():
                return self
            time.sleep(0.1)
        self.stop()
        raise ServerError(
            f"{self.name} was not ready after {timeout_s:.0f} s; log {self.log}:\n{tail(self.log)}"
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        stop_pid(self.proc.pid, timeout_s)
        self.proc.wait()


def stop_pid(pid: int, timeout_s: float = 20.0) -> None:
    """SIGTERM the process group, then SIGKILL it if it has not gone by the deadline."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return
            time.sleep(0.05)


def pid_alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); treat it as gone.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    return True


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def require(binary: str, hint: str) -> str:
    found = shutil.which(binary)
    if not found:
        raise ServerError(f"`{binary}` is not installed: {hint}")
    return found


# --- Redis -------------------------------------------------------------------------------


#: The Redis setting every Redis flowgate's deployments start carries (a test holds them equal).
HASH_MAX_LISTPACK_VALUE = "1024"


def redis_server(workdir: Path, port: int, *extra: str) -> Server:
    binary = require("redis-server", "apt-get install redis-server (or set REDIS_URL)")
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [
        binary,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(workdir),
        # Append-only with fsync every second: what we recommend in production too.
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--save", "",
        # A finished run's hash (its result included) stays a listpack: ~0.7 KB instead
        # of ~1.2 KB per retained run (README, "What flowgate needs from Redis").
        "--hash-max-listpack-value", HASH_MAX_LISTPACK_VALUE,
        "--daemonize", "no",
        *extra,
    ]  # fmt: skip
    return Server("redis", argv, workdir / "redis.log", lambda: _redis_ping(port))


@dataclass
class RedisCluster:
    """A native Redis Cluster: three masters, each with one replica, on free ports."""

    nodes: list[Server]
    ports: list[int]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


#: How long a master may be unreachable before its replica takes over (redis.conf
#: ``cluster-node-timeout``; Redis's default is 15 s, which would only slow the tests).
CLUSTER_NODE_TIMEOUT_MS = 2_000


def redis_cluster(workdir: Path, masters: int = 3, replicas: int = 1) -> RedisCluster:
    """Start ``masters * (1 + replicas)`` nodes on free ports and join them; returns once
    every slot is served."""
    ports = [free_port() for _ in range(masters * (1 + replicas))]
    nodes: list[Server] = []
    try:
        for port in ports:
            # The bus port defaults to port + 10000, which a free port may not allow.
            nodes.append(cluster_node(workdir / str(port), port, bus_port=free_port()).start())
        form_cluster(ports, replicas)
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return RedisCluster(nodes, ports)


def cluster_node(workdir: Path, port: int, bus_port: int | None = None) -> Server:
    """A Redis with ``--cluster-enabled yes``; its view of the cluster is kept in
    ``nodes.conf`` in ``workdir``, so a restarted node rejoins by itself."""
    options = [
        "--cluster-enabled", "yes",
        "--cluster-config-file", "nodes.conf",
        "--cluster-node-timeout", str(CLUSTER_NODE_TIMEOUT_MS),
    ]  # fmt: skip
    if bus_port is not None:
        options += ["--cluster-port", str(bus_port)]
    return redis_server(workdir, port, *options)


def form_cluster(ports: list[int], replicas: int = 1, timeout_s: float = 60) -> None:
    """Join the nodes on ``ports`` into one cluster (``redis-cli --cluster create``: the
    first ones become masters) unless they form it already; wait until every slot is
    served and every replica has synced with its master (until then it could not take
    over: it would have no data)."""
    cli = require("redis-cli", "apt-get install redis-tools (or set REDIS_URL)")
    never_formed = _cluster_info(ports[0]).get("cluster_known_nodes") == "1"
    if never_formed:
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
             "--cluster-replicas", str(replicas), "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while not all(cluster_ok(port) and _in_sync(port) for port in ports):
        if time.monotonic() > deadline:
            raise ServerError(f"the Redis Cluster on ports {ports} did not become ok")
        time.sleep(0.2)


def cluster_ok(port: int) -> bool:
    """The node on ``port`` sees a cluster that serves every slot."""
    info = _cluster_info(port)
    return info.get("cluster_state") == "ok" and info.get("cluster_slots_ok") == "16384"


def _in_sync(port: int) -> bool:
    """A master, or a replica whose link to its master is up (initial sync done)."""
    info = _info(port, "info", "replication")
    return info.get("role") == "master" or info.get("master_link_status") == "up"


def _cluster_info(port: int) -> dict[str, str]:
    return _info(port, "cluster", "info")


def _info(port: int, *command: str) -> dict[str, str]:
    cli = require("redis-cli", "apt-get install redis-tools (or set REDIS_URL)")
    try:
        out = subprocess.run(
            [cli, "-p", str(port), *command], capture_output=True, text=True, timeout=5
        ).stdout
    except subprocess.TimeoutExpired:
        return {}
    return dict(line.strip().split(":", 1) for line in out.splitlines() if ":" in line)


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


# --- PostgreSQL --------------------------------------------------------------------------


def _pg_bin(name: str) -> str:
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    found = candidates[0] if candidates else shutil.which(name)
    if not found:
        raise ServerError(
            f"`{name}` is not installed: apt-get install postgresql (or set DATABASE_URL)"
        )
    return found


def _pg_user() -> str | None:
    """PostgreSQL refuses to run as root; use the `postgres` system user then."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError as exc:
        raise ServerError(
            "running as root and there is no `postgres` user to run PostgreSQL"
        ) from exc
    return "postgres"


def postgres_server(workdir: Path, port: int, databases: tuple[str, ...] = ("flowgate",)) -> Server:
    """A throwaway cluster in ``workdir`` (created on first use), trusting local logins.

    The ``postgres`` superuser owns it; each name in ``databases`` gets a database and
    a login role with that name and password.
    """
    user = _pg_user()
    data = workdir / "data"
    if not (data / "PG_VERSION").exists():
        workdir.mkdir(parents=True, exist_ok=True)
        if user:
            _let_traverse(workdir, user)
        argv = [_pg_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                "--encoding=UTF8", "--no-sync"]  # fmt: skip
        if user:
            argv = ["runuser", "-u", user, "--", *argv]
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise ServerError(f"initdb failed:\n{result.stdout}\n{result.stderr}")
    argv = [
        _pg_bin("postgres"), "-D", str(data), "-p", str(port),
        "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={workdir}",
        "-c", "max_connections=300", "-c", "fsync=off", "-c", "synchronous_commit=off",
        "-c", "full_page_writes=off",
    ]  # fmt: skip
    server = Server(
        "postgres", argv, workdir / "postgres.log", lambda: _pg_ready(workdir, port), user=user
    )

    def ready() -> bool:
        if not _pg_ready(workdir, port):
            return False
        for name in databases:
            _psql(
                workdir,
                port,
                f"DO $$BEGIN CREATE ROLE {name} LOGIN PASSWORD '{name}';"
                " EXCEPTION WHEN duplicate_object THEN NULL; END$$;",
            )
            exists = _psql(workdir, port, f"SELECT 1 FROM pg_database WHERE datname='{name}'")
            if "1" not in exists:
                _psql(workdir, port, f"CREATE DATABASE {name} OWNER {name}")
        return True

    server.ready = ready
    return server


def _let_traverse(workdir: Path, user: str) -> None:
    """Give ``user`` the cluster directory and a way to reach it.

    Parents we own that others cannot enter (e.g. a 0700 temp dir) get o+x: enter,
    not list.
    """
    shutil.chown(workdir, user)
    for parent in workdir.resolve().parents:
        mode = parent.stat().st_mode
        if parent.stat().st_uid == os.geteuid() and not mode & 0o001:
            parent.chmod(mode | 0o001)


def _pg_ready(workdir: Path, port: int) -> bool:
    result = subprocess.run([_pg_bin("pg_isready"), "-h", str(workdir), "-p", str(port)],
                            capture_output=True, check=False)  # fmt: skip
    return result.returncode == 0


def _psql(workdir: Path, port: int, sql: str) -> str:
    argv = [_pg_bin("psql"), "-h", str(workdir), "-p", str(port), "-U", "postgres",
            "-d", "postgres", "-tAq", "-v", "ON_ERROR_STOP=1", "-c", sql]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ServerError(f"psql failed: {sql}\n{result.stderr}")
    return result.stdout


# --- the Camunda engine ------------------------------------------------------------------


def engine_jar(engine: str = ENGINE) -> Path:
    if engine not in ENGINES:
        raise ServerError(f"FLOWGATE_ENGINE={engine!r}: choose one of {', '.join(ENGINES)}")
    return ENGINE_DIR / "target" / engine / "engine.jar"


def build_engine(engine: str = ENGINE) -> Path:
    """Build the engine's jar with Maven unless it is newer than its sources."""
    jar = engine_jar(engine)
    sources = [ENGINE_DIR / "pom.xml", *ENGINE_DIR.joinpath("src").rglob("*")]
    newest = max(path.stat().st_mtime for path in sources if path.is_file())
    if jar.exists() and jar.stat().st_mtime >= newest:
        return jar
    mvn = require("mvn", "install Maven (apt-get install maven) to build the engine")
    argv = [mvn, "-q", "-B", "-f", str(ENGINE_DIR / "pom.xml"), "package", "-DskipTests",
            "-P", engine]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not jar.exists():
        raise ServerError(f"building {engine} failed:\n{result.stdout[-4000:]}\n{result.stderr}")
    jar.touch()
    return jar


def engine_server(
    workdir: Path,
    port: int,
    datasource: Mapping[str, str] | None = None,
    engine: str = ENGINE,
    *,
    events_redis: str | None = None,
    events_cluster: bool = False,
    access_log: bool = False,
    engine_settings: Mapping[str, object] | None = None,
) -> Server:
    """The engine on ``port``: in-memory H2 unless ``datasource`` gives SPRING_DATASOURCE_*.

    ``engine_settings`` override deploy/camunda's ``camunda.bpm`` (Operaton: ``operaton.bpm``)
    block, e.g. ``{"history-level": "audit"}``.

    With ``events_redis`` (a Redis URL; a node of a cluster with ``events_cluster``) its
    plugin pushes run events there (deploy/camunda ``RunEventsPlugin``). With
    ``access_log`` every REST call is a line ``METHOD PATH STATUS`` of
    ``workdir/access.log`` (what the benchmarks count the engine's calls by).
    """
    java = require("java", "install a Java 17+ runtime to run the engine")
    jar = build_engine(engine)
    argv = [java, "-Xms256m", "-Xmx1g", "-XX:+UseSerialGC",
            "-jar", str(jar)]  # fmt: skip
    env = {"ENGINE_PORT": str(port), **(datasource or {})}
    if engine_settings:
        block = dict(engine_settings)
        env["SPRING_APPLICATION_JSON"] = json.dumps(
            {"camunda": {"bpm": block}, "operaton": {"bpm": block}}
        )
    if events_redis:
        env |= {
            "FLOWGATE_EVENTS_REDIS_URL": events_redis,
            "FLOWGATE_EVENTS_CLUSTER": str(events_cluster).lower(),
        }
    if access_log:
        workdir.mkdir(parents=True, exist_ok=True)
        env |= {
            "SERVER_TOMCAT_BASEDIR": str(workdir / "tomcat"),
            "SERVER_TOMCAT_ACCESSLOG_ENABLED": "true",
            "SERVER_TOMCAT_ACCESSLOG_DIRECTORY": str(workdir),
            "SERVER_TOMCAT_ACCESSLOG_PREFIX": "access",
            "SERVER_TOMCAT_ACCESSLOG_SUFFIX": ".log",
            "SERVER_TOMCAT_ACCESSLOG_ROTATE": "false",
            "SERVER_TOMCAT_ACCESSLOG_BUFFERED": "false",
            "SERVER_TOMCAT_ACCESSLOG_PATTERN": "%m %U %s",
        }
    url = f"http://127.0.0.1:{port}/engine-rest/engine"
    return Server("engine", argv, workdir / "engine.log", lambda: http_ok(url), env=env)


# --- helpers for the local stack (deploy/local/stack.py) ---------------------------------


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None if it is gone.

    Together with the pid it identifies one process: a recycled pid has another start time.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) may hold spaces and parentheses.
    return int(stat.rsplit(")", 1)[1].split()[19])


def http_ok(url: str, timeout_s: float = 1.0) -> bool:
    """True when ``url`` answers 200 (loopback health checks)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def docker_answers() -> bool:
    """True when a Docker engine answers its ping (a `docker` client alone is not enough).

    ``FLOWGATE_NO_DOCKER=1`` says no regardless.
    """
    if os.environ.get("FLOWGATE_NO_DOCKER"):
        return False
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if host.startswith("tcp://"):
        try:
            url = f"http://{host.removeprefix('tcp://')}/_ping"
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.read().strip() == b"OK")
        except (urllib.error.URLError, OSError):
            return False
    if not host.startswith("unix://"):
        return False
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(2)
            sock.connect(host.removeprefix("unix://"))
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return sock.recv(4096).rstrip().endswith(b"OK")
    except OSError:
        return False
