"""The first end-to-end path: create and read a user over real gRPC on each backend."""

from __future__ import annotations

import grpc
import pytest

from blog.v1 import user_pb2
from errors import rich
from factories import create_user_request


async def test_create_then_get(users) -> None:
    created = await users.CreateUser(create_user_request())
    assert created.id > 0
    assert created.etag
    fetched = await users.GetUser(user_pb2.GetUserRequest(id=created.id))
    assert fetched == created


async def test_get_missing_is_not_found_with_resource_info(users) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await users.GetUser(user_pb2.GetUserRequest(id=2**62))
    error = rich(caught.value)
    assert error.code is grpc.StatusCode.NOT_FOUND
    assert error.reason == "NOT_FOUND"
    assert error.resource_info is not None
    assert error.resource_info.resource_name == f"users/{2**62}"
