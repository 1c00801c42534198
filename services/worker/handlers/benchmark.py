"""``benchmark``: one no-op task that finishes the run ``ok`` (the API's wait wakes up).

It measures the gateway itself (start, poll, complete, state, publish, event log), so it
does nothing else; ``data`` is the one field a client can check.
"""

from __future__ import annotations

from pydantic import BaseModel

from services.worker.context import TaskContext
from services.worker.registry import Process, Step
from shared.store import Status

process = Process(
    "benchmark",
    [Step("noop", success="Benchmark task done", error="Benchmark task failed")],
)


class NoopInput(BaseModel):
    """No inputs: the correlationId comes from the task (ctx)."""


@process.handler("noop")
async def noop(data: NoopInput, ctx: TaskContext) -> dict[str, object]:
    if ctx.correlation_id:
        await ctx.store.complete(ctx.correlation_id, Status.OK, data={"noop": True})
    return {}
