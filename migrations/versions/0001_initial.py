"""Initial schema: secrets, credentials, rotations, events, actions.

Revision ID: 0001
Revises:
Create Date: 2026-01-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNFINISHED = "finished_at IS NULL"


def _ts(name: str, nullable: bool) -> sa.Column[sa.DateTime]:
    # timestamptz on PostgreSQL; naive UTC on SQLite (the store's UTCDateTime converts).
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "secrets",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("purpose", sa.String(), nullable=False),
        sa.Column("master_key_id", sa.String(), nullable=False),
        sa.Column("nonce", sa.LargeBinary(), nullable=False),
        sa.Column("ciphertext", sa.LargeBinary(), nullable=True),
        _ts("created_at", nullable=False),
        _ts("purge_after", nullable=True),
        _ts("purged_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_secrets")),
    )
    op.create_table(
        "credentials",
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("provider", sa.String(), nullable=False),
        sa.Column("credential_id", sa.String(), nullable=False),
        sa.Column("credential_uuid", sa.String(), nullable=False),
        sa.Column("key_ref", sa.String(), nullable=True),
        sa.Column("algorithm", sa.String(), nullable=False),
        sa.Column("token_ref", sa.String(), nullable=True),
        _ts("created_at", nullable=False),
        _ts("updated_at", nullable=False),
        sa.ForeignKeyConstraint(
            ["key_ref"], ["secrets.id"], name=op.f("fk_credentials_key_ref_secrets")
        ),
        sa.ForeignKeyConstraint(
            ["token_ref"], ["secrets.id"], name=op.f("fk_credentials_token_ref_secrets")
        ),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_credentials")),
    )
    op.create_table(
        "rotations",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("credential", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("reason", sa.String(), nullable=False),
        _ts("created_at", nullable=False),
        _ts("updated_at", nullable=False),
        _ts("next_attempt_at", nullable=True),
        sa.Column("lease_owner", sa.String(), nullable=True),
        _ts("lease_expires_at", nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.String(), nullable=True),
        sa.Column("halted_reason", sa.String(), nullable=True),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("request_action", sa.String(), nullable=True),
        sa.Column("request_actor", sa.String(), nullable=True),
        sa.Column("request_reason", sa.String(), nullable=True),
        _ts("request_at", nullable=True),
        sa.Column("rollback_from", sa.String(), nullable=True),
        _ts("finished_at", nullable=True),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["credential"], ["credentials.name"], name=op.f("fk_rotations_credential_credentials")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rotations")),
    )
    # At most one unfinished rotation per credential, enforced by the database.
    op.create_index(
        "uq_rotations_unfinished_credential",
        "rotations",
        ["credential"],
        unique=True,
        sqlite_where=sa.text(UNFINISHED),
        postgresql_where=sa.text(UNFINISHED),
    )
    # Serves the claim query (its WHERE and its ORDER BY).
    op.create_index(
        "ix_rotations_due",
        "rotations",
        ["next_attempt_at", "created_at", "id"],
        unique=False,
        sqlite_where=sa.text(UNFINISHED),
        postgresql_where=sa.text(UNFINISHED),
    )
    op.create_index(
        "ix_rotations_credential_created_at",
        "rotations",
        ["credential", "created_at"],
        unique=False,
    )
    op.create_table(
        "actions",
        sa.Column("rotation_id", sa.String(), nullable=False),
        sa.Column("phase", sa.String(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("idempotency_key", sa.String(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        _ts("intent_at", nullable=False),
        _ts("outcome_at", nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("error", sa.String(), nullable=True),
        sa.ForeignKeyConstraint(
            ["rotation_id"], ["rotations.id"], name=op.f("fk_actions_rotation_id_rotations")
        ),
        sa.PrimaryKeyConstraint("rotation_id", "phase", "name", name=op.f("pk_actions")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_actions_idempotency_key")),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("rotation_id", sa.String(), nullable=False),
        _ts("at", nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("actor", sa.String(), nullable=False),
        sa.Column("from_state", sa.String(), nullable=True),
        sa.Column("to_state", sa.String(), nullable=True),
        sa.Column("trigger", sa.String(), nullable=True),
        sa.Column("reason", sa.String(), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["rotation_id"], ["rotations.id"], name=op.f("fk_events_rotation_id_rotations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    op.create_index("ix_events_rotation_id", "events", ["rotation_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_events_rotation_id", table_name="events")
    op.drop_table("events")
    op.drop_table("actions")
    op.drop_index("ix_rotations_credential_created_at", table_name="rotations")
    op.drop_index("ix_rotations_due", table_name="rotations")
    op.drop_index("uq_rotations_unfinished_credential", table_name="rotations")
    op.drop_table("rotations")
    op.drop_table("credentials")
    op.drop_table("secrets")
