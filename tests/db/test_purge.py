"""Purges of tables that only grow: idempotency records past their TTL, and users
soft-deleted longer ago than USER_RETENTION_DAYS (with their posts)."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import insert, select, update

from blog.v1 import post_pb2, user_pb2
from conftest import Backend, Running, settings_for
from factories import create_user_request, post, unique
from service.db.engine import Database
from service.db.models import IdempotencyRecord, Post, User
from service.db.types import utcnow
from service.maintenance import Purger
from service.repositories.uow import Store


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
        # Age the first deletion past retention.
        async with db.sessions.write() as session, session.begin():
            await session.execute(
                update(User)
                .where(User.id == old.id)
                .values(delete_time=utcnow() - timedelta(days=31))
            )
        _, purged = await Purger(settings, Store(db)).purge_once()
        assert purged >= 1
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
