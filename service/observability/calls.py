"""What every call reports, set up in one place: metrics, the access log, the server span.

`Observability` is built once per server from the settings; the handler wrapper
asks it once per method for a `MethodObserver` (label children resolved then, not
per call) and calls `begin` and `end` around each call. Off, each part costs a
`None` test: no metrics without METRICS_LISTEN, no span without
OTEL_EXPORTER_OTLP_ENDPOINT, no line with ACCESS_LOG=false.

Health and reflection are registered through `observed(server)`, which wraps
their handlers the same way (their access-log lines are DEBUG: Kubernetes probes
every few seconds per pod would otherwise be most of the log).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc

from service.config import Settings
from service.observability.access_log import (
    REQUEST_ID_HEADER,
    access_log,
    log_call,
    valid_request_id,
)
from service.observability.metrics import (
    GRPC_CODE_LABELS,
    Metrics,
    MetricsServer,
    multiprocess_dir,
)
from service.observability.tracing import Tracing, trace_id_of
from service.tasks import cancel_and_wait

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
UNARY = "unary"
SERVER_STREAM = "server_stream"
BIDI_STREAM = "bidi_stream"
CLIENT_STREAM = "client_stream"


class CallRecord:
    """One call in progress: when it began, its request id and its span."""

    __slots__ = ("request_id", "span", "started", "token")

    def __init__(self, started: float, request_id: str, span: Any, token: object) -> None:
        self.started = started
        self.request_id = request_id
        self.span = span
        self.token = token

    @property
    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        """Trailing metadata every answer carries (an abort must add it to its own)."""
        return ((REQUEST_ID_HEADER, self.request_id),)


class MethodObserver:
    """The per-call hooks of one method. `begin` at the start, `end` with the final
    code once the call is over (also when it was cancelled)."""

    __slots__ = (
        "_exemplars",
        "_handled",
        "_handled_children",
        "_handled_labels",
        "_latency",
        "_level",
        "_log",
        "_received",
        "_rows",
        "_sent",
        "_shed",
        "_started",
        "_tracing",
        "grpc_type",
        "method",
    )

    def __init__(
        self, observability: Observability, method: str, grpc_type: str, level: int
    ) -> None:
        self.method = method
        self.grpc_type = grpc_type
        self._level = level
        self._log = observability.access_log
        self._tracing = observability.tracing
        metrics = observability.metrics
        self._exemplars = observability.exemplars
        self._handled_children: dict[grpc.StatusCode, Any] = {}
        self._handled_labels: tuple[str, ...] = ()
        self._handled: Any = None
        self._started: Any = None
        self._received: Any = None
        self._sent: Any = None
        self._latency: Any = None
        self._rows: Any = None
        self._shed: Any = None
        if metrics is not None:
            service, _, name = method.lstrip("/").partition("/")
            labels = (grpc_type, service, name)
            self._started = metrics.started.labels(*labels)
            self._received = metrics.msg_received.labels(*labels)
            self._sent = metrics.msg_sent.labels(*labels)
            self._latency = metrics.handling_seconds.labels(*labels)
            self._rows = metrics.stream_rows_sent.labels(service, name)
            self._shed = metrics.shed.labels(service, name)
            self._handled = metrics.handled.labels  # by code, cached in end()
            self._handled_labels = labels

    def begin(self, context: Context, metadata: Any) -> CallRecord:
        started = time.perf_counter()
        request_id = ""
        for key, value in metadata:
            if key == REQUEST_ID_HEADER:
                request_id = value
                break
        if not request_id or not valid_request_id(request_id):
            request_id = os.urandom(16).hex()
        context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
        if self._started is not None:
            self._started.inc()
            if self.grpc_type in (UNARY, SERVER_STREAM):
                self._received.inc()
        span = token = None
        if self._tracing is not None:
            span, token = self._tracing.start_call(self.method, metadata, _peer(context))
        return CallRecord(started, request_id, span, token)

    def received(self) -> None:
        """One more request message on a client or bidi stream."""
        if self._received is not None:
            self._received.inc()

    def sent(self, rows: int = 0) -> None:
        """One more response message on a stream (carrying `rows` rows)."""
        if self._sent is not None:
            self._sent.inc()
            if rows:
                self._rows.inc(rows)

    def shed(self) -> None:
        """The call is refused: MAX_CONCURRENT_RPCS calls are in flight."""
        if self._shed is not None:
            self._shed.inc()

    def end(
        self,
        record: CallRecord,
        context: Context,
        code: grpc.StatusCode,
        reason: str = "",
        caller: str = "-",
    ) -> None:
        duration = time.perf_counter() - record.started
        trace_id = ""
        span = record.span
        if span is not None:
            trace_id = trace_id_of(span)
            Tracing.end_call(span, record.token, code.name, code.value[0], reason)
        if self._started is not None:
            handled = self._handled_children.get(code)
            if handled is None:
                handled = self._handled(*self._handled_labels, GRPC_CODE_LABELS[code])
                self._handled_children[code] = handled
            handled.inc()
            if trace_id and self._exemplars and span.get_span_context().trace_flags.sampled:
                self._latency.observe(duration, {"trace_id": trace_id})
            else:
                self._latency.observe(duration)
            if code is grpc.StatusCode.OK and self.grpc_type in (UNARY, CLIENT_STREAM):
                self._sent.inc()
        if self._log and access_log.isEnabledFor(self._level):
            log_call(
                self._level,
                self.method,
                code.name,
                reason,
                duration * 1000,
                caller,
                _peer(context),
                record.request_id,
                trace_id,
            )


def _peer(context: Context) -> str:
    try:
        return str(context.peer())
    except Exception:  # the call is gone; the peer is not worth an error
        return "-"


def code_after(context: Context, error: BaseException | None) -> grpc.StatusCode:
    """The status a call ended with, from what its handler raised and its context."""
    if isinstance(error, asyncio.CancelledError):
        return (
            grpc.StatusCode.DEADLINE_EXCEEDED
            if _deadline_passed(context)
            else grpc.StatusCode.CANCELLED
        )
    code: object = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):  # grpc.aio may keep the raw integer
        for candidate in grpc.StatusCode:
            if candidate.value[0] == code:
                return candidate
    return grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN


def _deadline_passed(context: Context) -> bool:
    try:
        remaining = context.time_remaining()
    except Exception:
        return False
    return remaining is not None and remaining <= 0


class EventLoopLag:
    """Sets blog_event_loop_lag_seconds: how late a periodic timer fires."""

    def __init__(self, metrics: Metrics, interval: float) -> None:
        self._gauge = metrics.event_loop_lag
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="event-loop-lag")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self._interval)
            self._gauge.set(max(0.0, loop.time() - before - self._interval))

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None


class Observability:
    """Metrics, tracing and the access log of one server, set up once."""

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics | None = None,
        tracing: Tracing | None = None,
        serve_metrics: bool = True,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.tracing = tracing
        self.access_log = settings.access_log
        # prometheus-client's multi-process mode keeps no exemplars.
        self.exemplars = metrics is not None and tracing is not None and not metrics.multiprocess
        self._serve_metrics = serve_metrics and metrics is not None and not metrics.multiprocess
        self.metrics_server: MetricsServer | None = None
        self._lag: EventLoopLag | None = None

    @classmethod
    def from_settings(cls, settings: Settings, tracing: Tracing | None = None) -> Observability:
        """Metrics when METRICS_LISTEN is set (or this is a worker of `serve --workers N`
        whose parent serves them), tracing when OTEL_EXPORTER_OTLP_ENDPOINT is set."""
        metrics = (
            Metrics()
            if settings.metrics_listen is not None or multiprocess_dir() is not None
            else None
        )
        if tracing is None:
            tracing = Tracing.from_environment()
        return cls(settings, metrics=metrics, tracing=tracing)

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_server.port if self.metrics_server is not None else None

    def method(self, method: str, grpc_type: str, *, quiet: bool = False) -> MethodObserver:
        return MethodObserver(self, method, grpc_type, logging.DEBUG if quiet else logging.INFO)

    def start(self) -> None:
        if self.metrics is None:
            return
        self.metrics.max_concurrent_rpcs.set(self.settings.max_concurrent_rpcs or 0)
        self._lag = EventLoopLag(self.metrics, self.settings.event_loop_lag_interval)
        self._lag.start()
        if self._serve_metrics and self.settings.metrics_listen is not None:
            self.metrics_server = MetricsServer(self.settings.metrics_listen, self.metrics.registry)
            log.info("metrics on http://%s/metrics", self.settings.metrics_listen)

    async def stop(self) -> None:
        if self._lag is not None:
            await self._lag.stop()
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None
        if self.tracing is not None:
            # Flushing the last spans blocks on the exporter (up to its timeout when the
            # collector is away): not on the event loop.
            await asyncio.to_thread(self.tracing.shutdown)

    def observed(self, server: grpc.aio.Server) -> ObservedRegistrar:
        """A stand-in for `server` to pass to `add_*Servicer_to_server`: each handler it
        registers is counted, logged (DEBUG) and traced like the service's own."""
        return ObservedRegistrar(self, server)


# ------------------------------------------------- health, reflection: wrapped handlers


class ObservedRegistrar:
    """Takes the registrations generated `add_*_to_server` code makes and wraps them."""

    def __init__(self, observability: Observability, server: grpc.aio.Server) -> None:
        self._observability = observability
        self._server = server
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def wrap(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> Any:
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            wrapped = observe_handler(self._observability, method, handler)
            self._wrapped[method] = wrapped
        return wrapped

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(
            [_ObservedGenericHandler(self, handler) for handler in handlers]
        )

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self._server.add_registered_method_handlers(
            service,
            {name: self.wrap(f"/{service}/{name}", h) for name, h in handlers.items()},
        )


class _ObservedGenericHandler(grpc.GenericRpcHandler):
    def __init__(self, registrar: ObservedRegistrar, inner: grpc.GenericRpcHandler) -> None:
        self._registrar = registrar
        self._inner = inner

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        result: grpc.RpcMethodHandler[Any, Any] = self._registrar.wrap(method, handler)
        return result


def observe_handler(
    observability: Observability, method: str, handler: grpc.RpcMethodHandler[Any, Any]
) -> Any:
    """The same handler, counted, traced and logged at DEBUG (see the module doc)."""
    if handler.request_streaming and handler.response_streaming:
        grpc_type, behavior, factory = (
            BIDI_STREAM,
            handler.stream_stream,
            grpc.stream_stream_rpc_method_handler,
        )
    elif handler.request_streaming:
        grpc_type, behavior, factory = (
            CLIENT_STREAM,
            handler.stream_unary,
            grpc.stream_unary_rpc_method_handler,
        )
    elif handler.response_streaming:
        grpc_type, behavior, factory = (
            SERVER_STREAM,
            handler.unary_stream,
            grpc.unary_stream_rpc_method_handler,
        )
    else:
        grpc_type, behavior, factory = (
            UNARY,
            handler.unary_unary,
            grpc.unary_unary_rpc_method_handler,
        )
    assert behavior is not None
    observer = observability.method(method, grpc_type, quiet=True)
    wrapped = _observed_behavior(observer, behavior, grpc_type)
    return factory(
        wrapped,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _observed_behavior(
    observer: MethodObserver, behavior: Callable[..., Any], grpc_type: str
) -> Callable[..., Any]:
    streaming_in = grpc_type in (CLIENT_STREAM, BIDI_STREAM)

    async def counted(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for request in requests:
            observer.received()
            yield request

    if inspect.isasyncgenfunction(behavior):

        async def generator(request: Any, context: Context) -> AsyncIterator[Any]:
            record = observer.begin(context, context.invocation_metadata() or ())
            error: BaseException | None = None
            try:
                source = behavior(counted(request) if streaming_in else request, context)
                async for response in source:
                    observer.sent()
                    yield response
            except BaseException as raised:
                error = raised
                raise
            finally:
                observer.end(record, context, code_after(context, error))

        return generator

    async def coroutine(request: Any, context: Context) -> Any:
        record = observer.begin(context, context.invocation_metadata() or ())
        error: BaseException | None = None
        try:
            return await behavior(counted(request) if streaming_in else request, context)
        except BaseException as raised:
            error = raised
            raise
        finally:
            observer.end(record, context, code_after(context, error))

    return coroutine
