"""HTTP load with wrk (pinned to the load core), scripted in Lua, results as JSON.

Each script is the common part below (statuses counted per thread, a JSON summary line in
``done``) plus a ``request()`` for one kind of load:

* ``start``:  POST /api/process/start of ``benchmark`` with a unique correlationId per
  request (``<tag>-<thread>-<n>``), ``Prefer: wait=30``: a start and a wake per request;
* ``status``: GET /api/process/status/<id> round-robin over ids a start run created;
* ``plain``:  GET /healthz, the cheapest route: the HTTP stack's own ceiling on this core.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import LOAD_CPU, pinned

_COMMON = r"""
local threads = {}
function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end
function done(summary, latency, requests)
  local agg = {}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("statuses")) do agg[tostring(k)] = (agg[tostring(k)] or 0) + v end
  end
  local parts = {}
  for k, v in pairs(agg) do table.insert(parts, string.format('"%s":%d', k, v)) end
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"errors":{"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d},"latency_us":{"p50":%d,"p90":%d,"p99":%d,' ..
    '"max":%d,"mean":%.1f},"statuses":{%s}}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean, table.concat(parts, ",")))
end
"""

_START = r"""
function init(args)
  statuses = {}
  prefix = args[1] .. "-" .. id .. "-"
  wait = args[2]
  counter = 0
end
function request()
  counter = counter + 1
  local body = '{"processKey":"benchmark","correlationId":"' .. prefix .. counter .. '"}'
  return wrk.format("POST", "/api/process/start",
    {["Content-Type"] = "application/json", ["Prefer"] = "wait=" .. wait}, body)
end
"""

_STATUS = r"""
function init(args)
  statuses = {}
  prefix = args[1] .. "-0-"
  count = tonumber(args[2])
  counter = id * 7919
end
function request()
  counter = counter + 1
  -- From id 2: wrk checks a script by calling its request() once, unsent, before the load
  -- (script_verify_request), so the start run's first id never started a run.
  return wrk.format("GET", "/api/process/status/" .. prefix .. (counter % count + 2))
end
"""

_PLAIN = r"""
function init(args)
  statuses = {}
end
function request()
  return wrk.format("GET", "/healthz")
end
"""

SCRIPTS = {"start": _START, "status": _STATUS, "plain": _PLAIN}


@dataclass
class WrkResult:
    kind: str
    connections: int
    requests: int
    duration_s: float
    errors: dict[str, int]
    latency_ms: dict[str, float]
    statuses: dict[str, int]

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    def ok(self, status: str = "200") -> int:
        return self.statuses.get(status, 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "connections": self.connections,
            "requests": self.requests,
            "duration_s": round(self.duration_s, 3),
            "requests_per_s": round(self.rps, 1),
            "latency_ms": self.latency_ms,
            "statuses": self.statuses,
            "errors": self.errors,
        }


def available() -> str | None:
    return None if shutil.which("wrk") else "wrk is not installed (apt-get install wrk)"


def start(
    kind: str, url: str, *, seconds: float, connections: int, args: tuple[str, ...] = ()
) -> subprocess.Popen[str]:
    """Start wrk in the background (see :func:`finish`); one thread, on the load core."""
    script = Path(tempfile.mkstemp(prefix=f"wrk-{kind}-", suffix=".lua")[1])
    script.write_text(_COMMON + SCRIPTS[kind])
    argv = [
        "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "30s",
        "-s", str(script), url, "--", *args,
    ]  # fmt: skip
    proc = subprocess.Popen(
        pinned(argv, LOAD_CPU), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    proc.script = script  # type: ignore[attr-defined]
    return proc


def finish(kind: str, proc: subprocess.Popen[str], connections: int) -> WrkResult:
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.script.unlink(missing_ok=True)  # type: ignore[attr-defined]
    line = next((ln for ln in out.splitlines() if ln.startswith("BENCHJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk {kind} gave no result (exit {proc.returncode}):\n{out}\n{err}")
    raw = json.loads(line.removeprefix("BENCHJSON "))
    return WrkResult(
        kind=kind,
        connections=connections,
        requests=raw["requests"],
        duration_s=raw["duration_us"] / 1e6,
        errors=raw["errors"],
        latency_ms={k: round(v / 1000, 3) for k, v in raw["latency_us"].items()},
        statuses=raw["statuses"],
    )


def run(
    kind: str, url: str, *, seconds: float, connections: int, args: tuple[str, ...] = ()
) -> WrkResult:
    proc = start(kind, url, seconds=seconds, connections=connections, args=args)
    return finish(kind, proc, connections)
