"""grpc.health.v1.Health: liveness, readiness that follows the database, shutdown."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import make_url

from blog.v1 import user_pb2, user_pb2_grpc
from conftest import Backend, Running, running_server, settings_for
from errors import rich
from factories import create_user_request, unique, user
from service.config import Settings
from service.db.engine import create_engine
from service.db.migrations import upgrade
from service.server import BlogServer
from support.postgres import PostgresServer, with_host_port
from support.tcp_proxy import TcpProxy

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
LIVENESS = ""
READINESS = ("blog.v1.UserService", "blog.v1.PostService")


def health_stub(channel: grpc.aio.Channel) -> health_pb2_grpc.HealthStub:
    return health_pb2_grpc.HealthStub(channel)


async def status_of(channel: grpc.aio.Channel, service: str) -> int:
    response = await health_stub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=2.0
    )
    return int(response.status)


async def eventually(
    check: Callable[[], Awaitable[bool]], within: float, what: Callable[[], str]
) -> float:
    """Poll until check() holds; return how long it took."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > within:
            raise AssertionError(f"not within {within}s: {what()}")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def readiness_is(channel: grpc.aio.Channel, wanted: int, within: float) -> float:
    seen: dict[str, int] = {}

    async def check() -> bool:
        for service in READINESS:
            seen[service] = await status_of(channel, service)
        return all(status == wanted for status in seen.values())

    return await eventually(check, within, lambda: f"readiness {wanted}, saw {seen}")


async def next_status(watch: Any, within: float = 5.0) -> int:
    message = await asyncio.wait_for(watch.read(), within)
    assert message is not grpc.aio.EOF, "the Watch stream ended"
    return int(message.status)


async def drain(call: Any) -> None:
    while await call.read() is not grpc.aio.EOF:
        pass


# ------------------------------------------------------------------ liveness, readiness


async def test_liveness_is_serving(running: Running) -> None:
    assert await status_of(running.channel, LIVENESS) == SERVING


@pytest.mark.parametrize("service", READINESS)
async def test_readiness_is_serving_with_the_database_up(running: Running, service: str) -> None:
    assert await status_of(running.channel, service) == SERVING


@pytest.mark.parametrize("service", ["blog.v1.NoSuchService", "blog.v1.userservice", "x"])
async def test_unknown_service_is_not_found(running: Running, service: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await status_of(running.channel, service)
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND


async def test_health_needs_no_credentials_and_watch_starts_with_the_status(
    running: Running,
) -> None:
    watch = health_stub(running.channel).Watch(health_pb2.HealthCheckRequest(service=READINESS[0]))
    try:
        assert await next_status(watch) == SERVING
    finally:
        watch.cancel()


# ------------------------------------------------------------------------ database cut


@pytest.fixture
async def fresh_postgres_url(postgres: PostgresServer) -> AsyncIterator[str]:
    url = postgres.create_database()
    try:
        engine = create_engine(Settings(database_url=url))
        try:
            await upgrade(engine)
        finally:
            await engine.dispose()
        yield url
    finally:
        postgres.drop_database(url)


async def test_readiness_follows_a_lost_and_returned_database(fresh_postgres_url: str) -> None:
    target = make_url(fresh_postgres_url)
    async with TcpProxy(target.host or "127.0.0.1", target.port or 5432) as proxy:
        proxied = with_host_port(fresh_postgres_url, "127.0.0.1", proxy.port)
        settings = settings_for(proxied, health_check_interval=0.5, health_check_timeout=1.0)
        async with running_server(settings) as live:
            created = await live.users.CreateUser(create_user_request())
            get = user_pb2.GetUserRequest(id=created.id)
            assert await live.users.GetUser(get) == created
            await readiness_is(live.channel, SERVING, 5.0)
            watches = {
                service: health_stub(live.channel).Watch(
                    health_pb2.HealthCheckRequest(service=service)
                )
                for service in READINESS
            }
            try:
                for watch in watches.values():
                    assert await next_status(watch) == SERVING

                await proxy.cut()
                took = await readiness_is(live.channel, NOT_SERVING, 5.0)
                assert took < 5.0
                for watch in watches.values():
                    assert await next_status(watch) == NOT_SERVING
                # Liveness is about the process, not the database.
                assert await status_of(live.channel, LIVENESS) == SERVING

                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await live.users.GetUser(get, timeout=10.0)
                error = rich(caught.value)
                assert error.code is grpc.StatusCode.UNAVAILABLE, error
                assert error.reason == "DATABASE_UNAVAILABLE"
                assert error.retry_info is not None
                assert error.retry_info.retry_delay.ToTimedelta().total_seconds() > 0
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await live.users.CreateUser(create_user_request(), timeout=10.0)
                assert rich(caught.value).reason == "DATABASE_UNAVAILABLE"
                call = live.users.StreamUsers(user_pb2.StreamUsersRequest(), timeout=10.0)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await drain(call)
                error = rich(caught.value)
                assert error.code is grpc.StatusCode.UNAVAILABLE, error
                assert error.reason == "DATABASE_UNAVAILABLE"

                await proxy.restore()
                took = await readiness_is(live.channel, SERVING, 5.0)
                assert took < 5.0
                for watch in watches.values():
                    assert await next_status(watch) == SERVING
                # Every call works again at once: no dead pooled connection is handed out.
                assert await live.users.GetUser(get, timeout=10.0) == created
                again = await live.users.CreateUser(create_user_request(), timeout=10.0)
                assert again.id > created.id
            finally:
                for watch in watches.values():
                    watch.cancel()
            assert live.server.db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


# -------------------------------------------------------------------- graceful shutdown


async def test_shutdown_turns_health_not_serving_and_lets_a_stream_finish(
    backend: Backend, running: Running
) -> None:
    marker = unique("shut")
    requests = [
        user_pb2.CreateUserRequest(user=user(display_name=marker, bio="b" * 1900))
        for _ in range(300)
    ]
    created = await running.users.BatchCreateUsers(
        user_pb2.BatchCreateUsersRequest(requests=requests)
    )
    expected = sorted(u.id for u in created.users)

    grace = 2.0
    server = BlogServer(settings_for(backend.url, shutdown_grace=grace, stream_batch_rows=10))
    await server.start()
    # A small HTTP/2 window: the stream below is still in flight when shutdown begins.
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{server.port}", options=[("grpc.http2.bdp_probe", 0)]
    )
    stopping: asyncio.Task[None] | None = None
    try:
        users = user_pb2_grpc.UserServiceStub(channel)
        watch = health_stub(channel).Watch(health_pb2.HealthCheckRequest(service=LIVENESS))
        ready_watch = health_stub(channel).Watch(
            health_pb2.HealthCheckRequest(service=READINESS[0])
        )
        assert await next_status(watch) == SERVING
        assert await next_status(ready_watch) == SERVING
        stream = users.StreamUsers(user_pb2.StreamUsersRequest(filter=f'display_name:"{marker}"'))
        first = await stream.read()
        assert first.users

        started = time.monotonic()
        stopping = asyncio.create_task(server.stop())
        assert await next_status(watch) == NOT_SERVING
        assert await next_status(ready_watch) == NOT_SERVING
        # New calls are refused while the call in flight drains.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await users.GetUser(user_pb2.GetUserRequest(id=expected[0]), timeout=2.0)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        # The stream in flight gets the grace period to finish, and does.
        got = [u.id for u in first.users]
        while (message := await stream.read()) is not grpc.aio.EOF:
            got.extend(u.id for u in message.users)
        assert got == expected
        assert time.monotonic() - started < grace
        await asyncio.wait_for(stopping, grace + 5.0)
        assert time.monotonic() - started < grace + 2.0
    finally:
        if stopping is None:
            await server.stop(grace=0)
        await channel.close()
