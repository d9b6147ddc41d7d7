"""At least 10,000 generated hostile requests over every method: never INTERNAL,
UNKNOWN or RESOURCE_EXHAUSTED; the server healthy and the data unchanged afterwards."""

from __future__ import annotations

import asyncio
import collections
import os
import time
from pathlib import Path

import grpc
from generators import FAR_ID, METHODS, requests
from harness import Figures, fetch, ready, served, stubs

from blog.v1 import post_pb2, user_pb2

COUNT = int(os.environ.get("FAULT_FUZZ_REQUESTS", "10000"))
WORKERS = 12
SEED = 8


async def snapshot(database: str, user_ids: list[int], post_ids: list[int]) -> list[object]:
    users = await fetch(database, "SELECT * FROM users WHERE id = ANY($1) ORDER BY id", user_ids)
    posts = await fetch(database, "SELECT * FROM posts WHERE id = ANY($1) ORDER BY id", post_ids)
    tags = await fetch(
        database, "SELECT * FROM post_tags WHERE post_id = ANY($1) ORDER BY 1, 2", post_ids
    )
    return [tuple(r) for r in users] + [tuple(r) for r in posts] + [tuple(r) for r in tags]


async def test_generated_hostile_requests(database: str, log_dir: Path, figures: Figures) -> None:
    async with served(database, log_dir, stream_max_concurrent="32") as server:
        async with grpc.aio.insecure_channel(server.target) as channel:
            users, posts = stubs(channel)
            seeded_users = []
            for i in range(5):
                seeded_users.append(
                    await users.CreateUser(
                        user_pb2.CreateUserRequest(
                            user=user_pb2.User(username=f"seed{i}", email=f"seed{i}@e.com")
                        )
                    )
                )
            seeded_posts = [
                await posts.CreatePost(
                    post_pb2.CreatePostRequest(
                        post=post_pb2.Post(author_id=u.id, title="seed", tags=["a", "b"])
                    )
                )
                for u in seeded_users
            ]
            user_ids = [u.id for u in seeded_users]
            post_ids = [p.id for p in seeded_posts]
            real_tokens = [
                (await users.ListUsers(user_pb2.ListUsersRequest(page_size=1))).next_page_token,
                (await posts.ListPosts(post_pb2.ListPostsRequest(page_size=1))).next_page_token,
            ]
            async for message in posts.StreamPosts(post_pb2.StreamPostsRequest()):
                real_tokens.append(message.resume_token)
            before = await snapshot(database, user_ids, post_ids)
            protected_users, protected_posts = set(user_ids), set(post_ids)

            def safe(method: str, data: bytes) -> bool:
                cls, _, writes = METHODS[method]
                if not writes:
                    return True
                try:
                    message = cls.FromString(data)
                except Exception:
                    return True
                name = method.rsplit("/", 1)[1]
                target = {
                    "UpdateUser": lambda m: ("u", m.user.id),
                    "DeleteUser": lambda m: ("u", m.id),
                    "UndeleteUser": lambda m: ("u", m.id),
                    "UpdatePost": lambda m: ("p", m.post.id),
                    "DeletePost": lambda m: ("p", m.id),
                }.get(name)
                if target is None:
                    return True
                kind, ident = target(message)
                return ident not in (protected_users if kind == "u" else protected_posts)

            codes: collections.Counter[str] = collections.Counter()
            bad: list[tuple[str, str, str]] = []
            queue = iter(requests(SEED, COUNT, real_tokens, safe))

            async def one(method: str, streaming: bool, data: bytes) -> None:
                try:
                    if streaming:
                        call = channel.unary_stream(
                            method, request_serializer=None, response_deserializer=None
                        )(data, timeout=30)
                        async for _ in call:
                            pass
                    else:
                        await channel.unary_unary(
                            method, request_serializer=None, response_deserializer=None
                        )(data, timeout=30)
                    code = "OK"
                except grpc.aio.AioRpcError as error:
                    code = error.code().name
                    if code in ("INTERNAL", "UNKNOWN", "RESOURCE_EXHAUSTED"):
                        bad.append((method, code, (error.details() or "")[:200]))
                codes[code] += 1

            async def worker() -> None:
                for method, streaming, data in queue:
                    await one(method, streaming, data)

            started = time.monotonic()
            await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(WORKERS))), 400)
            elapsed = time.monotonic() - started
            healthy = await ready(channel) and await ready(channel, "")
            await users.GetUser(user_pb2.GetUserRequest(id=user_ids[0]))
        after = await snapshot(database, user_ids, post_ids)
    total = sum(codes.values())
    figure = (
        f"{total} requests over {len(METHODS)} methods in {elapsed:.0f}s: INTERNAL "
        f"{codes['INTERNAL']}, UNKNOWN {codes['UNKNOWN']}, RESOURCE_EXHAUSTED "
        f"{codes['RESOURCE_EXHAUSTED']}; healthy after: {healthy}; seeded rows unchanged: "
        f"{before == after}; codes {dict(sorted(codes.items()))}"
    )
    ok = not bad and healthy and before == after and total >= COUNT
    figures.record(
        "fuzz",
        f"seeded random generators (tests/faults/generators.py, seed {SEED}): random and "
        "mutated bytes, invalid UTF-8, boundary values, hostile filters, forged tokens of "
        "every shape, huge violation lists; writes aimed at ids like "
        f"{FAR_ID} so seeded rows must stay as they were",
        figure,
        passed=ok,
    )
    assert not bad, bad[:20]
    assert healthy
    assert before == after
    assert total >= COUNT
