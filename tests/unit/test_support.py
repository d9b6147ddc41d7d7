"""Self-tests for the test-support helpers: real PostgreSQL and the cuttable TCP proxy."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url

import support.postgres
from support.postgres import (
    PostgresServer,
    ensure_postgres,
    free_port,
    raw_dsn,
    with_host_port,
)
from support.tcp_proxy import TcpProxy

# What a client may see when the proxy resets its connection.
CONNECTION_LOST = (
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
    OSError,
)


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    server = ensure_postgres()
    yield server
    server.close()


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """Exceptions reported to the running loop's exception handler during the test."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield errors
    loop.set_exception_handler(previous)


@pytest.fixture
async def proxy(pg: PostgresServer) -> AsyncIterator[TcpProxy]:
    tcp_proxy = TcpProxy(pg.host, pg.port)
    await tcp_proxy.start()
    yield tcp_proxy
    await tcp_proxy.close()


async def _database_exists(admin_url: str, name: str) -> bool:
    conn = await asyncpg.connect(raw_dsn(admin_url), timeout=5)
    try:
        return bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
    finally:
        await conn.close()


def test_raw_dsn_keeps_everything_but_the_driver() -> None:
    url = "postgresql+asyncpg://app:s%40cret@db.example:6543/blog"
    assert raw_dsn(url) == "postgresql://app:s%40cret@db.example:6543/blog"
    assert with_host_port(url, "127.0.0.1", 1234) == (
        "postgresql+asyncpg://app:s%40cret@127.0.0.1:1234/blog"
    )
    with pytest.raises(ValueError, match="not a PostgreSQL URL"):
        raw_dsn("sqlite+aiosqlite:///x.db")


async def test_ensure_postgres_gives_a_server(pg: PostgresServer) -> None:
    assert pg.admin_url.startswith("postgresql+asyncpg://")
    conn = await asyncpg.connect(raw_dsn(pg.admin_url), timeout=5)
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


def test_create_and_drop_database(pg: PostgresServer) -> None:
    url = pg.create_database()
    parsed, admin = make_url(url), make_url(pg.admin_url)
    name = parsed.database
    assert name is not None
    assert name.startswith("blogtest_")
    assert (parsed.drivername, parsed.username, parsed.host, parsed.port) == (
        admin.drivername,
        admin.username,
        admin.host,
        admin.port,
    )
    assert asyncio.run(_database_exists(pg.admin_url, name))
    pg.drop_database(url)
    assert not asyncio.run(_database_exists(pg.admin_url, name))
    pg.drop_database(url)  # already gone: no error


async def test_sync_helpers_work_inside_a_running_loop(pg: PostgresServer) -> None:
    url = pg.create_database(prefix="blogtest_loop")
    name = make_url(url).database
    assert name is not None
    assert await _database_exists(pg.admin_url, name)
    holder = await asyncpg.connect(raw_dsn(url), timeout=5)
    try:
        assert await holder.fetchval("SELECT current_database()") == name
        pg.drop_database(url)  # an open connection must not stop the drop
    finally:
        holder.terminate()
    assert not await _database_exists(pg.admin_url, name)


async def test_proxy_passes_cuts_and_restores(
    pg: PostgresServer, proxy: TcpProxy, loop_errors: list[dict[str, Any]]
) -> None:
    dsn = raw_dsn(with_host_port(pg.admin_url, "127.0.0.1", proxy.port))

    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        assert proxy.open_connections == 1

        await proxy.cut()
        assert proxy.open_connections == 0
        with pytest.raises(CONNECTION_LOST):
            await asyncio.wait_for(conn.fetchval("SELECT 1"), 5)
    finally:
        conn.terminate()

    started = time.monotonic()
    with pytest.raises(CONNECTION_LOST):
        await asyncpg.connect(dsn, timeout=10)
    assert time.monotonic() - started < 2, "a connect through a cut proxy must fail fast"
    assert proxy.open_connections == 0

    await proxy.restore()
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        assert await conn.fetchval("SELECT 2") == 2
        assert proxy.open_connections == 1
    finally:
        await conn.close()
    # A clean client close ends the proxied connection on its own.
    for _ in range(100):
        if proxy.open_connections == 0:
            break
        await asyncio.sleep(0.01)
    assert proxy.open_connections == 0
    assert loop_errors == []


async def test_proxy_close_leaves_no_tasks(
    pg: PostgresServer, loop_errors: list[dict[str, Any]]
) -> None:
    proxy = TcpProxy(pg.host, pg.port)
    await proxy.start()
    dsn = raw_dsn(with_host_port(pg.admin_url, "127.0.0.1", proxy.port))
    conns = [await asyncpg.connect(dsn, timeout=5) for _ in range(3)]
    assert proxy.open_connections == 3

    await proxy.close()
    assert proxy.open_connections == 0
    for conn in conns:
        with pytest.raises(CONNECTION_LOST):
            await asyncio.wait_for(conn.fetchval("SELECT 1"), 5)
        conn.terminate()
    with pytest.raises(ConnectionRefusedError):  # no longer listening at all
        await asyncpg.connect(dsn, timeout=5)
    await proxy.close()  # idempotent

    await asyncio.sleep(0)
    leftovers = [
        task
        for task in asyncio.all_tasks()
        if "tcp_proxy" in getattr(task.get_coro(), "__qualname__", "")
        or "TcpProxy" in repr(task.get_coro())
        or "_pump" in repr(task.get_coro())
    ]
    assert leftovers == []
    assert loop_errors == []


def test_throwaway_cluster_when_nothing_answers() -> None:
    dead_url = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/postgres"
    server = ensure_postgres(url=dead_url)
    try:
        assert server.is_throwaway
        data_dir = server.data_dir
        assert data_dir is not None
        assert data_dir.is_dir()
        url = server.create_database()
        name = make_url(url).database
        assert name is not None

        async def query() -> tuple[Any, Any]:
            conn = await asyncpg.connect(raw_dsn(url), timeout=5)
            try:
                return (
                    await conn.fetchval("SELECT current_database()"),
                    await conn.fetchval("SHOW max_connections"),
                )
            finally:
                await conn.close()

        assert asyncio.run(query()) == (name, "300")
        server.drop_database(url)
        assert not asyncio.run(_database_exists(server.admin_url, name))
    finally:
        server.close()
    assert not data_dir.exists()
    server.close()  # idempotent
    with pytest.raises(ConnectionRefusedError):
        asyncio.run(asyncpg.connect(raw_dsn(server.admin_url), timeout=3))


def test_no_binaries_is_a_loud_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(support.postgres, "find_bindir", lambda: None)
    dead_url = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/postgres"
    with pytest.raises(RuntimeError, match=r"apt-get install postgresql"):
        ensure_postgres(url=dead_url)
