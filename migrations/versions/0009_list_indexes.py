"""Indexes for listing rotations at scale: newest first by (created_at, id), all of them and
the unfinished ones alone (the list's filters and its cursor are in the store's query).

Revision ID: 0009
Revises: 0007 (renumbered at the merge after 0008)
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_rotations_created_at_id", "rotations", ["created_at", "id"])
    op.create_index(
        "ix_rotations_unfinished_created_at_id",
        "rotations",
        ["created_at", "id"],
        sqlite_where=sa.text("finished_at IS NULL"),
        postgresql_where=sa.text("finished_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_rotations_unfinished_created_at_id", table_name="rotations")
    op.drop_index("ix_rotations_created_at_id", table_name="rotations")
