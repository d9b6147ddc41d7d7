"""Issue 8, items 1 and 3: forged tokens of every shape are INVALID_ARGUMENT on their
field (never INTERNAL), and huge violation lists reach the client as INVALID_ARGUMENT
with at most 20 violations and `violation_count` (never RESOURCE_EXHAUSTED: the 16 KiB
trailer limit)."""

from __future__ import annotations

import base64

import grpc
import pytest
from google.protobuf import field_mask_pb2

from blog.v1 import post_pb2, user_pb2
from errors import check_error, expect_error
from factories import create_user_request, post, unique

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


FORGED = [
    b64(b"[" * 1000) + ".AA",
    "db1." + b64(b"[" * 1000) + "." + "A" * 22,
    b64(b'{"k":"db1","t":"users.page_token","b":"0","p":[1]}') + ".AA",
    "unknown-key." + b64(b"{}") + "." + "A" * 22,
    "x.y",
    "\u00e9" * 10,
]


async def stream_error(call: object) -> grpc.aio.AioRpcError:
    try:
        async for _ in call:  # type: ignore[attr-defined]
            pass
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError("the stream ended without an error")


@pytest.mark.parametrize("token", FORGED, ids=range(len(FORGED)))
async def test_forged_tokens_are_invalid_argument_on_every_method(users, posts, token) -> None:
    await expect_error(
        users.ListUsers(user_pb2.ListUsersRequest(page_token=token)), INVALID, fields=["page_token"]
    )
    await expect_error(
        posts.ListPosts(post_pb2.ListPostsRequest(page_token=token)), INVALID, fields=["page_token"]
    )
    check_error(
        await stream_error(users.StreamUsers(user_pb2.StreamUsersRequest(resume_token=token))),
        INVALID,
        fields=["resume_token"],
    )
    check_error(
        await stream_error(posts.StreamPosts(post_pb2.StreamPostsRequest(resume_token=token))),
        INVALID,
        fields=["resume_token"],
    )


def capped(error, total: int, first: list[str]) -> None:
    assert len(error.fields) == 20, error.fields
    assert error.fields[: len(first)] == first
    assert error.info.metadata["violation_count"] == str(total)
    assert all(len(v.description) <= 256 for v in error.bad_request.field_violations)


async def test_batch_of_100_invalid_entries_lists_the_first_20(users) -> None:
    request = user_pb2.BatchCreateUsersRequest(
        requests=[create_user_request(email="not-an-email") for _ in range(100)]
    )
    error = await expect_error(users.BatchCreateUsers(request), INVALID)
    capped(error, 100, [f"requests[{i}].user.email" for i in range(20)])


async def test_create_post_with_3000_bad_tags(users, posts) -> None:
    author = await users.CreateUser(create_user_request())
    bad = [f"BAD TAG {i}!" for i in range(3000)]
    request = post_pb2.CreatePostRequest(post=post(author.id, tags=bad))
    error = await expect_error(posts.CreatePost(request), INVALID)
    capped(error, 3000, [f"post.tags[{i}]" for i in range(20)])


@pytest.mark.parametrize("paths", [10_000, 100_000])
async def test_update_user_with_many_bad_mask_paths(users, paths: int) -> None:
    created = await users.CreateUser(create_user_request())
    mask = field_mask_pb2.FieldMask(paths=[f"nope_{i}" for i in range(paths)])
    request = user_pb2.UpdateUserRequest(
        user=user_pb2.User(id=created.id, display_name="x"), update_mask=mask
    )
    error = await expect_error(users.UpdateUser(request), INVALID)
    capped(error, paths, ["update_mask"])


async def test_a_huge_echoed_value_is_clipped(users) -> None:
    """Descriptions that quote a client's value stay short, and so does the message."""
    mask = field_mask_pb2.FieldMask(paths=["x" * 100_000])
    request = user_pb2.UpdateUserRequest(user=user_pb2.User(id=1), update_mask=mask)
    error = await expect_error(users.UpdateUser(request), INVALID, fields=["update_mask"])
    assert len(error.bad_request.field_violations[0].description) <= 256
    assert len(error.message) <= 512
    long_filter = 'username = "' + "a" * 2000 + '" AND ' + "(" * 10
    error = await expect_error(
        users.ListUsers(user_pb2.ListUsersRequest(filter=long_filter)), INVALID, fields=["filter"]
    )
    assert len(error.bad_request.field_violations[0].description) <= 256


async def test_twenty_violations_or_fewer_carry_no_count(users) -> None:
    request = user_pb2.BatchCreateUsersRequest(
        requests=[create_user_request(email="bad") for _ in range(20)]
        + [create_user_request(username=unique())]
    )
    error = await expect_error(users.BatchCreateUsers(request), INVALID)
    assert len(error.fields) == 20
    assert "violation_count" not in error.info.metadata
