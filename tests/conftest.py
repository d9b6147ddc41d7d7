"""Test harness: real PostgreSQL and SQLite, a real server on a loopback port, real channels.

The API suites run once per backend (the `backend` fixture is parametrised). Each
backend gets a database made for this run and migrated with the real migrations;
tests stay apart by unique data (tests/factories.py), not by rollback tricks.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, Phase
from hypothesis import settings as hypothesis_settings

from blog.v1 import post_pb2_grpc, user_pb2_grpc
from service.config import Settings
from service.db.engine import create_engine
from service.db.migrations import upgrade
from service.logs import JsonFormatter
from service.server import BlogServer
from support.postgres import PostgresServer, ensure_postgres

# TEST_BACKENDS picks the backends (comma-separated); `make test` runs the default two.
# `pgbouncer` is PostgreSQL behind a real PgBouncer in transaction mode with
# DB_PGBOUNCER=true; the integration suite runs tests/api on it (Debian's pgbouncer).
BACKENDS = tuple(
    name.strip() for name in os.environ.get("TEST_BACKENDS", "postgresql,sqlite").split(",")
)
# Behind PgBouncer: its pool is smaller than the service's (10 + 10 overflow), so server
# connections really are shared, and larger than STREAM_MAX_CONCURRENT, since a stream
# holds its server connection for its whole life.
PGBOUNCER_POOL_SIZE = 8
PGBOUNCER_STREAMS = 6

# Settings a backend's server needs (DB_PGBOUNCER behind the pooler), by database URL:
# settings_for() applies them under the test's own overrides.
_BACKEND_SETTINGS: dict[str, dict[str, Any]] = {}

# Property tests (tests/property): few examples in `make test`, the same ones every run
# (derandomize), so the suite stays bounded and a CI failure reproduces locally. No
# shrinking there: against a database it can take minutes; the failing example is
# printed as drawn. HYPOTHESIS_PROFILE=long explores many more examples from random
# seeds and shrinks what fails (rerun with the printed @reproduce_failure blob).
hypothesis_settings.register_profile(
    "default",
    max_examples=25,
    deadline=None,
    derandomize=True,
    print_blob=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow],
)
hypothesis_settings.register_profile(
    "long",
    max_examples=400,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
# Bearer tokens and passwords the suite uses: none may ever reach a log line.
SECRETS: set[str] = {"alice-token", "bob-token", "wrong-token"}


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # a record that cannot be formatted is not a leak
            self.handleError(record)


@pytest.fixture(scope="session", autouse=True)
def suite_log() -> Iterator[_Lines]:
    """Every log line of the suite, access log (INFO) included; at the end, none of them
    holds a test token or password (README "Operating it": never a token or password)."""
    handler = _Lines()
    root = logging.getLogger()
    access = logging.getLogger("service.access")
    level = access.level
    root.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        access.setLevel(level)
    text = "\n".join(handler.lines)
    leaked = sorted(secret for secret in SECRETS if secret in text)
    assert not leaked, f"secrets in the suite's log: {leaked}"


@pytest.fixture(scope="session")
def postgres(pytestconfig: pytest.Config) -> Iterator[PostgresServer]:
    def announce(line: str) -> None:
        """On the terminal even under -q and output capture, like pytest's own lines."""
        reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
        capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
        if reporter is None or capture is None:
            print(line, file=sys.__stderr__, flush=True)
            return
        with capture.global_and_fixture_disabled():
            reporter.write_line("")
            reporter.write_line(line, yellow=True)

    server = ensure_postgres(announce=announce)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def integration_binaries() -> None:
    """The integration suite (tests/integration) needs Debian's `pgbouncer` and
    PostgreSQL's server binaries (`postgresql`: initdb, pg_ctl, pg_basebackup). Without
    them its tests error naming the packages to install: they fail, never skip."""
    from support.pgbouncer import find_pgbouncer
    from support.postgres import require_bindir

    missing: list[str] = []
    for check in (find_pgbouncer, require_bindir):
        try:
            check()
        except RuntimeError as error:
            missing.append(str(error))
    if missing:
        raise RuntimeError("; ".join(missing))


@dataclass
class Backend:
    name: str
    url: str
    # The database itself, bypassing any pooler: for tests' own helper connections
    # (pg_stat_activity, seeding, a competing transaction).
    direct_url: str = ""
    # The most streams the backend can hold open at once (None: the service's limits).
    max_streams: int | None = None

    def __post_init__(self) -> None:
        self.direct_url = self.direct_url or self.url

    @property
    def is_postgres(self) -> bool:
        return self.name in ("postgresql", "pgbouncer")


@pytest.fixture(scope="session", params=BACKENDS)
async def backend(
    request: pytest.FixtureRequest, postgres: PostgresServer
) -> AsyncIterator[Backend]:
    if request.param == "postgresql":
        async with postgres_database(postgres) as url:
            yield Backend("postgresql", url)
    elif request.param == "pgbouncer":
        from support.pgbouncer import start_pgbouncer

        url = postgres.create_database()
        # Migrations connect to the primary directly, never through the pooler.
        await _migrate(url)
        bouncer = start_pgbouncer(postgres.admin_url, default_pool_size=PGBOUNCER_POOL_SIZE)
        pooled = bouncer.url_for(url)
        _BACKEND_SETTINGS[pooled] = {
            "db_pgbouncer": True,
            "stream_max_concurrent": PGBOUNCER_STREAMS,
        }
        try:
            yield Backend("pgbouncer", pooled, direct_url=url, max_streams=PGBOUNCER_STREAMS)
        finally:
            bouncer.close()
            postgres.drop_database(url)
    elif request.param == "sqlite":
        with tempfile.TemporaryDirectory(prefix="blogtest-") as directory:
            url = f"sqlite+aiosqlite:///{Path(directory) / 'blog.db'}"
            await _migrate(url)
            yield Backend("sqlite", url)
    else:
        raise ValueError(f"TEST_BACKENDS names an unknown backend {request.param!r}")


@asynccontextmanager
async def postgres_database(postgres: PostgresServer) -> AsyncIterator[str]:
    """A migrated PostgreSQL database made for the caller, dropped afterwards."""
    url = postgres.create_database()
    try:
        await _migrate(url)
        yield url
    finally:
        postgres.drop_database(url)


async def _migrate(url: str) -> None:
    engine = create_engine(Settings(database_url=url))
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()


def settings_for(url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": url,
        "grpc_listen": "127.0.0.1:0",
        "shutdown_grace": 2.0,
        "health_check_interval": 0.5,
        "log_level": os.environ.get("TEST_LOG_LEVEL", "WARNING"),
        **_BACKEND_SETTINGS.get(url, {}),
    }
    values.update(overrides)
    return Settings(**values)


@dataclass
class Running:
    """A started server and a channel to it."""

    server: BlogServer
    channel: grpc.aio.Channel

    @property
    def users(self) -> user_pb2_grpc.UserServiceStub:
        return user_pb2_grpc.UserServiceStub(self.channel)

    @property
    def posts(self) -> post_pb2_grpc.PostServiceStub:
        return post_pb2_grpc.PostServiceStub(self.channel)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"


@asynccontextmanager
async def running_server(settings: Settings, **channel_options: Any) -> AsyncIterator[Running]:
    server = BlogServer(settings)
    await server.start()
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{server.port}", options=list(channel_options.items())
    )
    try:
        yield Running(server, channel)
    finally:
        await channel.close()
        await server.stop(grace=1.0)


@pytest.fixture(scope="session")
async def running(backend: Backend) -> AsyncIterator[Running]:
    """The shared server of a backend; most tests use it."""
    async with running_server(settings_for(backend.url)) as live:
        yield live


@pytest.fixture
def users(running: Running) -> user_pb2_grpc.UserServiceStub:
    return running.users


@pytest.fixture
def posts(running: Running) -> post_pb2_grpc.PostServiceStub:
    return running.posts
