"""What the figures were measured on: machine, load, versions, the repository's commit."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.harness import cpu_count
from deploy.local.servers import ROOT

PACKAGES = (
    "starlette",
    "uvicorn",
    "uvloop",
    "httptools",
    "redis",
    "hiredis",
    "httpx",
    "psycopg",
    "orjson",
    "camunda-external-task-client-python3",
    "matplotlib",
)


def _run(*argv: str) -> str:
    if not shutil.which(argv[0]):
        return "not installed"
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else ""


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mem_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 1024 / 1024, 1)
    return 0.0


def _package(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _node_client() -> str:
    lock = ROOT / "bench" / "node" / "node_modules" / "camunda-external-task-client-js"
    try:
        return str(json.loads((lock / "package.json").read_text())["version"])
    except OSError:
        return "not installed"


def _pg_version() -> str:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), reverse=True):
        return _run(str(candidate), "--version")
    return _run("postgres", "--version")


def describe(*, fd_limit: tuple[int, int], profile: str) -> dict[str, Any]:
    commit = _run("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD")
    dirty = _run("git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no")
    return {
        "profile": profile,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": commit + (" (uncommitted changes)" if dirty else ""),
        "machine": {
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "cores_usable": cpu_count(),
            "memory_gib": _mem_gib(),
            "kernel": platform.release(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "fd_limit": {"soft": fd_limit[0], "hard": fd_limit[1]},
        },
        "versions": {
            "python": platform.python_version(),
            **{name: _package(name) for name in PACKAGES},
            "camunda-external-task-client-js": _node_client(),
            "node": _run("node", "--version"),
            "java": _run("java", "-version"),
            "redis-server": _run("redis-server", "--version"),
            "postgres": _pg_version(),
            "wrk": _run("wrk", "--version").split(" Copyright")[0],
        },
    }
