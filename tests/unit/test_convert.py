"""convert.add_post reads post rows by position: the order it reads must be the order the
repository's statements give (repositories.posts.POST_FIELDS, then AUTHOR_FIELDS)."""

from __future__ import annotations

from datetime import UTC, datetime

from blog.v1 import post_pb2
from service.api.convert import add_post
from service.repositories.posts import AUTHOR_FIELDS, POST_FIELDS, WithBody

CREATED = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
UPDATED = datetime(2026, 2, 3, 4, 5, 6, 789012, tzinfo=UTC)
POST = {
    "id": 7,
    "author_id": 3,
    "title": "Título",
    "body": "body text",
    "create_time": CREATED,
    "update_time": UPDATED,
    "version": 4,
}
AUTHOR = {
    "author_username": "ann",
    "author_email": "ann@example.com",
    "author_display_name": "Ann",
    "author_bio": "bio",
    "author_create_time": CREATED,
    "author_update_time": UPDATED,
    "author_delete_time": None,
    "author_version": 9,
}


def _row(values: dict[str, object], fields: tuple[str, ...]) -> tuple[object, ...]:
    """A row as the repository's statements give it: the named fields in their order,
    then a column the statements add after them (body_bytes)."""
    return (*(values[name] for name in fields), 123)


def test_add_post_reads_the_repositorys_column_order() -> None:
    post, size = add_post(post_pb2.Post, _row(POST, POST_FIELDS), ["go", "sql"], full=False)
    assert (post.id, post.author_id, post.title, post.body) == (7, 3, "Título", "body text")
    assert post.create_time.ToDatetime(tzinfo=UTC) == CREATED
    assert post.update_time.ToDatetime(tzinfo=UTC) == UPDATED
    assert (post.etag, list(post.tags)) == ("v4", ["go", "sql"])
    assert not post.HasField("author")
    assert size >= post.ByteSize()


def test_add_post_full_reads_the_authors_columns_after_the_posts() -> None:
    row = _row({**POST, **AUTHOR}, POST_FIELDS + AUTHOR_FIELDS)
    post, size = add_post(post_pb2.Post, row, (), full=True)
    author = post.author
    assert (author.id, author.username, author.email) == (3, "ann", "ann@example.com")
    assert (author.display_name, author.bio, author.etag) == ("Ann", "bio", "v9")
    assert author.create_time.ToDatetime(tzinfo=UTC) == CREATED
    assert author.update_time.ToDatetime(tzinfo=UTC) == UPDATED
    assert not author.HasField("delete_time")
    assert size >= post.ByteSize()


def test_a_row_completed_with_its_withheld_body_reads_the_same_way() -> None:
    withheld = _row({**POST, "body": None}, POST_FIELDS)
    completed = WithBody(withheld, "a long body read afterwards")
    post, _ = add_post(post_pb2.Post, completed, (), full=False)
    assert (post.id, post.title, post.body) == (7, "Título", "a long body read afterwards")
    assert completed[-1] == 123
    assert len(completed) == len(withheld)
