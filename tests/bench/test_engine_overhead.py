"""Engine overhead against the SQL ceiling, in one run (issue 6, figures 1 and 2).

N pending rotations (BENCH_N, default 10,000) are driven from pending to old_deactivated by 1,
then 2, worker processes (tests/bench/bench_worker.py: keyturn's Worker + SqlStore, a provider
that answers at once, a deploy target that writes nothing) on a fresh PostgreSQL database with
default durability. Then pgbench runs ../shared/perf/pgbench_b_two_tx.sql with as many clients
as keyturn's workers held connections, and with 8.

Reported, never asserted: transitions/s (from the event log), database commits per transition
(pg_stat_database.xact_commit), worker CPU per transition, due-to-first-transition delay
p50/p99, worker peak RSS and RSS at the 1,000th and 10,000th finished rotation, and keyturn's
share of each ceiling. Asserted: every rotation took exactly the three forward transitions (a
benchmark of a broken run is worthless).

    BENCH_N=10000 .venv/bin/pytest -q -s tests/bench/test_engine_overhead.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import benchlib
import psycopg
import pytest

from keyturn.adapters.store.migrate import upgrade
from keyturn.adapters.vault import AesGcmVault, MasterKey

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(7200)]

WORKER = Path(__file__).resolve().parent / "bench_worker.py"


def _thresholds(n: int) -> list[int]:
    return [1000, 10000] if n >= 10000 else sorted({max(1, n // 10), n})


def run_engine(n: int, workers: int, monitor: benchlib.Monitor, tmp: Path) -> dict[str, Any]:
    concurrency = benchlib.env_int("BENCH_CONCURRENCY", 64)
    dbname = benchlib.create_db("kt_bench_engine")
    url = benchlib.sa_url(dbname)
    try:
        upgrade(url)
        master = MasterKey.generate()
        due = datetime.now(UTC)
        benchlib.seed_pending_rotations(url, n, AesGcmVault(master), at=due)

        poller = psycopg.connect(benchlib.libpq(dbname), autocommit=True)
        polls = 0
        benchlib.settle_stats()
        commits_before = monitor.xact_commit(dbname)

        env = {**os.environ, "BENCH_MASTER_KEY": master.text(), "PYTHONUNBUFFERED": "1"}
        launched = datetime.now(UTC)
        t0 = time.monotonic()
        procs = [
            subprocess.Popen(
                [sys.executable, str(WORKER), url, str(concurrency), str(tmp / f"w{i}.log")],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for i in range(workers)
        ]
        thresholds = _thresholds(n)
        rss_at: dict[str, list[int | None]] = {}
        max_conns = 0
        finished = 0
        timeout = benchlib.env_float("BENCH_TIMEOUT_SECONDS", 1800)
        try:
            while finished < n:
                time.sleep(0.2)
                row = poller.execute(
                    "SELECT count(*) FROM rotations WHERE finished_at IS NOT NULL"
                ).fetchone()
                polls += 1
                finished = int(row[0]) if row else 0
                max_conns = max(max_conns, monitor.connections(dbname, [poller.info.backend_pid]))
                for t in thresholds:
                    if finished >= t and str(t) not in rss_at:
                        rss_at[str(t)] = [benchlib.rss_kib(p.pid) for p in procs]
                dead = [p for p in procs if p.poll() is not None]
                if dead:
                    logs = (tmp / "w0.log").read_text()[-2000:]
                    raise AssertionError(f"a bench worker exited {dead[0].returncode}: {logs}")
                if time.monotonic() - t0 > timeout:
                    raise AssertionError(
                        f"only {finished} of {n} rotations finished in {timeout:.0f}s; "
                        "raise BENCH_TIMEOUT_SECONDS or lower BENCH_N"
                    )
            done_wall = time.monotonic() - t0
        finally:
            usage = []
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                _pid, status, ru = os.wait4(p.pid, 0)
                p.returncode = os.waitstatus_to_exitcode(status)
                usage.append(ru)
        benchlib.settle_stats()
        commits = monitor.xact_commit(dbname) - commits_before - polls

        # The event log: every rotation exactly pending -> new_added -> verified -> done.
        bad = poller.execute(
            """
            SELECT count(*) FROM (
              SELECT r.id, string_agg(e.to_state, ',' ORDER BY e.id) AS path
                FROM rotations r
                LEFT JOIN events e ON e.rotation_id = r.id AND e.kind = 'transition'
               GROUP BY r.id) t
             WHERE path IS DISTINCT FROM 'new_added,verified,old_deactivated'
            """
        ).fetchone()
        assert bad is not None and bad[0] == 0, f"{bad} rotations did not take the forward path"
        span = poller.execute(
            "SELECT count(*), min(at), max(at) FROM events WHERE kind = 'transition'"
        ).fetchone()
        assert span is not None
        transitions, first, last = int(span[0]), span[1], span[2]
        delays = [
            float(r[0])
            for r in poller.execute(
                """
                SELECT EXTRACT(EPOCH FROM min(e.at) - greatest(r.next_attempt_at, %s))
                  FROM rotations r JOIN events e ON e.rotation_id = r.id
                 WHERE e.kind = 'transition' GROUP BY r.id, r.next_attempt_at
                """,
                (launched,),
            ).fetchall()
        ]
        poller.close()
        wall = (last - launched).total_seconds()
        active = (last - first).total_seconds()
        cpu = sum(ru.ru_utime + ru.ru_stime for ru in usage)
        return {
            "workers": workers,
            "concurrency_per_worker": concurrency,
            "rotations": n,
            "transitions": transitions,
            "wall_seconds_launch_to_last_transition": round(wall, 3),
            "wall_seconds_first_to_last_transition": round(active, 3),
            "poll_observed_seconds": round(done_wall, 3),
            "transitions_per_s": round(transitions / wall, 1),
            "transitions_per_s_excluding_startup": round(transitions / active, 1),
            "db_commits": commits,
            "db_commits_per_transition": round(commits / transitions, 2),
            "worker_cpu_seconds": round(cpu, 2),
            "worker_cpu_ms_per_transition": round(1000 * cpu / transitions, 3),
            "worker_cpu_user_sys_seconds": [
                round(sum(ru.ru_utime for ru in usage), 2),
                round(sum(ru.ru_stime for ru in usage), 2),
            ],
            "due_to_first_transition_s": {
                "p50": round(benchlib.percentile(delays, 50) or 0, 3),
                "p99": round(benchlib.percentile(delays, 99) or 0, 3),
                "note": "all N are due at launch: this is queueing delay of a backlog",
            },
            "worker_peak_rss_kib": [ru.ru_maxrss for ru in usage],
            "worker_rss_kib_at_finished": rss_at,
            "db_connections_held_max": max_conns,
            "worker_exit_codes": [p.returncode for p in procs],
        }
    finally:
        benchlib.drop_db(dbname)


def test_engine_overhead_vs_ceiling(tmp_path: Path) -> None:
    n = benchlib.env_int("BENCH_N", 10_000)
    seconds = benchlib.env_int("BENCH_PGBENCH_SECONDS", 20)
    rows = benchlib.env_int("BENCH_PGBENCH_ROWS", 100_000)
    worker_counts = [int(w) for w in os.environ.get("BENCH_WORKERS", "1,2").split(",")]
    with benchlib.fresh_db("kt_bench_ceiling") as scratch:
        monitor = benchlib.Monitor(scratch)
        try:
            runs = [run_engine(n, w, monitor, tmp_path) for w in worker_counts]
        finally:
            monitor.close()
        ceilings: dict[int, dict[str, Any]] = {}
        for clients in sorted({8, *(r["db_connections_held_max"] for r in runs)}):
            ceilings[clients] = benchlib.pgbench_ceiling(scratch, max(1, clients), seconds, rows)
    for r in runs:
        own = ceilings[r["db_connections_held_max"]]
        r["share_of_ceiling_same_connections"] = round(
            r["transitions_per_s"] / own["transitions_per_s"], 3
        )
        r["share_of_ceiling_8_clients"] = round(
            r["transitions_per_s"] / ceilings[8]["transitions_per_s"], 3
        )
        r["ceiling_commits_per_transition"] = own["commits_per_transition"]
    benchlib.write_result(
        "engine_overhead",
        {
            "command": f"BENCH_N={n} BENCH_PGBENCH_SECONDS={seconds} .venv/bin/pytest -q -s "
            "tests/bench/test_engine_overhead.py",
            "runs": runs,
            "ceilings": list(ceilings.values()),
        },
    )
