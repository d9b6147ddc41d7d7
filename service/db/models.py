"""Declarative models: the schema Alembic migrates to, with typed columns."""

from __future__ import annotations

from datetime import datetime
from typing import cast

from sqlalchemy import (
    BigInteger,
    ForeignKey,
    Index,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from service.db.types import BigIntId, UTCDateTime

# Stable constraint names: errors are mapped by them and migrations stay reproducible.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

LIVE = text("delete_time IS NULL")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    # Stored lower-cased (ASCII), so it is its own case-folded copy.
    username: Mapped[str] = mapped_column(String(32))
    email: Mapped[str] = mapped_column(String(254))
    # Folded in Python: SQLite's lower() folds ASCII only and its errors name columns.
    email_normalized: Mapped[str] = mapped_column(String(254))
    display_name: Mapped[str] = mapped_column(String(100), default="")
    bio: Mapped[str] = mapped_column(Text, default="")
    create_time: Mapped[datetime] = mapped_column(UTCDateTime)
    update_time: Mapped[datetime] = mapped_column(UTCDateTime)
    delete_time: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Bumped by every write; the etag is derived from it (clocks repeat, counters do not).
    version: Mapped[int] = mapped_column(BigInteger, default=1)

    posts: Mapped[list[Post]] = relationship(back_populates="author", lazy="raise")

    __table_args__ = (
        # Unique among live users only; the username index is created first so a row
        # clashing on both reports the username (PostgreSQL checks indexes in OID order).
        Index(
            "uq_users_username_live",
            "username",
            unique=True,
            postgresql_where=LIVE,
            sqlite_where=LIVE,
        ),
        Index(
            "uq_users_email_normalized_live",
            "email_normalized",
            unique=True,
            postgresql_where=LIVE,
            sqlite_where=LIVE,
        ),
        Index("ix_users_create_time_id", "create_time", "id"),
        Index("ix_users_username_id", "username", "id"),
    )


class Post(Base):
    __tablename__ = "posts"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    author_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("users.id", ondelete="CASCADE"))
    title: Mapped[str] = mapped_column(String(200))
    body: Mapped[str] = mapped_column(Text, default="")
    create_time: Mapped[datetime] = mapped_column(UTCDateTime)
    update_time: Mapped[datetime] = mapped_column(UTCDateTime)
    version: Mapped[int] = mapped_column(BigInteger, default=1)

    author: Mapped[User] = relationship(back_populates="posts", lazy="raise")
    tags: Mapped[list[Tag]] = relationship(secondary="post_tags", lazy="raise")

    __table_args__ = (
        Index("ix_posts_create_time_id", "create_time", "id"),
        Index("ix_posts_author_id_create_time_id", "author_id", "create_time", "id"),
        Index("ix_posts_title_id", "title", "id"),
    )


class Tag(Base):
    __tablename__ = "tags"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(32), unique=True)


class PostTag(Base):
    __tablename__ = "post_tags"

    post_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("posts.id", ondelete="CASCADE"), primary_key=True
    )
    tag_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("tags.id", ondelete="RESTRICT"), primary_key=True
    )

    __table_args__ = (Index("ix_post_tags_tag_id_post_id", "tag_id", "post_id"),)


class IdempotencyRecord(Base):
    """The first response of a create with a request_id (AIP-155), kept for the TTL."""

    __tablename__ = "idempotency_records"

    caller: Mapped[str] = mapped_column(String(200), primary_key=True)
    method: Mapped[str] = mapped_column(String(100), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[int] = mapped_column(BigInteger)
    create_time: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    # The first response, serialized, replayed byte for byte (revision 0003). NULL only
    # in records the previous release wrote, which replay by `resource_id`.
    response: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)


class TokenKey(Base):
    """HMAC keys for page and resume tokens, shared by every process on the database."""

    __tablename__ = "token_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    secret: Mapped[bytes] = mapped_column(LargeBinary)
    create_time: Mapped[datetime] = mapped_column(UTCDateTime)


# The tables themselves, for reads: a select of Table columns runs through SQLAlchemy
# Core even inside a Session (no ORM loading step per row), which the hot read paths
# (pages and streams) want.
users_table = cast(Table, User.__table__)
posts_table = cast(Table, Post.__table__)
tags_table = cast(Table, Tag.__table__)
post_tags_table = cast(Table, PostTag.__table__)
