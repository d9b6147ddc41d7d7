"""The service behind a real PgBouncer 1.18 in transaction mode (DB_PGBOUNCER=true)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import text

from blog.v1 import user_pb2
from conftest import _migrate, running_server, settings_for
from factories import create_user_request
from support.pgbouncer import PgBouncer, start_pgbouncer
from support.postgres import PostgresServer, raw_dsn

pytestmark = pytest.mark.usefixtures("integration_binaries")

ROOT = Path(__file__).resolve().parents[2]
POOL = 4


def test_the_api_suite_passes_through_pgbouncer() -> None:
    """Every API test (each method, streams, idempotency, concurrency) through the pooler:
    tests/api on the `pgbouncer` backend, in its own pytest run."""
    env = {**os.environ, "TEST_BACKENDS": "pgbouncer"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/api", "-q", "-p", "no:cacheprovider", "-x"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=480,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


@pytest.fixture(scope="module")
async def pooled(postgres: PostgresServer) -> AsyncIterator[tuple[str, str, PgBouncer]]:
    """(direct URL, URL through PgBouncer, the pooler) of a fresh migrated database."""
    url = postgres.create_database()
    await _migrate(url)
    bouncer = start_pgbouncer(postgres.admin_url, default_pool_size=POOL)
    try:
        yield url, bouncer.url_for(url), bouncer
    finally:
        bouncer.close()
        postgres.drop_database(url)


async def server_connections(direct_url: str) -> int:
    connection = await asyncpg.connect(raw_dsn(direct_url))
    try:
        count: int = await connection.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
        )
        return count
    finally:
        await connection.close()


async def test_many_clients_share_a_few_server_connections(pooled) -> None:
    direct, through, _ = pooled
    settings = settings_for(through, db_pgbouncer=True, db_pool_size=10, stream_max_concurrent=2)
    async with running_server(settings) as live:
        created = await asyncio.gather(
            *(live.users.CreateUser(create_user_request()) for _ in range(40))
        )
        # The service's pool opened more than PgBouncer's pool holds...
        assert live.server.db.engine.pool.size() == 10
        assert live.server.db.engine.pool.checkedin() > POOL
        # ...yet PostgreSQL saw at most the pooler's pool (plus the readiness probe's
        # own transaction going through the same pool).
        assert await server_connections(direct) <= POOL
        got = await asyncio.gather(
            *(live.users.GetUser(user_pb2.GetUserRequest(id=u.id)) for u in created)
        )
        assert [g.id for g in got] == [u.id for u in created]


async def test_timeouts_take_effect_per_transaction_behind_the_pooler(pooled) -> None:
    """PgBouncer refuses startup parameters: the statement timeout and the idle backstop
    are set with SET LOCAL in every transaction, and do not leak past it."""
    _, through, _ = pooled
    settings = settings_for(
        through, db_pgbouncer=True, db_statement_timeout=0.25, stream_idle_timeout=5.0
    )
    async with running_server(settings) as live:
        engine = live.server.db.engine
        async with engine.connect() as connection:
            timeout = await connection.scalar(text("SHOW statement_timeout"))
            idle = await connection.scalar(text("SHOW idle_in_transaction_session_timeout"))
            assert (timeout, idle) == ("250ms", "40s")
            with pytest.raises(Exception, match="statement timeout"):
                await connection.execute(text("SELECT pg_sleep(2)"))
        # A raw connection through the same pooler sees none of it: SET LOCAL ended.
        raw = await asyncpg.connect(raw_dsn(through), statement_cache_size=0)
        try:
            async with raw.transaction():
                assert await raw.fetchval("SHOW statement_timeout") == "0"
        finally:
            await raw.close()
        # Readiness (its own probe engine) is SERVING through the pooler too.
        health = health_pb2_grpc.HealthStub(live.channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service="blog.v1.UserService"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # Calls work as usual after a statement was cancelled on a shared connection.
        created = await live.users.CreateUser(create_user_request())
        assert created.id > 0
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await live.users.GetUser(user_pb2.GetUserRequest(id=created.id + 10**9))
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND
