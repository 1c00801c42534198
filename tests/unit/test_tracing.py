"""Tracing is off unless the OTEL_* variables ask for an exporter, and off costs nothing:
the SDK is not even imported."""

from __future__ import annotations

import io
import logging
import subprocess
import sys

import orjson
import pytest

from flowgate.shared.logs import JsonFormatter
from flowgate.shared.tracing import OFF, Tracing, valid_traceparent, wanted

SAMPLE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "x"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, False),
    ],
)
def test_the_otel_variables_decide_whether_spans_are_exported(
    environ: dict[str, str], on: bool
) -> None:
    assert wanted(environ) is on


def test_only_a_well_formed_traceparent_travels() -> None:
    assert valid_traceparent(SAMPLE) == SAMPLE
    for bad in ("", "junk", SAMPLE.upper(), "00-" + "0" * 32 + "-00f067aa0ba902b7-01", None):
        assert valid_traceparent(bad) is None
    # Off, a caller's own context is handed on as it came; nothing else is made up.
    assert OFF.traceparent(SAMPLE) == SAMPLE
    assert OFF.traceparent("junk") is None
    with OFF.span("anything") as span:
        assert span is None


def test_with_tracing_off_no_tracer_exporter_or_instrumentation_is_even_imported() -> None:
    # (redis-py imports the OpenTelemetry API and the SDK's metrics for its own, optional,
    # observability: what flowgate would set up for traces must still be absent.)
    code = """
import sys
from flowgate.services.api.app import create_app
from flowgate.services.worker.app import serve
from flowgate.shared.settings import load_settings
create_app(load_settings())
ours = ("opentelemetry.sdk.trace", "opentelemetry.exporter", "opentelemetry.instrumentation")
loaded = sorted(name for name in sys.modules if name.startswith(ours))
assert not loaded, loaded
"""
    environ = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_log_line_written_in_a_span_names_its_trace() -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    tracing = Tracing.exporting(exporter, service="test")
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("flowgate.test.tracing")
    logger.addHandler(handler)
    try:
        with tracing.span("work", parent=SAMPLE):
            logger.warning("inside")
        logger.warning("outside")
    finally:
        logger.removeHandler(handler)
    assert tracing.provider is not None
    tracing.provider.force_flush()
    inside, outside = (orjson.loads(line) for line in lines.getvalue().splitlines())
    assert inside["traceId"] == SAMPLE.split("-")[1]
    assert "traceId" not in outside
    [span] = exporter.get_finished_spans()
    assert format(span.context.trace_id, "032x") == inside["traceId"]
