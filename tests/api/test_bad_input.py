"""Bad bytes are bad input, not crashes (API.md): requests that do not parse, invalid
UTF-8, values out of range, oversized messages and too-short deadlines each get their
own status, never INTERNAL or UNKNOWN."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from blog.v1 import user_pb2, user_pb2_grpc
from conftest import running_server, settings_for
from errors import check_error, expect_error
from factories import create_user_request, unique

Code = grpc.StatusCode

UNARY_METHODS = [
    "CreateUser",
    "BatchCreateUsers",
    "GetUser",
    "ListUsers",
    "UpdateUser",
    "DeleteUser",
    "UndeleteUser",
]


def raw(running: Any, method: str) -> Any:
    """A call that sends and returns bytes as they are."""
    return running.channel.unary_unary(
        f"/blog.v1.UserService/{method}", request_serializer=None, response_deserializer=None
    )


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits, value = value & 0x7F, value >> 7
        out.append(bits | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (strings and messages): tag, length, payload."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def create_request_bytes(username: bytes, email: bytes, bio: bytes = b"") -> bytes:
    """CreateUserRequest{user: User{username (2), email (3), bio (5)}} by hand."""
    user = field(2, username) + field(3, email) + (field(5, bio) if bio else b"")
    return field(1, user)


async def test_hand_built_request_is_understood(running) -> None:
    name = unique()
    data = create_request_bytes(name.encode(), f"{name}@example.com".encode())
    created = user_pb2.User.FromString(await raw(running, "CreateUser")(data))
    assert (created.username, created.email) == (name, f"{name}@example.com")
    # Unknown fields are skipped (forward compatibility), not rejected.
    data = varint(1 << 3) + varint(created.id) + field(99, b"future")
    fetched = user_pb2.User.FromString(await raw(running, "GetUser")(data))
    assert fetched == created


GARBAGE = [
    pytest.param(b"\xff\xff\xff", id="ff-ff-ff"),
    pytest.param(b"\x80", id="truncated-tag"),
    pytest.param(b"\x0a\x10abc", id="length-beyond-end"),
    pytest.param(b"\x0a\xff\xff\xff\xff\x0f", id="huge-length"),
    pytest.param(b"\x00", id="field-number-zero"),
    pytest.param(b"\x08" + b"\xff" * 11, id="overlong-varint"),
]


@pytest.mark.parametrize("method", UNARY_METHODS)
@pytest.mark.parametrize("data", GARBAGE)
async def test_bytes_that_do_not_parse_are_invalid_argument(running, method, data) -> None:
    await expect_error(raw(running, method)(data), Code.INVALID_ARGUMENT)


BAD_UTF8 = [
    pytest.param(b"ab\xffcd", id="ff-byte"),
    pytest.param(b"\xc0\xaf", id="overlong"),
    pytest.param(b"\xed\xa0\x80", id="surrogate"),
    pytest.param(b"\xf4\x90\x80\x80", id="above-10ffff"),
    pytest.param(b"abc\xe2\x82", id="truncated-sequence"),
]


@pytest.mark.parametrize("bad", BAD_UTF8)
async def test_invalid_utf8_in_create_is_invalid_argument(running, users, bad) -> None:
    name = unique()
    email = f"{name}@example.com".encode()
    cases = [
        create_request_bytes(bad, email),
        create_request_bytes(name.encode(), email + bad),
        create_request_bytes(name.encode(), email, bio=bad),
    ]
    for data in cases:
        await expect_error(raw(running, "CreateUser")(data), Code.INVALID_ARGUMENT)
        batch = field(1, data)  # BatchCreateUsersRequest{requests: [that request]}
        await expect_error(raw(running, "BatchCreateUsers")(batch), Code.INVALID_ARGUMENT)
    # None of them created the user.
    created = await users.CreateUser(create_user_request(username=name, email=email.decode()))
    assert created.username == name


@pytest.mark.parametrize("bad", BAD_UTF8)
async def test_invalid_utf8_in_other_requests(running, bad) -> None:
    cases = {
        "ListUsers": [field(2, bad), field(3, bad), field(4, bad)],  # token, filter, order_by
        "UpdateUser": [field(1, varint(1 << 3) + varint(1) + field(4, bad))],
        "DeleteUser": [varint(1 << 3) + varint(1) + field(2, bad)],  # etag
    }
    for method, payloads in cases.items():
        for data in payloads:
            await expect_error(raw(running, method)(data), Code.INVALID_ARGUMENT)


async def test_empty_request_is_checked_not_crashed(running) -> None:
    await expect_error(raw(running, "GetUser")(b""), Code.INVALID_ARGUMENT, fields=["id"])
    await expect_error(raw(running, "CreateUser")(b""), Code.INVALID_ARGUMENT)
    listed = user_pb2.ListUsersResponse.FromString(await raw(running, "ListUsers")(b""))
    assert len(listed.users) <= 50


async def test_nul_in_etags_is_invalid(users) -> None:
    created = await users.CreateUser(create_user_request())
    changes = user_pb2.User(id=created.id, bio="x", etag=created.etag + "\x00")
    update = user_pb2.UpdateUserRequest(user=changes)
    await expect_error(users.UpdateUser(update), Code.INVALID_ARGUMENT, fields=["user.etag"])
    delete = user_pb2.DeleteUserRequest(id=created.id, etag="\x00" + created.etag)
    await expect_error(users.DeleteUser(delete), Code.INVALID_ARGUMENT, fields=["etag"])
    assert await users.GetUser(user_pb2.GetUserRequest(id=created.id)) == created


@pytest.mark.parametrize("view", [-1, 3, 2**31 - 1])
async def test_unknown_enum_values_are_invalid(users, view) -> None:
    created = await users.CreateUser(create_user_request())
    get = user_pb2.GetUserRequest(id=created.id, view=view)
    await expect_error(users.GetUser(get), Code.INVALID_ARGUMENT, fields=["view"])
    listing = user_pb2.ListUsersRequest(view=view)
    await expect_error(users.ListUsers(listing), Code.INVALID_ARGUMENT, fields=["view"])


@pytest.mark.parametrize(
    "value",
    [
        '"0000-01-01T00:00:00Z"',
        '"0001-01-01T00:00:00+01:00"',
        '"9999-12-31T23:59:59-01:00"',
        '"10000-01-01T00:00:00Z"',
        '"2024-02-30T00:00:00Z"',
        '"2024-01-01T24:00:00Z"',
        '"2024-01-01T00:00:00+24:00"',
        '"2024-01-01"',
        '"2024-01-01T00:00:00"',
        '"\u0662\u0660\u0662\u0664-01-01T00:00:00Z"',  # Arabic-Indic digits
    ],
)
async def test_timestamp_out_of_range_in_filter(users, value) -> None:
    for name in ("create_time", "update_time"):
        request = user_pb2.ListUsersRequest(filter=f"{name} > {value}")
        await expect_error(users.ListUsers(request), Code.INVALID_ARGUMENT, fields=["filter"])


async def test_extreme_valid_values_in_filter(users) -> None:
    marker = unique("m")
    created = await users.CreateUser(create_user_request(display_name=marker))
    marked = f'display_name:"{marker}"'
    for text in (
        'create_time > "0001-01-01T00:00:00Z"',
        'create_time < "9999-12-31T23:59:59.999999999Z"',
        'update_time >= "1970-01-01T00:00:00+14:00"',
        f"id > {-(2**63)}",
        f"id <= {2**63 - 1}",
    ):
        response = await users.ListUsers(user_pb2.ListUsersRequest(filter=f"{marked} AND {text}"))
        assert [u.id for u in response.users] == [created.id], text
    for text in (f"id > {2**63}", f"id < {-(2**63) - 1}", "id > 1.5", "id > 0x10"):
        request = user_pb2.ListUsersRequest(filter=text)
        await expect_error(users.ListUsers(request), Code.INVALID_ARGUMENT, fields=["filter"])


async def test_message_over_max_message_bytes_is_resource_exhausted(backend) -> None:
    settings = settings_for(backend.url, max_message_bytes=64 * 1024)
    async with running_server(settings) as small:
        big = create_user_request(bio="x" * (70 * 1024))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await small.users.CreateUser(big)
        assert caught.value.code() is Code.RESOURCE_EXHAUSTED
        marker = unique("m")
        requests = [create_user_request(display_name=marker, bio="b" * 2000) for _ in range(40)]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await small.users.BatchCreateUsers(user_pb2.BatchCreateUsersRequest(requests=requests))
        assert caught.value.code() is Code.RESOURCE_EXHAUSTED
        # Nothing was created, and the server still takes requests under the limit.
        listed = await small.users.ListUsers(
            user_pb2.ListUsersRequest(filter=f'display_name:"{marker}"')
        )
        assert list(listed.users) == []
        big.user.bio = "x" * 2000
        assert (await small.users.CreateUser(big)).bio == big.user.bio


async def test_default_limit_fits_a_full_batch_of_the_largest_users(running) -> None:
    """MAX_MESSAGE_BYTES defaults to enough for 1,000 users with every field at its maximum."""
    requests = []
    for _ in range(1000):
        name = unique("U") + "x" * 19  # 32 characters
        local = name.lower() + "a" * 32  # 64 characters
        email = f"{local}@{'d' * 63}.{'e' * 63}.{'f' * 57}.com"
        assert len(email) == 254
        requests.append(
            user_pb2.CreateUserRequest(
                user=user_pb2.User(
                    username=name, email=email, display_name="😀" * 100, bio="🙂" * 2000
                )
            )
        )
    batch = user_pb2.BatchCreateUsersRequest(requests=requests)
    assert batch.ByteSize() > 8 * 1024 * 1024
    # The client's own receive limit (4 MiB by default) must not be what is tested.
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(running.target, options=options) as channel:
        response = await user_pb2_grpc.UserServiceStub(channel).BatchCreateUsers(batch)
    assert len(response.users) == 1000
    assert response.users[-1].bio == "🙂" * 2000


async def test_short_deadline_is_deadline_exceeded(running, users) -> None:
    created = await users.CreateUser(create_user_request())
    # A full batch of large users takes far longer than the 10 ms deadline.
    requests = [create_user_request(bio="🙂" * 2000) for _ in range(1000)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await users.BatchCreateUsers(
            user_pb2.BatchCreateUsersRequest(requests=requests), timeout=0.01
        )
    assert caught.value.code() is Code.DEADLINE_EXCEEDED
    # The server is unharmed.
    assert await users.GetUser(user_pb2.GetUserRequest(id=created.id)) == created


async def test_service_errors_never_internal_for_odd_but_valid_requests(running) -> None:
    """Deep nesting, long filters at the limit and odd Unicode are answered, not crashed."""
    odd = [
        user_pb2.ListUsersRequest(filter="(" * 33 + 'username = "a"' + ")" * 33),
        user_pb2.ListUsersRequest(filter="NOT " * 40 + 'username = "a"'),
        user_pb2.ListUsersRequest(filter='username = "' + "é" * 2030 + '"'),
        user_pb2.ListUsersRequest(filter='display_name:"\U0010ffff\u200b"'),
        user_pb2.ListUsersRequest(order_by="username " * 100),
    ]
    for request in odd:
        try:
            await running.users.ListUsers(request)
        except grpc.aio.AioRpcError as error:
            check_error(error, Code.INVALID_ARGUMENT)
