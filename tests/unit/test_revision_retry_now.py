"""The rotation revision an If-Match names, and retry-now's refusals (in-memory store)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from keyturn.adapters.store.memory import MemoryStore
from keyturn.domain.errors import TransitionRefused
from keyturn.domain.lifecycle import State
from keyturn.domain.model import (
    Event,
    ManagedCredential,
    OperatorAction,
    OperatorRequest,
    Rotation,
    evolve,
)
from keyturn.engine.attention import revision
from keyturn.engine.operator import retry_now

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
_n = itertools.count()


def _rotation(**kw: Any) -> Rotation:
    n = next(_n)
    values: dict[str, Any] = {
        "id": f"rot-{n}", "credential": f"c-{n}", "kind": "service_account",
        "state": State.PENDING, "version": 1, "reason": "r", "created_at": T0,
        "updated_at": T0,
    }  # fmt: skip
    return Rotation(**{**values, **kw})


def _stored(store: MemoryStore, **kw: Any) -> Rotation:
    r = _rotation(**kw)
    store.add_credential(
        ManagedCredential(r.credential, "service_account", "p", "cid", "cr", None, "ed25519"), []
    )
    return store.create_rotation(r, Event(r.id, T0, "transition", "test"))


class _Clock:
    def __init__(self) -> None:
        self.at = T0

    def now(self):  # type: ignore[no-untyped-def]
        return self.at


def test_revision_changes_with_state_status_halt_and_request_only() -> None:
    r = _rotation(lease_owner="w1", lease_expires_at=T0)
    same = [
        evolve(r, {"lease_expires_at": T0 + timedelta(minutes=1), "version": 7}),
        evolve(r, {"data": {"n": 99}, "updated_at": T0 + timedelta(hours=1)}),
        evolve(r, {"attempts": 3}),  # still running: attempts are not in the revision
        # a worker's release (running -> due) and a failed attempt (-> retrying): the worker's
        # own comings and goings, one "in progress" to an operator
        evolve(r, {"lease_owner": None, "lease_expires_at": None}),
        evolve(r, {"lease_owner": None, "attempts": 2, "last_error": "503"}),
    ]
    assert {revision(x) for x in same} == {revision(r)}
    request = OperatorRequest(OperatorAction.PAUSE, "a", "why", T0)
    changed = [
        evolve(r, {"state": State.NEW_ADDED}),
        evolve(r, {"halted_reason": "budget spent"}),
        evolve(r, {"request": request}),
        evolve(r, {"paused": True}),
        evolve(r, {"wait_for": "holder probes", "wait_key": "forward.probe"}),
        evolve(r, {"wait_for": "an approval", "wait_key": "gate.approval.before_start"}),
    ]
    assert len({revision(x) for x in [r, *changed]}) == 7


def test_retry_now_moves_the_next_attempt_and_refuses_what_is_not_backing_off() -> None:
    store, clock = MemoryStore(), _Clock()
    later = T0 + timedelta(hours=1)
    r = _stored(store, attempts=2, next_attempt_at=later)
    done = retry_now(store, clock, r.id, "oncall", "provider is back")
    assert done.next_attempt_at == T0 and done.version == r.version + 1
    event = store.events(r.id)[-1]
    assert (event.trigger, event.actor, event.reason) == ("retry-now", "oncall", "provider is back")
    assert event.detail["status"] == "applied"
    cases = {
        "resume it instead": {"attempts": 5, "halted_reason": "spent"},
        "paused; resume": {"attempts": 1, "paused": True},
        "no attempt has failed": {"attempts": 0},
        "holds it": {"attempts": 1, "lease_owner": "w1", "lease_expires_at": later},
        "waiting for": {"attempts": 1, "wait_for": "probes", "wait_key": "k"},
        "due already": {"attempts": 1, "next_attempt_at": T0 - timedelta(seconds=1)},
    }
    for words, updates in cases.items():
        rotation = _stored(store, **{"next_attempt_at": later, **updates})
        with pytest.raises(TransitionRefused, match=words):
            retry_now(store, clock, rotation.id, "oncall", "why")
        assert store.get_rotation(rotation.id) == rotation
    with pytest.raises(Exception, match="reason is required"):
        retry_now(store, clock, r.id, "oncall", "  ")
