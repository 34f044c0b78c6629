"""Shared helpers of the benchmark suite (imported by the bench tests as `benchlib`).

Nothing here asserts a timing: the benchmarks print their figures and write them as JSON to
tests/bench/results/ (git-ignored). Every knob is an environment variable, so a quick run is
e.g. ``BENCH_N=1000 BENCH_PGBENCH_SECONDS=5 make bench``.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RESULTS = HERE / "results"
PERF = Path(os.environ.get("BENCH_PERF_DIR", "/work/shared/perf"))
if not PERF.is_dir():  # a copy may live next to the repository
    PERF = REPO.parent / "shared" / "perf"

#: The server's maintenance database: only used to create and drop the bench's own databases.
PG_ADMIN = "postgresql://root@127.0.0.1:5432/test"
PG_HOST, PG_PORT, PG_USER = "127.0.0.1", "5432", "root"


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw.replace("_", ""))
    except ValueError:
        raise SystemExit(
            f"{name}={raw!r} is not a whole number; set it like {name}={default}"
        ) from None


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not a number; set it like {name}={default}") from None


# ------------------------------------------------------------------------------ databases


def sa_url(name: str) -> str:
    return f"postgresql+psycopg://root@127.0.0.1:5432/{name}"


def libpq(name: str) -> str:
    return f"postgresql://root@127.0.0.1:5432/{name}"


def create_db(prefix: str) -> str:
    """A fresh database with a random name (default durability settings); its name."""
    name = f"{prefix}_{secrets.token_hex(5)}"
    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_db(name: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def fresh_db(prefix: str) -> Iterator[str]:
    name = create_db(prefix)
    try:
        yield name
    finally:
        drop_db(name)


def durability() -> dict[str, str]:
    """The server settings the figures depend on (reported with every result)."""
    names = (
        "fsync",
        "synchronous_commit",
        "full_page_writes",
        "wal_level",
        "shared_buffers",
        "autovacuum",
        "server_version",
    )
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        return {n: str(conn.execute(f"SHOW {n}").fetchone()[0]) for n in names}  # type: ignore[index]


class Monitor:
    """Reads server-wide statistics from its own scratch database (so its queries never count
    in the measured database's pg_stat_database row)."""

    def __init__(self, dbname: str) -> None:
        self.conn = psycopg.connect(libpq(dbname), autocommit=True)

    def close(self) -> None:
        self.conn.close()

    def xact_commit(self, dbname: str) -> int:
        # pg_stat_database is fed by backends at most once a second; clear our snapshot.
        self.conn.execute("SELECT pg_stat_clear_snapshot()")
        row = self.conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (dbname,)
        ).fetchone()
        return int(row[0]) if row else 0

    def connections(self, dbname: str, exclude_pids: Sequence[int] = ()) -> int:
        row = self.conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND NOT (pid = ANY(%s))",
            (dbname, list(exclude_pids)),
        ).fetchone()
        return int(row[0]) if row else 0


def settle_stats() -> None:
    """Backends flush their commit counters at most every second (PG 15): wait for them."""
    time.sleep(1.5)


# ------------------------------------------------------------------------------ the ceiling


def pgbench_ceiling(dbname: str, clients: int, seconds: int, rows: int) -> dict[str, Any]:
    """The SQL ceiling of one transition (../shared/perf/pgbench_b_two_tx.sql) on a freshly
    recreated schema in `dbname`: transitions/s and measured commits per transition."""
    for tool in ("psql", "pgbench"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not on PATH; install the PostgreSQL client tools")
    conn_args = ["-h", PG_HOST, "-p", PG_PORT, "-U", PG_USER]
    subprocess.run(
        [
            "psql",
            *conn_args,
            "-q",
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-v",
            f"rows={rows}",
            "-f",
            str(PERF / "schema.sql"),
            dbname,
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute("SELECT pg_stat_clear_snapshot()")
        before = admin.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (dbname,)
        ).fetchone()
    command = [
        "pgbench",
        *conn_args,
        "-n",
        "-M",
        "prepared",
        "-f",
        str(PERF / "pgbench_b_two_tx.sql"),
        "-c",
        str(clients),
        "-j",
        "2",
        "-T",
        str(seconds),
        dbname,
    ]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    settle_stats()
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute("SELECT pg_stat_clear_snapshot()")
        after = admin.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (dbname,)
        ).fetchone()
    tps = processed = None
    for line in out.splitlines():
        if line.startswith("tps = "):
            tps = float(line.split()[2])
        if line.startswith("number of transactions actually processed:"):
            processed = int(line.split(":")[1].split("/")[0].strip())
    if tps is None or processed is None:
        raise AssertionError(f"unexpected pgbench output:\n{out}")
    commits = int(after[0]) - int(before[0]) if before and after else 0
    return {
        "clients": clients,
        "seconds": seconds,
        "rows": rows,
        "transitions_per_s": tps,
        "transitions": processed,
        # the extra ~2 are pgbench's own session set-up
        "commits_per_transition": round(commits / processed, 3) if processed else None,
        "command": " ".join(
            [
                "psql -v rows=" + str(rows),
                "-f",
                str(PERF / "schema.sql"),
                "&&",
                *command[:1],
                *command[7:-1],
                "<db>",
            ]
        ),
    }


# ------------------------------------------------------------------------------ figures


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[k]


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def git_head() -> str:
    proc = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return proc.stdout.strip() or "unknown"


def write_result(name: str, figures: dict[str, Any]) -> Path:
    """Print the figures and write them to tests/bench/results/<name>-<time>.json."""
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    payload = {
        "benchmark": name,
        "at": stamp,
        "commit": git_head(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "postgres": durability(),
        **figures,
    }
    path = RESULTS / f"{name}-{stamp}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"\n=== {name} ===\n{json.dumps(figures, indent=2, default=str)}\n-> {path}")
    return path


# ------------------------------------------------------------------------------ seeding


def seed_pending_rotations(url: str, n: int, vault: Any, *, at: datetime) -> None:
    """`n` managed service accounts, each with a sealed key and one pending rotation due at
    `at`, inserted in bulk (what `keyturn rotate` would have created, without n CLI calls)."""
    from sqlalchemy import insert

    from keyturn.adapters.keys import CryptoKeys
    from keyturn.adapters.store.sql import (
        SqlStore,
        credentials_t,
        events_t,
        rotations_t,
        secrets_t,
    )

    pem = CryptoKeys().generate("ed25519").private_pem
    store = SqlStore(url)
    try:
        for start in range(0, n, 2000):
            secrets_rows, creds, rotations, events = [], [], [], []
            for i in range(start, min(n, start + 2000)):
                name, sid, rid = f"svc-{i:07d}", f"sec_old_{i:07d}", f"rot_bench_{i:07d}"
                sealed = vault.seal(sid, "private_key", pem)
                secrets_rows.append(
                    {
                        "id": sid,
                        "purpose": sealed.purpose,
                        "master_key_id": sealed.master_key_id,
                        "nonce": sealed.nonce,
                        "ciphertext": sealed.ciphertext,
                        "created_at": at,
                        "purge_after": None,
                        "purged_at": None,
                    }
                )
                creds.append(
                    {
                        "name": name,
                        "kind": "service_account",
                        "provider": "bench",
                        "credential_id": f"cid-{i}",
                        "credential_uuid": f"cr-old-{i}",
                        "key_ref": sid,
                        "algorithm": "ed25519",
                        "token_ref": None,
                        "created_at": at,
                        "updated_at": at,
                    }
                )
                rotations.append(
                    {
                        "id": rid,
                        "credential": name,
                        "kind": "service_account",
                        "state": "pending",
                        "version": 1,
                        "reason": "bench",
                        "created_at": at,
                        "updated_at": at,
                        "next_attempt_at": at,
                        "lease_owner": None,
                        "lease_expires_at": None,
                        "attempts": 0,
                        "last_error": None,
                        "halted_reason": None,
                        "paused": False,
                        "request_action": None,
                        "request_actor": None,
                        "request_reason": None,
                        "request_at": None,
                        "rollback_from": None,
                        "finished_at": None,
                        "data": {
                            "old_credential_id": f"cid-{i}",
                            "old_credential_uuid": f"cr-old-{i}",
                            "old_key_ref": sid,
                            "old_algorithm": "ed25519",
                            "algorithm": "ed25519",
                            "via": "credentials",
                        },
                    }
                )
                events.append(
                    {
                        "rotation_id": rid,
                        "at": at,
                        "kind": "operator",
                        "actor": "bench",
                        "from_state": None,
                        "to_state": "pending",
                        "trigger": "create",
                        "reason": "bench",
                        "detail": {},
                    }
                )
            with store.engine.begin() as conn:
                conn.execute(insert(secrets_t), secrets_rows)
                conn.execute(insert(credentials_t), creds)
                conn.execute(insert(rotations_t), rotations)
                conn.execute(insert(events_t), events)
        with store.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("VACUUM ANALYZE")
    finally:
        store.close()


def start_py_spy(pid: int, label: str) -> subprocess.Popen[bytes] | None:
    """With BENCH_PY_SPY=<dir>, sample every thread of process `pid` with py-spy (installed
    separately: `.venv/bin/pip install py-spy`) into <dir>/<label>.txt, collapsed stacks, until
    stop_py_spy. Without it, nothing."""
    out = os.environ.get("BENCH_PY_SPY")
    if not out:
        return None
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    Path(out).mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "250", "--threads", "--gil",
         "--output", str(Path(out) / f"{label}.txt"), "--nonblocking"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def stop_py_spy(spy: subprocess.Popen[bytes] | None) -> None:
    """Stop a py-spy started by start_py_spy and let it write its file."""
    if spy is None:
        return
    import signal

    spy.send_signal(signal.SIGINT)
    try:
        spy.wait(timeout=30)
    except subprocess.TimeoutExpired:
        spy.kill()
