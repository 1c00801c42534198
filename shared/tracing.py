"""One trace per run, from the caller through the engine's workers to the callback: the
OpenTelemetry SDK when the standard ``OTEL_*`` variables ask for an exporter, nothing at all
otherwise.

A :class:`Tracing` is on or off. Off (no ``OTEL_EXPORTER_OTLP_ENDPOINT`` /
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, ``OTEL_TRACES_EXPORTER=none`` or
``OTEL_SDK_DISABLED=true``, or the ``tracing`` extra not installed) every method is a branch
and a return: the SDK is not even imported. On, each process exports its spans over
OTLP/HTTP; the sampler is the SDK's, from ``OTEL_TRACES_SAMPLER``.

How a run keeps its trace: the start's span (continuing the caller's ``traceparent``) is
written down as W3C ``traceparent`` text, in the run's record (shared/state.py) and as the
engine instance's process variable ``traceparent``. A worker reads that variable with each
task and makes its handler's span a child of it; the callback's POST sends it on. With
tracing off, a caller's own ``traceparent`` still travels the same way, untouched, so a
tracing receiver or handler downstream sees the caller's trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.middleware import Middleware

from flowgate.shared.logs import TRACE_ID

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

#: The process variable (and the record's field) that carries a run's trace context.
TRACEPARENT = "traceparent"
#: W3C Trace Context, version 00: what a ``traceparent`` header or variable must look like.
_TRACEPARENT = re.compile(r"^00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}$")


def valid_traceparent(value: str | None) -> str | None:
    """``value`` when it is a well-formed W3C traceparent, else None."""
    return value if value is not None and _TRACEPARENT.fullmatch(value) else None


def wanted(environ: Mapping[str, str]) -> bool:
    """Whether the ``OTEL_*`` variables ask for traces to be exported."""
    if environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").lower()
    if exporter == "none":
        return False
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    return bool(endpoint) or exporter == "otlp"


@dataclass(frozen=True, slots=True)
class Tracing:
    """A component's tracer (None: tracing is off)."""

    tracer: Tracer | None = None
    provider: TracerProvider | None = None

    @property
    def on(self) -> bool:
        return self.tracer is not None

    @classmethod
    def from_environment(cls, service: str) -> Tracing:
        """The SDK with an OTLP/HTTP exporter, as ``OTEL_*`` configures it; off otherwise
        (or when the ``tracing`` extra is not installed)."""
        if not wanted(os.environ):
            return OFF
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter,
            )
        except ImportError:
            return OFF
        return cls.exporting(OTLPSpanExporter(), service=service)

    @classmethod
    def exporting(cls, exporter: Any, *, service: str) -> Tracing:
        """Spans of ``service`` sent to ``exporter`` in batches (the sampler from
        ``OTEL_TRACES_SAMPLER``, the name overridden by ``OTEL_SERVICE_NAME``)."""
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        name = os.environ.get("OTEL_SERVICE_NAME") or service
        provider = TracerProvider(resource=Resource.create({"service.name": name}))
        provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider.get_tracer("flowgate"), provider)

    async def shutdown(self) -> None:
        """Export what is buffered, then stop (at the end of the process's lifespan). The
        exporter blocks: it runs in a thread, the loop goes on."""
        if self.provider is not None:
            await asyncio.to_thread(self.provider.shutdown)

    def span(
        self,
        name: str,
        *,
        parent: str | None = None,
        kind: str = "internal",
        attributes: Mapping[str, str | int] | None = None,
        links: Sequence[str] = (),
        start_ns: int | None = None,
    ) -> contextlib.AbstractContextManager[Span | None]:
        """A span, current for the block (None when off). ``parent``: a traceparent to
        continue (a run's) instead of the current span; ``kind``: ``internal``,
        ``client``, ``consumer``; ``links``: traceparents of spans that caused this one
        (a wake's worker span); ``start_ns``: when it began, if before the block."""
        if self.tracer is None:
            return _NO_SPAN  # (several per request and per task: no generator to make)
        return self._span(
            name, parent=parent, kind=kind, attributes=attributes, links=links, start_ns=start_ns
        )

    @contextlib.contextmanager
    def _span(
        self,
        name: str,
        *,
        parent: str | None,
        kind: str,
        attributes: Mapping[str, str | int] | None,
        links: Sequence[str],
        start_ns: int | None,
    ) -> Iterator[Span]:
        assert self.tracer is not None
        from opentelemetry import propagate, trace
        from opentelemetry.trace import Link, SpanKind

        context = propagate.extract({TRACEPARENT: parent}) if parent else None
        caused_by = [
            Link(trace.get_current_span(propagate.extract({TRACEPARENT: link})).get_span_context())
            for link in links
        ]
        with self.tracer.start_as_current_span(
            name,
            context=context,
            kind=SpanKind[kind.upper()],
            attributes=attributes,
            links=caused_by,
            start_time=start_ns,
        ) as current:
            logged = TRACE_ID.set(format(current.get_span_context().trace_id, "032x"))
            try:
                yield current
            finally:
                TRACE_ID.reset(logged)

    def traceparent(self, inherited: str | None = None) -> str | None:
        """The traceparent to hand on from here: the current span's when on (it continues
        ``inherited`` already), else ``inherited`` itself when well formed."""
        if self.tracer is None:
            return valid_traceparent(inherited)
        carrier: dict[str, str] = {}
        inject(carrier)
        return carrier.get(TRACEPARENT) or valid_traceparent(inherited)

    def exemplar(self) -> dict[str, str] | None:
        """The current sampled span's trace id, for a histogram's exemplar (None: none)."""
        if self.tracer is None:
            return None
        from opentelemetry import trace

        context = trace.get_current_span().get_span_context()
        if not context.is_valid or not context.trace_flags.sampled:
            return None
        return {"trace_id": format(context.trace_id, "032x")}

    def name_request(self, method: str, route: str) -> None:
        """Name the server span of the request being served by its route template (the
        ASGI middleware opens it before routing, knowing only the path)."""
        if self.tracer is None:
            return
        from opentelemetry import trace

        span = trace.get_current_span()
        span.update_name(f"{method} {route}")
        span.set_attribute("http.route", route)
        TRACE_ID.set(format(span.get_span_context().trace_id, "032x"))  # this request's lines

    def asgi_middleware(self) -> list[Middleware]:
        """The ASGI instrumentation for the API's middleware stack (none when off)."""
        if self.tracer is None:
            return []
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

        return [
            Middleware(
                OpenTelemetryMiddleware,
                tracer_provider=self.provider,
                excluded_urls="healthz,readyz,metrics,openapi.json,docs",
                # The method only until the route is known (name_request): not the path,
                # which holds a correlationId.
                default_span_details=lambda scope: (scope.get("method", "HTTP"), {}),
                exclude_spans=["receive", "send"],
            )
        ]


OFF = Tracing()
#: What :meth:`Tracing.span` is when off (a null context can be entered any number of times).
_NO_SPAN: contextlib.nullcontext[None] = contextlib.nullcontext()


def inject(carrier: MutableMapping[str, str]) -> None:
    """Write the current trace context into ``carrier`` (headers of an outbound call)."""
    from opentelemetry import propagate

    propagate.inject(carrier)
