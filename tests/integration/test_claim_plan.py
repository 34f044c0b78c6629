"""Query-plan regression test of the claim (PostgreSQL): on 100,000 mostly finished rotations,
with default planner settings, the exact statement SqlStore.claim sends walks the partial claim
index ix_rotations_due and never scans the rotations table sequentially, both as planned for
its parameters (custom plan) and as a prepared statement's generic plan (psycopg prepares a
statement after 5 executions on a connection, and PostgreSQL may then switch to a generic plan).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from sqlalchemy import event

from keyturn.adapters.store.migrate import upgrade
from keyturn.adapters.store.sql import SqlStore

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]

ROWS = 100_000
UNFINISHED = 1_000
CLAIM_INDEX = "ix_rotations_due"

SEED = f"""
INSERT INTO credentials (name, kind, provider, credential_id, credential_uuid, key_ref,
                         algorithm, token_ref, created_at, updated_at)
SELECT 'svc-' || g, 'service_account', 'sandbox', 'cid-' || g, 'cr-' || g, NULL, 'ed25519',
       NULL, now(), now()
  FROM generate_series(1, {UNFINISHED}) AS g;

-- 1% unfinished (one per credential, due over the last hour or later), 99% finished.
INSERT INTO rotations (id, credential, kind, state, version, reason, created_at, updated_at,
                       next_attempt_at, lease_owner, lease_expires_at, attempts, last_error,
                       halted_reason, paused, request_action, request_actor, request_reason,
                       request_at, rollback_from, finished_at, data)
SELECT 'rot-' || g,
       'svc-' || (g % {UNFINISHED} + 1),
       'service_account',
       CASE WHEN g <= {UNFINISHED} THEN 'pending' ELSE 'old_deactivated' END,
       4, 'scheduled',
       now() - interval '30 days' + g * interval '1 second',
       now(),
       CASE WHEN g <= {UNFINISHED} THEN now() - interval '1 hour' + g * interval '7 seconds'
            ELSE NULL END,
       NULL, NULL, 0, NULL, NULL, false, NULL, NULL, NULL, NULL, NULL,
       CASE WHEN g <= {UNFINISHED} THEN NULL
            ELSE now() - interval '30 days' + g * interval '2 seconds' END,
       '{{}}'
  FROM generate_series(1, {ROWS}) AS g;

ANALYZE credentials;
ANALYZE rotations;
"""  # noqa: S608 (built from constants only)


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


@pytest.fixture
def seeded_url(fresh_pg_url: str) -> Iterator[str]:
    upgrade(fresh_pg_url)
    with psycopg.connect(_libpq(fresh_pg_url), autocommit=True) as conn:
        conn.execute(SEED)  # type: ignore[arg-type]  (a constant script)
    yield fresh_pg_url


def capture_claim(store: SqlStore, now: datetime) -> tuple[str, dict[str, Any], int]:
    """Run store.claim once; the statement and parameters it sent, and how many it leased."""
    seen: list[tuple[str, Any]] = []

    def listener(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if "SKIP LOCKED" in statement:
            seen.append((statement, params))

    event.listen(store.engine, "before_cursor_execute", listener)
    try:
        claimed = store.claim(
            owner="plan-test", now=now, lease_until=now + timedelta(seconds=30), limit=8
        )
    finally:
        event.remove(store.engine, "before_cursor_execute", listener)
    assert len(seen) == 1, f"claim sent {len(seen)} locking statements, expected 1"
    statement, params = seen[0]
    assert isinstance(params, dict), params
    return statement, params, len(claimed)


def plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from plan_nodes(child)


def scans_of_rotations(plan: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(node type, index name) of every scan node reading the rotations table or its indexes."""
    return [
        (node["Node Type"], node.get("Index Name"))
        for node in plan_nodes(plan)
        if node.get("Relation Name") == "rotations"
    ]


def explain(conn: psycopg.Connection[Any], statement: str, params: dict[str, Any]) -> Any:
    """EXPLAIN (FORMAT JSON) of the statement as planned for these parameters (custom plan)."""
    row = conn.execute("EXPLAIN (FORMAT JSON) " + statement, params).fetchone()  # type: ignore[operator]
    assert row is not None
    return row[0][0]["Plan"]


def explain_generic(conn: psycopg.Connection[Any], statement: str, params: dict[str, Any]) -> Any:
    """EXPLAIN of the statement's generic plan, as a prepared statement uses it."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    positional = re.sub(r"%\((\w+)\)s", number, statement)
    conn.execute("DEALLOCATE ALL")
    conn.execute(f"PREPARE kt_claim AS {positional}")  # type: ignore[arg-type]
    conn.execute("SET plan_cache_mode = force_generic_plan")
    try:
        placeholders = ", ".join(["%s"] * len(names))
        cur = psycopg.ClientCursor(conn)  # literals inlined: EXECUTE takes no bind parameters
        cur.execute(
            f"EXPLAIN (FORMAT JSON) EXECUTE kt_claim({placeholders})",  # type: ignore[arg-type]
            [params[n] for n in names],
        )
        row = cur.fetchone()
        assert row is not None
        return row[0][0]["Plan"]
    finally:
        conn.execute("RESET plan_cache_mode")
        conn.execute("DEALLOCATE kt_claim")


def assert_uses_claim_index(plan: dict[str, Any], what: str) -> None:
    scans = scans_of_rotations(plan)
    assert not [s for s in scans if s[0] == "Seq Scan"], f"{what}: sequential scan in {scans}"
    assert any(index == CLAIM_INDEX for _, index in scans), (
        f"{what}: the claim does not use {CLAIM_INDEX}: {scans}"
    )


def test_claim_uses_its_index_on_a_large_mostly_finished_table(seeded_url: str) -> None:
    now = datetime.now(UTC)
    store = SqlStore(seeded_url)
    try:
        statement, params, leased = capture_claim(store, now)
    finally:
        store.close()
    # the statement really is the claim: it leased the 8 earliest due rotations
    assert leased == 8

    with psycopg.connect(_libpq(seeded_url), autocommit=True) as conn:
        settings = conn.execute(
            "SELECT count(*) FROM pg_settings WHERE name LIKE 'enable_%' AND setting <> 'on' "
            "AND name NOT IN ('enable_partitionwise_join', 'enable_partitionwise_aggregate')"
        ).fetchone()
        assert settings == (0,), "the planner must run with its default enable_* settings"

        assert_uses_claim_index(explain(conn, statement, params), "custom plan")
        assert_uses_claim_index(explain_generic(conn, statement, params), "generic plan")

        # The check can fail: without the claim index the same statement is planned with a
        # sequential scan, and the assertion says so (rolled back: the index stays).
        conn.execute("BEGIN")
        try:
            conn.execute(f"DROP INDEX {CLAIM_INDEX}")
            with pytest.raises(AssertionError, match="claim"):
                assert_uses_claim_index(explain(conn, statement, params), "without the index")
        finally:
            conn.execute("ROLLBACK")


def _reloptions(url: str) -> set[str]:
    with psycopg.connect(_libpq(url), autocommit=True) as conn:
        row = conn.execute("SELECT reloptions FROM pg_class WHERE relname = 'rotations'").fetchone()
    return set(row[0] or []) if row else set()


def test_rotations_table_settings_are_migrated(fresh_pg_url: str) -> None:
    """Migration 0002 sets the autovacuum and fillfactor storage parameters; its downgrade
    resets them."""
    from keyturn.adapters.store.migrate import downgrade

    upgrade(fresh_pg_url)
    expected = {
        "autovacuum_vacuum_scale_factor=0.01",
        "autovacuum_vacuum_threshold=1000",
        "autovacuum_analyze_scale_factor=0.02",
        "fillfactor=80",
    }
    assert _reloptions(fresh_pg_url) == expected
    downgrade(fresh_pg_url, "0001")
    assert _reloptions(fresh_pg_url) == set()
