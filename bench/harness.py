"""What every benchmark needs: the servers, our processes, CPU pinning, and statistics.

:class:`Run` owns every process a benchmark run starts (Redis, two PostgreSQL clusters, the
Camunda engine, API replicas, workers, stand-ins, load generators) and stops all of them on
the way out, Ctrl-C and SIGTERM included. Servers come from deploy/local/servers.py, on free
loopback ports, in a fresh temporary directory.

Measurement method (docs/benchmarks.md): the process under test is pinned to CPU 0 and the
load generator to CPU 1 (``taskset``); Redis, PostgreSQL and the engine float.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import quote

from deploy.local import servers
from deploy.local.servers import ROOT, Server

#: The core the process under test runs on, and the load generator's.
SERVER_CPU, LOAD_CPU = 0, 1


# --- statistics ----------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of an already sorted sequence."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summary(values: Sequence[float], digits: int = 3) -> dict[str, float | int]:
    """n, median, p90, p99, min, max, mean of ``values`` (rounded)."""
    ordered = sorted(values)
    if not ordered:
        return {"n": 0}
    return {
        "n": len(ordered),
        "median": round(statistics.median(ordered), digits),
        "p90": round(percentile(ordered, 90), digits),
        "p99": round(percentile(ordered, 99), digits),
        "min": round(ordered[0], digits),
        "max": round(ordered[-1], digits),
        "mean": round(statistics.fmean(ordered), digits),
    }


# --- processes -----------------------------------------------------------------------------


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def pinned(argv: Sequence[str], cpu: int | None) -> list[str]:
    """``argv`` run on one core (``taskset``), or on any core with ``cpu=None``.

    "Any core" must be said explicitly: this process pins itself to the load core, and a
    child inherits its parent's affinity.
    """
    if (argv and argv[0] == "taskset") or not shutil.which("taskset"):
        return list(argv)
    if cpu is None or cpu_count() < 2:
        return ["taskset", "-c", f"0-{(os.cpu_count() or 1) - 1}", *argv]
    return ["taskset", "-c", str(cpu), *argv]


def pin_self(cpu: int) -> None:
    """Pin this process (the load generator) to ``cpu``; threads started later inherit it."""
    if cpu_count() >= 2:
        os.sched_setaffinity(0, {cpu})


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft open-files limit to the hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1_048_576
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def rss_kb(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (``VmRSS``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time ``pid`` has used so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


class CpuMeter:
    """CPU time of some processes over a window: ``with meter: ...`` then ``meter.share()``."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self._pids = dict(pids)
        self._start: dict[str, float] = {}
        self._t0 = 0.0
        self.elapsed_s = 0.0
        self.used: dict[str, float] = {}

    def __enter__(self) -> CpuMeter:
        self._t0 = time.monotonic()
        self._start = {name: cpu_seconds(pid) for name, pid in self._pids.items()}
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed_s = time.monotonic() - self._t0
        self.used = {name: cpu_seconds(pid) - self._start[name] for name, pid in self._pids.items()}

    def share(self) -> dict[str, float]:
        """Cores used by each process during the window (1.0 = one core saturated)."""
        if not self.elapsed_s:
            return {}
        return {name: round(used / self.elapsed_s, 2) for name, used in self.used.items()}


# --- the run -------------------------------------------------------------------------------


@dataclass
class Stack:
    """Where the shared servers listen."""

    redis_url: str
    database_url: str  # flowgate's own database (write-behind), in its own cluster
    engine_url: str  # …/engine-rest; the engine keeps its data in a second cluster
    redis: Server
    postgres: Server
    extra: dict[str, Server] = field(default_factory=dict)
    #: ``redis_url`` names a node of a Redis Cluster (see :meth:`Run.start_redis_cluster`).
    redis_cluster: bool = False
    #: The engine's own database (as its superuser) and its REST calls' log, once it runs.
    engine_database_url: str = ""
    engine_calls: Path | None = None

    def schema_url(self, schema: str) -> str:
        """``database_url`` with ``schema`` first on the search path (created by the caller)."""
        separator = "&" if "?" in self.database_url else "?"
        return f"{self.database_url}{separator}options={quote(f'-csearch_path={schema}')}"


class Run:
    """Owns every process of one benchmark run; ``with Run(...) as run:`` stops them all."""

    def __init__(self, workdir: Path | None = None, *, keep: bool = False) -> None:
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="flowgate-bench-"))
        self.logs = self.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self._keep = keep
        self._procs: list[Server] = []
        self._shared: set[int] = set()  # ids of the stack's servers: they outlive scopes
        self._old_signals: dict[int, Any] = {}
        self.stack: Stack | None = None

    # context management ------------------------------------------------------------------

    def __enter__(self) -> Run:
        # Both raise KeyboardInterrupt, so every `finally` runs and every process stops
        # (SIGINT too: a shell may have started us with it ignored).
        self._old_signals = {
            sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
        for sig, handler in self._old_signals.items():
            signal.signal(sig, handler)
        if not self._keep and not any(exc):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def stop_all(self) -> None:
        while self._procs:
            proc = self._procs.pop()
            with contextlib.suppress(Exception):
                proc.stop(timeout_s=10)

    # processes -----------------------------------------------------------------------------

    def start(self, server: Server, timeout_s: float = 60.0) -> Server:
        """Start ``server`` and stop it with the run (or earlier with :meth:`stop`).

        Unless its argv pins it already, it may run on any core (see :func:`pinned`).
        """
        server.argv = pinned(server.argv, None)
        self._procs.append(server)
        try:
            server.start(timeout_s=timeout_s)
        except BaseException:
            self.stop(server)
            raise
        return server

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """Stops every process started inside (one benchmark's API, workers, stand-ins)."""
        before = {id(proc) for proc in self._procs}
        try:
            yield
        finally:
            for proc in list(reversed(self._procs)):
                if id(proc) not in before and id(proc) not in self._shared:
                    with contextlib.suppress(Exception):
                        self.stop(proc)

    def share(self, server: Server) -> Server:
        """Mark ``server`` as part of the stack (not stopped by :meth:`scope`)."""
        self._shared.add(id(server))
        return server

    def stop(self, server: Server) -> None:
        with contextlib.suppress(ValueError):
            self._procs.remove(server)
        server.stop(timeout_s=15)

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cpu: int | None = None,
        ready: Any = None,
        timeout_s: float = 60.0,
    ) -> Server:
        """Run ``argv`` (pinned to ``cpu``) until the run ends; ``ready()`` says it is up."""
        log = self.logs / f"{name}-{uuid.uuid4().hex[:6]}.log"
        server = Server(
            name,
            pinned(argv, cpu),
            log,
            ready or (lambda: True),
            env={"PYTHONPATH": str(ROOT), **(env or {})},
        )
        return self.start(server, timeout_s=timeout_s)

    def python(
        self,
        name: str,
        module: str,
        *args: str,
        env: Mapping[str, str] | None = None,
        cpu: int | None = None,
        ready: Any = None,
        timeout_s: float = 60.0,
    ) -> Server:
        """``python -m module args`` with this interpreter (the project venv under make)."""
        argv = [sys.executable, "-m", module, *args]
        return self.spawn(name, argv, env=env, cpu=cpu, ready=ready, timeout_s=timeout_s)

    # the shared servers ----------------------------------------------------------------------

    def start_stack(self, *, engine: bool) -> Stack:
        """Redis, flowgate's PostgreSQL, and (when asked) the engine on its own PostgreSQL."""
        data = self.workdir / "data"
        redis_port = servers.free_port()
        redis = self.share(servers.redis_server(data / "redis", redis_port))
        self.start(redis)
        pg_port = servers.free_port()
        pg = servers.postgres_server(data / "postgres", pg_port, databases=("flowgate",))
        # Commit timestamps give every row's write time for the write-behind lag.
        pg.argv += ["-c", "track_commit_timestamp=on", "-c", "max_connections=400"]
        self.start(self.share(pg))
        self.stack = Stack(
            redis_url=f"redis://127.0.0.1:{redis_port}/0",
            database_url=f"postgresql://flowgate:flowgate@127.0.0.1:{pg_port}/flowgate",
            engine_url="",
            redis=redis,
            postgres=pg,
        )
        if engine:
            self.stack.engine_url = self.start_engine(data)
        return self.stack

    def start_redis_cluster(self, masters: int = 3) -> tuple[str, list[Server]]:
        """A native Redis Cluster (``masters`` masters, a replica each) for the rest of the
        run: its URL and its nodes."""
        ports = [servers.free_port() for _ in range(masters * 2)]
        nodes = [
            self.start(self.share(servers.cluster_node(
                self.workdir / "data" / f"redis-cluster-{port}", port, bus_port=servers.free_port()
            )))
            for port in ports
        ]  # fmt: skip
        servers.form_cluster(ports)
        return f"redis://127.0.0.1:{ports[0]}/0", nodes

    def start_engine(self, data: Path) -> str:
        """The engine on its own PostgreSQL, both observed: the engine logs every REST call
        (``engine_calls``), the cluster counts every statement (pg_stat_statements)."""
        port = servers.free_port()
        engine_pg = servers.postgres_server(data / "engine-postgres", port, databases=("camunda",))
        engine_pg.argv += ["-c", "shared_preload_libraries=pg_stat_statements"]
        self.start(self.share(engine_pg))
        engine_port = servers.free_port()
        engine = servers.engine_server(
            data / "engine",
            engine_port,
            datasource={
                "SPRING_DATASOURCE_URL": f"jdbc:postgresql://127.0.0.1:{port}/camunda",
                "SPRING_DATASOURCE_USERNAME": "camunda",
                "SPRING_DATASOURCE_PASSWORD": "camunda",
            },
            events_redis=self.stack.redis_url if self.stack else None,
            access_log=True,
        )
        self.start(self.share(engine), timeout_s=180)
        assert self.stack is not None
        self.stack.extra.update({"engine-postgres": engine_pg, "engine": engine})
        self.stack.engine_database_url = f"postgresql://postgres@127.0.0.1:{port}/camunda"
        self.stack.engine_calls = data / "engine" / "access.log"
        return f"http://127.0.0.1:{engine_port}/engine-rest"

    def log_tail(self, server: Server, lines: int = 30) -> str:
        return servers.tail(server.log, lines)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
