"""A rotation's campaign: many rotations started together and followed as one (a column set
once at creation, indexed for a campaign's progress).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("rotations", sa.Column("campaign", sa.String(), nullable=True))
    op.create_index("ix_rotations_campaign", "rotations", ["campaign"])


def downgrade() -> None:
    # the index first: SQLite's native DROP COLUMN refuses a column an index uses
    op.drop_index("ix_rotations_campaign", table_name="rotations")
    op.drop_column("rotations", "campaign")
