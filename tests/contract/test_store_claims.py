"""Store contract: claims (due, leased, expired, paused, halted, requests, limit, order).

Runs against every Store (the ``store`` fixture: memory, SQLite, PostgreSQL).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from keyturn.domain.errors import StaleVersion
from keyturn.domain.lifecycle import State
from keyturn.domain.model import OperatorAction, OperatorRequest
from keyturn.ports import Change, Store

#: The seed fixture's clock (tests/conftest.py).
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
NOW = T0 + timedelta(minutes=10)
LEASE = NOW + timedelta(minutes=1)
PAST = NOW - timedelta(seconds=1)
FUTURE = NOW + timedelta(seconds=1)


def _claim(store: Store, owner: str = "w1", limit: int = 10, now: datetime = NOW) -> list[str]:
    until = now + timedelta(minutes=1)
    return [r.id for r in store.claim(owner=owner, now=now, lease_until=until, limit=limit)]


REQ = OperatorRequest(OperatorAction.RESUME, "alice", "go on", T0)

# (fields of the rotation, claimable at NOW?)
CASES: dict[str, tuple[dict[str, object], bool]] = {
    "never-scheduled": ({"next_attempt_at": None}, True),
    "due-in-the-past": ({"next_attempt_at": PAST}, True),
    "due-exactly-now": ({"next_attempt_at": NOW}, True),
    "due-later": ({"next_attempt_at": FUTURE}, False),
    "finished": ({"state": State.CANCELLED, "finished_at": T0}, False),
    "finished-with-request": ({"finished_at": T0, "request": REQ}, False),
    "leased": ({"lease_owner": "w0", "lease_expires_at": FUTURE}, False),
    "lease-expired": ({"lease_owner": "w0", "lease_expires_at": PAST}, True),
    "lease-expires-now": ({"lease_owner": "w0", "lease_expires_at": NOW}, True),
    "paused": ({"paused": True}, False),
    "halted": ({"halted_reason": "retry budget spent"}, False),
    "paused-with-request": ({"paused": True, "request": REQ}, True),
    "halted-with-request": ({"halted_reason": "budget", "request": REQ}, True),
    "later-with-request": ({"next_attempt_at": FUTURE, "request": REQ}, True),
    "leased-with-request": (
        {"request": REQ, "lease_owner": "w0", "lease_expires_at": FUTURE},
        False,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_due_condition(store: Store, seed, case: str) -> None:
    fields, claimable = CASES[case]
    rotation = seed.rotation(**fields)
    claimed = store.claim(owner="w1", now=NOW, lease_until=LEASE, limit=5)
    if not claimable:
        assert claimed == []
        assert store.get_rotation(rotation.id) == rotation
        return
    assert [r.id for r in claimed] == [rotation.id]
    got = claimed[0]
    assert (got.lease_owner, got.lease_expires_at, got.version) == ("w1", LEASE, 2)
    assert store.get_rotation(rotation.id) == got
    assert got.state == rotation.state and got.data == rotation.data


def test_a_claimed_rotation_is_not_claimed_again_until_its_lease_expired(
    store: Store, seed
) -> None:
    rotation = seed.rotation(next_attempt_at=None)
    assert _claim(store, "w1") == [rotation.id]
    assert _claim(store, "w2") == []
    # At expiry another worker takes it over, and the first worker is fenced out.
    later = NOW + timedelta(minutes=1)
    assert _claim(store, "w2", now=later) == [rotation.id]
    assert store.get_rotation(rotation.id).lease_owner == "w2"
    with pytest.raises(StaleVersion):
        store.commit(Change(rotation.id, 2, updates={"state": State.NEW_ADDED}))
    assert store.commit(Change(rotation.id, 3, updates={"state": State.NEW_ADDED})).version == 4


def test_limit_and_order_longest_waiting_first_never_scheduled_last(store: Store, seed) -> None:
    late = seed.rotation(next_attempt_at=NOW - timedelta(minutes=1))
    early = seed.rotation(next_attempt_at=NOW - timedelta(minutes=5))
    never = seed.rotation(next_attempt_at=None)
    middle = seed.rotation(next_attempt_at=NOW - timedelta(minutes=3))
    assert _claim(store, limit=2) == [early.id, middle.id]
    assert _claim(store, limit=2) == [late.id, never.id]
    assert _claim(store, limit=2) == []
    assert _claim(store, limit=0) == []


def test_claim_leaves_unclaimed_rotations_untouched(store: Store, seed) -> None:
    a = seed.rotation(next_attempt_at=PAST)
    b = seed.rotation(next_attempt_at=FUTURE)
    assert _claim(store, limit=5) == [a.id]
    assert store.get_rotation(b.id) == b


def test_a_released_rotation_is_claimable_again(store: Store, seed) -> None:
    rotation = seed.rotation()
    (claimed,) = store.claim(owner="w1", now=NOW, lease_until=LEASE, limit=1)
    store.commit(
        Change(
            rotation.id,
            claimed.version,
            updates={"lease_owner": None, "lease_expires_at": None, "next_attempt_at": NOW},
        )
    )
    assert _claim(store, "w2") == [rotation.id]


def test_an_operator_request_makes_a_waiting_rotation_due(store: Store, seed) -> None:
    rotation = seed.rotation(next_attempt_at=NOW + timedelta(hours=6), paused=True)
    assert _claim(store) == []
    req = OperatorRequest(OperatorAction.RESUME, "bob", "fixed", NOW)
    store.request(rotation.id, req, seed.event(rotation.id, kind="operator"))
    (claimed,) = store.claim(owner="w1", now=NOW, lease_until=LEASE, limit=1)
    assert claimed.request == req
    assert claimed.version == 2
