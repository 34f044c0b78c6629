"""Running a kind's declared step: its actions with intent before effect, its waits without a
lease, its final transition. The kind only declares and performs; the engine does the rest."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

from keyturn.domain.errors import KeyturnError, ProviderError
from keyturn.domain.lifecycle import Trigger
from keyturn.domain.model import (
    ActionRecord,
    ActionStatus,
    Event,
    ManagedCredential,
    Phase,
    Rotation,
)
from keyturn.domain.reminders import (
    OVERDUE_SUFFIX,
    PERSON_SUFFIX,
    Reminders,
    Sent,
    decide,
    overdue_words,
)
from keyturn.engine.run import RotationRun, db, new_secret_id
from keyturn.engine.spi import (
    Action,
    CredentialConfig,
    Detail,
    Finish,
    KindPlugin,
    Outcome,
    RotationData,
    Services,
    Wait,
    always,
)
from keyturn.ports import Keys

D = TypeVar("D", bound=RotationData)
S = TypeVar("S")

#: The rotation fields of a wait, cleared when it ends.
CLEAR_WAIT: dict[str, Any] = {
    "wait_key": None,
    "wait_for": None,
    "wait_since": None,
    "wait_deadline": None,
}


class Waiting(Exception):
    """The step waits: record what for, release the lease, check again at `next_check`."""

    def __init__(
        self,
        key: str,
        what: str,
        since: datetime,
        deadline: datetime,
        next_check: datetime,
        *,
        announce: bool = True,
    ) -> None:
        super().__init__(what)
        self.key = key
        self.what = what
        self.since = since
        self.deadline = deadline
        self.next_check = next_check
        #: A change of what it waits for is an event (and a ``waiting`` notification).
        self.announce = announce

    def updates(self) -> dict[str, Any]:
        return {
            "wait_key": self.key,
            "wait_for": self.what,
            "wait_since": self.since,
            "wait_deadline": self.deadline,
            "next_attempt_at": self.next_check,
        }


class WaitExpired(KeyturnError):
    """A wait reached its deadline: the rotation halts with this reason. `person`: the wait
    was on that person, whom keyturn cannot act for (resuming finds the deadline passed)."""

    def __init__(self, message: str, *, person: str | None = None) -> None:
        super().__init__(message)
        self.person = person


@dataclass(frozen=True)
class StepFacts:
    data: Any
    records: dict[tuple[Phase, str], ActionRecord]
    targets: Sequence[str]
    probes: Sequence[str]
    target: str | None = None

    def recorded(self, phase: Phase, name: str) -> bool:
        return (phase, name) in self.records

    def done(self, phase: Phase, name: str) -> bool:
        record = self.records.get((phase, name))
        return record is not None and record.status is ActionStatus.DONE


class StepContext(Generic[D, S]):
    """What a kind's actions see: the typed data, the provider session, the targets and probes,
    and the few engine services an action needs (seal, open, the credential, the time)."""

    def __init__(
        self,
        run: RotationRun,
        kind: KindPlugin,
        session: S,
        config: CredentialConfig,
    ) -> None:
        self._run = run
        self.kind = kind
        self.session = session
        self.config = config
        self._data: D = kind.data_model.model_validate(run.rotation.data)  # type: ignore[assignment]
        self._sealed: list[Any] = []
        self._dirty = False
        self._target: str | None = None

    @property
    def rotation(self) -> Rotation:
        return self._run.rotation

    @property
    def data(self) -> D:
        return self._data

    @property
    def targets(self) -> list[Any]:
        return self._run.deps.targets(self.rotation.credential)

    @property
    def probes(self) -> list[Any]:
        return self._run.deps.probes(self.rotation.credential)

    @property
    def target(self) -> Any:
        """The target of the action being performed, when it is declared ``each_target``."""
        for t in self.targets:
            if t.name == self._target:
                return t
        raise KeyturnError(f"no deploy target named {self._target!r} is configured")

    @property
    def keys(self) -> Keys:
        return self._run.deps.keys

    @property
    def services(self) -> Services:
        return self._run.deps.services

    @property
    def retention(self) -> timedelta:
        return self._run.deps.settings.retention

    def now(self) -> datetime:
        return self._run.now()

    def schedule_now(self) -> datetime:
        """The schedule's time (what waits, deadlines and a person's due date run on)."""
        return self._run.deps.time.now()

    def fence(self) -> None:
        """Call before every request to the outside world a session does not fence itself."""
        self._run.fence()

    def update(self, **changes: Any) -> None:
        """Change the rotation data (written with the rotation's next commit)."""
        self._data = self._data.model_copy(update=changes)
        self._dirty = True

    def seal(self, purpose: str, plaintext: bytes) -> str:
        """Encrypt material keyturn made; written before the next external call. Its id."""
        ref = new_secret_id()
        self._sealed.append(self._run.deps.vault.seal(ref, purpose, plaintext))
        self._dirty = True
        return ref

    def take_sealed(self) -> list[Any]:
        """What :meth:`seal` made since the last save, to return in an :class:`Outcome` (written
        with the outcome, at once) instead of with the next commit."""
        sealed, self._sealed = self._sealed, []
        return sealed

    async def open(self, ref: str) -> bytes:
        return self._run.deps.vault.open(await self._run.secret(ref))

    async def credential(self) -> ManagedCredential:
        return await self._run.credential()

    async def record(self, phase: Phase, name: str) -> ActionRecord | None:
        return await self._run.actions.get(phase, name)

    async def evidence(self) -> dict[str, Detail]:
        """The evidence recorded on this rotation from outside a worker (a person's page, a
        holder), by name: its detail, with the time it was recorded under "at" (ISO)."""
        found = await db(self._run.deps.store.evidence, self.rotation.id)
        self._run.evidence_seen = frozenset(found)
        return {name: {**e.detail, "at": e.at.isoformat()} for name, e in found.items()}

    async def check_boundary(self) -> None:
        """Inside a long action: notice an operator request or a stop."""
        await self.save()
        await self._run.check_boundary()

    def dumped(self) -> dict[str, Any]:
        return self._data.model_dump(mode="json", exclude_none=True)

    async def save(self) -> None:
        if self._dirty:
            sealed, self._sealed = self._sealed, []
            self._dirty = False
            await self._run.unit.add(updates={"data": self.dumped()}, secrets=sealed)

    async def facts(self, target: str | None = None) -> StepFacts:
        return StepFacts(
            self._data,
            await self._run.actions.records(),
            [t.name for t in self.targets],
            [p.name for p in self.probes],
            target,
        )


async def run_step(run: RotationRun, trigger: Trigger) -> None:
    """Run the rotation's step for `trigger` and fire it."""
    deps = run.deps
    kind = deps.registry.kind(run.rotation.kind)
    step = kind.steps.get(trigger)
    if step is None:
        raise KeyturnError(f"kind {kind.name} declares no step for {trigger.value}")
    config = deps.config(run.rotation.credential)
    signer = kind.signer(config)
    signer_ref = await _key_ref(run, signer) if signer else None
    session = await run.open_session(kind, signer_ref)
    try:
        ctx: StepContext[Any, Any] = StepContext(run, kind, session, config)
        for item in step.expand([t.name for t in ctx.targets]):
            target = item.target if isinstance(item, Action) else None
            if item.when is not always and not item.when(await ctx.facts(target)):
                continue
            if isinstance(item, Wait):
                await _wait(run, ctx, item)
            else:
                if item.irreversible:
                    from keyturn.engine.gates import before_irreversible

                    await ctx.save()
                    await before_irreversible(run, item)
                ctx._target = target
                try:
                    await _perform(run, ctx, item, signer, signer_ref)
                finally:
                    ctx._target = None
        finish = await step.finish(ctx) if step.finish is not None else Finish()
        await ctx.save()  # the data, if it changed, is held for the transition's write
        await run.transition(
            trigger,
            detail=finish.detail,
            updates=CLEAR_WAIT if run.rotation.wait_key is not None else None,
            credential=finish.credential,
            purge_after=finish.purge_after,
        )
    finally:
        await run.done_with_session(kind, session)


async def _perform(
    run: RotationRun,
    ctx: StepContext[Any, Any],
    action: Action[Any],
    signer: str | None,
    signer_ref: str | None,
) -> Detail:
    async def call() -> Detail | Outcome:
        try:
            return await action.run(ctx)
        except ProviderError as exc:
            raise await _signer_refusal(run, exc, signer, signer_ref) from None

    async def prepare() -> None:
        if action.prepare is not None:
            await action.prepare(ctx)
        await ctx.save()

    reconcile = action.reconcile
    detail = await run.actions.perform(
        action.phase,
        action.name,
        call,
        reconcile=(lambda: reconcile(ctx)) if reconcile is not None else None,
        intent=(lambda: action.intent(ctx)) if action.intent is not None else None,  # type: ignore[misc]
        prepare=prepare,
    )
    if action.done is not None:
        action.done(ctx, detail)
        await ctx.save()
    return detail


_REFUSED = frozenset({401, 403})


async def _key_ref(run: RotationRun, name: str) -> str | None:
    found = await run.loaders.credentials.load(name)
    return found.key_ref if found is not None else None


async def _signer_refusal(
    run: RotationRun, exc: ProviderError, signer: str | None, signer_ref: str | None
) -> ProviderError:
    """A call signed by another managed credential that keyturn is rotating: when the provider
    refuses the signer because its old key was deactivated a moment before the store points at
    the new one, the refusal is transient; the next attempt signs with the new key."""
    refused = exc.code == "credential_not_allowed" or exc.status in _REFUSED
    if signer is None or exc.retryable or not refused:
        return exc
    store = run.deps.store
    latest = await db(store.latest_rotation, signer)
    moving = (latest is not None and not latest.finished) or (
        await db(store.get_credential, signer)
    ).key_ref != signer_ref
    if not moving:
        return exc
    return ProviderError(
        f"{exc} (the signer {signer} is being rotated; retrying with its new key)",
        retryable=True,
        status=exc.status,
        code=exc.code,
        outcome_unknown=exc.outcome_unknown,
    )


async def _wait(run: RotationRun, ctx: StepContext[Any, Any], wait: Wait[Any]) -> None:
    key = f"{wait.phase.value}.{wait.name}"
    pending = await wait.check(ctx)
    rotation = run.rotation
    if pending is None:
        if rotation.wait_key is not None:
            await run.unit.add(updates=CLEAR_WAIT)
        return
    await ctx.save()
    reminders = wait.remind(ctx) if wait.remind is not None else None
    if reminders is not None:
        await _person_wait(run, ctx, wait, key, pending, reminders)
        return
    # deadlines on the schedule's clock (a test may run it faster); the next check on ours
    time = run.deps.time
    now = time.now()
    same = rotation.wait_key == key
    since = rotation.wait_since if same and rotation.wait_since is not None else now
    deadline = (
        rotation.wait_deadline
        if same and rotation.wait_deadline is not None
        else now + timedelta(seconds=wait.deadline(ctx))
    )
    if now >= deadline:
        raise WaitExpired(
            f"waited for {pending} since {_when(since)}; its deadline {_when(deadline)} passed"
        )
    next_check = min(deadline, now + timedelta(seconds=max(0.0, wait.every(ctx))))
    raise Waiting(key, pending, since, deadline, time.to_local(next_check))


async def _person_wait(
    run: RotationRun,
    ctx: StepContext[Any, Any],
    wait: Wait[Any],
    key: str,
    pending: str,
    r: Reminders,
) -> None:
    """A wait on a person: the reminders due since the last one as one ``reminder`` event, the
    escalation at ``due``, then a halt or an overdue wait (``on_due``). What was sent is read
    from the rotation's events, so a worker killed after a commit never sends it again."""
    time = run.deps.time
    now = time.now()
    rotation = run.rotation
    same = rotation.wait_key in (key + PERSON_SUFFIX, key + OVERDUE_SUFFIX)
    since = rotation.wait_since if same and rotation.wait_since is not None else now
    sent = sent_reminders(await db(run.deps.store.events, rotation.id), key, since, r.due)
    decision = decide(r, since, sent, now)
    events: list[Event] = []
    if decision.remind:
        events.append(
            _person_event(run, key, "reminder", r, now, since, pending, n=sent.count + 1,
                          scheduled=decision.scheduled)
        )  # fmt: skip
    if decision.escalate:
        events.append(_person_event(run, key, "escalated", r, now, since, pending))
    if events:
        await run.unit.add(events=events)
    if decision.overdue and r.on_due == "halt":
        raise WaitExpired(
            f"{r.person} did not act by {_when(r.due)} (waited for {pending} since "
            f"{_when(since)}); keyturn cannot act for them",
            person=r.person,
        )
    every = timedelta(seconds=max(0.0, wait.every(ctx)))
    if decision.overdue:  # reported: left waiting, overdue, checked every `every`
        raise Waiting(
            key + OVERDUE_SUFFIX,
            overdue_words(r.person, r.due),
            since,
            r.due,
            time.to_local(now + every),
            announce=False,  # the escalation (if any) says so
        )
    upcoming = decision.next_at or r.due
    next_check = time.to_local(min(now + every, upcoming))
    raise Waiting(key + PERSON_SUFFIX, pending, since, r.due, next_check)


def sent_reminders(
    events: Sequence[Event], key: str, since: datetime, due: datetime | None = None
) -> Sent:
    """What the events of a wait (its key, begun at `since`) say was sent to its person. The
    escalation is the task's, once per `due`: a wait begun again (a halted one resumed) does
    not escalate the same deadline twice."""
    count, last, snoozed, escalated = 0, None, 0, False
    for e in events:
        d = e.detail
        if e.kind != "run" or d.get("wait") != key:
            continue
        if due is not None and d.get("status") == "escalated" and _same_instant(d.get("due"), due):
            escalated = True
        if not _same_instant(d.get("since"), since):
            continue
        if d.get("status") == "reminder":
            count += 1
            last = datetime.fromisoformat(str(d["at"]))
            snoozed = int(d.get("snoozed", 0))
        elif d.get("status") == "escalated":
            escalated = True
    return Sent(count, last, snoozed, escalated)


def _same_instant(text: object, at: datetime) -> bool:
    """An event's recorded instant is `at` (to the second: a database may round)."""
    try:
        found = datetime.fromisoformat(str(text))
    except ValueError:
        return False
    if found.tzinfo is None:
        found = found.replace(tzinfo=UTC)
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return abs((found - at).total_seconds()) < 1.0


def _person_event(
    run: RotationRun,
    key: str,
    status: str,
    r: Reminders,
    now: datetime,
    since: datetime,
    pending: str,
    *,
    n: int | None = None,
    scheduled: datetime | None = None,
) -> Event:
    rotation = run.rotation
    detail: dict[str, Any] = {
        "status": status,
        "wait": key,
        "since": since.isoformat(),
        "to": r.person,
        "due": r.due.isoformat(),
        "link_ref": r.link_ref,
        # the schedule's time (what a receiver checks the offsets against)
        "at": now.isoformat(),
        "snoozed": r.snoozes_counted,
    }
    if n is not None:
        detail["reminder"] = n
    if scheduled is not None:
        detail["scheduled"] = scheduled.isoformat()
    if status == "reminder":
        reason = f"reminded {r.person} (reminder {n}) to act by {_when(r.due)}: {pending}"
    else:
        reason = f"escalated: {r.person} did not act by {_when(r.due)}" + (
            " (left waiting, overdue)" if r.on_due == "report" else ""
        )
    return Event(
        rotation_id=rotation.id,
        at=run.now(),
        kind="run",
        actor=run.owner,
        trigger=key.split(".", 1)[0],
        from_state=rotation.state.value,
        reason=reason,
        detail=detail,
    )


def _when(at: datetime) -> str:
    return at.isoformat(timespec="seconds")
