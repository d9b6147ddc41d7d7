"""UserService writes racing each other: the database constraints and version guards decide,
and the losers get the contract's errors (never INTERNAL)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from google.protobuf.field_mask_pb2 import FieldMask

from blog.v1 import user_pb2
from errors import check_error
from factories import create_user_request

Code = grpc.StatusCode
ROUNDS = 5


async def outcomes(calls: list[Any]) -> tuple[list[Any], list[grpc.aio.AioRpcError]]:
    """Run calls at once; split their results into successes and failures."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    failures = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    others = [r for r in results if isinstance(r, BaseException) and r not in failures]
    assert not others, others
    return [r for r in results if not isinstance(r, BaseException)], failures


async def test_racing_creates_of_one_username(users) -> None:
    for _ in range(ROUNDS):
        name = create_user_request().user.username
        calls = [
            users.CreateUser(create_user_request(username=name.upper() if i % 2 else name))
            for i in range(4)
        ]
        won, lost = await outcomes(calls)
        assert len(won) == 1
        for error in lost:
            check_error(error, Code.ALREADY_EXISTS, "USERNAME_TAKEN")


async def test_racing_creates_of_one_email(users) -> None:
    for _ in range(ROUNDS):
        email = create_user_request().user.email
        calls = [
            users.CreateUser(create_user_request(email=email.upper() if i % 2 else email))
            for i in range(4)
        ]
        won, lost = await outcomes(calls)
        assert len(won) == 1
        for error in lost:
            check_error(error, Code.ALREADY_EXISTS, "EMAIL_TAKEN")


async def test_racing_batches_name_the_clashing_index(users) -> None:
    for _ in range(ROUNDS):
        shared = create_user_request()
        batches = [
            user_pb2.BatchCreateUsersRequest(
                requests=[create_user_request(), shared, create_user_request()]
            )
            for _ in range(3)
        ]
        won, lost = await outcomes([users.BatchCreateUsers(b) for b in batches])
        assert len(won) == 1
        for error in lost:
            info = check_error(error, Code.ALREADY_EXISTS, "USERNAME_TAKEN").info
            assert info is not None
            assert info.metadata["index"] == "1"


async def test_racing_updates_with_one_etag(users) -> None:
    for _ in range(ROUNDS):
        original = await users.CreateUser(create_user_request())
        calls = [
            users.UpdateUser(
                user_pb2.UpdateUserRequest(
                    user=user_pb2.User(id=original.id, bio=f"writer {i}", etag=original.etag),
                    update_mask=FieldMask(paths=["bio"]),
                )
            )
            for i in range(4)
        ]
        won, lost = await outcomes(calls)
        assert len(won) == 1
        for error in lost:
            check_error(error, Code.ABORTED, "ETAG_MISMATCH")
        current = await users.GetUser(user_pb2.GetUserRequest(id=original.id))
        assert current == won[0]


async def test_racing_deletes(users) -> None:
    for _ in range(ROUNDS):
        original = await users.CreateUser(create_user_request())
        request = user_pb2.DeleteUserRequest(id=original.id)
        won, lost = await outcomes([users.DeleteUser(request) for _ in range(3)])
        assert len(won) == 1
        for error in lost:
            check_error(error, Code.NOT_FOUND)


RACE_ROUNDS = 60


async def test_update_racing_undelete_never_claims_an_etag_mismatch(users) -> None:
    """No etag sent, so no ETAG_MISMATCH: an update that ran while the user was deleted
    is USER_DELETED, one that ran after the undelete applies (issue 8, item 14)."""
    seen: set[str] = set()
    for _ in range(RACE_ROUNDS):
        user = await users.CreateUser(create_user_request())
        await users.DeleteUser(user_pb2.DeleteUserRequest(id=user.id))
        update = user_pb2.UpdateUserRequest(
            user=user_pb2.User(id=user.id, bio="updated"), update_mask=FieldMask(paths=["bio"])
        )
        results = await asyncio.gather(
            *(users.UpdateUser(update) for _ in range(3)),
            users.UndeleteUser(user_pb2.UndeleteUserRequest(id=user.id)),
            *(users.UpdateUser(update) for _ in range(3)),
            return_exceptions=True,
        )
        undeleted = results[3]
        assert isinstance(undeleted, user_pb2.User), undeleted
        for result in results[:3] + results[4:]:
            if isinstance(result, user_pb2.User):
                assert result.bio == "updated"
                assert not result.HasField("delete_time")
                seen.add("OK")
            else:
                assert isinstance(result, grpc.aio.AioRpcError), result
                check_error(result, Code.FAILED_PRECONDITION, "USER_DELETED")
                seen.add("USER_DELETED")
    assert seen  # both outcomes are fine; which ones occur depends on timing


async def test_undelete_racing_delete_never_claims_an_etag_mismatch(users) -> None:
    for _ in range(RACE_ROUNDS):
        user = await users.CreateUser(create_user_request())
        results = await asyncio.gather(
            users.UndeleteUser(user_pb2.UndeleteUserRequest(id=user.id)),
            users.DeleteUser(user_pb2.DeleteUserRequest(id=user.id)),
            users.UndeleteUser(user_pb2.UndeleteUserRequest(id=user.id)),
            return_exceptions=True,
        )
        assert isinstance(results[1], user_pb2.User), results[1]
        for result in (results[0], results[2]):
            if not isinstance(result, user_pb2.User):
                assert isinstance(result, grpc.aio.AioRpcError), result
                check_error(result, Code.ALREADY_EXISTS, "USER_NOT_DELETED")
