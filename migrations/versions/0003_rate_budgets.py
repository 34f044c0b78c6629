"""rate_budgets: one row per provider, the request budget shared by every worker process.

Each request reserves its slot with one ``UPDATE rate_budgets ... RETURNING`` on the database's
clock (GCRA: ``tat`` is the theoretical arrival time of the next request); a 429 stores a pause
for everyone in the same row (``paused_until``, backoff ``penalty``). Times are seconds since the
epoch. The table is declared in ``keyturn.adapters.store.budget`` (not in the store's models).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _seconds(name: str) -> sa.Column[float]:
    return sa.Column(name, sa.Double(), nullable=False, server_default=sa.text("0"))


def upgrade() -> None:
    op.create_table(
        "rate_budgets",
        sa.Column("provider", sa.String(), nullable=False),
        _seconds("tat"),
        _seconds("paused_until"),
        _seconds("penalty"),
        sa.Column("granted", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        sa.Column("rate_limited", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        sa.PrimaryKeyConstraint("provider", name=op.f("pk_rate_budgets")),
    )


def downgrade() -> None:
    op.drop_table("rate_budgets")
