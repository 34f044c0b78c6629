"""schedule_slots: the scheduler's slots; schedule_clock: the tests' shared schedule clock.

``schedule_slots`` holds, per credential, at most one ``scheduled`` slot (a partial unique
index) and the history of the fired, skipped and superseded ones. (credential, slot) is the
primary key: a slot is fired at most once, by the transaction that marks it fired and creates
its rotation. The tick reads the next due slots through ``ix_schedule_slots_due`` (partial, on
``due_at`` of scheduled slots only), so its cost follows what is due, not the fleet's size.

``schedule_clock`` is empty except in tests that drive the schedule on a shared clock.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, *, nullable: bool) -> sa.Column[sa.DateTime]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "schedule_slots",
        sa.Column("credential", sa.String(), nullable=False),
        _ts("slot", nullable=False),
        _ts("due_at", nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("fingerprint", sa.String(), nullable=False),
        sa.Column("policy", sa.String(), nullable=False),
        sa.Column("grp", sa.String(), nullable=True),
        sa.Column("why", sa.String(), nullable=False),
        sa.Column("note", sa.String(), nullable=True),
        sa.Column("rotation_id", sa.String(), nullable=True),
        sa.Column("planned_by", sa.String(), nullable=False),
        _ts("key_recorded_at", nullable=True),
        _ts("key_created", nullable=True),
        _ts("created_at", nullable=False),
        _ts("fired_at", nullable=True),
        sa.ForeignKeyConstraint(
            ["credential"],
            ["credentials.name"],
            name=op.f("fk_schedule_slots_credential_credentials"),
        ),
        sa.PrimaryKeyConstraint("credential", "slot", name=op.f("pk_schedule_slots")),
    )
    op.create_index(
        "uq_schedule_slots_scheduled_credential",
        "schedule_slots",
        ["credential"],
        unique=True,
        sqlite_where=sa.text("status = 'scheduled'"),
        postgresql_where=sa.text("status = 'scheduled'"),
    )
    op.create_index(
        "ix_schedule_slots_due",
        "schedule_slots",
        ["due_at"],
        sqlite_where=sa.text("status = 'scheduled'"),
        postgresql_where=sa.text("status = 'scheduled'"),
    )
    op.create_index("ix_schedule_slots_grp_due_at", "schedule_slots", ["grp", "due_at"])
    op.create_table(
        "schedule_clock",
        sa.Column("id", sa.Integer(), nullable=False),
        _ts("anchor_real", nullable=False),
        _ts("anchor_schedule", nullable=False),
        sa.Column("scale", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_schedule_clock")),
    )


def downgrade() -> None:
    op.drop_table("schedule_clock")
    op.drop_index("ix_schedule_slots_grp_due_at", table_name="schedule_slots")
    op.drop_index("ix_schedule_slots_due", table_name="schedule_slots")
    op.drop_index("uq_schedule_slots_scheduled_credential", table_name="schedule_slots")
    op.drop_table("schedule_slots")
