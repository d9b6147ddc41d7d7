"""Ceiling servers: what grpc.aio on uvloop can do with no service code in the way.

`python -m bench.ceiling_server --port P --database-url URL` serves, with the
service's own server options (service.server.server_options):

- /blog.v1.UserService/GetUser: the bare unary "echo" ceiling (c). No parsing, no
  database: it answers a pre-serialized User shaped like GetUser's answer, so the
  same client code and the same response size are measured.
- /blog.v1.PostService/StreamPosts: the stream ceiling (d). One asyncpg connection,
  a REPEATABLE READ READ ONLY transaction, a cursor over all posts in the service's
  default order, fetched 1,000 rows at a time; each batch's tags in one query; each
  batch becomes one StreamPostsResponse of 1,000 Post messages built in place. Same
  rows, same order, same fields as StreamPosts BASIC (less the resume token).
- grpc.health.v1 with blog.v1.UserService SERVING, so readiness is polled the same way.

With `--get-user session`, GetUser is instead the session rule's floor: what any
GetUser that keeps DESIGN.md's rule (an AsyncSession per call) pays at the least. It
parses the request, opens a session on a pool like the service's (autocommit reads),
fetches the row at driver level through the session's connection, closes the session
in one greenlet pass, and builds the User message: the service's own data path, with
no validation, routing, metrics, logs or error mapping around it.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import asyncpg
import grpc
import uvloop
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session

from bench.seed import asyncpg_dsn
from bench.serving import serve_until_signalled
from blog.v1 import post_pb2, user_pb2

POSTS_SQL = (
    "SELECT id, author_id, title, body, create_time, update_time, version FROM posts"
    " ORDER BY create_time DESC, id DESC"
)
TAGS_SQL = (
    "SELECT pt.post_id, t.name FROM post_tags pt JOIN tags t ON t.id = pt.tag_id"
    " WHERE pt.post_id = ANY($1::bigint[]) ORDER BY pt.post_id, t.name"
)
USER_SQL = (
    "SELECT id, username, email, display_name, bio, create_time, update_time, delete_time,"
    " version FROM users WHERE id = $1"
)
BATCH = 1000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _ts(value: datetime) -> Timestamp:
    delta = value - _EPOCH
    return Timestamp(seconds=delta.days * 86400 + delta.seconds, nanos=delta.microseconds * 1000)


def canned_user() -> bytes:
    now = datetime.now(UTC)
    return user_pb2.User(
        id=4242,
        username="user4242",
        email="user4242@example.com",
        display_name="User 4242",
        bio="grpc postgres python async stream batch keyset index cursor latency",
        create_time=_ts(now),
        update_time=_ts(now),
        etag="v1",
    ).SerializeToString()


class Ceilings:
    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._pool: asyncpg.Pool | None = None
        self._user = canned_user()

    async def start(self) -> None:
        self._pool = await asyncpg.create_pool(self._dsn, min_size=1, max_size=4)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    async def get_user(self, request: bytes, context: Any) -> bytes:
        return self._user

    async def stream_posts(self, request: bytes, context: Any) -> Any:
        assert self._pool is not None
        async with (
            self._pool.acquire() as con,
            con.transaction(isolation="repeatable_read", readonly=True),
        ):
            cursor = await con.cursor(POSTS_SQL)
            while True:
                rows = await cursor.fetch(BATCH)
                if not rows:
                    return
                tags: dict[int, list[str]] = defaultdict(list)
                for post_id, name in await con.fetch(TAGS_SQL, [r[0] for r in rows]):
                    tags[post_id].append(name)
                yield _batch(rows, tags)


class SessionFloor:
    """GetUser with an AsyncSession per call and nothing else (`--get-user session`)."""

    def __init__(self, database_url: str, pool_size: int) -> None:
        self._engine = create_async_engine(
            database_url, pool_size=pool_size, max_overflow=0, isolation_level="AUTOCOMMIT"
        )
        self._sessions = async_sessionmaker(self._engine, expire_on_commit=False)

    async def close(self) -> None:
        await self._engine.dispose()

    async def get_user(self, request: bytes, context: Any) -> bytes:
        user_id = user_pb2.GetUserRequest.FromString(request).id
        session: AsyncSession = self._sessions()
        try:
            connection = await session.connection()
            driver: Any = connection.sync_connection.connection.driver_connection  # type: ignore[union-attr]
            row = await driver.fetchrow(USER_SQL, user_id)
        except BaseException:
            await session.close()
            raise
        await session.run_sync(Session.close)
        if row is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"user {user_id} not found")
        user_id, username, email, display_name, bio, created, updated, deleted, version = row
        user = user_pb2.User(
            id=user_id,
            username=username,
            email=email,
            display_name=display_name,
            bio=bio,
            create_time=_ts(created),
            update_time=_ts(updated),
            etag=f"v{version}",
        )
        if deleted is not None:
            user.delete_time.CopyFrom(_ts(deleted))
        return user.SerializeToString()


def _batch(rows: list[Any], tags: dict[int, list[str]]) -> post_pb2.StreamPostsResponse:
    """Posts built in place (`posts.add`, timestamps set field by field): building each
    Timestamp and Post separately and copying them in costs about 2.5x as much."""
    response = post_pb2.StreamPostsResponse()
    add = response.posts.add
    epoch = _EPOCH
    empty: tuple[str, ...] = ()
    for post_id, author_id, title, body, created, updated, version in rows:
        post = add(
            id=post_id,
            author_id=author_id,
            title=title,
            body=body,
            tags=tags.get(post_id, empty),
            etag=f"v{version}",
        )
        delta = created - epoch
        stamp = post.create_time
        stamp.seconds = delta.days * 86400 + delta.seconds
        stamp.nanos = delta.microseconds * 1000
        delta = updated - epoch
        stamp = post.update_time
        stamp.seconds = delta.days * 86400 + delta.seconds
        stamp.nanos = delta.microseconds * 1000
    return response


async def serve(port: int, database_url: str, get_user_kind: str, pool_size: int) -> None:
    from service.config import Settings
    from service.server import server_options

    settings = Settings(database_url=database_url)
    ceilings = Ceilings(asyncpg_dsn(database_url))
    await ceilings.start()
    floor = SessionFloor(database_url, pool_size) if get_user_kind == "session" else None
    get_user = ceilings.get_user if floor is None else floor.get_user
    server = grpc.aio.server(options=server_options(settings, reuse_port=False))
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "blog.v1.UserService",
                {"GetUser": grpc.unary_unary_rpc_method_handler(get_user)},
            ),
            grpc.method_handlers_generic_handler(
                "blog.v1.PostService",
                {
                    "StreamPosts": grpc.unary_stream_rpc_method_handler(
                        ceilings.stream_posts,
                        response_serializer=post_pb2.StreamPostsResponse.SerializeToString,
                    )
                },
            ),
        ]
    )
    try:
        await serve_until_signalled(
            server, port, ("", "blog.v1.UserService", "blog.v1.PostService")
        )
    finally:
        await ceilings.close()
        if floor is not None:
            await floor.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--get-user", choices=("echo", "session"), default="echo")
    parser.add_argument("--pool-size", type=int, default=32)
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.database_url, args.get_user, args.pool_size))


if __name__ == "__main__":
    main()
