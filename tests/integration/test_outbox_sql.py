"""The notification outbox on SQLite and PostgreSQL: notifications written with their events
(and not when the commit fails), the fan-out and its routing of resolves, the claim's lease and
its order per rotation and sink (a resolve never overtakes its trigger), and the lost-holder
record made once per lost lease. Also every store's commit path (the memory store's too)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from keyturn.adapters.store.memory import MemoryStore
from keyturn.adapters.store.outbox import SqlOutbox
from keyturn.adapters.store.sql import SqlStore
from keyturn.domain.errors import StaleVersion
from keyturn.domain.lifecycle import State
from keyturn.domain.model import Event, ManagedCredential, Rotation
from keyturn.ports import Change, DeliveryAttempt, Store

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def _halt(rid: str, at: Any = T0) -> Event:
    return Event(rid, at, "run", "w1", trigger="verify", reason="boom",
                 detail={"status": "halted", "attempt": 3})  # fmt: skip


def _done(rid: str, at: Any = T0) -> Event:
    return Event(rid, at, "transition", "w1", from_state="verified", to_state="old_deactivated",
                 trigger="deactivate_old")  # fmt: skip


def _kinds(store: Store) -> list[str]:
    if isinstance(store, MemoryStore):
        return [n.kind.value for n in store.notices()]
    assert isinstance(store, SqlStore)
    return _sql_kinds(store)


def _sql_kinds(store: SqlStore) -> list[str]:
    from sqlalchemy import select

    from keyturn.adapters.store.models import notifications_t

    with store.engine.connect() as conn:
        return [
            r.kind for r in conn.execute(select(notifications_t).order_by(notifications_t.c.id))
        ]


def test_notifications_are_written_with_their_events_only(store: Store, seed: Any) -> None:
    r = seed.rotation()
    r = store.commit(Change(r.id, r.version, {"halted_reason": "spent: boom"}, [_halt(r.id)]))
    # an operator request and a plain action event notify nobody
    r = store.commit(Change(r.id, r.version, {}, [seed.event(r.id, detail={"status": "x"})]))
    with pytest.raises(StaleVersion):  # a commit that fails writes no notification either
        store.commit(Change(r.id, r.version - 1, {}, [_done(r.id)]))
    r = store.commit(Change(r.id, r.version, {"state": State.OLD_DEACTIVATED}, [_done(r.id)]))
    assert _kinds(store) == ["halted", "completed"]
    if isinstance(store, MemoryStore):
        halted = store.notices()[0]
        assert halted.reason == "spent: boom" and halted.credential == r.credential


def test_group_commit_writes_the_notifications_of_each_change(store: Store, seed: Any) -> None:
    a, b = seed.rotation(), seed.rotation()
    results = store.commit_many(
        [
            Change(a.id, a.version, {"halted_reason": "x"}, [_halt(a.id)]),
            Change(b.id, b.version + 5, {}, [_halt(b.id)]),  # stale: nothing for b
        ]
    )
    assert isinstance(results[1], StaleVersion)
    assert _kinds(store) == ["halted"]


def _attempt(delivery_id: int, outcome: str = "sent") -> DeliveryAttempt:
    return DeliveryAttempt(delivery_id, T0, "p1", outcome, 202, None, 5)


class _Seed:
    """Credentials and pending rotations, straight through the Store port."""

    def __init__(self, store: Store) -> None:
        self.store, self.n = store, 0

    def rotation(self) -> Rotation:
        self.n += 1
        name = f"cred-{self.n}"
        self.store.add_credential(
            ManagedCredential(name, "service_account", "sandbox", f"cid-{self.n}",
                              f"cr-{self.n}", None, "ed25519"),
            [],
        )  # fmt: skip
        rotation = Rotation(f"rot-{self.n:04d}", name, "service_account", State.PENDING, 1,
                            "test", T0, T0, next_attempt_at=T0)  # fmt: skip
        created = Event(rotation.id, T0, "operator", "test", trigger="create", to_state="pending")
        return self.store.create_rotation(rotation, created)


@pytest.fixture
def sql(db_url: str) -> Any:
    store = SqlStore(db_url)
    yield store, SqlOutbox(store), _Seed(store)
    store.close()


def test_a_resolve_waits_for_its_trigger_and_goes_to_paging_sinks_that_opened(sql: Any) -> None:
    store, outbox, seed = sql
    r = seed.rotation()
    r = store.commit(Change(r.id, r.version, {"halted_reason": "x"}, [_halt(r.id)]))
    other = seed.rotation()
    other = store.commit(Change(other.id, other.version, {"state": State.OLD_DEACTIVATED},
                                [_done(other.id)]))  # fmt: skip

    def route(payload: dict[str, Any], opened: frozenset[str]) -> list[str]:
        # "pd" pages (takes halted; the end only where it opened), "chat" takes everything
        out = ["chat"]
        if payload["kind"] == "halted" or (payload["kind"] == "completed" and "pd" in opened):
            out.append("pd")
        return out

    assert outbox.fan_out(route, T0, 100) == 2
    r = store.commit(Change(r.id, r.version, {"state": State.OLD_DEACTIVATED}, [_done(r.id)]))
    assert outbox.fan_out(route, T0, 100) == 1
    assert outbox.fan_out(route, T0, 100) == 0
    sinks = sorted((d.rotation_id == r.id, d.sink, d.kind) for d in outbox.deliveries())
    assert sinks == [
        (False, "chat", "completed"),  # the other rotation opened nothing at pd
        (True, "chat", "completed"),
        (True, "chat", "halted"),
        (True, "pd", "completed"),
        (True, "pd", "halted"),
    ]
    now, until = T0, T0 + timedelta(seconds=30)
    first = outbox.claim_deliveries("p1", now, until, 10)
    # one per (rotation, sink): the halts of r; the other rotation's completion
    assert sorted((d.sink, d.kind) for d in first if d.rotation_id == r.id) == [
        ("chat", "halted"),
        ("pd", "halted"),
    ]
    assert all(d.payload["id"] == d.notification_id for d in first)
    assert outbox.claim_deliveries("p2", now, until, 10) == []  # leased, and in order
    trigger = next(d for d in first if d.sink == "pd")
    assert not outbox.finish_delivery(trigger, "p2", _attempt(trigger.id), status="sent",
                                      next_attempt_at=None)  # fmt: skip
    assert outbox.finish_delivery(
        trigger, "p1", _attempt(trigger.id), status="firing", next_attempt_at=T0 + timedelta(1)
    )
    (resolve,) = outbox.claim_deliveries("p2", now, until, 10)
    assert (resolve.sink, resolve.kind) == ("pd", "completed")
    assert outbox.finish_delivery(resolve, "p2", _attempt(resolve.id), status="sent",
                                  next_attempt_at=None, close_firing=True)  # fmt: skip
    by = {(d.sink, d.kind): d for d in outbox.deliveries(rotation_id=r.id)}
    assert by[("pd", "halted")].status == "resolved"  # its re-sends end
    assert by[("pd", "completed")].status == "sent" and by[("pd", "completed")].attempts == 1
    assert [a.outcome for a in outbox.attempts([resolve.id])[resolve.id]] == ["sent"]
    assert outbox.pending_notifications() == 3  # chat's three are still pending


def test_a_lost_holder_is_recorded_once_per_lost_lease(sql: Any) -> None:
    store, outbox, seed = sql
    r = seed.rotation()
    store.claim(owner="w-dead", now=T0, lease_until=T0 + timedelta(seconds=30), limit=1)
    assert outbox.lost_holders(T0 + timedelta(seconds=10), 10) == []  # not expired yet
    (lost,) = outbox.lost_holders(T0 + timedelta(seconds=90), 10)
    assert lost.id == r.id and lost.lease_owner == "w-dead"
    event = Event(r.id, T0 + timedelta(seconds=90), "run", "p1", trigger="lease",
                  reason="lost", detail={"status": "holder_lost", "from": "w-dead"})  # fmt: skip
    assert outbox.record_lost_holder(lost, event)
    assert not outbox.record_lost_holder(lost, event)  # once
    assert [e.detail.get("status") for e in store.events(r.id)].count("holder_lost") == 1
    assert _sql_kinds(store) == ["holder_lost"]
    # taken over meanwhile: nothing is recorded for the old view of it
    store.claim(owner="w2", now=T0 + timedelta(seconds=100),
                lease_until=T0 + timedelta(seconds=130), limit=1)  # fmt: skip
    assert not outbox.record_lost_holder(lost, event)


def test_prune_deletes_only_what_is_done_with(sql: Any) -> None:
    store, outbox, seed = sql
    r = seed.rotation()
    store.commit(Change(r.id, r.version, {"halted_reason": "x"}, [_halt(r.id)]))
    outbox.fan_out(lambda p, o: ["a", "b"], T0, 100)
    claimed = outbox.claim_deliveries("p1", T0, T0 + timedelta(seconds=30), 10)
    sent = next(d for d in claimed if d.sink == "a")
    assert outbox.finish_delivery(sent, "p1", _attempt(sent.id), status="sent",
                                  next_attempt_at=None)  # fmt: skip
    later = T0 + timedelta(days=400)
    assert outbox.prune(later) == 2  # a's attempt and delivery; b is still pending
    assert [(d.sink, d.status) for d in outbox.deliveries()] == [("b", "pending")]
    assert outbox.pending_notifications() == 1
