"""Rotation value objects. Plain data; the store persists them, the engine advances them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from enum import StrEnum
from typing import Any, TypeVar

from keyturn.domain.lifecycle import FINAL_STATES, State


class CredentialKind(StrEnum):
    """The names of the built-in kinds (a kind is a plugin: any installed name is valid; the
    registry is the authority, this is shorthand for tests and data)."""

    SERVICE_ACCOUNT = "service_account"
    PAT = "pat"
    WEBHOOK = "webhook"
    PASSKEY = "passkey"


class OperatorAction(StrEnum):
    RESUME = "resume"
    ROLLBACK = "rollback"
    CANCEL = "cancel"
    PAUSE = "pause"
    #: Give the approval a policy's gate waits for (``approval``).
    APPROVE = "approve"
    #: Refuse it: before the old side is switched off the rotation rolls back (or is
    #: cancelled while nothing was done).
    DENY = "deny"
    #: Ask the lease holder to give its lease back at its next action boundary (admin only).
    #: It never shortens a lease: a silent holder's rotation is claimable when the lease it
    #: holds expires, and the next claimer records the request as carried out.
    RELEASE_LEASE = "release-lease"


class ActionStatus(StrEnum):
    INTENT = "intent"
    DONE = "done"
    FAILED = "failed"


class Phase(StrEnum):
    FORWARD = "forward"
    ROLLBACK = "rollback"


@dataclass(frozen=True)
class ManagedCredential:
    name: str
    kind: str
    provider: str
    credential_id: str
    credential_uuid: str
    key_ref: str | None
    algorithm: str
    token_ref: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True)
class OperatorRequest:
    action: OperatorAction
    actor: str
    reason: str
    at: datetime


@dataclass(frozen=True)
class Rotation:
    id: str
    credential: str
    kind: str
    state: State
    version: int
    reason: str
    created_at: datetime
    updated_at: datetime
    next_attempt_at: datetime | None = None
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None
    #: Set by the claim that took the lease (renewals keep it): when, and from whom when the
    #: claim took over an expired lease that was never released (None: the lease was free).
    lease_taken_at: datetime | None = None
    lease_taken_from: str | None = None
    attempts: int = 0
    last_error: str | None = None
    halted_reason: str | None = None
    paused: bool = False
    request: OperatorRequest | None = None
    rollback_from: State | None = None
    finished_at: datetime | None = None
    #: The wait the rotation is in, if any: which one (stable across claims, e.g.
    #: "forward.confirm_loaded"), what it waits for in words a human reads, since when and
    #: until when (aware UTC). While waiting, ``next_attempt_at`` is the next check time.
    wait_key: str | None = None
    wait_for: str | None = None
    wait_since: datetime | None = None
    wait_deadline: datetime | None = None
    #: Kind-specific context without secrets: old/new credential ids, key references, ...
    data: dict[str, Any] = field(default_factory=dict)
    #: The campaign that started it (many rotations started together, followed as one).
    campaign: str | None = None

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES


@dataclass(frozen=True)
class Event:
    rotation_id: str
    at: datetime
    kind: str  # "transition", "operator", "action", "run"
    actor: str
    from_state: str | None = None
    to_state: str | None = None
    trigger: str | None = None
    reason: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    id: int | None = None


@dataclass(frozen=True)
class ActionRecord:
    rotation_id: str
    phase: Phase
    name: str
    idempotency_key: str
    status: ActionStatus
    intent_at: datetime
    outcome_at: datetime | None = None
    attempts: int = 1
    detail: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class WorkerRecord:
    """A worker process as it registered and last heartbeat (all datetimes aware UTC).

    ``owner`` is the lease owner string the worker claims with; it heartbeats every
    ``heartbeat_seconds`` and takes leases of ``lease_seconds``; ``stopped_at`` is set by a
    clean stop only (a killed worker just stops heartbeating)."""

    owner: str
    host: str
    pid: int
    started_at: datetime
    heartbeat_at: datetime
    concurrency: int
    heartbeat_seconds: float
    lease_seconds: float
    stopped_at: datetime | None = None

    def stale_after(self) -> float:
        """Seconds without a heartbeat after which the worker is taken for dead."""
        return 2 * self.heartbeat_seconds

    def silent_for(self, now: datetime) -> float:
        return max(0.0, (now - self.heartbeat_at).total_seconds())

    def status(self, now: datetime) -> str:
        """``live``, ``stale`` (no heartbeat for two intervals: dead or cut off) or
        ``stopped`` (a clean stop)."""
        if self.stopped_at is not None:
            return "stopped"
        return "stale" if self.silent_for(now) > self.stale_after() else "live"


@dataclass(frozen=True)
class SealedSecret:
    """Ciphertext of a secret, bound to its id and purpose; never the plaintext."""

    id: str
    purpose: str
    master_key_id: str
    nonce: bytes
    ciphertext: bytes
    created_at: datetime | None = None
    purge_after: datetime | None = None
    purged_at: datetime | None = None


_FIELDS: dict[type, frozenset[str]] = {}
T = TypeVar("T")


def evolve(obj: T, changes: Mapping[str, Any]) -> T:
    """``dataclasses.replace`` for keyturn's frozen records, several times faster (the engine
    does it for every write it holds): copy the attributes, then set the changed ones. The
    records have no ``__post_init__``, so nothing is skipped; unknown names are refused."""
    cls = type(obj)
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = frozenset(f.name for f in fields(cls))  # type: ignore[arg-type]
    unknown = changes.keys() - names
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {', '.join(sorted(unknown))}")
    new = object.__new__(cls)
    new.__dict__.update(obj.__dict__)
    new.__dict__.update(changes)
    return new


@dataclass(frozen=True)
class Slot:
    """A credential's schedule slot: ``slot`` is the nominal time (the at-most-once key),
    ``due_at`` when it fires, on the schedule's clock. ``status``: scheduled, fired, skipped,
    superseded. ``fingerprint`` is of the policy that computed it."""

    credential: str
    slot: datetime
    due_at: datetime
    fingerprint: str
    policy: str
    group: str | None
    why: str
    status: str = "scheduled"
    note: str | None = None
    rotation_id: str | None = None
    planned_by: str = ""
    #: The credential's updated_at (its key) the slot was planned from.
    key_recorded_at: datetime | None = None
    #: When that key was created, on the schedule's clock.
    key_created: datetime | None = None
    created_at: datetime | None = None
    fired_at: datetime | None = None


class Role(StrEnum):
    """What an API token may do: read (viewer), read and act on rotations (operator), and
    everything, token management included (admin)."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    def allows(self, needed: Role) -> bool:
        order = (Role.VIEWER, Role.OPERATOR, Role.ADMIN)
        return order.index(self) >= order.index(needed)


@dataclass(frozen=True)
class ApiToken:
    """A bearer token of the HTTP API, as stored: its name, role and the SHA-256 (hex) of the
    token, never the token."""

    name: str
    role: Role
    token_hash: str = field(repr=False)
    created_at: datetime | None = None
    created_by: str = ""
    revoked_at: datetime | None = None


@dataclass(frozen=True)
class IdempotencyRecord:
    """The first response to an Idempotency-Key of one token; `status_code` None while the
    first request is still being carried out."""

    token_name: str
    key: str
    fingerprint: str
    created_at: datetime
    status_code: int | None = None
    response: dict[str, Any] | None = None
