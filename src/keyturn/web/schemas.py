"""The API's response and request bodies (pydantic): what /openapi.json describes. Built from
the CLI's own renderings (keyturn.cli.render, keyturn.cli.liveness, keyturn.cli.workers), so
the API and `--json` say the same. None of them has a field for key material or a token."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from keyturn.engine.attention import STATUSES

#: The one-word statuses (keyturn.engine.attention.STATUSES), as a type OpenAPI can enumerate.
StatusName = Literal[
    "halted",
    "paused",
    "requested",
    "awaiting_approval",
    "waiting",
    "running",
    "retrying",
    "due",
    "done",
]
if get_args(StatusName) != STATUSES:  # pragma: no cover - caught by any test that imports this
    raise RuntimeError("keyturn.web.schemas.StatusName differs from attention.STATUSES")


class Problem(BaseModel):
    """Every error: one line saying what is wrong and what to do."""

    detail: str


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ready"]
    revision: str


class Request(BaseModel):
    action: str
    actor: str
    reason: str
    at: datetime


class LeaseBrief(BaseModel):
    owner: str
    expires_at: datetime | None


class Holder(BaseModel):
    status: str = Field(description="live, stale, stopped or unknown (no worker row)")
    host: str | None
    pid: int | None
    last_heartbeat_at: datetime | None
    heartbeat_seconds: float | None
    stopped_at: datetime | None


class LeaseDetail(BaseModel):
    owner: str
    expires_at: datetime | None
    expired: bool
    taken_at: datetime | None
    taken_over_from: str | None
    renewed_at: datetime | None
    holder: Holder
    holder_not_seen_seconds: int | None
    heartbeat_age_seconds: float | None = Field(
        description="seconds since the holder's last heartbeat (None: no worker row)"
    )


class _RotationCore(BaseModel):
    id: str
    credential: str
    kind: str
    state: str
    status: str = Field(description="one word: what ?status= filters on")
    status_text: str
    attention: str | None = Field(description="why it needs a human now; None when it does not")
    revision: str = Field(
        description="what If-Match names (changes with state, status, halt and request only)"
    )
    version: int
    reason: str
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    next_attempt_at: datetime | None
    attempts: int
    last_error: str | None
    halted_reason: str | None
    paused: bool
    request: Request | None
    rollback_from: str | None
    wait_key: str | None
    wait_for: str | None
    wait_since: datetime | None
    wait_deadline: datetime | None
    campaign: str | None = Field(default=None, description="the campaign that started it")
    identities: dict[str, str | None] = Field(
        description="the old and new side's provider ids, as the rotation's kind names them"
    )


class RotationSummary(_RotationCore):
    lease: LeaseBrief | None


class RotationPage(BaseModel):
    items: list[RotationSummary]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; None: last")


class Attempt(BaseModel):
    n: int
    max: int
    next_attempt_at: datetime | None = Field(
        description="None when nothing comes next: waiting, halted, paused or finished"
    )


class Wait(BaseModel):
    reason: str
    key: str | None
    since: datetime | None
    deadline: datetime | None
    next_check_at: datetime | None


class ActionOut(BaseModel):
    phase: str
    name: str
    status: str
    attempts: int
    intent_at: datetime
    outcome_at: datetime | None
    error: str | None


class EventOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    at: datetime
    kind: str
    actor: str
    from_: str | None = Field(alias="from")
    to: str | None
    trigger: str | None
    reason: str | None
    detail: dict[str, Any]


class RotationDetail(_RotationCore):
    lease: LeaseDetail | None
    attempt: Attempt
    wait: Wait | None
    actions: list[ActionOut]
    timeline: list[EventOut]


class PlannedCall(BaseModel):
    what: str
    method: str | None
    path: str | None
    signed: bool
    name: str | None
    op: str | None
    repeat: bool
    note: str | None
    provider_requests: list[str] = Field(description="the provider requests it sends, in order")
    text: str


class PlannedAction(BaseModel):
    step: str
    phase: str
    name: str
    calls: list[PlannedCall]


class RollbackPlan(BaseModel):
    rotation: str
    state: str
    actions: list[PlannedAction]


class RotationBrief(BaseModel):
    id: str
    state: str
    status: str
    created_at: datetime
    finished_at: datetime | None


class Configured(BaseModel):
    """A deploy target or probe of the credential's configuration (its settings, which may
    name paths and URLs, stay in the config)."""

    type: str
    name: str


class CredentialOut(BaseModel):
    name: str
    kind: str
    provider: str
    credential_id: str
    credential_uuid: str
    algorithm: str
    updated_at: datetime | None
    key_created_at: datetime | None = Field(description="when its current key was recorded")
    key_age_seconds: float | None = Field(
        description="the current key's age (on the schedule's clock, as policies count it)"
    )
    last_rotation: str | None = Field(description="its latest rotation's id")
    last_rotation_state: str | None
    last_rotation_at: datetime | None = Field(description="when its latest rotation started")
    latest_rotation: RotationBrief | None
    last_completed_at: datetime | None = Field(
        description="when its latest rotation that reached old_deactivated finished"
    )
    next_rotation_at: datetime | None = Field(
        description="when its policy starts the next rotation (None: no policy schedules it)"
    )
    policy: str | None = Field(description="the policy it follows (None: rotated by hand)")
    targets: list[Configured]
    probes: list[Configured]


class PlanCall(BaseModel):
    what: str
    text: str
    provider_requests: list[str]
    repeat: bool


class PlanAction(BaseModel):
    step: str
    name: str
    irreversible: bool
    calls: list[PlanCall]


class PlannedRotation(BaseModel):
    credential: str
    policy: str | None
    at: datetime = Field(description="when it would start")
    slot: datetime | None = Field(description="the nominal slot, before jitter and windows")
    why: str
    notes: list[str]
    key_age_seconds: float | None = Field(description="the key's age when it starts")
    deactivate_not_before: datetime | None
    gates: list[str]
    actions: list[PlanAction] = Field(description="the external calls, in order")


class Plan(BaseModel):
    """As `keyturn plan --json`."""

    now: datetime = Field(description="the schedule's clock now")
    rotations: list[PlannedRotation]
    notes: list[str] = Field(description="why a credential is not scheduled, one line each")


class WorkerOut(BaseModel):
    owner: str
    host: str | None
    pid: int | None
    started_at: datetime | None
    heartbeat_at: datetime | None
    heartbeat_age_seconds: float | None
    stopped_at: datetime | None
    status: str = Field(description="live, stale, stopped, or unregistered (holds leases only)")
    stale_after_seconds: float | None
    heartbeat_seconds: float | None
    lease_seconds: float | None
    concurrency: int | None
    rotations_held: int


class TokenOut(BaseModel):
    """A token's record; never the token or its hash."""

    name: str
    role: str
    created_at: datetime | None
    created_by: str
    revoked_at: datetime | None


class VerbBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=1000, description="why (recorded in the timeline)")


class VerbResult(BaseModel):
    rotation: str
    verb: str
    outcome: Literal["applied", "requested"]
    message: str
    state: str
    status: str
    revision: str
