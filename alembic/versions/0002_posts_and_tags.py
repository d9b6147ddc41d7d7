"""posts, tags and post_tags

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op
from service.db.types import BigIntId, UTCDateTime

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "posts",
        sa.Column("id", BigIntId, autoincrement=True, nullable=False),
        sa.Column("author_id", sa.BigInteger(), nullable=False),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("create_time", UTCDateTime(), nullable=False),
        sa.Column("update_time", UTCDateTime(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["author_id"], ["users.id"], name="fk_posts_author_id_users", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_posts"),
    )
    # A b-tree scans both ways: (create_time, id) serves "create_time desc, id desc".
    op.create_index("ix_posts_create_time_id", "posts", ["create_time", "id"])
    op.create_index(
        "ix_posts_author_id_create_time_id", "posts", ["author_id", "create_time", "id"]
    )
    op.create_index("ix_posts_title_id", "posts", ["title", "id"])

    op.create_table(
        "tags",
        sa.Column("id", BigIntId, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_tags"),
        sa.UniqueConstraint("name", name="uq_tags_name"),
    )
    op.create_table(
        "post_tags",
        sa.Column("post_id", sa.BigInteger(), nullable=False),
        sa.Column("tag_id", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["post_id"], ["posts.id"], name="fk_post_tags_post_id_posts", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["tag_id"], ["tags.id"], name="fk_post_tags_tag_id_tags", ondelete="RESTRICT"
        ),
        sa.PrimaryKeyConstraint("post_id", "tag_id", name="pk_post_tags"),
    )
    op.create_index("ix_post_tags_tag_id_post_id", "post_tags", ["tag_id", "post_id"])


def downgrade() -> None:
    op.drop_index("ix_post_tags_tag_id_post_id", table_name="post_tags")
    op.drop_table("post_tags")
    op.drop_table("tags")
    op.drop_index("ix_posts_title_id", table_name="posts")
    op.drop_index("ix_posts_author_id_create_time_id", table_name="posts")
    op.drop_index("ix_posts_create_time_id", table_name="posts")
    op.drop_table("posts")
