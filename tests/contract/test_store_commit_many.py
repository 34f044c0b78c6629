"""Group commit: several rotations' changes in one call, each exactly as commit() would apply it
(memory, SQLite and PostgreSQL)."""

from __future__ import annotations

from typing import Any

import pytest

from keyturn.domain.errors import NotFound, StaleVersion
from keyturn.domain.lifecycle import State
from keyturn.domain.model import Rotation
from keyturn.ports import Change, Store


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
