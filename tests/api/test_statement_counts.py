"""No N+1 (API.md Views, DESIGN.md Sessions): a FULL list page or stream batch costs a
constant number of SQL statements, counted at the service's own engine with SQLAlchemy's
`before_cursor_execute` event. Counts must not grow with the number of rows."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from blog.v1 import post_pb2, user_pb2
from conftest import Running, running_server, settings_for
from factories import create_user_request, unique
from support.posts import insert_posts

FULL = post_pb2.POST_VIEW_FULL


@contextmanager
def counting(engine: AsyncEngine) -> Iterator[list[str]]:
    """Every SQL statement the engine sends while the block runs (BEGIN included where
    the driver sends it as a statement, as on SQLite)."""
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(" ".join(statement.split())[:160])

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)


async def authors_with_posts(live: Running, authors: int, per_author: int) -> list[int]:
    ids = []
    for _ in range(authors):
        author = await live.users.CreateUser(create_user_request())
        await insert_posts(
            live.server.db.engine, author.id, per_author, tags=[unique("n-"), "shared"]
        )
        ids.append(author.id)
    return ids


async def test_list_posts_full_page_costs_constant_statements(running) -> None:
    author_ids = await authors_with_posts(running, authors=6, per_author=12)
    filter_text = " OR ".join(f"author_id = {a}" for a in author_ids)
    engine = running.server.db.engine
    counts = {}
    for page_size in (50, 10, 1):
        request = post_pb2.ListPostsRequest(filter=filter_text, page_size=page_size, view=FULL)
        with counting(engine) as statements:
            page = await running.posts.ListPosts(request)
        assert len(page.posts) == page_size
        assert page.next_page_token
        assert {p.author.id for p in page.posts} <= set(author_ids)
        assert all(p.author.username and len(p.tags) == 2 for p in page.posts)
        counts[page_size] = len(statements)
        assert len(statements) <= 4, statements
        # The next page (a keyset token) costs the same.
        request.page_token = page.next_page_token
        with counting(engine) as statements:
            await running.posts.ListPosts(request)
        assert len(statements) == counts[page_size], statements
    assert counts[50] == counts[10] == counts[1], counts
    print(f"ListPosts FULL statements per page: {counts}")


async def test_get_post_full_costs_constant_statements(running) -> None:
    author = await running.users.CreateUser(create_user_request())
    created = await running.posts.CreatePost(
        post_pb2.CreatePostRequest(
            post=post_pb2.Post(author_id=author.id, title="t", tags=["a", "b", "c"])
        )
    )
    with counting(running.server.db.engine) as statements:
        got = await running.posts.GetPost(post_pb2.GetPostRequest(id=created.id, view=FULL))
    assert got.author.id == author.id
    assert list(got.tags) == ["a", "b", "c"]
    assert len(statements) <= 3, statements


async def test_stream_posts_full_costs_constant_statements_per_batch(backend) -> None:
    async with running_server(settings_for(backend.url, stream_batch_rows=1000)) as live:
        author_ids = await authors_with_posts(live, authors=5, per_author=1000)
        total = 5000
        request = post_pb2.StreamPostsRequest(
            filter=" OR ".join(f"author_id = {a}" for a in author_ids), view=FULL
        )
        with counting(live.server.db.engine) as statements:
            messages = [m async for m in live.posts.StreamPosts(request)]
        streamed = [p for m in messages for p in m.posts]
        assert len(streamed) == total
        assert all(p.author.id in author_ids and len(p.tags) == 2 for p in streamed)
        batches = math.ceil(total / 1000)
        print(f"StreamPosts FULL {total} rows: {len(statements)} statements")
        assert len(statements) <= 2 * batches + 5, statements
        # A fifth of the rows costs fewer statements, never a fifth of the statements per row.
        small = post_pb2.StreamPostsRequest(filter=f"author_id = {author_ids[0]}", view=FULL)
        with counting(live.server.db.engine) as few:
            assert sum([len(m.posts) async for m in live.posts.StreamPosts(small)]) == 1000
        print(f"StreamPosts FULL 1000 rows: {len(few)} statements: {few}")
        assert len(few) <= 2 + 5, few
        assert len(statements) - len(few) <= 2 * (batches - 1), (statements, few)


async def test_list_users_full_page_fills_post_count_with_one_aggregate(running) -> None:
    marker = unique("m")
    created = await running.users.BatchCreateUsers(
        user_pb2.BatchCreateUsersRequest(
            requests=[create_user_request(display_name=f"{marker} {i}") for i in range(60)]
        )
    )
    expected = {}
    for index, user in enumerate(created.users):
        count = index % 4
        if count:
            await insert_posts(running.server.db.engine, user.id, count)
        expected[user.id] = count
    engine = running.server.db.engine
    counts = {}
    for page_size in (50, 10):
        request = user_pb2.ListUsersRequest(
            filter=f'display_name:"{marker}"', page_size=page_size, view=user_pb2.USER_VIEW_FULL
        )
        with counting(engine) as statements:
            page = await running.users.ListUsers(request)
        assert len(page.users) == page_size
        assert {u.id: u.post_count for u in page.users} == {
            u.id: expected[u.id] for u in page.users
        }
        assert len(statements) <= 4, statements
        counts[page_size] = len(statements)
    assert counts[50] == counts[10], counts
    print(f"ListUsers FULL statements per page: {counts}")
