"""Pages and streams of large rows (API.md "Details that callers rely on" and "Streams";
issue 8 items 4 and 5): a list page stops before its encoded response reaches 4 MiB and
hands back a next_page_token, so a client left at its defaults can walk posts of 100,000
characters; pages of small rows stay one statement; streams of large rows go out in
messages of about 1 MiB. Memory itself is measured in test_memory_bounds.py."""

from __future__ import annotations

from typing import Any

import pytest

from blog.v1 import post_pb2, user_pb2
from conftest import Running
from factories import create_user_request, unique
from support.posts import insert_posts
from support.statements import count_statements, pooled_extra

FULL = post_pb2.POST_VIEW_FULL
CLIENT_LIMIT = 4 * 1024 * 1024  # what a gRPC client left at its defaults receives
BIG = 100_000


async def walk_posts(live: Running, **request: Any) -> list[post_pb2.ListPostsResponse]:
    pages = []
    token = ""
    while True:
        page = await live.posts.ListPosts(
            post_pb2.ListPostsRequest(page_size=1000, page_token=token, **request)
        )
        pages.append(page)
        token = page.next_page_token
        if not token:
            return pages


async def large_posts(live: Running, *, tags: list[str] | None = None) -> tuple[int, list[int]]:
    """An author with 40 small posts, 60 of 100,000 ASCII characters and 30 of 100,000
    two-byte characters (200 KB each), in that order of id."""
    author = await live.users.CreateUser(create_user_request())
    engine = live.server.db.engine
    ids = await insert_posts(engine, author.id, 40, tags=tags or [])
    ids += await insert_posts(engine, author.id, 60, body="a" * BIG, tags=tags or [])
    ids += await insert_posts(engine, author.id, 30, body="é" * BIG, tags=tags or [])
    return author.id, ids


async def test_pages_of_large_posts_stop_under_4_mib_and_walk_every_row_once(running) -> None:
    author_id, ids = await large_posts(running, tags=[unique("big-"), "shared"])
    for order_by, view in (("id", post_pb2.POST_VIEW_BASIC), ("title desc", FULL), ("", FULL)):
        pages = await walk_posts(
            running, filter=f"author_id = {author_id}", order_by=order_by, view=view
        )
        sizes = [page.ByteSize() for page in pages]
        assert all(size < CLIENT_LIMIT for size in sizes), sizes
        assert len(pages) >= 3, sizes  # 12 MB of bodies
        assert all(page.next_page_token for page in pages[:-1])
        walked = [p for page in pages for p in page.posts]
        assert sorted(p.id for p in walked) == sorted(ids), order_by
        assert len({p.id for p in walked}) == len(ids)
        assert all(len(p.body) in (len("bulk body"), BIG) for p in walked)
        assert all(len(p.tags) == 2 for p in walked)
        assert all(p.HasField("author") == (view == FULL) for p in walked)
        if order_by == "id":
            assert [p.id for p in walked] == ids
            # Pages as full as the cap allows: ~40 bodies of 100 KB, or ~20 of 200 KB.
            counts = [len(page.posts) for page in pages]
            assert counts[0] >= 40 + 39, counts
            assert min(counts[:-1]) >= 19, counts


async def test_a_page_of_small_posts_is_one_statement_and_large_ones_a_few(
    running, backend
) -> None:
    author_id, _ = await large_posts(running)
    request = post_pb2.ListPostsRequest(filter=f"author_id = {author_id}", order_by="id")
    engine = running.server.db.engine
    request.page_size = 40
    with count_statements(engine) as log:
        small = await running.posts.ListPosts(request)
    assert [len(p.body) for p in small.posts] == [len("bulk body")] * 40
    # One statement (on SQLite the pool's reset-on-return ROLLBACK is counted besides;
    # behind a transaction-mode pooler, BEGIN, the SET LOCAL of the timeouts and ROLLBACK).
    pooled = pooled_extra(backend.name, autocommit=True)
    assert log.kinds()["execute"] == 1 + min(pooled, 1), log.summary()
    assert log.round_trips() - log.kinds()["rollback"] == 1 + pooled, log.summary()
    request.page_size = 1000
    with count_statements(engine) as log:
        mixed = await running.posts.ListPosts(request)
    assert len(mixed.posts) > 40
    # The inline try, then in one snapshot: BEGIN, the page again, its bodies by id in
    # chunks of about 1 MiB (4 MiB of them), COMMIT.
    extra = pooled_extra(backend.name, autocommit=True) + pooled_extra(
        backend.name, autocommit=False
    )
    assert log.round_trips() <= 10 + extra, log.summary()


async def test_a_default_client_gets_a_page_of_large_posts(running) -> None:
    """The shared channel has gRPC's default 4 MiB receive limit: no RESOURCE_EXHAUSTED."""
    author_id, _ = await large_posts(running)
    page = await running.posts.ListPosts(
        post_pb2.ListPostsRequest(filter=f"author_id = {author_id}", page_size=1000)
    )
    assert page.next_page_token
    assert 0 < len(page.posts) < 130


async def test_pages_of_users_with_long_bios_stop_under_4_mib(running) -> None:
    marker = unique("bio")
    bio = "\U0001f600" * 2000  # 8,000 bytes: a thousand of them would be 8 MB
    created = []
    for _ in range(4):
        batch = await running.users.BatchCreateUsers(
            user_pb2.BatchCreateUsersRequest(
                requests=[create_user_request(display_name=marker, bio=bio) for _ in range(250)]
            )
        )
        created += [u.id for u in batch.users]
    walked: list[int] = []
    token = ""
    pages = 0
    while True:
        page = await running.users.ListUsers(
            user_pb2.ListUsersRequest(
                filter=f'display_name = "{marker}"',
                page_size=1000,
                page_token=token,
                view=user_pb2.USER_VIEW_FULL,
            )
        )
        pages += 1
        assert page.ByteSize() < CLIENT_LIMIT
        assert all(u.bio == bio for u in page.users)
        walked += [u.id for u in page.users]
        token = page.next_page_token
        if not token:
            break
    assert walked == sorted(created)
    assert pages >= 2  # 8 MB of bios


async def test_a_stream_of_large_posts_goes_out_in_messages_of_about_one_mib(running) -> None:
    author_id, ids = await large_posts(running, tags=["x", unique("s-")])
    for view in (post_pb2.POST_VIEW_BASIC, FULL):
        request = post_pb2.StreamPostsRequest(
            filter=f"author_id = {author_id}", order_by="id", view=view
        )
        messages = [m async for m in running.posts.StreamPosts(request)]
        sizes = [m.ByteSize() for m in messages]
        assert all(0 < size <= 1.1 * 1024 * 1024 for size in sizes), sizes
        streamed = [p for m in messages for p in m.posts]
        assert [p.id for p in streamed] == ids
        assert all(len(p.tags) == 2 for p in streamed)
        assert all(p.HasField("author") == (view == FULL) for p in streamed)
        listed = [p for page in await walk_posts(running, **_same(request)) for p in page.posts]
        assert streamed == listed
        # Resuming after a message in the middle gets exactly the rest.
        middle = len(messages) // 2
        resumed = [
            p
            async for m in running.posts.StreamPosts(
                post_pb2.StreamPostsRequest(
                    filter=request.filter,
                    order_by="id",
                    view=view,
                    resume_token=messages[middle].resume_token,
                )
            )
            for p in m.posts
        ]
        consumed = sum(len(m.posts) for m in messages[: middle + 1])
        assert [p.id for p in resumed] == ids[consumed:]


def _same(request: post_pb2.StreamPostsRequest) -> dict[str, Any]:
    return {"filter": request.filter, "order_by": request.order_by, "view": request.view}


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_a_stream_reads_large_bodies_by_id_a_chunk_at_a_time(running) -> None:
    """The cursor carries no large body; they come by id, about 1 MiB per statement."""
    author_id, _ = await large_posts(running)
    request = post_pb2.StreamPostsRequest(filter=f"author_id = {author_id}", order_by="id")
    with count_statements(running.server.db.engine) as log:
        count = sum([len(m.posts) async for m in running.posts.StreamPosts(request)])
    assert count == 130
    by_id = [e for e in log.entries if e.kind == "execute" and "posts.body FROM" in e.sql]
    # 12 MB of bodies in chunks of about 1 MiB; the cursor's fetches carry none of them.
    assert 12 <= len(by_id) <= 20, log.summary()
