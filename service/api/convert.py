"""Rows to messages. Plain attribute access, so ORM objects and Core rows both work."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from blog.v1 import user_pb2
from service.repositories.users import etag_of

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp(value: datetime) -> Timestamp:
    delta = value - _EPOCH
    return Timestamp(seconds=delta.days * 86400 + delta.seconds, nanos=delta.microseconds * 1000)


def to_user_message(row: Any, *, post_count: int | None = None) -> user_pb2.User:
    user = user_pb2.User(
        id=row.id,
        username=row.username,
        email=row.email,
        display_name=row.display_name,
        bio=row.bio,
        create_time=timestamp(row.create_time),
        update_time=timestamp(row.update_time),
        etag=etag_of(row.version),
    )
    if row.delete_time is not None:
        user.delete_time.CopyFrom(timestamp(row.delete_time))
    if post_count is not None:
        user.post_count = post_count
    return user
