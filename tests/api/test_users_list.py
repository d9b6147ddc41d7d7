"""ListUsers against the contract (API.md): keyset pages, page sizes, tokens, order_by,
filters, show_deleted and views. Each test lists only its own rows, found by a unique
marker in display_name."""

from __future__ import annotations

import re
import string
from datetime import UTC, timedelta, timezone
from typing import Any

import grpc
import pytest
from sqlalchemy import insert

from blog.v1 import user_pb2
from conftest import running_server, settings_for
from errors import expect_error
from factories import create_user_request, unique
from service.config import Settings
from service.db.engine import create_engine
from service.db.models import Post
from service.db.types import utcnow

Code = grpc.StatusCode
User = user_pb2.User


async def make(users: Any, marker: str, count: int, **overrides: Any) -> list[User]:
    """`count` users whose display_name holds `marker`, in one batch (ids ascending)."""
    requests = [create_user_request(display_name=marker, **overrides) for _ in range(count)]
    response = await users.BatchCreateUsers(user_pb2.BatchCreateUsersRequest(requests=requests))
    return list(response.users)


async def create(users: Any, **overrides: Any) -> User:
    created: User = await users.CreateUser(create_user_request(**overrides))
    return created


def marked(marker: str, extra: str = "") -> str:
    base = f'display_name:"{marker}"'
    return f"{base} AND ({extra})" if extra else base


async def page(users: Any, **params: Any) -> user_pb2.ListUsersResponse:
    response: user_pb2.ListUsersResponse = await users.ListUsers(
        user_pb2.ListUsersRequest(**params)
    )
    return response


async def walk(users: Any, page_size: int, **params: Any) -> list[list[User]]:
    """Every page of a listing, following next_page_token to the end."""
    pages: list[list[User]] = []
    token = ""
    while True:
        response = await page(users, page_size=page_size, page_token=token, **params)
        pages.append(list(response.users))
        token = response.next_page_token
        if not token:
            return pages
        assert len(pages) < 5000, "the listing never ends"


def ids(rows: list[User]) -> list[int]:
    return [row.id for row in rows]


def flat(pages: list[list[User]]) -> list[User]:
    return [row for rows in pages for row in rows]


# -- pages --------------------------------------------------------------------------------


async def test_default_order_is_id(users) -> None:
    marker = unique("m")
    made = await make(users, marker, 3)
    made += [await create(users, display_name=marker) for _ in range(2)]
    response = await page(users, filter=marked(marker))
    assert list(response.users) == sorted(made, key=lambda u: u.id)
    assert response.next_page_token == ""


async def test_page_size_zero_means_50(users) -> None:
    marker = unique("m")
    made = await make(users, marker, 51)
    first = await page(users, filter=marked(marker))
    assert ids(list(first.users)) == ids(made[:50])
    assert first.next_page_token
    second = await page(users, filter=marked(marker), page_token=first.next_page_token)
    assert ids(list(second.users)) == [made[50].id]
    assert second.next_page_token == ""


async def test_page_size_one(users) -> None:
    marker = unique("m")
    made = await make(users, marker, 3)
    pages = await walk(users, 1, filter=marked(marker))
    assert [ids(p) for p in pages] == [[u.id] for u in made]


async def test_page_size_1000_and_cap(users) -> None:
    marker = unique("m")
    made = await make(users, marker, 1000) + await make(users, marker, 1)
    for size in (1000, 1001, 5000, 2**31 - 1):
        first = await page(users, page_size=size, filter=marked(marker))
        assert ids(list(first.users)) == ids(made[:1000]), size
        assert first.next_page_token
    rest = await page(
        users, page_size=5000, filter=marked(marker), page_token=first.next_page_token
    )
    assert ids(list(rest.users)) == [made[1000].id]
    assert rest.next_page_token == ""


@pytest.mark.parametrize("size", [-1, -(2**31)])
async def test_negative_page_size_is_invalid(users, size) -> None:
    request = user_pb2.ListUsersRequest(page_size=size)
    await expect_error(users.ListUsers(request), Code.INVALID_ARGUMENT, fields=["page_size"])


@pytest.mark.parametrize(
    ("count", "size", "shape"),
    [(7, 3, [3, 3, 1]), (6, 3, [3, 3]), (1, 5, [1]), (0, 5, [0]), (4, 1000, [4])],
)
async def test_pages_are_full_until_the_last(users, count, size, shape) -> None:
    marker = unique("m")
    made = await make(users, marker, count) if count else []
    pages = await walk(users, size, filter=marked(marker))
    assert [len(p) for p in pages] == shape
    assert ids(flat(pages)) == ids(made)


async def test_page_size_may_change_between_pages(users) -> None:
    marker = unique("m")
    made = await make(users, marker, 5)
    first = await page(users, page_size=1, filter=marked(marker))
    rest = await page(users, page_size=10, filter=marked(marker), page_token=first.next_page_token)
    assert ids(list(first.users) + list(rest.users)) == ids(made)


async def test_rows_inserted_or_deleted_between_pages(users) -> None:
    """Keyset pages: changes before the cursor neither repeat nor skip a row."""
    marker, base = unique("m"), unique("k")
    made: list[User] = []
    for suffix in ("c1", "c2", "c3", "c4", "c5", "c6"):
        made.append(await create(users, username=f"{base}_{suffix}", display_name=marker))
    query = {"filter": marked(marker), "order_by": "username", "page_size": 3}
    first = await page(users, **query)
    assert ids(list(first.users)) == ids(made[:3])
    # Two rows before the cursor, one after it.
    for suffix in ("b0", "b1", "c35"):
        await create(users, username=f"{base}_{suffix}", display_name=marker)
    second = await page(users, page_token=first.next_page_token, **query)
    names = [u.username.rsplit("_", 1)[1] for u in second.users]
    assert names == ["c35", "c4", "c5"]
    # Rows already served disappear.
    for row in made[:3]:
        await users.DeleteUser(user_pb2.DeleteUserRequest(id=row.id))
    third = await page(users, page_token=second.next_page_token, **query)
    assert ids(list(third.users)) == [made[5].id]
    assert third.next_page_token == ""


async def test_show_deleted(users) -> None:
    marker = unique("m")
    made = await make(users, marker, 3)
    deleted = await users.DeleteUser(user_pb2.DeleteUserRequest(id=made[1].id))
    live = await page(users, filter=marked(marker))
    assert ids(list(live.users)) == [made[0].id, made[2].id]
    everything = await page(users, filter=marked(marker), show_deleted=True)
    assert list(everything.users) == [made[0], deleted, made[2]]
    pages = await walk(users, 1, filter=marked(marker), show_deleted=True)
    assert flat(pages) == list(everything.users)


# -- page tokens --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"filter": "other"},
        {"order_by": "id desc"},
        {"order_by": "username"},
        {"show_deleted": True},
    ],
)
async def test_token_bound_to_its_query(users, change) -> None:
    marker = unique("m")
    await make(users, marker, 3)
    query: dict[str, Any] = {"filter": marked(marker), "order_by": "", "show_deleted": False}
    first = await page(users, page_size=1, **query)
    if change.get("filter") == "other":
        change = {"filter": marked(unique("m"))}
    query.update(change)
    request = user_pb2.ListUsersRequest(page_size=1, page_token=first.next_page_token, **query)
    await expect_error(users.ListUsers(request), Code.INVALID_ARGUMENT, fields=["page_token"])


_B64 = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"


def flip(token: str, index: int) -> str:
    """The token with one character changed in a way that changes its decoded bits."""
    char = token[index]
    new = _B64[_B64.index(char) ^ 32] if char in _B64 else ("A" if char != "A" else "B")
    return token[:index] + new + token[index + 1 :]


async def test_forged_or_garbage_tokens_are_invalid(users) -> None:
    marker = unique("m")
    await make(users, marker, 3)
    first = await page(users, page_size=1, filter=marked(marker))
    token = first.next_page_token
    bad = [
        "garbage",
        "a.b.c",
        ".",
        "é",
        "\x00",
        token[:-1],
        token[: len(token) // 2],
        token + "A",
        token + "." + token,
        "x" * 5000,
        *(flip(token, i) for i in (0, 1, len(token) // 3, len(token) // 2, -2, -1)),
    ]
    for forged in set(bad) - {token}:
        request = user_pb2.ListUsersRequest(page_size=1, filter=marked(marker), page_token=forged)
        await expect_error(users.ListUsers(request), Code.INVALID_ARGUMENT, fields=["page_token"])
    second = await page(users, page_size=1, filter=marked(marker), page_token=token)
    assert len(second.users) == 1


async def test_tokens_work_across_servers_and_key_rotation(backend, users) -> None:
    marker = unique("m")
    made = await make(users, marker, 3)
    query = {"page_size": 1, "filter": marked(marker)}

    async def next_from(settings: Settings, token: str) -> user_pb2.ListUsersResponse:
        async with running_server(settings) as other:
            return await page(other.users, page_token=token, **query)

    # Another replica on the same database accepts the shared server's tokens.
    token = (await page(users, **query)).next_page_token
    replica = await next_from(settings_for(backend.url), token)
    assert ids(list(replica.users)) == [made[1].id]
    # PAGE_TOKEN_SECRET: a rotated-in key still accepts tokens of the old one.
    old_key, new_key = "old-key-" + "o" * 32, "new-key-" + "n" * 32
    async with running_server(settings_for(backend.url, page_token_secret=old_key)) as old:
        old_token = (await page(old.users, **query)).next_page_token
    rotated = await next_from(
        settings_for(backend.url, page_token_secret=f"{new_key},{old_key}"), old_token
    )
    assert ids(list(rotated.users)) == [made[1].id]
    # A token signed with a key the server does not hold is forged.
    request = user_pb2.ListUsersRequest(page_token=old_token, **query)
    await expect_error(users.ListUsers(request), Code.INVALID_ARGUMENT, fields=["page_token"])
    async with running_server(settings_for(backend.url, page_token_secret="x" * 32)) as strict:
        await expect_error(
            strict.users.ListUsers(request), Code.INVALID_ARGUMENT, fields=["page_token"]
        )


# -- order_by -----------------------------------------------------------------------------


def by_time(user: User) -> tuple[int, int]:
    return (user.create_time.seconds, user.create_time.nanos)


ORDERS = {
    "id": lambda rows: sorted(rows, key=lambda u: u.id),
    "id desc": lambda rows: sorted(rows, key=lambda u: -u.id),
    "username": lambda rows: sorted(rows, key=lambda u: u.username),
    "username desc": lambda rows: sorted(rows, key=lambda u: u.username, reverse=True),
    " username desc , id desc ": lambda rows: sorted(rows, key=lambda u: u.username)[::-1],
    "create_time": lambda rows: sorted(rows, key=lambda u: (by_time(u), u.id)),
    "create_time,id": lambda rows: sorted(rows, key=lambda u: (by_time(u), u.id)),
    "create_time desc, id desc": lambda rows: sorted(
        rows, key=lambda u: (by_time(u), u.id), reverse=True
    ),
    "create_time desc, id": lambda rows: sorted(
        sorted(rows, key=lambda u: u.id), key=by_time, reverse=True
    ),
    "create_time, username desc": lambda rows: sorted(
        sorted(rows, key=lambda u: u.username, reverse=True), key=by_time
    ),
}


@pytest.mark.parametrize("order_by", list(ORDERS))
async def test_order_by(users, order_by) -> None:
    marker = unique("m")
    made = await make(users, marker, 3)  # one create_time: ties broken by the next key
    made += [await create(users, display_name=marker) for _ in range(3)]
    expected = ORDERS[order_by](made)
    one = await page(users, filter=marked(marker), order_by=order_by)
    assert ids(list(one.users)) == ids(expected)
    pages = await walk(users, 2, filter=marked(marker), order_by=order_by)
    assert ids(flat(pages)) == ids(expected)


@pytest.mark.parametrize("order_by", ["create_time desc", "username"])
async def test_order_by_walk_matches_one_page(users, order_by) -> None:
    marker = unique("m")
    made = await make(users, marker, 4) + [await create(users, display_name=marker)]
    one = await page(users, filter=marked(marker), order_by=order_by)
    assert sorted(ids(list(one.users))) == sorted(ids(made))
    if order_by == "create_time desc":
        times = [by_time(u) for u in one.users]
        assert times == sorted(times, reverse=True)
    for size in (1, 2, 3):
        pages = await walk(users, size, filter=marked(marker), order_by=order_by)
        assert ids(flat(pages)) == ids(list(one.users))


@pytest.mark.parametrize(
    "order_by",
    [
        *("bio", "email", "display_name", "username asc", "id,id", "id desc desc"),
        *(",", "username,", "id desc,", "username id", "\x00"),
    ],
)
async def test_invalid_order_by(users, order_by) -> None:
    request = user_pb2.ListUsersRequest(order_by=order_by)
    await expect_error(users.ListUsers(request), Code.INVALID_ARGUMENT, fields=["order_by"])


# -- filter -------------------------------------------------------------------------------


async def filter_set(users: Any) -> tuple[str, str, dict[str, User]]:
    """Users a..e under one marker, created one by one (create_time ascending)."""
    marker, second, base = unique("m"), unique("n"), unique("f")
    names = {
        "a": f"{marker} alpha",
        "b": f"{marker} beta",
        "c": f"{marker} gamma {second}",
        "d": f"{marker} 100% delta",
        "e": f'{marker} say "hi" \\ there',
    }
    made = {}
    for key, display_name in names.items():
        made[key] = await create(users, username=f"{base}_{key}", display_name=display_name)
    return marker, second, made


async def test_filters(users) -> None:
    marker, second, made = await filter_set(users)
    a, b, c, d, e = (made[k] for k in "abcde")
    stamp = c.create_time.ToJsonString()
    offset = c.create_time.ToDatetime(tzinfo=UTC).astimezone(timezone(timedelta(hours=2)))
    cases = {
        f'username = "{b.username}"': [b],
        f'username != "{b.username}"': [a, c, d, e],
        f'username < "{b.username}"': [a],
        f'username >= "{c.username}"': [c, d, e],
        f'email = "{d.email}"': [d],
        f"id > {a.id} AND id <= {c.id}": [b, c],
        f"id = {e.id}": [e],
        f'NOT username = "{a.username}"': [b, c, d, e],
        f'-username = "{a.username}"': [b, c, d, e],
        # AIP-160: OR binds tighter than AND, so this is (a OR c) AND second.
        f'username = "{a.username}" OR username = "{c.username}" AND display_name:"{second}"': [c],
        f'(username = "{a.username}" OR username = "{b.username}") AND NOT display_name:"beta"': [
            a
        ],
        f'username = "{a.username}" OR username = "{e.username}"': [a, e],
        f'create_time >= "{stamp}"': [c, d, e],
        f'create_time < "{stamp}"': [a, b],
        f'create_time = "{stamp}"': [c],
        f'create_time >= "{offset.isoformat()}"': [c, d, e],
        f'update_time > "{e.update_time.ToJsonString()}"': [],
        'display_name:"100%"': [d],
        'display_name:"%"': [d],
        'display_name:"_"': [],
        'display_name:"say \\"hi\\" \\\\ there"': [e],
    }
    for text, expected in cases.items():
        response = await page(users, filter=marked(marker, text))
        assert ids(list(response.users)) == ids(expected), text


async def test_filter_on_deleted_users_needs_show_deleted(users) -> None:
    marker, _, made = await filter_set(users)
    await users.DeleteUser(user_pb2.DeleteUserRequest(id=made["a"].id))
    query = marked(marker, f'username = "{made["a"].username}"')
    assert not (await page(users, filter=query)).users
    shown = await page(users, filter=query, show_deleted=True)
    assert ids(list(shown.users)) == [made["a"].id]


@pytest.mark.parametrize(
    ("text", "position"),
    [
        ('bio = "x"', 0),
        ('display_name:"x" AND bio = "x"', 21),
        ("username = 'a'", 11),
        ('id > "abc"', 5),
        ('create_time > "yesterday"', 14),
        ('create_time > "2024-13-01T00:00:00Z"', 14),
        ("create_time > 5", 14),
        ('username = "a" AND', 18),
        ('username = "a" ) ', 15),
        ('email = "x" @', 12),
    ],
)
async def test_bad_filter_names_the_position(users, text, position) -> None:
    request = user_pb2.ListUsersRequest(filter=text)
    error = await expect_error(users.ListUsers(request), Code.INVALID_ARGUMENT, fields=["filter"])
    assert error.bad_request is not None
    description = error.bad_request.field_violations[0].description
    assert re.search(rf"\b{position}\b", description), description


@pytest.mark.parametrize(
    "text",
    [
        *("username =", '(username = "a"', "username ~ 'a'", "AND", 'username = "a" OR', "()"),
        *('username = "unterminated', 'username = "\\q"', "x" * 3000, 'username = "\x00"'),
    ],
)
async def test_bad_filter_syntax(users, text) -> None:
    request = user_pb2.ListUsersRequest(filter=text)
    await expect_error(users.ListUsers(request), Code.INVALID_ARGUMENT, fields=["filter"])


# -- views --------------------------------------------------------------------------------


async def add_posts(url: str, counts: dict[int, int]) -> None:
    """Posts straight into the database, so post counts do not depend on PostService."""
    engine = create_engine(Settings(database_url=url))
    now = utcnow()
    rows = [
        {
            "author_id": author,
            "title": f"t{i}",
            "body": "",
            "create_time": now,
            "update_time": now,
            "version": 1,
        }
        for author, count in counts.items()
        for i in range(count)
    ]
    try:
        async with engine.begin() as connection:
            await connection.execute(insert(Post), rows)
    finally:
        await engine.dispose()


async def test_full_view_fills_post_count(backend, users) -> None:
    marker = unique("m")
    made = await make(users, marker, 4)
    await add_posts(backend.url, {made[0].id: 2, made[2].id: 1, made[3].id: 3})
    full = await page(users, filter=marked(marker), view=user_pb2.USER_VIEW_FULL)
    assert [u.post_count for u in full.users] == [2, 0, 1, 3]
    pages = await walk(users, 3, filter=marked(marker), view=user_pb2.USER_VIEW_FULL)
    assert [u.post_count for u in flat(pages)] == [2, 0, 1, 3]
    for view in (user_pb2.USER_VIEW_BASIC, user_pb2.USER_VIEW_UNSPECIFIED):
        basic = await page(users, filter=marked(marker), view=view)
        assert [u.post_count for u in basic.users] == [0, 0, 0, 0]
        assert list(basic.users) == made
    get = user_pb2.GetUserRequest(id=made[3].id, view=user_pb2.USER_VIEW_FULL)
    assert (await users.GetUser(get)).post_count == 3
    get.view = user_pb2.USER_VIEW_BASIC
    assert (await users.GetUser(get)).post_count == 0


async def test_unknown_view_is_invalid(users) -> None:
    request = user_pb2.ListUsersRequest(view=3)  # type: ignore[arg-type]
    await expect_error(users.ListUsers(request), Code.INVALID_ARGUMENT, fields=["view"])
