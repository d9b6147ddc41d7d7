"""Rows to messages, and etags to versions and back. Users are read by attribute, so
Core rows, driver records and new users all work; posts by position (`add_post`).

Messages are built in place: `add_*` take a constructor, either the message class
(for a single response) or a repeated field's `add` (for pages and stream batches),
and set timestamps field by field. Building each Post and Timestamp on its own and
copying it into a response costs about 2.5 times as much per row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from blog.v1 import post_pb2, user_pb2

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NO_TAGS: tuple[str, ...] = ()
# Field tags, lengths and numbers of a message besides its strings (a generous guess).
_FIXED_BYTES = 96

UserFactory = Callable[..., user_pb2.User]
PostFactory = Callable[..., post_pb2.Post]


def etag_of(version: int) -> str:
    """The etag of a row at a version. Opaque to callers; changes on every write."""
    return f"v{version}"


def version_of(etag: str) -> int:
    """The version an etag names; -1 (matches nothing) when it is not one of ours."""
    digits = etag[1:]
    if etag.startswith("v") and digits.isascii() and digits.isdigit() and len(digits) < 19:
        return int(digits)
    return -1


def set_timestamp(target: Timestamp, value: datetime) -> None:
    delta = value - _EPOCH
    target.seconds = delta.days * 86400 + delta.seconds
    target.nanos = delta.microseconds * 1000


def add_user(make: UserFactory, row: Any, post_count: int = 0) -> tuple[user_pb2.User, int]:
    """Build a user with `make`, and say about how many bytes it serializes to."""
    display_name = row.display_name
    bio = row.bio
    user = make(
        id=row.id,
        username=row.username,
        email=row.email,
        display_name=display_name,
        bio=bio,
        etag=etag_of(row.version),
        post_count=post_count,
    )
    set_timestamp(user.create_time, row.create_time)
    set_timestamp(user.update_time, row.update_time)
    if row.delete_time is not None:
        set_timestamp(user.delete_time, row.delete_time)
    return user, _user_bytes(row.username, row.email, display_name, bio)


def _user_bytes(username: str, email: str, display_name: str, bio: str) -> int:
    """About how many bytes a user serializes to (an overestimate)."""
    return (
        _FIXED_BYTES
        + len(username)
        + len(email)
        + (len(display_name) if display_name.isascii() else len(display_name.encode()))
        + (len(bio) if bio.isascii() else len(bio.encode()))
    )


def to_user_message(row: Any, *, post_count: int = 0) -> user_pb2.User:
    return add_user(user_pb2.User, row, post_count)[0]


def add_post(
    make: PostFactory, row: Any, tags: Sequence[str] = _NO_TAGS, *, full: bool
) -> tuple[post_pb2.Post, int]:
    """Build a post with `make`, and say about how many bytes it serializes to.

    `row` is read by position, in the order repositories.posts.POST_FIELDS, then for
    FULL its AUTHOR_FIELDS (tests/unit/test_convert.py pins the two together): reading a
    Core row by index costs about a fifth of reading it by name, and a stream builds a
    thousand posts a batch."""
    post_id, author_id, title, body, created, updated, version = row[:7]
    post = make(
        id=post_id,
        author_id=author_id,
        title=title,
        body=body,
        tags=tags,
        etag=etag_of(version),
    )
    set_timestamp(post.create_time, created)
    set_timestamp(post.update_time, updated)
    size = (
        _FIXED_BYTES
        + (len(title) if title.isascii() else len(title.encode()))
        + (len(body) if body.isascii() else len(body.encode()))
        + 2 * len(tags)
        + sum(map(len, tags))
    )
    if full:
        username, email, display_name, bio, a_created, a_updated, a_deleted, a_version = row[7:15]
        author = post.author
        author.id = author_id
        author.username = username
        author.email = email
        author.display_name = display_name
        author.bio = bio
        author.etag = etag_of(a_version)
        set_timestamp(author.create_time, a_created)
        set_timestamp(author.update_time, a_updated)
        if a_deleted is not None:
            set_timestamp(author.delete_time, a_deleted)
        size += _user_bytes(username, email, display_name, bio)
    return post, size


def to_post_message(row: Any, tags: Sequence[str], *, full: bool) -> post_pb2.Post:
    return add_post(post_pb2.Post, row, tags, full=full)[0]
