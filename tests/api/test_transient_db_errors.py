"""PostgreSQL's transient errors, mapped by SQLSTATE (API.md, Errors; DESIGN.md "Transient
database errors"): deadlocks are retried inside the service, a statement timeout is
DEADLINE_EXCEEDED, a lock timeout and a read-only primary are UNAVAILABLE; never INTERNAL.

Each test makes a database of its own (its settings are changed with ALTER DATABASE),
and a second connection, played by the test, holds the locks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from blog.v1 import user_pb2
from conftest import _migrate, running_server, settings_for
from errors import check_error, expect_error
from factories import create_user_request, unique
from support.postgres import PostgresServer, raw_dsn

Code = grpc.StatusCode
# The test's own key, so a server can start on a read-only database (no key to create).
SECRET = "transient-db-errors-test-secret-0123456789"

Database = Callable[..., Awaitable[str]]


@pytest.fixture
async def database(postgres: PostgresServer) -> AsyncIterator[Database]:
    """Make a migrated database, then apply `ALTER DATABASE ... SET name = value` for
    each keyword (new connections see them)."""
    made: list[str] = []

    async def make(**settings: str) -> str:
        url = postgres.create_database()
        made.append(url)
        await _migrate(url)
        name = url.rsplit("/", 1)[1]
        conn = await asyncpg.connect(raw_dsn(url))
        try:
            for setting, value in settings.items():
                await conn.execute(f"ALTER DATABASE \"{name}\" SET {setting} = '{value}'")
        finally:
            await conn.close()
        return url

    yield make
    for url in made:
        postgres.drop_database(url)


async def _insert_user(conn: Any, username: str) -> None:
    await conn.execute(
        "INSERT INTO users (username, email, email_normalized, display_name, bio,"
        " create_time, update_time, version) VALUES ($1, $2, $2, '', '', now(), now(), 1)",
        username,
        f"{username}@example.com",
    )


async def _wait_for_service_lock_wait(conn: Any) -> None:
    """Until a service connection waits on a lock (the test's connection holds it)."""
    for _ in range(500):
        waiting = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'blog-service' AND wait_event_type = 'Lock'"
        )
        if waiting:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the service never waited on the lock")


async def test_a_deadlock_is_retried_and_the_batch_succeeds(database: Database) -> None:
    """The service's batch and the test's transaction take two username index entries in
    opposite orders: PostgreSQL picks the service as the deadlock victim (its
    deadlock_timeout fires first), the service runs the batch again, and it succeeds."""
    url = await database()
    first, second = sorted([unique(), unique()])
    batch = user_pb2.BatchCreateUsersRequest(
        requests=[create_user_request(username=first), create_user_request(username=second)]
    )
    async with running_server(settings_for(url)) as live:
        blocker = await asyncpg.connect(raw_dsn(url))
        try:
            await blocker.execute("SET deadlock_timeout = '30s'")  # so the service is the victim
            transaction = blocker.transaction()
            await transaction.start()
            await _insert_user(blocker, second)  # the service inserts `first`, then waits here
            call = asyncio.ensure_future(live.users.BatchCreateUsers(batch, timeout=20))
            await _wait_for_service_lock_wait(blocker)
            await _insert_user(blocker, first)  # waits on the service: a deadlock
            await transaction.rollback()
            response = await call
        finally:
            await blocker.close()
    assert [u.username for u in response.users] == [first, second]


async def test_batches_with_crossing_usernames_never_fail_internally(database: Database) -> None:
    """The same two users in opposite orders, and two batches whose emails cross (which
    no insert order can untangle), raced 30 times: one batch wins, the other is told
    what clashed; never INTERNAL, never a conflict the service's retries could absorb."""
    url = await database(deadlock_timeout="50ms")
    async with running_server(settings_for(url)) as live:
        for _ in range(30):
            a, b = create_user_request(), create_user_request()
            forward = user_pb2.BatchCreateUsersRequest(requests=[a, b])
            backward = user_pb2.BatchCreateUsersRequest(requests=[b, a])
            x, y = f"{unique()}@example.com", f"{unique()}@example.com"
            crossed = [
                user_pb2.BatchCreateUsersRequest(
                    requests=[create_user_request(email=x), create_user_request(email=y)]
                ),
                user_pb2.BatchCreateUsersRequest(
                    requests=[create_user_request(email=y), create_user_request(email=x)]
                ),
            ]
            for pair, reason in (([forward, backward], "USERNAME_TAKEN"), (crossed, "EMAIL_TAKEN")):
                results = await asyncio.gather(
                    *(live.users.BatchCreateUsers(r, timeout=20) for r in pair),
                    return_exceptions=True,
                )
                failures = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
                assert len(failures) == 1, results
                check_error(failures[0], Code.ALREADY_EXISTS, reason)


async def test_the_database_statement_timeout_is_deadline_exceeded(database: Database) -> None:
    url = await database()
    async with running_server(settings_for(url, db_statement_timeout=0.3)) as live:
        user = await live.users.CreateUser(create_user_request())
        blocker = await asyncpg.connect(raw_dsn(url))
        try:
            async with blocker.transaction():
                await blocker.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user.id)
                await expect_error(
                    live.users.UpdateUser(_set_bio(user.id), timeout=20),
                    Code.DEADLINE_EXCEEDED,
                    "DATABASE_TIMEOUT",
                )
        finally:
            await blocker.close()
        # The connection was fine: the next call works.
        assert (await live.users.UpdateUser(_set_bio(user.id))).bio == "changed"


async def test_a_lock_timeout_is_unavailable(database: Database) -> None:
    """DECISIONS.md 22: the call did nothing and may be sent again as it is."""
    url = await database(lock_timeout="200ms")
    async with running_server(settings_for(url)) as live:
        user = await live.users.CreateUser(create_user_request())
        blocker = await asyncpg.connect(raw_dsn(url))
        try:
            async with blocker.transaction():
                await blocker.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user.id)
                error = await expect_error(
                    live.users.UpdateUser(_set_bio(user.id), timeout=20),
                    Code.UNAVAILABLE,
                    "DATABASE_UNAVAILABLE",
                )
                assert error.retry_info is not None
        finally:
            await blocker.close()
        assert (await live.users.UpdateUser(_set_bio(user.id))).bio == "changed"


async def test_a_read_only_primary_is_unavailable(database: Database) -> None:
    """A primary that came back as a standby after a failover refuses writes (25006)."""
    url = await database(default_transaction_read_only="on")
    async with running_server(settings_for(url, page_token_secret=SECRET)) as live:
        for call in (
            live.users.CreateUser(create_user_request()),
            live.users.BatchCreateUsers(
                user_pb2.BatchCreateUsersRequest(requests=[create_user_request()])
            ),
        ):
            error = await expect_error(call, Code.UNAVAILABLE, "DATABASE_UNAVAILABLE")
            assert error.retry_info is not None
        # Reads still work.
        assert list((await live.users.ListUsers(user_pb2.ListUsersRequest())).users) == []


def _set_bio(user_id: int) -> user_pb2.UpdateUserRequest:
    return user_pb2.UpdateUserRequest(
        user=user_pb2.User(id=user_id, bio="changed"), update_mask=FieldMask(paths=["bio"])
    )
