"""Group commit: several rotations' changes in one call, each exactly as commit() would apply it
(memory, SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from keyturn.domain.errors import NotFound, StaleVersion
from keyturn.domain.lifecycle import State
from keyturn.domain.model import ActionRecord, ActionStatus, Phase, Rotation
from keyturn.ports import Change, Store

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def test_batch_applies_each_change_and_reports_stale_ones(store: Store, seed: Any) -> None:
    a, b, c = seed.rotation(), seed.rotation(), seed.rotation()
    changes = [
        Change(a.id, a.version, updates={"state": State.NEW_ADDED}, events=[seed.event(a.id)]),
        Change(b.id, b.version + 5, updates={"state": State.CANCELLED}, events=[seed.event(b.id)]),
        Change(c.id, c.version, updates={"attempts": 3}),
        # a second change of rotation a, expecting the version the first one produced
        Change(a.id, a.version + 1, updates={"state": State.VERIFIED}, events=[seed.event(a.id)]),
    ]
    results = store.commit_many(changes)
    assert isinstance(results[0], Rotation) and results[0].version == a.version + 1
    assert isinstance(results[1], StaleVersion)
    assert isinstance(results[2], Rotation) and results[2].attempts == 3
    assert isinstance(results[3], Rotation) and results[3].state is State.VERIFIED
    assert store.get_rotation(a.id).state is State.VERIFIED
    assert store.get_rotation(b.id) == b  # the stale change wrote nothing
    assert len(store.events(b.id)) == 1 and len(store.events(a.id)) == 3


def test_batch_with_a_failing_change_still_applies_the_others(store: Store, seed: Any) -> None:
    a, b = seed.rotation(), seed.rotation()
    results = store.commit_many(
        [
            Change(a.id, a.version, updates={"attempts": 1}),
            # purging an unknown secret fails this change (and only this change)
            Change(b.id, b.version, updates={"attempts": 2}, purge_after={"nope": None}),
        ]
    )
    assert isinstance(results[0], Rotation) and results[0].attempts == 1
    assert isinstance(results[1], NotFound)
    assert store.get_rotation(b.id) == b


@pytest.mark.parametrize("n", [1, 40])
def test_batch_sizes(store: Store, seed: Any, n: int) -> None:
    rotations = [seed.rotation() for _ in range(n)]
    results = store.commit_many(
        [Change(r.id, r.version, updates={"attempts": 7}) for r in rotations]
    )
    assert all(isinstance(x, Rotation) and x.attempts == 7 for x in results)
    assert len(results) == n


def test_has_pending_work(store: Store, seed: Any) -> None:
    from datetime import timedelta

    now = seed.now
    assert not store.has_pending_work(now)
    r = seed.rotation(next_attempt_at=now + timedelta(seconds=30))
    assert not store.has_pending_work(now)  # a retry due later than the horizon
    assert store.has_pending_work(now + timedelta(seconds=60))
    r = store.commit(Change(r.id, r.version, updates={"halted_reason": "needs a human"}))
    assert not store.has_pending_work(now + timedelta(seconds=60))  # halted: not waited for
    r = store.commit(Change(r.id, r.version, updates={"halted_reason": None, "paused": True}))
    assert not store.has_pending_work(now + timedelta(seconds=60))  # paused: neither
    store.commit(Change(r.id, r.version, updates={"paused": False, "next_attempt_at": None}))
    assert store.has_pending_work(now)  # in flight at a worker (no next attempt time)


def _record(rotation_id: str, name: str, status: ActionStatus) -> ActionRecord:
    return ActionRecord(
        rotation_id=rotation_id,
        phase=Phase.FORWARD,
        name=name,
        idempotency_key=f"{rotation_id}:{name}",
        status=status,
        intent_at=T0,
        outcome_at=T0 if status is ActionStatus.DONE else None,
        detail={"n": name},
    )


@pytest.mark.parametrize("batched", [False, True])
def test_an_outcome_shares_the_next_intents_commit(store: Store, seed: Any, batched: bool) -> None:
    """earlier_actions are written before action, in the same compare-and-set: the outcome of
    one action with the intent of the next (and, batched, with other rotations' changes)."""
    rotations = [seed.rotation() for _ in range(3 if batched else 1)]
    for r in rotations:
        first = _record(r.id, "first", ActionStatus.INTENT)
        store.commit(Change(r.id, r.version, action=first))
    changes = [
        Change(
            r.id,
            r.version + 1,
            earlier_actions=[_record(r.id, "first", ActionStatus.DONE)],
            action=_record(r.id, "second", ActionStatus.INTENT),
        )
        for r in rotations
    ]
    if batched:
        # plus a rotation whose change carries only an earlier action, and a stale one
        extra = seed.rotation()
        store.commit(
            Change(extra.id, extra.version, action=_record(extra.id, "a", ActionStatus.INTENT))
        )
        changes.append(
            Change(
                extra.id,
                extra.version + 1,
                earlier_actions=[_record(extra.id, "a", ActionStatus.DONE)],
            )
        )
        changes.append(
            Change(
                rotations[0].id, 99, action=_record(rotations[0].id, "stale", ActionStatus.INTENT)
            )
        )
        results = store.commit_many(changes)
        assert isinstance(results[-1], StaleVersion)
        assert [a.status for a in store.actions(extra.id)] == [ActionStatus.DONE]
    else:
        results = [store.commit(changes[0])]
    for r, result in zip(rotations, results, strict=False):
        assert isinstance(result, Rotation) and result.version == r.version + 2
        actions = store.actions(r.id)
        assert [(a.name, a.status) for a in actions] == [
            ("first", ActionStatus.DONE),
            ("second", ActionStatus.INTENT),
        ]
