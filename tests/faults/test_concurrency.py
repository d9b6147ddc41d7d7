"""Races: 50 writers with etags on one user, and deadlock-prone batch pairs."""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from pathlib import Path

import grpc
from google.protobuf import field_mask_pb2
from harness import Figures, served, stubs

from blog.v1 import user_pb2
from errors import rich

WRITERS = 50
PAIRS = 100
FILLER = 200


async def test_concurrent_writers_with_etags_lose_no_update(
    database: str, log_dir: Path, figures: Figures
) -> None:
    """Each writer increments a counter kept in display_name: read, add one, write back
    with the etag read, retry on ABORTED. 50 writers: the counter ends at 50 exactly."""
    async with served(database, log_dir) as server:  # noqa: SIM117
        async with grpc.aio.insecure_channel(server.target) as channel:
            users, _ = stubs(channel)
            name = f"race{uuid.uuid4().hex[:8]}"
            created = await users.CreateUser(
                user_pb2.CreateUserRequest(
                    user=user_pb2.User(username=name, email=f"{name}@e.com", display_name="0")
                )
            )
            codes: collections.Counter[str] = collections.Counter()
            reasons: collections.Counter[str] = collections.Counter()
            start = asyncio.Event()

            async def writer() -> None:
                await start.wait()
                for _ in range(500):
                    current = await users.GetUser(user_pb2.GetUserRequest(id=created.id))
                    update = user_pb2.User(
                        id=created.id,
                        display_name=str(int(current.display_name) + 1),
                        etag=current.etag,
                    )
                    try:
                        await users.UpdateUser(
                            user_pb2.UpdateUserRequest(
                                user=update,
                                update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
                            ),
                            timeout=30,
                        )
                        codes["OK"] += 1
                        return
                    except grpc.aio.AioRpcError as error:
                        codes[error.code().name] += 1
                        if error.code() is grpc.StatusCode.ABORTED:
                            reasons[rich(error).reason or ""] += 1
                        if error.code() is not grpc.StatusCode.ABORTED:
                            return
                raise AssertionError("a writer never won in 500 tries")

            tasks = [asyncio.create_task(writer()) for _ in range(WRITERS)]
            started = time.monotonic()
            start.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 240)
            elapsed = time.monotonic() - started
            final = await users.GetUser(user_pb2.GetUserRequest(id=created.id))
    counter = int(final.display_name)
    figure = (
        f"{WRITERS} writers in {elapsed:.1f}s: counter {counter} of {WRITERS} (lost updates "
        f"{WRITERS - counter}), {codes['ABORTED']} losers ABORTED, other codes "
        f"{ {k: v for k, v in codes.items() if k not in ('OK', 'ABORTED')} }"
    )
    ok = (
        counter == WRITERS and set(codes) <= {"OK", "ABORTED"} and set(reasons) <= {"ETAG_MISMATCH"}
    )
    figures.record(
        "etags",
        f"{WRITERS} concurrent read-increment-UpdateUser(etag) loops on one user, retrying "
        "on ABORTED, against `serve`",
        figure,
        passed=ok,
    )
    assert set(codes) <= {"OK", "ABORTED"}, codes
    assert codes["OK"] == WRITERS
    assert counter == WRITERS
    assert set(reasons) <= {"ETAG_MISMATCH"}, reasons


async def test_deadlock_prone_batches_are_never_internal(
    database: str, log_dir: Path, figures: Figures
) -> None:
    """Two BatchCreateUsers with the same two usernames in opposite order, concurrently,
    100 times (10 pairs at a time): one wins or both clash, never INTERNAL."""
    codes: collections.Counter[str] = collections.Counter()
    async with served(database, log_dir, db_pool_size="20", db_max_overflow="10") as server:  # noqa: SIM117
        async with grpc.aio.insecure_channel(server.target) as channel:
            users, _ = stubs(channel)

            def batch(names: list[str]) -> user_pb2.BatchCreateUsersRequest:
                return user_pb2.BatchCreateUsersRequest(
                    requests=[
                        user_pb2.CreateUserRequest(
                            user=user_pb2.User(username=n, email=f"{n}@e.com")
                        )
                        for n in names
                    ]
                )

            async def one(call: object) -> None:
                try:
                    await call  # type: ignore[misc]
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as error:
                    codes[error.code().name] += 1

            async def pair() -> None:
                # The two shared usernames at either end, FILLER fresh ones between, so
                # each statement holds its first index entry while it inserts the rest.
                a, b = (f"dl{uuid.uuid4().hex[:10]}" for _ in range(2))
                fill = [[f"df{uuid.uuid4().hex[:12]}" for _ in range(FILLER)] for _ in range(2)]
                await asyncio.gather(
                    one(users.BatchCreateUsers(batch([a, *fill[0], b]), timeout=30)),
                    one(users.BatchCreateUsers(batch([b, *fill[1], a]), timeout=30)),
                )

            started = time.monotonic()
            for _ in range(PAIRS // 10):
                await asyncio.wait_for(asyncio.gather(*(pair() for _ in range(10))), 120)
            elapsed = time.monotonic() - started
    figures.record(
        "deadlock",
        f"{PAIRS} pairs of BatchCreateUsers [a, {FILLER} fresh, b] and [b, {FILLER} fresh, a] "
        "at once, 10 pairs at a time",
        f"{PAIRS} pairs in {elapsed:.0f}s: INTERNAL {codes['INTERNAL']}; codes {dict(codes)}",
        passed=codes["INTERNAL"] == 0,
    )
    assert codes["INTERNAL"] == 0, codes
    assert set(codes) <= {"OK", "ALREADY_EXISTS", "ABORTED"}, codes
