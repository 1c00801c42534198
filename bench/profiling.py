"""Where the API's CPU goes under load: a py-spy sample of the running process.

``py-spy record --format raw`` writes collapsed stacks (``frame;frame;... count``); we keep
the leaf functions with the most samples (self time) and the share of samples per package
anywhere on the stack (inclusive), which is what the report quotes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from bench.harness import LOAD_CPU, pinned

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:)]*)(?::\d+)?\)$")
_PACKAGES = (
    "services", "shared", "starlette", "uvicorn", "httptools", "redis", "httpx", "httpcore",
    "anyio", "psycopg", "psycopg_pool", "orjson", "pydantic", "prometheus_client", "asyncio",
    "uvloop",
)  # fmt: skip


def _binary() -> str | None:
    """py-spy from this interpreter's environment (the venv), else from PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def available() -> str | None:
    return None if _binary() else "py-spy is not installed (dependency group bench)"


def start(pid: int, seconds: float) -> tuple[subprocess.Popen[bytes], Path]:
    out = Path(tempfile.mkstemp(prefix="pyspy-", suffix=".txt")[1])
    argv = [_binary() or "py-spy", "record", "--pid", str(pid),
            "--duration", str(max(1, round(seconds))), "--rate", "250", "--format", "raw",
            "--nonblocking", "--output", str(out)]  # fmt: skip
    proc = subprocess.Popen(
        pinned(argv, LOAD_CPU), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    return proc, out


def finish(proc: subprocess.Popen[bytes], out: Path, top: int = 15) -> dict[str, Any]:
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    try:
        text = out.read_text(errors="replace")
    finally:
        out.unlink(missing_ok=True)
    if proc.returncode != 0 or not text.strip():
        return {"error": f"py-spy exited {proc.returncode}: {err.decode(errors='replace')[-500:]}"}
    return summarize(text, top)


def _package(file: str) -> str:
    parts = Path(file).parts
    for name in _PACKAGES:
        if name in parts:
            return name
    return Path(file).name


def summarize(collapsed: str, top: int = 15) -> dict[str, Any]:
    leaves: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        leaves[_short(frames[-1])] += count
        for package in {_package(m["file"]) for f in frames if (m := _FRAME.match(f))}:
            packages[package] += count
    if not total:
        return {"samples": 0}

    def pct(n: int) -> float:
        return round(100 * n / total, 1)

    return {
        "samples": total,
        "self_top": [{"frame": frame, "pct": pct(n)} for frame, n in leaves.most_common(top)],
        "inclusive_by_package": {
            name: pct(n) for name, n in packages.most_common() if name in _PACKAGES
        },
    }


def _short(frame: str) -> str:
    match = _FRAME.match(frame)
    if not match:
        return frame
    file = match["file"]
    package = _package(file)
    where = f"{package}/{Path(file).name}" if package != Path(file).name else Path(file).name
    return f"{match['func']} ({where})"
