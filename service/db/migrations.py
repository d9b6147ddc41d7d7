"""Run Alembic from the service: upgrade to head, and tell whether a schema is current."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from alembic import command


def script_location() -> Path:
    """alembic/ of a source checkout, or the copy packaged into the wheel (the image)."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package.parent / "alembic", package / "_alembic"):
        if (candidate / "env.py").is_file():
            return candidate
    raise RuntimeError(f"no Alembic scripts found next to {package}")


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


class SchemaState(enum.Enum):
    CURRENT = "current"
    BEHIND = "behind"  # older than this release: run `migrate`
    AHEAD = "ahead"  # newer than this release (a rollout in progress): accepted


@dataclass(frozen=True, slots=True)
class SchemaStatus:
    state: SchemaState
    database: tuple[str, ...]
    code: tuple[str, ...]


async def upgrade(engine: AsyncEngine) -> None:
    """Bring the schema to head (PostgreSQL: under an advisory lock, see alembic/env.py)."""
    config = alembic_config(engine.url.render_as_string(hide_password=False))

    def run(connection: Connection) -> None:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")

    async with engine.connect() as connection:
        await connection.run_sync(run)
        await connection.commit()


async def schema_status(engine: AsyncEngine) -> SchemaStatus:
    script = ScriptDirectory.from_config(alembic_config(str(engine.url)))
    heads = tuple(sorted(script.get_heads()))

    def current(connection: Connection) -> tuple[str, ...]:
        return tuple(sorted(MigrationContext.configure(connection).get_current_heads()))

    async with engine.connect() as connection:
        revisions = await connection.run_sync(current)
    if revisions == heads:
        return SchemaStatus(SchemaState.CURRENT, revisions, heads)
    for revision in revisions:
        try:
            known = script.get_revision(revision) is not None
        except CommandError:
            known = False
        if not known:
            return SchemaStatus(SchemaState.AHEAD, revisions, heads)
    return SchemaStatus(SchemaState.BEHIND, revisions, heads)
