"""One claimed rotation in flight: its current version, its lease, and the intent-before-effect
protocol for every action that touches the outside world."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

import structlog

from keyturn.domain.errors import KeyturnError, NotFound, StaleVersion, StoreUnavailable
from keyturn.domain.lifecycle import FINAL_STATES, State, Trigger, fire
from keyturn.domain.model import (
    ActionRecord,
    ActionStatus,
    Event,
    ManagedCredential,
    Phase,
    Rotation,
    SealedSecret,
    evolve,
)
from keyturn.domain.retry import RetryPolicy
from keyturn.engine.batch import CommitBatcher, Loaders
from keyturn.ports import (
    Change,
    Clock,
    DeployTarget,
    KeyProviderFactory,
    Keys,
    SecretsProbe,
    SecretsTarget,
    Store,
    Vault,
    WebhookProviderFactory,
)

log = structlog.get_logger("keyturn.engine")


def engine_logger() -> Any:
    """A concrete (not lazy) engine logger, under the logging configuration now in force."""
    return log.bind()


Detail = dict[str, Any]
T = TypeVar("T")


class CrashHook(Protocol):
    """Called at every action boundary with its name; tests use it to kill the process there."""

    def __call__(self, boundary: str) -> None: ...


def no_crash(boundary: str) -> None:
    return None


@dataclass(frozen=True)
class EngineSettings:
    lease_seconds: float = 30.0
    #: Before an external call the lease must have at least this much left, on the monotonic clock.
    lease_margin_seconds: float = 5.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    retention: timedelta = timedelta(days=30)
    poll_seconds: float = 1.0


def _not_configured(name: str, **_kw: Any) -> Any:
    raise KeyturnError(f"credential {name}: this kind of rotation is not configured here")


@dataclass
class EngineDeps:
    store: Store
    vault: Vault
    keys: Keys
    clock: Clock
    #: The provider session for a managed credential (its token bound in).
    provider_for: KeyProviderFactory
    #: The deploy targets of a managed credential, from the configuration.
    targets_for: Callable[[str], list[DeployTarget]]
    settings: EngineSettings = field(default_factory=EngineSettings)
    crash_hook: CrashHook = no_crash
    #: Webhook rotations: the provider session (signed by the webhook's signer credential),
    #: the receivers' secret stores, and the probes that confirm what a receiver has loaded.
    webhooks_for: WebhookProviderFactory = _not_configured
    secret_targets_for: Callable[[str], list[SecretsTarget]] = _not_configured
    probes_for: Callable[[str], list[SecretsProbe]] = _not_configured
    #: How long to wait after removing a webhook for deliveries already in flight.
    grace_for: Callable[[str], float] = lambda _name: 5.0


@dataclass(frozen=True)
class Outcome:
    """What an action returns when its outcome carries more than a detail: sealed secrets the
    provider generated (stored in the same commit as the outcome) and rotation data."""

    detail: dict[str, Any]
    secrets: tuple[SealedSecret, ...] = ()
    data: dict[str, Any] = field(default_factory=dict)


class OperatorInterrupt(Exception):
    """An operator request arrived; unwind to the action boundary and carry it out."""


class WorkerStopping(Exception):
    """The worker was asked to stop; leave the rotation at this action boundary."""


class LeaseLost(KeyturnError):
    """The lease could not be kept; the rotation is abandoned to whoever holds it now."""


async def db(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking store call off the event loop."""
    return await asyncio.to_thread(fn, *args, **kwargs)


class RotationRun:
    """The worker's handle on one leased rotation. All writes go through :meth:`commit`."""

    def __init__(
        self,
        deps: EngineDeps,
        rotation: Rotation,
        owner: str,
        *,
        leased_at: float | None = None,
        logger: Any = None,
    ) -> None:
        self.deps = deps
        self.rotation = rotation
        self.owner = owner
        self._lock = asyncio.Lock()
        #: The lease's end on the monotonic clock, counted from before the claim was sent.
        start = leased_at if leased_at is not None else time.monotonic()
        self._lease_deadline = start + deps.settings.lease_seconds
        self._actions: dict[tuple[Phase, str], ActionRecord] | None = None
        #: Set by the worker when it is asked to stop; checked at every action boundary.
        self.stopping: asyncio.Event | None = None
        #: The worker's group-commit queue and batched reads, when there are.
        self.batcher: CommitBatcher | None = None
        self.loaders: Loaders | None = None
        self._secrets: dict[str, SealedSecret] = {}
        #: Hold outcomes and transitions for the next commit (a worker sets it: it always ends
        #: a run with a commit, the lease release).
        self.defer_writes = False
        self._pending: Change | None = None
        self._pending_hooks: list[str] = []
        # A worker passes a concrete logger: binding from it is cheap, from the lazy module
        # proxy each bind builds a logger anew.
        self.log = (logger or log).bind(rotation=rotation.id, credential=rotation.credential)

    # ------------------------------------------------------------------ writes and the lease

    def now(self) -> datetime:
        return self.deps.clock.now()

    async def commit(
        self, change: Change, *, defer: bool = False, hook: str | None = None
    ) -> Rotation:
        """Compare-and-set on the current version; StaleVersion means another writer won.
        With a batcher (in a worker) the write shares a transaction with other rotations'.

        ``defer=True`` (honoured when :attr:`defer_writes` is set) holds the change and merges it
        into this run's next commit, applying its updates to :attr:`rotation` at once. Safe
        because every external effect is preceded by an intent commit, which carries whatever
        was held: a held write is never needed before then, and losing it in a crash is the
        same as crashing before it (the intent without outcome is reconciled). `hook` is the
        crash-hook boundary that follows this write's commit."""
        hooks: list[str] = []
        async with self._lock:
            if defer and self.defer_writes:
                self._pending = change if self._pending is None else merge(self._pending, change)
                self.rotation = evolve(self.rotation, change.updates)
                for sealed in change.secrets:
                    self._secrets[sealed.id] = sealed
                if hook is not None:
                    self._pending_hooks.append(hook)
                return self.rotation
            merged = change if self._pending is None else merge(self._pending, change)
            merged.rotation_id = self.rotation.id
            merged.expected_version = self.rotation.version
            started = time.monotonic()
            if self.batcher is not None:
                self.rotation = await self.batcher.commit(merged)
            else:
                self.rotation = await db(self.deps.store.commit, merged)
            # Only now is what was held written (a failed commit keeps it held).
            hooks, self._pending, self._pending_hooks = self._pending_hooks, None, []
            for sealed in merged.secrets:  # what this run sealed, it need not read back
                self._secrets[sealed.id] = sealed
            if "lease_expires_at" in merged.updates:
                self._lease_deadline = started + self.deps.settings.lease_seconds
        for boundary in [*hooks, *([hook] if hook is not None else [])]:
            self.deps.crash_hook(boundary)
        return self.rotation

    async def flush(self) -> None:
        """Write whatever is held (see :meth:`commit`)."""
        if self._pending is not None:
            await self.commit(Change(self.rotation.id, 0))

    def lease_updates(self) -> dict[str, Any]:
        return {
            "lease_owner": self.owner,
            "lease_expires_at": self.now() + timedelta(seconds=self.deps.settings.lease_seconds),
        }

    async def renew(self) -> None:
        await self.commit(Change(self.rotation.id, 0, updates=self.lease_updates()))

    async def ensure_lease(self) -> None:
        """Before an external call: renew unless the lease has a safe margin left."""
        left = self._lease_deadline - time.monotonic()
        if left < self.deps.settings.lease_seconds / 2:
            await self.renew()
        if self._lease_deadline - time.monotonic() < self.deps.settings.lease_margin_seconds:
            raise LeaseLost(f"rotation {self.rotation.id}: lease too close to expiry to act")

    def fence(self) -> None:
        """Before every request to the outside world: the lease must still have its safety
        margin on the monotonic clock (renewals extend it; a frozen worker's has run out)."""
        if self._lease_deadline - time.monotonic() < self.deps.settings.lease_margin_seconds:
            raise LeaseLost(
                f"rotation {self.rotation.id}: the lease is no longer safely held; "
                "not contacting the provider"
            )

    async def boundary(self) -> None:
        """An action boundary without a database read: stop if asked, keep the lease. Operator
        requests are seen in the row every commit returns (the intent commit comes next)."""
        if self.stopping is not None and self.stopping.is_set():
            raise WorkerStopping()
        await self.ensure_lease()

    async def secret(self, secret_id: str) -> SealedSecret:
        """A sealed secret of this rotation, read once per run."""
        if secret_id not in self._secrets:
            if self.loaders is None:
                self._secrets[secret_id] = await db(self.deps.store.get_secret, secret_id)
            else:
                found = await self.loaders.secrets.load(secret_id)
                if found is None:
                    raise NotFound(f"no secret with id {secret_id}")
                self._secrets[secret_id] = found
        return self._secrets[secret_id]

    async def credential(self) -> ManagedCredential:
        """The managed credential this rotation rotates, as the store holds it now."""
        name = self.rotation.credential
        if self.loaders is None:
            return await db(self.deps.store.get_credential, name)
        found = await self.loaders.credentials.load(name)
        if found is None:
            raise NotFound(f"no managed credential named {name}; see `keyturn credentials list`")
        return found

    async def check_boundary(self) -> None:
        """An action boundary: notice an operator request (and a lost lease) before acting."""
        await self.flush()
        async with self._lock:  # not while our own lease renewal is committing
            current = await db(self.deps.store.get_rotation, self.rotation.id)
            if current.version != self.rotation.version:
                raise StaleVersion(self.rotation.id, self.rotation.version)
            self.rotation = current
        if current.request is not None:
            raise OperatorInterrupt()
        if self.stopping is not None and self.stopping.is_set():
            raise WorkerStopping()
        await self.ensure_lease()

    # ------------------------------------------------------------------ action records

    async def actions(self) -> dict[tuple[Phase, str], ActionRecord]:
        if self._actions is None:
            if self.loaders is None:
                records = await db(self.deps.store.actions, self.rotation.id)
            else:
                records = await self.loaders.actions.load(self.rotation.id) or []
            self._actions = {(a.phase, a.name): a for a in records}
        return self._actions

    async def action(self, phase: Phase, name: str) -> ActionRecord | None:
        return (await self.actions()).get((phase, name))

    async def external(
        self,
        phase: Phase,
        name: str,
        call: Callable[[], Awaitable[Detail | Outcome]],
        reconcile: Callable[[], Awaitable[Detail | None]] | None = None,
        intent: Mapping[str, Any] | None = None,
    ) -> Detail:
        """Intent before effect: record the intent, make the call, record the outcome.

        An action already done returns its recorded outcome. An action whose intent exists
        without an outcome (a crash, a timeout, a 5xx) is reconciled first: what the provider
        reports is adopted instead of acting twice.
        """
        actions = await self.actions()
        record = actions.get((phase, name))
        if record is not None and record.status is ActionStatus.DONE:
            return dict(record.detail)
        self.deps.crash_hook(f"{phase.value}.{name}.before_intent")
        await self.boundary()
        bound = self.log.bind(step=phase.value, action=name)
        started = time.monotonic()
        if record is not None and reconcile is not None:
            adopted = await reconcile()
            if adopted is not None:
                await self._outcome(
                    record,
                    ActionStatus.DONE,
                    {**adopted, "reconciled": True},
                    hook=f"{phase.value}.{name}.after_outcome",
                )
                bound.info(
                    "action", outcome="adopted", duration_ms=_ms(started), after="unknown outcome"
                )
                return adopted
        now = self.now()
        record = ActionRecord(
            rotation_id=self.rotation.id,
            phase=phase,
            name=name,
            idempotency_key=record.idempotency_key
            if record
            else f"{self.rotation.id}:{phase}:{name}",
            status=ActionStatus.INTENT,
            intent_at=now,
            attempts=(record.attempts + 1) if record else 1,
            detail=dict(intent or {}),
        )
        await self.commit(Change(self.rotation.id, 0, action=record, updates=self.lease_updates()))
        actions[(phase, name)] = record
        self.deps.crash_hook(f"{phase.value}.{name}.after_intent")
        if self.rotation.request is not None:  # the intent commit returned the current row
            raise OperatorInterrupt()
        try:
            result = await call()
        except (LeaseLost, StaleVersion, StoreUnavailable):
            raise  # not ours to record any more (or not recordable now)
        except KeyturnError as exc:
            unknown = bool(getattr(exc, "outcome_unknown", False))
            bound.warning(
                "action",
                outcome="error",
                duration_ms=_ms(started),
                error=str(exc),
                retryable=bool(getattr(exc, "retryable", False)),
                outcome_unknown=unknown,
            )
            if not unknown:  # known not applied: say so; an unknown outcome keeps its intent
                await self._outcome(record, ActionStatus.FAILED, dict(record.detail), str(exc))
            raise
        self.deps.crash_hook(f"{phase.value}.{name}.after_call")
        outcome = result if isinstance(result, Outcome) else Outcome(result)
        detail = outcome.detail
        await self._outcome(
            record,
            ActionStatus.DONE,
            detail,
            outcome=outcome,
            hook=f"{phase.value}.{name}.after_outcome",
        )
        bound.info("action", outcome="done", duration_ms=_ms(started))
        return detail

    async def _outcome(
        self,
        record: ActionRecord,
        status: ActionStatus,
        detail: Detail,
        error: str | None = None,
        outcome: Outcome | None = None,
        hook: str | None = None,
    ) -> None:
        """Record an action's outcome. A successful one is held for the next commit, unless it
        carries secrets the provider made (those are written at once: nothing else has them)."""
        done = evolve(
            record, {"status": status, "outcome_at": self.now(), "detail": detail, "error": error}
        )
        change = Change(self.rotation.id, 0, action=done)
        if outcome is not None:
            change.secrets = outcome.secrets
            if outcome.data:
                change.updates = {"data": {**self.rotation.data, **outcome.data}}
        defer = status is ActionStatus.DONE and not change.secrets
        await self.commit(change, defer=defer, hook=hook)
        (await self.actions())[(record.phase, record.name)] = done

    # ------------------------------------------------------------------ transitions

    async def transition(
        self,
        trigger: Trigger,
        *,
        actor: str | None = None,
        reason: str | None = None,
        detail: Detail | None = None,
        extra: Change | None = None,
        defer: bool = False,
    ) -> Rotation:
        """Fire `trigger` and persist it with its event in one compare-and-set (with
        ``defer=True``, in this run's next one: see :meth:`commit`)."""
        source = self.rotation.state
        dest = fire(source, trigger)
        change = extra or Change(self.rotation.id, 0)
        change.updates = {
            "state": dest,
            "attempts": 0,
            "last_error": None,
            "next_attempt_at": None,
            **change.updates,
        }
        if dest in FINAL_STATES:
            change.updates.setdefault("finished_at", self.now())
        else:  # a rollback of a finished rotation makes it unfinished again
            change.updates.setdefault("finished_at", None)
        change.events = [
            *change.events,
            Event(
                rotation_id=self.rotation.id,
                at=self.now(),
                kind="transition",
                actor=actor or self.owner,
                from_state=source.value,
                to_state=dest.value,
                trigger=trigger.value,
                reason=reason,
                detail=detail or {},
            ),
        ]
        rotation = await self.commit(
            change, defer=defer, hook=f"transition.{trigger.value}.after_commit"
        )
        self.log.info("transition", trigger=trigger.value, from_state=source, to_state=dest)
        return rotation


def merge(first: Change, then: Change) -> Change:
    """One change that writes what `first` and then `then` write (same rotation)."""
    actions: dict[tuple[Phase, str], ActionRecord] = {}
    for a in (*first.earlier_actions, first.action, *then.earlier_actions, then.action):
        if a is not None:
            actions.pop((a.phase, a.name), None)  # the later record of an action supersedes
            actions[(a.phase, a.name)] = a
    records = list(actions.values())
    last = records.pop() if then.action is not None else None
    return Change(
        first.rotation_id,
        first.expected_version,
        updates={**first.updates, **then.updates},
        events=[*first.events, *then.events],
        action=last,
        earlier_actions=records,
        secrets=[*first.secrets, *then.secrets],
        credential=then.credential if then.credential is not None else first.credential,
        purge_after={**first.purge_after, **then.purge_after},
    )


def new_secret_id() -> str:
    return f"sec_{uuid.uuid4().hex}"


def new_rotation_id() -> str:
    return f"rot_{uuid.uuid4().hex[:20]}"


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def is_final(state: State) -> bool:
    return state in FINAL_STATES
