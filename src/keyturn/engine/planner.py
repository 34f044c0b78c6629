"""The planner: what a rotation would do from where it stands, without making any call.

It walks the kind's declared steps (the same declaration the worker runs) from the rotation's
current state and action records, forward to the end or through a rollback, and collects each
action's and wait's declared calls: provider routes, target and probe operations, and what
becomes active. A rollback preview, the API's rollback plan and the scheduler's plan all ask
it; a test holds it to what the worker then does, request for request, at the sandbox.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from keyturn.domain.errors import KeyturnError
from keyturn.domain.lifecycle import FINAL_STATES, FORWARD, State, Trigger, fire
from keyturn.domain.model import ActionRecord, ActionStatus, Phase, Rotation
from keyturn.engine.registry import Registry
from keyturn.engine.spi import Action, Call, PlannedAction


@dataclass
class _Facts:
    data: Any
    targets: Sequence[str]
    probes: Sequence[str]
    recorded_: set[tuple[Phase, str]] = field(default_factory=set)
    done_: set[tuple[Phase, str]] = field(default_factory=set)
    target: str | None = None

    def recorded(self, phase: Phase, name: str) -> bool:
        return (phase, name) in self.recorded_

    def done(self, phase: Phase, name: str) -> bool:
        return (phase, name) in self.done_


def plan(
    registry: Registry,
    rotation: Rotation,
    records: Iterable[ActionRecord],
    *,
    targets: Sequence[str],
    probes: Sequence[str] = (),
    rollback: bool = False,
) -> list[PlannedAction]:
    """The ordered actions (with their calls) of the rest of the forward path, or of a rollback
    from the current state. Guards are not checked here (operator validation does that)."""
    kind = registry.kind(rotation.kind)
    facts = _Facts(kind.data_model.model_validate(rotation.data), targets, probes)
    for r in records:
        facts.recorded_.add((r.phase, r.name))
        if r.status is ActionStatus.DONE:
            facts.done_.add((r.phase, r.name))
    state = rotation.state
    triggers: list[Trigger] = []
    if rollback:
        if state is not State.ROLLING_BACK:
            state = fire(state, Trigger.ROLLBACK)  # IllegalTransition when there is no way back
        triggers.append(Trigger.FINISH_ROLLBACK)
    elif state is not State.ROLLING_BACK:
        while state not in FINAL_STATES:
            trigger = FORWARD[state]
            triggers.append(trigger)
            state = fire(state, trigger)
    else:
        triggers.append(Trigger.FINISH_ROLLBACK)
    planned: list[PlannedAction] = []
    for trigger in triggers:
        step = kind.steps.get(trigger)
        if step is None:
            raise KeyturnError(f"kind {kind.name} declares no step for {trigger.value}")
        for item in step.expand(targets):
            key = (item.phase, item.name)
            is_action = isinstance(item, Action)
            seen = replace(facts, target=item.target if isinstance(item, Action) else None)
            if not item.when(seen) or key in facts.done_:
                continue
            planned.append(
                PlannedAction(
                    trigger,
                    item.phase,
                    item.name,
                    tuple(item.plan(seen)),
                    irreversible=is_action and bool(getattr(item, "irreversible", False)),
                )
            )
            if is_action:
                facts.recorded_.add(key)
                facts.done_.add(key)
    return planned


def provider_requests(planned: Iterable[PlannedAction]) -> list[tuple[str, bool]]:
    """The provider routes a plan sends, in order, each with whether it is polled."""
    out: list[tuple[str, bool]] = []
    for p in planned:
        for call in p.calls:
            out.extend((route, call.repeat) for route in call.provider_requests())
    return out


def describe(planned: Iterable[PlannedAction]) -> list[str]:
    """One line per call, for a person reading a preview."""
    lines = []
    for p in planned:
        mark = " (irreversible)" if p.irreversible else ""
        lines.append(f"{p.trigger.value} / {p.name}{mark}")
        lines.extend(f"  {c.describe()}" for c in p.calls)
    return lines


def calls(planned: Iterable[PlannedAction]) -> list[Call]:
    return [c for p in planned for c in p.calls]
