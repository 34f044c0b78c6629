"""The Alembic migrations give exactly the schema the models declare (SQLite, PostgreSQL)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

import keyturn.adapters.store.budget  # noqa: F401 (declares rate_budgets on the metadata)
from keyturn.adapters.store.migrate import (
    current_revision,
    downgrade,
    ensure_migrated,
    head_revision,
    open_store,
    upgrade,
)
from keyturn.adapters.store.models import metadata
from keyturn.adapters.store.sql import make_engine
from keyturn.domain.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
TABLES = {
    "secrets", "credentials", "rotations", "events", "actions", "rate_budgets", "workers",
    "schedule_slots", "schedule_clock", "api_tokens", "idempotency_keys",
    "notifications", "notification_deliveries", "notification_attempts",
}  # fmt: skip


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_url(request: pytest.FixtureRequest) -> str:
    """A fresh, never-migrated database."""
    if request.param == "postgres":
        url: str = request.getfixturevalue("fresh_pg_url")
        return url
    url = request.getfixturevalue("sqlite_url")
    return url


def _differences(url: str) -> list[object]:
    engine = make_engine(url, pooled=False)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(context, metadata))
    finally:
        engine.dispose()


def _inspect(url: str) -> tuple[set[str], dict[str, dict[str, object]]]:
    engine = make_engine(url, pooled=False)
    try:
        insp = sa.inspect(engine)
        tables = set(insp.get_table_names()) - {"alembic_version"}
        found = insp.get_indexes("rotations") if "rotations" in tables else []
        indexes = {ix["name"]: dict(ix) for ix in found if ix["name"] is not None}
        return tables, indexes
    finally:
        engine.dispose()


def test_upgrade_head_yields_exactly_the_models(empty_url: str) -> None:
    assert current_revision(empty_url) is None
    upgrade(empty_url)
    assert current_revision(empty_url) == head_revision()
    assert _differences(empty_url) == []

    tables, indexes = _inspect(empty_url)
    assert tables == TABLES
    unique = indexes["uq_rotations_unfinished_credential"]
    assert unique["unique"] in (True, 1)
    assert unique["column_names"] == ["credential"]
    assert "ix_rotations_due" in indexes


def test_the_comparison_sees_a_missing_index(empty_url: str) -> None:
    """The no-difference check above can fail: drop the partial unique index and look again."""
    upgrade(empty_url)
    engine = make_engine(empty_url, pooled=False)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP INDEX uq_rotations_unfinished_credential")
    finally:
        engine.dispose()
    diffs = _differences(empty_url)
    assert any("uq_rotations_unfinished_credential" in repr(d) for d in diffs), diffs


def test_downgrade_to_base_then_upgrade_again(empty_url: str) -> None:
    upgrade(empty_url)
    downgrade(empty_url, "base")
    assert current_revision(empty_url) is None
    tables, _ = _inspect(empty_url)
    assert tables == set()
    upgrade(empty_url)
    assert current_revision(empty_url) == head_revision()
    assert _differences(empty_url) == []


def test_ensure_migrated_says_what_to_run(empty_url: str) -> None:
    with pytest.raises(ConfigError) as info:
        ensure_migrated(empty_url)
    message = str(info.value)
    assert "\n" not in message
    assert f"is not migrated (at empty, needs {head_revision()}); run `keyturn db upgrade`" in (
        message
    )
    with pytest.raises(ConfigError):
        open_store(empty_url)
    upgrade(empty_url)
    ensure_migrated(empty_url)
    store = open_store(empty_url)
    try:
        assert store.list_credentials() == []
    finally:
        store.close()


def test_ensure_migrated_never_shows_the_password() -> None:
    url = "postgresql+psycopg://root:hunter2@127.0.0.1:1/nowhere"
    with pytest.raises(ConfigError) as info:
        ensure_migrated(url)
    assert "hunter2" not in str(info.value)
    assert "127.0.0.1" in str(info.value)


def test_checking_a_missing_sqlite_file_does_not_create_it(tmp_path: Path) -> None:
    path = tmp_path / "absent.db"
    with pytest.raises(ConfigError, match="at empty"):
        ensure_migrated(f"sqlite:///{path}")
    assert not path.exists()


def test_alembic_command_line_with_x_url(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    env = {k: v for k, v in os.environ.items() if k != "KEYTURN_DATABASE_URL"}
    alembic = [sys.executable, "-m", "alembic", "-c", str(REPO / "alembic.ini")]
    subprocess.run([*alembic, "-x", f"url={url}", "upgrade", "head"], check=True, env=env)
    assert current_revision(url) == head_revision()
    env["KEYTURN_DATABASE_URL"] = url
    out = subprocess.run([*alembic, "check"], check=True, env=env, capture_output=True, text=True)
    assert "No new upgrade operations detected" in out.stdout + out.stderr
