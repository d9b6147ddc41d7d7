"""Write a generated `strategies.DataSet` into the service's tables and take it out again.

Rows go in through SQLAlchemy Core over the schema's table names (not through the API),
so that a data set can hold what the API alone cannot make quickly: chosen timestamps
that tie, deleted users whose usernames repeat a live one's. Each seeded set returns its
rows in the reference model's form (support/reference.py) and a filter clause that
scopes a query to exactly those rows by id range.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db.models import Base
from support.strategies import EPOCH, DataSet

__all__ = ["USERNAME_PREFIX", "Seeded", "seeded", "to_datetime"]

USERNAME_PREFIX = "pt_"  # factories.unique() never makes one: no clash with other tests


def to_datetime(micros: int) -> datetime:
    return EPOCH + timedelta(microseconds=micros)


@dataclass
class Seeded:
    users: list[dict[str, Any]] = field(default_factory=list)
    posts: list[dict[str, Any]] = field(default_factory=list)

    @staticmethod
    def _scope(rows: list[dict[str, Any]]) -> str:
        if not rows:
            return "id = 0"
        ids = [row["id"] for row in rows]
        return f"id >= {min(ids)} AND id <= {max(ids)}"

    @property
    def user_scope(self) -> str:
        """A filter clause that selects exactly the seeded users (ids are contiguous
        unless another writer interleaved, which the tests do not do)."""
        return self._scope(self.users)

    @property
    def post_scope(self) -> str:
        return self._scope(self.posts)


def _tables() -> tuple[Any, Any, Any, Any]:
    tables = Base.metadata.tables
    return tables["users"], tables["posts"], tables["tags"], tables["post_tags"]


async def _insert_all(connection: Any, table: Any, rows: list[dict[str, Any]]) -> list[int]:
    """Insert `rows` in one statement; their new ids, in the rows' order."""
    stmt = insert(table).returning(table.c.id, sort_by_parameter_order=True)
    return [row_id for (row_id,) in await connection.execute(stmt, rows)]


async def _insert(engine: AsyncEngine, data: DataSet, seeded: Seeded) -> None:
    users, posts, tags, links = _tables()
    async with engine.begin() as connection:
        user_rows = [
            {
                "username": USERNAME_PREFIX + spec.username,
                "email": f"{spec.email_local}.{i}@Example.com",
                "email_normalized": f"{spec.email_local}.{i}@example.com".lower(),
                "display_name": spec.display_name,
                "bio": "",
                "create_time": to_datetime(spec.create_time),
                "update_time": to_datetime(spec.update_time),
                "delete_time": to_datetime(spec.update_time) if spec.deleted else None,
                "version": 1,
            }
            for i, spec in enumerate(data.users)
        ]
        user_ids = await _insert_all(connection, users, user_rows)
        seeded.users.extend(
            {
                **{key: getattr(spec, key) for key in ("display_name", "create_time")},
                "id": user_id,
                "username": row["username"],
                "email": row["email"],
                "update_time": spec.update_time,
                "deleted": spec.deleted,
                "post_count": sum(1 for p in data.posts if p.author == index),
            }
            for index, (spec, row, user_id) in enumerate(
                zip(data.users, user_rows, user_ids, strict=True)
            )
        )
        if not data.posts:
            return
        post_rows = [
            {
                "author_id": user_ids[spec.author],
                "title": spec.title,
                "body": "",
                "create_time": to_datetime(spec.create_time),
                "update_time": to_datetime(spec.update_time),
                "version": 1,
            }
            for spec in data.posts
        ]
        post_ids = await _insert_all(connection, posts, post_rows)
        seeded.posts.extend(
            {
                **{key: getattr(spec, key) for key in ("title", "create_time", "update_time")},
                "id": post_id,
                "author_id": user_ids[spec.author],
                "author_username": seeded.users[spec.author]["username"],
                "tags": spec.tags,
            }
            for spec, post_id in zip(data.posts, post_ids, strict=True)
        )
        names = sorted({name for spec in data.posts for name in spec.tags})
        if not names:
            return
        dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
        await connection.execute(
            dialect.insert(tags).on_conflict_do_nothing(), [{"name": n} for n in names]
        )
        known = select(tags.c.name, tags.c.id).where(tags.c.name.in_(names))
        ids = {name: tag_id for name, tag_id in await connection.execute(known)}
        await connection.execute(
            insert(links),
            [{"post_id": p["id"], "tag_id": ids[n]} for p in seeded.posts for n in p["tags"]],
        )


async def _remove(engine: AsyncEngine, seeded: Seeded) -> None:
    users, posts, _, links = _tables()
    post_ids = [p["id"] for p in seeded.posts]
    user_ids = [u["id"] for u in seeded.users]
    async with engine.begin() as connection:
        # Explicit, not by cascade: SQLite enforces foreign keys per connection.
        if post_ids:
            await connection.execute(delete(links).where(links.c.post_id.in_(post_ids)))
            await connection.execute(delete(posts).where(posts.c.id.in_(post_ids)))
        if user_ids:
            await connection.execute(delete(users).where(users.c.id.in_(user_ids)))


@asynccontextmanager
async def seeded(engine: AsyncEngine, data: DataSet) -> AsyncIterator[Seeded]:
    """`data` in the database for the block, hard-deleted afterwards (so the next
    example may reuse its usernames, which are unique among live users)."""
    rows = Seeded()
    try:
        await _insert(engine, data, rows)
        yield rows
    finally:
        await _remove(engine, rows)
