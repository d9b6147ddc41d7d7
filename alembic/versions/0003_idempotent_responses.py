"""idempotency_records.response: the first response of an idempotent create

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24

Expand only: a nullable column, so the previous release keeps working on this schema
(it neither reads nor writes the column; the records it writes replay by resource_id).
Adding a nullable column without a default is a catalog change on PostgreSQL (no table
rewrite) and an ALTER TABLE ADD COLUMN on SQLite.
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("idempotency_records", sa.Column("response", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("idempotency_records") as batch:
        batch.drop_column("response")
