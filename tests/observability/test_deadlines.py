"""Deadlines that reach PostgreSQL, a pool wait bounded by them, and load shedding."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from blog.v1 import user_pb2
from conftest import Backend, Running, postgres_database, running_server, settings_for
from errors import rich
from factories import create_user_request
from support.locks import row_locked, waiting_statements
from support.metrics import scrape
from support.postgres import PostgresServer

SERVING = health_pb2.HealthCheckResponse.SERVING


def _update(user_id: int) -> user_pb2.UpdateUserRequest:
    return user_pb2.UpdateUserRequest(
        user=user_pb2.User(id=user_id, display_name="changed"),
        update_mask={"paths": ["display_name"]},
    )


async def _settled(live: Running, url: str, within: float = 1.0) -> float:
    """Wait until PostgreSQL runs no statement of the service and the pool has nothing
    checked out; return how long that took."""
    started = time.monotonic()
    statements: list[str] = []
    while time.monotonic() - started < within:
        statements = await waiting_statements(url)
        if not statements and live.server.db.engine.pool.checkedout() == 0:  # type: ignore[attr-defined]
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    raise AssertionError(
        f"not settled within {within}s: statements {statements}, "
        f"checked out {live.server.db.engine.pool.checkedout()}"  # type: ignore[attr-defined]
    )


@pytest.fixture(scope="module")
async def postgres_only(postgres: PostgresServer) -> AsyncIterator[Backend]:
    """A PostgreSQL database of its own: row locks and pg_stat_activity are PostgreSQL's."""
    async with postgres_database(postgres) as url:
        yield Backend("postgresql", url)


async def test_a_passed_deadline_cancels_the_statement_on_the_server(
    postgres_only: Backend,
) -> None:
    url = postgres_only.url
    async with running_server(settings_for(url)) as live:
        created = await live.users.CreateUser(create_user_request())
        pool = live.server.db.engine.pool
        pooled = pool.checkedin()  # type: ignore[attr-defined]
        async with row_locked(url, created.id):
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await live.users.UpdateUser(_update(created.id), timeout=0.3)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 1.0
            # Still holding the lock: the statement must be gone from the server, not
            # merely abandoned by the client, and its connection back in the pool.
            await _settled(live, url, within=1.0)
            # Back, not discarded: the pool holds as many connections as before.
            assert pool.checkedin() == pooled  # type: ignore[attr-defined]
        # The connection went back clean: the next call on it works.
        updated = await live.users.UpdateUser(_update(created.id), timeout=5)
        assert updated.display_name == "changed"


async def test_the_database_statement_timeout_is_database_timeout(
    postgres_only: Backend,
) -> None:
    url = postgres_only.url
    async with running_server(settings_for(url, db_statement_timeout=0.3)) as live:
        created = await live.users.CreateUser(create_user_request())
        async with row_locked(url, created.id):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await live.users.UpdateUser(_update(created.id), timeout=5)
        error = rich(caught.value)
        assert error.code is grpc.StatusCode.DEADLINE_EXCEEDED
        assert error.reason == "DATABASE_TIMEOUT"


async def test_a_call_without_a_deadline_gets_default_call_timeout(backend: Backend) -> None:
    # SQLite: a statement waiting on the file lock runs in aiosqlite's thread and cannot
    # be interrupted, so the call ends once SQLITE_BUSY_TIMEOUT gives up.
    settings = settings_for(backend.url, default_call_timeout=0.5, sqlite_busy_timeout=1.0)
    async with running_server(settings) as live:
        created = await live.users.CreateUser(create_user_request())
        async with row_locked(backend.url, created.id):
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await live.users.UpdateUser(_update(created.id))
            took = time.monotonic() - started
            if backend.is_postgres:
                await _settled(live, backend.url, within=1.0)
        error = rich(caught.value)
        assert error.code is grpc.StatusCode.DEADLINE_EXCEEDED
        assert error.reason == "CALL_TIMEOUT"
        assert 0.4 < took < 2.0, took


async def test_an_exhausted_pool_answers_unavailable_or_deadline_whichever_first(
    postgres_only: Backend,
) -> None:
    url = postgres_only.url
    settings = settings_for(url, db_pool_size=1, db_max_overflow=0, db_pool_timeout=0.5)
    async with running_server(settings) as live:
        created = await live.users.CreateUser(create_user_request())
        other = await live.users.CreateUser(create_user_request())
        async with row_locked(url, created.id):
            # The only connection waits on the lock.
            holder = asyncio.ensure_future(live.users.UpdateUser(_update(created.id), timeout=10))
            await asyncio.sleep(0.3)
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await live.users.GetUser(user_pb2.GetUserRequest(id=other.id), timeout=5)
            took = time.monotonic() - started
            error = rich(caught.value)
            assert error.code is grpc.StatusCode.UNAVAILABLE
            assert error.reason == "DATABASE_UNAVAILABLE"
            assert error.retry_info is not None
            assert 0.4 < took < 1.5, took  # DB_POOL_TIMEOUT, not the 5 s deadline

            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await live.users.GetUser(user_pb2.GetUserRequest(id=other.id), timeout=0.2)
            took = time.monotonic() - started
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert took < 0.45, took  # the deadline, before DB_POOL_TIMEOUT
        await holder
        await _settled(live, url)


async def test_max_concurrent_rpcs_sheds_but_never_health(backend: Backend) -> None:
    settings = settings_for(backend.url, max_concurrent_rpcs=1, metrics_listen="127.0.0.1:0")
    async with running_server(settings) as live:
        created = await live.users.CreateUser(create_user_request())
        port = live.server.observability.metrics_port
        assert port is not None
        async with row_locked(backend.url, created.id):
            holder = asyncio.ensure_future(live.users.UpdateUser(_update(created.id), timeout=10))
            await asyncio.sleep(0.3)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await live.users.GetUser(user_pb2.GetUserRequest(id=created.id), timeout=5)
            error = rich(caught.value)
            assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error.reason == "OVERLOADED"
            assert error.retry_info is not None
            health = health_pb2_grpc.HealthStub(live.channel)
            for service in ("", "blog.v1.UserService"):
                response = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert response.status == SERVING
        await holder
        # The slot is free again.
        await live.users.GetUser(user_pb2.GetUserRequest(id=created.id), timeout=5)
        seen = await scrape(port)
    assert seen.value("blog_rpcs_shed_total", grpc_method="GetUser") == 1
    assert (
        seen.value(
            "grpc_server_handled_total", grpc_method="GetUser", grpc_code="ResourceExhausted"
        )
        == 1
    )
