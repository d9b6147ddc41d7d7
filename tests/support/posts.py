"""Fast set-up for tests that need thousands of posts: rows written straight into the
service's tables with SQLAlchemy Core (one executemany), not one RPC per post."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db.models import Post, PostTag, Tag
from service.db.types import utcnow


async def insert_posts(
    engine: AsyncEngine,
    author_id: int,
    count: int,
    *,
    body: str = "bulk body",
    tags: Sequence[str] = (),
    title: str = "Bulk post",
) -> list[int]:
    """Insert `count` posts by `author_id`, create_time strictly increasing with id, each
    linked to `tags` (created if missing); return their ids in insertion order."""
    start = utcnow()
    rows = [
        {
            "author_id": author_id,
            "title": f"{title} {i:06d}",
            "body": body,
            "create_time": start + timedelta(microseconds=i),
            "update_time": start + timedelta(microseconds=i),
            "version": 1,
        }
        for i in range(count)
    ]
    async with engine.begin() as connection:
        result = await connection.execute(
            insert(Post).returning(Post.id, sort_by_parameter_order=True), rows
        )
        ids = [row.id for row in result]
        if tags:
            known = select(Tag.name, Tag.id).where(Tag.name.in_(tags))
            existing = {name for name, _ in await connection.execute(known)}
            missing = [{"name": name} for name in tags if name not in existing]
            if missing:
                await connection.execute(insert(Tag), missing)
            tag_ids = {name: tag_id for name, tag_id in await connection.execute(known)}
            await connection.execute(
                insert(PostTag),
                [{"post_id": p, "tag_id": tag_ids[name]} for p in ids for name in tags],
            )
    return ids
