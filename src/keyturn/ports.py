"""The ports the engine needs. Adapters implement them; the CLI wires them together.

Store methods are synchronous (the engine runs them in a thread); provider methods are async.
Every datetime crossing a port is timezone-aware UTC.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol, runtime_checkable

from keyturn.domain.errors import KeyturnError
from keyturn.domain.lifecycle import State
from keyturn.domain.model import (
    ActionRecord,
    ApiToken,
    Event,
    IdempotencyRecord,
    ManagedCredential,
    OperatorRequest,
    Rotation,
    SealedSecret,
    Slot,
    WorkerRecord,
)

# --------------------------------------------------------------------------------------- store


@dataclass
class Change:
    """One atomic write: compare-and-set of a rotation on (id, expected_version), plus rows.

    The store applies all of it in one transaction or none of it, bumps the version by one, sets
    `updated_at`, and returns the new rotation; it raises :class:`StaleVersion` when the row's
    version is not `expected_version` (another writer won).
    """

    rotation_id: str
    expected_version: int
    #: Rotation fields to set, by attribute name of :class:`Rotation`: state, data,
    #: next_attempt_at, lease_owner, lease_expires_at, attempts, last_error, halted_reason,
    #: paused, request (None clears it), rollback_from, finished_at, wait_key, wait_for,
    #: wait_since, wait_deadline (a waiting rotation's next check is its next_attempt_at).
    updates: dict[str, Any] = field(default_factory=dict)
    events: Sequence[Event] = ()
    #: Upserted by (rotation_id, phase, name).
    action: ActionRecord | None = None
    #: Upserted before `action` (e.g. the outcome of the previous action, written together with
    #: the next one's intent); distinct (phase, name) from each other and from `action`.
    earlier_actions: Sequence[ActionRecord] = ()
    #: Inserted (new key material, sealed).
    secrets: Sequence[SealedSecret] = ()
    #: Replaces the managed credential row of the same name (e.g. now pointing at the new key).
    credential: ManagedCredential | None = None
    #: Secret id -> time after which the secret is purged (retention of an old key); None clears
    #: a scheduled purge (a rollback that makes an old key current again).
    purge_after: dict[str, datetime | None] = field(default_factory=dict)


@dataclass(frozen=True)
class RotationQuery:
    """What `rotations list` and ``GET /v1/rotations`` ask the store for, newest first
    (created_at, then id, both descending). The store narrows in its query; where its
    condition for `status` or `attention` is wider than the engine's definition
    (keyturn.engine.attention), the engine decides on the rows it returns, so the store's
    condition must never be narrower."""

    state: State | None = None
    credential: str | None = None
    kind: str | None = None
    #: Leased by this worker (its owner string).
    holder: str | None = None
    #: One of keyturn.engine.attention.STATUSES: rows that may have it.
    status: str | None = None
    #: Rows that may need attention at this time (see keyturn.engine.attention.attention).
    attention_at: datetime | None = None
    #: With attention_at: a request older than this needs attention (now - REQUEST_STALE).
    request_stale_before: datetime | None = None
    #: Updated at or after this.
    updated_since: datetime | None = None
    #: Keyset paging: only rows strictly older than (created_at, id).
    before: tuple[datetime, str] | None = None
    limit: int | None = None


class Store(Protocol):
    # managed credentials
    def add_credential(
        self, credential: ManagedCredential, secrets: Sequence[SealedSecret]
    ) -> None:
        """Insert a managed credential and its sealed material; KeyturnError if the name exists."""

    def get_credential(self, name: str) -> ManagedCredential:
        """The managed credential of that name; NotFound otherwise."""

    def list_credentials(self) -> list[ManagedCredential]: ...

    def get_credentials(self, names: Sequence[str]) -> dict[str, ManagedCredential]:
        """Those of `names` that exist, in one read (a worker's rotations share it)."""

    # rotations
    def create_rotation(self, rotation: Rotation, event: Event) -> Rotation:
        """Insert a new rotation (version 1) and its first event.

        AlreadyRotating when the credential has an unfinished rotation (enforced by a unique
        index in the database, not only by a check); NotFound for an unknown credential.
        """

    def get_rotation(self, rotation_id: str) -> Rotation: ...

    def list_rotations(
        self, *, state: State | None = None, credential: str | None = None
    ) -> list[Rotation]:
        """Newest first."""

    def find_rotations(self, query: RotationQuery) -> list[Rotation]:
        """Newest first, at most `query.limit`, narrowed by the query in the store (indexes:
        the first page of 100,000 rotations reads a page, not the table)."""

    def latest_rotation(self, credential: str) -> Rotation | None: ...

    def rotation_ids(self, prefix: str, *, limit: int = 2) -> list[str]:
        """Ids starting with `prefix` (at most `limit`, sorted): resolves a short id."""

    def has_pending_work(self, horizon: datetime) -> bool:
        """Is any unfinished rotation, not paused and not halted, due before `horizon` (or in
        flight at a worker)? Lets an --until-idle worker wait for retries and takeovers without
        reading the whole table."""

    def events(self, rotation_id: str) -> list[Event]:
        """Oldest first."""

    def actions(self, rotation_id: str) -> list[ActionRecord]:
        """In the order their intents were first recorded."""

    def actions_of(self, rotation_ids: Sequence[str]) -> dict[str, list[ActionRecord]]:
        """The action records of several rotations in one read (none: an empty list)."""

    def claim(
        self, *, owner: str, now: datetime, lease_until: datetime, limit: int
    ) -> list[Rotation]:
        """Lease up to `limit` due rotations to `owner` in one statement, bumping each version.

        Due: unfinished, and either carrying an operator request, or (not paused, not halted,
        next_attempt_at null or <= now); and not leased (lease_expires_at null or <= now).
        Each claimed rotation records ``lease_taken_at = now`` and ``lease_taken_from`` = the
        lease owner it had (None when its lease was released; another owner: a takeover).
        """

    def commit(self, change: Change) -> Rotation: ...

    def commit_many(self, changes: Sequence[Change]) -> list[Rotation | KeyturnError]:
        """Group commit: apply several changes (of different rotations) in as few transactions
        as possible, each exactly as :meth:`commit` would; per change, the new rotation or the
        error `commit` would have raised (StaleVersion, ...). StoreUnavailable is raised."""

    def request(
        self,
        rotation_id: str,
        request: OperatorRequest,
        event: Event,
        *,
        expected_version: int | None = None,
    ) -> Rotation:
        """Record an operator request and its event WITHOUT bumping the version (the lease
        holder must not be fenced out by it); make the rotation due now.

        With `expected_version` it is a compare-and-set on the rotation as read: written only
        while the row still has that version and no pending request (StaleVersion otherwise),
        so what the caller checked on its read still holds when the request lands."""

    def append_event(self, event: Event) -> None:
        """Add an event to a rotation's timeline WITHOUT touching the rotation (an audit
        record: an operator action that was refused); NotFound for an unknown rotation."""

    def campaign_rotations(self, campaign: str | None = None) -> list[Rotation]:
        """The rotations of a campaign (None: of every campaign), oldest first."""

    def add_evidence(self, event: Event) -> bool:
        """Record evidence given outside a worker (a person's page, a holder): `event` has
        kind "evidence" and `trigger` the evidence name. Written once per rotation and name
        (False when that name was already there; the first detail stays), and an unfinished
        rotation that is not leased is made due now, so a worker looks at it at once."""

    def evidence(self, rotation_id: str) -> dict[str, Event]:
        """The evidence recorded on a rotation by name (the first of each)."""

    def wake_waiting(self, at: datetime, rotation_id: str | None = None) -> int:
        """Make every unfinished, unleased rotation that waits (``wait_key`` set) due at `at`
        when its next check is later (the schedule's clock was set: those checks were
        converted to a worker's clock under the old setting); how many. With `rotation_id`,
        that rotation only (evidence came while a worker held it)."""

    # workers (liveness: what a heartbeat says; nothing is ever blocked by a worker's row)
    def register_worker(self, worker: WorkerRecord) -> None:
        """Insert the row of `worker.owner`, or replace it (a re-registration)."""

    def heartbeat_worker(self, owner: str, now: datetime) -> bool:
        """Set the worker's heartbeat_at to `now` (one UPDATE); False when it has no row
        (never registered, or pruned), so the worker registers again."""

    def stop_worker(self, owner: str, now: datetime) -> None:
        """Record a clean stop (stopped_at and heartbeat_at = `now`); no row: nothing."""

    def list_workers(self) -> list[WorkerRecord]:
        """Every registered worker, the most recently started first."""

    def get_workers(self, owners: Sequence[str]) -> dict[str, WorkerRecord]:
        """Those of `owners` that have a row, in one read."""

    def prune_workers(self, before: datetime) -> int:
        """Delete the workers whose last heartbeat (or stop) is older than `before`; how many."""

    def leases_held(self, now: datetime) -> dict[str, int]:
        """Lease owner -> how many unfinished rotations it holds a lease on that has not
        expired at `now` (owners holding none are absent)."""

    # sealed secrets
    def get_secret(self, secret_id: str) -> SealedSecret: ...

    def get_secrets(self, secret_ids: Sequence[str]) -> dict[str, SealedSecret]:
        """Those of `secret_ids` that exist, in one read."""

    def all_secrets(self) -> list[SealedSecret]: ...

    def replace_secrets(self, sealed: Sequence[SealedSecret]) -> None:
        """Overwrite existing secrets (same ids) in one transaction (master-key rotation)."""

    def purge_secrets(self, now: datetime) -> list[str]:
        """Erase the ciphertext of every secret whose purge_after <= now; return their ids."""

    def master_key_ids(self) -> set[str]:
        """The master key ids that unpurged ciphertexts were made with."""


# ------------------------------------------------------------------------------------- slots


@dataclass(frozen=True)
class ClockAnchor:
    """The tests' shared schedule clock: schedule time = ``schedule`` + (database time -
    ``real``) * ``scale``."""

    real: datetime
    schedule: datetime
    scale: float


class SlotStore(Protocol):
    """The scheduler's slots (a credential has at most one ``scheduled`` slot), and the
    database's clock."""

    def db_now(self) -> datetime:
        """The database server's time (aware UTC)."""

    def clock_anchor(self) -> ClockAnchor | None:
        """The shared test clock, if one is set."""

    def set_clock_anchor(self, anchor: ClockAnchor | None) -> None:
        """Set (or clear) the shared test clock; every waiting rotation is made due, so its
        wait is looked at again on the new clock."""

    def due_slots(self, now: datetime, limit: int) -> list[Slot]:
        """Scheduled slots with due_at <= now, the earliest first (one indexed query)."""

    def scheduled_slots(self, credentials: Sequence[str] | None = None) -> dict[str, Slot]:
        """The scheduled slot of each credential (of `credentials`, or every one)."""

    def unplanned(self, credentials: Sequence[str]) -> list[str]:
        """Those of `credentials` that are managed and have no scheduled slot (what a planning
        pass plans; a slot of a credential whose rotation is unfinished is held back when due,
        and says why)."""

    def last_fired(self, credentials: Sequence[str]) -> dict[str, datetime]:
        """The latest fired slot of each of `credentials` that has one."""

    def keys_created(self, credentials: Sequence[str]) -> dict[str, tuple[datetime, datetime]]:
        """Per credential, from its latest slot: (the key's updated_at it was planned from,
        when that key was created on the schedule's clock)."""

    def group_last_start(self, group: str) -> datetime | None:
        """The latest fired_at (schedule time) of the group's slots: scheduled fires and
        rotations started by hand, which record a fired slot too."""

    def record_start(self, slot: Slot) -> None:
        """Record a rotation started by hand as a fired slot of its credential (so stagger and
        the next slot count from it); an existing slot with that key is left as it is."""

    def group_starts(self, group: str, since: datetime) -> list[datetime]:
        """due_at of the group's scheduled slots, and fired_at of its slots fired since."""

    def plan_slot(self, slot: Slot, *, replaces: datetime | None = None) -> bool:
        """Insert `slot` as the credential's scheduled slot (marking its scheduled slot
        `replaces` superseded in the same transaction). False when another scheduled slot
        is there (another worker planned first) or the slot exists already."""

    def postpone_slot(
        self,
        credential: str,
        slot: datetime,
        due_at: datetime,
        note: str | None,
        *,
        key_recorded_at: datetime | None = None,
        fingerprint: str | None = None,
    ) -> None:
        """Move a scheduled slot's due_at (with why; with the key it now counts from, and the
        fingerprint of the policy that now owns it)."""

    def close_slot(self, credential: str, slot: datetime, status: str, note: str) -> None:
        """Mark a scheduled slot skipped or superseded (with why)."""

    def fire_slot(self, slot: Slot, rotation: Rotation, event: Event, now: datetime) -> bool:
        """In one transaction: mark the scheduled slot (credential, slot) with `slot`'s
        fingerprint fired with `rotation`, and create the rotation. False when it is no longer
        scheduled with that fingerprint (fired by another worker); AlreadyRotating when the
        credential has an unfinished rotation (nothing is written)."""

    def fire_slots(
        self, fires: Sequence[tuple[Slot, Rotation, Event]], now: datetime
    ) -> list[bool | KeyturnError]:
        """:meth:`fire_slot` for each, in one transaction (a savepoint each): per fire, True,
        False (no longer scheduled with that fingerprint) or the AlreadyRotating it met."""

    def unfinished(self, credentials: Sequence[str]) -> dict[str, Rotation]:
        """The unfinished rotation of each of `credentials` that has one."""

    def slots_of(self, credential: str, limit: int = 20) -> list[Slot]:
        """The credential's slots, newest first."""

    def in_flight(self, credentials: Sequence[str]) -> tuple[int, datetime | None]:
        """How many of `credentials` have an unfinished rotation, and the newest rotation's
        created_at among them."""

    def in_flight_of_provider(self, provider: str) -> int:
        """Unfinished rotations of the provider's managed credentials."""


class AccessStore(Protocol):
    """The HTTP API's own records: bearer tokens (stored as hashes) and the first response to
    each Idempotency-Key."""

    def add_token(self, token: ApiToken) -> None:
        """Insert a token; KeyturnError when its name (or hash) exists, revoked or not."""

    def token_by_hash(self, token_hash: str) -> ApiToken | None: ...

    def list_tokens(self) -> list[ApiToken]:
        """Every token, revoked ones too, by name."""

    def revoke_token(self, name: str, at: datetime) -> ApiToken:
        """Set revoked_at (kept if already revoked); NotFound for an unknown name."""

    def reserve_idempotency(self, record: IdempotencyRecord) -> IdempotencyRecord | None:
        """Insert `record` (no response yet) and return None; when the token already used the
        key, insert nothing and return the existing record."""

    def finish_idempotency(
        self, token_name: str, key: str, status_code: int, response: dict[str, Any]
    ) -> None:
        """Store the response of a reserved key."""

    def release_idempotency(self, token_name: str, key: str) -> None:
        """Forget a reserved key whose request failed before it had a response."""


# ------------------------------------------------------------------------------------ metrics


@dataclass(frozen=True)
class RotationGroup:
    """How many rotations share everything their state and status depend on (one row of a
    GROUP BY: /metrics never loads every rotation). ``wait_key`` is kept whole (the engine's
    keys are few: one per declared wait and gate); the rest are only whether a field is set."""

    state: State
    requested: bool
    paused: bool
    halted: bool
    wait_key: str | None
    waiting: bool
    leased: bool
    retried: bool
    count: int


@dataclass(frozen=True)
class FleetFacts:
    """What the store says about the whole installation, for ``/metrics``: counts taken with
    GROUP BY, the few timestamps per credential, and the rows that may need attention."""

    rotations: list[RotationGroup]
    #: (from state, to state, the rotation's kind) -> transition events in the event log
    transitions: dict[tuple[str, str, str], int]
    #: (verb, outcome: applied, requested, refused or other) -> operator events
    operator_actions: dict[tuple[str, str], int]
    #: credential -> when its current key was recorded (its updated_at), in Unix seconds
    keys_created: dict[str, float]
    #: credential -> when its scheduled slot fires (credentials without one are absent)
    next_rotations: dict[str, float]
    #: credential -> finished_at of its latest rotation that ended in old_deactivated
    last_successes: dict[str, float]
    #: Unfinished rotations that may need attention: halted, waiting, requested, retried, or
    #: leased with an expired lease (a superset: keyturn.engine.attention decides). They carry
    #: what attention() reads; their reason, data, errors and wait text are not loaded.
    attention_candidates: list[Rotation]
    #: Every registered worker (stopped ones too, until they are pruned).
    workers: list[WorkerRecord]


@runtime_checkable
class FleetReader(Protocol):
    def fleet_facts(self, now: datetime, *, counters: bool = True) -> FleetFacts:
        """The installation's :class:`FleetFacts`, read in a few aggregate queries (one
        snapshot where the database gives one); with ``counters=False`` the event log is not
        counted (``transitions`` and ``operator_actions`` are empty: the dashboard's
        overview needs neither)."""


@runtime_checkable
class CredentialPager(Protocol):
    """One page of credentials without loading them all (the dashboard's credentials)."""

    def page_credentials(self, *, limit: int, after: str | None = None) -> list[ManagedCredential]:
        """By name, the first `limit` whose name sorts after `after`."""


class StepMetrics(Protocol):
    """Told of every step attempt a worker makes (process-local metrics; cheap, never
    raises)."""

    def step(self, step: str, result: str, seconds: float) -> None: ...


#: Told of every request an adapter sends to a provider: the HTTP method, and the response's
#: status code, or "timeout" / "connection" when no response came. Cheap; never raises.
RequestObserver = Callable[[str, int | str], None]


# ------------------------------------------------------------------------------------ secrets


@dataclass(frozen=True)
class GeneratedKey:
    algorithm: str  # "ed25519", "ecdsa-p256", "rsa-2048"
    private_pem: bytes = field(repr=False)  # PKCS#8 PEM; never logged, stored only sealed
    public_pem: str  # SubjectPublicKeyInfo PEM


class Keys(Protocol):
    def generate(self, algorithm: str) -> GeneratedKey: ...

    def public_pem(self, private_pem: bytes) -> str: ...


class Vault(Protocol):
    @property
    def key_id(self) -> str:
        """Id of the master key new ciphertexts are made with."""

    def seal(self, secret_id: str, purpose: str, plaintext: bytes) -> SealedSecret: ...

    def open(self, sealed: SealedSecret) -> bytes:
        """Plaintext, or SecretError naming the cause (unknown master key, tampered, purged)."""


# ----------------------------------------------------------------------------------- provider


@dataclass(frozen=True)
class SigningKey:
    """A credential that signs user actions: its credId and private key (PEM)."""

    credential_id: str
    private_key_pem: bytes = field(repr=False)


@dataclass(frozen=True)
class ProviderCredential:
    credential_id: str
    credential_uuid: str
    is_active: bool
    public_key: str
    name: str
    kind: str = "Key"
    #: A passkey's (Fido2) relying party and the origin it was registered from.
    relying_party_id: str | None = None
    origin: str | None = None


class KeyProvider(Protocol):
    """What a signing-key rotation needs from the provider, for one managed credential (its
    bearer token is bound in by the composition root). Errors are ProviderError."""

    async def register_key(
        self, *, signer: SigningKey, new_key: SigningKey, name: str, via: str
    ) -> ProviderCredential:
        """Register the public half of `new_key`, the call signed by `signer`.

        via="credentials": Create Credential (Key kind, attestation signed by the new key, credId
        = new_key.credential_id). via="service_account_endpoint": POST
        /auth/service-accounts/credentials; the provider then chooses the credential id.
        """

    async def list_credentials(self) -> list[ProviderCredential]: ...

    async def activate(self, *, signer: SigningKey, credential_uuid: str) -> None: ...

    async def deactivate(self, *, signer: SigningKey, credential_uuid: str) -> None: ...

    async def prove(self, *, signer: SigningKey) -> None:
        """Prove the provider accepts a user-action signature by `signer` (no side effect)."""

    async def aclose(self) -> None: ...


# ------------------------------------------------------------------------------------- deploy


@dataclass(frozen=True)
class DeployedMaterial:
    private_key_pem: bytes = field(repr=False)
    credential_id: str
    credential_uuid: str


class DeployTarget(Protocol):
    """A synchronous signing-key writer (the file adapter). The engine sees targets through
    their plugins (keyturn.targets), whose deploy and read_back are async and run a writer
    like this one in keyturn's bounded thread pool."""

    @property
    def name(self) -> str: ...

    def deploy(self, material: DeployedMaterial) -> None:
        """Write atomically; idempotent."""

    def read_back(self) -> DeployedMaterial:
        """What a holder would load now; KeyturnError if missing or unreadable."""


class Clock(Protocol):
    def now(self) -> datetime: ...


#: Called before every request an adapter sends on a rotation's behalf; raises when the
#: worker's lease is no longer safely held (so a worker that was frozen past its lease never
#: reaches the provider again).
Fence = Callable[[], None]


class RequestBudget(Protocol):
    """A provider's request budget, shared by every client that calls the provider: in one
    process (an in-memory budget) or by every process on the same database (a shared one).

    A client awaits :meth:`acquire` before each request, then reports the response: a 429 with
    :meth:`rate_limited_now` (everyone sharing the budget pauses), anything else with
    :meth:`succeeded`. The reports never block or raise."""

    async def acquire(self) -> None:
        """Wait until this request may be sent."""

    def rate_limited_now(self) -> None: ...

    def succeeded(self) -> None: ...


# ----------------------------------------------------------------------------------- webhooks


@dataclass(frozen=True)
class WebhookInfo:
    id: str
    url: str
    events: tuple[str, ...]
    status: str  # "Enabled" or "Disabled"
    description: str | None = None


class WebhookProvider(Protocol):
    """What a webhook-secret rotation needs from the provider (calls signed by the managed
    credential configured as the webhook's signer). Errors are ProviderError."""

    async def get_webhook(self, webhook_id: str) -> WebhookInfo | None:
        """None when it does not exist."""

    async def list_webhooks(self) -> list[WebhookInfo]: ...

    async def create_webhook(
        self, *, url: str, events: Sequence[str], description: str, enabled: bool
    ) -> tuple[WebhookInfo, str]:
        """The new webhook and its secret (returned only here; never logged)."""

    async def set_enabled(self, webhook_id: str, enabled: bool) -> None: ...

    async def delete_webhook(self, webhook_id: str) -> None:
        """Idempotent: a webhook that is already gone is not an error."""

    async def ping(self, webhook_id: str) -> str:
        """The receiver's HTTP status for a test delivery, as a string ("200")."""

    async def latest_delivery(self, webhook_id: str) -> datetime | None:
        """The newest event date among the webhook's delivery records (None: no delivery yet).
        Repeated calls on one provider session may continue where the last one stopped."""

    async def aclose(self) -> None: ...


class SecretsTarget(Protocol):
    """A synchronous writer of a secret set for a receiver (e.g. a secrets file it reloads);
    wrapped by an async target plugin as :class:`DeployTarget` is."""

    @property
    def name(self) -> str: ...

    def deploy(self, secrets: Sequence[str]) -> str:
        """Write the set of accepted secrets atomically; return its version id."""

    def read_back(self) -> tuple[str, tuple[str, ...]]:
        """(version, secrets) as a receiver would load them now."""


class SecretsProbe(Protocol):
    """Asks a receiver which secrets version it has loaded."""

    @property
    def name(self) -> str: ...

    async def loaded_version(self) -> str | None: ...


# ------------------------------------------------------------------------------ notifications


@dataclass(frozen=True)
class Delivery:
    """One notification to one sink (a row of the outbox's deliveries). ``payload`` is the
    notification's document (keyturn.domain.notify.Notice.payload) with its ``id``."""

    id: int
    notification_id: int
    sink: str
    rotation_id: str
    kind: str
    status: str
    attempts: int
    payload: dict[str, Any]
    created_at: datetime
    next_attempt_at: datetime | None = None
    claimed_by: str | None = None
    first_attempt_at: datetime | None = None
    last_attempt_at: datetime | None = None
    sent_at: datetime | None = None
    last_status_code: int | None = None
    last_error: str | None = None


@dataclass(frozen=True)
class DeliveryAttempt:
    """One attempt to send a delivery: its outcome (sent, resent, retry, failed), the HTTP
    status if any, and the error with every sink secret redacted."""

    delivery_id: int
    at: datetime
    owner: str
    outcome: str
    status_code: int | None
    error: str | None
    duration_ms: int
    sink: str = ""


#: Which sinks a notification goes to: (its payload, the sinks that already have an opening
#: delivery of its rotation) -> sink names.
Route = Callable[[dict[str, Any], frozenset[str]], Sequence[str]]


class OutboxStore(Protocol):
    """The notification outbox, for the processes that deliver it. The notifications are
    written by the Store's commits (with their events); this port fans them out to sinks,
    leases due deliveries to one process at a time, and records each attempt."""

    def fan_out(self, route: Route, now: datetime, limit: int) -> int:
        """Make the deliveries of up to `limit` notifications not fanned out yet (oldest first,
        one process at a time); how many notifications were fanned out."""

    def claim_deliveries(
        self, owner: str, now: datetime, until: datetime, limit: int
    ) -> list[Delivery]:
        """Lease up to `limit` due deliveries (pending, or firing and due for a re-send) to
        `owner` until `until`. A delivery is not claimed while another delivery of the same
        rotation to the same sink is leased, or an earlier one is still pending (so a resolve
        never overtakes its trigger)."""

    def finish_delivery(
        self,
        delivery: Delivery,
        owner: str,
        attempt: DeliveryAttempt,
        *,
        status: str,
        next_attempt_at: datetime | None,
        close_firing: bool = False,
    ) -> bool:
        """Record `attempt` and set the delivery's status and next attempt, releasing the
        lease; with `close_firing`, the rotation's other firing deliveries to the sink end
        (``resolved`` when this one resolves, ``superseded`` when it fires anew). False (and
        nothing written) when `owner` no longer holds the lease."""

    def lost_holders(self, expired_before: datetime, limit: int) -> list[Rotation]:
        """Unfinished rotations whose lease expired before `expired_before` and that no
        worker claimed since."""

    def record_lost_holder(self, rotation: Rotation, event: Event) -> bool:
        """Append `event` (a ``holder_lost`` run event) and its notification, once per lost
        lease, if the rotation still holds that expired lease; False otherwise."""

    def deliveries(
        self, *, rotation_id: str | None = None, status: str | None = None, limit: int = 100
    ) -> list[Delivery]:
        """The newest deliveries first."""

    def attempts(self, delivery_ids: Sequence[int]) -> dict[int, list[DeliveryAttempt]]:
        """Each delivery's attempts, oldest first."""

    def pending_notifications(self) -> int:
        """Notifications not fanned out plus deliveries due or leased (what is left to send)."""

    def prune(self, before: datetime) -> int:
        """Delete attempts older than `before`, and deliveries and notifications done with and
        older than it; how many rows."""


@dataclass(frozen=True)
class SendResult:
    """What one attempt to send a notification to a sink came to. `error` is already free of
    the sink's secrets; `retryable`: a 429, a 5xx or a network error (worth another try)."""

    ok: bool
    status_code: int | None = None
    error: str | None = None
    retryable: bool = False
    #: Seconds the sink asked to wait (a 429's Retry-After), if it said.
    retry_after: float | None = None


class Sink(Protocol):
    """Somewhere notifications go (a webhook, Slack, Alertmanager, PagerDuty). Sends one
    notification document (keyturn.domain.notify.Notice.payload with its ``id``) per call,
    within its own timeout; never raises for what the far end does."""

    @property
    def name(self) -> str: ...

    @property
    def type(self) -> str: ...

    @property
    def events(self) -> frozenset[str]:
        """The notification kinds it takes."""

    @property
    def pages(self) -> bool:
        """It opens something (an alert, an incident) that the rotation's end resolves: the
        end is sent to it whenever it took an opening notification of the rotation."""

    @property
    def resend_seconds(self) -> float | None:
        """Re-send an opening notification this often until the rotation resolves it (an
        Alertmanager alert expires otherwise); None: send once."""

    async def send(self, notification: dict[str, Any], *, resend: bool = False) -> SendResult: ...

    def redact(self, text: str) -> str:
        """`text` with every secret of the sink replaced by ``[redacted]``."""

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class PasskeyCreation:
    """Options to create a passkey in the user's browser (Create Credential Challenge, or
    Challenge With Code): `options` are the provider's, as they came (rp, user, challenge,
    pubKeyCredParams, excludeCredentials, authenticatorSelection)."""

    challenge_identifier: str
    challenge: str
    rp_id: str | None
    user_id: str | None
    options: Mapping[str, Any] = field(repr=False, compare=False)


#: What a user action asks the provider to do once signed.
PasskeyCall = Literal["activate", "deactivate", "create_passkey", "create_code"]


@dataclass(frozen=True)
class PasskeyChallenge:
    """A user-action challenge for one request the user signs in the browser (navigator
    .credentials.get over `challenge`); `allowed` are the user's active passkeys the provider
    accepts. `request` is the adapter's own record of what will be sent (opaque)."""

    call: PasskeyCall
    challenge: str
    rp_id: str | None
    user_verification: str | None
    allowed: tuple[str, ...]
    request: Any = field(repr=False, compare=False)


class SignedCall:
    """A user-action token the provider issued for a :class:`PasskeyChallenge` (the user's
    assertion was accepted: the proof that the passkey works). Masked in repr and str; it
    cannot be pickled; sent once."""

    __slots__ = ("_token", "challenge")

    def __init__(self, challenge: PasskeyChallenge, token: str) -> None:
        self.challenge = challenge
        self._token = token

    def reveal(self) -> str:
        return self._token

    def __repr__(self) -> str:
        return f"SignedCall({self.challenge.call!r}, '***')"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("a SignedCall holds a user-action token and cannot be pickled")


class OneTimeCode:
    """A Create Credential Code: it lets a passkey be added without authentication, so it is
    masked in repr and str, cannot be pickled, and is never stored or logged."""

    __slots__ = ("_code", "expiration")

    def __init__(self, code: str, expiration: str | None = None) -> None:
        self._code = code
        self.expiration = expiration

    def reveal(self) -> str:
        return self._code

    def __repr__(self) -> str:
        return "OneTimeCode('***')"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("a OneTimeCode is a credential and cannot be pickled")


class UserPasskeys(Protocol):
    """One end user at the provider, logged in by delegation: the delegated token is held
    inside (never returned, logged or shown in a repr). It reads as the user; each write is a
    :class:`PasskeyChallenge` the user signs in the browser, :meth:`accept` ed by the
    provider, then sent."""

    @property
    def username(self) -> str: ...

    @property
    def user_id(self) -> str | None:
        """The provider's id of the user (the passkeys' WebAuthn user handle), if known."""

    async def credentials(self) -> list[ProviderCredential]: ...

    async def registration(self, origin: str) -> PasskeyCreation:
        """Create Credential Challenge for a passkey made in a browser at `origin`."""

    async def challenge(
        self,
        call: PasskeyCall,
        *,
        credential_uuid: str | None = None,
        creation: PasskeyCreation | None = None,
        credential_info: Mapping[str, str] | None = None,
        name: str | None = None,
    ) -> PasskeyChallenge:
        """The user-action challenge for `call`: activate/deactivate `credential_uuid`,
        create_passkey (`creation`, the browser's `credential_info`, `name`), create_code (a
        code valid for about a minute from now)."""

    async def accept(
        self, challenge: PasskeyChallenge, first_factor: Mapping[str, Any]
    ) -> SignedCall:
        """`/auth/action` with the browser's assertion: the provider accepted it (else
        ProviderError). Nothing is changed until the call is sent."""

    async def send(self, signed: SignedCall) -> None:
        """Send an activate or deactivate call."""

    async def create_passkey(self, signed: SignedCall) -> ProviderCredential: ...

    async def create_code(self, signed: SignedCall) -> OneTimeCode: ...


class PasskeyProvider(Protocol):
    """End users' passkeys at the provider, as a service account that logs users in by
    delegation (reads only: every write for a user is signed by the user's passkey, relayed
    from the user's browser). Errors are ProviderError; nothing here returns or logs a
    delegated token."""

    async def user_credentials(self, username: str) -> list[ProviderCredential]:
        """Every credential (passkeys and keys) of the end user `username`."""

    async def rp_for(self, username: str, origin: str) -> str | None:
        """The rpId the provider gives passkeys registered by `username` from `origin` (a
        registration challenge, nothing registered); ProviderError when the provider does not
        allow that origin."""

    async def login(self, username: str) -> UserPasskeys:
        """Delegated Login: act as the end user `username` (valid while this session is)."""

    async def code_registration(self, code: OneTimeCode | str, origin: str) -> PasskeyCreation:
        """Challenge With Code (unauthenticated) for a passkey made in a browser at `origin`."""

    async def create_passkey_with_code(
        self, creation: PasskeyCreation, credential_info: Mapping[str, str], name: str
    ) -> ProviderCredential:
        """Create Credential With Code (unauthenticated, unsigned)."""

    async def aclose(self) -> None: ...
