"""Pace: how long a process's runs take, for the ``Retry-After`` of a 202.

A client told to come back in two seconds polls a run that takes forty twenty times for
nothing; one told forty comes back once. So the advice is a prediction: the median time the
process's recent runs took from start to end, less what this run has already taken (past
the median, the 90th percentile's; past that, the configured ``RETRY_AFTER_S``). The
durations are those of the runs this replica saw end (its starts, waits and status reads:
each run once, when it first reads it ended), the last ``WINDOW`` per process; until a
process has ``MIN_SAMPLES`` of them, it is told ``RETRY_AFTER_S``. Nothing is shared
between replicas: each learns from the runs it serves, which behind a load balancer are
a fair sample of all of them.
"""

from __future__ import annotations

import math
import statistics
from collections import OrderedDict, deque
from datetime import UTC, datetime

from flowgate.shared.state import RunState, Status

#: Durations kept per process, and processes kept (least recently ended first out).
WINDOW = 64
MAX_PROCESSES = 1_000
MIN_SAMPLES = 5
#: The longest advice: a client should still look now and then.
MAX_RETRY_AFTER_S = 300


class Pace:
    def __init__(self, *, default_s: int) -> None:
        self._default_s = default_s
        self._durations: OrderedDict[str, deque[float]] = OrderedDict()

    def ended(self, state: RunState) -> None:
        """Learn from a run seen to end (a cancelled run says nothing about the process)."""
        if state.status not in (Status.OK, Status.ERROR):
            return
        took = (state.updated_at - state.started_at).total_seconds()
        durations = self._durations.get(state.process_key)
        if durations is None:
            durations = self._durations[state.process_key] = deque(maxlen=WINDOW)
            if len(self._durations) > MAX_PROCESSES:
                self._durations.popitem(last=False)
        self._durations.move_to_end(state.process_key)
        durations.append(max(took, 0.0))

    def retry_after_s(self, state: RunState, *, now: datetime | None = None) -> int:
        """Whole seconds until ``state``'s run is likely to have ended (at least 1)."""
        durations = self._durations.get(state.process_key)
        if durations is None or len(durations) < MIN_SAMPLES:
            return self._default_s
        elapsed = ((now or datetime.now(UTC)) - state.started_at).total_seconds()
        median = statistics.median(durations)
        p90 = statistics.quantiles(durations, n=10)[-1]
        for typical in (median, p90):
            if (remaining := typical - elapsed) > 0:
                return min(max(math.ceil(remaining), 1), MAX_RETRY_AFTER_S)
        return self._default_s
