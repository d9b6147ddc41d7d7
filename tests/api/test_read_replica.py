"""DATABASE_READ_URL: Get, List and Stream read from the replica; writes go to DATABASE_URL.

Two SQLite files stand in for a primary and a lagging replica, so the test can see
which one each call used."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from blog.v1 import user_pb2
from conftest import _migrate, running_server, settings_for
from factories import create_user_request


async def test_reads_go_to_the_replica_and_writes_to_the_primary(tmp_path: Path) -> None:
    primary = f"sqlite+aiosqlite:///{tmp_path / 'primary.db'}"
    replica = f"sqlite+aiosqlite:///{tmp_path / 'replica.db'}"
    await _migrate(primary)
    await _migrate(replica)
    async with running_server(settings_for(primary, database_read_url=replica)) as live:
        created = await live.users.CreateUser(create_user_request())
        # The write landed on the primary: a write path that reads it back finds it.
        updated = await live.users.UpdateUser(
            user_pb2.UpdateUserRequest(user=user_pb2.User(id=created.id, bio="on primary"))
        )
        assert updated.bio == "on primary"
        # Reads go to the replica, which has not seen it.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await live.users.GetUser(user_pb2.GetUserRequest(id=created.id))
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND
        page = await live.users.ListUsers(user_pb2.ListUsersRequest())
        assert list(page.users) == []
        streamed = [m async for m in live.users.StreamUsers(user_pb2.StreamUsersRequest())]
        assert streamed == []
