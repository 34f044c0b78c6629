"""rotations: autovacuum and fillfactor settings that keep the claim fast as dead tuples pile up.

Every transition rewrites a rotation row; one that changes next_attempt_at (or finishes it) also
leaves a dead entry at the head of the partial claim index ix_rotations_due, which each claim
walks until VACUUM removes it. PostgreSQL's defaults vacuum a table only after 20% of it is dead,
which on a large, mostly finished rotations table is a very long time. These settings vacuum and
analyze it after 1% (+1,000 rows) and 2% of changes, and leave 20% of every page free so the many
updates that touch no indexed column (lease claims and renewals, action records' rotation data)
stay heap-only (HOT) and add no index entries at all.

Storage parameters only: PostgreSQL only, a no-op on SQLite, and not part of the schema the
models declare (compare_metadata does not see them).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SETTINGS = {
    "autovacuum_vacuum_scale_factor": "0.01",
    "autovacuum_vacuum_threshold": "1000",
    "autovacuum_analyze_scale_factor": "0.02",
    "fillfactor": "80",
}


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    options = ", ".join(f"{name} = {value}" for name, value in SETTINGS.items())
    op.execute(f"ALTER TABLE rotations SET ({options})")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(f"ALTER TABLE rotations RESET ({', '.join(SETTINGS)})")
