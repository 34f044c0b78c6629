"""Store contract: find_rotations, the list's query (filters, keyset cursor, limit in the store),
and request's compare-and-set (what a verb's If-Match rests on).

The store's conditions for a status and for attention may be wider than their definitions
(keyturn.engine.attention), never narrower; on SQL stores the status condition is exact. The
operator service's list_rotations then gives exactly the definitions' answer, newest first,
page by page. Rows of every status and every reason for attention, at times either side of
each threshold.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from keyturn.domain.errors import NotFound, StaleVersion
from keyturn.domain.lifecycle import State
from keyturn.domain.model import OperatorAction, OperatorRequest
from keyturn.engine.attention import REQUEST_STALE, STATUSES, attention, status_key
from keyturn.engine.listing import list_rotations
from keyturn.ports import Change, RotationQuery, Store

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
NOW = T0 + timedelta(hours=2)
H = timedelta(hours=1)


def _cases() -> list[dict[str, Any]]:
    req = OperatorRequest(OperatorAction.PAUSE, "op", "why", NOW - timedelta(minutes=1))
    stale_req = OperatorRequest(
        OperatorAction.RESUME, "op", "why", NOW - REQUEST_STALE - timedelta(seconds=5)
    )
    wait = {"wait_key": "forward.probe", "wait_for": "holder probes"}
    approval = {"wait_key": "gate.approval.before_start", "wait_for": "an approval"}
    person = {"wait_key": "forward.person:person", "wait_for": "alice to act"}
    overdue = {
        "wait_key": "forward.person:overdue",
        "wait_for": "overdue: alice did not act by 2026-01-01T13:00:00+00:00",
    }
    return [
        {},  # due
        {"attempts": 2, "last_error": "503"},  # retrying
        {"lease_owner": "w1", "lease_expires_at": NOW + H},  # running
        {"lease_owner": "w1", "lease_expires_at": NOW - timedelta(seconds=1)},  # holder lost
        {"halted_reason": "spent", "attempts": 5},
        {"paused": True},
        {"paused": True, "halted_reason": "spent"},
        {"request": req},
        {"request": stale_req, "lease_owner": "w2", "lease_expires_at": NOW + H},
        {**wait, "wait_since": NOW - H, "wait_deadline": NOW + 3 * H},  # a quarter in
        {**wait, "wait_since": NOW - 3 * H, "wait_deadline": NOW + H},  # three quarters in
        {**wait, "wait_since": NOW - H, "wait_deadline": NOW + H - timedelta(seconds=2)},
        {**approval, "wait_since": NOW - H, "wait_deadline": NOW + 9 * H},
        # a person's task reported overdue (its deadline on a faster test clock: still ahead)
        {**overdue, "wait_since": NOW - H, "wait_deadline": NOW + 9 * H},
        # waiting on a person before the deadline: reminders follow it up, not the queue
        {**person, "wait_since": NOW - 3 * H, "wait_deadline": NOW + H},
        {"state": State.NEW_ADDED, "attempts": 1, "lease_owner": "w3", "lease_expires_at": NOW},
        {"state": State.VERIFIED, **wait, "lease_owner": "w3", "lease_expires_at": NOW + H},
        {"state": State.OLD_DEACTIVATED, "finished_at": NOW - H},
        {"state": State.ROLLED_BACK, "finished_at": NOW - H, "halted_reason": None},
        {"state": State.CANCELLED, "finished_at": NOW - H, "attempts": 3},
        {"state": State.ROLLING_BACK, "rollback_from": State.NEW_ADDED, "attempts": 1},
    ]


def _seeded(store: Store, seed: Any) -> list[Any]:
    out = []
    for i, case in enumerate(_cases() * 2):  # twice: pages cross cases
        seed.now = T0 + timedelta(seconds=i)  # distinct created_at, and equal ones below
        out.append(seed.rotation(kind="service_account" if i % 3 else "pat", **case))
    seed.now = T0 + timedelta(seconds=5)
    out.append(seed.rotation(**_cases()[4]))  # a created_at shared with another row
    return sorted(out, key=lambda r: (r.created_at, r.id), reverse=True)


def test_find_rotations_status_and_attention_never_narrower(store: Store, seed: Any) -> None:
    rows = _seeded(store, seed)
    assert {status_key(r) for r in rows} == set(STATUSES)  # every status is here
    sql = type(store).__name__ == "SqlStore"
    for status in STATUSES:
        found = [r.id for r in store.find_rotations(RotationQuery(status=status))]
        exact = [r.id for r in rows if status_key(r) == status]
        assert set(found) >= set(exact), status
        if sql:
            assert found == exact, status
    query = RotationQuery(attention_at=NOW, request_stale_before=NOW - REQUEST_STALE)
    found = {r.id for r in store.find_rotations(query)}
    needing = {r.id for r in rows if attention(r, NOW) is not None}
    assert len(needing) >= 9 and found >= needing
    if sql:  # and not much wider: only unfinished rotations
        assert all(not r.finished for r in rows if r.id in found)


def test_list_rotations_is_the_definitions_answer_page_by_page(store: Store, seed: Any) -> None:
    rows = _seeded(store, seed)
    filters: list[dict[str, Any]] = [
        {},
        {"attention_only": True},
        *({"status": s} for s in STATUSES),
        {"state": State.PENDING},
        {"state": State.OLD_DEACTIVATED},
        {"kind": "pat"},
        {"credential": rows[3].credential},
        {"since": T0 + timedelta(seconds=20)},
        {"status": "halted", "kind": "service_account"},
    ]
    for f in filters:
        expected = [
            r.id
            for r in rows
            if ("status" not in f or status_key(r) == f["status"])
            and (not f.get("attention_only") or attention(r, NOW) is not None)
            and ("state" not in f or r.state is f["state"])
            and ("kind" not in f or r.kind == f["kind"])
            and ("credential" not in f or r.credential == f["credential"])
            and ("since" not in f or r.updated_at >= f["since"])
        ]
        whole, more = list_rotations(store, NOW, **f)
        assert [r.id for r in whole] == expected and not more, f
        paged: list[str] = []
        before = None
        while True:
            page, more = list_rotations(store, NOW, before=before, limit=3, **f)
            paged += [r.id for r in page]
            if not more:
                break
            assert len(page) == 3
            before = (page[-1].created_at, page[-1].id)
        assert paged == expected, f


def test_request_with_expected_version_is_a_compare_and_set(store: Store, seed: Any) -> None:
    """What a verb's If-Match rests on: the request lands only on the row as read (its
    version, no request pending), and never bumps the version (the holder is not fenced)."""
    r = seed.rotation()
    req = OperatorRequest(OperatorAction.PAUSE, "op", "why", T0)
    renewed = store.commit(Change(r.id, r.version, updates={"lease_owner": "w"}))
    with pytest.raises(StaleVersion):
        store.request(r.id, req, seed.event(r.id), expected_version=r.version)
    assert store.get_rotation(r.id) == renewed and len(store.events(r.id)) == 1
    done = store.request(r.id, req, seed.event(r.id), expected_version=renewed.version)
    assert done.request == req and done.version == renewed.version
    other = OperatorRequest(OperatorAction.RESUME, "op2", "why", T0)
    with pytest.raises(StaleVersion):  # a request is pending: the second one does not land
        store.request(r.id, other, seed.event(r.id), expected_version=done.version)
    assert store.get_rotation(r.id).request == req
    with pytest.raises(NotFound):
        store.request("rot-none", req, seed.event("rot-none"), expected_version=1)
