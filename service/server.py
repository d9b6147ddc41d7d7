"""Builds and runs the gRPC server: handlers, health, reflection, graceful shutdown."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from blog.v1 import post_pb2, user_pb2
from service.api.posts import PostServicer
from service.api.rpc import HandlerFactory
from service.api.streams import StreamLimiter
from service.api.users import UserServicer
from service.auth import Authenticator
from service.config import Settings
from service.db.engine import Database
from service.db.migrations import SchemaState, describe_revisions, schema_status, upgrade
from service.draining import Drain
from service.health import NOT_SERVING, SERVING, ReadinessMonitor
from service.maintenance import Purger
from service.observability.calls import Observability
from service.observability.pool import instrument_pool
from service.observability.tracing import Tracing
from service.reload import FileReloader, TlsCertificates
from service.repositories.uow import Store
from service.startup import command, describe_listen_failure, resolves
from service.tokens import TokenCodec

log = logging.getLogger(__name__)

USER_SERVICE = user_pb2.DESCRIPTOR.services_by_name["UserService"]
POST_SERVICE = post_pb2.DESCRIPTOR.services_by_name["PostService"]
READINESS_SERVICES = (USER_SERVICE.full_name, POST_SERVICE.full_name)
# Shutdown (see service/draining.py): after the unary calls in flight are done, wait
# for a pause in arrivals this long (at most DRAIN_QUIET_MAX), so gRPC's queue of
# calls not yet handled is empty when `server.stop` would cancel it.
DRAIN_QUIET = 0.2
DRAIN_QUIET_MAX = 1.0


class SchemaBehindError(RuntimeError):
    pass


class ListenError(OSError):
    """The listen address cannot be bound (in use without SO_REUSEPORT, or not ours)."""


def server_options(settings: Settings, *, reuse_port: bool) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        ("grpc.max_connection_age_ms", int(settings.grpc_max_connection_age * 1000)),
        ("grpc.max_connection_age_grace_ms", int(settings.shutdown_grace * 1000)),
        # Keepalive enforcement (README "Operating it"): ping idle connections so a dead
        # peer is noticed, and GOAWAY a client that pings more often than allowed.
        ("grpc.keepalive_time_ms", int(settings.grpc_keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.grpc_keepalive_timeout * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        (
            "grpc.http2.min_ping_interval_without_data_ms",
            int(settings.grpc_keepalive_min_ping_interval * 1000),
        ),
        ("grpc.http2.max_ping_strikes", 2),
    ]


@dataclass
class BlogServer:
    """One server: its database, servicers and gRPC server. `start`, then `stop`.

    `db` holds the engines (`db.engine`, `db.read_engine`); `store` opens units of work.
    """

    settings: Settings
    reuse_port: bool = False
    port: int = 0
    # Tracing set up by the caller (tests: an in-memory exporter); by default from
    # the environment (OTEL_EXPORTER_OTLP_ENDPOINT).
    tracing: Tracing | None = None
    db: Database = field(init=False)
    store: Store = field(init=False)
    health: health.aio.HealthServicer = field(init=False)
    observability: Observability = field(init=False)
    _server: grpc.aio.Server | None = field(default=None, init=False)
    _readiness: ReadinessMonitor | None = field(default=None, init=False)
    _purger: Purger | None = field(default=None, init=False)
    _refreeze: asyncio.TimerHandle | None = field(default=None, init=False)
    drain: Drain = field(default_factory=Drain, init=False)
    _files: FileReloader | None = field(default=None, init=False)

    async def start(self, *, migrate: bool = False) -> None:
        settings = self.settings
        self.observability = Observability.from_settings(settings, tracing=self.tracing)
        metrics = self.observability.metrics
        self.db = Database(settings)
        self.store = Store(self.db, on_error=metrics.count_db_error if metrics else None)
        if metrics is not None:
            instrument_pool(self.db.engine, metrics, "primary", settings.db_max_overflow)
            if self.db.read_engine is not self.db.engine:
                instrument_pool(self.db.read_engine, metrics, "replica", settings.db_max_overflow)
            metrics.stream_limit.set(settings.effective_stream_max_concurrent)
        try:
            await self._check_schema(migrate=migrate)
            tokens = await self._token_codec()
        except BaseException:
            await self.db.dispose()
            raise
        streams = StreamLimiter(
            settings.effective_stream_max_concurrent,
            metrics.active_streams if metrics is not None else None,
        )
        try:
            authenticator = Authenticator.from_file(settings.auth_tokens_file)
        except BaseException:
            await self.db.dispose()
            raise
        self._files = FileReloader(settings.file_reload_interval)
        if settings.auth_tokens_file is not None:
            self._files.watch("AUTH_TOKENS_FILE", [settings.auth_tokens_file], authenticator.reload)
        factory = HandlerFactory(
            authenticator=authenticator,
            idle_timeout=settings.stream_idle_timeout,
            observability=self.observability,
            default_call_timeout=settings.default_call_timeout,
            max_concurrent_rpcs=settings.max_concurrent_rpcs,
            drain=self.drain,
        )
        users = UserServicer(store=self.store, tokens=tokens, streams=streams, settings=settings)
        posts = PostServicer(store=self.store, tokens=tokens, streams=streams, settings=settings)
        server = grpc.aio.server(options=server_options(settings, reuse_port=self.reuse_port))
        server.add_generic_rpc_handlers(
            [
                factory.service(USER_SERVICE, users),
                factory.service(POST_SERVICE, posts),
            ]
        )
        self.health = health.aio.HealthServicer()
        # Health and reflection are counted (and logged at DEBUG) like every call.
        observed = self.observability.observed(server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, observed)  # type: ignore[arg-type]
        if settings.reflection:
            names = (*READINESS_SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME)
            reflection_pb2_grpc.add_ServerReflectionServicer_to_server(  # type: ignore[no-untyped-call]
                reflection.aio.ReflectionServicer(names), observed
            )
        try:
            self.port = self._bind(server)
        except BaseException:
            await self.db.dispose()
            raise
        self._server = server
        self.observability.start()
        await server.start()
        await self.health.set("", SERVING)
        for name in READINESS_SERVICES:
            await self.health.set(name, NOT_SERVING)
        readiness_changed = None
        if metrics is not None:
            gauge = metrics.readiness

            def readiness_changed(name: str, ready: bool) -> None:
                gauge.labels(name).set(1 if ready else 0)

            for name in READINESS_SERVICES:
                gauge.labels(name).set(0)
        self._readiness = ReadinessMonitor(
            settings, self.health, READINESS_SERVICES, on_change=readiness_changed
        )
        await self._readiness.start()
        self._purger = Purger(settings, self.store)
        self._purger.start()
        self._files.start()
        _freeze_heap()
        self._refreeze = asyncio.get_running_loop().call_later(30.0, _freeze_heap)
        log.info(
            "serving on %s (port %d), database %s",
            settings.grpc_listen,
            self.port,
            self.db.engine.url.render_as_string(hide_password=True),
        )

    def _bind(self, server: grpc.aio.Server) -> int:
        settings = self.settings
        unresolved = resolves(settings.grpc_listen)
        if unresolved is not None:
            raise ListenError(unresolved)
        try:
            if settings.tls_cert_file is None or settings.tls_key_file is None:
                port = server.add_insecure_port(settings.grpc_listen)
            else:
                # Dynamic credentials: a reload (SIGHUP, changed files) serves the new
                # certificate to new connections without a restart.
                tls = TlsCertificates(
                    settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
                )
                assert self._files is not None
                self._files.watch("the TLS certificate", tls.paths, tls.reload)
                port = server.add_secure_port(settings.grpc_listen, tls.credentials())
        except RuntimeError:  # grpcio raises "Failed to bind to address ..."
            port = 0
        if port == 0:
            raise ListenError(describe_listen_failure(settings.grpc_listen))
        return port

    def reload_files(self) -> None:
        """SIGHUP: re-read AUTH_TOKENS_FILE and the TLS certificate and key now."""
        if self._files is not None:
            self._files.reload_all()

    async def _check_schema(self, *, migrate: bool) -> None:
        if migrate:
            await upgrade(self.db.engine, lock_timeout=self.settings.migration_lock_timeout)
        status = await schema_status(self.db.engine)
        if status.state is SchemaState.BEHIND:
            raise SchemaBehindError(
                f"the database schema is behind: it is at {describe_revisions(status.database)}"
                f", this release needs {describe_revisions(status.code)}: run "
                f"`{command()} migrate` first, or start with `{command()} serve --migrate`"
            )
        if status.state is SchemaState.AHEAD:
            log.warning(
                "the database schema is ahead of this release (%s; this release knows %s): "
                "serving anyway (migrations are expand/contract)",
                describe_revisions(status.database),
                describe_revisions(status.code),
            )

    async def _token_codec(self) -> TokenCodec:
        async def load_db_keys() -> list[tuple[str, bytes]]:
            # From the primary: a replica may not have the key this process just made.
            async with self.store.unit_of_work("write") as uow:
                return await uow.token_keys.all()

        env_keys: list[tuple[str, bytes]] = []
        if self.settings.page_token_secret is not None:
            env_keys = TokenCodec.env_keys(self.settings.page_token_secret.get_secret_value())
        if not env_keys:
            async with self.store.unit_of_work() as uow:
                await uow.token_keys.ensure_default()
        db_keys = await load_db_keys()

        async def reload() -> list[tuple[str, bytes]]:
            return [*env_keys, *(await load_db_keys())]

        return TokenCodec([*env_keys, *db_keys], reload)

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING and new calls UNAVAILABLE at once; calls in flight get the
        grace; what still runs at its end is ended UNAVAILABLE; then stop and dispose.

        Never CANCELLED (API.md, shutdown): `server.stop` cancels calls gRPC has queued
        but not handed to a handler yet (grpc/grpc#41785) and, at its grace, every call
        still running; so it is called only once the queue had time to empty, and
        streams are ended by the service before its grace runs out (DECISIONS.md 26)."""
        grace = self.settings.shutdown_grace if grace is None else grace
        deadline = time.monotonic() + grace
        # Streams still running are ended this long before the grace runs out, so their
        # statuses go out and their sessions close before the process must be gone.
        margin = min(2.0, grace / 3)
        server, self._server = self._server, None
        if server is not None:
            await self.health.enter_graceful_shutdown()  # every name NOT_SERVING
            self.drain.begin()
        if self._readiness is not None:
            await self._readiness.stop()
        if self._purger is not None:
            await self._purger.stop()
        if self._refreeze is not None:
            self._refreeze.cancel()
        if self._files is not None:
            await self._files.stop()
        if server is not None:
            started = time.monotonic()
            in_flight = self.drain.in_flight
            quiet = await self.drain.wait_quiet(
                quiet=DRAIN_QUIET, quiet_max=DRAIN_QUIET_MAX, until=deadline - margin
            )
            log.info(
                "drained unary calls in %.2fs (%d in flight at the signal, queue %s, "
                "%d refused calls parked)",
                time.monotonic() - started,
                in_flight,
                "empty" if quiet else "still receiving",
                self.drain.parked,
            )
            loop = asyncio.get_running_loop()
            ender = loop.call_later(max(0.0, deadline - margin - time.monotonic()), self._end_all)
            stopping = loop.create_task(server.stop(max(0.0, deadline - time.monotonic())))
            try:
                # Once gRPC has begun to stop (GOAWAY sent, no call queued any more),
                # answer the parked calls UNAVAILABLE.
                await asyncio.wait({stopping}, timeout=0.05)
                self.drain.release()
                await stopping
            finally:
                ender.cancel()
        await self.db.dispose()
        await self.observability.stop()

    def _end_all(self) -> None:
        if self.drain.in_flight:
            log.info("grace ends: ending %d calls UNAVAILABLE", self.drain.in_flight)
        self.drain.end_all()


def _freeze_heap() -> None:
    """Move what start-up (and, the second time, warm-up) allocated out of the garbage
    collector's view: a full collection over ~100k long-lived objects took 70 ms, a
    pause every request in flight waits out."""
    gc.collect()
    gc.freeze()


async def serve(settings: Settings, *, migrate: bool = False, reuse_port: bool = False) -> None:
    """Run until SIGTERM or SIGINT, then drain within SHUTDOWN_GRACE."""
    server = BlogServer(settings, reuse_port=reuse_port)
    await server.start(migrate=migrate)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload_files)
    await stopping.wait()
    log.info("shutting down: draining for up to %gs", settings.shutdown_grace)
    await server.stop()
    log.info("stopped")
