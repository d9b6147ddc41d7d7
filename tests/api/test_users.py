"""UserService unary methods against the contract (API.md): create, batch, get, update,
delete, undelete, idempotent create. Every error goes through `errors.expect_error`, which
also checks the one-ErrorInfo-per-status rule."""

from __future__ import annotations

import asyncio
import secrets
import string
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp

from blog.v1 import user_pb2
from conftest import running_server, settings_for
from errors import expect_error
from factories import create_user_request, unique, user

Code = grpc.StatusCode


async def create(users: Any, **overrides: Any) -> user_pb2.User:
    created: user_pb2.User = await users.CreateUser(create_user_request(**overrides))
    return created


async def get(users: Any, user_id: int, view: int = 0) -> user_pb2.User:
    fetched: user_pb2.User = await users.GetUser(user_pb2.GetUserRequest(id=user_id, view=view))
    return fetched


def fields(u: user_pb2.User) -> tuple[str, str, str, str]:
    """The mutable fields of a user."""
    return (u.username, u.email, u.display_name, u.bio)


def mask(*paths: str) -> FieldMask:
    return FieldMask(paths=list(paths))


def email_of(length: int) -> str:
    """A unique, valid-looking address of `length` (198 to 260) characters."""
    local = unique("e") + "a" * 51  # 64 characters, the most a local part may have
    address = f"{local}@{'d' * 63}.{'d' * 63}.{'d' * (length - 197)}.com"
    assert len(address) == length
    return address


# -- CreateUser ---------------------------------------------------------------------------


async def test_create_returns_the_stored_user(users) -> None:
    name = unique("Mixed_Case_")
    created = await create(
        users, username=name, email=f"{name}@Example.COM", display_name="Ada", bio="Hi"
    )
    assert created.id > 0
    assert created.username == name.lower()
    assert created.email == f"{name}@Example.COM"
    assert (created.display_name, created.bio) == ("Ada", "Hi")
    assert created.etag
    assert created.create_time == created.update_time
    made = created.create_time.ToDatetime(tzinfo=UTC)
    assert abs(datetime.now(UTC) - made) < timedelta(minutes=1)
    assert not created.HasField("delete_time")
    assert created.post_count == 0
    assert await get(users, created.id) == created


async def test_create_ignores_output_only_fields(users) -> None:
    sent = user(
        id=987_654_321,
        create_time=Timestamp(seconds=1_000_000),
        update_time=Timestamp(seconds=1_000_000),
        delete_time=Timestamp(seconds=1_000_000),
        etag="client-etag",
        post_count=42,
    )
    created = await users.CreateUser(user_pb2.CreateUserRequest(user=sent))
    assert created.id != 987_654_321
    assert created.etag not in ("", "client-etag")
    assert created.post_count == 0
    assert created.create_time.seconds > 1_000_000
    assert not created.HasField("delete_time")
    assert created.username == sent.username
    assert await get(users, created.id) == created


async def test_create_accepts_the_boundaries(users) -> None:
    letters = string.ascii_lowercase + string.digits + "_"
    short = "".join(secrets.choice(letters) for _ in range(3))
    created = await create(users, username=short.upper())
    assert created.username == short
    longest = unique("U") + "X" * 19
    assert len(longest) == 32
    display_name = "é" * 50 + "😀" * 50  # 100 code points, 300 bytes
    bio = "ж" * 1000 + "🙂" * 1000  # 2000 code points
    address = email_of(254)
    created = await create(
        users, username=longest, email=address, display_name=display_name, bio=bio
    )
    assert created.username == longest.lower()
    assert (created.email, created.display_name, created.bio) == (address, display_name, bio)
    assert await get(users, created.id) == created


INVALID_USER_FIELDS = [
    pytest.param({"username": "ab"}, "user.username", id="username-2-chars"),
    pytest.param({"username": "a" * 33}, "user.username", id="username-33-chars"),
    pytest.param({"username": ""}, "user.username", id="username-missing"),
    pytest.param({"username": "has-dash"}, "user.username", id="username-dash"),
    pytest.param({"username": "has space"}, "user.username", id="username-space"),
    pytest.param({"username": "dot.ted"}, "user.username", id="username-dot"),
    pytest.param({"username": "josé_1"}, "user.username", id="username-non-ascii"),
    pytest.param({"username": "ÀBC"}, "user.username", id="username-non-ascii-upper"),
    # KELVIN SIGN lower-cases to "k" in Unicode; only ASCII letters are folded.
    pytest.param({"username": "\u212aelvin"}, "user.username", id="username-kelvin-sign"),
    pytest.param({"username": "ab\x00cd"}, "user.username", id="username-nul"),
    pytest.param({"email": ""}, "user.email", id="email-missing"),
    pytest.param({"email": "not-an-email"}, "user.email", id="email-no-at"),
    pytest.param({"email": "a@@example.com"}, "user.email", id="email-two-ats"),
    pytest.param({"email": "a b@example.com"}, "user.email", id="email-space"),
    pytest.param({"email": "a@localhost"}, "user.email", id="email-no-domain-dot"),
    pytest.param({"email": "a@example.com\x00"}, "user.email", id="email-nul"),
    pytest.param({"email": "a@example.com\n"}, "user.email", id="email-newline"),
    pytest.param({"email": email_of(255)}, "user.email", id="email-255-chars"),
    pytest.param({"display_name": "x" * 101}, "user.display_name", id="display-name-101"),
    pytest.param({"display_name": "😀" * 101}, "user.display_name", id="display-name-101-wide"),
    pytest.param({"display_name": "a\x00b"}, "user.display_name", id="display-name-nul"),
    pytest.param({"bio": "b" * 2001}, "user.bio", id="bio-2001"),
    pytest.param({"bio": "\x00"}, "user.bio", id="bio-nul"),
]


@pytest.mark.parametrize(("overrides", "path"), INVALID_USER_FIELDS)
async def test_create_rejects_one_bad_field_with_one_violation(users, overrides, path) -> None:
    request = create_user_request(**overrides)
    await expect_error(users.CreateUser(request), Code.INVALID_ARGUMENT, fields=[path])


async def test_create_reports_one_violation_per_fault(users) -> None:
    request = create_user_request(username="x", email="nope", bio="b" * 2001)
    error = await expect_error(users.CreateUser(request), Code.INVALID_ARGUMENT)
    assert sorted(error.fields) == ["user.bio", "user.email", "user.username"]


async def test_create_rejected_request_creates_nothing(users) -> None:
    request = create_user_request(bio="b" * 2001)
    await expect_error(users.CreateUser(request), Code.INVALID_ARGUMENT, fields=["user.bio"])
    request.user.bio = ""
    assert (await users.CreateUser(request)).username == request.user.username


@pytest.mark.parametrize(
    ("clash", "reason"), [("username", "USERNAME_TAKEN"), ("email", "EMAIL_TAKEN")]
)
async def test_create_taken_in_any_case(users, clash, reason) -> None:
    first = await create(users)
    request = create_user_request(**{clash: getattr(first, clash).upper()})
    await expect_error(users.CreateUser(request), Code.ALREADY_EXISTS, reason)


async def test_create_both_taken_reports_username(users) -> None:
    first = await create(users)
    other = await create(users)
    same = create_user_request(username=first.username, email=first.email)
    await expect_error(users.CreateUser(same), Code.ALREADY_EXISTS, "USERNAME_TAKEN")
    mixed = create_user_request(username=first.username, email=other.email.upper())
    await expect_error(users.CreateUser(mixed), Code.ALREADY_EXISTS, "USERNAME_TAKEN")


async def test_username_and_email_reusable_after_delete(users) -> None:
    first = await create(users)
    await users.DeleteUser(user_pb2.DeleteUserRequest(id=first.id))
    second = await create(users, username=first.username, email=first.email.upper())
    assert second.id != first.id
    assert second.username == first.username
    assert (await get(users, first.id)).HasField("delete_time")


# -- idempotent CreateUser (AIP-155) ------------------------------------------------------


async def test_create_with_request_id_is_idempotent(users) -> None:
    request = create_user_request()
    request.request_id = str(uuid.uuid4())
    first = await users.CreateUser(request)
    again = await users.CreateUser(request)
    assert again == first
    # The replay creates nothing, even once the first user's username is free again.
    await users.DeleteUser(user_pb2.DeleteUserRequest(id=first.id))
    replay = await users.CreateUser(request)
    assert replay.id == first.id
    fresh = await users.CreateUser(create_user_request(username=request.user.username))
    assert fresh.id != first.id


async def test_request_id_of_a_failed_create_can_be_retried(users) -> None:
    holder = await create(users)
    request = create_user_request(username=holder.username)
    request.request_id = str(uuid.uuid4())
    await expect_error(users.CreateUser(request), Code.ALREADY_EXISTS, "USERNAME_TAKEN")
    await users.DeleteUser(user_pb2.DeleteUserRequest(id=holder.id))
    created = await users.CreateUser(request)
    assert created.id != holder.id
    assert created.username == holder.username


@pytest.mark.parametrize("request_id", ["not-a-uuid", "1234", "x" * 37, "\x00" * 36])
async def test_request_id_must_be_a_uuid(users, request_id) -> None:
    request = create_user_request()
    request.request_id = request_id
    await expect_error(users.CreateUser(request), Code.INVALID_ARGUMENT, fields=["request_id"])
    request.request_id = ""
    assert (await users.CreateUser(request)).username == request.user.username


async def test_request_id_reused_with_another_payload(users) -> None:
    request = create_user_request()
    request.request_id = str(uuid.uuid4())
    first = await users.CreateUser(request)
    other = create_user_request()
    other.request_id = request.request_id
    await expect_error(
        users.CreateUser(other), Code.INVALID_ARGUMENT, "REQUEST_ID_REUSED", fields=["request_id"]
    )
    changed = user_pb2.CreateUserRequest()
    changed.CopyFrom(request)
    changed.user.bio = "a different bio"
    await expect_error(users.CreateUser(changed), Code.INVALID_ARGUMENT, "REQUEST_ID_REUSED")
    # Neither attempt created anything; the original still replays.
    await assert_none_created(users, [other])
    assert (await users.CreateUser(request)).id == first.id


async def test_concurrent_calls_with_one_request_id_create_one_user(users) -> None:
    request = create_user_request()
    request.request_id = str(uuid.uuid4())
    results = await asyncio.gather(*(users.CreateUser(request) for _ in range(5)))
    assert len({r.id for r in results}) == 1
    assert all(r == results[0] for r in results)


async def test_request_id_replays_on_another_replica(backend, users) -> None:
    request = create_user_request()
    request.request_id = str(uuid.uuid4())
    first = await users.CreateUser(request)
    async with running_server(settings_for(backend.url)) as replica:
        assert await replica.users.CreateUser(request) == first


async def test_request_id_is_scoped_to_the_caller(backend, tmp_path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("token-a alice\ntoken-b bob\n")
    alice = [("authorization", "Bearer token-a")]
    bob = [("authorization", "Bearer token-b")]
    request_id = str(uuid.uuid4())
    mine, theirs = create_user_request(), create_user_request()
    mine.request_id = theirs.request_id = request_id
    async with running_server(settings_for(backend.url, auth_tokens_file=tokens)) as secured:
        await expect_error(secured.users.CreateUser(mine), Code.UNAUTHENTICATED, "UNAUTHENTICATED")
        by_alice = await secured.users.CreateUser(mine, metadata=alice)
        by_bob = await secured.users.CreateUser(theirs, metadata=bob)
        assert by_alice.id != by_bob.id
        assert (await secured.users.CreateUser(mine, metadata=alice)).id == by_alice.id
        assert (await secured.users.CreateUser(theirs, metadata=bob)).id == by_bob.id


# -- BatchCreateUsers ---------------------------------------------------------------------


def batch(*requests: user_pb2.CreateUserRequest) -> user_pb2.BatchCreateUsersRequest:
    return user_pb2.BatchCreateUsersRequest(requests=list(requests))


async def test_batch_creates_all_in_order(users) -> None:
    requests = [create_user_request(username=unique("B")) for _ in range(3)]
    response = await users.BatchCreateUsers(batch(*requests))
    assert [u.username for u in response.users] == [r.user.username.lower() for r in requests]
    assert len({u.id for u in response.users}) == 3
    for created in response.users:
        assert created.etag
        assert await get(users, created.id) == created


async def test_batch_ignores_request_ids_of_entries(users) -> None:
    shared = str(uuid.uuid4())
    requests = [create_user_request(), create_user_request(), create_user_request()]
    requests[0].request_id = requests[1].request_id = shared
    requests[2].request_id = "not a uuid"
    response = await users.BatchCreateUsers(batch(*requests))
    assert len({u.id for u in response.users}) == 3


async def assert_none_created(users: Any, requests: list[user_pb2.CreateUserRequest]) -> None:
    """None of these users exists: each can still be created on its own."""
    for request in requests:
        fresh = user_pb2.CreateUserRequest(user=request.user)
        assert (await users.CreateUser(fresh)).username == request.user.username.lower()


async def test_batch_with_one_bad_entry_creates_nothing(users) -> None:
    requests = [create_user_request(), create_user_request(email="bad"), create_user_request()]
    await expect_error(
        users.BatchCreateUsers(batch(*requests)),
        Code.INVALID_ARGUMENT,
        fields=["requests[1].user.email"],
    )
    await assert_none_created(users, [requests[0], requests[2]])


async def test_batch_reports_each_bad_entry(users) -> None:
    requests = [
        create_user_request(username="-"),
        create_user_request(),
        create_user_request(display_name="d" * 101),
    ]
    await expect_error(
        users.BatchCreateUsers(batch(*requests)),
        Code.INVALID_ARGUMENT,
        fields=["requests[0].user.username", "requests[2].user.display_name"],
    )


@pytest.mark.parametrize(
    ("clash", "reason"), [("username", "USERNAME_TAKEN"), ("email", "EMAIL_TAKEN")]
)
async def test_batch_clash_with_live_user_names_the_index(users, clash, reason) -> None:
    existing = await create(users)
    taken = existing.username.upper() if clash == "username" else existing.email.upper()
    requests = [create_user_request(), create_user_request(), create_user_request(**{clash: taken})]
    error = await expect_error(
        users.BatchCreateUsers(batch(*requests)), Code.ALREADY_EXISTS, reason
    )
    assert error.info is not None
    assert error.info.metadata["index"] == "2"
    await assert_none_created(users, requests[:2])


@pytest.mark.parametrize(
    ("clash", "reason"),
    [("username", "USERNAME_TAKEN"), ("email", "EMAIL_TAKEN"), ("both", "USERNAME_TAKEN")],
)
async def test_batch_clash_inside_the_batch_names_the_index(users, clash, reason) -> None:
    first = create_user_request()
    same: dict[str, str] = {}
    if clash in ("username", "both"):
        same["username"] = first.user.username.upper()
    if clash in ("email", "both"):
        same["email"] = first.user.email.upper()
    requests = [first, create_user_request(), create_user_request(**same)]
    error = await expect_error(
        users.BatchCreateUsers(batch(*requests)), Code.ALREADY_EXISTS, reason
    )
    assert error.info is not None
    assert error.info.metadata["index"] == "2"
    await assert_none_created(users, requests[:2])


async def list_marked(users: Any, marker: str) -> list[user_pb2.User]:
    response = await users.ListUsers(
        user_pb2.ListUsersRequest(page_size=1000, filter=f'display_name:"{marker}"')
    )
    assert not response.next_page_token
    return list(response.users)


async def test_batch_of_1000_is_accepted(users) -> None:
    marker = unique("m")
    requests = [create_user_request(display_name=marker) for _ in range(1000)]
    response = await users.BatchCreateUsers(batch(*requests))
    assert len(response.users) == 1000
    listed = await list_marked(users, marker)
    assert [u.id for u in listed] == [u.id for u in response.users]


@pytest.mark.parametrize("count", [0, 1001])
async def test_batch_outside_1_to_1000_creates_nothing(users, count) -> None:
    marker = unique("m")
    requests = [create_user_request(display_name=marker) for _ in range(count)]
    await expect_error(
        users.BatchCreateUsers(batch(*requests)), Code.INVALID_ARGUMENT, fields=["requests"]
    )
    assert await list_marked(users, marker) == []


# -- GetUser ------------------------------------------------------------------------------


async def test_get_views(users) -> None:
    created = await create(users)
    basic = await get(users, created.id, user_pb2.USER_VIEW_BASIC)
    unspecified = await get(users, created.id, user_pb2.USER_VIEW_UNSPECIFIED)
    full = await get(users, created.id, user_pb2.USER_VIEW_FULL)
    assert basic == unspecified == full == created
    assert full.post_count == 0


async def test_get_deleted_user_has_delete_time(users) -> None:
    created = await create(users)
    deleted = await users.DeleteUser(user_pb2.DeleteUserRequest(id=created.id))
    fetched = await get(users, created.id)
    assert fetched.HasField("delete_time")
    assert fetched == deleted


@pytest.mark.parametrize("user_id", [0, -1, -(2**63)])
async def test_get_non_positive_id_is_invalid(users, user_id) -> None:
    request = user_pb2.GetUserRequest(id=user_id)
    await expect_error(users.GetUser(request), Code.INVALID_ARGUMENT, fields=["id"])


async def test_get_missing_is_not_found(users) -> None:
    error = await expect_error(users.GetUser(user_pb2.GetUserRequest(id=2**63 - 1)), Code.NOT_FOUND)
    assert error.resource_info is not None
    assert error.resource_info.resource_name == f"users/{2**63 - 1}"


# -- UpdateUser ---------------------------------------------------------------------------


def update(changes: user_pb2.User, *paths: str) -> user_pb2.UpdateUserRequest:
    request = user_pb2.UpdateUserRequest(user=changes)
    if paths:
        request.update_mask.CopyFrom(mask(*paths))
    return request


async def test_update_masked_field_only(users) -> None:
    original = await create(users, bio="old bio")
    changes = user(id=original.id, display_name="New Name", bio="ignored")
    updated = await users.UpdateUser(update(changes, "display_name"))
    assert fields(updated) == (original.username, original.email, "New Name", "old bio")
    assert updated.etag != original.etag
    assert updated.create_time == original.create_time
    assert updated.update_time.ToDatetime() >= original.update_time.ToDatetime()
    assert await get(users, original.id) == updated


async def test_update_without_mask_changes_non_default_fields(users) -> None:
    original = await create(users, display_name="Keep Me", bio="old")
    changes = user_pb2.User(id=original.id, bio="new bio", email=f"NEW.{original.email}")
    updated = await users.UpdateUser(update(changes))
    assert fields(updated) == (original.username, f"NEW.{original.email}", "Keep Me", "new bio")


async def test_update_star_replaces_all_mutable_fields(users) -> None:
    original = await create(users, display_name="Name", bio="Bio")
    name = unique("Star_")
    changes = user_pb2.User(id=original.id, username=name, email=f"{name}@example.org")
    updated = await users.UpdateUser(update(changes, "*"))
    assert fields(updated) == (name.lower(), f"{name}@example.org", "", "")


async def test_update_clearing_needs_an_explicit_mask(users) -> None:
    original = await create(users, display_name="Name", bio="Bio")
    unmasked = user_pb2.User(id=original.id, display_name="", bio="", username=original.username)
    kept = await users.UpdateUser(update(unmasked))
    assert (kept.display_name, kept.bio) == ("Name", "Bio")
    cleared = await users.UpdateUser(update(user_pb2.User(id=original.id), "bio"))
    assert (cleared.display_name, cleared.bio) == ("Name", "")


async def test_update_validates_the_masked_fields(users) -> None:
    original = await create(users)
    changes = user_pb2.User(id=original.id, email="not-an-email", username="-")
    request = update(changes, "email")
    await expect_error(users.UpdateUser(request), Code.INVALID_ARGUMENT, fields=["user.email"])
    request = update(changes, "username")
    await expect_error(users.UpdateUser(request), Code.INVALID_ARGUMENT, fields=["user.username"])
    assert await get(users, original.id) == original


# Unknown paths, output-only paths, a path naming the request instead of the resource,
# `*` beside another path, and a wrong case; comma-separated paths go in one mask.
BAD_MASKS = "nickname id create_time update_time delete_time etag post_count"
BAD_MASKS += " display_name,nickname user.display_name *,bio Display_Name"


@pytest.mark.parametrize("paths", [m.split(",") for m in BAD_MASKS.split()])
async def test_update_bad_mask_path_is_invalid(users, paths) -> None:
    original = await create(users)
    request = update(user_pb2.User(id=original.id, display_name="Changed"), *paths)
    await expect_error(users.UpdateUser(request), Code.INVALID_ARGUMENT, fields=["update_mask"])
    assert await get(users, original.id) == original


@pytest.mark.parametrize("user_id", [0, -5])
async def test_update_non_positive_id_is_invalid(users, user_id) -> None:
    request = update(user_pb2.User(id=user_id, display_name="x"), "display_name")
    await expect_error(users.UpdateUser(request), Code.INVALID_ARGUMENT, fields=["user.id"])


async def test_update_with_etag(users) -> None:
    original = await create(users)
    changes = user_pb2.User(id=original.id, display_name="One", etag=original.etag)
    updated = await users.UpdateUser(update(changes, "display_name"))
    assert updated.etag != original.etag
    changes = user_pb2.User(id=original.id, display_name="Two", etag=updated.etag)
    again = await users.UpdateUser(update(changes, "display_name"))
    assert again.etag not in (original.etag, updated.etag)
    for stale in (original.etag, updated.etag, "garbage"):
        changes = user_pb2.User(id=original.id, display_name="Lost", etag=stale)
        request = update(changes, "display_name")
        await expect_error(users.UpdateUser(request), Code.ABORTED, "ETAG_MISMATCH")
    assert await get(users, original.id) == again


async def test_update_deleted_user_is_failed_precondition(users) -> None:
    original = await create(users)
    deleted = await users.DeleteUser(user_pb2.DeleteUserRequest(id=original.id))
    for etag in ("", deleted.etag):
        request = update(user_pb2.User(id=original.id, bio="x", etag=etag), "bio")
        error = await expect_error(
            users.UpdateUser(request), Code.FAILED_PRECONDITION, "USER_DELETED"
        )
        assert error.precondition is not None
        assert len(error.precondition.violations) == 1
    assert await get(users, original.id) == deleted


async def test_update_to_taken_username_or_email(users) -> None:
    holder = await create(users)
    target = await create(users)
    request = update(user_pb2.User(id=target.id, username=holder.username.upper()), "username")
    await expect_error(users.UpdateUser(request), Code.ALREADY_EXISTS, "USERNAME_TAKEN")
    request = update(user_pb2.User(id=target.id, email=holder.email.upper()), "email")
    await expect_error(users.UpdateUser(request), Code.ALREADY_EXISTS, "EMAIL_TAKEN")
    both = user_pb2.User(id=target.id, username=holder.username, email=holder.email)
    await expect_error(users.UpdateUser(update(both)), Code.ALREADY_EXISTS, "USERNAME_TAKEN")
    assert await get(users, target.id) == target


async def test_update_to_username_of_deleted_user(users) -> None:
    gone = await create(users)
    await users.DeleteUser(user_pb2.DeleteUserRequest(id=gone.id))
    target = await create(users)
    request = update(user_pb2.User(id=target.id, username=gone.username), "username")
    assert (await users.UpdateUser(request)).username == gone.username


async def test_update_missing_is_not_found(users) -> None:
    request = update(user_pb2.User(id=2**62 + 7, display_name="x"), "display_name")
    error = await expect_error(users.UpdateUser(request), Code.NOT_FOUND)
    assert error.resource_info is not None
    assert error.resource_info.resource_name == f"users/{2**62 + 7}"


# -- DeleteUser / UndeleteUser ------------------------------------------------------------


async def test_delete_sets_delete_time(users) -> None:
    original = await create(users)
    deleted = await users.DeleteUser(user_pb2.DeleteUserRequest(id=original.id))
    assert deleted.HasField("delete_time")
    assert deleted.etag != original.etag
    assert deleted.id == original.id
    assert fields(deleted) == fields(original)
    assert await get(users, original.id) == deleted


async def test_delete_twice_is_not_found(users) -> None:
    original = await create(users)
    deleted = await users.DeleteUser(user_pb2.DeleteUserRequest(id=original.id))
    for etag in ("", deleted.etag):
        request = user_pb2.DeleteUserRequest(id=original.id, etag=etag)
        await expect_error(users.DeleteUser(request), Code.NOT_FOUND)
    assert await get(users, original.id) == deleted


async def test_delete_with_etag(users) -> None:
    original = await create(users)
    changes = user_pb2.User(id=original.id, bio="b")
    updated = await users.UpdateUser(update(changes, "bio"))
    stale = user_pb2.DeleteUserRequest(id=original.id, etag=original.etag)
    await expect_error(users.DeleteUser(stale), Code.ABORTED, "ETAG_MISMATCH")
    assert not (await get(users, original.id)).HasField("delete_time")
    current = user_pb2.DeleteUserRequest(id=original.id, etag=updated.etag)
    assert (await users.DeleteUser(current)).HasField("delete_time")


@pytest.mark.parametrize("method", ["DeleteUser", "UndeleteUser"])
async def test_delete_and_undelete_check_the_id(users, method) -> None:
    request_class = getattr(user_pb2, f"{method}Request")
    call = getattr(users, method)
    for user_id in (0, -1):
        await expect_error(call(request_class(id=user_id)), Code.INVALID_ARGUMENT, fields=["id"])
    error = await expect_error(call(request_class(id=2**62 + 11)), Code.NOT_FOUND)
    assert error.resource_info is not None


async def test_undelete_restores_the_user(users) -> None:
    original = await create(users)
    deleted = await users.DeleteUser(user_pb2.DeleteUserRequest(id=original.id))
    restored = await users.UndeleteUser(user_pb2.UndeleteUserRequest(id=original.id))
    assert not restored.HasField("delete_time")
    assert restored.etag not in (original.etag, deleted.etag)
    assert fields(restored) == fields(original)
    assert await get(users, original.id) == restored
    clash = create_user_request(username=original.username)
    await expect_error(users.CreateUser(clash), Code.ALREADY_EXISTS, "USERNAME_TAKEN")


async def test_undelete_live_user(users) -> None:
    original = await create(users)
    request = user_pb2.UndeleteUserRequest(id=original.id)
    await expect_error(users.UndeleteUser(request), Code.ALREADY_EXISTS, "USER_NOT_DELETED")
    assert await get(users, original.id) == original


@pytest.mark.parametrize(
    ("taken", "reason"),
    [("username", "USERNAME_TAKEN"), ("email", "EMAIL_TAKEN"), ("both", "USERNAME_TAKEN")],
)
async def test_undelete_when_taken_meanwhile(users, taken, reason) -> None:
    original = await create(users)
    deleted = await users.DeleteUser(user_pb2.DeleteUserRequest(id=original.id))
    if taken in ("username", "both"):
        await create(users, username=original.username)
    if taken in ("email", "both"):
        await create(users, email=original.email.upper())
    request = user_pb2.UndeleteUserRequest(id=original.id)
    await expect_error(users.UndeleteUser(request), Code.ALREADY_EXISTS, reason)
    assert await get(users, original.id) == deleted
