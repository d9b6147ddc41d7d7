"""Alembic migrations on both databases: no drift from the models, down and up again,
and the schema status that `serve` checks."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine

from alembic import command
from service.config import Settings
from service.db.engine import create_engine
from service.db.migrations import SchemaState, alembic_config, schema_status, upgrade
from service.db.models import Base
from support.postgres import PostgresServer


@pytest.fixture(params=["postgresql", "sqlite"])
async def engine(
    request: pytest.FixtureRequest, postgres: PostgresServer
) -> AsyncIterator[AsyncEngine]:
    """An engine on a new, empty database of each backend (never the shared one)."""
    if request.param == "postgresql":
        url = postgres.create_database()
        engine = create_engine(Settings(database_url=url))
        try:
            yield engine
        finally:
            await engine.dispose()
            postgres.drop_database(url)
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
