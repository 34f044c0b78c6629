"""SqlStore specifics: SQLite connection settings, the claim's query plan, URLs and messages."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from keyturn.adapters.store.sql import SqlStore, normalize_url, redact_url
from keyturn.domain.errors import ConfigError

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sqlite_connections_use_wal_foreign_keys_and_a_busy_timeout(db_url: str) -> None:
    store = SqlStore(db_url)
    try:
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
    finally:
        store.close()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sqlite_transactions_take_the_write_lock_at_begin(db_url: str) -> None:
    """BEGIN IMMEDIATE: a second writer waits at BEGIN (here: fails fast with a 0 s timeout)."""
    store = SqlStore(db_url)
    other = sqlite3.connect(db_url.removeprefix("sqlite:///"), timeout=0, isolation_level=None)
    try:
        with store.engine.begin() as conn:
            conn.exec_driver_sql("SELECT 1")  # a read only transaction, yet it holds the lock
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
    finally:
        other.close()
        store.close()


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_postgres_claim_walks_the_partial_due_index(db_url: str) -> None:
    """Query-plan regression test: the claim is an index scan on ix_rotations_due, no sort."""
    store = SqlStore(db_url)
    seen: list[tuple[str, object]] = []

    @sa.event.listens_for(store.engine, "before_cursor_execute")
    def _capture(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if statement.startswith("UPDATE rotations") and "SKIP LOCKED" in statement:
            seen.append((statement, parameters))

    try:
        until = NOW + timedelta(minutes=1)
        assert store.claim(owner="w", now=NOW, lease_until=until, limit=5) == []
        ((statement, parameters),) = seen
        assert "FOR UPDATE SKIP LOCKED" in statement
        with store.engine.begin() as conn:
            conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
            plan = "\n".join(
                row[0] for row in conn.exec_driver_sql("EXPLAIN " + statement, parameters)
            )
    finally:
        store.close()
    assert "ix_rotations_due" in plan, plan
    assert "Sort" not in plan.split("LockRows")[-1], plan


def test_urls_are_normalized_and_passwords_never_shown() -> None:
    assert normalize_url("postgres://u:p@h/db").startswith("postgresql+psycopg://")
    assert normalize_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert (
        redact_url("postgresql+psycopg://u:s3cret@h:5432/db") == "postgresql+psycopg://u@h:5432/db"
    )
    with pytest.raises(ConfigError, match="does not support") as info:
        normalize_url("mysql://u:s3cret@h/db")
    assert "s3cret" not in str(info.value)
    store = SqlStore("postgresql+psycopg://u:s3cret@127.0.0.1:1/db")
    assert "s3cret" not in repr(store) and "s3cret" not in store.url
    store.close()


def test_driver_errors_never_carry_the_statement_values(db_url: str) -> None:
    from sqlalchemy.exc import IntegrityError

    from keyturn.adapters.store.sql import secrets_t

    store = SqlStore(db_url)
    row = {
        "id": "dup",
        "purpose": "p",
        "master_key_id": "mk",
        "nonce": b"n",
        "ciphertext": b"TOPSECRET-CIPHER",
        "created_at": NOW,
    }
    try:
        with store.engine.begin() as conn:
            conn.execute(sa.insert(secrets_t).values(**row))
        with pytest.raises(IntegrityError) as info, store.engine.begin() as conn:
            conn.execute(sa.insert(secrets_t).values(**row))
    finally:
        store.close()
    assert "TOPSECRET" not in str(info.value)
    assert "hidden due to hide_parameters" in str(info.value)
