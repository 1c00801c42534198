"""One trace per run: the caller's ``traceparent`` continues through two API replicas, the
engine instance (its ``traceparent`` variable), a worker's handler and the callback, with
spans exported by the real OTLP/HTTP exporter to a collector on a loopback port."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

from flowgate.handlers import Process, Step
from flowgate.services.worker.handlers.benchmark import NoopInput
from flowgate.services.worker.registry import Registry
from flowgate.shared.camunda import CamundaClient
from flowgate.shared.settings import Settings
from flowgate.shared.tracing import Tracing
from tests.helpers.api import BENCHMARK, Api, cid, running_app, start_body
from tests.helpers.engine import deploy_bpmn
from tests.helpers.net import CallbackReceiver
from tests.helpers.otlp import Collector, otlp_collector
from tests.helpers.waiting import until
from tests.helpers.worker import running_worker

MakeSettings = Callable[..., Settings]
pytestmark = pytest.mark.engine_agnostic  # the trace is flowgate's; the engine carries a variable

#: bpmn/benchmark.bpmn, its one step slow enough that every wait here parks and is woken.
slow = Process("benchmark", [Step("noop", success="done", error="failed", finishes_run=True)])


@slow.handler("noop")
async def noop(data: NoopInput) -> dict[str, object]:
    await asyncio.sleep(0.3)
    return {"noop": True}


@dataclass
class Traced:
    a: Api
    b: Api
    collector: Collector
    receiver: CallbackReceiver
    engine_url: str
    tracings: list[Tracing]

    async def flush(self) -> None:
        """Export what is buffered (off the loop: the collector answers on it)."""
        for tracing in self.tracings:
            assert tracing.provider is not None
            await asyncio.to_thread(tracing.provider.force_flush)


def tracing(collector: Collector, service: str) -> Tracing:
    return Tracing.exporting(
        OTLPSpanExporter(endpoint=f"{collector.url}/v1/traces"), service=service
    )


@pytest.fixture
async def traced(make_settings: MakeSettings, engine_url: str) -> AsyncIterator[Traced]:
    await deploy_bpmn(engine_url)
    settings = make_settings(
        camunda_base_url=engine_url, callback_allowed_hosts="127.0.0.1", sync_timeout_ms=10_000
    )
    async with otlp_collector() as collector, CallbackReceiver([200]) as receiver:
        tracings = [tracing(collector, name) for name in ("api-a", "api-b", "flowgate-worker")]
        async with (
            running_app(settings, tracing=tracings[0]) as a,
            running_app(settings, tracing=tracings[1]) as b,
            running_worker(settings, Registry.of([slow]), tracing=tracings[2]),
        ):
            yield Traced(a, b, collector, receiver, engine_url, tracings)


def caller_traceparent() -> tuple[str, str]:
    trace_id = secrets.token_hex(16)
    return trace_id, f"00-{trace_id}-{secrets.token_hex(8)}-01"


async def test_a_sync_start_is_one_trace_from_the_caller_to_the_callback(traced: Traced) -> None:
    trace_id, traceparent = caller_traceparent()
    run = cid()
    started = await traced.a.client.post(
        "/api/process/start",
        json={**start_body(run), "callbackUrl": traced.receiver.url},
        headers={"traceparent": traceparent},
    )
    assert started.status_code == 200, started.text
    await until(lambda: len(traced.receiver.requests) == 1, timeout_s=10, what="the callback")
    await traced.flush()

    spans = traced.collector.of_trace(trace_id)
    by_service = {(span.service, span.name) for span in spans}
    assert {
        ("api-a", "POST /api/process/start"),
        ("api-a", "flowgate claim"),
        ("api-a", "camunda start"),
        ("api-a", "flowgate park"),
        ("flowgate-worker", "handle benchmark.noop"),
        ("flowgate-worker", "camunda complete"),
    } <= by_service
    assert any(name == "flowgate callback" for _, name in by_service)
    # The handler's span is a child of the run's context, which is the start request's.
    [server] = [s for s in spans if s.name == "POST /api/process/start"]
    [handler] = [s for s in spans if s.name == "handle benchmark.noop"]
    # The parked request's wake links to the handler's span that ended the run.
    [wake] = [s for s in spans if s.name == "flowgate wake"]
    [park] = [s for s in spans if s.name == "flowgate park"]
    assert wake.service == "api-a"
    assert wake.parent_id == park.span_id
    assert wake.links == (f"{trace_id}-{handler.span_id}",)
    state = await traced.a.deps.store.get(run)
    assert state is not None
    assert state.traceparent is not None
    assert state.traceparent.split("-")[1] == trace_id
    assert handler.parent_id == state.traceparent.split("-")[2]
    assert server.attributes.get("http.route") == "/api/process/start"
    # The engine instance carries it; the callback's POST sends it on.
    async with CamundaClient(traced.engine_url) as camunda:
        variables = await camunda.root_variables([str(state.instance_id)])
    assert variables[str(state.instance_id)]["traceparent"] == state.traceparent
    assert "traceparent" not in started.json()["result"]  # not part of the result
    [(headers, _)] = traced.receiver.requests
    assert headers["traceparent"].split("-")[1] == trace_id
    # The latency histogram points at the trace (an exemplar, in OpenMetrics).
    scraped = await traced.a.client.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert scraped.headers["content-type"].startswith("application/openmetrics-text")
    assert any(
        line.startswith("flowgate_api_request_duration_seconds_bucket{")
        and 'route="/api/process/start"' in line
        and f'# {{trace_id="{trace_id}"}}' in line
        for line in scraped.text.splitlines()
    )


async def test_an_async_start_finished_by_another_replica_keeps_the_callers_trace(
    traced: Traced,
) -> None:
    trace_id, traceparent = caller_traceparent()
    run = cid()
    started = await traced.a.client.post(
        "/api/process/start",
        json=start_body(run, BENCHMARK),
        headers={"traceparent": traceparent, "Prefer": "respond-async"},
    )
    assert started.status_code == 202
    done = await traced.b.client.get(
        f"/api/process/status/{run}", headers={"traceparent": traceparent, "Prefer": "wait=10"}
    )
    assert done.json()["status"] == "ok", done.text
    await traced.flush()
    spans = traced.collector.of_trace(trace_id)
    named = {(span.service, span.name) for span in spans}
    assert ("api-a", "POST /api/process/start") in named
    assert ("flowgate-worker", "handle benchmark.noop") in named
    assert ("api-b", "GET /api/process/status/{correlationId}") in named
    # Replica B's wait was woken by the worker, in another process: the wake links to it.
    [handler] = [s for s in spans if s.name == "handle benchmark.noop"]
    [wake] = [s for s in spans if s.name == "flowgate wake"]
    assert (wake.service, wake.links) == ("api-b", (f"{trace_id}-{handler.span_id}",))


async def test_without_tracing_a_callers_traceparent_still_travels_with_the_run(
    make_settings: MakeSettings, engine_url: str
) -> None:
    await deploy_bpmn(engine_url)
    _, traceparent = caller_traceparent()
    run = cid()
    async with running_app(make_settings(camunda_base_url=engine_url)) as api:
        started = await api.client.post(
            "/api/process/start",
            json=start_body(run),
            headers={"traceparent": traceparent, "Prefer": "respond-async"},
        )
        assert started.status_code == 202
        state = await api.deps.store.get(run)
        ignored = await api.client.post(
            "/api/process/start",
            json=start_body(other := cid()),
            headers={"traceparent": "not-a-traceparent", "Prefer": "respond-async"},
        )
        assert ignored.status_code == 202
        assert (await api.deps.store.get(other)).traceparent is None  # type: ignore[union-attr]
    assert state is not None
    assert state.traceparent == traceparent
