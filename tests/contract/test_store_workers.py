"""Store contract: worker registration, heartbeats, clean stops, pruning, leases held, and the
claim's record of when and from whom it took a lease.

Runs against every Store (the ``store`` fixture: memory, SQLite, PostgreSQL).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from keyturn.domain.model import WorkerRecord
from keyturn.ports import Change, Store

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
NOW = T0 + timedelta(minutes=10)


def _worker(owner: str = "host-a:101:abc123", **kw: object) -> WorkerRecord:
    values: dict[str, object] = {
        "owner": owner,
        "host": "host-a",
        "pid": 101,
        "started_at": NOW,
        "heartbeat_at": NOW,
        "concurrency": 8,
        "heartbeat_seconds": 10.0,
        "lease_seconds": 30.0,
    }
    values.update(kw)
    return WorkerRecord(**values)  # type: ignore[arg-type]


def test_register_then_read_back(store: Store) -> None:
    assert store.list_workers() == []
    w = _worker()
    store.register_worker(w)
    assert store.list_workers() == [w]
    assert store.get_workers([w.owner, "nobody"]) == {w.owner: w}
    assert store.get_workers([]) == {}


def test_heartbeat_is_one_update_and_says_whether_the_row_exists(store: Store) -> None:
    w = _worker()
    assert store.heartbeat_worker(w.owner, NOW) is False  # not registered yet
    store.register_worker(w)
    later = NOW + timedelta(seconds=10)
    assert store.heartbeat_worker(w.owner, later) is True
    (got,) = store.list_workers()
    assert got.heartbeat_at == later
    assert got.started_at == NOW
    assert got.stopped_at is None


def test_register_again_replaces_the_row(store: Store) -> None:
    store.register_worker(_worker(pid=1))
    store.register_worker(_worker(pid=2, heartbeat_at=NOW + timedelta(seconds=5)))
    (got,) = store.list_workers()
    assert got.pid == 2
    assert got.heartbeat_at == NOW + timedelta(seconds=5)


def test_clean_stop(store: Store) -> None:
    w = _worker()
    store.register_worker(w)
    at = NOW + timedelta(seconds=3)
    store.stop_worker(w.owner, at)
    store.stop_worker("never-registered", at)  # no row: nothing
    (got,) = store.list_workers()
    assert got.stopped_at == at
    assert got.heartbeat_at == at
    assert got.status(at + timedelta(hours=1)) == "stopped"


def test_list_newest_start_first(store: Store) -> None:
    old = _worker("a", started_at=NOW - timedelta(hours=1))
    new = _worker("b", started_at=NOW)
    store.register_worker(old)
    store.register_worker(new)
    assert [w.owner for w in store.list_workers()] == ["b", "a"]


def test_prune_deletes_only_long_silent_rows(store: Store) -> None:
    store.register_worker(_worker("silent", heartbeat_at=NOW - timedelta(days=2)))
    store.register_worker(_worker("stopped", heartbeat_at=NOW - timedelta(days=3)))
    store.stop_worker("stopped", NOW - timedelta(days=3))
    store.register_worker(_worker("recent", heartbeat_at=NOW - timedelta(hours=1)))
    assert store.prune_workers(NOW - timedelta(days=1)) == 2
    assert [w.owner for w in store.list_workers()] == ["recent"]
    assert store.prune_workers(NOW - timedelta(days=1)) == 0


def test_status_live_stale_stopped() -> None:
    w = _worker(heartbeat_seconds=1.0)
    assert w.status(NOW + timedelta(seconds=2)) == "live"
    assert w.status(NOW + timedelta(seconds=2.5)) == "stale"


def test_claim_records_when_and_from_whom(store: Store, seed) -> None:
    free = seed.rotation(next_attempt_at=None)
    expired = seed.rotation(lease_owner="dead:1:x", lease_expires_at=NOW - timedelta(seconds=1))
    until = NOW + timedelta(seconds=30)
    claimed = {r.id: r for r in store.claim(owner="w1", now=NOW, lease_until=until, limit=5)}
    assert set(claimed) == {free.id, expired.id}
    assert claimed[free.id].lease_taken_at == NOW
    assert claimed[free.id].lease_taken_from is None
    assert claimed[expired.id].lease_taken_at == NOW
    assert claimed[expired.id].lease_taken_from == "dead:1:x"
    # a renewal keeps what the claim recorded
    r = claimed[expired.id]
    renewed = store.commit(
        Change(r.id, r.version, updates={"lease_expires_at": until + timedelta(seconds=10)})
    )
    assert renewed.lease_taken_at == NOW
    assert renewed.lease_taken_from == "dead:1:x"
    assert store.get_rotation(r.id).lease_taken_from == "dead:1:x"


def test_leases_held_counts_unexpired_leases_of_unfinished_rotations(store: Store, seed) -> None:
    seed.rotation(lease_owner="a", lease_expires_at=NOW + timedelta(seconds=5))
    seed.rotation(lease_owner="a", lease_expires_at=NOW + timedelta(seconds=9))
    seed.rotation(lease_owner="b", lease_expires_at=NOW + timedelta(seconds=5))
    seed.rotation(lease_owner="c", lease_expires_at=NOW - timedelta(seconds=1))  # expired
    seed.rotation(lease_owner="d", lease_expires_at=NOW)  # expires exactly now: not held
    seed.rotation(
        lease_owner="e", lease_expires_at=NOW + timedelta(seconds=5), finished_at=T0
    )  # finished
    seed.rotation()  # no lease
    assert store.leases_held(NOW) == {"a": 2, "b": 1}
