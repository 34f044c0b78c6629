"""The rotation lifecycle: one graph, held as data, built into a `transitions` Machine.

The graph says which (state, trigger) pairs exist and whether an edge can be undone. Guards that
depend on facts outside the graph (an intent recorded, an old key purged, an irreversible action
begun) live in :func:`check_guards`, so refusals carry a reason an operator can act on.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from transitions import Machine, MachineError

from keyturn.domain.errors import IllegalTransition, TransitionRefused


class State(StrEnum):
    PENDING = "pending"
    NEW_ADDED = "new_added"
    VERIFIED = "verified"
    OLD_DEACTIVATED = "old_deactivated"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    CANCELLED = "cancelled"


class Trigger(StrEnum):
    ADD_NEW = "add_new"
    VERIFY = "verify"
    DEACTIVATE_OLD = "deactivate_old"
    ROLLBACK = "rollback"
    FINISH_ROLLBACK = "finish_rollback"
    CANCEL = "cancel"


FINAL_STATES: frozenset[State] = frozenset(
    {State.OLD_DEACTIVATED, State.ROLLED_BACK, State.CANCELLED}
)

#: The forward path: in each of these states the worker's next step fires this trigger.
FORWARD: dict[State, Trigger] = {
    State.PENDING: Trigger.ADD_NEW,
    State.NEW_ADDED: Trigger.VERIFY,
    State.VERIFIED: Trigger.DEACTIVATE_OLD,
    State.ROLLING_BACK: Trigger.FINISH_ROLLBACK,
}


@dataclass(frozen=True)
class Edge:
    trigger: Trigger
    source: State
    dest: State
    #: Can the effect of this edge be compensated by a rollback?
    reversible: bool


EDGES: tuple[Edge, ...] = (
    Edge(Trigger.ADD_NEW, State.PENDING, State.NEW_ADDED, reversible=True),
    Edge(Trigger.VERIFY, State.NEW_ADDED, State.VERIFIED, reversible=True),
    Edge(Trigger.DEACTIVATE_OLD, State.VERIFIED, State.OLD_DEACTIVATED, reversible=True),
    # pending -> rolling_back exists for a rotation whose first intent is recorded: its outcome
    # is unknown, so the way back reconciles with the provider before it compensates.
    Edge(Trigger.ROLLBACK, State.PENDING, State.ROLLING_BACK, reversible=False),
    Edge(Trigger.ROLLBACK, State.NEW_ADDED, State.ROLLING_BACK, reversible=False),
    Edge(Trigger.ROLLBACK, State.VERIFIED, State.ROLLING_BACK, reversible=False),
    Edge(Trigger.ROLLBACK, State.OLD_DEACTIVATED, State.ROLLING_BACK, reversible=False),
    Edge(Trigger.FINISH_ROLLBACK, State.ROLLING_BACK, State.ROLLED_BACK, reversible=False),
    Edge(Trigger.CANCEL, State.PENDING, State.CANCELLED, reversible=False),
)


def allowed_triggers(state: State) -> list[str]:
    return sorted({e.trigger.value for e in EDGES if e.source == state})


def edge(state: State, trigger: Trigger) -> Edge:
    for e in EDGES:
        if e.source == state and e.trigger == trigger:
            return e
    raise IllegalTransition(state.value, trigger.value, allowed_triggers(state))


class _Subject:
    """The throw-away model a Machine moves; one per fired trigger."""

    state: str


_machine_lock = threading.Lock()
_machine: Any = None


def _get_machine() -> Any:
    global _machine
    with _machine_lock:
        if _machine is None:
            _machine = Machine(
                model=None,
                states=[s.value for s in State],
                transitions=[
                    {"trigger": e.trigger.value, "source": e.source.value, "dest": e.dest.value}
                    for e in EDGES
                ],
                initial=State.PENDING.value,
                auto_transitions=False,
                ignore_invalid_triggers=False,
            )
        return _machine


def fire(state: State | str, trigger: Trigger | str) -> State:
    """Return the state `trigger` leads to from `state`, or raise :class:`IllegalTransition`.

    One shared Machine (model=None) moves a throw-away subject that is added and removed around
    each call, as the library recommends for many models in one process. The database, not the
    library, makes the change atomic.
    """
    state = State(state)
    try:
        trig = Trigger(trigger)
    except ValueError:
        raise IllegalTransition(state.value, str(trigger), allowed_triggers(state)) from None
    return _fire(state, trig)


@functools.cache
def _fire(state: State, trig: Trigger) -> State:
    """The machine's answer for one (state, trigger), asked once per process: the graph is fixed,
    and asking costs more than the rest of a transition (an illegal one raises, uncached)."""
    machine = _get_machine()
    subject = _Subject()
    with _machine_lock:
        machine.add_model(subject, initial=state.value)
        try:
            getattr(subject, trig.value)()
        except (MachineError, AttributeError):
            raise IllegalTransition(state.value, trig.value, allowed_triggers(state)) from None
        finally:
            machine.remove_model(subject)
    return State(subject.state)


@dataclass(frozen=True)
class GuardFacts:
    """Facts outside the graph that decide whether an allowed edge may be taken now."""

    #: An external action's intent is recorded (the provider may have seen something).
    any_intent: bool = False
    #: This rotation is the newest one of its managed credential.
    is_latest: bool = True
    #: The old private key (or secret) is still retained, so the old side can be restored.
    old_key_retained: bool = True
    #: Set when an irreversible action has begun (e.g. the intent to delete an old webhook).
    irreversible_reason: str | None = None


def check_guards(state: State | str, trigger: Trigger | str, facts: GuardFacts) -> State:
    """Like :func:`fire`, and also apply the guards; raise with the reason when refused."""
    state = State(state)
    dest = fire(state, trigger)
    trig = Trigger(trigger)
    if trig is Trigger.CANCEL and facts.any_intent:
        raise TransitionRefused(
            state.value,
            trig.value,
            "an external action has already been attempted; use rollback, which reconciles "
            "with the provider first",
        )
    if trig is Trigger.ROLLBACK:
        if state is State.PENDING and not facts.any_intent:
            raise TransitionRefused(
                state.value, trig.value, "nothing has been done yet; use cancel instead"
            )
        if facts.irreversible_reason:
            raise TransitionRefused(state.value, trig.value, facts.irreversible_reason)
        if state is State.OLD_DEACTIVATED:
            if not facts.is_latest:
                raise TransitionRefused(
                    state.value,
                    trig.value,
                    "a newer rotation of this credential exists; only the latest can be undone",
                )
            if not facts.old_key_retained:
                raise TransitionRefused(
                    state.value,
                    trig.value,
                    "the old key was purged after its retention period and cannot be restored",
                )
    return dest
