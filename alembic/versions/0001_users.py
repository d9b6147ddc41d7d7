"""users, idempotency records and token keys

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op
from service.db.types import BigIntId, UTCDateTime

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LIVE = sa.text("delete_time IS NULL")


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", BigIntId, autoincrement=True, nullable=False),
        sa.Column("username", sa.String(32), nullable=False),
        sa.Column("email", sa.String(254), nullable=False),
        sa.Column("email_normalized", sa.String(254), nullable=False),
        sa.Column("display_name", sa.String(100), nullable=False),
        sa.Column("bio", sa.Text(), nullable=False),
        sa.Column("create_time", UTCDateTime(), nullable=False),
        sa.Column("update_time", UTCDateTime(), nullable=False),
        sa.Column("delete_time", UTCDateTime(), nullable=True),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_users"),
    )
    # Username first: PostgreSQL checks unique indexes in creation order, so a row
    # that clashes on both reports USERNAME_TAKEN as the contract says.
    op.create_index(
        "uq_users_username_live",
        "users",
        ["username"],
        unique=True,
        postgresql_where=LIVE,
        sqlite_where=LIVE,
    )
    op.create_index(
        "uq_users_email_normalized_live",
        "users",
        ["email_normalized"],
        unique=True,
        postgresql_where=LIVE,
        sqlite_where=LIVE,
    )
    op.create_index("ix_users_create_time_id", "users", ["create_time", "id"])
    op.create_index("ix_users_username_id", "users", ["username", "id"])

    op.create_table(
        "idempotency_records",
        sa.Column("caller", sa.String(200), nullable=False),
        sa.Column("method", sa.String(100), nullable=False),
        sa.Column("request_id", sa.String(36), nullable=False),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("resource_id", sa.BigInteger(), nullable=False),
        sa.Column("create_time", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("caller", "method", "request_id", name="pk_idempotency_records"),
    )
    op.create_index("ix_idempotency_records_create_time", "idempotency_records", ["create_time"])

    op.create_table(
        "token_keys",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("secret", sa.LargeBinary(), nullable=False),
        sa.Column("create_time", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_token_keys"),
    )


def downgrade() -> None:
    op.drop_table("token_keys")
    op.drop_index("ix_idempotency_records_create_time", table_name="idempotency_records")
    op.drop_table("idempotency_records")
    op.drop_index("ix_users_username_id", table_name="users")
    op.drop_index("ix_users_create_time_id", table_name="users")
    op.drop_index("uq_users_email_normalized_live", table_name="users")
    op.drop_index("uq_users_username_live", table_name="users")
    op.drop_table("users")
