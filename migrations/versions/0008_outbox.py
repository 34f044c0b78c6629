"""notifications, notification_deliveries, notification_attempts: the notification outbox.

``notifications`` gets one row per event that on-call is told about (halted, holder lost,
awaiting approval, waiting, completed, rolled back, cancelled), inserted by the same
transaction as the event. A delivering process (any worker, or `keyturn serve`, with sinks
configured) fans each one out into ``notification_deliveries`` (one per sink whose filter
takes it), claims due deliveries with a lease (``FOR UPDATE SKIP LOCKED`` on PostgreSQL),
sends them, and records every attempt in ``notification_attempts`` (outcome, HTTP status, the
error with sink secrets redacted). Nothing here holds a secret: payloads are built from events
and rotations, and sink URLs and keys stay in the configuration's environment variables and
files.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, *, nullable: bool) -> sa.Column[sa.DateTime]:
    # timestamptz on PostgreSQL; naive UTC on SQLite (the store's UTCDateTime converts).
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "notifications",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("rotation_id", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("key", sa.String(), nullable=True),
        _ts("at", nullable=False),
        _ts("created_at", nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("fanned_out", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["rotation_id"],
            ["rotations.id"],
            name=op.f("fk_notifications_rotation_id_rotations"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notifications")),
        sa.UniqueConstraint("key", name=op.f("uq_notifications_key")),
    )
    op.create_index(
        "ix_notifications_unfanned",
        "notifications",
        ["id"],
        sqlite_where=sa.text("fanned_out = 0"),
        postgresql_where=sa.text("fanned_out = false"),
    )
    op.create_index("ix_notifications_rotation_id_id", "notifications", ["rotation_id", "id"])
    op.create_table(
        "notification_deliveries",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("notification_id", sa.Integer(), nullable=False),
        sa.Column("sink", sa.String(), nullable=False),
        sa.Column("rotation_id", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        _ts("next_attempt_at", nullable=True),
        sa.Column("claimed_by", sa.String(), nullable=True),
        _ts("claimed_until", nullable=True),
        _ts("created_at", nullable=False),
        _ts("first_attempt_at", nullable=True),
        _ts("last_attempt_at", nullable=True),
        _ts("sent_at", nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.String(), nullable=True),
        sa.ForeignKeyConstraint(
            ["notification_id"],
            ["notifications.id"],
            name=op.f("fk_notification_deliveries_notification_id_notifications"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notification_deliveries")),
        sa.UniqueConstraint(
            "notification_id", "sink", name=op.f("uq_notification_deliveries_notification_id_sink")
        ),
    )
    op.create_index(
        "ix_notification_deliveries_due",
        "notification_deliveries",
        ["next_attempt_at"],
        sqlite_where=sa.text("status IN ('pending', 'firing')"),
        postgresql_where=sa.text("status IN ('pending', 'firing')"),
    )
    op.create_index(
        "ix_notification_deliveries_rotation_id_sink",
        "notification_deliveries",
        ["rotation_id", "sink", "notification_id"],
    )
    op.create_table(
        "notification_attempts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("delivery_id", sa.Integer(), nullable=False),
        _ts("at", nullable=False),
        sa.Column("owner", sa.String(), nullable=False),
        sa.Column("outcome", sa.String(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.String(), nullable=True),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            ["notification_deliveries.id"],
            name=op.f("fk_notification_attempts_delivery_id_notification_deliveries"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notification_attempts")),
    )
    op.create_index(
        "ix_notification_attempts_delivery_id", "notification_attempts", ["delivery_id"]
    )


def downgrade() -> None:
    op.drop_index("ix_notification_attempts_delivery_id", table_name="notification_attempts")
    op.drop_table("notification_attempts")
    op.drop_index(
        "ix_notification_deliveries_rotation_id_sink", table_name="notification_deliveries"
    )
    op.drop_index("ix_notification_deliveries_due", table_name="notification_deliveries")
    op.drop_table("notification_deliveries")
    op.drop_index("ix_notifications_rotation_id_id", table_name="notifications")
    op.drop_index("ix_notifications_unfanned", table_name="notifications")
    op.drop_table("notifications")
