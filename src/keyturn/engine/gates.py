"""Gates of a policy on a rotation in flight: approval before it starts; bake time, approval,
freezes and windows before its switching-off step (the ``deactivate_old`` step, whatever the
kind does in it) and before every action a kind declares irreversible.

A closed gate is a wait like a kind's own (:class:`keyturn.engine.steps.Waiting`): what for and
until when is recorded, the lease and the worker slot are given back, and the rotation is
claimed again when the gate opens (an approval or a denial makes it due at once). Only an
approval has a deadline that halts (``approval_timeout``). Times are on the schedule's clock.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from keyturn.domain.lifecycle import State, Trigger
from keyturn.domain.model import Event, Phase
from keyturn.domain.schedule import Policy, format_duration, gate
from keyturn.engine.operator import APPROVAL_KEY
from keyturn.engine.run import RotationRun, db
from keyturn.engine.spi import Action
from keyturn.engine.steps import WaitExpired, Waiting

#: A closed freeze or window gate is looked at again at least this often (schedule seconds), so
#: a freeze removed from the configuration is noticed.
RECHECK = timedelta(hours=1)


def policy_of(run: RotationRun) -> Policy | None:
    book = run.deps.schedule
    return book.policy_of(run.rotation.credential) if book is not None else None


async def before_step(run: RotationRun, trigger: Trigger) -> None:
    """Raise Waiting (or WaitExpired) when the policy holds the step back now."""
    policy = policy_of(run)
    if policy is None:
        return
    if trigger is Trigger.ADD_NEW and policy.approval == "before_start":
        if run.rotation.state is State.PENDING and not await _started(run, trigger):
            await _approval(run, policy, "before_start", since=run.rotation.created_at)
        return
    if trigger is not Trigger.DEACTIVATE_OLD or await _started(run, trigger):
        return
    if policy.bake > timedelta(0) or policy.approval == "before_deactivate":
        verified_at = await _entered(run, State.VERIFIED)
        if policy.bake > timedelta(0):
            _bake(run, policy, verified_at)
        if policy.approval == "before_deactivate":
            await _approval(run, policy, "before_deactivate", since=verified_at)
    _freeze_or_window(run, policy, "deactivate_old")


async def before_irreversible(run: RotationRun, action: Action[object]) -> None:
    """Before the intent of an irreversible action: freezes and windows."""
    policy = policy_of(run)
    if policy is None or not action.irreversible:
        return
    if await run.actions.get(action.phase, action.name) is not None:
        return  # under way: finish it (reconcile, then the outcome)
    _freeze_or_window(run, policy, action.name)


async def _started(run: RotationRun, trigger: Trigger) -> bool:
    """Has any action of the step recorded an intent (the step is under way)?"""
    kind = run.deps.registry.kind(run.rotation.kind)
    step = kind.steps.get(trigger)
    if step is None:
        return False
    records = await run.actions.records()
    names = {
        a.name
        for a in step.expanded_actions([t.name for t in run.deps.targets(run.rotation.credential)])
    }
    return any(phase is Phase.FORWARD and name in names for phase, name in records)


async def _events(run: RotationRun) -> list[Event]:
    return await db(run.deps.store.events, run.rotation.id)


async def _entered(run: RotationRun, state: State) -> datetime:
    """When the rotation last entered `state` (schedule time)."""
    entered = run.rotation.updated_at
    for e in await _events(run):
        if e.kind == "transition" and e.to_state == state.value:
            entered = e.at
    return run.deps.time.of_local(entered)


def _waiting(
    run: RotationRun, key: str, what: str, since: datetime, deadline: datetime, opens: datetime
) -> Waiting:
    t = run.deps.time
    return Waiting(key, what, since, deadline, t.to_local(min(opens, deadline)))


def _bake(run: RotationRun, policy: Policy, verified_at: datetime) -> None:
    until = verified_at + policy.bake
    now = run.deps.time.now()
    if now < until:
        what = (
            f"bake time: {format_duration(policy.bake)} in verified before the old side is "
            f"switched off (policy {policy.name}, until {until.isoformat(timespec='seconds')})"
        )
        raise _waiting(run, "gate.bake", what, verified_at, until, until)


async def _approval(run: RotationRun, policy: Policy, stage: str, *, since: datetime) -> None:
    after = since if stage == "before_deactivate" else run.deps.time.of_local(since)
    for e in await _events(run):
        if (
            e.kind == "operator"
            and e.trigger == "approve"
            and e.detail.get("status") == "applied"
            and run.deps.time.of_local(e.at) >= after - timedelta(seconds=1)
        ):
            return
    rotation = run.rotation
    key = f"{APPROVAL_KEY}.{stage}"
    now = run.deps.time.now()
    began = rotation.wait_since if rotation.wait_key == key and rotation.wait_since else now
    deadline = began + policy.approval_timeout
    step = "the rotation starts" if stage == "before_start" else "the old side is switched off"
    if now >= deadline:
        raise WaitExpired(
            f"approval not given within approval_timeout {format_duration(policy.approval_timeout)}"
            f" (policy {policy.name}; awaited since {began.isoformat(timespec='seconds')})"
        )
    what = (
        f"approval before {step} (policy {policy.name}): `keyturn rotations approve "
        f"{rotation.id} --reason ...` or `deny`; until {deadline.isoformat(timespec='seconds')}"
    )
    raise _waiting(run, key, what, began, deadline, deadline)


def _freeze_or_window(run: RotationRun, policy: Policy, what_for: str) -> None:
    book = run.deps.schedule
    assert book is not None
    now = run.deps.time.now()
    closed = gate(policy, book.freezes, now)
    if closed is None:
        return
    opens, why = closed
    key = "gate.freeze" if why.startswith("freeze") else "gate.window"
    rotation = run.rotation
    since = rotation.wait_since if rotation.wait_key == key and rotation.wait_since else now
    what = f"{why}; {what_for} waits until {opens.isoformat(timespec='seconds')}"
    raise _waiting(run, key, what, since, opens + timedelta(days=1), min(opens, now + RECHECK))
