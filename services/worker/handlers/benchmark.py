"""``benchmark``: one no-op task that finishes the run ``ok`` (the API's wait wakes up).

It measures the gateway itself (start, poll, complete, state, publish, event log), so it
does nothing else; ``data`` is the one field a client can check.
"""

from __future__ import annotations

from pydantic import BaseModel

from flowgate.handlers import Process, Step

process = Process(
    "benchmark",
    [Step("noop", success="Benchmark task done", error="Benchmark task failed", finishes_run=True)],
)


class NoopInput(BaseModel):
    """No inputs."""


@process.handler("noop")
async def noop(data: NoopInput) -> dict[str, object]:
    return {"noop": True}
