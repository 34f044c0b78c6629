"""workers: liveness of worker processes; rotations: when and from whom a lease was taken.

A worker registers at its start (one row per lease owner string, ``host:pid:rand``), heartbeats
every ``heartbeat_seconds`` with one ``UPDATE workers SET heartbeat_at``, and sets
``stopped_at`` on a clean stop; a killed worker simply stops heartbeating. Rows are only read by
the CLI (``keyturn workers``, ``rotations show``) and pruned after a day of silence: no claim or
commit reads them, so a stale row never blocks anything.

``rotations.lease_taken_at`` and ``lease_taken_from`` are set by each claim: when the lease was
taken, and the owner whose expired, never-released lease it took over (NULL when the lease was
free). Both nullable without a default: a catalogue change only, existing rows hold no lease
history.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, *, nullable: bool) -> sa.Column[sa.DateTime]:
    # timestamptz on PostgreSQL; naive UTC on SQLite (the store's UTCDateTime converts).
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.add_column("rotations", _ts("lease_taken_at", nullable=True))
    op.add_column("rotations", sa.Column("lease_taken_from", sa.String(), nullable=True))
    op.create_table(
        "workers",
        sa.Column("owner", sa.String(), nullable=False),
        sa.Column("host", sa.String(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        _ts("started_at", nullable=False),
        _ts("heartbeat_at", nullable=False),
        _ts("stopped_at", nullable=True),
        sa.Column("concurrency", sa.Integer(), nullable=False),
        sa.Column("heartbeat_seconds", sa.Double(), nullable=False),
        sa.Column("lease_seconds", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("owner", name=op.f("pk_workers")),
    )


def downgrade() -> None:
    op.drop_table("workers")
    op.drop_column("rotations", "lease_taken_from")
    op.drop_column("rotations", "lease_taken_at")
