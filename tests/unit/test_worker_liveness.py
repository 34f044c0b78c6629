"""Liveness: the worker registers, heartbeats and records its clean stop; a claim of another
owner's expired lease goes in the timeline; what `rotations show`, `keyturn workers` and the
operator commands say about it (keyturn.cli.liveness, keyturn.cli.workers)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from test_engine import Env

from keyturn.adapters.store.memory import MemoryStore
from keyturn.adapters.store.migrate import upgrade
from keyturn.adapters.store.sql import SqlStore
from keyturn.cli.liveness import (
    LIVE_HINT,
    NO_WORKER_HINT,
    lease_dict,
    lease_lines,
    next_step_hint,
)
from keyturn.cli.workers import workers_report, workers_table
from keyturn.domain.lifecycle import State
from keyturn.domain.model import Event, ManagedCredential, Rotation, WorkerRecord
from keyturn.engine.worker import Worker
from keyturn.ports import Change, Store

NOW = datetime(2026, 12, 2, 10, 0, 0, tzinfo=UTC)


def _worker(owner: str = "h:1:aa", *, beat: float = 0.0, **kw: object) -> WorkerRecord:
    values: dict[str, object] = {
        "owner": owner,
        "host": "h",
        "pid": 1,
        "started_at": NOW - timedelta(minutes=5),
        "heartbeat_at": NOW - timedelta(seconds=beat),
        "concurrency": 8,
        "heartbeat_seconds": 10.0,
        "lease_seconds": 30.0,
    }
    values.update(kw)
    return WorkerRecord(**values)  # type: ignore[arg-type]


def _rotation(**kw: object) -> Rotation:
    values: dict[str, object] = {
        "id": "rot_1",
        "credential": "svc",
        "kind": "service_account",
        "state": State.NEW_ADDED,
        "version": 3,
        "reason": "test",
        "created_at": NOW - timedelta(minutes=1),
        "updated_at": NOW,
        "lease_owner": "h:1:aa",
        "lease_taken_at": NOW - timedelta(seconds=40),
        "lease_expires_at": NOW + timedelta(seconds=20),  # renewed 10 s ago (30 s leases)
    }
    values.update(kw)
    return Rotation(**values)  # type: ignore[arg-type]


# ----------------------------------------------------------------------- rotations show


def test_live_holder() -> None:
    lines = lease_lines(_rotation(), {"h:1:aa": _worker(beat=3)}, NOW)
    assert lines == [
        "  lease      h:1:aa (pid 1 on h), live: last heartbeat 2026-12-02 09:59:57 UTC",
        "             taken 2026-12-02 09:59:20 UTC, last renewal 2026-12-02 09:59:50 UTC, "
        "expires 2026-12-02 10:00:20 UTC (in 20 s)",
    ]
    d = lease_dict(_rotation(), {"h:1:aa": _worker(beat=3)}, NOW)
    assert d is not None
    assert d["holder"]["status"] == "live"
    assert d["holder_not_seen_seconds"] is None
    assert d["renewed_at"] == "2026-12-02T09:59:50+00:00"
    assert d["taken_at"] == "2026-12-02T09:59:20+00:00"
    assert d["expired"] is False


def test_stale_holder_is_not_seen_after_two_heartbeat_intervals() -> None:
    workers = {"h:1:aa": _worker(beat=20)}
    assert "holder not seen" not in " ".join(lease_lines(_rotation(), workers, NOW))
    workers = {"h:1:aa": _worker(beat=21)}
    lines = lease_lines(_rotation(lease_taken_from="old:9:zz"), workers, NOW)
    assert lines[0] == (
        "  lease      h:1:aa (pid 1 on h): holder not seen for 21 s "
        "(last heartbeat 2026-12-02 09:59:39 UTC; it heartbeats every 10 s)"
    )
    assert "(taken over from old:9:zz)" in lines[1]
    assert "(in 20 s; then the next worker to claim it takes over)" in lines[1]
    d = lease_dict(_rotation(lease_taken_from="old:9:zz"), workers, NOW)
    assert d is not None
    assert (d["holder"]["status"], d["holder_not_seen_seconds"]) == ("stale", 21)
    assert d["taken_over_from"] == "old:9:zz"


def test_stopped_and_unknown_holders_are_not_seen() -> None:
    stopped = _worker(beat=4, stopped_at=NOW - timedelta(seconds=4))
    lines = lease_lines(_rotation(), {"h:1:aa": stopped}, NOW)
    assert "holder not seen for 4 s (it stopped at 2026-12-02 09:59:56 UTC)" in lines[0]
    # no worker row (an operator command, or a worker from before registration): the time
    # since the last renewal, derived from the configured lease
    lines = lease_lines(_rotation(), {}, NOW, lease_seconds=30)
    assert (
        lines[0] == "  lease      h:1:aa: holder not seen for 10 s (no worker registered as h:1:aa)"
    )
    d = lease_dict(_rotation(), {}, NOW)
    assert d is not None and d["holder"]["status"] == "unknown"
    assert d["renewed_at"] is None and d["holder_not_seen_seconds"] == 40  # since taken


def test_expired_lease_and_no_lease() -> None:
    expired = _rotation(lease_expires_at=NOW - timedelta(seconds=5))
    lines = lease_lines(expired, {"h:1:aa": _worker(beat=35)}, NOW)
    assert (
        "expired 2026-12-02 09:59:55 UTC (5 s ago; the next worker to claim it takes over)"
        in (lines[1])
    )
    lines = lease_lines(_rotation(lease_expires_at=NOW), {}, NOW)
    assert "expired 2026-12-02 10:00:00 UTC (just now; the next" in lines[1]
    assert lease_lines(_rotation(lease_owner=None), {}, NOW) == ["  lease      none"]
    assert lease_dict(_rotation(lease_owner=None), {}, NOW) is None


# ---------------------------------------------------------------- operators, workers list


def test_next_step_hint_only_promises_a_live_worker() -> None:
    store = MemoryStore()
    assert next_step_hint(store, NOW) == NO_WORKER_HINT
    store.register_worker(_worker("dead", beat=60))
    store.register_worker(_worker("gone", beat=1, stopped_at=NOW - timedelta(seconds=1)))
    assert next_step_hint(store, NOW) == NO_WORKER_HINT
    store.register_worker(_worker("alive", beat=1))
    assert next_step_hint(store, NOW) == LIVE_HINT


def test_workers_report_and_table() -> None:
    store = MemoryStore()
    store.register_worker(_worker("host-a:11:aaaaaa", beat=1, started_at=NOW - timedelta(hours=3)))
    store.register_worker(_worker("host-b:22:bbbbbb", beat=95, pid=22, host="host-b"))
    store.add_credential(
        ManagedCredential("svc", "service_account", "p", "c", "u", None, "ed25519"), []
    )
    store.create_rotation(_rotation(id="rot_x", lease_owner="operator:me"), _event("rot_x"))
    rows = workers_report(store, NOW)
    assert [(r["owner"], r["status"], r["rotations_held"]) for r in rows] == [
        ("host-b:22:bbbbbb", "stale", 0),
        ("host-a:11:aaaaaa", "live", 0),
        ("operator:me", "unregistered", 1),
    ]
    lines = workers_table(rows)
    assert lines[0].split() == [
        "owner", "host", "pid", "started", "last", "heartbeat", "age", "status", "held"
    ]  # fmt: skip
    assert lines[1].split() == [
        "host-b:22:bbbbbb", "host-b", "22", "2026-12-02", "09:55:00", "UTC", "2026-12-02",
        "09:58:25", "UTC", "95s", "stale", "0",
    ]  # fmt: skip
    assert lines[3].split() == ["operator:me", "-", "-", "-", "-", "-", "unregistered", "1"]


def _event(rid: str) -> Event:
    return Event(rotation_id=rid, at=NOW, kind="transition", actor="t")


# ------------------------------------------------------------------------- the worker


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
    else:
        url = f"sqlite:///{tmp_path / 'k.db'}"
        upgrade(url)
        s = SqlStore(url)
        yield s
        s.close()


def _env(store: Store, tmp_path: Path, lease_seconds: float = 10) -> Env:
    env = Env(store, tmp_path)
    env.deps.settings = dataclasses.replace(env.deps.settings, lease_seconds=lease_seconds)
    return env


def test_worker_registers_heartbeats_and_records_its_clean_stop(
    store: Store, tmp_path: Path
) -> None:
    # a heartbeat every 0.5 s: "live" tolerates two silent intervals, more than a loaded
    # machine's scheduling delay
    env = _env(store, tmp_path, lease_seconds=1.5)
    worker = Worker(env.deps, concurrency=2, owner="me:1:abc")

    async def scenario() -> tuple[WorkerRecord, WorkerRecord, datetime]:
        task = asyncio.create_task(worker.run())
        await asyncio.sleep(0.05)
        first = store.get_workers(["me:1:abc"])["me:1:abc"]
        await asyncio.sleep(0.7)
        later = store.get_workers(["me:1:abc"])["me:1:abc"]
        read_at = datetime.now(UTC)
        worker.stop()
        await task
        return first, later, read_at

    first, later, read_at = asyncio.run(scenario())
    assert first.stopped_at is None and first.concurrency == 2
    assert first.heartbeat_seconds == pytest.approx(0.5)
    assert first.lease_seconds == pytest.approx(1.5)
    assert later.heartbeat_at > first.heartbeat_at, "no heartbeat"
    assert later.status(read_at) == "live"
    (stopped,) = store.list_workers()
    assert stopped.stopped_at is not None
    assert stopped.status(datetime.now(UTC)) == "stopped"


def test_a_takeover_is_in_the_timeline(store: Store, tmp_path: Path) -> None:
    env = _env(store, tmp_path)
    rid = env.rotate()
    # a worker that claimed the rotation, heartbeat once, and died: its lease has expired
    now = datetime.now(UTC)
    last_seen = now - timedelta(seconds=30)
    store.register_worker(_worker("dead:7:xyz", beat=0, heartbeat_at=last_seen))
    (claimed,) = store.claim(
        owner="dead:7:xyz", now=now, lease_until=now - timedelta(seconds=1), limit=1
    )
    assert claimed.id == rid
    env.work()
    r = store.get_rotation(rid)
    assert r.state is State.OLD_DEACTIVATED
    takeovers = [e for e in store.events(rid) if e.detail.get("status") == "taken_over"]
    assert len(takeovers) == 1
    (e,) = takeovers
    assert e.kind == "run" and e.trigger == "claim" and e.actor != "dead:7:xyz"
    assert e.detail == {
        "status": "taken_over",
        "from": "dead:7:xyz",
        "holder_last_seen": last_seen.isoformat(),
    }
    assert e.from_state == "pending"
    assert e.reason == (
        "lease of dead:7:xyz expired (last heartbeat "
        f"{last_seen.strftime('%Y-%m-%d %H:%M:%S UTC')})"
    )
    # written with the first write after the claim, before the first transition
    events = store.events(rid)
    first_step = next(i for i, x in enumerate(events) if x.to_state == "new_added")
    assert events.index(e) < first_step


def test_a_lease_released_cleanly_is_no_takeover(store: Store, tmp_path: Path) -> None:
    env = _env(store, tmp_path)
    rid = env.rotate()
    env.work()
    assert not [e for e in store.events(rid) if e.detail.get("status") == "taken_over"]


def test_a_request_recorded_under_a_lease_says_truthfully_who_carries_it_out() -> None:
    """While a lease is held, the command promises the holder only when it heartbeats."""
    from types import SimpleNamespace

    from keyturn.adapters.store.memory import MemoryStore
    from keyturn.cli import _requested
    from keyturn.domain.model import OperatorAction

    now = datetime.now(UTC)
    store = MemoryStore()
    w = SimpleNamespace(store=store, clock=SimpleNamespace(now=lambda: now))
    rotation = SimpleNamespace(
        id="rot_x", lease_owner="h:1:live", lease_expires_at=now + timedelta(seconds=20)
    )
    record = WorkerRecord("h:1:live", "h", 1, now, now, 2, 10.0, 30.0)
    store.register_worker(record)
    said = _requested(w, OperatorAction.PAUSE, rotation)  # type: ignore[arg-type]
    assert "the worker holding rotation rot_x (h:1:live" in said
    assert "carries it out at its next action boundary" in said

    store.register_worker(dataclasses.replace(record, heartbeat_at=now - timedelta(seconds=60)))
    said = _requested(w, OperatorAction.PAUSE, rotation)  # type: ignore[arg-type]
    assert "the holder of rotation rot_x (h:1:live) is not seen" in said
    assert said.endswith("no live worker: start `keyturn worker`")


def _waiting_an_hour(store: Store, tmp_path: Path) -> tuple[str, datetime]:
    """A rotation waiting on a person, its next check an hour away: its id and that time."""
    env = _env(store, tmp_path)
    later = datetime.now(UTC) + timedelta(hours=1)
    rid = env.rotate()
    r = store.get_rotation(rid)
    wait = {"wait_key": "forward.w:person", "wait_for": "x", "next_attempt_at": later}
    store.commit(Change(rid, r.version, updates=wait))
    return rid, later


def _due_at(store: Store, rid: str, at: datetime) -> bool:
    due = store.get_rotation(rid).next_attempt_at
    return due is not None and abs((due - at).total_seconds()) < 1.1


def test_wake_waiting_makes_the_waiting_rotations_due_and_no_other(
    store: Store, tmp_path: Path
) -> None:
    """What a worker does when the shared test clock is set: each waiting rotation's next
    check (converted under the old setting) becomes now; one due already is left as is."""
    waiting, _later = _waiting_an_hour(store, tmp_path)
    now = datetime.now(UTC)
    assert store.wake_waiting(now) == 1
    assert _due_at(store, waiting, now)
    assert store.wake_waiting(now) == 0  # already due


def test_wake_waiting_of_one_rotation_leaves_the_others(store: Store, tmp_path: Path) -> None:
    """With a rotation id (evidence came while a worker held it) only that rotation is made
    due: another id leaves a waiting rotation's next check as it was."""
    rid, later = _waiting_an_hour(store, tmp_path)
    now = datetime.now(UTC)
    assert store.wake_waiting(now, "rot_someone_else") == 0
    assert _due_at(store, rid, later)
    assert store.wake_waiting(now, rid) == 1
    assert _due_at(store, rid, now)
    assert store.wake_waiting(now, rid) == 0  # due already
