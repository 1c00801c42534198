"""A real OTLP/HTTP trace collector on a loopback port: what the SDK's exporter sends, over
HTTP as protobuf, decoded with the OpenTelemetry protocol's own classes."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.helpers.net import serving


@dataclass(frozen=True, slots=True)
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    attributes: dict[str, str]
    #: The spans this one links to, as ``traceId-spanId``.
    links: tuple[str, ...] = ()


@dataclass
class Collector:
    url: str = ""
    spans: list[Span] = field(default_factory=list)

    def of_trace(self, trace_id: str) -> list[Span]:
        return [span for span in self.spans if span.trace_id == trace_id]

    def app(self) -> Starlette:
        async def traces(request: Request) -> Response:
            exported = ExportTraceServiceRequest.FromString(await request.body())
            for resource_spans in exported.resource_spans:
                service = next(
                    (
                        a.value.string_value
                        for a in resource_spans.resource.attributes
                        if a.key == "service.name"
                    ),
                    "",
                )
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append(
                            Span(
                                service=service,
                                name=span.name,
                                trace_id=span.trace_id.hex(),
                                span_id=span.span_id.hex(),
                                parent_id=span.parent_span_id.hex(),
                                kind=span.kind,
                                attributes={a.key: a.value.string_value for a in span.attributes},
                                links=tuple(
                                    f"{link.trace_id.hex()}-{link.span_id.hex()}"
                                    for link in span.links
                                ),
                            )
                        )
            body = ExportTraceServiceResponse().SerializeToString()
            return Response(body, media_type="application/x-protobuf")

        return Starlette(routes=[Route("/v1/traces", traces, methods=["POST"])])


@contextlib.asynccontextmanager
async def otlp_collector() -> AsyncIterator[Collector]:
    collector = Collector()
    async with serving(collector.app()) as url:
        collector.url = url
        yield collector
