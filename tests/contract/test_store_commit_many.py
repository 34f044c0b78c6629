"""Group commit: several rotations' changes in one call, each exactly as commit() would apply it
(memory, SQLite and PostgreSQL)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import pytest

from keyturn.adapters.store.sql import SqlStore
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


def test_a_worker_shaped_batch_takes_the_set_based_path_on_postgresql(
    store: Store, seed: Any
) -> None:
    """What a worker's batch holds (intents, held outcomes, transitions with events, a new
    sealed key, a final transition that replaces the credential and schedules a purge, a stale
    change, a rotation twice) is written by the set-based statements themselves: a silent fall
    back to the change-by-change path would hide a broken fast path behind slow success."""
    if not isinstance(store, SqlStore) or store.engine.dialect.name != "postgresql":
        pytest.skip("the set-based path is PostgreSQL's")
    now = datetime(2026, 1, 2, tzinfo=UTC)
    lease = {"lease_owner": "w1", "lease_expires_at": now}
    a, b, c, d, e = (seed.rotation() for _ in range(5))
    for r in (c, d):
        store.commit(Change(r.id, r.version, action=_record(r.id, "first", ActionStatus.INTENT)))
    c, d = store.get_rotation(c.id), store.get_rotation(d.id)
    cred = store.get_credential(d.credential)
    new_key = seed.secret("sec-new-b")
    changes = [
        Change(a.id, a.version, updates=lease, action=_record(a.id, "first", ActionStatus.INTENT)),
        Change(
            b.id,
            b.version,
            updates={**lease, "data": {"new_key_ref": new_key.id, "n": 1}},
            secrets=[new_key],
            action=_record(b.id, "first", ActionStatus.INTENT),
        ),
        Change(
            c.id,
            c.version,
            updates={**lease, "state": State.NEW_ADDED, "attempts": 0, "next_attempt_at": None},
            events=[seed.event(c.id, kind="transition", to_state="new_added")],
            earlier_actions=[_record(c.id, "first", ActionStatus.DONE)],
            action=_record(c.id, "second", ActionStatus.INTENT),
        ),
        Change(
            d.id,
            d.version,
            updates={"state": State.CANCELLED, "finished_at": now, "lease_owner": None},
            events=[seed.event(d.id, kind="transition", to_state="cancelled")],
            earlier_actions=[_record(d.id, "first", ActionStatus.DONE)],
            credential=dataclasses.replace(cred, credential_id="cid-new", updated_at=now),
            purge_after={str(cred.key_ref): now},
        ),
        Change(e.id, e.version + 3, updates=lease),  # stale
        Change(a.id, a.version + 1, updates={"attempts": 2}),  # a's second change: next round
    ]
    results = store._commit_set_based(changes, now)  # raises Fallback if it cannot
    assert [type(r).__name__ for r in results] == [*["Rotation"] * 4, "StaleVersion", "Rotation"]
    # What the batch returns is exactly what a read gives.
    for i in (1, 2, 3, 5):
        returned = results[i]
        assert isinstance(returned, Rotation)
        assert returned == store.get_rotation(returned.id)
    assert store.get_rotation(a.id).attempts == 2 and store.get_rotation(a.id).version == 3
    assert store.get_rotation(b.id).data == {"new_key_ref": "sec-new-b", "n": 1}
    assert store.get_secret("sec-new-b").ciphertext == new_key.ciphertext
    got_c = store.get_rotation(c.id)
    assert got_c.state is State.NEW_ADDED and got_c.lease_expires_at == now
    assert [(x.name, x.status) for x in store.actions(c.id)] == [
        ("first", ActionStatus.DONE),
        ("second", ActionStatus.INTENT),
    ]
    assert store.events(c.id)[-1].to_state == "new_added"
    got_d = store.get_rotation(d.id)
    assert got_d.state is State.CANCELLED and got_d.finished_at == now
    assert store.get_credential(d.credential).credential_id == "cid-new"
    assert store.get_secret(str(cred.key_ref)).purge_after == now
    assert store.get_rotation(e.id) == e


def test_a_batch_sets_and_clears_waits(store: Store, seed: Any, monkeypatch: Any) -> None:
    """Waits written through the group commit: set (with the next check, the lease released,
    an event), moved to the next check, and cleared in a rotation's second change of the same
    batch. On PostgreSQL by the set-based path itself (the change-by-change path is disabled
    here, so a fall back fails the test); datetimes keep their microseconds and come back UTC."""
    from datetime import timedelta, timezone

    since = datetime(2026, 1, 2, 10, 2, 11, 123456, tzinfo=UTC)
    deadline = since + timedelta(minutes=10)
    check = since + timedelta(seconds=15)
    plus2 = timezone(timedelta(hours=2))
    a, b, c = seed.rotation(), seed.rotation(), seed.rotation()
    c = store.commit(
        Change(
            c.id,
            c.version,
            updates={"wait_key": "bake", "wait_for": "a bake time", "wait_since": since},
        )
    )
    wait = {
        "wait_key": "forward.confirm_loaded",
        "wait_for": "receivers to load secrets version 3",
        "wait_since": since.astimezone(plus2),
        "wait_deadline": deadline,
        "next_attempt_at": check,
        "lease_owner": None,
        "lease_expires_at": None,
    }
    clear = {"wait_key": None, "wait_for": None, "wait_since": None, "wait_deadline": None}
    changes = [
        Change(a.id, a.version, updates=wait, events=[seed.event(a.id, kind="run")]),
        Change(b.id, b.version, updates=wait),
        Change(c.id, c.version, updates={"next_attempt_at": check + timedelta(seconds=15)}),
        Change(b.id, b.version + 1, updates={**clear, "next_attempt_at": None}),  # next round
    ]
    if isinstance(store, SqlStore) and store.engine.dialect.name == "postgresql":

        def no_fallback(*args: Any, **kwargs: Any) -> Rotation:
            raise AssertionError("commit_many fell back to the change-by-change path")

        monkeypatch.setattr(store, "_commit", no_fallback)
    results = store.commit_many(changes)
    assert [type(r).__name__ for r in results] == ["Rotation"] * 4

    got_a = store.get_rotation(a.id)
    assert got_a == results[0]
    assert (got_a.wait_key, got_a.wait_for) == (wait["wait_key"], wait["wait_for"])
    assert (got_a.wait_since, got_a.wait_deadline, got_a.next_attempt_at) == (
        since,
        deadline,
        check,
    )
    assert got_a.wait_since is not None and got_a.wait_since.utcoffset() == timedelta(0)
    assert got_a.lease_owner is None and got_a.attempts == 0
    assert store.events(a.id)[-1].kind == "run"

    got_b = store.get_rotation(b.id)
    assert got_b == results[3] and got_b.version == b.version + 2
    assert (got_b.wait_key, got_b.wait_for, got_b.wait_since, got_b.wait_deadline) == (
        None,
        None,
        None,
        None,
    )

    got_c = store.get_rotation(c.id)
    assert (got_c.wait_key, got_c.wait_since, got_c.wait_deadline) == ("bake", since, None)
    assert got_c.next_attempt_at == check + timedelta(seconds=15)
