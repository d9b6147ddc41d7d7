"""One client process of the write-load promise: CreateUser, CreatePost, UpdateUser and
BatchCreateUsers, every call with a request_id (where the method has one), for
`--seconds`; each failed call is retried with the same request_id until it succeeds.
Prints one JSON line per acknowledged write and a summary line at the end.

Usage: python write_load.py TARGET SECONDS CLIENT_ID
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys
import time
import uuid

import grpc
from google.protobuf import field_mask_pb2

from blog.v1 import post_pb2, post_pb2_grpc, user_pb2, user_pb2_grpc

RETRYABLE = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED"}
RETRY_FOR = 60.0  # seconds a failed call keeps being retried after the load ends


async def main(target: str, seconds: float, client: str) -> None:
    codes: collections.Counter[str] = collections.Counter()
    retry_outcomes: collections.Counter[str] = collections.Counter()
    out = sys.stdout

    def ack(**record: object) -> None:
        out.write(json.dumps(record) + "\n")
        out.flush()

    async with grpc.aio.insecure_channel(target) as channel:
        users = user_pb2_grpc.UserServiceStub(channel)
        posts = post_pb2_grpc.PostServiceStub(channel)
        end = time.monotonic() + seconds

        async def call(make: object, first: bool = True) -> object:
            """Call until OK (retrying with the same request); codes counted."""
            give_up = end + RETRY_FOR
            attempt = 0
            while True:
                attempt += 1
                try:
                    result = await make(timeout=5)  # type: ignore[operator]
                    codes["OK"] += 1
                    if attempt > 1:
                        retry_outcomes["OK after retry"] += 1
                    return result
                except grpc.aio.AioRpcError as error:
                    code = error.code().name
                    codes[code] += 1
                    if code not in RETRYABLE:
                        if attempt > 1:
                            retry_outcomes[f"{code} after retry"] += 1
                        return error
                    if time.monotonic() > give_up:
                        return error
                    await asyncio.sleep(min(0.05 * attempt, 0.5))

        mine: list[int] = []
        n = 0
        while time.monotonic() < end:
            n += 1
            name = f"w{client}_{n}_{uuid.uuid4().hex[:6]}"
            step = n % 4
            if step == 1 or not mine:
                request = user_pb2.CreateUserRequest(
                    user=user_pb2.User(username=name, email=f"{name}@e.com"),
                    request_id=str(uuid.uuid4()),
                )
                result = await call(lambda timeout, r=request: users.CreateUser(r, timeout=timeout))
                if isinstance(result, user_pb2.User):
                    mine.append(result.id)
                    ack(op="CreateUser", id=result.id, username=name)
            elif step == 2:
                title = f"t {name}"
                request_p = post_pb2.CreatePostRequest(
                    post=post_pb2.Post(author_id=mine[-1], title=title, tags=["load"]),
                    request_id=str(uuid.uuid4()),
                )
                result = await call(
                    lambda timeout, r=request_p: posts.CreatePost(r, timeout=timeout)
                )
                if isinstance(result, post_pb2.Post):
                    ack(op="CreatePost", id=result.id, title=title)
            elif step == 3:
                target_id = mine[n % len(mine)]
                value = f"v{n}"
                request_u = user_pb2.UpdateUserRequest(
                    user=user_pb2.User(id=target_id, display_name=value),
                    update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
                )
                result = await call(
                    lambda timeout, r=request_u: users.UpdateUser(r, timeout=timeout)
                )
                if isinstance(result, user_pb2.User):
                    ack(op="UpdateUser", id=target_id, value=value, seq=n)
            else:
                names = [f"{name}_{i}" for i in range(5)]
                request_b = user_pb2.BatchCreateUsersRequest(
                    requests=[
                        user_pb2.CreateUserRequest(
                            user=user_pb2.User(username=u, email=f"{u}@e.com")
                        )
                        for u in names
                    ],
                    request_id=str(uuid.uuid4()),
                )
                result = await call(
                    lambda timeout, r=request_b: users.BatchCreateUsers(r, timeout=timeout)
                )
                if isinstance(result, user_pb2.BatchCreateUsersResponse):
                    ack(op="BatchCreateUsers", ids=[u.id for u in result.users], usernames=names)
                elif isinstance(result, grpc.aio.AioRpcError):
                    # A batch that never succeeded within the retry window: all of its
                    # users or none may be stored (the test checks which).
                    ack(op="BatchAmbiguous", usernames=names, code=result.code().name)
    ack(op="summary", codes=dict(codes), retries=dict(retry_outcomes))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2]), sys.argv[3]))
