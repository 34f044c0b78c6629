"""api_tokens and idempotency_keys: the HTTP API's bearer tokens and its replayable writes.

``api_tokens`` holds one row per named token: its role (viewer, operator, admin), the SHA-256
of the token (the token itself is never stored; `keyturn tokens create` prints it once) and
when it was revoked. ``idempotency_keys`` holds the first response to each ``Idempotency-Key``
a token sent with a write, with a fingerprint of the request (method, path, body), so a retry
replays the response and a different request under the same key is refused.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, *, nullable: bool) -> sa.Column[sa.DateTime]:
    # timestamptz on PostgreSQL; naive UTC on SQLite (the store's UTCDateTime converts).
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "api_tokens",
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("role", sa.String(), nullable=False),
        sa.Column("token_hash", sa.String(), nullable=False),
        _ts("created_at", nullable=False),
        sa.Column("created_by", sa.String(), nullable=False),
        _ts("revoked_at", nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_tokens_token_hash")),
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("token_name", sa.String(), nullable=False),
        sa.Column("key", sa.String(), nullable=False),
        sa.Column("fingerprint", sa.String(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("response", sa.JSON(), nullable=True),
        _ts("created_at", nullable=False),
        sa.PrimaryKeyConstraint("token_name", "key", name=op.f("pk_idempotency_keys")),
    )


def downgrade() -> None:
    op.drop_table("idempotency_keys")
    op.drop_table("api_tokens")
