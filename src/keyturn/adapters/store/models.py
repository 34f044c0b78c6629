"""The database schema, declared once (SQLAlchemy 2 typed declarative).

The Alembic revisions in ``migrations/versions`` must produce exactly this schema; a test compares
them (``tests/integration/test_migrations.py``). Every datetime is timezone-aware UTC at the port:
PostgreSQL stores ``timestamptz``, SQLite stores naive UTC and :class:`UTCDateTime` makes it aware
again on the way out.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Dialect,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
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


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        bytes: LargeBinary(),
        str: String(),
    }


class SecretRow(Base):
    """Sealed secret material. Only ciphertext, never plaintext; ciphertext is NULL once purged."""

    __tablename__ = "secrets"

    id: Mapped[str] = mapped_column(primary_key=True)
    purpose: Mapped[str]
    master_key_id: Mapped[str]
    nonce: Mapped[bytes]
    ciphertext: Mapped[bytes | None]
    created_at: Mapped[datetime]
    purge_after: Mapped[datetime | None]
    purged_at: Mapped[datetime | None]


class CredentialRow(Base):
    """A managed credential: which provider credential it is and where its secret lives."""

    __tablename__ = "credentials"

    name: Mapped[str] = mapped_column(primary_key=True)
    kind: Mapped[str]
    provider: Mapped[str]
    credential_id: Mapped[str]
    credential_uuid: Mapped[str]
    key_ref: Mapped[str | None] = mapped_column(ForeignKey("secrets.id"))
    algorithm: Mapped[str]
    token_ref: Mapped[str | None] = mapped_column(ForeignKey("secrets.id"))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class RotationRow(Base):
    """One rotation of one managed credential; `version` is the compare-and-set fencing token."""

    __tablename__ = "rotations"

    id: Mapped[str] = mapped_column(primary_key=True)
    credential: Mapped[str] = mapped_column(ForeignKey("credentials.name"))
    kind: Mapped[str]
    state: Mapped[str]
    version: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    next_attempt_at: Mapped[datetime | None]
    lease_owner: Mapped[str | None]
    lease_expires_at: Mapped[datetime | None]
    #: Set by each claim (revision 0005): when the lease was taken, and the owner whose lease
    #: (expired, never released) it took over.
    lease_taken_at: Mapped[datetime | None]
    lease_taken_from: Mapped[str | None]
    attempts: Mapped[int] = mapped_column(Integer)
    last_error: Mapped[str | None]
    halted_reason: Mapped[str | None]
    paused: Mapped[bool] = mapped_column(Boolean)
    request_action: Mapped[str | None]
    request_actor: Mapped[str | None]
    request_reason: Mapped[str | None]
    request_at: Mapped[datetime | None]
    rollback_from: Mapped[str | None]
    finished_at: Mapped[datetime | None]
    #: The wait the rotation is in (added by revision 0004); while waiting, next_attempt_at is
    #: the next check time, so the claim needs nothing else.
    wait_key: Mapped[str | None]
    wait_for: Mapped[str | None]
    wait_since: Mapped[datetime | None]
    wait_deadline: Mapped[datetime | None]
    data: Mapped[dict[str, Any]]

    __table_args__ = (
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
    )


class EventRow(Base):
    """The append-only history of a rotation. The store never updates or deletes events."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rotation_id: Mapped[str] = mapped_column(ForeignKey("rotations.id"), index=True)
    at: Mapped[datetime]
    kind: Mapped[str]
    actor: Mapped[str]
    from_state: Mapped[str | None]
    to_state: Mapped[str | None]
    trigger: Mapped[str | None]
    reason: Mapped[str | None]
    detail: Mapped[dict[str, Any]]


class ActionRow(Base):
    """The write-ahead record of one external action: intent first, then its outcome."""

    __tablename__ = "actions"

    rotation_id: Mapped[str] = mapped_column(ForeignKey("rotations.id"), primary_key=True)
    phase: Mapped[str] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(primary_key=True)
    #: Order in which the intents of one rotation were first recorded (0, 1, ...).
    seq: Mapped[int] = mapped_column(Integer)
    idempotency_key: Mapped[str] = mapped_column(unique=True)
    status: Mapped[str]
    intent_at: Mapped[datetime]
    outcome_at: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(Integer)
    detail: Mapped[dict[str, Any]]
    error: Mapped[str | None]


class WorkerRow(Base):
    """A worker process: registered at its start, heartbeat while it runs, stopped_at on a
    clean stop (revision 0005). Rows of long-silent workers are pruned; none blocks anything."""

    __tablename__ = "workers"

    owner: Mapped[str] = mapped_column(primary_key=True)
    host: Mapped[str]
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime]
    heartbeat_at: Mapped[datetime]
    stopped_at: Mapped[datetime | None]
    concurrency: Mapped[int] = mapped_column(Integer)
    heartbeat_seconds: Mapped[float] = mapped_column(Double)
    lease_seconds: Mapped[float] = mapped_column(Double)


class SlotRow(Base):
    """One schedule slot of a credential (revision 0006): the next one ``scheduled`` (at most
    one per credential), then ``fired`` (with the rotation it created, in the same
    transaction), ``skipped`` or ``superseded``. (credential, slot) is the at-most-once key."""

    __tablename__ = "schedule_slots"

    credential: Mapped[str] = mapped_column(ForeignKey("credentials.name"), primary_key=True)
    #: The nominal slot (UTC), before jitter, windows, freezes and stagger.
    slot: Mapped[datetime] = mapped_column(primary_key=True)
    #: When it fires (on the schedule's clock).
    due_at: Mapped[datetime]
    status: Mapped[str]
    #: Of the policy that computed it; a worker whose config gives another does not fire it.
    fingerprint: Mapped[str]
    policy: Mapped[str]
    grp: Mapped[str | None]
    why: Mapped[str]
    note: Mapped[str | None]
    rotation_id: Mapped[str | None]
    planned_by: Mapped[str]
    #: The credential row's updated_at when the slot was planned (its key then): a slot whose
    #: credential got another key since (a rotation by hand) is planned anew, not fired.
    key_recorded_at: Mapped[datetime | None]
    #: When that key was created on the schedule's clock, as first seen (a test clock that
    #: jumps later does not move it).
    key_created: Mapped[datetime | None]
    created_at: Mapped[datetime]
    fired_at: Mapped[datetime | None]

    __table_args__ = (
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
        # a group's planned starts (stagger)
        Index("ix_schedule_slots_grp_due_at", "grp", "due_at"),
    )


class ScheduleClockRow(Base):
    """Tests only (revision 0006): the schedule's clock shared by every process on the database:
    schedule time = anchor_schedule + (database time - anchor_real) * scale."""

    __tablename__ = "schedule_clock"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    anchor_real: Mapped[datetime]
    anchor_schedule: Mapped[datetime]
    scale: Mapped[float] = mapped_column(Double)


metadata = Base.metadata
