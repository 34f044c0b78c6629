"""What a /metrics scrape costs the store at fleet scale: BENCH_METRICS_N rotations (100,000),
one per credential, most finished with their three transitions and every one with its create
event (about 400,000 events), a twentieth halted, retrying or waiting; the wall time of
``SqlStore.fleet_facts`` and of the whole text (FleetCollector + generate_latest), p50/p99 of
ten scrapes, on SQLite and PostgreSQL. Reports, never asserts.

    BENCH_METRICS_N=100000 .venv/bin/pytest -q -s tests/bench/test_metrics_scrape.py
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import benchlib
import pytest
from sqlalchemy import text

from keyturn.adapters.store.migrate import upgrade
from keyturn.adapters.store.sql import SqlStore
from keyturn.web.metrics import FleetCollector, scraper

pytestmark = pytest.mark.timeout(3600)

SEED = """
WITH RECURSIVE g(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM g WHERE x < {n})
INSERT INTO {table} SELECT {columns} FROM g
"""
CREDENTIAL_TABLE = (
    "credentials (name, kind, provider, credential_id, credential_uuid, key_ref, algorithm, "
    "token_ref, created_at, updated_at)"
)
ROTATION_TABLE = (
    "rotations (id, credential, kind, state, version, reason, created_at, updated_at, "
    "next_attempt_at, lease_owner, lease_expires_at, lease_taken_at, lease_taken_from, attempts, "
    "last_error, halted_reason, paused, request_action, request_actor, request_reason, "
    "request_at, rollback_from, finished_at, wait_key, wait_for, wait_since, wait_deadline, data)"
)
CREDENTIALS = (
    "'svc-' || x, 'service_account', 'sandbox', 'cid-' || x, 'cr-' || x, NULL, 'ed25519', "
    "NULL, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP"
)
ROTATIONS = """
'rot-' || x, 'svc-' || x, 'service_account',
CASE WHEN x % 20 = 0 THEN 'new_added' WHEN x % 20 = 1 THEN 'pending'
     WHEN x % 20 = 2 THEN 'verified' ELSE 'old_deactivated' END,
1, 'bench', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, NULL, NULL, NULL, NULL, NULL,
CASE WHEN x % 20 IN (0, 1) THEN 3 ELSE 0 END, NULL,
CASE WHEN x % 20 = 0 THEN 'retry budget spent' END, (1 = 0), NULL, NULL, NULL, NULL, NULL,
CASE WHEN x % 20 > 2 THEN CURRENT_TIMESTAMP END,
CASE WHEN x % 20 = 2 THEN 'forward.probe' END, CASE WHEN x % 20 = 2 THEN 'probes' END,
CASE WHEN x % 20 = 2 THEN CURRENT_TIMESTAMP END, CASE WHEN x % 20 = 2 THEN CURRENT_TIMESTAMP END,
'{}'
"""
EVENT_COLUMNS = "(rotation_id, at, kind, actor, from_state, to_state, trigger, reason, detail)"
CREATE_EVENTS = (
    "'rot-' || x, CURRENT_TIMESTAMP, 'operator', 'bench', NULL, 'pending', 'create', 'b', '{}'"
)
TRANSITIONS = (
    ("pending", "new_added", "add_new"),
    ("new_added", "verified", "verify"),
    ("verified", "old_deactivated", "deactivate_old"),
)


def _seed(store: SqlStore, n: int) -> None:
    with store.engine.begin() as conn:
        conn.execute(text(SEED.format(n=n, table=CREDENTIAL_TABLE, columns=CREDENTIALS)))
        conn.execute(text(SEED.format(n=n, table=ROTATION_TABLE, columns=ROTATIONS)))
        conn.execute(text(SEED.format(n=n, table=f"events {EVENT_COLUMNS}", columns=CREATE_EVENTS)))
        for source, dest, trigger in TRANSITIONS:
            columns = (
                f"'rot-' || x, CURRENT_TIMESTAMP, 'transition', 'w', '{source}', '{dest}', "
                f"'{trigger}', NULL, '{{}}'"
            )
            conn.execute(
                text(
                    SEED.format(n=n, table=f"events {EVENT_COLUMNS}", columns=columns)
                    + " WHERE x % 20 > 2"
                )
            )


class _Clock:
    def now(self) -> datetime:
        return datetime.now(UTC)


def _measure(url: str, n: int) -> dict[str, float | int | None]:
    upgrade(url)
    store = SqlStore(url)
    try:
        started = time.perf_counter()
        _seed(store, n)
        seeded = time.perf_counter() - started
        if store.engine.dialect.name == "postgresql":
            with store.engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("ANALYZE")
        reads, texts = [], []
        scrape = scraper([FleetCollector(store, _Clock())])
        size = 0
        for _ in range(10):
            t0 = time.perf_counter()
            store.fleet_facts(datetime.now(UTC))
            reads.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            size = len(scrape())
            texts.append(time.perf_counter() - t0)
        return {
            "rotations": n,
            "seed_seconds": round(seeded, 1),
            "fleet_facts_p50_ms": _ms(benchlib.percentile(reads, 50)),
            "fleet_facts_p99_ms": _ms(benchlib.percentile(reads, 99)),
            "scrape_p50_ms": _ms(benchlib.percentile(texts, 50)),
            "scrape_p99_ms": _ms(benchlib.percentile(texts, 99)),
            "text_bytes": size,
        }
    finally:
        store.close()


def _ms(seconds: float | None) -> float | None:
    return round(seconds * 1000, 1) if seconds is not None else None


@pytest.fixture
def pg_bench_url() -> Iterator[str]:
    with benchlib.fresh_db("keyturn_bench_metrics") as name:
        yield benchlib.sa_url(name)


def test_scrape_cost_on_sqlite(tmp_path: Path) -> None:
    n = benchlib.env_int("BENCH_METRICS_N", 100_000)
    benchlib.write_result(
        "metrics-scrape-sqlite", _measure(f"sqlite:///{tmp_path / 'bench.db'}", n)
    )


@pytest.mark.postgres
def test_scrape_cost_on_postgres(pg_bench_url: str) -> None:
    n = benchlib.env_int("BENCH_METRICS_N", 100_000)
    benchlib.write_result("metrics-scrape-postgres", _measure(pg_bench_url, n))
