"""Prometheus metrics: the grpc-ecosystem names, the service's own `blog_*`, /metrics.

Names and labels follow go-grpc-middleware's prometheus interceptors
(`grpc_server_started_total`, `grpc_server_handled_total{grpc_code}`,
`grpc_server_handling_seconds`, `grpc_server_msg_received_total`,
`grpc_server_msg_sent_total`, each with `grpc_type`, `grpc_service`,
`grpc_method`), so the standard dashboards and alerts work unchanged; `grpc_code`
is spelt as Go spells it there (`OK`, `NotFound`, `Canceled`, `DeadlineExceeded`).

One process (`serve`): a registry of its own per server, served by a thread on
METRICS_LISTEN, with process metrics and, when tracing is on, trace-id exemplars.
Several (`serve --workers N`): prometheus-client's multi-process mode. The CLI
makes the directory, sets PROMETHEUS_MULTIPROC_DIR before any worker starts,
serves /metrics itself from the directory (and each worker's process metrics,
labelled `worker`), and removes the directory at exit. Multi-process mode has no
collect-time callbacks, so every gauge here is set when its value changes and
names its `multiprocess_mode`; it keeps no exemplars.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc
import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    multiprocess,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from sqlalchemy import exc as sa_exc

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# 1 ms to 10 s: a GetUser takes a millisecond or two, a stall shows at the top.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
CALL_LABELS = ("grpc_type", "grpc_service", "grpc_method")

# SQLSTATE classes (PostgreSQL appendix A) the service meets, named for the label `kind`.
SQLSTATE_CLASSES = {
    "08": "connection_exception",
    "22": "data_exception",
    "23": "integrity_constraint_violation",
    "25": "invalid_transaction_state",
    "40": "transaction_rollback",
    "42": "syntax_error_or_access_rule_violation",
    "53": "insufficient_resources",
    "54": "program_limit_exceeded",
    "55": "object_not_in_prerequisite_state",
    "57": "operator_intervention",
    "58": "system_error",
    "XX": "internal_error",
}


def go_code_name(code: grpc.StatusCode) -> str:
    """A status code as go-grpc-middleware labels it (Go's `codes.Code.String()`):
    `OK`, `Canceled`, `InvalidArgument`, `DeadlineExceeded`, ..."""
    if code is grpc.StatusCode.CANCELLED:
        return "Canceled"
    if code is grpc.StatusCode.OK:
        return "OK"
    return "".join(word.capitalize() for word in code.name.split("_"))


GRPC_CODE_LABELS = {code: go_code_name(code) for code in grpc.StatusCode}


def multiprocess_dir() -> str | None:
    """The multi-process directory when this process is a worker of `serve --workers N`."""
    return os.environ.get(MULTIPROC_ENV) or None


class Metrics:
    """Every metric the service exports. One instance per server (per process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # `_created` series double every counter and no dashboard reads them.
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
        self.multiprocess = multiprocess_dir() is not None
        if registry is None:
            registry = CollectorRegistry(auto_describe=True)
            if not self.multiprocess:
                ProcessCollector(registry=registry)
        self.registry = registry
        r = registry

        self.started = Counter(
            "grpc_server_started", "RPCs started on the server.", CALL_LABELS, registry=r
        )
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, regardless of success or failure.",
            (*CALL_LABELS, "grpc_code"),
            registry=r,
        )
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Response latency (seconds) of gRPC that had been application-level handled "
            "by the server.",
            CALL_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.msg_received = Counter(
            "grpc_server_msg_received",
            "RPC stream messages received on the server.",
            CALL_LABELS,
            registry=r,
        )
        self.msg_sent = Counter(
            "grpc_server_msg_sent",
            "gRPC stream messages sent on the server.",
            CALL_LABELS,
            registry=r,
        )
        self.shed = Counter(
            "blog_rpcs_shed",
            "Calls answered RESOURCE_EXHAUSTED OVERLOADED because MAX_CONCURRENT_RPCS "
            "were in flight.",
            ("grpc_service", "grpc_method"),
            registry=r,
        )
        self.max_concurrent_rpcs = Gauge(
            "blog_max_concurrent_rpcs",
            "MAX_CONCURRENT_RPCS per process (0: unlimited).",
            registry=r,
            multiprocess_mode="livesum",
        )

        pool = ("pool",)
        self.pool_size = Gauge(
            "blog_db_pool_size",
            "Connections the pool keeps (DB_POOL_SIZE), per process.",
            pool,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.pool_limit = Gauge(
            "blog_db_pool_limit",
            "Connections the pool may open at most (DB_POOL_SIZE + DB_MAX_OVERFLOW).",
            pool,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.pool_checked_out = Gauge(
            "blog_db_pool_checked_out",
            "Connections in use by calls.",
            pool,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.pool_overflow = Gauge(
            "blog_db_pool_overflow",
            "Connections open beyond DB_POOL_SIZE.",
            pool,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.pool_waits = Counter(
            "blog_db_pool_waits",
            "Checkouts that found no idle connection and no room to open one, so waited.",
            pool,
            registry=r,
        )
        self.pool_wait_seconds = Histogram(
            "blog_db_pool_wait_seconds",
            "Time to get a connection from the pool (including connecting).",
            pool,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.db_errors = Counter(
            "blog_db_errors",
            "Database errors by SQLSTATE class (kind names it; sqlstate_class is empty "
            "for errors without one: pool_timeout, connection, sqlite, other).",
            ("sqlstate_class", "kind"),
            registry=r,
        )
        self.active_streams = Gauge(
            "blog_active_streams",
            "Server streams in progress.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.stream_limit = Gauge(
            "blog_stream_limit",
            "STREAM_MAX_CONCURRENT, per process.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.stream_rows_sent = Counter(
            "blog_stream_rows_sent",
            "Rows sent in stream messages.",
            ("grpc_service", "grpc_method"),
            registry=r,
        )
        self.readiness = Gauge(
            "blog_readiness",
            "1 while the service's health status is SERVING (the database answers), else "
            "0; across workers the lowest.",
            ("service",),
            registry=r,
            multiprocess_mode="livemin",
        )
        self.event_loop_lag = Gauge(
            "blog_event_loop_lag_seconds",
            "How late the event loop ran a periodic timer (the first sign of a CPU-bound "
            "process); across workers the highest.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self._errors_lock = threading.Lock()

    def count_db_error(self, error: BaseException) -> None:
        """Count what a unit of work ended with, if the database raised it (a domain
        error such as NOT_FOUND is no database error)."""
        sqlstate = sqlstate_of(error)
        if sqlstate is not None:
            self.db_error(sqlstate)
        elif isinstance(error, sa_exc.TimeoutError):
            self.db_error(None, "pool_timeout")
        elif isinstance(error, sa_exc.DBAPIError):
            sqlite = "sqlite" in type(error.orig).__module__ if error.orig is not None else False
            self.db_error(None, "sqlite" if sqlite else "connection")
        elif isinstance(error, OSError | ConnectionError):
            self.db_error(None, "connection")

    def db_error(self, sqlstate: str | None, kind: str | None = None) -> None:
        """Count one database error: by its SQLSTATE class, or by `kind` when it has none."""
        if sqlstate:
            klass = sqlstate[:2]
            self.db_errors.labels(klass, SQLSTATE_CLASSES.get(klass, "other")).inc()
        else:
            self.db_errors.labels("", kind or "other").inc()


def sqlstate_of(error: BaseException) -> str | None:
    """The SQLSTATE of a driver error, through SQLAlchemy's wrapping, if it has one."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = getattr(current, "sqlstate", None) or getattr(current, "pgcode", None)
        if isinstance(code, str) and len(code) == 5:
            return code
        current = getattr(current, "orig", None) or current.__cause__
    return None


class WorkerProcessCollector(Collector):
    """Process metrics (CPU, memory, open fds) of each worker, labelled `worker`.

    prometheus-client's multi-process mode has no process metrics of its own; the
    parent reads each worker's /proc entry at scrape time."""

    def __init__(self, workers: Callable[[], Sequence[tuple[str, int]]]) -> None:
        self._workers = workers

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for name, pid in self._workers():
            collector = ProcessCollector(pid=_constant(pid), registry=None)
            for family in collector.collect():
                merged = families.get(family.name)
                if merged is None:
                    merged = Metric(family.name, family.documentation, family.type)
                    families[family.name] = merged
                for sample in family.samples:
                    merged.add_sample(sample.name, {**sample.labels, "worker": name}, sample.value)
        return list(families.values())


def _constant(pid: int) -> Callable[[], int]:
    return lambda: pid


def multiprocess_registry(
    path: str, workers: Callable[[], Sequence[tuple[str, int]]]
) -> CollectorRegistry:
    """The registry the parent of `serve --workers N` serves: every worker's values."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    registry.register(WorkerProcessCollector(workers))
    return registry


def mark_process_dead(pid: int, path: str) -> None:
    """A worker ended: drop its live gauges' files (the `live*` multiprocess modes)."""
    multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


def split_listen(listen: str) -> tuple[str, int]:
    """METRICS_LISTEN `host:port`, `[v6]:port` or `:port` -> (host, port)."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


class MetricsServer:
    """/metrics over HTTP on a daemon thread (prometheus-client's own server)."""

    def __init__(self, listen: str, registry: CollectorRegistry) -> None:
        host, port = split_listen(listen)
        server, thread = prometheus_client.start_http_server(port, addr=host, registry=registry)
        self._server: Any = server
        self._thread = thread
        self.port: int = int(server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
