"""Truth about liveness, with real worker processes: `kill -9` of a worker holding a rotation.

`rotations show` says the holder is not seen once two heartbeat intervals have passed; another
worker takes the rotation over and the takeover is in the timeline (who from, when last seen);
`keyturn workers` shows the dead worker stale, the new one live (then stopped, after SIGTERM);
and an operator command says "no live worker" when none heartbeats (the other answer, "a worker
carries on from here", is tested in tests/unit/test_worker_liveness.py).
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from fleet import Fleet, WorkerProc, _aware, make_fleet
from harness import SA

from keyturn.cli.liveness import LIVE_HINT, NO_WORKER_HINT

LEASE = 3.0  # seconds; a worker heartbeats every LEASE / 3
BEAT = LEASE / 3


def _workers(fleet: Fleet) -> dict[str, dict[str, Any]]:
    rows = json.loads(fleet.kt.run("workers", "--json").stdout)
    return {r["owner"]: r for r in rows}


def _wait_held_by(fleet: Fleet, rid: str, worker: WorkerProc, timeout: float = 20) -> str:
    owner = worker.owner()
    deadline = time.monotonic() + timeout
    while fleet.reader.rotation(rid).lease_owner != owner:
        assert time.monotonic() < deadline, f"{owner} never held {rid}: {worker.tail()}"
        assert worker.proc.poll() is None, worker.tail()
        time.sleep(0.05)
    return owner


def _row(table: str, owner: str, pid: int, status: str, *, held: int) -> bool:
    """Has `keyturn workers` a row: owner host pid started heartbeat age status held?"""
    row = rf"^{re.escape(owner)}\s+\S+\s+{pid}\s.*\s{status}\s+{held}$"
    return re.search(row, table, re.MULTILINE) is not None


def test_kill_9_of_the_holder(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, 1, worker={"lease_seconds": LEASE, "poll_seconds": 0.2})
    kt = fleet.kt
    try:
        (rid,) = fleet.start_rotations()
        fleet.sandbox.set_faults(latency_ms=700)  # every call slow: the worker keeps holding
        w0 = fleet.start_worker(concurrency=1)
        dead = _wait_held_by(fleet, rid, w0)
        time.sleep(BEAT * 1.2)  # at least one heartbeat and one renewal after the claim
        w0.kill()  # SIGKILL: no release, no clean stop
        fleet.workers.remove(w0)  # its exit code -9 is expected
        killed_at = time.monotonic()
        time.sleep(2 * BEAT + 0.1)

        # within two heartbeat intervals of the kill, show no longer calls the holder live
        show = kt.run("rotations", "show", rid).stdout
        silent = time.monotonic() - killed_at
        match = re.search(r"holder not seen for (\d+) s", show)
        assert match, show
        assert dead in show and f"it heartbeats every {BEAT:g} s" in show, show
        assert "taken " in show and "last renewal " in show, show
        assert 2 * BEAT <= int(match.group(1)) <= silent + BEAT + 1, (silent, show)
        (beat,) = fleet.reader.query("SELECT heartbeat_at FROM workers WHERE owner = ?", (dead,))
        last_seen = _aware(beat[0])

        # another worker takes it over; the takeover is in the timeline
        fleet.sandbox.clear_faults()
        w1 = fleet.start_worker(concurrency=1)
        rows = fleet.wait_settled(timeout=40)
        assert rows[rid].state == "old_deactivated", rows[rid]
        alive = w1.owner()
        shown = json.loads(kt.run("rotations", "show", rid, "--json").stdout)
        takeovers = [e for e in shown["events"] if e["detail"].get("status") == "taken_over"]
        assert len(takeovers) == 1, shown["events"]
        (event,) = takeovers
        assert event["actor"] == alive and event["kind"] == "run"
        assert event["detail"]["from"] == dead
        assert datetime.fromisoformat(event["detail"]["holder_last_seen"]) == last_seen

        # the dead worker stale, the new one live (table: owner host pid started heartbeat ...)
        table = kt.run("workers").stdout
        assert _row(table, dead, w0.pid, "stale", held=0), table
        assert _row(table, alive, w1.pid, "live", held=0), table

        # after a clean stop the worker is "stopped", and no operator command promises a worker
        assert w1.stop() == 0, w1.tail()
        workers = _workers(fleet)
        assert workers[alive]["status"] == "stopped" and workers[alive]["stopped_at"], workers
        assert workers[dead]["status"] == "stale", workers
        second = kt.rotate_here(SA)
        kt.run("rotations", "pause", second, "--reason", "liveness test")
        resumed = kt.run("rotations", "resume", second, "--reason", "liveness test").stdout
        assert "resume applied" in resumed and NO_WORKER_HINT in resumed, resumed
        assert LIVE_HINT not in resumed, resumed
    finally:
        fleet.kill_workers()
        fleet.sandbox.stop()
