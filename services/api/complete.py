"""Where a run is completed from outside: ``POST /api/process/complete`` (the seed's way).

The caller names the run and its outcome; the run ends with it through the transition
every end goes through (shared/store/runs.py ``finish``: the first end wins, whoever sends
it), with an audit row ``complete``. A completion of a run that ended already changes
nothing; one of a run no store knows is the caller's mistake (404).
"""

from __future__ import annotations

from typing import Any

from flowgate.services.api.runs import Runs
from flowgate.shared.eventlog import EventRecord
from flowgate.shared.state import Status
from flowgate.shared.store.runs import RunStore


async def complete(
    store: RunStore,
    runs: Runs,
    correlation_id: str,
    status: Status,
    *,
    data: Any = None,
    error: str | None = None,
) -> bool | None:
    """End the run with ``status``; whether this call ended it (None: no such run)."""
    state = await store.get(correlation_id)
    changed = state is not None and await store.finish(
        correlation_id,
        status,
        data=data,
        error=error,
        event=EventRecord.of_run(
            state,
            status=status.value,
            step_name="complete",
            http_method="POST",
            endpoint="/api/process/complete",
            result=data,
            error_message=error,
        ),
    )
    if not changed and await runs.get(correlation_id) is None:
        return None
    return changed
