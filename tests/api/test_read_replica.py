"""DATABASE_READ_URL: Get, List and Stream read from the replica; writes go to DATABASE_URL.

Two SQLite files stand in for a primary and a lagging replica, so the test can see
which one each call used."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from blog.v1 import user_pb2
from conftest import _migrate, running_server, settings_for
from errors import expect_error
from factories import create_user_request
from support.postgres import PostgresServer

ALREADY = grpc.StatusCode.ALREADY_EXISTS


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


# -- conflicts are explained from the primary ---------------------------------------------
# The replica below lacks every row (as if it lagged far behind): a clash explained from
# it would lose the batch's index and the USERNAME_TAKEN-first rule.


@pytest.fixture(params=["postgresql", "sqlite"])
async def lagging_replica(
    request: pytest.FixtureRequest, postgres: PostgresServer, tmp_path: Path
) -> AsyncIterator[tuple[str, str]]:
    """A migrated primary and a migrated, empty replica of one backend."""
    if request.param == "sqlite":
        primary = f"sqlite+aiosqlite:///{tmp_path / 'primary.db'}"
        replica = f"sqlite+aiosqlite:///{tmp_path / 'replica.db'}"
        made: list[str] = []
    else:
        primary, replica = postgres.create_database(), postgres.create_database()
        made = [primary, replica]
    try:
        await _migrate(primary)
        await _migrate(replica)
        yield primary, replica
    finally:
        for url in made:
            postgres.drop_database(url)


async def test_a_batch_clash_names_its_entry_from_the_primary(
    lagging_replica: tuple[str, str],
) -> None:
    primary, replica = lagging_replica
    async with running_server(settings_for(primary, database_read_url=replica)) as live:
        holder = await live.users.CreateUser(create_user_request())
        email_holder = await live.users.CreateUser(create_user_request())
        batch = user_pb2.BatchCreateUsersRequest(
            requests=[
                create_user_request(),
                create_user_request(),
                create_user_request(username=holder.username),
            ]
        )
        info = (
            await expect_error(live.users.BatchCreateUsers(batch), ALREADY, "USERNAME_TAKEN")
        ).info
        assert info is not None
        assert info.metadata["index"] == "2"
        # Entry 1 clashes on its email, entry 2 on its username: the first entry counts.
        batch.requests[1].user.email = email_holder.email
        info = (await expect_error(live.users.BatchCreateUsers(batch), ALREADY, "EMAIL_TAKEN")).info
        assert info is not None
        assert info.metadata["index"] == "1"


async def test_username_first_is_decided_on_the_primary(lagging_replica: tuple[str, str]) -> None:
    """One entry clashing on its email with one user and on its username with another:
    USERNAME_TAKEN, whichever index the database happened to check first."""
    primary, replica = lagging_replica
    async with running_server(settings_for(primary, database_read_url=replica)) as live:
        by_name = await live.users.CreateUser(create_user_request())
        by_email = await live.users.CreateUser(create_user_request())
        clash = create_user_request(username=by_name.username, email=by_email.email)
        await expect_error(live.users.CreateUser(clash), ALREADY, "USERNAME_TAKEN")
        batch = user_pb2.BatchCreateUsersRequest(requests=[create_user_request(), clash])
        info = (
            await expect_error(live.users.BatchCreateUsers(batch), ALREADY, "USERNAME_TAKEN")
        ).info
        assert info is not None
        assert info.metadata["index"] == "1"
        # UpdateUser too: a user taking both at once is told about the username.
        mover = await live.users.CreateUser(create_user_request())
        move = user_pb2.UpdateUserRequest(
            user=user_pb2.User(id=mover.id, username=by_name.username, email=by_email.email),
            update_mask=FieldMask(paths=["username", "email"]),
        )
        await expect_error(live.users.UpdateUser(move), ALREADY, "USERNAME_TAKEN")
        # Keeping its own username while taking another's email is EMAIL_TAKEN.
        move.user.username = mover.username
        await expect_error(live.users.UpdateUser(move), ALREADY, "EMAIL_TAKEN")
