"""The scheduler in worker processes on the shared test clock (`keyturn clock set`), against the
sandbox over HTTP: every slot fires exactly once, counted at the sandbox and in the store;
workers stopped for three slots and restarted give one rotation per credential, not three; two
workers whose configs give a credential different policies rotate it once per slot.

PostgreSQL: 3 workers, 500 credentials (SCHEDULE_E2E_N). SQLite: 2 workers, 50 credentials."""

from __future__ import annotations

import os
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from fleet import Fleet, make_fleet

PG_N = int(os.environ.get("SCHEDULE_E2E_N", "500"))
SQLITE_N = 50

SCHEDULE = """
[schedule]
tick_seconds = 0.2
batch = 1000
test_clock = true

[policies.fleet]
every = "{every}"
"""


def _configure(fleet: Fleet, every: str = "1h") -> None:
    """The fleet's service accounts follow policy "fleet" (the PAT and webhook `keyturn init`
    made are rotated by hand only)."""
    text = fleet.kt.config.read_text()
    for name in fleet.names:
        head = f"[credentials.{name}]\n"
        assert text.count(head) == 1, head
        text = text.replace(head, f'{head}policy = "fleet"\n')
    fleet.kt.config.write_text(text + SCHEDULE.format(every=every))


def _set_clock(fleet: Fleet, at: datetime) -> None:
    fleet.kt.run("clock", "set", "--at", at.isoformat(), "--scale", "1")


def _rotations(fleet: Fleet) -> Counter[str]:
    return Counter(r.credential for r in fleet.reader.rotations().values())


def _fired_slots(fleet: Fleet) -> Counter[str]:
    rows = fleet.reader.query(
        "SELECT credential, count(*) FROM schedule_slots WHERE status = 'fired' GROUP BY credential"
    )
    return Counter({str(r[0]): int(r[1]) for r in rows})


def _wait_planned(fleet: Fleet, timeout: float = 60) -> None:
    """Until every credential has its scheduled slot (the workers' first planning pass sees
    each key on the clock as set, before the test moves it)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = fleet.reader.query("SELECT count(*) FROM schedule_slots WHERE status = 'scheduled'")
        if int(rows[0][0]) == len(fleet.names):
            return
        assert time.monotonic() < deadline, f"{rows[0][0]} of {len(fleet.names)} planned"
        time.sleep(0.2)


def _at_sandbox(fleet: Fleet) -> Counter[str]:
    """How many credentials each account holds at the sandbox (one more per rotation)."""
    counts: Counter[str] = Counter()
    with httpx.Client(base_url=fleet.sandbox.base_url, timeout=10) as http:
        for name in fleet.names:
            r = http.get(
                "/auth/credentials",
                headers={"Authorization": f"Bearer {fleet.accounts[name]['token']}"},
            )
            r.raise_for_status()
            counts[name] = len(r.json()["items"])
    return counts


def _wait_rotations(fleet: Fleet, per_credential: int, timeout: float) -> None:
    """Until every credential has `per_credential` rotations, all of them finished."""
    deadline = time.monotonic() + timeout
    while True:
        rows = fleet.reader.rotations()
        counts = Counter(r.credential for r in rows.values())
        enough = all(counts[n] >= per_credential for n in fleet.names)
        if enough and all(r.settled for r in rows.values()):
            return
        for w in fleet.workers:
            code = w.proc.poll()
            if code is not None and code != 0:
                raise AssertionError(f"worker {w.name} exited {code}: {w.tail()}")
        if time.monotonic() > deadline:
            short = [n for n in fleet.names if counts[n] < per_credential][:5]
            tails = "\n".join(f"--- {w.name}:\n{w.tail(1500)}" for w in fleet.workers)
            raise AssertionError(
                f"{len(short)} credential(s) short of {per_credential} rotations, e.g. {short}; "
                f"{sum(not r.settled for r in rows.values())} unsettled\n{tails}"
            )
        time.sleep(0.3)


def _check_done(fleet: Fleet, per_credential: int) -> None:
    rows = fleet.reader.rotations()
    bad = [
        (r.credential, r.state, r.halted_reason)
        for r in rows.values()
        if r.state != "old_deactivated"
    ]
    assert not bad, bad[:5]
    assert _rotations(fleet) == Counter(dict.fromkeys(fleet.names, per_credential))
    assert _fired_slots(fleet) == Counter(dict.fromkeys(fleet.names, per_credential))
    # each rotation added exactly one credential at the sandbox
    assert _at_sandbox(fleet) == Counter(dict.fromkeys(fleet.names, 1 + per_credential))


def _no_errors(fleet: Fleet) -> None:
    for w in fleet.workers:
        assert "Traceback" not in w.stderr(), w.tail()
        errors = [x for x in w.lines() if x.get("level") in ("error", "critical")]
        assert not errors, errors[:3]


def _downtime_scenario(fleet: Fleet, workers: int, timeout: float) -> None:
    _configure(fleet)
    t0 = datetime.now(UTC)
    _set_clock(fleet, t0)
    for _ in range(workers):
        fleet.start_worker(concurrency=16)
    _wait_planned(fleet)
    time.sleep(0.5)  # a few ticks
    assert _rotations(fleet) == Counter()  # nothing is due an hour before the first slot
    _set_clock(fleet, t0 + timedelta(hours=1, minutes=1))
    _wait_rotations(fleet, 1, timeout)
    time.sleep(1.0)  # a tick or more past the last rotation: still one each
    _check_done(fleet, 1)

    fleet.stop_workers()
    # three slots pass while no worker runs
    _set_clock(fleet, t0 + timedelta(hours=5))
    for _ in range(workers):
        fleet.start_worker(concurrency=16)
    _wait_rotations(fleet, 2, timeout)
    time.sleep(1.0)
    _check_done(fleet, 2)  # one rotation for the three missed slots, not three
    _no_errors(fleet)


@pytest.mark.postgres
def test_three_workers_on_postgres_fire_each_slot_once(tmp_path: Path, fresh_pg_url: str) -> None:
    fleet = make_fleet(tmp_path, PG_N, db_url=fresh_pg_url, worker={"poll_seconds": 0.2})
    try:
        _downtime_scenario(fleet, 3, timeout=240)
    finally:
        fleet.kill_workers()
        fleet.sandbox.stop()


def test_two_workers_on_sqlite_fire_each_slot_once(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, SQLITE_N, worker={"poll_seconds": 0.2})
    try:
        _downtime_scenario(fleet, 2, timeout=120)
    finally:
        fleet.kill_workers()
        fleet.sandbox.stop()


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_workers_with_different_policies_rotate_once_per_slot(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("fresh_pg_url") if backend == "postgres" else None
    fleet = make_fleet(tmp_path, 20, db_url=url, worker={"poll_seconds": 0.2})
    try:
        _configure(fleet, every="1h")
        other = fleet.kt.config.with_name("other.toml")
        other.write_text(fleet.kt.config.read_text().replace('every = "1h"', 'every = "2h"'))
        t0 = datetime.now(UTC)
        _set_clock(fleet, t0)
        # the two-hourly worker plans every first slot; the hourly one sees them as another
        # policy's and leaves them to it
        fleet.start_worker(concurrency=8, KEYTURN_CONFIG=str(other))
        _wait_planned(fleet)
        hourly = fleet.start_worker(concurrency=8)
        hourly.owner()
        for slot in (1, 2):
            # past the slot of either policy, whichever planned it
            _set_clock(fleet, t0 + timedelta(hours=2 * slot + 1))
            _wait_rotations(fleet, slot, timeout=90)
            time.sleep(1.0)
            _check_done(fleet, slot)
        fingerprints = fleet.reader.query("SELECT DISTINCT fingerprint FROM schedule_slots")
        assert len(fingerprints) == 2, fingerprints  # both configs planned slots
        _no_errors(fleet)
    finally:
        fleet.kill_workers()
        fleet.sandbox.stop()
