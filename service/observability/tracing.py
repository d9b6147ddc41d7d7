"""OpenTelemetry tracing: on only when OTEL_EXPORTER_OTLP_ENDPOINT is set.

The server span starts in the handler wrapper (DESIGN.md "Observability": the
OTel grpc aio interceptor breaks streams written with `context.write`), from the
caller's W3C `traceparent` when it sends one. SQL spans come from
opentelemetry-instrumentation-asyncpg, without bound values
(`capture_parameters=False`), and only as children of a recording span: the
readiness probe's `SELECT 1` every second, migrations and the purger make no
root traces. The standard OTEL_* variables apply: OTEL_SERVICE_NAME,
OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER(_ARG), OTEL_PROPAGATORS and the
OTLP exporter's own (endpoint, headers, timeout, insecure...).

When tracing is off nothing here is imported by a call: the wrapper tests one
`None`, and asyncpg is left uninstrumented.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode

ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
SERVICE_NAME = "blog-service"

# OpenTelemetry's semantic conventions for gRPC servers: these codes are the server's
# fault (span status ERROR); the others are the caller's and leave the status unset.
_SERVER_ERRORS = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)


def enabled_by_environment() -> bool:
    return any(os.environ.get(name) for name in ENDPOINT_VARS)


class _ChildSpansOnly(trace.TracerProvider):
    """Hands the asyncpg instrumentation tracers that make a span only inside a
    recording one (a call's), so background statements start no traces."""

    def __init__(self, provider: trace.TracerProvider) -> None:
        self._provider = provider

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return _ChildTracer(self._provider.get_tracer(*args, **kwargs))


class _ChildTracer(trace.Tracer):
    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    def start_span(self, *args: Any, **kwargs: Any) -> Span:
        if not trace.get_current_span().is_recording():
            return INVALID_SPAN
        return self._tracer.start_span(*args, **kwargs)

    @contextlib.contextmanager
    def start_as_current_span(  # type: ignore[override]
        self, *args: Any, **kwargs: Any
    ) -> Iterator[Span]:
        if not trace.get_current_span().is_recording():
            yield INVALID_SPAN
            return
        with self._tracer.start_as_current_span(*args, **kwargs) as span:
            yield span


class Tracing:
    """A tracer provider, the asyncpg instrumentation, and the server span of a call."""

    def __init__(self, exporter: SpanExporter, *, batch: bool = True) -> None:
        resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
        # The sampler comes from OTEL_TRACES_SAMPLER (default: parent-based, always on).
        self.provider = TracerProvider(resource=resource)
        processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
        self.provider.add_span_processor(processor)
        self.tracer = self.provider.get_tracer("service.rpc")
        self._instrumentor = AsyncPGInstrumentor(capture_parameters=False)  # type: ignore[no-untyped-call]
        self._instrumentor.instrument(tracer_provider=_ChildSpansOnly(self.provider))

    @classmethod
    def from_environment(cls) -> Tracing | None:
        """OTLP over gRPC when OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT is set, else None."""
        if not enabled_by_environment():
            return None
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return cls(OTLPSpanExporter())

    def start_call(
        self, name: str, metadata: Sequence[tuple[str, Any]], peer: str
    ) -> tuple[Span, object]:
        """The server span of a call, current until `end_call`; continues the caller's
        trace when its metadata carries a `traceparent`."""
        carrier: Mapping[str, str] = {
            key: value for key, value in metadata if isinstance(value, str)
        }
        parent = propagate.extract(carrier)
        service, _, method = name.rpartition("/")
        span = self.tracer.start_span(
            name.lstrip("/"),
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": service.lstrip("/"),
                "rpc.method": method,
                "network.peer.address": peer,
            },
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        return span, token

    @staticmethod
    def end_call(span: Span, token: object, code: str, code_value: int, reason: str) -> None:
        if span.is_recording():
            span.set_attribute("rpc.grpc.status_code", code_value)
            if reason:
                span.set_attribute("blog.reason", reason)
            if code in _SERVER_ERRORS:
                span.set_status(Status(StatusCode.ERROR, f"{code} {reason}".strip()))
        span.end()
        otel_context.detach(token)  # type: ignore[arg-type]

    def shutdown(self) -> None:
        self._instrumentor.uninstrument()
        self.provider.shutdown()


def trace_id_of(span: Span | None) -> str:
    """The span's trace id as 32 hex digits, or "" when there is none."""
    if span is None:
        return ""
    context = span.get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""
