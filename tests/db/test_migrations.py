"""Alembic migrations on both databases: no drift from the models, down and up again,
and the schema status that `serve` checks."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine

from alembic import command
from service.config import Settings
from service.db.engine import create_engine
from service.db.migrations import (
    MigrationLockError,
    SchemaState,
    alembic_config,
    schema_status,
    upgrade,
)
from service.db.models import Base
from support.postgres import PostgresServer, raw_dsn

MIGRATION_LOCK_ID = 0x626C6F67  # alembic/env.py


@asynccontextmanager
async def new_postgres_engine(postgres: PostgresServer) -> AsyncIterator[AsyncEngine]:
    """An engine on a new, empty PostgreSQL database, dropped afterwards."""
    url = postgres.create_database()
    engine = create_engine(Settings(database_url=url))
    try:
        yield engine
    finally:
        await engine.dispose()
        postgres.drop_database(url)


@pytest.fixture(params=["postgresql", "sqlite"])
async def engine(
    request: pytest.FixtureRequest, postgres: PostgresServer
) -> AsyncIterator[AsyncEngine]:
    """An engine on a new, empty database of each backend (never the shared one)."""
    if request.param == "postgresql":
        async with new_postgres_engine(postgres) as engine:
            yield engine
    else:
        with tempfile.TemporaryDirectory(prefix="blogmig-") as directory:
            url = f"sqlite+aiosqlite:///{Path(directory) / 'blog.db'}"
            engine = create_engine(Settings(database_url=url))
            try:
                yield engine
            finally:
                await engine.dispose()


def _config(engine: AsyncEngine) -> Any:
    return alembic_config(engine.url.render_as_string(hide_password=False))


async def _alembic(engine: AsyncEngine, action: str, revision: str) -> None:
    """`alembic upgrade|downgrade <revision>` on the engine's database, as migrate does."""
    config = _config(engine)

    def run(connection: Connection) -> None:
        config.attributes["connection"] = connection
        getattr(command, action)(config, revision)

    async with engine.connect() as connection:
        await connection.run_sync(run)
        await connection.commit()


async def _drift(engine: AsyncEngine) -> list[Any]:
    def compare(connection: Connection) -> list[Any]:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))

    async with engine.connect() as connection:
        return await connection.run_sync(compare)


async def _tables(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as connection:
        return set(await connection.run_sync(lambda c: inspect(c).get_table_names()))


def _revisions(engine: AsyncEngine) -> list[str]:
    """Every revision, oldest first."""
    script = ScriptDirectory.from_config(_config(engine))
    return [r.revision for r in reversed(list(script.walk_revisions()))]


async def test_migrated_schema_matches_the_models(engine: AsyncEngine) -> None:
    await upgrade(engine)
    assert await _drift(engine) == []
    assert {t.name for t in Base.metadata.sorted_tables} <= await _tables(engine)


async def test_downgrade_to_base_and_upgrade_again(engine: AsyncEngine) -> None:
    await upgrade(engine)
    await _alembic(engine, "downgrade", "base")
    assert await _tables(engine) <= {"alembic_version"}
    assert (await schema_status(engine)).state is SchemaState.BEHIND
    await upgrade(engine)
    assert (await schema_status(engine)).state is SchemaState.CURRENT
    assert await _drift(engine) == []


async def test_each_revision_downgrades_and_upgrades_one_step(engine: AsyncEngine) -> None:
    revisions = _revisions(engine)
    for revision in revisions:
        await _alembic(engine, "upgrade", revision)
        await _alembic(engine, "downgrade", "-1")
        await _alembic(engine, "upgrade", revision)
    assert (await schema_status(engine)).state is SchemaState.CURRENT
    assert await _drift(engine) == []


async def test_upgrade_twice_is_a_no_op(engine: AsyncEngine) -> None:
    await upgrade(engine)
    await upgrade(engine)
    assert (await schema_status(engine)).state is SchemaState.CURRENT


async def test_schema_status_behind_current_ahead(engine: AsyncEngine) -> None:
    empty = await schema_status(engine)
    assert empty.state is SchemaState.BEHIND
    assert empty.database == ()
    assert empty.code

    revisions = _revisions(engine)
    if len(revisions) > 1:
        await _alembic(engine, "upgrade", revisions[0])
        partial = await schema_status(engine)
        assert partial.state is SchemaState.BEHIND
        assert partial.database == (revisions[0],)

    await upgrade(engine)
    current = await schema_status(engine)
    assert current.state is SchemaState.CURRENT
    assert current.database == current.code

    async with engine.begin() as connection:
        await connection.execute(text("UPDATE alembic_version SET version_num = 'ffffffffffff'"))
    ahead = await schema_status(engine)
    assert ahead.state is SchemaState.AHEAD
    assert ahead.database == ("ffffffffffff",)


async def test_upgrade_on_a_newer_schema_changes_nothing(engine: AsyncEngine) -> None:
    await upgrade(engine)
    async with engine.begin() as connection:
        await connection.execute(text("UPDATE alembic_version SET version_num = 'ffffffffffff'"))
    assert await upgrade(engine) is SchemaState.AHEAD
    assert (await schema_status(engine)).database == ("ffffffffffff",)


# -- PostgreSQL: a migration never queues every call behind a table lock ----------------


@pytest.fixture
async def pg_engine(postgres: PostgresServer) -> AsyncIterator[AsyncEngine]:
    async with new_postgres_engine(postgres) as engine:
        yield engine


@contextlib.asynccontextmanager
async def _holding_users(engine: AsyncEngine) -> AsyncIterator[asyncpg.Connection]:
    """Another session holding a lock on `users` that the next migration step needs (a
    writer's ROW EXCLUSIVE conflicts with the foreign key the posts table adds)."""
    holder = await asyncpg.connect(raw_dsn(engine.url.render_as_string(hide_password=False)))
    try:
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("LOCK TABLE users IN ROW EXCLUSIVE MODE")
        yield holder
        await transaction.rollback()
    finally:
        await holder.close()


async def test_a_migration_blocked_by_a_lock_gives_up_and_changes_nothing(
    pg_engine: AsyncEngine,
) -> None:
    revisions = _revisions(pg_engine)
    await _alembic(pg_engine, "upgrade", revisions[0])
    async with _holding_users(pg_engine):
        started = time.monotonic()
        with pytest.raises(MigrationLockError, match="MIGRATION_LOCK_TIMEOUT"):
            await upgrade(pg_engine, lock_timeout=0.2, attempts=2)
        # Two waits of 0.2 s and one pause of 0.2 s, not a wait for the lock's holder.
        assert time.monotonic() - started < 5
    assert (await schema_status(pg_engine)).database == (revisions[0],)


async def test_a_migration_retries_until_the_lock_is_free(pg_engine: AsyncEngine) -> None:
    revisions = _revisions(pg_engine)
    await _alembic(pg_engine, "upgrade", revisions[0])
    async with _holding_users(pg_engine):
        migrating = asyncio.create_task(upgrade(pg_engine, lock_timeout=0.2, attempts=5))
        await asyncio.sleep(0.5)  # at least one attempt timed out meanwhile
        assert not migrating.done()
    assert await asyncio.wait_for(migrating, 30) is SchemaState.CURRENT
    assert (await schema_status(pg_engine)).state is SchemaState.CURRENT


async def test_migrations_run_without_the_serving_statement_timeout(
    postgres: PostgresServer,
) -> None:
    """The advisory lock is waited for longer than DB_STATEMENT_TIMEOUT (0.5 s here)."""
    url = postgres.create_database()
    engine = create_engine(Settings(database_url=url, db_statement_timeout=0.5))
    holder = await asyncpg.connect(raw_dsn(url))
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
        migrating = asyncio.create_task(upgrade(engine))
        await asyncio.sleep(1.5)
        assert not migrating.done()
        await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
        assert await asyncio.wait_for(migrating, 30) is SchemaState.CURRENT
    finally:
        await holder.close()
        await engine.dispose()
        postgres.drop_database(url)
