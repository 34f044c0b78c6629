"""`keyturn plan --json`, then the workers run on the test clock: the calls the sandbox logs for
those rotations are exactly the planned ones, in order, at the planned times. `plan`, `rotate
--dry-run` and `credentials list` write nothing and agree with each other."""

from __future__ import annotations

import itertools
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fleet import Fleet, make_fleet
from harness import collapse, requests_since

POLICY = """
[schedule]
tick_seconds = 0.2
test_clock = true

[policies.planned]
every = "1h"
jitter = "20m"
group = "fleet"
stagger = "5m"
"""


def _configure(fleet: Fleet) -> None:
    text = fleet.kt.config.read_text()
    for name in fleet.names:
        head = f"[credentials.{name}]\n"
        text = text.replace(head, f'{head}policy = "planned"\n')
    fleet.kt.config.write_text(text + POLICY)


def _expected(item: dict[str, Any]) -> tuple[list[str], set[str]]:
    routes = [
        (route, call["repeat"])
        for action in item["actions"]
        for call in action["calls"]
        for route in call["provider_requests"]
    ]
    polled = {r for r, repeat in routes if repeat}
    return collapse([r for r, _ in routes], polled), polled


def _counts(fleet: Fleet) -> tuple[int, int]:
    rot = fleet.reader.query("SELECT count(*) FROM rotations")[0][0]
    slots = fleet.reader.query("SELECT count(*) FROM schedule_slots")[0][0]
    return int(rot), int(slots)


def test_the_plan_is_what_the_workers_do(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, 3, worker={"poll_seconds": 0.2})
    kt = fleet.kt
    try:
        _configure(fleet)
        t0 = datetime.now(UTC)
        kt.run("clock", "set", "--at", t0.isoformat(), "--scale", "1")
        worker = fleet.start_worker(concurrency=4)
        deadline = time.monotonic() + 30
        while _counts(fleet)[1] < len(fleet.names):
            assert time.monotonic() < deadline, worker.tail()
            time.sleep(0.2)
        before = _counts(fleet)
        until = (t0 + timedelta(hours=1, minutes=30)).isoformat()
        doc = json.loads(kt.run("plan", "--json", "--until", until).stdout)
        planned = {p["credential"]: p for p in doc["rotations"]}
        assert set(planned) == set(fleet.names), doc  # one each within 1h30: every 1h
        starts = sorted(datetime.fromisoformat(p["at"]) for p in planned.values())
        assert all(b - a >= timedelta(minutes=5) for a, b in itertools.pairwise(starts))
        # the dry run of one credential plans the same calls; the inventory the same time
        name = fleet.names[0]
        dry = json.loads(kt.run("rotate", name, "--dry-run", "--json").stdout)
        assert dry["rotations"][0]["actions"] == planned[name]["actions"]
        listed = {c["name"]: c for c in json.loads(kt.run("credentials", "list", "--json").stdout)}
        assert listed[name]["next_rotation_at"] == planned[name]["at"]
        assert listed[name]["policy"] == "planned"
        assert _counts(fleet) == before  # plan, dry run and list wrote nothing

        # run each planned rotation at its time, alone, and compare with the sandbox's log
        for p in sorted(planned.values(), key=lambda p: p["at"]):
            at = datetime.fromisoformat(p["at"])
            seq, _ = requests_since(kt, 0)
            kt.run("clock", "set", "--at", (at + timedelta(seconds=1)).isoformat())
            deadline = time.monotonic() + 60
            while True:
                rows = [
                    r for r in fleet.reader.rotations().values() if r.credential == p["credential"]
                ]
                if rows and rows[0].state == "old_deactivated":
                    break
                assert time.monotonic() < deadline, worker.tail()
                time.sleep(0.2)
            _, log = requests_since(kt, seq)
            expected, polled = _expected(p)
            assert all(r["status"] < 300 for r in log), log
            assert collapse([r["route"] for r in log], polled) == expected, p["credential"]
            fired = fleet.reader.query(
                "SELECT slot, fired_at FROM schedule_slots WHERE credential = ? AND "
                "status = 'fired'",
                (p["credential"],),
            )
            assert len(fired) == 1
            fired_at = datetime.fromisoformat(str(fired[0][1])).replace(tzinfo=UTC)
            assert at <= fired_at < at + timedelta(seconds=10), (at, fired_at)

        # by hand: the group's stagger holds (the last start was moments ago) unless --now
        last = sorted(planned.values(), key=lambda p: p["at"])[-1]["credential"]
        other = next(n for n in fleet.names if n != last)
        refused = kt.run("rotate", other, check=False)
        assert refused.returncode == 1, refused.stdout
        assert refused.stderr.startswith(f"keyturn: error: {other}: stagger 5m in group fleet")
        assert "pass --now" in refused.stderr and refused.stderr.count("\n") == 1
        assert _counts(fleet)[0] == len(fleet.names)  # nothing started
        kt.run("rotate", other, "--now")
        assert _counts(fleet)[0] == len(fleet.names) + 1
        bad = kt.run("plan", "--until", "next tuesday", check=False)
        assert bad.returncode == 1
        assert bad.stderr == (
            "keyturn: error: --until 'next tuesday' is not a date; give 2027-01-31, "
            "2027-01-31T12:00+01:00 or 30d\n"
        )
    finally:
        fleet.kill_workers()
        fleet.sandbox.stop()
