"""Many worker processes on one queue: PostgreSQL with 4 workers and 200 rotations, SQLite with
2 workers on one file, and a worker frozen (SIGSTOP) past its lease that must write nothing when
it is continued."""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from fleet import libpq_url, make_fleet


def test_two_workers_on_one_sqlite_file(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, 50, worker={"poll_seconds": 0.2})
    try:
        ids = fleet.start_rotations()
        assert len(ids) == 50
        # a little latency per request keeps the run long enough for both workers to join in
        fleet.sandbox.set_faults(latency_ms=20)
        workers = [fleet.start_worker("--until-idle", concurrency=8) for _ in range(2)]
        codes = [w.wait(timeout=120) for w in workers]
        rows = fleet.reader.rotations()
        fleet.assert_all_done(rows)
        fleet.assert_transitions_once()
        fleet.sandbox.clear_faults()
        fleet.check_provider(rows)
        for w, code in zip(workers, codes, strict=True):
            log = w.stderr()
            assert code == 0, f"worker {w.name} exited {code}: {w.tail()}"
            assert "database is locked" not in log, w.tail()
            assert "Traceback" not in log, w.tail()
            errors = [x for x in w.lines() if x.get("level") in ("error", "critical")]
            assert not errors, errors[:3]
        done = [len(w.transitions_logged()) for w in workers]
        assert sum(done) == 3 * 50, done  # every transition logged once, by one of the two
        assert all(n > 0 for n in done), f"a worker did no work: {done}"
    finally:
        fleet.kill_workers()
        fleet.sandbox.stop()


@pytest.mark.postgres
def test_four_workers_on_postgres(tmp_path: Path, fresh_pg_url: str) -> None:
    started = time.monotonic()
    fleet = make_fleet(tmp_path, 200, db_url=fresh_pg_url, worker={"poll_seconds": 0.2})
    try:
        ids = fleet.start_rotations()
        assert len(ids) == 200
        fleet.sandbox.set_faults(latency_ms=10)
        workers = [fleet.start_worker(concurrency=8) for _ in range(4)]
        owners = {w.name: w.owner() for w in workers}
        assert len(set(owners.values())) == 4
        rows = fleet.wait_settled(timeout=180)
        codes = fleet.stop_workers()
        fleet.assert_all_done(rows)
        events = fleet.assert_transitions_once()
        fleet.sandbox.clear_faults()
        fleet.check_provider(rows)
        assert codes == {w.name: 0 for w in workers}, [w.tail() for w in workers]

        # every worker did some of the work, and each transition was done by exactly one
        logged = {w.name: len(w.transitions_logged()) for w in workers}
        assert sum(logged.values()) == 3 * 200, logged
        assert all(n > 0 for n in logged.values()), f"a worker did no work: {logged}"
        # each transition event names the worker that made it: the same counts as its log
        by_actor = Counter(
            e.actor for evs in events.values() for e in evs if e.kind == "transition"
        )
        assert by_actor == Counter({owners[name]: n for name, n in logged.items()}), (
            by_actor,
            logged,
            owners,
        )
        for w in workers:
            assert "Traceback" not in w.stderr(), w.tail()
        print(f"4 workers, 200 rotations on PostgreSQL: {time.monotonic() - started:.1f}s")
    finally:
        fleet.kill_workers()
        fleet.sandbox.stop()


def _writes(requests: dict[str, dict[str, int]]) -> dict[str, int]:
    """Accepted (2xx) state-changing credential requests at the sandbox, per route."""
    routes = ("POST /auth/credentials", "PUT /auth/credentials/deactivate",
              "PUT /auth/credentials/activate")  # fmt: skip
    return {
        r: sum(n for status, n in requests.get(r, {}).items() if status.startswith("2"))
        for r in routes
    }


def _requests(requests: dict[str, dict[str, int]]) -> Counter[str]:
    """Requests the sandbox answered on its Dfns routes, per route and status."""
    return Counter(
        {f"{r} {status}": n for r, codes in requests.items() for status, n in codes.items()}
    )


def _in_transaction(url: str, own_pid: int) -> list[str]:
    """Other backends of this database inside a transaction (holding locks) right now."""
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT state FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> %s AND state LIKE %s",
            (own_pid, "%transaction%"),
        ).fetchall()
    return [str(r[0]) for r in rows]


@pytest.mark.postgres
def test_frozen_worker_loses_its_rotation_and_writes_nothing(
    tmp_path: Path, fresh_pg_url: str
) -> None:
    fleet = make_fleet(
        tmp_path, 1, db_url=fresh_pg_url, worker={"lease_seconds": 3, "poll_seconds": 0.2}
    )
    try:
        (rid,) = fleet.start_rotations()
        reader = fleet.reader
        # a slow provider (1.5 s per request), so that a holder is mid-rotation for long
        fleet.sandbox.set_faults(latency_ms=1500)
        a = fleet.start_worker(concurrency=1)
        owner_a = a.owner()

        # wait until A holds the rotation and is inside register_new (intent, no outcome yet)
        deadline = time.monotonic() + 30
        while True:
            row = reader.rotation(rid)
            if row.lease_owner == owner_a and reader.action_status(rid, "register_new"):
                break
            assert time.monotonic() < deadline, f"A never got mid-rotation: {a.tail()}"
            time.sleep(0.05)
        # A sent its first request of register_new right after committing the intent; freeze it
        # while it waits for the answer (a request already on the wire when the process stops is
        # not one it starts after being continued), and outside any database transaction (a
        # frozen open transaction would hold its row lock and block everyone)
        time.sleep(0.3)
        for _ in range(8):
            a.freeze()
            with psycopg.connect(libpq_url(fresh_pg_url), autocommit=True) as conn:
                own = conn.execute("SELECT pg_backend_pid()").fetchone()
            assert own is not None
            if not _in_transaction(fresh_pg_url, int(own[0])):
                break
            a.thaw()
            time.sleep(0.1)
        else:
            pytest.fail("could not freeze worker A outside a transaction")
        frozen_at = reader.rotation(rid)
        assert frozen_at.lease_owner == owner_a and frozen_at.state == "pending", frozen_at
        froze = time.monotonic()
        froze_wall = datetime.now(UTC)

        fleet.sandbox.set_faults(latency_ms=0)
        b = fleet.start_worker(concurrency=1)
        owner_b = b.owner()
        rows = fleet.wait_settled(timeout=60)
        # B took the rotation over only after A's lease expired (3 s), and finished it
        assert time.monotonic() - froze >= 2.5
        fleet.assert_all_done(rows)
        assert b.stop() == 0, b.tail()
        assert len(b.transitions_logged()) == 3, b.tail()  # A froze before its first one
        made_by = {e.actor for e in reader.events(rid) if e.kind == "transition"}
        assert made_by == {owner_b}, made_by
        fleet.check_provider(rows)
        before = (reader.rotation(rid), reader.events(rid), reader.query("SELECT * FROM actions"))
        writes_before = _writes(fleet.sandbox.state()["requests"])
        requests_before = _requests(fleet.sandbox.state()["requests"])

        a.thaw()
        deadline = time.monotonic() + 20
        while not any("lease lost" in str(x.get("event", "")) for x in a.lines()):
            assert time.monotonic() < deadline, f"A did not log that it lost the lease: {a.tail()}"
            assert a.proc.poll() is None, f"A died: {a.tail()}"
            time.sleep(0.1)
        time.sleep(1.5)  # room for any late write A might still try

        assert a.stop() == 0, a.tail()
        requests_after = fleet.sandbox.state()["requests"]  # before the test's own requests

        after = (reader.rotation(rid), reader.events(rid), reader.query("SELECT * FROM actions"))
        assert after[0] == before[0], "the rotation changed after A was continued"
        assert after[1] == before[1], "the event log changed after A was continued"
        assert after[2] == before[2], "the action records changed after A was continued"
        late = [e for e in after[1] if e.actor == owner_a and e.at >= froze_wall]
        assert not late, f"events by the frozen worker after its freeze: {late}"
        # nothing state-changing A sent after it was continued was accepted by the sandbox
        assert _writes(requests_after) == writes_before
        # The lease is checked on the monotonic clock before each external call, so the worker,
        # continued long after its lease ran out, sends the provider no further request at all.
        late_requests = _requests(requests_after) - requests_before
        assert not late_requests, (
            f"the frozen worker, continued after losing its lease, still sent the provider "
            f"{dict(late_requests)}: {a.tail()}"
        )
        fleet.check_provider(rows)
        assert owner_b != owner_a
    finally:
        fleet.kill_workers()
        fleet.sandbox.stop()
