"""The database schema, declared once (SQLAlchemy Core tables: no ORM, which a command that
only reads would otherwise pay for at start-up).

The Alembic revisions in ``migrations/versions`` must produce exactly this schema; a test compares
them (``tests/integration/test_migrations.py``). Every datetime is timezone-aware UTC at the port:
PostgreSQL stores ``timestamptz``, SQLite stores naive UTC and :class:`UTCDateTime` makes it aware
again on the way out.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    text,
)
from sqlalchemy.types import TypeDecorator

#: Deterministic constraint names, so migrations and models agree on them on every dialect.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out; naive UTC on SQLite, ``timestamptz`` on PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(
                f"naive datetime {value.isoformat()} given to the store; pass an aware UTC datetime"
            )
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


metadata = MetaData(naming_convention=NAMING_CONVENTION)

#: Sealed secret material. Only ciphertext, never plaintext; ciphertext is NULL once purged.
secrets_t = Table(
    "secrets",
    metadata,
    Column("id", String(), primary_key=True),
    Column("purpose", String(), nullable=False),
    Column("master_key_id", String(), nullable=False),
    Column("nonce", LargeBinary(), nullable=False),
    Column("ciphertext", LargeBinary(), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("purge_after", UTCDateTime(), nullable=True),
    Column("purged_at", UTCDateTime(), nullable=True),
)

#: A managed credential: which provider credential it is and where its secret lives.
credentials_t = Table(
    "credentials",
    metadata,
    Column("name", String(), primary_key=True),
    Column("kind", String(), nullable=False),
    Column("provider", String(), nullable=False),
    Column("credential_id", String(), nullable=False),
    Column("credential_uuid", String(), nullable=False),
    Column("key_ref", String(), ForeignKey("secrets.id"), nullable=True),
    Column("algorithm", String(), nullable=False),
    Column("token_ref", String(), ForeignKey("secrets.id"), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
)

#: One rotation of one managed credential; `version` is the compare-and-set fencing token.
rotations_t = Table(
    "rotations",
    metadata,
    Column("id", String(), primary_key=True),
    Column("credential", String(), ForeignKey("credentials.name"), nullable=False),
    Column("kind", String(), nullable=False),
    Column("state", String(), nullable=False),
    Column("version", Integer(), nullable=False),
    Column("reason", String(), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    Column("next_attempt_at", UTCDateTime(), nullable=True),
    Column("lease_owner", String(), nullable=True),
    Column("lease_expires_at", UTCDateTime(), nullable=True),
    # Set by each claim (revision 0005): when the lease was taken, and the owner whose lease
    # (expired, never released) it took over.
    Column("lease_taken_at", UTCDateTime(), nullable=True),
    Column("lease_taken_from", String(), nullable=True),
    Column("attempts", Integer(), nullable=False),
    Column("last_error", String(), nullable=True),
    Column("halted_reason", String(), nullable=True),
    Column("paused", Boolean(), nullable=False),
    Column("request_action", String(), nullable=True),
    Column("request_actor", String(), nullable=True),
    Column("request_reason", String(), nullable=True),
    Column("request_at", UTCDateTime(), nullable=True),
    Column("rollback_from", String(), nullable=True),
    Column("finished_at", UTCDateTime(), nullable=True),
    # The wait the rotation is in (added by revision 0004); while waiting, next_attempt_at is
    # the next check time, so the claim needs nothing else.
    Column("wait_key", String(), nullable=True),
    Column("wait_for", String(), nullable=True),
    Column("wait_since", UTCDateTime(), nullable=True),
    Column("wait_deadline", UTCDateTime(), nullable=True),
    Column("data", JSON(), nullable=False),
    # The campaign that started it (revision 0010), set once at creation.
    Column("campaign", String(), nullable=True),
    Index("ix_rotations_campaign", "campaign"),
    # At most one unfinished rotation per credential, enforced by the database.
    Index(
        "uq_rotations_unfinished_credential",
        "credential",
        unique=True,
        sqlite_where=text("finished_at IS NULL"),
        postgresql_where=text("finished_at IS NULL"),
    ),
    # Serves the claim query: only unfinished rotations, in the claim's order.
    Index(
        "ix_rotations_due",
        "next_attempt_at",
        "created_at",
        "id",
        sqlite_where=text("finished_at IS NULL"),
        postgresql_where=text("finished_at IS NULL"),
    ),
    # Serves list_rotations(credential=...) and latest_rotation, newest first.
    Index("ix_rotations_credential_created_at", "credential", "created_at"),
    # Serve the API's and the CLI's list (revision 0009): every rotation newest first, paged
    # by (created_at, id); and the unfinished ones alone (attention, most statuses), which
    # are few next to the finished history.
    Index("ix_rotations_created_at_id", "created_at", "id"),
    Index(
        "ix_rotations_unfinished_created_at_id",
        "created_at",
        "id",
        sqlite_where=text("finished_at IS NULL"),
        postgresql_where=text("finished_at IS NULL"),
    ),
)

#: The append-only history of a rotation. The store never updates or deletes events.
events_t = Table(
    "events",
    metadata,
    Column("id", Integer(), primary_key=True, autoincrement=True),
    Column("rotation_id", String(), ForeignKey("rotations.id"), index=True, nullable=False),
    Column("at", UTCDateTime(), nullable=False),
    Column("kind", String(), nullable=False),
    Column("actor", String(), nullable=False),
    Column("from_state", String(), nullable=True),
    Column("to_state", String(), nullable=True),
    Column("trigger", String(), nullable=True),
    Column("reason", String(), nullable=True),
    Column("detail", JSON(), nullable=False),
)

#: The write-ahead record of one external action: intent first, then its outcome.
actions_t = Table(
    "actions",
    metadata,
    Column("rotation_id", String(), ForeignKey("rotations.id"), primary_key=True),
    Column("phase", String(), primary_key=True),
    Column("name", String(), primary_key=True),
    # Order in which the intents of one rotation were first recorded (0, 1, ...).
    Column("seq", Integer(), nullable=False),
    Column("idempotency_key", String(), unique=True, nullable=False),
    Column("status", String(), nullable=False),
    Column("intent_at", UTCDateTime(), nullable=False),
    Column("outcome_at", UTCDateTime(), nullable=True),
    Column("attempts", Integer(), nullable=False),
    Column("detail", JSON(), nullable=False),
    Column("error", String(), nullable=True),
)

#: A worker process: registered at its start, heartbeat while it runs, stopped_at on a
#: clean stop (revision 0005). Rows of long-silent workers are pruned; none blocks anything.
workers_t = Table(
    "workers",
    metadata,
    Column("owner", String(), primary_key=True),
    Column("host", String(), nullable=False),
    Column("pid", Integer(), nullable=False),
    Column("started_at", UTCDateTime(), nullable=False),
    Column("heartbeat_at", UTCDateTime(), nullable=False),
    Column("stopped_at", UTCDateTime(), nullable=True),
    Column("concurrency", Integer(), nullable=False),
    Column("heartbeat_seconds", Double(), nullable=False),
    Column("lease_seconds", Double(), nullable=False),
)

#: One schedule slot of a credential (revision 0006): the next one ``scheduled`` (at most one
#: per credential), then ``fired`` (with the rotation it created, in the same transaction),
#: ``skipped`` or ``superseded``. (credential, slot) is the at-most-once key.
slots_t = Table(
    "schedule_slots",
    metadata,
    Column("credential", String(), ForeignKey("credentials.name"), primary_key=True),
    # The nominal slot (UTC), before jitter, windows, freezes and stagger.
    Column("slot", UTCDateTime(), primary_key=True),
    # When it fires (on the schedule's clock).
    Column("due_at", UTCDateTime(), nullable=False),
    Column("status", String(), nullable=False),
    # Of the policy that computed it; a worker whose config gives another does not fire it.
    Column("fingerprint", String(), nullable=False),
    Column("policy", String(), nullable=False),
    Column("grp", String(), nullable=True),
    Column("why", String(), nullable=False),
    Column("note", String(), nullable=True),
    Column("rotation_id", String(), nullable=True),
    Column("planned_by", String(), nullable=False),
    # The credential row's updated_at when the slot was planned (its key then): a slot whose
    # credential got another key since (a rotation by hand) is planned anew, not fired.
    Column("key_recorded_at", UTCDateTime(), nullable=True),
    # When that key was created on the schedule's clock, as first seen (a test clock that
    # jumps later does not move it).
    Column("key_created", UTCDateTime(), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("fired_at", UTCDateTime(), nullable=True),
    # at most one scheduled slot per credential
    Index(
        "uq_schedule_slots_scheduled_credential",
        "credential",
        unique=True,
        sqlite_where=text("status = 'scheduled'"),
        postgresql_where=text("status = 'scheduled'"),
    ),
    # the tick: the next due slots, in order
    Index(
        "ix_schedule_slots_due",
        "due_at",
        sqlite_where=text("status = 'scheduled'"),
        postgresql_where=text("status = 'scheduled'"),
    ),
    # a group's starts (stagger)
    Index("ix_schedule_slots_grp_due_at", "grp", "due_at"),
)

#: Tests only (revision 0006): the schedule's clock shared by every process on the database:
#: schedule time = anchor_schedule + (database time - anchor_real) * scale.
schedule_clock_t = Table(
    "schedule_clock",
    metadata,
    Column("id", Integer(), primary_key=True),
    Column("anchor_real", UTCDateTime(), nullable=False),
    Column("anchor_schedule", UTCDateTime(), nullable=False),
    Column("scale", Double(), nullable=False),
)

#: Bearer tokens of the HTTP API (revision 0007): only the SHA-256 of a token is stored; the
#: token itself is shown once, by `keyturn tokens create`. A revoked token keeps its row (and
#: its name) for the audit trail.
api_tokens_t = Table(
    "api_tokens",
    metadata,
    Column("name", String(), primary_key=True),
    Column("role", String(), nullable=False),
    Column("token_hash", String(), unique=True, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("created_by", String(), nullable=False),
    Column("revoked_at", UTCDateTime(), nullable=True),
)

#: The first response to each Idempotency-Key of an API write (revision 0007), per token:
#: the same key and body replay it; `status_code` is NULL while the first request runs.
idempotency_keys_t = Table(
    "idempotency_keys",
    metadata,
    Column("token_name", String(), primary_key=True),
    Column("key", String(), primary_key=True),
    Column("fingerprint", String(), nullable=False),
    Column("status_code", Integer(), nullable=True),
    Column("response", JSON(), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
)

#: The notification outbox (revision 0008): one row per notification, written in the same
#: transaction as the event that causes it (see keyturn.domain.notify). `fanned_out` turns
#: true once a delivering process has made its deliveries (one per configured sink whose
#: filter takes it). `key` makes a notification that must exist once (a lost holder) unique.
notifications_t = Table(
    "notifications",
    metadata,
    Column("id", Integer(), primary_key=True, autoincrement=True),
    Column("rotation_id", String(), ForeignKey("rotations.id"), nullable=False),
    Column("kind", String(), nullable=False),
    Column("key", String(), unique=True, nullable=True),
    Column("at", UTCDateTime(), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("payload", JSON(), nullable=False),
    Column("fanned_out", Boolean(), nullable=False),
    # the fan-out: notifications not fanned out yet, oldest first
    Index(
        "ix_notifications_unfanned",
        "id",
        sqlite_where=text("fanned_out = 0"),
        postgresql_where=text("fanned_out = false"),
    ),
    Index("ix_notifications_rotation_id_id", "rotation_id", "id"),
)

#: One notification to one sink (revision 0008). status: pending (to send, or retrying),
#: firing (an Alertmanager alert re-sent every resend interval until its rotation resolves),
#: sent, resolved (a firing alert its rotation's end resolved), superseded (a firing alert a
#: newer one of the same rotation replaced), failed (a permanent refusal, or retries past the
#: bound). A process claims a row with `claimed_by` / `claimed_until` (a lease).
notification_deliveries_t = Table(
    "notification_deliveries",
    metadata,
    Column("id", Integer(), primary_key=True, autoincrement=True),
    Column("notification_id", Integer(), ForeignKey("notifications.id"), nullable=False),
    Column("sink", String(), nullable=False),
    Column("rotation_id", String(), nullable=False),
    Column("kind", String(), nullable=False),
    Column("status", String(), nullable=False),
    Column("attempts", Integer(), nullable=False),
    Column("next_attempt_at", UTCDateTime(), nullable=True),
    Column("claimed_by", String(), nullable=True),
    Column("claimed_until", UTCDateTime(), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("first_attempt_at", UTCDateTime(), nullable=True),
    Column("last_attempt_at", UTCDateTime(), nullable=True),
    Column("sent_at", UTCDateTime(), nullable=True),
    Column("last_status_code", Integer(), nullable=True),
    Column("last_error", String(), nullable=True),
    UniqueConstraint("notification_id", "sink"),
    # the claim: due rows, oldest first
    Index(
        "ix_notification_deliveries_due",
        "next_attempt_at",
        sqlite_where=text("status IN ('pending', 'firing')"),
        postgresql_where=text("status IN ('pending', 'firing')"),
    ),
    # the claim's ordering guard: the other deliveries of one rotation to one sink
    Index(
        "ix_notification_deliveries_rotation_id_sink",
        "rotation_id",
        "sink",
        "notification_id",
    ),
)

#: Every attempt to send a delivery (revision 0008): when, its outcome and HTTP status, the
#: error with every sink secret redacted.
notification_attempts_t = Table(
    "notification_attempts",
    metadata,
    Column("id", Integer(), primary_key=True, autoincrement=True),
    Column(
        "delivery_id",
        Integer(),
        ForeignKey("notification_deliveries.id"),
        index=True,
        nullable=False,
    ),
    Column("at", UTCDateTime(), nullable=False),
    Column("owner", String(), nullable=False),
    Column("outcome", String(), nullable=False),
    Column("status_code", Integer(), nullable=True),
    Column("error", String(), nullable=True),
    Column("duration_ms", Integer(), nullable=False),
)
