"""Schema migrations, driven programmatically (the CLI's ``keyturn db upgrade`` calls these).

The Alembic scripts live in the repository's ``migrations/`` directory, found relative to this
file; the URL reaches ``migrations/env.py`` through ``Config.attributes["url"]``.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from keyturn.adapters.store.sql import SqlStore, make_engine, normalize_url, redact_url
from keyturn.domain.errors import ConfigError

#: src/keyturn/adapters/store/migrate.py -> the repository root holds migrations/.
MIGRATIONS_DIR = Path(__file__).resolve().parents[4] / "migrations"


def alembic_config(url: str | None = None) -> Config:
    """An Alembic Config pointing at keyturn's migrations, carrying `url` for env.py."""
    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise ConfigError(
            f"keyturn's migrations are missing ({MIGRATIONS_DIR}); reinstall keyturn from its "
            "source tree (pip install -e .)"
        )
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        config.attributes["url"] = normalize_url(url)
    return config


def head_revision() -> str:
    """The newest revision the code expects."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the repository always ships a revision
        raise ConfigError(f"no migration found in {MIGRATIONS_DIR}; reinstall keyturn")
    return head


def _sqlite_file_missing(url: str) -> bool:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return False
    database = parsed.database or ""
    return database not in ("", ":memory:") and not Path(database).exists()


def current_revision(url: str) -> str | None:
    """The revision the database is at; None for an empty (or absent SQLite) database."""
    url = normalize_url(url)
    if _sqlite_file_missing(url):
        return None
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        return _sqlite_revision_read_only(Path(str(parsed.database)))
    engine = make_engine(url, pooled=False)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except SQLAlchemyError as exc:
        raise _cannot_connect(url, exc) from None
    finally:
        engine.dispose()


def _sqlite_revision_read_only(path: Path) -> str | None:
    """Read the revision without writing to the file (a check must never change a database
    that is not keyturn's, e.g. by switching it to WAL mode)."""
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as exc:
        raise ConfigError(
            f"database file {path} cannot be opened ({exc}); check the path"
        ) from None
    try:
        has_table = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'"
        ).fetchone()
        if not has_table:
            return None
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        return str(row[0]) if row else None
    except sqlite3.DatabaseError as exc:
        raise ConfigError(
            f"database file {path} is not a keyturn SQLite database ({exc}); check database.url"
        ) from None
    finally:
        conn.close()


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database up to `revision` (default: the newest)."""
    try:
        command.upgrade(alembic_config(url), revision)
    except SQLAlchemyError as exc:
        raise _cannot_connect(normalize_url(url), exc) from None


def downgrade(url: str, revision: str = "base") -> None:
    """Take the database down to `revision` (default: empty). Destroys data."""
    try:
        command.downgrade(alembic_config(url), revision)
    except SQLAlchemyError as exc:
        raise _cannot_connect(normalize_url(url), exc) from None


def ensure_migrated(url: str) -> None:
    """ConfigError (one line) unless the database is at the head revision."""
    head = head_revision()
    current = current_revision(url)
    if current != head:
        raise ConfigError(
            f"database {redact_url(url)} is not migrated (at {current or 'empty'}, needs {head}); "
            "run `keyturn db upgrade`"
        )


def open_store(url: str) -> SqlStore:
    """The store for a migrated database; ConfigError if it is not migrated."""
    ensure_migrated(url)
    return SqlStore(url)


def _cannot_connect(url: str, exc: SQLAlchemyError) -> ConfigError:
    orig = getattr(exc, "orig", None) or exc
    first = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    return ConfigError(
        f"cannot use database {redact_url(url)}: {first}; check the URL and that the server "
        "is running"
    )
