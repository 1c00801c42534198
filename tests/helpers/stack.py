"""The whole local stack (`make up`) as a test drives it: commands, processes, logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from deploy.local import servers

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Stack:
    run_dir: Path
    env: dict[str, str]
    api_url: str
    engine_url: str
    replica_ports: list[int]

    def command(self, *args: str, timeout_s: float = 420) -> str:
        argv = [sys.executable, "-m", "deploy.local.stack", "--native",
                "--run-dir", str(self.run_dir), *args]  # fmt: skip
        result = subprocess.run(argv, env=self.env, cwd=ROOT, capture_output=True, text=True,
                                timeout=timeout_s, check=False)  # fmt: skip
        if result.returncode != 0:
            raise servers.ServerError(
                f"stack {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}\n{self.logs()}"
            )
        return result.stdout

    def pid(self, name: str) -> int:
        state = json.loads((self.run_dir / "stack.json").read_text())
        return int(state["processes"][name]["pid"])

    def signal(self, name: str, sig: signal.Signals) -> int:
        """Send ``sig`` to the process (group) of ``name``; return its pid."""
        pid = self.pid(name)
        os.killpg(pid, sig)
        return pid

    def replica_url(self, name: str) -> str:
        index = int(name.removeprefix("api-")) - 1
        return f"http://127.0.0.1:{self.replica_ports[index]}"

    def ensure_up(self) -> None:
        """Bring back whatever a test stopped or killed (a no-op when all is running)."""
        self.command("up")

    def access_log(self) -> list[str]:
        path = self.run_dir / "logs" / "nginx-access.log"
        return path.read_text().splitlines() if path.exists() else []

    def logs(self, lines: int = 30) -> str:
        return "\n".join(
            f"--- {path.name}\n{servers.tail(path, lines)}"
            for path in sorted((self.run_dir / "logs").glob("*.log"))
        )


def wait_until(predicate: object, timeout_s: float, what: str) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def engine_instances(stack: Stack, prefix: str) -> int:
    """Running engine instances whose businessKey (= correlationId) starts with ``prefix``."""
    response = httpx.get(f"{stack.engine_url}/process-instance/count",
                         params={"businessKeyLike": f"{prefix}%"}, timeout=10)  # fmt: skip
    response.raise_for_status()
    return int(response.json()["count"])
