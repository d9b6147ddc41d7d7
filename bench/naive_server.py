"""The naive twin (f): GetUser the way a tutorial writes it.

A plain grpc.aio server on the default asyncio event loop, the generated
`add_UserServiceServicer_to_server` with its default (de)serializers, and a GetUser
that does `async with sessionmaker() as s: await s.get(User, id)` on a default
SQLAlchemy asyncpg engine (default pool, default options). It shares only the ORM
model with the service.

    python -m bench.naive_server --port P --database-url postgresql+asyncpg://...
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from bench.serving import serve_until_signalled
from blog.v1 import user_pb2, user_pb2_grpc
from service.db.models import User


def _timestamp(value: Any) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


class NaiveUserService(user_pb2_grpc.UserServiceServicer):
    def __init__(self, sessionmaker: async_sessionmaker[Any]) -> None:
        self.sessionmaker = sessionmaker

    async def GetUser(self, request: user_pb2.GetUserRequest, context: Any) -> user_pb2.User:
        async with self.sessionmaker() as session:
            user = await session.get(User, request.id)
        if user is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"user {request.id} not found")
        message = user_pb2.User(
            id=user.id,
            username=user.username,
            email=user.email,
            display_name=user.display_name,
            bio=user.bio,
            create_time=_timestamp(user.create_time),
            update_time=_timestamp(user.update_time),
            etag=f"v{user.version}",
        )
        if user.delete_time is not None:
            message.delete_time.CopyFrom(_timestamp(user.delete_time))
        return message


async def serve(port: int, database_url: str) -> None:
    engine = create_async_engine(database_url)
    server = grpc.aio.server()
    user_pb2_grpc.add_UserServiceServicer_to_server(
        NaiveUserService(async_sessionmaker(engine)),  # type: ignore[abstract]
        server,
    )
    try:
        await serve_until_signalled(server, port, ("blog.v1.UserService",))
    finally:
        await engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--database-url", required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.database_url))


if __name__ == "__main__":
    main()
