"""StreamUsers over real gRPC on each backend: batching, order, resume tokens, limits.

Rows are isolated by a unique display_name marker and the filter `display_name:"<marker>"`.

Stall and mid-stream tests use a client channel with BDP probing off
(`grpc.http2.bdp_probe=0`). With probing on (the default), the client's HTTP/2
transport grows its receive window to several MiB and keeps reading from the socket
whether or not the application reads, so a client that "reads nothing" still drains
about 11 MiB of stream data on loopback before the server's write blocks; the server
cannot tell that client apart from a reading one until then. With probing off the
window stays at its 64 KiB default and the server's write blocks after about 100 KiB,
so a few hundred 2 KB rows are enough to stall a stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import pytest
from sqlalchemy.engine import make_url

from blog.v1 import post_pb2, user_pb2
from conftest import Backend, Running, running_server, settings_for
from errors import rich
from factories import post, unique, user
from support.postgres import PostgresServer, raw_dsn

# A client whose HTTP/2 window stays small, so an unread stream fills it quickly.
SMALL_WINDOW: dict[str, Any] = {"grpc.http2.bdp_probe": 0}

BIG_ROWS = 400  # x ~2 KB each: far more than SMALL_WINDOW lets the transport buffer
BIO = "b" * 1900
SMALL_ROWS = 50
BATCH = 7


@dataclass
class Seeded:
    marker: str
    users: list[user_pb2.User]  # in id order

    @property
    def filter(self) -> str:
        return f'display_name:"{self.marker}"'

    @property
    def ids(self) -> list[int]:
        return [u.id for u in self.users]

    def request(self, **fields: Any) -> user_pb2.StreamUsersRequest:
        return user_pb2.StreamUsersRequest(filter=self.filter, **fields)


async def seed(stub: Any, count: int, *, bio: str = "", marker: str | None = None) -> Seeded:
    marker = marker or unique("mark")
    created: list[user_pb2.User] = []
    for start in range(0, count, 1000):
        requests = [
            user_pb2.CreateUserRequest(user=user(display_name=f"{marker} {i}", bio=bio))
            for i in range(start, min(count, start + 1000))
        ]
        response = await stub.BatchCreateUsers(user_pb2.BatchCreateUsersRequest(requests=requests))
        created.extend(response.users)
    return Seeded(marker, sorted(created, key=lambda u: u.id))


async def read_into(call: Any, messages: list[user_pb2.StreamUsersResponse]) -> None:
    """Append the remaining messages of a call, read with call.read() (so a call that was
    read from already can be finished too); what arrived before an error is kept."""
    while (message := await call.read()) is not grpc.aio.EOF:
        messages.append(message)


async def collect(call: Any) -> list[user_pb2.StreamUsersResponse]:
    messages: list[user_pb2.StreamUsersResponse] = []
    await read_into(call, messages)
    return messages


def ids_of(messages: Sequence[user_pb2.StreamUsersResponse]) -> list[int]:
    return [u.id for m in messages for u in m.users]


async def eventually(
    check: Callable[[], Awaitable[bool]], within: float, what: Callable[[], str]
) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s: {what()}")
        await asyncio.sleep(0.05)


async def idle_in_transaction(postgres: PostgresServer, url: str) -> int:
    database = make_url(url).database
    connection = await asyncpg.connect(raw_dsn(postgres.admin_url))
    try:
        count: int = await connection.fetchval(
            "select count(*) from pg_stat_activity "
            "where datname = $1 and state like 'idle in transaction%'",
            database,
        )
        return count
    finally:
        await connection.close()


async def assert_connections_returned(
    live: Running, backend: Backend, postgres: PostgresServer
) -> None:
    """Within 2 s: no pool connection checked out and (PostgreSQL) no session of the
    test database left idle in transaction."""
    pool = live.server.db.engine.pool
    state: dict[str, int] = {}

    async def returned() -> bool:
        state["checkedout"] = pool.checkedout()  # type: ignore[attr-defined]
        state["idle_in_transaction"] = (
            await idle_in_transaction(postgres, backend.direct_url) if backend.is_postgres else 0
        )
        return state["checkedout"] == 0 and state["idle_in_transaction"] == 0

    await eventually(returned, 2.0, lambda: f"connections given back: {state}")


def server_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """ERROR records the service logged (an INTERNAL status, a crash)."""
    return [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.startswith("service")
    ]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
async def streams(backend: Backend) -> AsyncIterator[Running]:
    """A server with small stream batches, shared by this module's ordinary tests."""
    settings = settings_for(backend.url, stream_batch_rows=BATCH, stream_idle_timeout=1.0)
    async with running_server(settings) as live:
        yield live


@pytest.fixture(scope="module")
async def small(streams: Running) -> Seeded:
    return await seed(streams.users, SMALL_ROWS)


@pytest.fixture(scope="module")
async def big(streams: Running) -> Seeded:
    return await seed(streams.users, BIG_ROWS, bio=BIO)


# ------------------------------------------------------------------- batches and order


async def test_batches_are_bounded_non_empty_in_order_and_complete(
    streams: Running, small: Seeded
) -> None:
    messages = await collect(streams.users.StreamUsers(small.request()))
    assert len(messages) >= -(-SMALL_ROWS // BATCH)
    for message in messages:
        assert 1 <= len(message.users) <= BATCH
        assert message.resume_token
    assert ids_of(messages) == small.ids
    # BASIC view: post_count left at 0, and each row is the stored user.
    by_id = {u.id: u for u in small.users}
    for got in (u for m in messages for u in m.users):
        assert got == by_id[got.id]


async def test_order_by_is_kept_across_messages(streams: Running, small: Seeded) -> None:
    messages = await collect(streams.users.StreamUsers(small.request(order_by="username desc")))
    expected = [u.id for u in sorted(small.users, key=lambda u: u.username, reverse=True)]
    assert len(messages) > 1
    assert ids_of(messages) == expected


async def test_empty_result_sends_no_empty_message(streams: Running) -> None:
    marker = unique("none")
    messages = await collect(
        streams.users.StreamUsers(user_pb2.StreamUsersRequest(filter=f'display_name:"{marker}"'))
    )
    assert messages == []


async def test_show_deleted(streams: Running) -> None:
    seeded = await seed(streams.users, 10)
    gone = seeded.users[3]
    await streams.users.DeleteUser(user_pb2.DeleteUserRequest(id=gone.id))
    live_ids = [i for i in seeded.ids if i != gone.id]
    assert ids_of(await collect(streams.users.StreamUsers(seeded.request()))) == live_ids
    with_deleted = await collect(streams.users.StreamUsers(seeded.request(show_deleted=True)))
    assert ids_of(with_deleted) == seeded.ids
    deleted = next(u for m in with_deleted for u in m.users if u.id == gone.id)
    assert deleted.HasField("delete_time")


async def test_batches_stay_under_the_byte_limit(backend: Backend, big: Seeded) -> None:
    limit = 8192
    settings = settings_for(backend.url, stream_batch_rows=1000, stream_batch_bytes=limit)
    async with running_server(settings) as live:
        messages = await collect(live.users.StreamUsers(big.request()))
    assert ids_of(messages) == big.ids
    for message in messages:
        assert message.users
        payload = message.ByteSize() - len(message.resume_token) - 8
        assert payload <= limit
    # ~2 KB rows under an 8 KiB limit: about four rows a message, never one per row.
    assert len(messages) < BIG_ROWS / 2
    assert len(messages) >= BIG_ROWS * 2000 // limit


# ------------------------------------------------------------------------ resume tokens


async def test_resume_token_of_each_message_continues_after_it(
    streams: Running, small: Seeded
) -> None:
    request = small.request(order_by="username")
    messages = await collect(streams.users.StreamUsers(request))
    expected = ids_of(messages)
    assert sorted(expected) == sorted(small.ids)
    assert len(messages) > 2
    for k, message in enumerate(messages):
        resumed = user_pb2.StreamUsersRequest()
        resumed.CopyFrom(request)
        resumed.resume_token = message.resume_token
        rest = await collect(streams.users.StreamUsers(resumed))
        assert ids_of(messages[: k + 1]) + ids_of(rest) == expected
        assert all(m.users for m in rest)


async def test_resume_sees_rows_inserted_after_the_position_and_none_twice(
    streams: Running,
) -> None:
    seeded = await seed(streams.users, 3 * BATCH)
    call = streams.users.StreamUsers(seeded.request())
    first = await call.read()
    call.cancel()
    later = await seed(streams.users, 3, marker=seeded.marker)
    rest = await collect(streams.users.StreamUsers(seeded.request(resume_token=first.resume_token)))
    assert ids_of([first]) + ids_of(rest) == seeded.ids + later.ids


@pytest.mark.parametrize(
    "change",
    [
        {"filter": "other"},
        {"order_by": "username"},
        {"show_deleted": True},
        {"view": user_pb2.USER_VIEW_FULL},
    ],
    ids=["filter", "order_by", "show_deleted", "view"],
)
async def test_resume_token_with_other_request_is_invalid(
    streams: Running, small: Seeded, change: dict[str, Any]
) -> None:
    call = streams.users.StreamUsers(small.request())
    first = await call.read()
    call.cancel()
    fields: dict[str, Any] = {"filter": small.filter}
    fields.update(change)
    if fields["filter"] == "other":
        fields["filter"] = f'display_name:"{small.marker} 1"'
    request = user_pb2.StreamUsersRequest(resume_token=first.resume_token, **fields)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(streams.users.StreamUsers(request))
    error = rich(caught.value)
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.fields == ["resume_token"]
    assert error.reason == "INVALID_FIELD"


async def test_view_basic_and_unspecified_share_tokens(streams: Running, small: Seeded) -> None:
    call = streams.users.StreamUsers(small.request())
    first = await call.read()
    call.cancel()
    rest = await collect(
        streams.users.StreamUsers(
            small.request(resume_token=first.resume_token, view=user_pb2.USER_VIEW_BASIC)
        )
    )
    assert ids_of([first]) + ids_of(rest) == small.ids


def _tampered(token: str) -> str:
    middle = len(token) // 2
    replacement = "A" if token[middle] != "A" else "B"
    return token[:middle] + replacement + token[middle + 1 :]


@pytest.mark.parametrize("kind", ["garbage", "tampered", "list_token"])
async def test_forged_resume_token_is_invalid(streams: Running, small: Seeded, kind: str) -> None:
    if kind == "garbage":
        token = "not-a-token"
    elif kind == "tampered":
        call = streams.users.StreamUsers(small.request())
        token = _tampered((await call.read()).resume_token)
        call.cancel()
    else:  # a genuine page token is not a resume token
        page = await streams.users.ListUsers(
            user_pb2.ListUsersRequest(filter=small.filter, page_size=3)
        )
        token = page.next_page_token
        assert token
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(streams.users.StreamUsers(small.request(resume_token=token)))
    error = rich(caught.value)
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.fields == ["resume_token"]


# --------------------------------------------------------------------------- FULL view


async def test_full_view_fills_post_count(streams: Running) -> None:
    seeded = await seed(streams.users, 2 * BATCH + 1)
    counts = {u.id: 0 for u in seeded.users}
    for author, n in ((seeded.users[0], 2), (seeded.users[BATCH + 1], 3), (seeded.users[-1], 1)):
        for _ in range(n):
            await streams.posts.CreatePost(post_pb2.CreatePostRequest(post=post(author.id)))
        counts[author.id] = n
    full = await collect(streams.users.StreamUsers(seeded.request(view=user_pb2.USER_VIEW_FULL)))
    assert ids_of(full) == seeded.ids
    assert {u.id: u.post_count for m in full for u in m.users} == counts
    basic = await collect(streams.users.StreamUsers(seeded.request()))
    assert all(u.post_count == 0 for m in basic for u in m.users)


# ------------------------------------------------------------------------ stream limits


async def test_stalled_client_is_aborted_and_its_last_token_resumes(
    backend: Backend, postgres: PostgresServer, big: Seeded
) -> None:
    idle = 1.0
    settings = settings_for(backend.url, stream_idle_timeout=idle, stream_batch_rows=10)
    async with running_server(settings, **SMALL_WINDOW) as live:
        call = live.users.StreamUsers(big.request())
        received = [await call.read()]
        await asyncio.sleep(idle * 2.5)  # read nothing for longer than the idle timeout
        # What the transport had buffered arrives, then the error (not EOF).
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await read_into(call, received)
        error = rich(caught.value)
        assert error.code is grpc.StatusCode.ABORTED, error
        assert error.reason == "STREAM_STALLED"
        assert error.info is not None
        assert error.info.domain == "blog.v1"
        got = ids_of(received)
        assert got == big.ids[: len(got)]
        assert len(got) < BIG_ROWS
        rest = await collect(
            live.users.StreamUsers(big.request(resume_token=received[-1].resume_token))
        )
        assert got + ids_of(rest) == big.ids
        await assert_connections_returned(live, backend, postgres)


async def test_too_many_streams_is_resource_exhausted(backend: Backend, big: Seeded) -> None:
    settings = settings_for(
        backend.url, stream_max_concurrent=1, stream_batch_rows=10, stream_idle_timeout=30.0
    )
    async with running_server(settings, **SMALL_WINDOW) as live:
        held = live.users.StreamUsers(big.request())
        first = await held.read()  # the server is now blocked mid-stream on a full window
        assert first.users
        second = live.users.StreamUsers(big.request())
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await collect(second)
        error = rich(caught.value)
        assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.reason == "TOO_MANY_STREAMS"
        assert error.retry_info is not None
        # The held stream is unharmed and reads to its end; then the slot is free again.
        rest = await collect(held)
        assert ids_of([first, *rest]) == big.ids
        again = await collect(live.users.StreamUsers(big.request()))
        assert ids_of(again) == big.ids


async def test_cancelled_streams_give_their_connections_back(
    backend: Backend, postgres: PostgresServer, big: Seeded, caplog: pytest.LogCaptureFixture
) -> None:
    # The idle timeout is far longer than the test, so only cancellation can free them.
    settings = settings_for(
        backend.url, stream_batch_rows=10, stream_idle_timeout=60.0, stream_max_concurrent=20
    )
    async with running_server(settings, **SMALL_WINDOW) as live:
        pool = live.server.db.engine.pool

        async def one() -> None:
            call = live.users.StreamUsers(big.request())
            message = await call.read()
            assert message.users
            call.cancel()

        group = 5
        for _ in range(100 // group):
            await asyncio.gather(*(one() for _ in range(group)))
        await assert_connections_returned(live, backend, postgres)
        # Still serving streams afterwards, with no slot lost.
        assert ids_of(await collect(live.users.StreamUsers(big.request()))) == big.ids
        assert pool.checkedout() == 0  # type: ignore[attr-defined]
    # A client going away is routine, not an INTERNAL error with a traceback.
    assert server_errors(caplog) == []


async def test_deadline_mid_stream_gives_the_connection_back(
    backend: Backend, postgres: PostgresServer, big: Seeded, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(backend.url, stream_batch_rows=10, stream_idle_timeout=60.0)
    async with running_server(settings, **SMALL_WINDOW) as live:
        call = live.users.StreamUsers(big.request(), timeout=1.0)
        first = await call.read()
        assert first.users
        assert live.server.db.engine.pool.checkedout() == 1  # type: ignore[attr-defined]
        await asyncio.sleep(1.5)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await collect(call)
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        await assert_connections_returned(live, backend, postgres)
    assert server_errors(caplog) == []
