"""Purges of tables that only grow: idempotency records past their TTL, and users
soft-deleted longer ago than USER_RETENTION_DAYS (with their posts); in batches of a few
hundred rows, one short transaction each, and on PostgreSQL from one replica at a time
(issue 8 item 12)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from sqlalchemy import event, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from blog.v1 import post_pb2, user_pb2
from conftest import Backend, Running, settings_for
from factories import create_user_request, post, unique
from service.db.engine import Database
from service.db.models import IdempotencyRecord, Post, User
from service.db.types import utcnow
from service.maintenance import BATCH_ROWS, Purger
from service.repositories.locks import lock_key
from service.repositories.uow import Store
from support.postgres import raw_dsn
from support.posts import insert_posts

postgres_only = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)


async def test_idempotency_records_are_purged_after_their_ttl(backend: Backend) -> None:
    db = Database(settings_for(backend.url))
    caller = unique("caller")
    try:
        async with db.sessions.write() as session, session.begin():
            for request_id, age in (("old", timedelta(hours=25)), ("new", timedelta(hours=1))):
                await session.execute(
                    insert(IdempotencyRecord).values(
                        caller=caller,
                        method="/blog.v1.UserService/CreateUser",
                        request_id=request_id,
                        request_hash="h",
                        resource_id=1,
                        create_time=utcnow() - age,
                    )
                )
        await Purger(settings_for(backend.url), Store(db)).purge_once()
        async with db.sessions.read() as session:
            left = (
                await session.execute(
                    select(IdempotencyRecord.request_id).where(IdempotencyRecord.caller == caller)
                )
            ).scalars()
            assert list(left) == ["new"]
    finally:
        await db.dispose()


async def _age_deletion(db: Database, user_id: int, *, days: float) -> None:
    """Move a user's deletion `days` into the past (past retention, for instance)."""
    async with db.sessions.write() as session, session.begin():
        await session.execute(
            update(User)
            .where(User.id == user_id)
            .values(delete_time=utcnow() - timedelta(days=days))
        )


async def test_long_deleted_users_are_purged_with_their_posts(
    backend: Backend, running: Running
) -> None:
    old = await running.users.CreateUser(create_user_request())
    recent = await running.users.CreateUser(create_user_request())
    live = await running.users.CreateUser(create_user_request())
    old_post = await running.posts.CreatePost(post_pb2.CreatePostRequest(post=post(old.id)))
    for user in (old, recent):
        await running.users.DeleteUser(user_pb2.DeleteUserRequest(id=user.id))
    settings = settings_for(backend.url, user_retention_days=30)
    db = Database(settings)
    try:
        await _age_deletion(db, old.id, days=31)
        report = await Purger(settings, Store(db)).purge_once()
        assert report.users >= 1
        async with db.sessions.read() as session:
            ids = set(
                (
                    await session.execute(
                        select(User.id).where(User.id.in_([old.id, recent.id, live.id]))
                    )
                ).scalars()
            )
            posts = list(
                (await session.execute(select(Post.id).where(Post.id == old_post.id))).scalars()
            )
        assert ids == {recent.id, live.id}
        assert posts == []
    finally:
        await db.dispose()


# -- batches and one replica at a time ------------------------------------------------------


@contextmanager
def transactions_of(engine: AsyncEngine) -> Iterator[list[int]]:
    """The rows each DELETE touched, per committed transaction, while the block runs."""
    committed: list[int] = []
    current = [0]

    def on_execute(_conn: Any, cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("DELETE"):
            current[0] += max(cursor.rowcount, 0)

    def on_commit(_conn: Any) -> None:
        committed.append(current[0])
        current[0] = 0

    event.listen(engine.sync_engine, "after_cursor_execute", on_execute)
    event.listen(engine.sync_engine, "commit", on_commit)
    try:
        yield committed
    finally:
        event.remove(engine.sync_engine, "after_cursor_execute", on_execute)
        event.remove(engine.sync_engine, "commit", on_commit)


async def _due_records(db: Database, caller: str, count: int, *, age_hours: float = 25) -> None:
    async with db.sessions.write() as session, session.begin():
        await session.execute(
            insert(IdempotencyRecord),
            [
                {
                    "caller": caller,
                    "method": "/blog.v1.UserService/CreateUser",
                    "request_id": f"{i:036d}",
                    "request_hash": "h",
                    "resource_id": i,
                    "create_time": utcnow() - timedelta(hours=age_hours),
                }
                for i in range(count)
            ],
        )


async def _records_of(db: Database, caller: str) -> int:
    async with db.sessions.read() as session:
        found = await session.execute(
            select(func.count()).where(IdempotencyRecord.caller == caller)
        )
        return int(found.scalar_one())


async def test_many_due_records_go_in_small_transactions(backend: Backend) -> None:
    db = Database(settings_for(backend.url))
    caller = unique("many")
    try:
        await _due_records(db, caller, 5 * BATCH_ROWS + 123)
        await _due_records(db, unique("fresh"), 3, age_hours=1)
        with transactions_of(db.engine) as committed:
            report = await Purger(settings_for(backend.url), Store(db)).purge_once()
        assert await _records_of(db, caller) == 0
        deletes = [rows for rows in committed if rows]
        print(f"purge of {sum(deletes)} records: rows per transaction {deletes}")
        assert len(deletes) >= 6, committed
        assert max(deletes) <= BATCH_ROWS, committed
        assert report.records >= 5 * BATCH_ROWS + 123
        assert report.transactions == len(committed)
    finally:
        await db.dispose()


async def test_writes_go_through_while_a_long_purge_runs(
    backend: Backend, running: Running
) -> None:
    """Between two batches other writers get the database (on SQLite: the write lock), so
    a write made during a purge of thousands of records finishes before the purge does."""
    db = Database(settings_for(backend.url))
    try:
        await _due_records(db, unique("long"), 12 * BATCH_ROWS)
        purge = asyncio.create_task(Purger(settings_for(backend.url), Store(db)).purge_once())
        await asyncio.sleep(0.05)
        created = []
        while not purge.done():
            created.append(await running.users.CreateUser(create_user_request(), timeout=10))
        report = await purge
        assert report.records >= 12 * BATCH_ROWS
        assert created, "no write finished while the purge ran"
    finally:
        await db.dispose()


@postgres_only
async def test_a_purge_is_skipped_while_another_replica_runs_one(backend: Backend) -> None:
    db = Database(settings_for(backend.url))
    caller = unique("locked")
    other = await asyncpg.connect(raw_dsn(backend.url))
    try:
        await _due_records(db, caller, 10)
        await other.execute("SELECT pg_advisory_lock($1)", lock_key("purge"))
        skipped = await Purger(settings_for(backend.url), Store(db)).purge_once()
        assert await _records_of(db, caller) == 10
        assert skipped.skipped
        await other.execute("SELECT pg_advisory_unlock($1)", lock_key("purge"))
        done = await Purger(settings_for(backend.url), Store(db)).purge_once()
        assert not done.skipped
        assert await _records_of(db, caller) == 0
    finally:
        await other.close()
        await db.dispose()


@postgres_only
async def test_two_replicas_purging_at_once_run_one_purge(backend: Backend) -> None:
    replicas = [Database(settings_for(backend.url)) for _ in range(2)]
    caller = unique("two")
    try:
        await _due_records(replicas[0], caller, 4 * BATCH_ROWS)
        with (
            transactions_of(replicas[0].engine) as first,
            transactions_of(replicas[1].engine) as second,
        ):
            reports = await asyncio.gather(
                *(Purger(settings_for(backend.url), Store(db)).purge_once() for db in replicas)
            )
        assert await _records_of(replicas[0], caller) == 0
        deleted = [sum(first), sum(second)]
        assert sorted(deleted)[0] == 0, f"both replicas deleted rows: {deleted}"
        assert sorted(r.skipped for r in reports) == [False, True], reports
    finally:
        for db in replicas:
            await db.dispose()


async def test_a_deleted_user_with_many_posts_is_purged_over_several_transactions(
    backend: Backend, running: Running
) -> None:
    author = await running.users.CreateUser(create_user_request())
    await insert_posts(running.server.db.engine, author.id, 2 * BATCH_ROWS + 7, tags=["p"])
    await running.users.DeleteUser(user_pb2.DeleteUserRequest(id=author.id))
    settings = settings_for(backend.url, user_retention_days=30)
    db = Database(settings)
    try:
        await _age_deletion(db, author.id, days=31)
        with transactions_of(db.engine) as committed:
            report = await Purger(settings, Store(db)).purge_once()
        assert len([rows for rows in committed if rows]) >= 3, committed
        assert max(committed) <= 2 * BATCH_ROWS, committed  # posts of a batch, and their tags
        assert report.users >= 1
        async with db.sessions.read() as session:
            left = await session.execute(
                select(func.count()).select_from(Post).where(Post.author_id == author.id)
            )
            assert left.scalar_one() == 0
            assert (
                await session.execute(select(User.id).where(User.id == author.id))
            ).first() is None
    finally:
        await db.dispose()
