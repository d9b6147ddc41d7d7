"""No N+1 (API.md Views, DESIGN.md Sessions): GetUser, a FULL list page and a FULL stream
batch each cost a constant number of round trips to the database, never one per row.

Counted where the database sees them (support/statements.py): on PostgreSQL at asyncpg's
protocol, so driver-level SQL, cursor fetches, BEGIN and COMMIT all count; on SQLite at
the engine's cursor and commit events. Prepares are counted but left out of the
comparisons: whether a statement is parsed again depends on which pooled connection ran
it, not on the call."""

from __future__ import annotations

from typing import Any

from blog.v1 import post_pb2, user_pb2
from conftest import Running, running_server, settings_for
from factories import create_user_request, unique
from support.posts import insert_posts
from support.statements import StatementLog, count_statements, pooled_extra

FULL = post_pb2.POST_VIEW_FULL


async def author_with_posts(live: Running, count: int) -> int:
    author = await live.users.CreateUser(create_user_request())
    if count:
        await insert_posts(live.server.db.engine, author.id, count, tags=[unique("n-"), "shared"])
    return int(author.id)


async def counted(live: Running, call: Any) -> StatementLog:
    """The round trips of one call in the steady state: the fewest of a few counted runs,
    after a warm-up. A pooled connection meeting a statement or type for the first time
    adds its own one-off work (a prepare, asyncpg's type introspection), and which
    connection a call gets depends on what ran before it, not on the call."""
    await call()
    logs = []
    for _ in range(4):
        with count_statements(live.server.db.engine) as log:
            await call()
        logs.append(log)
    return min(logs, key=lambda log: log.round_trips())


async def test_the_counter_sees_driver_level_sql_cursor_fetches_and_transactions(
    backend,
) -> None:
    """The instrument itself: a stream's BEGIN, its cursor fetches, its per-batch tag query
    (driver-level on PostgreSQL) and its COMMIT are all counted."""
    async with running_server(settings_for(backend.url, stream_batch_rows=10)) as live:
        author = await author_with_posts(live, 25)
        request = post_pb2.StreamPostsRequest(filter=f"author_id = {author}", view=FULL)
        with count_statements(live.server.db.engine) as log:
            assert sum([len(m.posts) async for m in live.posts.StreamPosts(request)]) == 25
        print(log.summary())
        sql = [s.upper() for s in log.sql()]
        assert any(s.startswith("BEGIN") for s in sql), log.summary()
        assert any(s.startswith("COMMIT") or s == "ROLLBACK" for s in sql), log.summary()
        tag_queries = [s for s in log.sql("execute") if "POST_TAGS" in s.upper()]
        assert len(tag_queries) == 3, log.summary()  # one per batch of ten
        if backend.is_postgres:
            # Driver-level (asyncpg's `fetch`, bypassing SQLAlchemy) and still counted.
            assert all(s.startswith("SELECT pt.post_id") for s in tag_queries), log.summary()
            # The cursor: opened once (bind), read by one or more fetches.
            assert log.kinds()["bind"] == 1, log.summary()
            assert log.kinds()["fetch"] >= 1, log.summary()


async def test_get_user_costs_constant_statements(running, backend) -> None:
    counts = {}
    for posts in (0, 5, 50):
        user_id = await author_with_posts(running, posts)
        for view in (user_pb2.USER_VIEW_BASIC, user_pb2.USER_VIEW_FULL):
            request = user_pb2.GetUserRequest(id=user_id, view=view)
            log = await counted(running, lambda request=request: running.users.GetUser(request))
            got = await running.users.GetUser(request)
            assert got.post_count == (posts if view == user_pb2.USER_VIEW_FULL else 0)
            counts[posts, view] = log.round_trips()
            print(f"GetUser posts={posts} view={view}: {log.summary()}")
    basic = {counts[p, user_pb2.USER_VIEW_BASIC] for p in (0, 5, 50)}
    full = {counts[p, user_pb2.USER_VIEW_FULL] for p in (0, 5, 50)}
    assert len(basic) == 1, counts
    assert len(full) == 1, counts
    if backend.is_postgres:
        # BASIC is one autocommit statement; FULL adds BEGIN, the count and COMMIT.
        assert basic == {1 + pooled_extra(backend.name, autocommit=True)}, counts
        assert full.pop() <= 4 + pooled_extra(backend.name, autocommit=False), counts


async def test_list_posts_full_page_costs_constant_statements(running, backend) -> None:
    counts = {}
    for rows in (5, 50):
        author = await author_with_posts(running, rows + 1)  # one more: a next page
        request = post_pb2.ListPostsRequest(
            filter=f"author_id = {author}", page_size=rows, view=FULL
        )
        page = await running.posts.ListPosts(request)
        assert len(page.posts) == rows
        assert page.next_page_token
        assert all(p.author.id == author and len(p.tags) == 2 for p in page.posts)
        log = await counted(running, lambda request=request: running.posts.ListPosts(request))
        counts[rows] = log.round_trips()
        print(f"ListPosts FULL {rows} rows: {log.summary()}")
        # The next page (a keyset token) costs the same.
        request.page_token = page.next_page_token
        log = await counted(running, lambda request=request: running.posts.ListPosts(request))
        assert log.round_trips() == counts[rows], log.summary()
    assert counts[5] == counts[50], counts
    assert counts[5] <= 4 + pooled_extra(backend.name, autocommit=True), counts


async def test_get_post_full_costs_constant_statements(running, backend) -> None:
    author = await running.users.CreateUser(create_user_request())
    created = await running.posts.CreatePost(
        post_pb2.CreatePostRequest(
            post=post_pb2.Post(author_id=author.id, title="t", tags=["a", "b", "c"])
        )
    )
    request = post_pb2.GetPostRequest(id=created.id, view=FULL)
    log = await counted(running, lambda: running.posts.GetPost(request))
    got = await running.posts.GetPost(request)
    assert got.author.id == author.id
    assert list(got.tags) == ["a", "b", "c"]
    assert log.round_trips() <= 3 + pooled_extra(backend.name, autocommit=True), log.summary()


async def test_stream_posts_full_batch_costs_constant_statements(backend) -> None:
    """A batch costs the same statements whether it holds 5 rows or 999, and each further
    batch adds exactly one (its tag query). Cursor fetches are bounded per batch rather
    than equal: SQLAlchemy's asyncpg cursor reads 50 rows ahead and then the rest of a
    `fetchmany`, so a batch of more than 50 rows takes two fetches."""

    async def stream_cost(batch_rows: int, rows: int) -> StatementLog:
        async with running_server(settings_for(backend.url, stream_batch_rows=batch_rows)) as live:
            author = await author_with_posts(live, rows)
            request = post_pb2.StreamPostsRequest(filter=f"author_id = {author}", view=FULL)

            async def stream() -> None:
                messages = [m async for m in live.posts.StreamPosts(request)]
                streamed = [p for m in messages for p in m.posts]
                assert len(streamed) == rows
                assert all(p.author.id == author and len(p.tags) == 2 for p in streamed)

            log = await counted(live, stream)
            print(f"StreamPosts FULL {rows} rows, batches of {batch_rows}: {log.summary()}")
            return log

    def statements(log: StatementLog) -> int:
        return log.round_trips() - log.kinds()["fetch"]

    runs = {
        (1000, 5): 1,  # (batch rows, rows): batches
        (1000, 999): 1,
        (50, 49): 1,
        (50, 149): 3,
    }
    logs = {run: await stream_cost(*run) for run in runs}
    singles = {statements(logs[run]) for run, batches in runs.items() if batches == 1}
    assert len(singles) == 1, {run: log.summary() for run, log in logs.items()}
    assert statements(logs[50, 149]) == singles.pop() + 2, logs[50, 149].summary()
    for run, batches in runs.items():
        if backend.is_postgres:  # SQLite's cursor reads are in-process, not round trips
            fetches = logs[run].kinds()["fetch"]
            assert 1 <= fetches <= 2 * batches, logs[run].summary()


async def test_list_users_full_page_fills_post_count_with_one_aggregate(running, backend) -> None:
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
    counts = {}
    for page_size in (50, 10):
        request = user_pb2.ListUsersRequest(
            filter=f'display_name:"{marker}"', page_size=page_size, view=user_pb2.USER_VIEW_FULL
        )
        page = await running.users.ListUsers(request)
        assert len(page.users) == page_size
        assert {u.id: u.post_count for u in page.users} == {
            u.id: expected[u.id] for u in page.users
        }
        log = await counted(running, lambda request=request: running.users.ListUsers(request))
        assert log.round_trips() <= 4 + pooled_extra(backend.name, autocommit=False), log.summary()
        counts[page_size] = log.round_trips()
        print(f"ListUsers FULL {page_size} rows: {log.summary()}")
    assert counts[50] == counts[10], counts


async def test_create_post_and_update_user_statements(running, backend) -> None:
    """The write paths in the fewest round trips (issue 12): CreatePost with tags is
    BEGIN, one statement that checks the author, inserts the post and links its tags,
    COMMIT (on SQLite, which has no INSERT inside WITH: the INSERT, then two statements
    for the tags); an UpdateUser is BEGIN, one version-guarded UPDATE ... RETURNING,
    COMMIT."""
    author = await running.users.CreateUser(create_user_request())
    tags = [unique("t-"), unique("t-")]

    async def create_post() -> None:
        await running.posts.CreatePost(
            post_pb2.CreatePostRequest(
                post=post_pb2.Post(author_id=author.id, title=unique("p-"), tags=tags)
            )
        )

    created = await counted(running, create_post)
    print(f"CreatePost (2 tags): {created.summary()}")

    async def update_user() -> None:
        await running.users.UpdateUser(
            user_pb2.UpdateUserRequest(
                user=user_pb2.User(id=author.id, display_name=unique("n-")),
                update_mask={"paths": ["display_name"]},
            )
        )

    updated = await counted(running, update_user)
    print(f"UpdateUser (display_name): {updated.summary()}")
    extra = pooled_extra(backend.name, autocommit=False)
    assert created.round_trips() <= (3 if backend.is_postgres else 5) + extra, created.summary()
    assert updated.round_trips() <= 3 + extra, updated.summary()
