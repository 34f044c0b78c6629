"""rotations: the wait a rotation is in (wait_key, wait_for, wait_since, wait_deadline).

A step that must wait (for a holder, a bake time, an approval, a person) records which wait it is
(``wait_key``, stable across claims), what it waits for in words (``wait_for``), since when and
until when; it then releases its lease, and ``next_attempt_at`` is its next check time, so the
claim and its index ``ix_rotations_due`` need no change. All four columns are nullable: a
rotation that is not waiting has none, and existing rows are not waiting.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("wait_key", "wait_for", "wait_since", "wait_deadline")


def _ts(name: str) -> sa.Column[sa.DateTime]:
    # timestamptz on PostgreSQL; naive UTC on SQLite (the store's UTCDateTime converts).
    return sa.Column(name, sa.DateTime(timezone=True), nullable=True)


def upgrade() -> None:
    # A nullable column without a default: a catalogue change only, on both databases (no
    # table rewrite, no copy of the table on SQLite).
    op.add_column("rotations", sa.Column("wait_key", sa.String(), nullable=True))
    op.add_column("rotations", sa.Column("wait_for", sa.String(), nullable=True))
    op.add_column("rotations", _ts("wait_since"))
    op.add_column("rotations", _ts("wait_deadline"))


def downgrade() -> None:
    # ALTER TABLE ... DROP COLUMN (SQLite 3.35+ has it natively; these columns are in no index
    # or constraint, so it needs no table copy either).
    for name in reversed(COLUMNS):
        op.drop_column("rotations", name)
