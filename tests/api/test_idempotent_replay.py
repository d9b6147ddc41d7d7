"""An idempotent replay is the first response byte for byte (API.md, "Idempotent create"):
stored with the record, never read again from the resource, whatever happened to the
resource since. BatchCreateUsers is idempotent by its top-level request_id the same way."""

from __future__ import annotations

import uuid
from typing import Any

import grpc
from google.protobuf.field_mask_pb2 import FieldMask
from sqlalchemy import insert

from blog.v1 import post_pb2, user_pb2
from conftest import settings_for
from errors import expect_error
from factories import create_user_request, post
from service.db.engine import Database
from service.db.models import IdempotencyRecord
from service.db.types import utcnow
from service.repositories.idempotency import request_digest

Code = grpc.StatusCode


def _with_id(request: user_pb2.CreateUserRequest) -> user_pb2.CreateUserRequest:
    request.request_id = str(uuid.uuid4())
    return request


async def test_create_user_replay_returns_the_first_response_after_an_update(users) -> None:
    request = _with_id(create_user_request())
    first = await users.CreateUser(request)
    updated = await users.UpdateUser(
        user_pb2.UpdateUserRequest(
            user=user_pb2.User(id=first.id, bio="changed since"),
            update_mask=FieldMask(paths=["bio"]),
        )
    )
    assert updated.etag != first.etag
    replay = await users.CreateUser(request)
    assert replay.SerializeToString() == first.SerializeToString()
    assert replay.etag == first.etag


async def test_create_user_replay_survives_the_user_being_deleted(users) -> None:
    request = _with_id(create_user_request())
    first = await users.CreateUser(request)
    await users.DeleteUser(user_pb2.DeleteUserRequest(id=first.id))
    replay = await users.CreateUser(request)
    assert replay.SerializeToString() == first.SerializeToString()
    assert not replay.HasField("delete_time")


async def test_create_post_replay_survives_the_post_being_deleted(users, posts) -> None:
    author = await users.CreateUser(create_user_request())
    request = post_pb2.CreatePostRequest(
        post=post(author.id, tags=["b", "a"]), request_id=str(uuid.uuid4())
    )
    first = await posts.CreatePost(request)
    await posts.DeletePost(post_pb2.DeletePostRequest(id=first.id))
    replay = await posts.CreatePost(request)
    assert replay.SerializeToString() == first.SerializeToString()


# -- BatchCreateUsers' own request_id -----------------------------------------------------


def _batch(*requests: user_pb2.CreateUserRequest, request_id: str = "") -> Any:
    return user_pb2.BatchCreateUsersRequest(requests=list(requests), request_id=request_id)


async def test_a_batch_retried_after_its_commit_returns_the_same_users(users) -> None:
    batch = _batch(create_user_request(), create_user_request(), request_id=str(uuid.uuid4()))
    first = await users.BatchCreateUsers(batch)
    # The client never saw that answer (its connection dropped): it retries.
    again = await users.BatchCreateUsers(batch)
    assert again.SerializeToString() == first.SerializeToString()
    # Even after the users changed, the replay is the first answer.
    await users.DeleteUser(user_pb2.DeleteUserRequest(id=first.users[0].id))
    assert (await users.BatchCreateUsers(batch)) == first
    # Without a request_id the same batch clashes, as before.
    batch.request_id = ""
    await expect_error(users.BatchCreateUsers(batch), Code.ALREADY_EXISTS, "USERNAME_TAKEN")


async def test_a_batch_request_id_reused_with_another_payload(users) -> None:
    request_id = str(uuid.uuid4())
    await users.BatchCreateUsers(_batch(create_user_request(), request_id=request_id))
    other = _batch(create_user_request(), request_id=request_id)
    await expect_error(
        users.BatchCreateUsers(other),
        Code.INVALID_ARGUMENT,
        "REQUEST_ID_REUSED",
        fields=["request_id"],
    )
    # Nothing was created by the refused call: its username is still free.
    assert (await users.CreateUser(other.requests[0])).username == other.requests[0].user.username


async def test_a_batch_request_id_must_be_a_uuid(users) -> None:
    await expect_error(
        users.BatchCreateUsers(_batch(create_user_request(), request_id="not-a-uuid")),
        Code.INVALID_ARGUMENT,
        fields=["request_id"],
    )


async def test_a_batch_is_not_a_create_user_of_the_same_request_id(users) -> None:
    """Records are per method: one request_id on CreateUser and on BatchCreateUsers
    names two different calls."""
    request_id = str(uuid.uuid4())
    single = create_user_request()
    single.request_id = request_id
    created = await users.CreateUser(single)
    batch = await users.BatchCreateUsers(_batch(create_user_request(), request_id=request_id))
    assert batch.users[0].id != created.id


async def test_entry_request_ids_inside_a_batch_stay_ignored(users) -> None:
    entry = _with_id(create_user_request())
    created = await users.BatchCreateUsers(_batch(entry))
    # The entry's request_id was not recorded for CreateUser: this creates anew (or
    # clashes), never replays the batch's user.
    await expect_error(users.CreateUser(entry), Code.ALREADY_EXISTS, "USERNAME_TAKEN")
    assert len(created.users) == 1


async def test_a_record_of_the_previous_release_replays_by_its_id(backend, users) -> None:
    """During a rolling deploy the previous release writes records without a stored
    response (the column is new): those replay as that release did, by reading."""
    created = await users.CreateUser(create_user_request())
    request = create_user_request(
        username=created.username, email=created.email, display_name=created.display_name
    )
    request.request_id = str(uuid.uuid4())
    values = {
        "username": created.username,
        "email": created.email,
        "display_name": created.display_name,
        "bio": created.bio,
    }
    database = Database(settings_for(backend.url))
    try:
        async with database.sessions.write() as session, session.begin():
            await session.execute(
                insert(IdempotencyRecord).values(
                    caller="anonymous",
                    method="/blog.v1.UserService/CreateUser",
                    request_id=request.request_id,
                    request_hash=request_digest(values),
                    resource_id=created.id,
                    create_time=utcnow(),
                )
            )
    finally:
        await database.dispose()
    assert await users.CreateUser(request) == created
