"""`python -m service serve|migrate` as real subprocesses: schema checks, signals, workers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from blog.v1 import user_pb2, user_pb2_grpc
from factories import create_user_request
from service.config import Settings
from service.db.engine import create_engine
from service.db.migrations import SchemaState, schema_status
from support.metrics import call_labels, scrape
from support.postgres import PostgresServer, free_port

ROOT = Path(__file__).resolve().parents[2]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
READINESS = ("blog.v1.UserService", "blog.v1.PostService")
GRACE = 1.0
START_TIMEOUT = 30.0  # an interpreter importing grpc and SQLAlchemy, on a busy machine
EXIT_MARGIN = 5.0


def _clean_environment() -> dict[str, str]:
    """The caller's environment without any setting the service would read."""
    names = {name.upper() for name in Settings.model_fields}
    return {k: v for k, v in os.environ.items() if k.upper() not in names}


@dataclass
class Proc:
    """One `python -m service ...` process, its output going to files."""

    args: tuple[str, ...]
    popen: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path
    port: int | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")

    def describe(self) -> str:
        return f"`{' '.join(self.args)}` (rc={self.popen.poll()}):\n{self.output()[-4000:]}"

    async def wait(self, within: float) -> int:
        deadline = time.monotonic() + within
        while (code := self.popen.poll()) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"still running after {within}s: {self.describe()}")
            await asyncio.sleep(0.05)
        return code


@dataclass
class Launcher:
    tmp_path: Path
    env: dict[str, str]
    started: list[Proc] = field(default_factory=list)

    def run(self, *args: str, port: int | None = None, **env: str) -> Proc:
        index = len(self.started)
        stdout = self.tmp_path / f"proc{index}.out"
        stderr = self.tmp_path / f"proc{index}.err"
        environment = {**self.env, **env}
        if port is not None:
            environment["GRPC_LISTEN"] = f"127.0.0.1:{port}"
        with stdout.open("wb") as out, stderr.open("wb") as err:
            popen = subprocess.Popen(
                [sys.executable, "-m", "service", *args],
                cwd=ROOT,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        proc = Proc(("python -m service", *args), popen, stdout, stderr, port)
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        """Kill what this test started and is still running (children first)."""
        for proc in self.started:
            if proc.popen.poll() is not None:
                continue
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(proc.pid).children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        child.kill()
            proc.popen.kill()
            proc.popen.wait(10)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'blog.db'}"


@pytest.fixture
def launcher(tmp_path: Path, sqlite_url: str) -> Iterator[Launcher]:
    env = _clean_environment()
    env.update(
        DATABASE_URL=sqlite_url,
        SHUTDOWN_GRACE=str(GRACE),
        HEALTH_CHECK_INTERVAL="0.5",
        LOG_LEVEL="INFO",
        PYTHONUNBUFFERED="1",
    )
    launched = Launcher(tmp_path, env)
    try:
        yield launched
    finally:
        launched.stop_all()


@contextlib.asynccontextmanager
async def channel_to(port: int) -> AsyncIterator[grpc.aio.Channel]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        await channel.close()


async def wait_serving(proc: Proc, within: float = START_TIMEOUT) -> None:
    """Poll health until liveness and readiness are SERVING; fail if the process exits."""
    assert proc.port is not None
    deadline = time.monotonic() + within
    last: object = None
    async with channel_to(proc.port) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc.popen.poll() is not None:
                raise AssertionError(f"exited before serving: {proc.describe()}")
            try:
                statuses = [
                    (await stub.Check(health_pb2.HealthCheckRequest(service=s), timeout=1.0)).status
                    for s in ("", *READINESS)
                ]
                if all(status == SERVING for status in statuses):
                    return
                last = statuses
            except grpc.aio.AioRpcError as error:
                last = error.code()
            if time.monotonic() > deadline:
                raise AssertionError(f"not serving after {within}s ({last}): {proc.describe()}")
            await asyncio.sleep(0.1)


async def create_and_get(channel: grpc.aio.Channel) -> None:
    users = user_pb2_grpc.UserServiceStub(channel)
    created = await users.CreateUser(create_user_request(), timeout=10.0)
    assert await users.GetUser(user_pb2.GetUserRequest(id=created.id), timeout=10.0) == created


async def stop_with(proc: Proc, signum: int, within: float = GRACE + EXIT_MARGIN) -> float:
    """Send a signal; return how long the process took to exit, asserting exit code 0."""
    started = time.monotonic()
    proc.popen.send_signal(signum)
    code = await proc.wait(within)
    assert code == 0, proc.describe()
    return time.monotonic() - started


# --------------------------------------------------------------------------- schema


async def test_serve_refuses_an_empty_database(launcher: Launcher) -> None:
    proc = launcher.run("serve", port=free_port())
    code = await proc.wait(START_TIMEOUT)
    assert code == 2, proc.describe()
    assert "python -m service migrate" in proc.output()


async def test_migrate_then_serve(launcher: Launcher, sqlite_url: str) -> None:
    migrate = launcher.run("migrate")
    assert await migrate.wait(START_TIMEOUT) == 0, migrate.describe()
    engine = create_engine(Settings(database_url=sqlite_url))
    try:
        assert (await schema_status(engine)).state is SchemaState.CURRENT
    finally:
        await engine.dispose()
    # Twice is fine: migrate is idempotent.
    again = launcher.run("migrate")
    assert await again.wait(START_TIMEOUT) == 0, again.describe()

    long_grace = 10.0
    proc = launcher.run("serve", port=free_port(), SHUTDOWN_GRACE=str(long_grace))
    await wait_serving(proc)
    assert proc.port is not None
    async with channel_to(proc.port) as channel:
        await create_and_get(channel)
    # Nothing in flight: the server stops at once instead of waiting out the grace.
    took = await stop_with(proc, signal.SIGTERM, within=long_grace + EXIT_MARGIN)
    assert took < long_grace / 2, f"an idle server took {took:.1f}s to stop"


async def test_serve_migrate_flag_migrates_first(launcher: Launcher, sqlite_url: str) -> None:
    proc = launcher.run("serve", "--migrate", port=free_port())
    await wait_serving(proc)
    assert proc.port is not None
    async with channel_to(proc.port) as channel:
        await create_and_get(channel)
    await stop_with(proc, signal.SIGINT)
    engine = create_engine(Settings(database_url=sqlite_url))
    try:
        assert (await schema_status(engine)).state is SchemaState.CURRENT
    finally:
        await engine.dispose()


async def test_serve_accepts_a_schema_ahead_with_a_warning(
    launcher: Launcher, tmp_path: Path
) -> None:
    migrate = launcher.run("migrate")
    assert await migrate.wait(START_TIMEOUT) == 0, migrate.describe()
    with contextlib.closing(sqlite3.connect(tmp_path / "blog.db")) as db, db:
        db.execute("UPDATE alembic_version SET version_num = 'ffffffffffff'")
    proc = launcher.run("serve", port=free_port())
    await wait_serving(proc)
    assert "ahead" in proc.output()
    await stop_with(proc, signal.SIGTERM)


# -------------------------------------------------------------------------- signals


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_turns_health_not_serving_and_exits_zero_within_the_grace(
    launcher: Launcher, signum: int
) -> None:
    proc = launcher.run("serve", "--migrate", port=free_port())
    await wait_serving(proc)
    assert proc.port is not None
    async with channel_to(proc.port) as channel:
        # An open Watch is a call in flight that never ends by itself: the server
        # must give it the grace period, then exit anyway.
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        first = await asyncio.wait_for(watch.read(), 5.0)
        assert first.status == SERVING
        started = time.monotonic()
        proc.popen.send_signal(signum)
        changed = await asyncio.wait_for(watch.read(), 5.0)
        assert changed is not grpc.aio.EOF
        assert changed.status == NOT_SERVING
        code = await proc.wait(GRACE + EXIT_MARGIN)
        took = time.monotonic() - started
    assert code == 0, proc.describe()
    assert took < GRACE + EXIT_MARGIN


# -------------------------------------------------------------------------- workers


def _workers_of(pid: int) -> list[psutil.Process]:
    """The spawned worker processes (not multiprocessing's resource tracker)."""
    workers = []
    for child in psutil.Process(pid).children():
        with contextlib.suppress(psutil.Error):
            if "resource_tracker" not in " ".join(child.cmdline()):
                workers.append(child)
    return workers


def _spread_channels(port: int, count: int = 16) -> list[grpc.aio.Channel]:
    """Many connections (a local subchannel pool each, or gRPC would share one): the
    kernel spreads them over both SO_REUSEPORT sockets."""
    return [
        grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        for _ in range(count)
    ]


def _serves_connections(process: psutil.Process, port: int) -> bool:
    return any(
        c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED
        for c in process.net_connections(kind="tcp")
    )


async def test_workers_share_the_port_and_stop_together(launcher: Launcher) -> None:
    port = free_port()
    proc = launcher.run("serve", "--migrate", "--workers", "2", port=port)
    await wait_serving(proc)
    workers = _workers_of(proc.pid)
    assert len(workers) == 2, [w.cmdline() for w in workers]
    channels = _spread_channels(port)
    try:
        await asyncio.gather(*(create_and_get(c) for c in channels))
        assert all(_serves_connections(w, port) for w in workers), "a worker served nothing"
        started = time.monotonic()
        proc.popen.send_signal(signal.SIGTERM)
        code = await proc.wait(GRACE + EXIT_MARGIN)
    finally:
        await asyncio.gather(*(c.close() for c in channels))
    assert code == 0, proc.describe()
    assert time.monotonic() - started < GRACE + EXIT_MARGIN
    for worker in workers:
        assert not worker.is_running(), f"worker {worker.pid} outlived its parent"


async def test_workers_sign_page_tokens_with_the_real_secret(
    launcher: Launcher, sqlite_url: str
) -> None:
    """PAGE_TOKEN_SECRET reaches every worker as it is (not as pydantic's masked form):
    a token a worker issued is accepted by a plain server holding the same secret."""
    secret = "worker-secret-" + uuid.uuid4().hex
    workers_port = free_port()
    workers = launcher.run(
        "serve", "--migrate", "--workers", "2", port=workers_port, PAGE_TOKEN_SECRET=secret
    )
    await wait_serving(workers)
    async with channel_to(workers_port) as channel:
        stub = user_pb2_grpc.UserServiceStub(channel)
        for _ in range(2):
            await create_and_get(channel)
        page = await stub.ListUsers(user_pb2.ListUsersRequest(page_size=1))
    assert page.next_page_token
    await stop_with(workers, signal.SIGTERM)
    plain_port = free_port()
    plain = launcher.run("serve", port=plain_port, PAGE_TOKEN_SECRET=secret)
    await wait_serving(plain)
    async with channel_to(plain_port) as channel:
        following = await user_pb2_grpc.UserServiceStub(channel).ListUsers(
            user_pb2.ListUsersRequest(page_size=1, page_token=page.next_page_token)
        )
    assert len(following.users) == 1
    await stop_with(plain, signal.SIGTERM)


async def test_workers_metrics_one_scrape_sees_every_worker(
    launcher: Launcher, tmp_path: Path
) -> None:
    """`serve --workers 2` with METRICS_LISTEN: the parent serves every worker's counts
    (prometheus-client's multi-process mode, in a directory it makes and removes)."""
    port, metrics_port = free_port(), free_port()
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = launcher.run(
        "serve",
        "--migrate",
        "--workers",
        "2",
        port=port,
        METRICS_LISTEN=f"127.0.0.1:{metrics_port}",
        TMPDIR=str(scratch),
    )
    await wait_serving(proc)
    workers = _workers_of(proc.pid)
    assert len(workers) == 2
    assert next(p.name for p in scratch.iterdir()).startswith("blog-metrics-")
    before = await scrape(metrics_port)
    # Rounds of 16 connections until both workers have served some (the kernel picks a
    # socket per connection, and the second worker may still be starting at first).
    calls = 0
    for _ in range(5):
        channels = _spread_channels(port)
        try:
            await asyncio.gather(*(create_and_get(c) for c in channels))
            await asyncio.gather(
                *(
                    health_pb2_grpc.HealthStub(c).Check(health_pb2.HealthCheckRequest(), timeout=5)
                    for c in channels
                )
            )
            calls += len(channels)
            both = all(_serves_connections(w, port) for w in workers)
        finally:
            await asyncio.gather(*(c.close() for c in channels))
        if both:
            break
    assert both, "a worker served nothing"
    after = await scrape(metrics_port)

    def delta(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    check = call_labels("grpc.health.v1.Health", "Check")
    assert delta("grpc_server_handled_total", **check, grpc_code="OK") == calls
    # Process metrics of each worker, and the gauges summed over both.
    process = {
        labels["worker"] for name, labels, _ in after.samples if name == "process_cpu_seconds_total"
    }
    assert process == {"worker-0", "worker-1"}
    assert after.value("blog_db_pool_size", pool="primary") == 2 * 10
    assert after.value("blog_readiness", service="blog.v1.UserService") == 1
    for method in ("CreateUser", "GetUser"):
        labels = call_labels("blog.v1.UserService", method)
        assert delta("grpc_server_started_total", **labels) == calls, method
        assert delta("grpc_server_handled_total", **labels, grpc_code="OK") == calls, method
        assert delta("grpc_server_handling_seconds_count", **labels) == calls, method
    # Process metrics of each worker, and the gauges summed over both.
    assert {
        labels["worker"] for name, labels, _ in after.samples if name == "process_cpu_seconds_total"
    } == {"worker-0", "worker-1"}
    assert after.value("blog_db_pool_size", pool="primary") == 2 * 10
    assert after.value("blog_readiness", service="blog.v1.UserService") == 1
    await stop_with(proc, signal.SIGTERM)
    assert list(scratch.iterdir()) == [], "the metrics directory outlived the server"


async def test_a_dead_worker_takes_the_server_down(launcher: Launcher) -> None:
    port = free_port()
    proc = launcher.run("serve", "--migrate", "--workers", "2", port=port)
    await wait_serving(proc)
    workers = sorted(_workers_of(proc.pid), key=lambda w: w.pid)
    assert len(workers) == 2
    # Kill the later-started worker: the parent must notice it, whichever it is.
    workers[-1].kill()
    code = await proc.wait(GRACE + EXIT_MARGIN)
    assert code != 0, proc.describe()
    assert not workers[0].is_running(), "the surviving worker was left running"


async def test_second_server_on_a_used_port_fails_loudly(launcher: Launcher) -> None:
    port = free_port()
    first = launcher.run("serve", "--migrate", port=port)
    await wait_serving(first)
    second = launcher.run("serve", port=port)
    code = await second.wait(START_TIMEOUT)
    assert code != 0, second.describe()
    output = second.output()
    assert f"127.0.0.1:{port}" in output
    assert "Traceback" not in output, "a clear message, not a crash"
    # The first server is untouched and still answers every call.
    async with channel_to(port) as channel:
        for _ in range(5):
            await create_and_get(channel)
    await stop_with(first, signal.SIGTERM)


async def test_workers_do_not_share_a_port_held_by_a_plain_server(launcher: Launcher) -> None:
    port = free_port()
    first = launcher.run("serve", "--migrate", port=port)
    await wait_serving(first)
    second = launcher.run("serve", "--workers", "2", port=port)
    code = await second.wait(START_TIMEOUT)
    assert code != 0, second.describe()
    await wait_serving(first, within=5.0)
    await stop_with(first, signal.SIGTERM)


# ---------------------------------------------------------------- migrate, PostgreSQL


async def test_concurrent_migrations_on_postgres_both_succeed(
    launcher: Launcher, postgres: PostgresServer
) -> None:
    url = postgres.create_database()
    try:
        runs = [launcher.run("migrate", DATABASE_URL=url) for _ in range(2)]
        codes = [await run.wait(START_TIMEOUT) for run in runs]
        assert codes == [0, 0], "\n".join(run.describe() for run in runs)
        engine = create_engine(Settings(database_url=url))
        try:
            status = await schema_status(engine)
        finally:
            await engine.dispose()
        assert status.state is SchemaState.CURRENT
    finally:
        postgres.drop_database(url)
