"""Prometheus metrics of one worker process, in its own registry (no module globals).

Names start with ``flowgate_worker_``. Outcomes of ``tasks_total`` (see
:class:`flowgate.services.worker.executor.Outcome`): ``completed``, ``bpmn_error``, ``failed`` (a
retry is scheduled), ``incident`` (retries exhausted), ``gone`` (the engine no longer has
the task), ``lock_lost`` (another worker holds it), ``abandoned`` (unlocked at shutdown).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from flowgate.shared.build import register_build_info

_HANDLER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_FETCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# A task waiting for a worker: a few ms while workers keep up (a bucket per ms there, so a
# median of 4 ms can be told from one of 6), seconds once they do not.
_HANDOFF_BUCKETS = (
    *(ms / 1000 for ms in range(1, 11)),
    0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30, 120,
)  # fmt: skip


@dataclass(slots=True)
class WorkerMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    tasks: Counter = field(init=False)
    handler_seconds: Histogram = field(init=False)
    fetch_seconds: Histogram = field(init=False)
    handoff_seconds: Histogram = field(init=False)
    fetched: Counter = field(init=False)
    empty_polls: Counter = field(init=False)
    fetch_errors: Counter = field(init=False)
    lock_extensions: Counter = field(init=False)
    lock_lost: Counter = field(init=False)
    retries: Counter = field(init=False)
    handler_timeouts: Counter = field(init=False)
    engine_call_retries: Counter = field(init=False)
    record_retries: Counter = field(init=False)
    in_flight: Gauge = field(init=False)
    slots: Gauge = field(init=False)
    redis_up: Gauge = field(init=False)

    def __post_init__(self) -> None:
        r = self.registry
        p = "flowgate_worker"
        register_build_info(r, "worker")
        self.tasks = Counter(
            f"{p}_tasks", "Tasks finished, by topic and outcome", ["topic", "outcome"], registry=r
        )
        self.handler_seconds = Histogram(
            f"{p}_handler_seconds", "Handler run time", ["topic"], buckets=_HANDLER_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.fetch_seconds = Histogram(
            f"{p}_fetch_seconds", "fetchAndLock latency (long polls included)",
            buckets=_FETCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.handoff_seconds = Histogram(
            f"{p}_handoff_seconds",
            "From a task's creation in the engine to its fetch by this worker",
            buckets=_HANDOFF_BUCKETS,
            registry=r,
        )
        self.fetched = Counter(f"{p}_fetched_tasks", "Tasks locked by fetchAndLock", registry=r)
        self.empty_polls = Counter(f"{p}_empty_polls", "Long polls that ended empty", registry=r)
        self.fetch_errors = Counter(f"{p}_fetch_errors", "fetchAndLock failures", registry=r)
        self.lock_extensions = Counter(
            f"{p}_lock_extensions", "Locks extended", ["topic"], registry=r
        )
        self.lock_lost = Counter(
            f"{p}_lock_lost", "Locks lost (extension refused or result rejected)", ["topic"],
            registry=r,
        )  # fmt: skip
        self.retries = Counter(
            f"{p}_retries", "Failures reported with retries left", ["topic"], registry=r
        )
        self.handler_timeouts = Counter(
            f"{p}_handler_timeouts", "Handlers stopped at their step's timeout", ["topic"],
            registry=r,
        )  # fmt: skip
        self.engine_call_retries = Counter(
            f"{p}_engine_call_retries",
            "complete/failure/bpmnError calls repeated (optimistic locking, deadlock, network)",
            ["call"],
            registry=r,
        )
        self.record_retries = Counter(
            f"{p}_record_retries",
            "Writes of a run's end or an audit row repeated while Redis was unreachable",
            registry=r,
        )
        self.in_flight = Gauge(f"{p}_tasks_in_flight", "Handlers running now", registry=r)
        self.slots = Gauge(
            f"{p}_slots", "Handlers this worker runs at once (WORKER_CONCURRENCY)", registry=r
        )
        self.redis_up = Gauge(
            f"{p}_redis_up", "1 while Redis answers (no new work is fetched otherwise)", registry=r
        )
        self.redis_up.set(1)

    def render(self) -> bytes:
        """The text exposition format for ``/metrics``."""
        return generate_latest(self.registry)

    def count(self, topic: str, outcome: str) -> float:
        """Tasks of ``topic`` that ended with ``outcome`` (for tests and health details)."""
        value = self.registry.get_sample_value(
            "flowgate_worker_tasks_total", {"topic": topic, "outcome": outcome}
        )
        return value or 0.0
