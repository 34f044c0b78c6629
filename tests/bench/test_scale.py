"""Claim latency at scale (issue 6, figure 4): 1,000,000 rotation rows, mostly finished.

For each schema revision in BENCH_SCALE_REVISIONS (default "0001,head": before and after the
table settings of migration 0002), on a fresh PostgreSQL database:

1. bulk-insert BENCH_SCALE_ROWS rotations in SQL (BENCH_SCALE_DUE of them unfinished and due,
   the rest finished), then VACUUM ANALYZE, as a long-lived installation would be;
2. time BENCH_SCALE_CLAIMS claims on the fresh table (SqlStore.claim, limit 1, each followed by
   a commit that moves the rotation 2 s into the future and records an event, like a transition);
3. a sustained run: BENCH_SCALE_THREADS threads claim 8 and commit each claimed rotation that way
   for BENCH_SCALE_SECONDS seconds (dead tuples pile up at the head of the claim index);
4. time the claims again, and EXPLAIN (ANALYZE, BUFFERS) the exact claim statement (rolled back).

    BENCH_SCALE_ROWS=1000000 .venv/bin/pytest -q -s tests/bench/test_scale.py
"""

from __future__ import annotations

import os
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import benchlib
import psycopg
import pytest
from sqlalchemy import event

from keyturn.adapters.store.migrate import upgrade
from keyturn.adapters.store.sql import SqlStore
from keyturn.domain.model import Event
from keyturn.ports import Change

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(7200)]


def seed_sql(rows: int, due: int) -> str:
    return f"""
    INSERT INTO credentials (name, kind, provider, credential_id, credential_uuid, key_ref,
                             algorithm, token_ref, created_at, updated_at)
    SELECT 'svc-' || g, 'service_account', 'sandbox', 'cid-' || g, 'cr-' || g, NULL,
           'ed25519', NULL, now(), now()
      FROM generate_series(1, {due}) AS g;
    INSERT INTO rotations (id, credential, kind, state, version, reason, created_at,
                           updated_at, next_attempt_at, lease_owner, lease_expires_at, attempts,
                           last_error, halted_reason, paused, request_action, request_actor,
                           request_reason, request_at, rollback_from, finished_at, data)
    SELECT 'rot-' || lpad(g::text, 8, '0'),
           'svc-' || (g % {due} + 1),
           'service_account',
           CASE WHEN g <= {due} THEN 'pending' ELSE 'old_deactivated' END,
           4, 'scheduled',
           now() - interval '400 days' + g * interval '30 seconds',
           now(),
           CASE WHEN g <= {due} THEN now() - interval '1 hour' + g * interval '1 millisecond'
                ELSE NULL END,
           NULL, NULL, 0, NULL, NULL, false, NULL, NULL, NULL, NULL, NULL,
           CASE WHEN g <= {due} THEN NULL
                ELSE now() - interval '400 days' + g * interval '30 seconds' END,
           '{{"old_credential_id": "cid", "algorithm": "ed25519"}}'
      FROM generate_series(1, {rows}) AS g;
    """  # noqa: S608 (numbers only)


def transition(store: SqlStore, rotation: Any, owner: str) -> None:
    """What a transition writes: state fields, the next due time (2 s on), the event."""
    now = datetime.now(UTC)
    store.commit(
        Change(
            rotation.id,
            rotation.version,
            updates={
                "next_attempt_at": now + timedelta(seconds=2),
                "attempts": 0,
                "last_error": None,
                "lease_owner": None,
                "lease_expires_at": None,
            },
            events=[
                Event(
                    rotation_id=rotation.id,
                    at=now,
                    kind="transition",
                    actor=owner,
                    from_state="pending",
                    to_state="pending",
                    trigger="bench",
                )
            ],
        )
    )


def time_claims(store: SqlStore, count: int) -> dict[str, Any]:
    latencies = []
    for _ in range(count):
        now = datetime.now(UTC)
        started = time.perf_counter()
        claimed = store.claim(
            owner="probe", now=now, lease_until=now + timedelta(seconds=30), limit=1
        )
        latencies.append((time.perf_counter() - started) * 1000)
        for r in claimed:
            transition(store, r, "probe")
    return {
        "claims": count,
        "p50_ms": round(benchlib.percentile(latencies, 50) or 0, 3),
        "p99_ms": round(benchlib.percentile(latencies, 99) or 0, 3),
        "max_ms": round(max(latencies), 3),
    }


def sustained(url: str, seconds: float, threads: int) -> dict[str, Any]:
    stop = time.monotonic() + seconds
    counts = [0] * threads

    def run(i: int) -> None:
        store = SqlStore(url)
        try:
            while time.monotonic() < stop:
                now = datetime.now(UTC)
                for r in store.claim(
                    owner=f"w{i}", now=now, lease_until=now + timedelta(seconds=30), limit=8
                ):
                    transition(store, r, f"w{i}")
                    counts[i] += 1
        finally:
            store.close()

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return {
        "seconds": seconds,
        "threads": threads,
        "transitions": sum(counts),
        "per_s": round(sum(counts) / seconds, 1),
    }


def claim_statement(store: SqlStore, limit: int) -> tuple[str, Any]:
    """The exact SQL and parameters SqlStore.claim sends (captured from one real claim)."""
    seen: list[tuple[str, Any]] = []

    def listener(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if "SKIP LOCKED" in statement:
            seen.append((statement, params))

    event.listen(store.engine, "before_cursor_execute", listener)
    now = datetime.now(UTC)
    try:
        claimed = store.claim(
            owner="explain", now=now, lease_until=now + timedelta(seconds=30), limit=limit
        )
    finally:
        event.remove(store.engine, "before_cursor_execute", listener)
    for r in claimed:
        transition(store, r, "explain")
    return seen[0]


def time_claim_parts(store: SqlStore, dbname: str, count: int) -> dict[str, Any]:
    """The claim split in two: the statement (sent, executed, rows back) and its commit (the
    WAL flush that makes the lease durable), on one connection, limit 1, each claimed row
    then moved on as a transition would."""
    statement, params = claim_statement(store, 1)
    execute, commit = [], []
    with psycopg.connect(benchlib.libpq(dbname)) as conn:
        for _ in range(count):
            # the captured parameters: due rows are an hour old, so the captured "now" still
            # finds them; each claimed row is moved 2 s past it and is not claimed again
            t0 = time.perf_counter()
            rows = conn.execute(statement, params).fetchall()
            t1 = time.perf_counter()
            conn.commit()
            t2 = time.perf_counter()
            execute.append((t1 - t0) * 1000)
            commit.append((t2 - t1) * 1000)
            for row in rows:
                transition(store, store.get_rotation(row[0]), "probe")
    return {
        "claims": count,
        "statement_p50_ms": round(benchlib.percentile(execute, 50) or 0, 3),
        "statement_p99_ms": round(benchlib.percentile(execute, 99) or 0, 3),
        "commit_p50_ms": round(benchlib.percentile(commit, 50) or 0, 3),
        "commit_p99_ms": round(benchlib.percentile(commit, 99) or 0, 3),
    }


def explain_claim(store: SqlStore, dbname: str) -> dict[str, Any]:
    statement, params = claim_statement(store, 8)
    with psycopg.connect(benchlib.libpq(dbname)) as conn:  # a transaction, rolled back
        rows = conn.execute(
            "EXPLAIN (ANALYZE, BUFFERS) " + statement,  # type: ignore[operator]
            params,
        ).fetchall()
        conn.rollback()
    plan = [r[0] for r in rows]
    return {"plan": plan, "uses_claim_index": any("ix_rotations_due" in p for p in plan)}


def table_stats(dbname: str) -> dict[str, Any]:
    with psycopg.connect(benchlib.libpq(dbname), autocommit=True) as conn:
        row = conn.execute(
            "SELECT n_live_tup, n_dead_tup, n_tup_hot_upd, n_tup_upd, autovacuum_count, "
            "autoanalyze_count, pg_size_pretty(pg_relation_size('ix_rotations_due')), "
            "(SELECT reloptions FROM pg_class WHERE relname = 'rotations') "
            "FROM pg_stat_user_tables WHERE relname = 'rotations'"
        ).fetchone()
    assert row is not None
    keys = ("live", "dead", "hot_updates", "updates", "autovacuums", "autoanalyzes",
            "claim_index_size", "reloptions")  # fmt: skip
    return dict(zip(keys, row, strict=True))


def run_scale(revision: str) -> dict[str, Any]:
    rows = benchlib.env_int("BENCH_SCALE_ROWS", 1_000_000)
    due = benchlib.env_int("BENCH_SCALE_DUE", 10_000)
    probes = benchlib.env_int("BENCH_SCALE_CLAIMS", 2000)
    seconds = benchlib.env_float("BENCH_SCALE_SECONDS", 60)
    threads = benchlib.env_int("BENCH_SCALE_THREADS", 2)
    with benchlib.fresh_db("kt_bench_scale") as dbname:
        url = benchlib.sa_url(dbname)
        upgrade(url, revision)
        started = time.monotonic()
        with psycopg.connect(benchlib.libpq(dbname), autocommit=True) as conn:
            conn.execute(seed_sql(rows, due))  # type: ignore[arg-type]
            conn.execute("VACUUM ANALYZE")
        seeded = time.monotonic() - started
        store = SqlStore(url)
        try:
            fresh = time_claims(store, probes)
            load = sustained(url, seconds, threads)
            stats_after_load = table_stats(dbname)
            after = time_claims(store, probes)
            parts = time_claim_parts(store, dbname, probes)
            plan = explain_claim(store, dbname)
        finally:
            store.close()
        return {
            "revision": revision,
            "rows": rows,
            "unfinished_due": due,
            "seed_seconds": round(seeded, 1),
            "claim_fresh_table": fresh,
            "sustained_run": load,
            "table_after_sustained_run": stats_after_load,
            "claim_after_sustained_run": after,
            "claim_parts_after_sustained_run": parts,
            "explain_after_sustained_run": plan,
        }


def test_claim_latency_at_scale() -> None:
    revisions = os.environ.get("BENCH_SCALE_REVISIONS", "0001,head").split(",")
    results = [run_scale(r.strip()) for r in revisions]
    for r in results:
        assert r["explain_after_sustained_run"]["uses_claim_index"], r["revision"]
    benchlib.write_result(
        "scale",
        {
            "command": "BENCH_SCALE_ROWS={rows} BENCH_SCALE_SECONDS={s} .venv/bin/pytest -q -s "
            "tests/bench/test_scale.py".format(
                rows=results[0]["rows"], s=results[0]["sustained_run"]["seconds"]
            ),
            "runs": results,
        },
    )
