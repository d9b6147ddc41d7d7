"""DATABASE_READ_URL on a real streaming replica: a throwaway primary and a
`pg_basebackup -R` hot standby started by the test, each on a free port."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from blog.v1 import user_pb2
from conftest import _migrate, running_server, settings_for
from factories import create_user_request
from support.postgres import Cluster, raw_dsn, start_cluster, start_standby, with_host_port

pytestmark = pytest.mark.usefixtures("integration_binaries")

STRONG = (("x-read-consistency", "strong"),)
# The standby cancels a query that blocks replay for longer than this.
STANDBY_DELAY = "1s"


@dataclass
class Pair:
    primary: Cluster
    standby: Cluster
    primary_url: str  # the test database on the primary
    replica_url: str  # the same database on the standby


@pytest.fixture(scope="module")
def clusters() -> Iterator[tuple[Cluster, Cluster]]:
    primary = start_cluster()
    try:
        standby = start_standby(
            primary,
            {"max_standby_streaming_delay": STANDBY_DELAY, "hot_standby_feedback": "off"},
        )
    except BaseException:
        primary.destroy()
        raise
    try:
        yield primary, standby
    finally:
        standby.destroy()
        primary.destroy()


@pytest.fixture(scope="module")
async def pair(clusters: tuple[Cluster, Cluster]) -> Pair:
    primary, standby = clusters
    url = primary.create_database()
    await _migrate(url)
    replica = with_host_port(url, "127.0.0.1", standby.port)
    await eventually(lambda: _replayed(replica), 30.0, "the standby replays the migrated database")
    return Pair(primary, standby, url, replica)


async def _replayed(url: str) -> bool:
    try:
        connection = await asyncpg.connect(raw_dsn(url), timeout=2)
    except (OSError, asyncpg.PostgresError):
        return False
    try:
        return bool(await connection.fetchval("SELECT to_regclass('users') IS NOT NULL"))
    finally:
        await connection.close()


async def eventually(check: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        await asyncio.sleep(0.1)


async def fetchval(url: str, sql: str, *args: object) -> object:
    connection = await asyncpg.connect(raw_dsn(url), timeout=5)
    try:
        return await connection.fetchval(sql, *args)
    finally:
        await connection.close()


async def service_connections(url: str) -> int:
    """The service's sessions of the test database on the server `url` points at."""
    value = await fetchval(
        url,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = 'blog-service'",
    )
    assert isinstance(value, int)
    return value


@pytest.fixture
async def paused(pair: Pair) -> AsyncIterator[None]:
    """Replay paused on the standby for the test (the standby lags as far as it likes)."""
    await fetchval(pair.replica_url, "SELECT pg_wal_replay_pause()")
    try:
        yield
    finally:
        await fetchval(pair.replica_url, "SELECT pg_wal_replay_resume()")


async def test_reads_run_on_the_standby_and_writes_on_the_primary(pair: Pair) -> None:
    async with running_server(
        settings_for(pair.primary_url, database_read_url=pair.replica_url)
    ) as live:
        created = await live.users.CreateUser(create_user_request())

        async def visible() -> bool:
            try:
                await live.users.GetUser(user_pb2.GetUserRequest(id=created.id))
            except grpc.aio.AioRpcError as error:
                if error.code() is not grpc.StatusCode.NOT_FOUND:
                    raise
                return False
            return True

        await eventually(visible, 10.0, "the replica has the new user")
        page = await live.users.ListUsers(user_pb2.ListUsersRequest(filter=f"id = {created.id}"))
        assert [u.id for u in page.users] == [created.id]
        streamed = [
            u.id
            async for m in live.users.StreamUsers(
                user_pb2.StreamUsersRequest(filter=f"id = {created.id}")
            )
            for u in m.users
        ]
        assert streamed == [created.id]
        # The standby's pg_stat_activity shows the service's read connections.
        assert await service_connections(pair.replica_url) >= 1
        # A standby refuses writes: that this update works proves it ran on the primary.
        updated = await live.users.UpdateUser(
            user_pb2.UpdateUserRequest(user=user_pb2.User(id=created.id, bio="written"))
        )
        assert updated.bio == "written"


async def test_replay_paused_a_strong_read_sees_a_fresh_write_a_default_read_does_not(
    pair: Pair, paused: None
) -> None:
    async with running_server(
        settings_for(pair.primary_url, database_read_url=pair.replica_url)
    ) as live:
        created = await live.users.CreateUser(create_user_request())
        request = user_pb2.GetUserRequest(id=created.id)
        # Default: the lagging replica, which has not seen the write (NOT_FOUND, never
        # INTERNAL) ...
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await live.users.GetUser(request)
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND
        page = await live.users.ListUsers(user_pb2.ListUsersRequest(filter=f"id = {created.id}"))
        assert list(page.users) == []
        # ... strong: the primary, which has.
        got = await live.users.GetUser(request, metadata=STRONG)
        assert got.id == created.id
        page = await live.users.ListUsers(
            user_pb2.ListUsersRequest(filter=f"id = {created.id}"), metadata=STRONG
        )
        assert [u.id for u in page.users] == [created.id]
        streamed = [
            u.id
            async for m in live.users.StreamUsers(
                user_pb2.StreamUsersRequest(filter=f"id = {created.id}"), metadata=STRONG
            )
            for u in m.users
        ]
        assert streamed == [created.id]
        # Reads inside a write see the write: an update of the fresh user works.
        updated = await live.users.UpdateUser(
            user_pb2.UpdateUserRequest(user=user_pb2.User(id=created.id, bio="fresh"))
        )
        assert updated.bio == "fresh"
        # Anything but "strong" is the default.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await live.users.GetUser(request, metadata=(("x-read-consistency", "eventual"),))
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND


async def test_reads_fall_back_to_the_primary_while_the_standby_is_down(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with running_server(
        settings_for(pair.primary_url, database_read_url=pair.replica_url)
    ) as live:
        created = await live.users.CreateUser(create_user_request())
        await eventually(lambda: _found(live, created.id), 10.0, "the replica has the user")
        pair.standby.stop()
        try:
            # Every read is answered (by the primary); none fails while the standby is
            # gone, and readiness follows the primary: still SERVING.
            for _ in range(20):
                got = await live.users.GetUser(user_pb2.GetUserRequest(id=created.id))
                assert got.id == created.id
                page = await live.users.ListUsers(
                    user_pb2.ListUsersRequest(filter=f"id = {created.id}")
                )
                assert [u.id for u in page.users] == [created.id]
            health = health_pb2_grpc.HealthStub(live.channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service="blog.v1.UserService"))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            assert any("replica" in r.getMessage() for r in caplog.records), caplog.text
        finally:
            pair.standby.restart()

        # Back on the standby once it answers again.
        async def on_standby() -> bool:
            await live.users.GetUser(user_pb2.GetUserRequest(id=created.id))
            return await service_connections(pair.replica_url) >= 1

        await eventually(on_standby, 20.0, "reads return to the standby")


async def _found(live: object, user_id: int) -> bool:
    try:
        await live.users.GetUser(user_pb2.GetUserRequest(id=user_id))  # type: ignore[attr-defined]
    except grpc.aio.AioRpcError:
        return False
    return True


async def test_a_stream_cancelled_by_a_recovery_conflict_resumes(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    """A slow stream on the standby holds a snapshot; the primary deletes and vacuums
    rows that snapshot still sees, and after max_standby_streaming_delay the standby
    cancels the stream's query. The client gets a status it resumes from (UNAVAILABLE
    or ABORTED), never INTERNAL, and the resumed stream delivers every row once."""
    async with running_server(
        settings_for(
            pair.primary_url,
            database_read_url=pair.replica_url,
            stream_batch_rows=10,
            stream_idle_timeout=30.0,
        ),
        **{"grpc.http2.bdp_probe": 0},
    ) as live:
        marker = f"rc{time.monotonic_ns() % 10**9}"
        made = await live.users.BatchCreateUsers(
            user_pb2.BatchCreateUsersRequest(
                requests=[
                    create_user_request(display_name=marker, bio="x" * 1500) for _ in range(300)
                ]
            )
        )
        victims = await live.users.BatchCreateUsers(
            user_pb2.BatchCreateUsersRequest(requests=[create_user_request() for _ in range(50)])
        )
        wanted = [u.id for u in made.users]
        await eventually(lambda: _found(live, victims.users[-1].id), 10.0, "replicated")
        request = user_pb2.StreamUsersRequest(filter=f'display_name:"{marker}"')
        call = live.users.StreamUsers(request)
        first = await call.read()
        got = [u.id for u in first.users]
        token = first.resume_token
        # Make replay need to remove row versions the stream's snapshot can see.
        primary = await asyncpg.connect(raw_dsn(pair.primary_url))
        try:
            await primary.execute(
                "DELETE FROM users WHERE id = ANY($1::bigint[])", [u.id for u in victims.users]
            )
            await primary.execute("VACUUM (FREEZE) users")
        finally:
            await primary.close()
        await asyncio.sleep(3.0)  # > max_standby_streaming_delay: the standby cancels
        codes = []
        for _ in range(5):  # bounded: resume at most a few times
            try:
                while (message := await call.read()) is not grpc.aio.EOF:
                    got.extend(u.id for u in message.users)
                    token = message.resume_token
                break
            except grpc.aio.AioRpcError as error:
                codes.append(error.code())
                if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED):
                    raise
                resumed = user_pb2.StreamUsersRequest()
                resumed.CopyFrom(request)
                resumed.resume_token = token
                call = live.users.StreamUsers(resumed)
        assert codes, "the standby never cancelled the stream (no recovery conflict)"
        assert got == wanted
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
