"""The dashboard's reads on every Store (memory, SQLite, PostgreSQL): the rotations list
(keyturn.engine.listing.list_rotations, the API's, over Store.find_rotations) paged by cursor in
list_rotations' order with every filter the dashboard offers, a worker's holdings included; and
Store.page_credentials (CredentialPager)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from keyturn.domain.lifecycle import State
from keyturn.domain.model import OperatorAction, OperatorRequest, Rotation
from keyturn.engine.attention import STATUSES, attention, status_key
from keyturn.engine.listing import list_rotations
from keyturn.ports import Change, CredentialPager, Store

#: The seed fixture's clock (tests/conftest.py).
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def _seeded(store: Store, seed: Any) -> list[Rotation]:
    made = []
    for i in range(23):
        # pairs share a created_at: the id breaks the tie
        r = seed.rotation(created_at=T0 + timedelta(minutes=i // 2), kind=f"k{i % 2}")
        updates: dict[str, object] = {}
        match i % 8:
            case 0:
                updates = {"halted_reason": "budget spent", "attempts": 3}
            case 1:
                updates = {"paused": True}
            case 2:
                updates = {"state": State.OLD_DEACTIVATED, "finished_at": T0}
            case 3:
                updates = {"wait_key": "gate.approval", "wait_for": "approval",
                           "wait_since": T0, "wait_deadline": T0 + timedelta(days=1)}  # fmt: skip
            case 4:
                updates = {"wait_key": "forward.probe", "wait_for": "probes"}
            case 5:
                updates = {"lease_owner": "w-1", "lease_expires_at": T0 + timedelta(days=999)}
            case 6:
                updates = {"attempts": 2}
        if updates:
            r = store.commit(Change(r.id, r.version, updates=updates))
        if i == 7:
            r = store.request(
                r.id,
                OperatorRequest(OperatorAction.PAUSE, "me", "why", T0),
                seed.event(r.id, kind="operator"),
            )
        made.append(r)
    return made


def _pages(store: Store, limit: int, now: datetime = T0, **kw: Any) -> list[str]:
    ids: list[str] = []
    before = None
    while True:
        page, more = list_rotations(store, now, before=before, limit=limit, **kw)
        ids += [r.id for r in page]
        if not more:
            return ids
        before = (page[-1].created_at, page[-1].id)


def test_pages_follow_list_order_and_every_filter(store: Store, seed: Any) -> None:
    _seeded(store, seed)
    everything = store.list_rotations()
    assert _pages(store, 4) == [r.id for r in everything]
    assert _pages(store, 100) == [r.id for r in everything]
    assert len({status_key(r) for r in everything}) == len(STATUSES)  # all nine seeded
    for status in STATUSES:
        want = [r.id for r in everything if status_key(r) == status]
        assert _pages(store, 2, status=status) == want and want, status
    now = T0 + timedelta(hours=1)
    want = [r.id for r in everything if attention(r, now) is not None]
    assert _pages(store, 3, now, attention_only=True) == want and want
    assert _pages(store, 3, kind="k1") == [r.id for r in everything if r.kind == "k1"]
    assert _pages(store, 3, state=State.OLD_DEACTIVATED) == [
        r.id for r in everything if r.state is State.OLD_DEACTIVATED
    ]
    held = [r.id for r in everything if r.lease_owner == "w-1"]
    assert _pages(store, 3, holder="w-1") == held and held
    one = everything[5]
    assert _pages(store, 3, credential=one.credential) == [one.id]


def test_credential_pages_by_name(store: Store, seed: Any) -> None:
    for name in ("c-b", "c-a", "c-d", "c-c", "c-e"):
        seed.credential(name)
    assert isinstance(store, CredentialPager)
    names, after = [], None
    while page := store.page_credentials(limit=2, after=after):
        names += [c.name for c in page]
        after = page[-1].name
    assert names == [c.name for c in store.list_credentials()] == sorted(names)
    assert [c.name for c in store.page_credentials(limit=10, after="c-c")] == ["c-d", "c-e"]
