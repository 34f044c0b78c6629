"""Connection loss mid-run: the sandbox restarted (same port, same state), and a throwaway
PostgreSQL cluster stopped with `pg_ctl stop -m fast` and started again a few seconds later.
The worker processes survive, back off and carry on: all 50 rotations finish, none twice."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fleet import Fleet, PgCluster, RotationRow, make_fleet

N = 50


def _wait_for_progress(fleet: Fleet, at_least: int, timeout: float = 60) -> int:
    """Wait until `at_least` rotations moved past pending; how many are finished by then."""
    deadline = time.monotonic() + timeout
    while True:
        rows = fleet.reader.rotations()
        moved = [r for r in rows.values() if r.state != "pending"]
        finished = [r for r in rows.values() if r.state == "old_deactivated"]
        if len(moved) >= at_least:
            return len(finished)
        assert time.monotonic() < deadline, f"only {len(moved)} rotations started moving"
        for w in fleet.workers:
            assert w.proc.poll() is None, f"worker {w.name} died: {w.tail()}"
        time.sleep(0.05)


def _check(fleet: Fleet, rows: dict[str, RotationRow]) -> None:
    fleet.assert_all_done(rows)
    fleet.assert_transitions_once()
    fleet.sandbox.clear_faults()
    fleet.check_provider(rows)


def test_sandbox_restart_mid_run(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, N, worker={"poll_seconds": 0.2, "lease_seconds": 5})
    try:
        fleet.start_rotations()
        fleet.sandbox.set_faults(latency_ms=150)  # a run of several seconds to restart within
        workers = [fleet.start_worker(concurrency=8) for _ in range(2)]
        finished = _wait_for_progress(fleet, at_least=12)
        assert finished < N, "the run was over before the restart"
        old_pid, port = fleet.sandbox.pid, fleet.sandbox.port
        fleet.sandbox.stop()
        time.sleep(1.0)  # the provider is gone for a while: connection refused
        fleet.sandbox.start()  # same port, same state; faults back to none
        assert (fleet.sandbox.pid != old_pid) and fleet.sandbox.port == port
        rows = fleet.wait_settled(timeout=120)
        codes = fleet.stop_workers()
        _check(fleet, rows)
        assert codes == {w.name: 0 for w in workers}, [w.tail() for w in workers]
        errors = [x for w in workers for x in w.lines() if x.get("outcome") == "error"]
        assert errors, "no provider call failed: the restart did not land mid-run"
    finally:
        fleet.kill_workers()
        fleet.sandbox.stop()


@pytest.mark.postgres
def test_postgres_restart_mid_run(tmp_path: Path, pg_cluster: PgCluster) -> None:
    fleet = make_fleet(
        tmp_path, N, db_url=pg_cluster.url, worker={"poll_seconds": 0.2, "lease_seconds": 5}
    )
    try:
        fleet.start_rotations()
        fleet.sandbox.set_faults(latency_ms=150)
        workers = [fleet.start_worker(concurrency=8) for _ in range(2)]
        finished = _wait_for_progress(fleet, at_least=12)
        assert finished < N, "the run was over before the restart"
        pg_cluster.stop("fast")  # every connection is closed; new ones are refused
        time.sleep(3.0)
        for w in workers:
            assert w.proc.poll() is None, f"worker {w.name} died with the database: {w.tail()}"
        pg_cluster.start()
        rows = fleet.wait_settled(timeout=120, tolerate_db_errors=True)
        codes = fleet.stop_workers()
        _check(fleet, rows)
        assert codes == {w.name: 0 for w in workers}, [w.tail() for w in workers]
    finally:
        fleet.kill_workers()
        fleet.sandbox.stop()
