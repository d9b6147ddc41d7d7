"""Alembic environment: async engines, batch mode on SQLite, an advisory lock on PostgreSQL."""

from __future__ import annotations

import asyncio
import logging.config

from sqlalchemy import Connection, text

from alembic import context
from service.config import Settings
from service.db.engine import create_engine
from service.db.models import Base

config = context.config
target_metadata = Base.metadata

# Any constant will do; every migrator of one database takes the same lock.
MIGRATION_LOCK_ID = 0x626C6F67  # "blog"


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url") or Settings().database_url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        transaction_per_migration=False,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # The serving statement_timeout does not apply: a migration, or a second
            # `migrate` waiting below for the first, takes as long as it takes.
            connection.execute(text("SET LOCAL statement_timeout = 0"))
            connection.execute(text("SET LOCAL lock_timeout = 0"))
            # Concurrent `migrate` runs queue here; the second sees the first's work.
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})
            # A DDL statement waiting for a table lock queues every later statement on
            # that table behind it: give up soon; service.db.migrations retries.
            lock_timeout_ms = int(config.attributes.get("lock_timeout_ms", 5000))
            connection.execute(text(f"SET LOCAL lock_timeout = {lock_timeout_ms}"))
        context.run_migrations()


async def run_async_migrations() -> None:
    url = config.get_main_option("sqlalchemy.url") or Settings().database_url
    engine = create_engine(Settings(database_url=url), url)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:  # handed in by service.db.migrations
        do_run_migrations(connection)
    else:
        asyncio.run(run_async_migrations())


if config.config_file_name is not None and not config.attributes.get("connection"):
    logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)

if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
