"""Round trips to PostgreSQL per method, counted at the driver (tests/support/statements.py:
asyncpg's protocol, so BEGIN, COMMIT and driver-level SQL count), for the report.

An in-process server on the bench database; each method is called twice to warm the
statement caches, then counted as the fewest of three calls (a pooled connection meeting
a statement for the first time adds a prepare, whichever call gets it)."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from bench.procs import ROOT

sys.path.insert(0, str(ROOT / "tests"))
from blog.v1 import post_pb2, post_pb2_grpc, user_pb2, user_pb2_grpc
from service.config import Settings
from service.server import BlogServer
from support.statements import StatementLog, count_statements


def count(database_url: str) -> dict[str, tuple[int, str]]:
    """Method -> (round trips, summary), prepares and one-off type lookups excluded."""
    return asyncio.run(_count(database_url))


async def _count(database_url: str) -> dict[str, tuple[int, str]]:
    settings = Settings(database_url=database_url, grpc_listen="127.0.0.1:0", log_level="WARNING")
    server = BlogServer(settings)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            users = user_pb2_grpc.UserServiceStub(channel)
            posts = post_pb2_grpc.PostServiceStub(channel)
            page = await posts.ListPosts(post_pb2.ListPostsRequest(page_size=1))
            author = page.posts[0].author_id
            post_id = page.posts[0].id
            serial = iter(range(1_000_000))

            async def create_user() -> Any:
                name = f"rt{uuid.uuid4().hex[:12]}"
                return await users.CreateUser(
                    user_pb2.CreateUserRequest(
                        user=user_pb2.User(username=name, email=f"{name}@example.com")
                    )
                )

            calls: dict[str, Callable[[], Awaitable[Any]]] = {
                "GetUser": lambda: users.GetUser(user_pb2.GetUserRequest(id=author)),
                "GetPost": lambda: posts.GetPost(post_pb2.GetPostRequest(id=post_id)),
                "ListPosts page 50 BASIC": lambda: posts.ListPosts(
                    post_pb2.ListPostsRequest(page_size=50, page_token=page.next_page_token)
                ),
                "ListPosts page 50 FULL": lambda: posts.ListPosts(
                    post_pb2.ListPostsRequest(page_size=50, view=post_pb2.POST_VIEW_FULL)
                ),
                "CreateUser": create_user,
                "CreatePost (2 tags)": lambda: posts.CreatePost(
                    post_pb2.CreatePostRequest(
                        post=post_pb2.Post(
                            author_id=author, title="counted", tags=["bench-a", "bench-b"]
                        )
                    )
                ),
                "UpdateUser (display_name)": lambda: users.UpdateUser(
                    user_pb2.UpdateUserRequest(
                        user=user_pb2.User(id=author, display_name=f"n{next(serial)}"),
                        update_mask={"paths": ["display_name"]},
                    )
                ),
            }
            counted: dict[str, tuple[int, str]] = {}
            for name, call in calls.items():
                await call()
                await call()
                logs: list[StatementLog] = []
                for _ in range(3):
                    with count_statements(server.db.engine) as log:
                        await call()
                    logs.append(log)
                best = min(logs, key=lambda log: log.round_trips())
                counted[name] = (best.round_trips(), best.summary())
            return counted
    finally:
        await server.stop(0)
