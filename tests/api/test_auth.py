"""AUTH_TOKENS_FILE: bearer tokens on every call but health and reflection; callers
scope idempotency keys."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from blog.v1 import user_pb2
from conftest import Backend, Running, running_server, settings_for
from errors import rich
from factories import create_user_request

ALICE = (("authorization", "Bearer alice-token"),)
BOB = (("authorization", "Bearer bob-token"),)


@pytest.fixture
async def secured(backend: Backend, tmp_path: Path):
    tokens = tmp_path / "tokens"
    tokens.write_text("# comment\nalice-token alice\n\nbob-token   bob the builder\n")
    async with running_server(settings_for(backend.url, auth_tokens_file=tokens)) as live:
        yield live


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        (("authorization", "Bearer wrong-token"),),
        (("authorization", "alice-token"),),
        (("authorization", "Basic alice-token"),),
    ],
    ids=["missing", "unknown", "no-scheme", "wrong-scheme"],
)
async def test_calls_without_a_valid_token_are_unauthenticated(
    secured: Running, metadata: tuple[tuple[str, str], ...]
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await secured.users.GetUser(user_pb2.GetUserRequest(id=1), metadata=metadata)
    error = rich(caught.value)
    assert error.code is grpc.StatusCode.UNAUTHENTICATED
    assert error.reason == "UNAUTHENTICATED"


async def test_a_valid_token_is_accepted(secured: Running) -> None:
    created = await secured.users.CreateUser(create_user_request(), metadata=ALICE)
    fetched = await secured.users.GetUser(user_pb2.GetUserRequest(id=created.id), metadata=BOB)
    assert fetched.id == created.id


async def test_health_and_reflection_need_no_token(secured: Running) -> None:
    health = health_pb2_grpc.HealthStub(secured.channel)
    response = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert response.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(secured.channel)
    answers = [
        answer
        async for answer in stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
    ]
    names = {s.name for s in answers[0].list_services_response.service}
    assert "blog.v1.UserService" in names


async def test_request_ids_are_scoped_by_caller(secured: Running) -> None:
    request = create_user_request()
    request.request_id = str(uuid.uuid4())
    first = await secured.users.CreateUser(request, metadata=ALICE)
    again = await secured.users.CreateUser(request, metadata=ALICE)
    assert again.id == first.id
    # Bob's call with the same request_id is his own: it tries to create the user
    # anew, and the username is taken.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await secured.users.CreateUser(request, metadata=BOB)
    assert rich(caught.value).reason == "USERNAME_TAKEN"


async def test_a_changed_tokens_file_is_reloaded_without_a_restart(
    backend: Backend, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("alice-token alice\n")
    settings = settings_for(backend.url, auth_tokens_file=tokens, file_reload_interval=0.1)
    async with running_server(settings) as live:
        request = user_pb2.GetUserRequest(id=1)
        new = (("authorization", "Bearer carol-token"),)

        async def refused(metadata: tuple[tuple[str, str], ...]) -> bool:
            try:
                await live.users.GetUser(request, metadata=metadata)
            except grpc.aio.AioRpcError as error:
                return error.code() is grpc.StatusCode.UNAUTHENTICATED
            return False

        await live.users.CreateUser(create_user_request(), metadata=ALICE)
        # A file that cannot be used (a caller name too long) is logged; the old tokens stay.
        tokens.write_text(f"carol-token {'c' * 201}\n")
        await asyncio.sleep(0.5)
        assert not await refused(ALICE)
        assert await refused(new)
        tokens.write_text("carol-token carol\n")
        for _ in range(100):
            if not await refused(new):
                break
            await asyncio.sleep(0.1)
        assert not await refused(new)
        assert await refused(ALICE)
