"""PostService methods against API.md: create, get, list, update, delete, idempotent
create, the tag and length rules, and what happens to posts when their author goes."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from datetime import datetime
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2
from sqlalchemy import func, select

from blog.v1 import post_pb2, user_pb2
from errors import expect_error
from factories import create_user_request, post, unique
from service.db.models import PostTag
from support.postgres import raw_dsn
from support.posts import insert_posts

FULL = post_pb2.POST_VIEW_FULL
BASIC = post_pb2.POST_VIEW_BASIC
INVALID = grpc.StatusCode.INVALID_ARGUMENT
postgres_only = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)


# -- helpers ------------------------------------------------------------------------------


async def new_author(users) -> user_pb2.User:
    return await users.CreateUser(create_user_request())


async def create(posts, author_id: int, **overrides: Any) -> post_pb2.Post:
    return await posts.CreatePost(post_pb2.CreatePostRequest(post=post(author_id, **overrides)))


async def list_all(posts, page_size: int = 1000, **request: Any) -> list[post_pb2.Post]:
    found: list[post_pb2.Post] = []
    token = ""
    while True:
        page = await posts.ListPosts(
            post_pb2.ListPostsRequest(page_size=page_size, page_token=token, **request)
        )
        found.extend(page.posts)
        token = page.next_page_token
        if not token:
            return found


async def ids_of(posts, filter_text: str, order_by: str = "") -> list[int]:
    return [p.id for p in await list_all(posts, filter=filter_text, order_by=order_by)]


def update(post_message: post_pb2.Post, *paths: str) -> post_pb2.UpdatePostRequest:
    request = post_pb2.UpdatePostRequest(post=post_message)
    if paths:
        request.update_mask.CopyFrom(field_mask_pb2.FieldMask(paths=list(paths)))
    return request


def when(message_time: Any) -> datetime:
    return message_time.ToDatetime()


# -- CreatePost ---------------------------------------------------------------------------


async def test_create_post_returns_the_stored_post_and_ignores_output_only_fields(
    users, posts
) -> None:
    author = await new_author(users)
    sent = post(author.id, title="Hello", body="World", tags=["b", "a"])
    sent.id, sent.etag = 987654321, "v999"
    sent.create_time.FromJsonString("2001-01-01T00:00:00Z")
    sent.author.username = "someone_else"
    created = await posts.CreatePost(post_pb2.CreatePostRequest(post=sent))
    assert created.id > 0
    assert created.id != 987654321
    assert (created.author_id, created.title, created.body) == (author.id, "Hello", "World")
    assert list(created.tags) == ["a", "b"]
    assert created.etag
    assert created.etag != "v999"
    assert when(created.create_time).year > 2001
    assert created.create_time == created.update_time
    assert not created.HasField("author")
    assert await posts.GetPost(post_pb2.GetPostRequest(id=created.id)) == created


async def test_create_post_for_a_missing_author_is_failed_precondition(posts) -> None:
    error = await expect_error(
        posts.CreatePost(post_pb2.CreatePostRequest(post=post(2**62 + 12345))),
        grpc.StatusCode.FAILED_PRECONDITION,
        "AUTHOR_NOT_LIVE",
    )
    assert error.precondition is not None
    assert len(error.precondition.violations) == 1


async def test_create_post_for_a_soft_deleted_author_is_failed_precondition(users, posts) -> None:
    author = await new_author(users)
    await users.DeleteUser(user_pb2.DeleteUserRequest(id=author.id))
    error = await expect_error(
        posts.CreatePost(post_pb2.CreatePostRequest(post=post(author.id))),
        grpc.StatusCode.FAILED_PRECONDITION,
        "AUTHOR_NOT_LIVE",
    )
    assert error.precondition is not None
    assert error.precondition.violations
    assert await ids_of(posts, f"author_id = {author.id}") == []


@pytest.mark.parametrize("author_id", [0, -5])
async def test_create_post_with_a_bad_author_id_is_invalid(posts, author_id: int) -> None:
    await expect_error(
        posts.CreatePost(post_pb2.CreatePostRequest(post=post(author_id))),
        INVALID,
        fields=["post.author_id"],
    )


# -- GetPost ------------------------------------------------------------------------------


async def test_get_post_views(users, posts) -> None:
    author = await new_author(users)
    created = await create(posts, author.id, tags=["x"])
    for view in (post_pb2.POST_VIEW_UNSPECIFIED, BASIC):
        got = await posts.GetPost(post_pb2.GetPostRequest(id=created.id, view=view))
        assert got == created
        assert not got.HasField("author")
    full = await posts.GetPost(post_pb2.GetPostRequest(id=created.id, view=FULL))
    user = await users.GetUser(user_pb2.GetUserRequest(id=author.id))
    assert full.author.id == author.id
    for name in ("username", "email", "display_name", "etag", "create_time", "update_time"):
        assert getattr(full.author, name) == getattr(user, name), name
    assert not full.author.HasField("delete_time")
    full.ClearField("author")
    assert full == created


async def test_get_post_full_of_a_soft_deleted_author_sets_delete_time(users, posts) -> None:
    author = await new_author(users)
    created = await create(posts, author.id)
    deleted = await users.DeleteUser(user_pb2.DeleteUserRequest(id=author.id))
    full = await posts.GetPost(post_pb2.GetPostRequest(id=created.id, view=FULL))
    assert full.author.id == author.id
    assert full.author.HasField("delete_time")
    assert full.author.delete_time == deleted.delete_time


async def test_get_post_missing_and_bad_ids(posts) -> None:
    error = await expect_error(
        posts.GetPost(post_pb2.GetPostRequest(id=2**62 + 7)), grpc.StatusCode.NOT_FOUND
    )
    assert error.resource_info is not None
    await expect_error(posts.GetPost(post_pb2.GetPostRequest(id=0)), INVALID, fields=["id"])
    await expect_error(
        posts.GetPost(post_pb2.GetPostRequest(id=1, view=7)), INVALID, fields=["view"]
    )


# -- ListPosts: order, filters, pages, tokens ---------------------------------------------


async def test_list_posts_default_order_is_create_time_desc_then_id_desc(users, posts) -> None:
    author = await new_author(users)
    made = [await create(posts, author.id) for _ in range(6)]
    listed = await list_all(posts, filter=f"author_id = {author.id}")
    assert [p.id for p in listed] == [p.id for p in reversed(made)]
    keys = [(when(p.create_time), p.id) for p in listed]
    assert keys == sorted(keys, reverse=True)


async def test_list_posts_order_by(users, posts) -> None:
    author = await new_author(users)
    for title in ("b", "a", "c", "a", "b"):
        await create(posts, author.id, title=title)
    listed = await list_all(posts, filter=f"author_id = {author.id}")
    by_id = sorted(listed, key=lambda p: p.id)
    cases = {
        "id": [p.id for p in by_id],
        "id desc": [p.id for p in reversed(by_id)],
        "title": [p.id for p in sorted(by_id, key=lambda p: (p.title, p.id))],
        "title desc": [p.id for p in sorted(by_id, key=lambda p: (p.title, p.id), reverse=True)],
        "create_time": [p.id for p in sorted(by_id, key=lambda p: (when(p.create_time), p.id))],
        "title, id desc": [p.id for p in sorted(by_id, key=lambda p: (p.title, -p.id))],
    }
    for order_by, expected in cases.items():
        for page_size in (1000, 2):  # one page, and keyset pages across ties
            got = [
                p.id
                for p in await list_all(
                    posts, page_size, filter=f"author_id = {author.id}", order_by=order_by
                )
            ]
            assert got == expected, (order_by, page_size)


@pytest.mark.parametrize("order_by", ["body", "author_id", "title asc", "id, title", "id,id"])
async def test_list_posts_bad_order_by_is_invalid(posts, order_by: str) -> None:
    await expect_error(
        posts.ListPosts(post_pb2.ListPostsRequest(order_by=order_by)), INVALID, fields=["order_by"]
    )


async def test_list_posts_filters(users, posts) -> None:
    author, other = await new_author(users), await new_author(users)
    tag = unique("tag-")
    one = await create(posts, author.id, title="alpha needle one", tags=[tag, "go"])
    two = await create(posts, author.id, title="beta", tags=["go"])
    three = await create(posts, author.id, title="gamma NEEDLE needle", tags=[tag])
    foreign = await create(posts, other.id, title="alpha needle", tags=[tag])
    await posts.UpdatePost(update(post_pb2.Post(id=two.id, body="changed"), "body"))
    mine = f"author_id = {author.id}"
    everyone = {p.id: p for p in await list_all(posts, filter=f"{mine} OR author_id = {other.id}")}
    ts = two.create_time.ToJsonString()
    cases = {
        mine: {one.id, two.id, three.id},
        f"id = {two.id}": {two.id},
        f"id != {two.id} AND {mine}": {one.id, three.id},
        f"id > {one.id} AND id <= {three.id} AND {mine}": {two.id, three.id},
        f'{mine} AND title:"needle"': {one.id, three.id},
        f'{mine} AND title = "beta"': {two.id},
        f'tags:"{tag}"': {one.id, three.id, foreign.id},
        f'tags:"{tag.upper()}"': {one.id, three.id, foreign.id},
        f'{mine} AND tags:"go"': {one.id, two.id},
        f'{mine} AND NOT tags:"go"': {three.id},
        f'tags:"{tag}" AND (author_id = {other.id} OR title:"gamma")': {three.id, foreign.id},
        f'{mine} AND create_time >= "{ts}"': {
            p.id
            for p in everyone.values()
            if p.author_id == author.id and when(p.create_time) >= when(two.create_time)
        },
        f'{mine} AND update_time > "{three.create_time.ToJsonString()}"': {
            p.id
            for p in everyone.values()
            if p.author_id == author.id and when(p.update_time) > when(three.create_time)
        },
    }
    assert two.id in cases[f'{mine} AND update_time > "{three.create_time.ToJsonString()}"']
    for filter_text, expected in cases.items():
        assert set(await ids_of(posts, filter_text)) == expected, filter_text


@pytest.mark.parametrize(
    "filter_text", ['body = "x"', "tags = 3", "author_id = ", 'title:"open', "nope > 1"]
)
async def test_list_posts_bad_filter_is_invalid(posts, filter_text: str) -> None:
    await expect_error(
        posts.ListPosts(post_pb2.ListPostsRequest(filter=filter_text)), INVALID, fields=["filter"]
    )


async def test_list_posts_page_size_rules(running, users, posts) -> None:
    author = await new_author(users)
    await insert_posts(running.server.db.engine, author.id, 1003)
    mine = f"author_id = {author.id}"
    default = await posts.ListPosts(post_pb2.ListPostsRequest(filter=mine))
    assert len(default.posts) == 50
    assert default.next_page_token
    capped = await posts.ListPosts(post_pb2.ListPostsRequest(filter=mine, page_size=5000))
    assert len(capped.posts) == 1000
    assert capped.next_page_token
    rest = await posts.ListPosts(
        post_pb2.ListPostsRequest(filter=mine, page_size=5000, page_token=capped.next_page_token)
    )
    assert len(rest.posts) == 3
    assert not rest.next_page_token
    await expect_error(
        posts.ListPosts(post_pb2.ListPostsRequest(filter=mine, page_size=-1)),
        INVALID,
        fields=["page_size"],
    )


async def test_list_posts_pages_are_full_until_the_last(users, posts) -> None:
    author = await new_author(users)
    for _ in range(6):
        await create(posts, author.id)
    mine = f"author_id = {author.id}"
    first = await posts.ListPosts(post_pb2.ListPostsRequest(filter=mine, page_size=3))
    assert len(first.posts) == 3
    assert first.next_page_token
    second = await posts.ListPosts(
        post_pb2.ListPostsRequest(filter=mine, page_size=3, page_token=first.next_page_token)
    )
    assert len(second.posts) == 3
    assert second.next_page_token == ""


def forged(token: str) -> str:
    """The same token (`<key id>.<body>.<mac>`) with its position changed and its
    key id and signature kept."""
    key_id, body, mac = token.split(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload["p"][-1] = payload["p"][-1] + 1
    raw = json.dumps(payload, separators=(",", ":")).encode()
    return f"{key_id}.{base64.urlsafe_b64encode(raw).rstrip(b'=').decode()}.{mac}"


async def test_list_posts_page_tokens_are_bound_and_signed(users, posts) -> None:
    author = await new_author(users)
    for _ in range(3):
        await create(posts, author.id, title="same")
    mine = f"author_id = {author.id}"
    first = await posts.ListPosts(post_pb2.ListPostsRequest(filter=mine, page_size=1))
    token = first.next_page_token
    assert token
    bad_requests = [
        post_pb2.ListPostsRequest(filter=f"{mine} ", page_size=1, page_token=token),
        post_pb2.ListPostsRequest(filter=f"author_id = {author.id + 1}", page_token=token),
        post_pb2.ListPostsRequest(filter=mine, order_by="id desc", page_token=token),
        post_pb2.ListPostsRequest(filter=mine, order_by="title", page_token=token),
        post_pb2.ListPostsRequest(filter=mine, page_token=forged(token)),
        post_pb2.ListPostsRequest(filter=mine, page_token=token[:-2]),
        post_pb2.ListPostsRequest(filter=mine, page_token="garbage"),
    ]
    for request in bad_requests:
        await expect_error(posts.ListPosts(request), INVALID, fields=["page_token"])
    # The same token still works with the parameters it was issued for (any page size).
    second = await posts.ListPosts(
        post_pb2.ListPostsRequest(filter=mine, page_size=5, page_token=token)
    )
    assert [p.id for p in second.posts] == [p.id for p in (await list_all(posts, filter=mine))[1:]]


@pytest.mark.parametrize("order_by", ["", "id"])
async def test_list_posts_writes_between_pages_never_repeat_or_skip(
    users, posts, order_by: str
) -> None:
    author = await new_author(users)
    originals = [(await create(posts, author.id)).id for _ in range(10)]
    mine = f"author_id = {author.id}"
    seen: list[int] = []
    inserted: list[int] = []
    deleted: set[int] = set()
    token = ""
    while True:
        page = await posts.ListPosts(
            post_pb2.ListPostsRequest(filter=mine, order_by=order_by, page_size=3, page_token=token)
        )
        seen.extend(p.id for p in page.posts)
        token = page.next_page_token
        if not token:
            break
        inserted.append((await create(posts, author.id)).id)
        if not deleted:  # delete the row the token points after: keyset pages still continue
            await posts.DeletePost(post_pb2.DeletePostRequest(id=page.posts[-1].id))
            deleted.add(page.posts[-1].id)
    assert len(seen) == len(set(seen))
    if order_by == "id":
        # New rows land after the cursor and are all seen, in order.
        assert seen == originals + inserted[:-1] or seen == originals + inserted
    else:
        # New rows are newer than the cursor: never seen; nothing skipped.
        assert seen == list(reversed(originals))


# -- UpdatePost ---------------------------------------------------------------------------


async def test_update_post_mask_changes_only_named_fields(users, posts) -> None:
    author = await new_author(users)
    created = await create(posts, author.id, title="t0", body="b0", tags=["k0"])
    titled = await posts.UpdatePost(
        update(post_pb2.Post(id=created.id, title="t1", body="ignored", tags=["z"]), "title")
    )
    assert (titled.title, titled.body, list(titled.tags)) == ("t1", "b0", ["k0"])
    assert titled.etag != created.etag
    assert titled.create_time == created.create_time
    assert when(titled.update_time) >= when(created.update_time)
    bodied = await posts.UpdatePost(update(post_pb2.Post(id=created.id, body="b2"), "body"))
    assert (bodied.title, bodied.body, list(bodied.tags)) == ("t1", "b2", ["k0"])
    tagged = await posts.UpdatePost(
        update(post_pb2.Post(id=created.id, tags=["New", "k1", "new"]), "tags")
    )
    assert (tagged.title, tagged.body, list(tagged.tags)) == ("t1", "b2", ["k1", "new"])
    unmasked = await posts.UpdatePost(update(post_pb2.Post(id=created.id, title="t3")))
    assert (unmasked.title, unmasked.body, list(unmasked.tags)) == ("t3", "b2", ["k1", "new"])
    cleared = await posts.UpdatePost(update(post_pb2.Post(id=created.id, tags=[]), "tags"))
    assert list(cleared.tags) == []
    assert cleared.body == "b2"
    star = await posts.UpdatePost(update(post_pb2.Post(id=created.id, title="t4"), "*"))
    assert (star.title, star.body, list(star.tags)) == ("t4", "", [])
    assert star.author_id == author.id
    assert not star.HasField("author")
    assert await posts.GetPost(post_pb2.GetPostRequest(id=created.id)) == star
    assert len({created.etag, titled.etag, bodied.etag, tagged.etag, star.etag}) == 5


async def test_update_post_author_id_in_mask_is_invalid_and_changes_nothing(users, posts) -> None:
    author, other = await new_author(users), await new_author(users)
    created = await create(posts, author.id, title="keep", tags=["keep"])
    for paths in (["author_id"], ["title", "author_id"], ["author_id", "tags"]):
        await expect_error(
            posts.UpdatePost(
                update(post_pb2.Post(id=created.id, author_id=other.id, title="x"), *paths)
            ),
            INVALID,
            fields=["update_mask"],
        )
    assert await posts.GetPost(post_pb2.GetPostRequest(id=created.id)) == created


@pytest.mark.parametrize(
    "path", ["id", "create_time", "update_time", "etag", "author", "nope", "author.username"]
)
async def test_update_post_output_only_or_unknown_path_is_invalid(users, posts, path) -> None:
    author = await new_author(users)
    created = await create(posts, author.id)
    await expect_error(
        posts.UpdatePost(update(post_pb2.Post(id=created.id, title="x"), path)),
        INVALID,
        fields=["update_mask"],
    )
    assert await posts.GetPost(post_pb2.GetPostRequest(id=created.id)) == created


async def test_update_post_failing_update_keeps_old_tags(users, posts) -> None:
    author = await new_author(users)
    created = await create(posts, author.id, tags=["old-a", "old-b"])
    await expect_error(
        posts.UpdatePost(update(post_pb2.Post(id=created.id, tags=["fine", "bad_tag"]), "tags")),
        INVALID,
        fields=["post.tags[1]"],
    )
    await expect_error(
        posts.UpdatePost(
            update(post_pb2.Post(id=created.id, title="", tags=["fine"]), "title", "tags")
        ),
        INVALID,
        fields=["post.title"],
    )
    await expect_error(
        posts.UpdatePost(update(post_pb2.Post(id=created.id, tags=["fine"], etag="v999"), "tags")),
        grpc.StatusCode.ABORTED,
        "ETAG_MISMATCH",
    )
    assert await posts.GetPost(post_pb2.GetPostRequest(id=created.id)) == created
    assert await ids_of(posts, f'author_id = {author.id} AND tags:"fine"') == []


async def test_update_post_etag_and_not_found(users, posts) -> None:
    author = await new_author(users)
    created = await create(posts, author.id)
    first = await posts.UpdatePost(
        update(post_pb2.Post(id=created.id, title="one", etag=created.etag), "title")
    )
    assert first.title == "one"
    await expect_error(
        posts.UpdatePost(update(post_pb2.Post(id=created.id, title="two", etag=created.etag))),
        grpc.StatusCode.ABORTED,
        "ETAG_MISMATCH",
    )
    assert (await posts.GetPost(post_pb2.GetPostRequest(id=created.id))).title == "one"
    error = await expect_error(
        posts.UpdatePost(update(post_pb2.Post(id=2**62 + 3, title="x"), "title")),
        grpc.StatusCode.NOT_FOUND,
    )
    assert error.resource_info is not None
    await expect_error(
        posts.UpdatePost(update(post_pb2.Post(id=0, title="x"), "title")),
        INVALID,
        fields=["post.id"],
    )


# -- DeletePost ---------------------------------------------------------------------------


async def tag_links(running, post_id: int) -> int:
    async with running.server.db.engine.connect() as connection:
        count = await connection.scalar(
            select(func.count()).select_from(PostTag).where(PostTag.post_id == post_id)
        )
    return int(count or 0)


async def test_delete_post_is_hard_and_removes_tag_links(running, users, posts) -> None:
    author = await new_author(users)
    tag = unique("gone-")
    created = await create(posts, author.id, tags=[tag, "common"])
    kept = await create(posts, author.id, tags=["common"])
    assert await tag_links(running, created.id) == 2
    await expect_error(
        posts.DeletePost(post_pb2.DeletePostRequest(id=created.id, etag="v999")),
        grpc.StatusCode.ABORTED,
        "ETAG_MISMATCH",
    )
    assert await ids_of(posts, f'tags:"{tag}"') == [created.id]
    await posts.DeletePost(post_pb2.DeletePostRequest(id=created.id, etag=created.etag))
    assert await ids_of(posts, f'tags:"{tag}"') == []
    assert await tag_links(running, created.id) == 0
    assert await ids_of(posts, f'author_id = {author.id} AND tags:"common"') == [kept.id]
    await expect_error(
        posts.GetPost(post_pb2.GetPostRequest(id=created.id)), grpc.StatusCode.NOT_FOUND
    )
    await expect_error(
        posts.DeletePost(post_pb2.DeletePostRequest(id=created.id)), grpc.StatusCode.NOT_FOUND
    )
    await expect_error(posts.DeletePost(post_pb2.DeletePostRequest(id=0)), INVALID, fields=["id"])


# -- idempotent CreatePost ----------------------------------------------------------------


async def test_create_post_request_id_is_idempotent(users, posts) -> None:
    author = await new_author(users)
    request_id = str(uuid.uuid4())
    request = post_pb2.CreatePostRequest(
        post=post(author.id, tags=["b", "A"]), request_id=request_id
    )
    first = await posts.CreatePost(request)
    again = await posts.CreatePost(request)
    assert again == first
    assert await ids_of(posts, f"author_id = {author.id}") == [first.id]
    changed = post_pb2.CreatePostRequest(post=post(author.id, title="other"), request_id=request_id)
    await expect_error(
        posts.CreatePost(changed), INVALID, "REQUEST_ID_REUSED", fields=["request_id"]
    )
    await expect_error(
        posts.CreatePost(post_pb2.CreatePostRequest(post=post(author.id), request_id="nope")),
        INVALID,
        fields=["request_id"],
    )
    assert await ids_of(posts, f"author_id = {author.id}") == [first.id]


async def test_concurrent_create_post_with_one_request_id_creates_one(users, posts) -> None:
    author = await new_author(users)
    request = post_pb2.CreatePostRequest(post=post(author.id), request_id=str(uuid.uuid4()))
    results = await asyncio.gather(*(posts.CreatePost(request) for _ in range(4)))
    assert len({r.id for r in results}) == 1
    assert await ids_of(posts, f"author_id = {author.id}") == [results[0].id]


# -- tags and lengths ---------------------------------------------------------------------


async def test_tags_are_folded_deduplicated_and_sorted(users, posts) -> None:
    author = await new_author(users)
    created = await create(posts, author.id, tags=["Zeta", "alpha", "ZETA", "b-2", "alpha", "9"])
    assert list(created.tags) == ["9", "alpha", "b-2", "zeta"]
    got = await posts.GetPost(post_pb2.GetPostRequest(id=created.id))
    assert list(got.tags) == ["9", "alpha", "b-2", "zeta"]


async def test_tag_count_limit_counts_distinct_tags(users, posts) -> None:
    author = await new_author(users)
    twenty = [f"t{i:02d}" for i in range(20)]
    await expect_error(
        posts.CreatePost(post_pb2.CreatePostRequest(post=post(author.id, tags=[*twenty, "t20"]))),
        INVALID,
        fields=["post.tags"],
    )
    dupes = [*twenty, *(t.upper() for t in twenty[:5]), twenty[0]]
    created = await create(posts, author.id, tags=dupes)
    assert list(created.tags) == twenty


@pytest.mark.parametrize(
    ("tags", "bad_index"),
    [
        (["ok", "fine", "x" * 33], 2),
        (["ok", ""], 1),
        (["a_b"], 0),
        (["ok", "é"], 1),
        (["ok", "with space"], 1),
        (["ok", "É"], 1),
        (["ok", "dot.ted", "fine"], 1),
        (["nul\x00"], 0),
    ],
)
async def test_bad_tag_names_its_index(users, posts, tags: list[str], bad_index: int) -> None:
    author = await new_author(users)
    await expect_error(
        posts.CreatePost(post_pb2.CreatePostRequest(post=post(author.id, tags=tags))),
        INVALID,
        fields=[f"post.tags[{bad_index}]"],
    )
    await expect_error(
        posts.UpdatePost(update(post_pb2.Post(id=1, tags=tags), "tags")),
        INVALID,
        fields=[f"post.tags[{bad_index}]"],
    )
    assert await ids_of(posts, f"author_id = {author.id}") == []


async def test_longest_tag_is_accepted(users, posts) -> None:
    author = await new_author(users)
    created = await create(posts, author.id, tags=["A" * 32, "0-9"])
    assert list(created.tags) == ["0-9", "a" * 32]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"title": ""}, "post.title"),
        ({"title": "x" * 201}, "post.title"),
        ({"title": "é" * 201}, "post.title"),
        ({"title": "nul\x00title"}, "post.title"),
        ({"body": "b" * 100_001}, "post.body"),
        ({"body": "nul\x00"}, "post.body"),
    ],
)
async def test_bad_title_or_body_is_invalid(users, posts, overrides, field: str) -> None:
    author = await new_author(users)
    await expect_error(
        posts.CreatePost(post_pb2.CreatePostRequest(post=post(author.id, **overrides))),
        INVALID,
        fields=[field],
    )
    assert await ids_of(posts, f"author_id = {author.id}") == []


async def test_longest_title_and_body_are_accepted(users, posts) -> None:
    author = await new_author(users)
    created = await create(posts, author.id, title="é" * 200, body="ü" * 100_000)
    got = await posts.GetPost(post_pb2.GetPostRequest(id=created.id))
    assert got.title == "é" * 200
    assert got.body == "ü" * 100_000
    plain = await create(posts, author.id, title="x" * 200, body="b" * 100_000)
    assert len(plain.body) == 100_000


# -- concurrency and authors --------------------------------------------------------------


async def test_concurrent_creates_with_one_new_tag_both_succeed(users, posts) -> None:
    author = await new_author(users)
    for _ in range(5):
        tag = unique("fresh-")
        made = await asyncio.gather(
            *(create(posts, author.id, tags=[tag, unique("own-")]) for _ in range(3))
        )
        assert all(tag in p.tags for p in made)
        assert set(await ids_of(posts, f'tags:"{tag}"')) == {p.id for p in made}


async def test_posts_of_a_deleted_author_stay_readable(users, posts) -> None:
    author = await new_author(users)
    created = await create(posts, author.id, tags=["stays"])
    await users.DeleteUser(user_pb2.DeleteUserRequest(id=author.id))
    assert await posts.GetPost(post_pb2.GetPostRequest(id=created.id)) == created
    mine = f"author_id = {author.id}"
    listed = await list_all(posts, filter=mine, view=FULL)
    assert [p.id for p in listed] == [created.id]
    assert listed[0].author.HasField("delete_time")
    await expect_error(
        posts.CreatePost(post_pb2.CreatePostRequest(post=post(author.id))),
        grpc.StatusCode.FAILED_PRECONDITION,
        "AUTHOR_NOT_LIVE",
    )
    assert await ids_of(posts, mine) == [created.id]


@postgres_only
async def test_create_post_waits_for_an_uncommitted_author_delete(backend, users, posts) -> None:
    """The exact interleaving a missing share lock lets through: the author's delete is
    in flight when CreatePost checks; once it commits, the create must be refused, with
    or without tags (one statement inserts the post and links its tags), and a tag the
    refused create would have made is not left behind."""
    for tags in ([], [unique("never-")]):
        author = await new_author(users)
        connection = await asyncpg.connect(raw_dsn(backend.direct_url))
        try:
            transaction = connection.transaction()
            await transaction.start()
            await connection.execute(
                "UPDATE users SET delete_time = now(), version = version + 1 WHERE id = $1",
                author.id,
            )
            creating = asyncio.ensure_future(create(posts, author.id, tags=tags))
            await asyncio.sleep(0.5)
            assert not creating.done()  # waiting on the author's row
            await transaction.commit()
            await expect_error(creating, grpc.StatusCode.FAILED_PRECONDITION, "AUTHOR_NOT_LIVE")
            made = await connection.fetchval(
                "SELECT count(*) FROM tags WHERE name = any($1::text[])", tags
            )
        finally:
            await connection.close()
        assert made == 0, tags
        assert await ids_of(posts, f"author_id = {author.id}") == []


@postgres_only
async def test_create_post_links_a_tag_committed_while_it_waited(backend, users, posts) -> None:
    """CreatePost links its tags in one statement whose snapshot predates a tag another
    transaction commits while the statement waits on it (ON CONFLICT skips the tag, the
    snapshot cannot see it): the post must still get the tag."""
    author = await new_author(users)
    tag = unique("racing-")
    connection = await asyncpg.connect(raw_dsn(backend.direct_url))
    try:
        transaction = connection.transaction()
        await transaction.start()
        await connection.execute("INSERT INTO tags (name) VALUES ($1)", tag)
        creating = asyncio.ensure_future(create(posts, author.id, tags=[tag, unique("own-")]))
        await asyncio.sleep(0.5)
        assert not creating.done()  # waiting on the uncommitted tag
        await transaction.commit()
    finally:
        await connection.close()
    made = await creating
    assert tag in made.tags
    got = await posts.GetPost(post_pb2.GetPostRequest(id=made.id))
    assert sorted(got.tags) == sorted(made.tags)
    assert await ids_of(posts, f'tags:"{tag}"') == [made.id]


async def test_delete_user_racing_create_post_never_orphans_a_post(backend, users, posts) -> None:
    """Many rounds of CreatePost and DeleteUser at once (the delete staggered by 0-4 ms to
    vary the interleaving, every other round with a tag): a post that exists was created
    before its author was deleted."""
    rounds = 60
    outcomes = {"created": 0, "refused": 0}

    async def delete_after(user_id: int, delay: float) -> user_pb2.User:
        await asyncio.sleep(delay)
        return await users.DeleteUser(user_pb2.DeleteUserRequest(id=user_id))

    for round_number in range(rounds):
        author = await new_author(users)
        tags = [unique("raced-")] if round_number % 2 else []
        created, deleted = await asyncio.gather(
            create(posts, author.id, tags=tags),
            delete_after(author.id, (round_number % 5) / 1000),
            return_exceptions=True,
        )
        assert isinstance(deleted, user_pb2.User), deleted
        if isinstance(created, post_pb2.Post):
            outcomes["created"] += 1
            assert when(created.create_time) <= when(deleted.delete_time), (
                "a post was created after its author's deletion",
                outcomes,
            )
        else:
            assert isinstance(created, grpc.aio.AioRpcError), created
            assert created.code() is grpc.StatusCode.FAILED_PRECONDITION
            outcomes["refused"] += 1
            assert await ids_of(posts, f"author_id = {author.id}") == []
    print(f"CreatePost/DeleteUser race outcomes: {outcomes}")
    assert outcomes["created"] > 0, outcomes  # the invariant above was really checked
