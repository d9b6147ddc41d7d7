"""Property tests of API.md "Pagination", "Filter", "order_by" and "Resumable streams":
for random data sets (ties in every orderable field, unicode, deleted users), random
filters and random order_by, walking ListUsers / ListPosts page by page with random page
sizes, and StreamUsers / StreamPosts with random resume points, yields exactly the rows a
plain-Python evaluation of the same filter and order yields: same rows, same order, no
repeats, no gaps. Over real gRPC, on PostgreSQL and on SQLite.

Each example seeds its own rows and ANDs the generated filter with a clause that scopes
it to them (support/dataset.py), and removes them afterwards.
"""

from __future__ import annotations

import warnings
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from hypothesis import given, note
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from blog.v1 import post_pb2, user_pb2
from conftest import Running, running_server, settings_for
from errors import rich
from support.dataset import seeded
from support.reference import Reference, probe_traits
from support.strategies import (
    Node,
    data_sets,
    filters,
    hostile_filters,
    order_bys,
    render,
)

BATCH = 3  # rows per stream message: small, so a few rows make several messages
MAX_CALLS = 200


@dataclass
class World:
    live: Running
    engine: AsyncEngine
    reference: Reference


@pytest.fixture(scope="module")
async def world(backend) -> AsyncIterator[World]:
    engine = create_async_engine(backend.url)
    try:
        traits = await probe_traits(engine)
        print(f"reference model for {backend.name}: {traits}")
        if not traits.text_order:
            warnings.warn(
                f"{backend.name} does not order text by code point: the property tests "
                "leave out text order and text comparisons (docs/DECISIONS.md, entry 21)",
                stacklevel=1,
            )
        async with running_server(settings_for(backend.url, stream_batch_rows=BATCH)) as live:
            yield World(live, engine, Reference(traits))
    finally:
        await engine.dispose()


# -- walking the API ----------------------------------------------------------------------


async def walk_pages(
    method: Callable[[Any], Any], make: Callable[..., Any], field: str, data: st.DataObject
) -> list[Any]:
    """Every row of a listing, page by page with random page sizes (0 means 50)."""
    rows: list[Any] = []
    token = ""
    for _ in range(MAX_CALLS):
        size = data.draw(st.integers(1, 5) | st.just(0), label="page_size")
        page = await method(make(page_size=size, page_token=token))
        items = list(getattr(page, field))
        token = page.next_page_token
        if token:  # pages are full while rows remain
            assert len(items) == (size or 50), (size, len(items))
        assert len(items) <= (size or 50)
        rows.extend(items)
        if not token:
            return rows
    raise AssertionError("the listing never ended")


async def walk_stream(
    method: Callable[[Any], Any], make: Callable[..., Any], field: str, data: st.DataObject
) -> list[Any]:
    """Every row of a stream, broken off after a random number of messages and resumed
    from the last message's resume_token, until it ends."""
    rows: list[Any] = []
    token = ""
    for _ in range(MAX_CALLS):
        stop_after = data.draw(st.none() | st.integers(1, 3), label="messages before resuming")
        call = method(make(resume_token=token))
        read = 0
        while stop_after is None or read < stop_after:
            message = await call.read()
            if message is grpc.aio.EOF:
                return rows
            items = list(getattr(message, field))
            assert 1 <= len(items) <= BATCH, len(items)
            assert message.resume_token
            rows.extend(items)
            token = message.resume_token
            read += 1
        call.cancel()
    raise AssertionError("the stream never ended")


def micros(timestamp: Any) -> int:
    return int(timestamp.seconds) * 10**6 + int(timestamp.nanos) // 1000


def user_facts(user: user_pb2.User, full: bool) -> tuple[Any, ...]:
    return (
        user.id,
        user.username,
        user.email,
        user.display_name,
        micros(user.create_time),
        micros(user.update_time),
        user.HasField("delete_time"),
        user.post_count if full else 0,
    )


def expected_user(row: dict[str, Any], full: bool) -> tuple[Any, ...]:
    return (
        row["id"],
        row["username"],
        row["email"],
        row["display_name"],
        row["create_time"],
        row["update_time"],
        row["deleted"],
        row["post_count"] if full else 0,
    )


def post_facts(post: post_pb2.Post, full: bool) -> tuple[Any, ...]:
    return (
        post.id,
        post.author_id,
        post.title,
        tuple(post.tags),
        micros(post.create_time),
        micros(post.update_time),
        post.author.username if full else None,
    )


def expected_post(row: dict[str, Any], full: bool) -> tuple[Any, ...]:
    return (
        row["id"],
        row["author_id"],
        row["title"],
        row["tags"],
        row["create_time"],
        row["update_time"],
        row["author_username"] if full else None,
    )


def scoped(scope: str, node: Node | None) -> str:
    if node is None:
        return scope
    text = render(node)
    note(f"filter: {text!r}")
    return f"{scope} AND ({text})"


@dataclass(frozen=True)
class Resource:
    """How one resource is listed and streamed, and how its rows are compared."""

    name: str  # the stub's attribute and the repeated field of responses
    list_rpc: str
    list_request: Callable[..., Any]
    stream_rpc: str
    stream_request: Callable[..., Any]
    views: tuple[int, int]  # BASIC, FULL
    facts: Callable[[Any, bool], tuple[Any, ...]]
    expected: Callable[[dict[str, Any], bool], tuple[Any, ...]]


USERS = Resource(
    *("users", "ListUsers", user_pb2.ListUsersRequest),
    *("StreamUsers", user_pb2.StreamUsersRequest),
    (user_pb2.USER_VIEW_BASIC, user_pb2.USER_VIEW_FULL),
    user_facts,
    expected_user,
)
POSTS = Resource(
    *("posts", "ListPosts", post_pb2.ListPostsRequest),
    *("StreamPosts", post_pb2.StreamPostsRequest),
    (post_pb2.POST_VIEW_BASIC, post_pb2.POST_VIEW_FULL),
    post_facts,
    expected_post,
)


async def check_query(
    world: World,
    data: st.DataObject,
    resource: Resource,
    rows: list[dict[str, Any]],
    scope: str,
    **request: Any,
) -> None:
    """Draw a filter, an order and a view; paging and streaming them over the seeded rows
    both give what the reference gives for `rows`."""
    text_order = world.reference.traits.text_order
    node = data.draw(st.none() | filters(resource.name, rows, text_order=text_order))
    order = data.draw(order_bys(resource.name, text_order=text_order), label="order_by")
    full = data.draw(st.booleans(), label="FULL view")
    selected = world.reference.select(rows, resource.name, node, order.keys)
    expected = [resource.expected(row, full) for row in selected]
    request.update(filter=scoped(scope, node), order_by=order.text, view=resource.views[full])
    stub = getattr(world.live, resource.name)
    walks = (
        (walk_pages, resource.list_rpc, resource.list_request),
        (walk_stream, resource.stream_rpc, resource.stream_request),
    )
    for walk, rpc, make in walks:
        got = await walk(
            getattr(stub, rpc),
            lambda make=make, **more: make(**request, **more),
            resource.name,
            data,
        )
        assert [resource.facts(item, full) for item in got] == expected, rpc


# -- the properties -----------------------------------------------------------------------


@given(data=st.data(), dataset=data_sets())
async def test_users_pages_and_streams_match_the_reference(world, data, dataset) -> None:
    async with seeded(world.engine, dataset) as rows:
        show_deleted = data.draw(st.booleans(), label="show_deleted")
        visible = [u for u in rows.users if show_deleted or not u["deleted"]]
        await check_query(world, data, USERS, visible, rows.user_scope, show_deleted=show_deleted)


@given(data=st.data(), dataset=data_sets())
async def test_posts_pages_and_streams_match_the_reference(world, data, dataset) -> None:
    async with seeded(world.engine, dataset) as rows:
        await check_query(world, data, POSTS, rows.posts, rows.post_scope)


@given(users_filter=hostile_filters("users"), posts_filter=hostile_filters("posts"))
async def test_hostile_filters_are_accepted_or_invalid_argument(
    world, users_filter, posts_filter
) -> None:
    """Whatever a client writes in `filter`, the answer is a page or INVALID_ARGUMENT
    with one violation on `filter`, never another status."""
    calls = [
        world.live.users.ListUsers(user_pb2.ListUsersRequest(filter=users_filter, page_size=1)),
        world.live.posts.ListPosts(post_pb2.ListPostsRequest(filter=posts_filter, page_size=1)),
    ]
    for call in calls:
        try:
            await call
        except grpc.aio.AioRpcError as error:
            details = rich(error)
            assert details.code == grpc.StatusCode.INVALID_ARGUMENT, (details.code, details)
            assert details.fields == ["filter"], details
