"""PostService end to end: create with tags, read in both views, list, update, delete."""

from __future__ import annotations

import grpc
import pytest

from blog.v1 import post_pb2, user_pb2
from errors import rich
from factories import create_user_request, post


async def test_post_lifecycle(users, posts) -> None:
    author = await users.CreateUser(create_user_request())
    created = await posts.CreatePost(
        post_pb2.CreatePostRequest(post=post(author.id, tags=["Go", "db", "go"]))
    )
    assert list(created.tags) == ["db", "go"]
    assert not created.HasField("author")
    full = await posts.GetPost(post_pb2.GetPostRequest(id=created.id, view=post_pb2.POST_VIEW_FULL))
    assert full.author.id == author.id
    assert full.author.username == author.username
    page = await posts.ListPosts(
        post_pb2.ListPostsRequest(filter=f"author_id = {author.id}", view=post_pb2.POST_VIEW_FULL)
    )
    assert [p.id for p in page.posts] == [created.id]
    updated = await posts.UpdatePost(
        post_pb2.UpdatePostRequest(
            post=post_pb2.Post(id=created.id, tags=["x"], etag=created.etag),
        )
    )
    assert list(updated.tags) == ["x"]
    assert updated.etag != created.etag
    await posts.DeletePost(post_pb2.DeletePostRequest(id=created.id))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await posts.GetPost(post_pb2.GetPostRequest(id=created.id))
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND


async def test_deleted_author_cannot_post(users, posts) -> None:
    author = await users.CreateUser(create_user_request())
    await users.DeleteUser(user_pb2.DeleteUserRequest(id=author.id))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await posts.CreatePost(post_pb2.CreatePostRequest(post=post(author.id)))
    error = rich(caught.value)
    assert error.code is grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "AUTHOR_NOT_LIVE"
    assert error.precondition is not None


async def test_stream_posts_batches(users, posts) -> None:
    author = await users.CreateUser(create_user_request())
    ids = []
    for _ in range(5):
        created = await posts.CreatePost(
            post_pb2.CreatePostRequest(post=post(author.id, tags=["t"]))
        )
        ids.append(created.id)
    seen = []
    async for message in posts.StreamPosts(
        post_pb2.StreamPostsRequest(filter=f"author_id = {author.id}", view=post_pb2.POST_VIEW_FULL)
    ):
        assert message.posts
        assert message.resume_token
        seen.extend(p.id for p in message.posts)
        assert all(p.author.id == author.id for p in message.posts)
    assert seen == sorted(ids, reverse=True)
