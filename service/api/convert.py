"""Rows to messages. Plain attribute access, so ORM objects and Core rows both work."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from blog.v1 import post_pb2, user_pb2
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


def to_post_message(row: Any, tags: list[str], *, full: bool) -> post_pb2.Post:
    post = post_pb2.Post(
        id=row.id,
        author_id=row.author_id,
        title=row.title,
        body=row.body,
        tags=tags,
        create_time=timestamp(row.create_time),
        update_time=timestamp(row.update_time),
        etag=etag_of(row.version),
    )
    if full:
        author = post.author
        author.id = row.author_id
        author.username = row.author_username
        author.email = row.author_email
        author.display_name = row.author_display_name
        author.bio = row.author_bio
        author.create_time.CopyFrom(timestamp(row.author_create_time))
        author.update_time.CopyFrom(timestamp(row.author_update_time))
        if row.author_delete_time is not None:
            author.delete_time.CopyFrom(timestamp(row.author_delete_time))
        author.etag = etag_of(row.author_version)
    return post
