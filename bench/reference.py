"""The reference gateway (bench/node/gateway.mjs): the seed's design, as a Node team would
write it, run on the same engine as flowgate so every cost can stand beside its own.

One Node process: Fastify, an in-memory wait map, a process store written through to
PostgreSQL, camunda-external-task-client-js with its poll interval 0 serving the
``onboard-user`` topics (see the file's header).
"""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from dataclasses import dataclass
from typing import Any

import orjson

from bench.harness import Run, Stack
from deploy.local import servers
from deploy.local.servers import ROOT, Server

NODE_DIR = ROOT / "bench" / "node"
#: What bench/node/package.json needs installed.
PACKAGES = ("camunda-external-task-client-js", "fastify", "pg")


def node_missing() -> str | None:
    """None when bench/node can run; installs its packages (``npm ci``, from the lock) when
    they are missing."""
    if not shutil.which("node") or not shutil.which("npm"):
        return "node/npm is not installed"
    if not all((NODE_DIR / "node_modules" / name).is_dir() for name in PACKAGES):
        argv = ["npm", "ci", "--prefix", str(NODE_DIR), "--no-audit", "--no-fund"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
        if done.returncode != 0:
            return f"`npm ci --prefix bench/node` failed: {done.stderr.strip()[-300:]}"
    return None


@dataclass
class Reference:
    server: Server
    port: int

    @property
    def pid(self) -> int:
        return self.server.pid

    def handoffs_ms(self) -> list[float]:
        """The step hand-offs (task created -> fetched) since the last call, in ms."""
        url = f"http://127.0.0.1:{self.port}/bench/handoff"
        with urllib.request.urlopen(url, timeout=10) as response:
            found: list[Any] = orjson.loads(response.read())
        return [float(ms) for ms in found]


def start_reference(run: Run, stack: Stack, *, database_url: str) -> Reference:
    """The gateway on a free port, on the stack's engine, its tables in ``database_url``."""
    port = servers.free_port()
    env = {
        "PORT": str(port),
        "CAMUNDA_BASE_URL": stack.engine_url,
        "DATABASE_URL": database_url,
        "SYNC_TIMEOUT_MS": "60000",
    }
    ready = lambda: servers.port_open(port)  # noqa: E731
    server = run.spawn("reference", ["node", str(NODE_DIR / "gateway.mjs")], env=env, ready=ready)
    return Reference(server, port)
