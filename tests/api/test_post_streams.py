"""StreamPosts against API.md "Streams", "Resumable streams" and "Stream limits", and
DESIGN.md "Streaming": batched messages in order, resume tokens bound to their request,
backpressure from a slow client, and connections given back on cancel or deadline."""

from __future__ import annotations

import asyncio
import math
import time
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import asyncpg.cursor
import grpc
import pytest
from sqlalchemy.engine import make_url

from blog.v1 import post_pb2, user_pb2
from conftest import Running, running_server, settings_for
from errors import check_error
from factories import create_user_request, unique
from support.postgres import raw_dsn
from support.posts import insert_posts

FULL = post_pb2.POST_VIEW_FULL
BASIC = post_pb2.POST_VIEW_BASIC
INVALID = grpc.StatusCode.INVALID_ARGUMENT
postgres_only = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)


# -- helpers ------------------------------------------------------------------------------


# A client channel with no bandwidth-delay probing and a small per-stream window, so a
# client that stops reading stops the server after a few messages (HTTP/2 flow control).
SLOW_CHANNEL = {"grpc.http2.bdp_probe": 0, "grpc.http2.lookahead_bytes": 16 * 1024}


@asynccontextmanager
async def server(backend, channel: dict[str, Any] | None = None, **settings: Any):
    async with running_server(settings_for(backend.url, **settings), **(channel or {})) as live:
        yield live


async def author_with_posts(live: Running, count: int, **options: Any) -> tuple[int, list[int]]:
    author = await live.users.CreateUser(create_user_request())
    ids = await insert_posts(live.server.db.engine, author.id, count, **options)
    return author.id, ids


async def messages_of(live: Running, **request: Any) -> list[post_pb2.StreamPostsResponse]:
    return [m async for m in live.posts.StreamPosts(post_pb2.StreamPostsRequest(**request))]


async def read_rest(call: Any, into: list[post_pb2.StreamPostsResponse]) -> None:
    """Read a call (already read from with `read()`) to its end, appending to `into`."""
    while (message := await call.read()) is not grpc.aio.EOF:
        into.append(message)


def rows(messages: list[post_pb2.StreamPostsResponse]) -> list[post_pb2.Post]:
    return [p for m in messages for p in m.posts]


async def listed(live: Running, **request: Any) -> list[post_pb2.Post]:
    found: list[post_pb2.Post] = []
    token = ""
    while True:
        page = await live.posts.ListPosts(
            post_pb2.ListPostsRequest(page_size=1000, page_token=token, **request)
        )
        found.extend(page.posts)
        token = page.next_page_token
        if not token:
            return found


async def stream_error(call: Any) -> grpc.aio.AioRpcError:
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError("the stream ended without an error")


async def idle_in_transaction(url: str) -> int:
    """Sessions of the test database sitting idle inside a transaction (a leaked stream)."""
    connection = await asyncpg.connect(raw_dsn(url))
    try:
        count = await connection.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 "
            "AND pid <> pg_backend_pid() AND state LIKE 'idle in transaction%'",
            make_url(url).database,
        )
    finally:
        await connection.close()
    return int(count)


async def eventually_released(live: Running, backend, seconds: float = 2.0) -> None:
    """Within `seconds`, no pool connection is checked out (and, on PostgreSQL, no session
    of the database is idle in a transaction)."""
    deadline = time.monotonic() + seconds
    while True:
        checked_out = live.server.db.engine.pool.checkedout()
        idle = await idle_in_transaction(backend.direct_url) if backend.is_postgres else 0
        if checked_out == 0 and idle == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"after {seconds}s: {checked_out} checked out, {idle} idle in tx")
        await asyncio.sleep(0.05)


# -- batches and order --------------------------------------------------------------------


async def test_stream_messages_are_non_empty_bounded_batches_in_order(backend) -> None:
    async with server(backend, stream_batch_rows=7) as live:
        author_id, ids = await author_with_posts(live, 30, tags=[unique("s-"), "common"])
        mine = f"author_id = {author_id}"
        for order_by in ("", "id", "title desc", "create_time", "id desc"):
            for view in (BASIC, FULL):
                messages = await messages_of(live, filter=mine, order_by=order_by, view=view)
                assert len(messages) >= math.ceil(30 / 7)
                assert all(1 <= len(m.posts) <= 7 for m in messages), [
                    len(m.posts) for m in messages
                ]
                assert all(m.resume_token for m in messages)
                expected = await listed(live, filter=mine, order_by=order_by, view=view)
                assert rows(messages) == expected, (order_by, view)
                assert len(expected) == 30
                assert all(p.HasField("author") == (view == FULL) for p in rows(messages))
                assert all(len(p.tags) == 2 for p in rows(messages))
        assert [p.id for p in rows(await messages_of(live, filter=mine, order_by="id"))] == ids


async def test_stream_of_nothing_sends_no_message(posts) -> None:
    call = posts.StreamPosts(post_pb2.StreamPostsRequest(filter=f"author_id = {2**62 + 1}"))
    assert [m async for m in call] == []


async def test_stream_splits_large_batches_under_about_one_mib(running, backend) -> None:
    author = await running.users.CreateUser(create_user_request())
    await insert_posts(running.server.db.engine, author.id, 100, body="x" * 60_000)
    mine = f"author_id = {author.id}"
    messages = await messages_of(running, filter=mine, order_by="id")
    sizes = [m.ByteSize() for m in messages]
    assert all(size <= 1.1 * 1024 * 1024 for size in sizes), sizes
    assert len(messages) >= 6
    assert all(m.posts for m in messages)
    streamed = rows(messages)
    assert [p.id for p in streamed] == sorted(p.id for p in streamed)
    assert len(streamed) == 100
    assert all(len(p.body) == 60_000 for p in streamed)


# -- resume tokens ------------------------------------------------------------------------


async def test_resume_from_any_message_gets_exactly_the_rest(backend) -> None:
    async with server(backend, stream_batch_rows=7) as live:
        author_id, _ = await author_with_posts(live, 30)
        for order_by, view in (("", BASIC), ("title desc", FULL), ("id", FULL)):
            request = {"filter": f"author_id = {author_id}", "order_by": order_by, "view": view}
            messages = await messages_of(live, **request)
            everything = rows(messages)
            consumed = 0
            for message in messages:
                consumed += len(message.posts)
                rest = await messages_of(live, resume_token=message.resume_token, **request)
                assert rows(rest) == everything[consumed:], (order_by, consumed)
            assert consumed == 30


async def test_resume_sees_rows_written_after_the_token_only_once(running) -> None:
    author = await running.users.CreateUser(create_user_request())
    await insert_posts(running.server.db.engine, author.id, 5)
    request = {"filter": f"author_id = {author.id}", "order_by": "id"}
    first = await messages_of(running, **request)
    later = await insert_posts(running.server.db.engine, author.id, 3)
    resumed = await messages_of(running, resume_token=first[-1].resume_token, **request)
    assert [p.id for p in rows(resumed)] == later


async def test_resume_token_is_bound_to_filter_order_and_view(users, posts) -> None:
    author = await users.CreateUser(create_user_request())
    for _ in range(2):
        await posts.CreatePost(
            post_pb2.CreatePostRequest(post=post_pb2.Post(author_id=author.id, title="t"))
        )
    mine = f"author_id = {author.id}"
    messages = [
        m
        async for m in posts.StreamPosts(
            post_pb2.StreamPostsRequest(filter=mine, order_by="id", view=FULL)
        )
    ]
    token = messages[0].resume_token
    page = await posts.ListPosts(post_pb2.ListPostsRequest(filter=mine, order_by="id", page_size=1))
    bad = [
        post_pb2.StreamPostsRequest(filter=f"{mine} AND id > 0", order_by="id", view=FULL),
        post_pb2.StreamPostsRequest(filter=mine, order_by="id desc", view=FULL),
        post_pb2.StreamPostsRequest(filter=mine, order_by="", view=FULL),
        post_pb2.StreamPostsRequest(filter=mine, order_by="id", view=BASIC),
        post_pb2.StreamPostsRequest(filter=mine, order_by="id"),
    ]
    for request in bad:
        request.resume_token = token
        check_error(
            await stream_error(posts.StreamPosts(request)), INVALID, fields=["resume_token"]
        )
    for forged in (token[:-3] + "AAA", "x.y", page.next_page_token):
        request = post_pb2.StreamPostsRequest(
            filter=mine, order_by="id", view=FULL, resume_token=forged
        )
        check_error(
            await stream_error(posts.StreamPosts(request)), INVALID, fields=["resume_token"]
        )
    # A BASIC token works for UNSPECIFIED (which means BASIC), and the right one resumes.
    basic = [
        m async for m in posts.StreamPosts(post_pb2.StreamPostsRequest(filter=mine, view=BASIC))
    ]
    again = posts.StreamPosts(
        post_pb2.StreamPostsRequest(filter=mine, resume_token=basic[0].resume_token)
    )
    assert [m async for m in again] == basic[1:]


async def test_stream_bad_requests_are_invalid(posts) -> None:
    cases = [
        (post_pb2.StreamPostsRequest(filter="body = 1"), "filter"),
        (post_pb2.StreamPostsRequest(order_by="body"), "order_by"),
        (post_pb2.StreamPostsRequest(view=9), "view"),
    ]
    for request, field in cases:
        check_error(await stream_error(posts.StreamPosts(request)), INVALID, fields=[field])


# -- limits -------------------------------------------------------------------------------


async def test_stalled_client_is_aborted_and_its_last_token_resumes(backend) -> None:
    async with server(backend, SLOW_CHANNEL, stream_batch_rows=10, stream_idle_timeout=0.5) as live:
        author_id, ids = await author_with_posts(live, 1000, body="y" * 1000)
        request = post_pb2.StreamPostsRequest(filter=f"author_id = {author_id}", order_by="id")
        call = live.posts.StreamPosts(request)
        received: list[post_pb2.StreamPostsResponse] = [await call.read()]
        await asyncio.sleep(2.0)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await read_rest(call, received)
        check_error(caught.value, grpc.StatusCode.ABORTED, "STREAM_STALLED")
        assert 0 < len(rows(received)) < 1000
        await eventually_released(live, backend)
        request.resume_token = received[-1].resume_token
        rest = [m async for m in live.posts.StreamPosts(request)]
        assert [p.id for p in rows(received) + rows(rest)] == ids


async def test_too_many_streams_is_resource_exhausted(backend) -> None:
    async with server(backend, SLOW_CHANNEL, stream_batch_rows=10, stream_max_concurrent=1) as live:
        author_id, _ = await author_with_posts(live, 500, body="z" * 1000)
        request = post_pb2.StreamPostsRequest(filter=f"author_id = {author_id}")
        first = live.posts.StreamPosts(request)
        assert (await first.read()).posts
        check_error(
            await stream_error(live.posts.StreamPosts(request)),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "TOO_MANY_STREAMS",
        )
        first.cancel()
        await eventually_released(live, backend)
        assert len(rows([m async for m in live.posts.StreamPosts(request)])) == 500


# -- backpressure, cancellation, deadlines -------------------------------------------------


@postgres_only
async def test_slow_client_stops_the_cursor(backend, monkeypatch) -> None:
    """Rows fetched from PostgreSQL are counted at the driver (asyncpg's cursor fetch,
    which the server-side cursor of `AsyncSession.stream` calls): while the client pauses,
    the server must stop fetching, not read the whole result ahead into memory."""
    fetched = 0
    real_fetch = asyncpg.cursor.Cursor.fetch

    async def counting_fetch(self: Any, n: int, **options: Any) -> Any:
        nonlocal fetched
        result = await real_fetch(self, n, **options)
        fetched += len(result)
        return result

    monkeypatch.setattr(asyncpg.cursor.Cursor, "fetch", counting_fetch)
    total = 20_000
    async with server(backend, SLOW_CHANNEL, stream_batch_rows=100) as live:
        author_id, ids = await author_with_posts(live, total, body="b" * 100)
        call = live.posts.StreamPosts(
            post_pb2.StreamPostsRequest(filter=f"author_id = {author_id}", order_by="id")
        )
        received = [await call.read(), await call.read()]
        await asyncio.sleep(1.0)
        ahead = fetched
        print(f"backpressure: received 200 rows, server fetched {ahead} of {total}")
        assert ahead >= 200
        # Observed: 400-500 (two or three batches ahead). Reading everything is 20,000.
        assert ahead <= 200 + 20 * 100, f"fetched {ahead} rows while the client held 200"
        await read_rest(call, received)
        assert [p.id for p in rows(received)] == ids
        assert fetched == total


@postgres_only
async def test_cancelled_streams_give_their_connections_back(backend) -> None:
    """100 streams, each cancelled after its first message, in waves of 20 (the shared
    PostgreSQL allows 100 connections in all; fewer behind a pooler, whose pool each
    paused stream holds a server connection of): every wave's connections come back."""
    wave = min(20, backend.max_streams or 20)
    settings = {"stream_batch_rows": 10, "db_pool_size": wave, "stream_max_concurrent": wave}
    async with server(backend, SLOW_CHANNEL, **settings) as live:
        author_id, _ = await author_with_posts(live, 1000, body="c" * 1000)
        request = post_pb2.StreamPostsRequest(filter=f"author_id = {author_id}", view=FULL)
        for _ in range(100 // wave):
            calls = [live.posts.StreamPosts(request) for _ in range(wave)]
            firsts = await asyncio.gather(*(call.read() for call in calls))
            assert all(len(m.posts) == 10 for m in firsts)
            # The paused streams really hold their connections inside transactions...
            assert live.server.db.engine.pool.checkedout() == wave
            # (A stream whose next fetch is still on the wire shows as active for a moment.)
            idle = 0
            for _ in range(40):
                idle = await idle_in_transaction(backend.direct_url)
                if idle >= wave:
                    break
                await asyncio.sleep(0.05)
            assert idle >= wave
            for call in calls:
                call.cancel()
            # ...and give every one back at once when cancelled.
            await eventually_released(live, backend, seconds=2.0)
            assert all(call.cancelled() for call in calls)
        assert len(rows(await messages_of(live, filter=f"author_id = {author_id}"))) == 1000


async def test_deadline_mid_stream_releases_the_connection(backend) -> None:
    async with server(backend, SLOW_CHANNEL, stream_batch_rows=10) as live:
        author_id, _ = await author_with_posts(live, 1000, body="d" * 1000)
        call = live.posts.StreamPosts(
            post_pb2.StreamPostsRequest(filter=f"author_id = {author_id}"), timeout=1.0
        )
        assert (await call.read()).posts
        assert live.server.db.engine.pool.checkedout() == 1
        await asyncio.sleep(1.5)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await read_rest(call, [])
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        await eventually_released(live, backend, seconds=2.0)
        # The server is still healthy afterwards.
        assert await live.users.GetUser(user_pb2.GetUserRequest(id=author_id))


async def test_a_cancelled_stream_is_logged_as_cancelled(backend, caplog) -> None:
    """The wrapper logs a call the client gave up on (CancelledError is no Exception, so
    only an explicit branch sees it), then lets the cancellation end the handler."""
    async with server(backend, SLOW_CHANNEL, stream_batch_rows=10) as live:
        author_id, _ = await author_with_posts(live, 500, body="e" * 1000)
        with caplog.at_level("INFO", logger="service.rpc"):
            call = live.posts.StreamPosts(
                post_pb2.StreamPostsRequest(filter=f"author_id = {author_id}")
            )
            assert (await call.read()).posts
            call.cancel()
            await eventually_released(live, backend)
            deadline = time.monotonic() + 2.0
            while not any("StreamPosts CANCELLED" in r.getMessage() for r in caplog.records):
                assert time.monotonic() < deadline, "the cancelled stream never reached the log"
                await asyncio.sleep(0.05)
        assert not any("INTERNAL" in r.getMessage() for r in caplog.records)
