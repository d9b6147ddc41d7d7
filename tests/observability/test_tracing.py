"""Tracing: a caller's traceparent is continued by a server span with child SQL spans."""

from __future__ import annotations

import asyncio
import secrets
from concurrent import futures
from typing import Any

import asyncpg
import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from blog.v1 import user_pb2, user_pb2_grpc
from conftest import Backend, Running, settings_for
from factories import create_user_request, unique
from service.config import Settings
from service.observability.tracing import Tracing
from service.server import BlogServer
from support.metrics import scrape_sync
from support.postgres import free_port


def traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


async def _serve(settings: Settings, tracing: Tracing | None) -> tuple[BlogServer, Running]:
    server = BlogServer(settings, tracing=tracing)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    return server, Running(server, channel)


async def _close(server: BlogServer, live: Running) -> None:
    await live.channel.close()
    await server.stop(grace=1.0)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


def _hex(value: int, width: int) -> str:
    return format(value, f"0{width}x")


async def test_traceparent_continues_the_callers_trace_with_sql_children(
    backend: Backend, exporter: InMemorySpanExporter
) -> None:
    settings = settings_for(backend.url, metrics_listen="127.0.0.1:0")
    server, live = await _serve(settings, Tracing(exporter, batch=False))
    secret_email = f"{unique('secret')}@example.com"
    try:
        created = await live.users.CreateUser(create_user_request(email=secret_email))
        exporter.clear()
        header, trace_id, parent_id = traceparent()
        await live.users.GetUser(
            user_pb2.GetUserRequest(id=created.id), metadata=(("traceparent", header),)
        )
        # A filter literal and an email never reach a span.
        await live.users.ListUsers(
            user_pb2.ListUsersRequest(filter=f'email = "{secret_email}"'),
            metadata=(("traceparent", traceparent()[0]),),
        )
        with pytest.raises(grpc.aio.AioRpcError):
            await live.users.GetUser(user_pb2.GetUserRequest(id=2**62))
        metrics_port = server.observability.metrics_port
        assert metrics_port is not None
        openmetrics = await asyncio.to_thread(
            scrape_sync, metrics_port, "127.0.0.1", "application/openmetrics-text"
        )
    finally:
        await _close(server, live)
    spans: list[ReadableSpan] = list(exporter.get_finished_spans())
    servers = [s for s in spans if s.kind is SpanKind.SERVER]
    get = next(
        s
        for s in servers
        if s.name == "blog.v1.UserService/GetUser" and _hex(s.context.trace_id, 32) == trace_id
    )
    assert get.parent is not None
    assert _hex(get.parent.span_id, 16) == parent_id
    assert get.attributes is not None
    assert get.attributes["rpc.system"] == "grpc"
    assert get.attributes["rpc.method"] == "GetUser"
    assert get.attributes["rpc.grpc.status_code"] == 0
    children = [s for s in spans if s.parent and s.parent.span_id == get.context.span_id]
    if backend.is_postgres:
        assert children, "no SQL span under the server span"
        assert all(c.kind is SpanKind.CLIENT for c in children)
        assert all(c.context.trace_id == get.context.trace_id for c in children)
        statements = [str((c.attributes or {}).get("db.statement", "")) for c in children]
        assert any("users" in text for text in statements), statements
    not_found = next(s for s in servers if s.name == "blog.v1.UserService/GetUser" and s is not get)
    assert not_found.attributes is not None
    assert not_found.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert not_found.attributes["blog.reason"] == "NOT_FOUND"
    # No root spans from background statements (the readiness probe's SELECT 1).
    assert all(s.parent is not None for s in spans if s.kind is SpanKind.CLIENT)
    everything = repr([(s.name, dict(s.attributes or {}), s.events) for s in spans])
    assert secret_email not in everything
    # The latency histogram carries trace ids as OpenMetrics exemplars (the latest
    # call's in each bucket).
    exemplars = {
        line.split('trace_id="')[1][:32]
        for line in openmetrics.splitlines()
        if line.startswith("grpc_server_handling_seconds_bucket")
        and 'grpc_method="GetUser"' in line
        and "trace_id=" in line
    }
    get_traces = {_hex(s.context.trace_id, 32) for s in servers if s.name.endswith("/GetUser")}
    assert exemplars
    assert exemplars <= get_traces


async def test_tracing_off_makes_no_span(backend: Backend) -> None:
    settings = settings_for(backend.url)
    server, live = await _serve(settings, None)
    try:
        assert server.observability.tracing is None
        # asyncpg is left as it is: nothing wraps its statements.
        assert not hasattr(asyncpg.connection.Connection.execute, "__wrapped__")
        created = await live.users.CreateUser(create_user_request())
        await live.users.GetUser(
            user_pb2.GetUserRequest(id=created.id), metadata=(("traceparent", traceparent()[0]),)
        )
    finally:
        await _close(server, live)


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(self, request: Any, context: Any) -> Any:
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


async def test_spans_reach_an_otlp_collector(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end: OTEL_EXPORTER_OTLP_ENDPOINT turns tracing on, spans go over OTLP gRPC."""
    collector = _Collector()
    stub_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, stub_server)
    port = free_port()
    stub_server.add_insecure_port(f"127.0.0.1:{port}")
    stub_server.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "blog-under-test")
    try:
        server, live = await _serve(settings_for(backend.url), None)
        assert server.observability.tracing is not None
        header, trace_id, _ = traceparent()
        try:
            created = await live.users.CreateUser(create_user_request())
            await user_pb2_grpc.UserServiceStub(live.channel).GetUser(
                user_pb2.GetUserRequest(id=created.id), metadata=(("traceparent", header),)
            )
        finally:
            await _close(server, live)  # flushes the batch processor
    finally:
        stub_server.stop(0)
    exported = [
        (resource.resource, span)
        for request in collector.requests
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    mine = [(r, s) for r, s in exported if s.trace_id.hex() == trace_id]
    assert any(s.name == "blog.v1.UserService/GetUser" for _, s in mine), exported
    names = {a.value.string_value for r, _ in mine for a in r.attributes if a.key == "service.name"}
    assert names == {"blog-under-test"}
