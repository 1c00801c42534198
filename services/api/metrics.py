"""Prometheus metrics of one API replica, in a registry of its own (no process globals).

A registry per app keeps two apps in one process (the tests run two replicas side by side)
from colliding, and lets ``/metrics`` render exactly this replica's numbers.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.openmetrics import exposition as openmetrics
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flowgate.shared.build import register_build_info
from flowgate.shared.tracing import OFF, Tracing

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Completion written in Redis -> parked request resumed: pub/sub hop plus our dispatch.
_WAKE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        register_build_info(self.registry, "api")
        self.parked = Gauge(
            "flowgate_api_parked_requests",
            "Requests parked in this replica's wait room right now.",
            registry=self.registry,
        )
        self.waits = Counter(
            "flowgate_api_waits_total",
            "How parked requests ended: woken (completion message), settled (state was "
            "already final), timeout, drained (shutdown), full (max_parked reached).",
            ["how"],
            registry=self.registry,
        )
        self.wake_latency = Histogram(
            "flowgate_api_wake_latency_seconds",
            "From the completion's updatedAt to the parked request resuming.",
            buckets=_WAKE_BUCKETS,
            registry=self.registry,
        )
        self.outcomes = Counter(
            "flowgate_api_outcomes_total",
            "Answers by method, route template (`unmatched`: no route) and HTTP status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "flowgate_api_request_duration_seconds",
            "Time to answer, waits included, by method and route template.",
            ["method", "route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.engine_start_seconds = Histogram(
            "flowgate_api_engine_start_seconds",
            "Duration of the engine's start-process call.",
            registry=self.registry,
        )
        self.dependency_up = Gauge(
            "flowgate_api_dependency_up",
            "Whether each dependency answered at the last /readyz or scrape (redis, postgres, "
            "engine, subscription).",
            ["dependency"],
            registry=self.registry,
        )
        self.pubsub_subscriptions = Counter(
            "flowgate_api_pubsub_subscriptions_total",
            "Times the wait room had every run channel confirmed (more than one: resubscriptions).",
            registry=self.registry,
        )
        self.pubsub_messages = Counter(
            "flowgate_api_pubsub_messages_total",
            "Run-channel messages this replica received (every replica receives every run's).",
            registry=self.registry,
        )
        self.engine_ends = Counter(
            "flowgate_api_engine_ends_total",
            "Runs the watcher ended from the engine's history, by how the instance ended "
            "(completed, externally_terminated, internally_terminated, incident).",
            ["how"],
            registry=self.registry,
        )
        self.cancels = Counter(
            "flowgate_api_cancels_total",
            "Cancel requests by outcome: cancelled (by this request), already (cancelled "
            "before), finished (ended another way), unknown (no such run).",
            ["outcome"],
            registry=self.registry,
        )
        self.callbacks = Counter(
            "flowgate_api_callbacks_total",
            "Callback delivery attempts by result: delivered (2xx), failed (to be retried), "
            "given_up (out of attempts, or the target was refused).",
            ["result"],
            registry=self.registry,
        )
        self.callback_latency = Histogram(
            "flowgate_api_callback_latency_seconds",
            "From a run's end to its callback's delivery (2xx), retries included.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
            registry=self.registry,
        )
        self.streams = Gauge(
            "flowgate_api_event_streams",
            "Live-progress streams (Server-Sent Events) open on this replica.",
            registry=self.registry,
        )
        self.stream_events = Counter(
            "flowgate_api_stream_events_total",
            "Events sent on live-progress streams, by kind (step, end).",
            ["kind"],
            registry=self.registry,
        )
        self.watch_pass_seconds = Histogram(
            "flowgate_api_watch_pass_seconds",
            "Duration of one pass of the watcher over the engine's history (its queries and "
            "the runs it ends); none while no run waits.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.watching = Gauge(
            "flowgate_api_watching",
            "1 while this replica is the one that watches the engine's history.",
            registry=self.registry,
        )
        self.backlog_tasks = Gauge(
            "flowgate_topic_backlog_tasks",
            "External tasks of a topic that no worker has locked yet (retries left); exported "
            "by the one replica that samples the engine (services/background/backlog.py).",
            ["topic"],
            registry=self.registry,
        )
        self.oldest_task_age = Gauge(
            "flowgate_topic_oldest_task_age_seconds",
            "How long the oldest of a topic's waiting tasks has waited, when last sampled.",
            ["topic"],
            registry=self.registry,
        )
        self.runs_stalled = Counter(
            "flowgate_runs_stalled_total",
            "Runs that sat at a step past its declared flowgate:stallAfter (each once).",
            ["process", "activity"],
            registry=self.registry,
        )
        self.writebehind_backlog = Gauge(
            "flowgate_writebehind_backlog",
            "Write-behind stream entries not yet in Postgres (read at scrape time).",
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def exposition(self, accept: str) -> tuple[bytes, str]:
        """What a scrape gets, and its media type: OpenMetrics (with the latency
        histograms' trace-id exemplars) when the scraper accepts it, else the text format."""
        if "application/openmetrics-text" in accept:
            exposed: bytes = openmetrics.generate_latest(self.registry)  # type: ignore[no-untyped-call]
            return exposed, openmetrics.CONTENT_TYPE_LATEST
        return self.render(), CONTENT_TYPE


class OutcomeMiddleware:
    """Counts every answer by endpoint and status, and times it (pure ASGI: no buffering).

    The router writes the matched endpoint into the scope, so it is known once the app
    has run, and it carries its route template (services/api/endpoints.py); requests no
    route matched count as ``unmatched`` (method ``other``: a label per made-up method
    would let clients grow the series without bound).
    """

    def __init__(self, app: ASGIApp, metrics: ApiMetrics, tracing: Tracing = OFF) -> None:
        self.app = app
        self.metrics = metrics
        self.tracing = tracing
        # Labelled children by (method, route, status): looking them up costs more than
        # counting.
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # if the app fails before it answers, the server answers 500
        began = time.perf_counter()

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("endpoint"), "route", "unmatched")
            method = scope["method"] if route != "unmatched" else "other"
            if (children := self._children.get((method, route, status))) is None:
                children = self._children[method, route, status] = (
                    self.metrics.outcomes.labels(method, route, str(status)),
                    self.metrics.duration.labels(method, route),
                )
            outcome, duration = children
            outcome.inc()
            duration.observe(time.perf_counter() - began, exemplar=self.tracing.exemplar())
