"""Operator actions: validated requests recorded in the store, carried out by the lease holder
(or the next claimer) at an action boundary."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from keyturn.domain.errors import KeyturnError, StaleVersion, TransitionRefused
from keyturn.domain.lifecycle import GuardFacts, State, Trigger, check_guards
from keyturn.domain.model import (
    Event,
    ManagedCredential,
    OperatorAction,
    OperatorRequest,
    Phase,
    Rotation,
)
from keyturn.engine.attention import revision, status_key

# the list, for the web layer (it lives in a module a read command loads cheaply)
from keyturn.engine.listing import list_rotations as list_rotations
from keyturn.engine.registry import Registry
from keyturn.engine.run import EngineDeps, RotationRun, db, new_rotation_id
from keyturn.engine.steps import CLEAR_WAIT
from keyturn.ports import Change, Clock, Store

#: The trigger name of the retry-now verb in the timeline (it is no OperatorAction: nothing
#: waits for a lease holder, it only moves a backing-off rotation's next attempt to now).
RETRY_NOW = "retry-now"

#: wait_key prefix of a policy's approval gate (see keyturn.engine.gates).
APPROVAL_KEY = "gate.approval"

#: How often a verb re-reads and retries its compare-and-set when a worker wrote the row in
#: between (a lease renewal, an action commit): each try checks the revision anew.
CAS_TRIES = 8


class RevisionChanged(KeyturnError):
    """An ``If-Match`` names a revision the rotation no longer has (HTTP 412)."""

    def __init__(self, rotation: Rotation) -> None:
        self.rotation = rotation
        self.current = revision(rotation)
        super().__init__(
            f"rotation {rotation.id} changed since you read it (revision now {self.current}, "
            f"now {rotation.state.value}, {status_key(rotation)}); read it again and decide anew"
        )


def check_revision(rotation: Rotation, revisions: Collection[str] | None) -> None:
    """RevisionChanged unless `revisions` is None or names the rotation's revision."""
    if revisions is not None and revision(rotation) not in revisions:
        raise RevisionChanged(rotation)


def guard_facts(store: Store, registry: Registry, rotation: Rotation) -> GuardFacts:
    actions = store.actions(rotation.id)
    latest = store.latest_rotation(rotation.credential)
    kind = registry.kind(rotation.kind)
    retained = True
    for ref in kind.retained(kind.data_model.model_validate(rotation.data)):
        sealed = store.get_secret(ref)
        retained = retained and sealed.purged_at is None and bool(sealed.ciphertext)
    return GuardFacts(
        any_intent=any(a.phase is Phase.FORWARD for a in actions),
        is_latest=latest is None or latest.id == rotation.id,
        old_key_retained=retained,
        irreversible_reason=registry.irreversible_reason(rotation, actions),
    )


def validate(store: Store, registry: Registry, rotation: Rotation, action: OperatorAction) -> None:
    """Raise a one-line error if `action` cannot apply to `rotation` now."""
    if action is OperatorAction.ROLLBACK:
        check_guards(rotation.state, Trigger.ROLLBACK, guard_facts(store, registry, rotation))
    elif action is OperatorAction.CANCEL:
        check_guards(rotation.state, Trigger.CANCEL, guard_facts(store, registry, rotation))
    elif rotation.finished:
        raise TransitionRefused(rotation.state.value, action.value, "the rotation is finished")
    elif action is OperatorAction.RELEASE_LEASE:
        return  # whether there is a lease to release is asked when it is requested
    elif action is OperatorAction.RESUME and not (rotation.paused or rotation.halted_reason):
        raise TransitionRefused(
            rotation.state.value,
            action.value,
            "it is neither halted nor paused; nothing to resume",
        )
    elif action is OperatorAction.PAUSE and rotation.paused:
        raise TransitionRefused(rotation.state.value, action.value, "it is already paused")
    elif action in (OperatorAction.APPROVE, OperatorAction.DENY):
        if not (rotation.wait_key or "").startswith(APPROVAL_KEY):
            raise TransitionRefused(
                rotation.state.value,
                action.value,
                "it is not awaiting approval"
                + (f" (it is waiting for {rotation.wait_for})" if rotation.wait_for else ""),
            )
        if action is OperatorAction.DENY and not _denied_without_intent(store, rotation):
            check_guards(rotation.state, Trigger.ROLLBACK, guard_facts(store, registry, rotation))


def _denied_without_intent(store: Store, rotation: Rotation) -> bool:
    """A denial of a rotation that has done nothing yet cancels it (else it rolls back)."""
    return rotation.state is State.PENDING and not any(
        a.phase is Phase.FORWARD for a in store.actions(rotation.id)
    )


def applies(store: Store, registry: Registry, rotation: Rotation, action: OperatorAction) -> bool:
    try:
        validate(store, registry, rotation, action)
    except KeyturnError:
        return False
    return True


def halt_advice_plain(rotation: Rotation, person: str | None = None) -> str:
    """The advice without the store: resume (after a person's deadline, that it would not
    help)."""
    if person is not None:
        return f"Only {person} can act, and their deadline has passed: resuming halts again"
    return f"Fix the cause, then run `keyturn rotations resume {rotation.id} --reason ...`"


def halt_advice(
    store: Store, registry: Registry, rotation: Rotation, *, person: str | None = None
) -> str:
    """What to do about a rotation that halts now, naming only commands that apply to it in
    its state (resume always does once it is halted, but after a person's deadline it finds
    the deadline passed again; cancel and rollback only where their guards allow)."""
    advice = halt_advice_plain(rotation, person)
    rollback = f"`keyturn rotations rollback {rotation.id} --reason ...`"
    if person is not None:
        if applies(store, registry, rotation, OperatorAction.CANCEL):
            advice += f"; cancel it with `keyturn rotations cancel {rotation.id} --reason ...`"
        elif applies(store, registry, rotation, OperatorAction.ROLLBACK):
            advice += f"; roll it back with {rollback}"
        return advice + f" (until then {person} keeps what they hold now)"
    if applies(store, registry, rotation, OperatorAction.ROLLBACK):
        advice += f" (or roll back with {rollback})"
    elif rotation.state is State.ROLLING_BACK:
        advice += " (the rollback carries on from where it stopped)"
    return advice


def release_refusal(rotation: Rotation, now: datetime) -> str | None:
    """Why `release-lease` cannot be requested now; None when a lease is held."""
    if rotation.finished:
        return f"the rotation is finished ({rotation.state.value}); it holds no lease"
    if rotation.lease_owner is None or rotation.lease_expires_at is None:
        return "no worker holds its lease; any worker may claim it now"
    if rotation.lease_expires_at <= now:
        return (
            f"the lease of {rotation.lease_owner} expired at "
            f"{rotation.lease_expires_at.isoformat(timespec='seconds')}; the next worker to "
            "poll claims it"
        )
    return None


def record_request(
    store: Store,
    registry: Registry,
    clock: Clock,
    rotation_id: str,
    action: OperatorAction,
    actor: str,
    reason: str,
    *,
    revisions: Collection[str] | None = None,
) -> Rotation:
    """Validate and record an operator request, as one compare-and-set on the rotation as
    read (its version, and no request pending): what was checked on the read (the verb
    applies, `revisions` names its revision) still holds when the request lands. A write in
    between (a lease renewal) makes it read and check again."""
    if not reason.strip():
        raise KeyturnError("a reason is required for every operator action; pass --reason TEXT")
    for _ in range(CAS_TRIES):
        rotation = store.get_rotation(rotation_id)
        check_revision(rotation, revisions)
        validate(store, registry, rotation, action)
        if rotation.request is not None:
            raise KeyturnError(
                f"rotation {rotation_id} already has a pending {rotation.request.action.value} "
                f"request by {rotation.request.actor}; wait for a worker to carry it out"
            )
        now = clock.now()
        if action is OperatorAction.RELEASE_LEASE:
            refused = release_refusal(rotation, now)
            if refused is not None:
                raise TransitionRefused(rotation.state.value, action.value, refused)
        event = Event(
            rotation_id=rotation_id,
            at=now,
            kind="operator",
            actor=actor,
            trigger=action.value,
            reason=reason,
            from_state=rotation.state.value,
            detail={"status": "requested"}
            | ({"holder": rotation.lease_owner} if rotation.lease_owner else {}),
        )
        try:
            return store.request(
                rotation_id,
                OperatorRequest(action, actor, reason, now),
                event,
                expected_version=rotation.version,
            )
        except StaleVersion:
            continue
    raise KeyturnError(
        f"rotation {rotation_id} kept changing while the {action.value} was recorded; try again"
    )


async def request_action(
    deps: EngineDeps,
    rotation_id: str,
    action: OperatorAction,
    actor: str,
    reason: str,
    *,
    revisions: Collection[str] | None = None,
) -> tuple[Rotation, Applied | None]:
    """Record an operator request; if no worker holds the rotation, carry it out now (as the
    next claimer would). Returns the rotation after the request and what was applied, if any.
    `revisions`: what an If-Match names (RevisionChanged when the rotation has another)."""
    rotation = await db(
        record_request,
        deps.store,
        deps.registry,
        deps.clock,
        rotation_id,
        action,
        actor,
        reason,
        revisions=revisions,
    )
    now = deps.clock.now()
    if rotation.lease_owner and rotation.lease_expires_at and rotation.lease_expires_at > now:
        return rotation, None
    owner = f"operator:{actor}"
    run = RotationRun(deps, rotation, owner)
    try:
        await run.renew()
    except StaleVersion:  # a worker claimed it meanwhile; it carries the request out
        return await db(deps.store.get_rotation, rotation_id), None
    applied = await apply_request(run)
    await run.release()
    return run.rotation, applied


@dataclass(frozen=True)
class Applied:
    action: OperatorAction
    outcome: str  # "applied" or "refused: <reason>"
    #: The run must give its lease back now and stop (a release-lease its holder honoured).
    release: bool = False


async def apply_request(run: RotationRun) -> Applied:
    """Carry out the pending operator request of a leased rotation."""
    rotation = run.rotation
    request = rotation.request
    assert request is not None
    now = run.now()

    def note(status: str, **detail: Any) -> Event:
        return Event(
            rotation_id=rotation.id,
            at=now,
            kind="operator",
            actor=request.actor,
            trigger=request.action.value,
            reason=request.reason,
            from_state=rotation.state.value,
            detail={"status": status, **detail},
        )

    try:
        # the state may have moved on
        validate(run.deps.store, run.deps.registry, rotation, request.action)
    except KeyturnError as exc:
        await run.unit.write(updates={"request": None}, events=[note(f"refused: {exc}")])
        return Applied(request.action, f"refused: {exc}")
    # Every verb but pause ends a wait: a resumed rotation waits anew, with a new deadline.
    clear_halt = {"request": None, "paused": False, "halted_reason": None, **CLEAR_WAIT}
    if request.action is OperatorAction.RELEASE_LEASE:
        taken = rotation.lease_taken_at
        if taken is not None and taken > request.at:
            # claimed after the request: the lease it named ended (it ran out, never cut
            # short, or its holder released it) before its holder answered; this claimer
            # carries on
            ended = "expired" if rotation.lease_taken_from is not None else "released"
            await run.unit.write(
                updates={"request": None},
                events=[note("applied", lease=ended, holder=rotation.lease_taken_from,
                             claimed_by=run.owner)],
            )  # fmt: skip
            return Applied(request.action, "applied")
        # the holder honours it: the release that follows gives the lease back, in one commit
        await run.unit.add(
            updates={"request": None}, events=[note("applied", lease="released", holder=run.owner)]
        )
        return Applied(request.action, "applied", release=True)
    if request.action is OperatorAction.PAUSE:
        await run.unit.write(updates={"request": None, "paused": True}, events=[note("applied")])
    elif request.action is OperatorAction.APPROVE:
        # the gate finds this event and lets the step run
        await run.unit.write(
            updates={**clear_halt, "next_attempt_at": None}, events=[note("applied")]
        )
    elif request.action is OperatorAction.DENY:
        await run.unit.write(updates={}, events=[note("applied")])
        no_intent = await db(_denied_without_intent, run.deps.store, rotation)
        trigger = Trigger.CANCEL if no_intent else Trigger.ROLLBACK
        extra = {} if no_intent else {"rollback_from": State(rotation.state)}
        if not no_intent:
            facts = await db(guard_facts, run.deps.store, run.deps.registry, rotation)
            check_guards(rotation.state, Trigger.ROLLBACK, facts)
        await run.transition(
            trigger,
            actor=request.actor,
            reason=f"approval denied: {request.reason}",
            updates={**clear_halt, **extra},
        )
        await run.unit.flush()
    elif request.action is OperatorAction.RESUME:
        await run.unit.write(
            updates={**clear_halt, "attempts": 0, "last_error": None, "next_attempt_at": None},
            events=[note("applied")],
        )
    elif request.action is OperatorAction.CANCEL:
        await run.transition(
            Trigger.CANCEL, actor=request.actor, reason=request.reason, updates=clear_halt
        )
        await run.unit.flush()
    else:
        facts = await db(guard_facts, run.deps.store, run.deps.registry, rotation)
        check_guards(rotation.state, Trigger.ROLLBACK, facts)
        await run.transition(
            Trigger.ROLLBACK,
            actor=request.actor,
            reason=request.reason,
            updates={**clear_halt, "rollback_from": State(rotation.state)},
        )
        await run.unit.flush()
    return Applied(request.action, "applied")


def start_rotation(
    store: Store,
    registry: Registry,
    clock: Clock,
    *,
    credential: str,
    reason: str,
    actor: str,
    options: Mapping[str, Any],
    rotation_id: str | None = None,
) -> Rotation:
    """Create a pending rotation of a managed credential, due now."""
    managed = store.get_credential(credential)
    rotation, event = new_rotation(
        registry,
        clock,
        managed,
        reason=reason,
        actor=actor,
        options=options,
        rotation_id=rotation_id,
    )
    return store.create_rotation(rotation, event)


def new_rotation(
    registry: Registry,
    clock: Clock,
    managed: ManagedCredential,
    *,
    reason: str,
    actor: str,
    options: Mapping[str, Any],
    rotation_id: str | None = None,
    detail: Mapping[str, Any] | None = None,
) -> tuple[Rotation, Event]:
    """A pending rotation of `managed`, due now, and its first event (not stored)."""
    kind = registry.kind(managed.kind)
    now = clock.now()
    rotation = Rotation(
        id=rotation_id or new_rotation_id(),
        credential=managed.name,
        kind=managed.kind,
        state=State.PENDING,
        version=1,
        reason=reason,
        created_at=now,
        updated_at=now,
        next_attempt_at=now,
        data=kind.start(managed, options).model_dump(mode="json", exclude_none=True),
        campaign=str(options["campaign"]) if options.get("campaign") else None,
    )
    event = Event(
        rotation_id=rotation.id,
        at=now,
        kind="operator",
        actor=actor,
        trigger="create",
        to_state=State.PENDING.value,
        reason=reason,
        detail={"options": dict(options), **(detail or {})},
    )
    return rotation, event


def retry_refusal(rotation: Rotation, now: datetime) -> str | None:
    """Why `retry-now` cannot apply to `rotation` now, in words naming what to do instead;
    None when it can (the rotation is backing off after a failed attempt)."""
    status = status_key(rotation)
    if rotation.finished:
        return f"the rotation is finished ({rotation.state.value}); there is nothing to retry"
    if status == "halted":
        return (
            "it is halted (its retry budget is spent or a step refused); resume it instead, "
            "which also gives it a fresh retry budget"
        )
    if status == "paused":
        return "it is paused; resume it instead"
    if status == "requested":
        assert rotation.request is not None
        return (
            f"a {rotation.request.action.value} request is pending; a worker carries it out first"
        )
    if status == "waiting":
        return (
            f"it is waiting for {rotation.wait_for}, not backing off after a failure; its next "
            "check comes on its own"
        )
    if status == "running":
        return f"a worker ({rotation.lease_owner}) holds it and is working on it now"
    if rotation.attempts == 0:
        return "no attempt has failed, so there is no backoff to skip; it is due already"
    if rotation.next_attempt_at is None or rotation.next_attempt_at <= now:
        return "its next attempt is due already; the next worker to poll claims it"
    return None


def retry_now(
    store: Store,
    clock: Clock,
    rotation_id: str,
    actor: str,
    reason: str,
    *,
    via: str = "cli",
    revisions: Collection[str] | None = None,
) -> Rotation:
    """Skip the backoff of a retrying rotation: its next attempt becomes now (one
    compare-and-set on its version, with the operator event; a write in between makes it read
    and check again). TransitionRefused, with the reason, when it is not backing off;
    RevisionChanged when `revisions` does not name the rotation's revision."""
    if not reason.strip():
        raise KeyturnError("a reason is required for every operator action; pass --reason TEXT")
    for _ in range(CAS_TRIES):
        try:
            return _retry_now(store, clock, rotation_id, actor, reason, via, revisions)
        except StaleVersion:
            continue  # a worker wrote in between: read and check again
    raise KeyturnError(f"rotation {rotation_id} kept changing while retry-now was recorded")


def _retry_now(
    store: Store,
    clock: Clock,
    rotation_id: str,
    actor: str,
    reason: str,
    via: str,
    revisions: Collection[str] | None,
) -> Rotation:
    rotation = store.get_rotation(rotation_id)
    check_revision(rotation, revisions)
    now = clock.now()
    refused = retry_refusal(rotation, now)
    if refused is not None:
        raise TransitionRefused(rotation.state.value, RETRY_NOW, refused)
    event = Event(
        rotation_id=rotation_id,
        at=now,
        kind="operator",
        actor=actor,
        trigger=RETRY_NOW,
        reason=reason,
        from_state=rotation.state.value,
        detail={
            "status": "applied",
            "via": via,
            "skipped_until": rotation.next_attempt_at.isoformat()
            if rotation.next_attempt_at
            else None,
        },
    )
    change = Change(rotation_id, rotation.version, updates={"next_attempt_at": now}, events=[event])
    return store.commit(change)


def audit_refusal(
    store: Store,
    clock: Clock,
    rotation: Rotation,
    verb: str,
    actor: str,
    reason: str,
    refusal: str,
    *,
    via: str,
) -> None:
    """Record in the timeline that an operator's `verb` was refused (nothing else changes)."""
    store.append_event(
        Event(
            rotation_id=rotation.id,
            at=clock.now(),
            kind="operator",
            actor=actor,
            trigger=verb,
            reason=reason,
            from_state=rotation.state.value,
            detail={"status": f"refused: {refusal}", "via": via},
        )
    )
