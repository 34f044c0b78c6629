"""One claimed rotation in flight, made of parts with one job each: its :class:`Lease`, its
:class:`UnitOfWork` (the writes, and which may be held), its :class:`ActionLog` (intent -> call
-> outcome) and its reads. Transitions go through :meth:`RotationRun.transition`."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any, Protocol, TypeVar

import structlog

from keyturn.domain.errors import NotFound, StaleVersion
from keyturn.domain.lifecycle import FINAL_STATES, Trigger, fire
from keyturn.domain.model import Event, ManagedCredential, Rotation, SealedSecret
from keyturn.domain.retry import RetryPolicy
from keyturn.engine.actions import ActionLog
from keyturn.engine.batch import CommitBatcher, Loaders
from keyturn.engine.lease import Lease, LeaseLost
from keyturn.engine.registry import Registry, discovered
from keyturn.engine.schedtime import ScheduleBook, ScheduleTime
from keyturn.engine.spi import CredentialConfig, KindPlugin, Services
from keyturn.engine.unit import UnitOfWork
from keyturn.ports import Clock, Keys, SlotStore, StepMetrics, Store, Vault

__all__ = [
    "CrashHook",
    "Detail",
    "EngineDeps",
    "EngineSettings",
    "LeaseLost",
    "OperatorInterrupt",
    "RotationRun",
    "WorkerStopping",
    "db",
    "engine_logger",
    "new_rotation_id",
    "new_secret_id",
    "no_crash",
]

log = structlog.get_logger("keyturn.engine")

Detail = dict[str, Any]
T = TypeVar("T")


def engine_logger() -> Any:
    """A concrete (not lazy) engine logger, under the logging configuration now in force."""
    return log.bind()


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
    #: Threads for plugins' blocking calls (targets and probes with synchronous clients).
    blocking_threads: int = 8


@dataclass
class EngineDeps:
    store: Store
    vault: Vault
    keys: Keys
    clock: Clock
    #: What plugins get at run time: provider sessions, their configuration, the thread pool.
    services: Services
    settings: EngineSettings = field(default_factory=EngineSettings)
    crash_hook: CrashHook = no_crash
    registry: Registry = field(default_factory=discovered)
    #: The configured policies (None: nothing is scheduled, no gate applies).
    schedule: ScheduleBook | None = None
    #: The scheduler's slots (None: no scheduler runs in a worker).
    slots: SlotStore | None = None
    #: The schedule's clock (set in __post_init__ from `clock` when not given).
    schedule_time: ScheduleTime | None = None
    #: Told of every step attempt (a process's metrics); None: nobody counts.
    metrics: StepMetrics | None = None
    _targets: dict[str, list[Any]] = field(default_factory=dict)
    _probes: dict[str, list[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.schedule_time is None:
            self.schedule_time = ScheduleTime(self.clock, self.slots)

    @property
    def time(self) -> ScheduleTime:
        """The schedule's clock (schedules, windows, freezes, bake, approvals, wait deadlines)."""
        assert self.schedule_time is not None
        return self.schedule_time

    def config(self, credential: str) -> CredentialConfig:
        return self.services.credential_config(credential)

    def targets(self, credential: str) -> list[Any]:
        """The credential's deploy targets, built once from its configuration."""
        if credential not in self._targets:
            cfg = self.config(credential)
            self._targets[credential] = [
                self.registry.target(t.type).build(t, self.services) for t in cfg.targets
            ]
        return self._targets[credential]

    def probes(self, credential: str) -> list[Any]:
        if credential not in self._probes:
            cfg = self.config(credential)
            self._probes[credential] = [
                self.registry.probe(p.type).build(p, self.services) for p in cfg.probes
            ]
        return self._probes[credential]


class BlockingPool:
    """A bounded pool for plugins' blocking calls, so a slow synchronous client cannot take
    the threads the store's calls use, nor grow without bound."""

    def __init__(self, threads: int) -> None:
        self.threads = max(1, threads)

    @cached_property
    def _pool(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="keyturn-plugin")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args))


class OperatorInterrupt(Exception):
    """An operator request arrived; unwind to the action boundary and carry it out."""


class WorkerStopping(Exception):
    """The worker was asked to stop; leave the rotation at this action boundary."""


async def db(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking store call off the event loop."""
    return await asyncio.to_thread(fn, *args, **kwargs)


class RotationRun:
    """The worker's (or an operator command's) handle on one leased rotation."""

    def __init__(
        self,
        deps: EngineDeps,
        rotation: Rotation,
        owner: str,
        *,
        leased_at: float | None = None,
        logger: Any = None,
        batcher: CommitBatcher | None = None,
        loaders: Loaders | None = None,
        hold_writes: bool = False,
        stopping: asyncio.Event | None = None,
        keep_sessions: bool = False,
    ) -> None:
        self.deps = deps
        self.owner = owner
        settings = deps.settings
        self.lease = Lease(
            rotation.id,
            owner,
            seconds=settings.lease_seconds,
            margin=settings.lease_margin_seconds,
            leased_at=leased_at,
        )
        self.unit = UnitOfWork(
            deps.store,
            rotation,
            batcher=batcher,
            hold=hold_writes,
            crash_hook=deps.crash_hook,
            on_lease=self.lease.renewed,
        )
        self.loaders = loaders if loaders is not None else Loaders.direct(deps.store)
        #: Set by the worker when it is asked to stop; checked at every action boundary.
        self.stopping = stopping
        # A worker passes a concrete logger: binding from it is cheap, from the lazy module
        # proxy each bind builds a logger anew.
        self.log = (logger or log).bind(rotation=rotation.id, credential=rotation.credential)
        self.actions = ActionLog(self)
        #: Keep a kind's provider session for the run's later steps (a worker's run, whose
        #: steps follow one another at once), closed by :meth:`close_sessions`; otherwise a
        #: session lasts one step.
        self.keep_sessions = keep_sessions
        self._sessions: dict[str, tuple[Any, str | None]] = {}
        #: The evidence names a step of this run last read (None: it read none); evidence
        #: recorded while the run holds the lease does not make the rotation due.
        self.evidence_seen: frozenset[str] | None = None

    @property
    def rotation(self) -> Rotation:
        return self.unit.rotation

    def now(self) -> datetime:
        return self.deps.clock.now()

    # ------------------------------------------------------------------ the lease

    async def renew(self) -> None:
        await self.unit.write(updates=self.lease.updates(self.now()))

    async def ensure_lease(self) -> None:
        """Before an external call: renew unless the lease has a safe margin left."""
        if self.lease.wants_renewal():
            await self.renew()
        self.lease.check()

    def fence(self) -> None:
        self.lease.fence()

    async def boundary(self) -> None:
        """An action boundary without a database read: stop if asked, keep the lease. Operator
        requests are seen in the row every commit returns (the intent commit comes next)."""
        if self.stopping is not None and self.stopping.is_set():
            raise WorkerStopping()
        await self.ensure_lease()

    async def check_boundary(self) -> None:
        """An action boundary that reads the row: notice an operator request (and a lost
        lease) before acting, in long waits inside a step."""
        current = await self.unit.refresh()
        if current.request is not None:
            raise OperatorInterrupt()
        if self.stopping is not None and self.stopping.is_set():
            raise WorkerStopping()
        await self.ensure_lease()

    # ------------------------------------------------------------------ provider sessions

    async def open_session(self, kind: KindPlugin, signer_key: str | None = None) -> Any:
        """The provider session of `kind` for a step: the run's own when it keeps sessions (one
        per run: the store reads behind it, its client and its connections, made once).
        `signer_key` is the key the step signs with (the signing credential's key_ref, read at
        the step's start): a kept session opened for another key is closed and a new one opened,
        so a step never signs with a key its signer was rotated away from during the run."""
        kept = self._sessions.get(kind.name)
        if kept is not None:
            session, opened_for = kept
            if opened_for == signer_key:
                return session
            del self._sessions[kind.name]
            await self._close_quietly(session)
        session = await kind.open_session(self.deps.services, self.rotation, self.fence)
        if self.keep_sessions:
            self._sessions[kind.name] = (session, signer_key)
        return session

    async def done_with_session(self, kind: KindPlugin, session: Any) -> None:
        """A step is done with `session`: closed now unless the run keeps it."""
        kept = self._sessions.get(kind.name)
        if kept is None or kept[0] is not session:
            await _close(session)

    async def close_sessions(self) -> None:
        sessions, self._sessions = [s for s, _ in self._sessions.values()], {}
        for session in sessions:
            await self._close_quietly(session)

    async def _close_quietly(self, session: Any) -> None:
        try:
            await _close(session)
        except Exception:  # closing never decides a rotation's fate
            self.log.warning("could not close a provider session", exc_info=True)

    # ------------------------------------------------------------------ reads

    async def secret(self, secret_id: str) -> SealedSecret:
        """A sealed secret of this rotation, read once per run."""
        sealed = self.unit.sealed.get(secret_id)
        if sealed is None:
            found = await self.loaders.secrets.load(secret_id)
            if found is None:
                raise NotFound(f"no secret with id {secret_id}")
            sealed = self.unit.sealed[secret_id] = found
        return sealed

    async def credential(self) -> ManagedCredential:
        """The managed credential this rotation rotates, as the store holds it now."""
        name = self.rotation.credential
        found = await self.loaders.credentials.load(name)
        if found is None:
            raise NotFound(f"no managed credential named {name}; see `keyturn credentials list`")
        return found

    # ------------------------------------------------------------------ transitions

    async def transition(
        self,
        trigger: Trigger,
        *,
        actor: str | None = None,
        reason: str | None = None,
        detail: Detail | None = None,
        updates: Mapping[str, Any] | None = None,
        credential: ManagedCredential | None = None,
        purge_after: Mapping[str, datetime | None] | None = None,
    ) -> Rotation:
        """Fire `trigger` and persist it with its event in one compare-and-set (held for the
        next write when the unit holds writes)."""
        source = self.rotation.state
        dest = fire(source, trigger)
        now = self.now()
        fields: dict[str, Any] = {
            "state": dest,
            "attempts": 0,
            "last_error": None,
            "next_attempt_at": None,
            # a rollback of a finished rotation makes it unfinished again
            "finished_at": now if dest in FINAL_STATES else None,
            **(updates or {}),
        }
        event = Event(
            rotation_id=self.rotation.id,
            at=now,
            kind="transition",
            actor=actor or self.owner,
            from_state=source.value,
            to_state=dest.value,
            trigger=trigger.value,
            reason=reason,
            detail=detail or {},
        )
        rotation = await self.unit.add(
            updates=fields,
            events=[event],
            credential=credential,
            purge_after=purge_after,
            hook=f"transition.{trigger.value}.after_commit",
        )
        self.log.info("transition", trigger=trigger.value, from_state=source, to_state=dest)
        return rotation

    async def release(self) -> None:
        """Give the lease back (writing what is held)."""
        try:
            await self.unit.write(updates={"lease_owner": None, "lease_expires_at": None})
        except StaleVersion:
            self.log.warning("lease lost before release")


async def _close(session: Any) -> None:
    close = getattr(session, "aclose", None)
    if close is not None:
        await close()


def new_secret_id() -> str:
    return f"sec_{uuid.uuid4().hex}"


def new_rotation_id() -> str:
    return f"rot_{uuid.uuid4().hex[:20]}"
