"""Schema migrations, driven programmatically (the CLI's ``keyturn db upgrade`` calls these).

The Alembic scripts live in the repository's ``migrations/`` directory, found relative to this
file; the URL reaches ``migrations/env.py`` through ``Config.attributes["url"]``.

Every function taking a URL also takes `source`: where the URL came from ("database.url in
FILE", "environment variable KEYTURN_DATABASE_URL"), so an error names what to fix. Alembic is
imported only by the functions that need it.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import inspect, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from keyturn.adapters.store.sql import SqlStore, make_engine, normalize_url, redact_url
from keyturn.domain.errors import ConfigError

if TYPE_CHECKING:
    from alembic.config import Config

#: Alembic's version table (env.py keeps its default name and schema).
_VERSION_TABLE = "alembic_version"

#: Where a URL came from when the caller does not say.
DEFAULT_SOURCE = "database.url"

#: src/keyturn/adapters/store/migrate.py -> the repository root holds migrations/.
MIGRATIONS_DIR = Path(__file__).resolve().parents[4] / "migrations"


def alembic_config(url: str | None = None) -> Config:
    """An Alembic Config pointing at keyturn's migrations, carrying `url` for env.py."""
    from alembic.config import Config

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


_REVISION_LINE = re.compile(
    r"""^(revision|down_revision)\b[^=\n]*=\s*(?:None|"([^"]*)"|'([^']*)')\s*$""", re.MULTILINE
)


def linear_head() -> str | None:
    """The newest revision, read from the scripts' ``revision`` and ``down_revision`` lines
    without importing Alembic (which, with Mako, costs every command about 0.1 s); None when
    they do not form one simple chain, and Alembic decides."""
    downs: dict[str, str | None] = {}
    for script in (MIGRATIONS_DIR / "versions").glob("*.py"):
        found = {m[1]: m[2] or m[3] for m in _REVISION_LINE.finditer(script.read_text())}
        revision = found.get("revision")
        if not revision or "down_revision" not in found or revision in downs:
            return None
        downs[revision] = found["down_revision"]
    parents = {d for d in downs.values() if d is not None}
    heads = [r for r in downs if r not in parents]
    roots = [r for r, d in downs.items() if d is None]
    if len(heads) != 1 or len(roots) != 1 or not parents <= downs.keys():
        return None
    return heads[0]


def head_revision() -> str:
    """The newest revision the code expects."""
    fast = linear_head()
    if fast is not None:
        return fast
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the repository always ships a revision
        raise ConfigError(f"no migration found in {MIGRATIONS_DIR}; reinstall keyturn")
    return head


def _parsed(url: str, source: str) -> URL:
    """The URL parsed; a malformed one (a port that is not a number, ...) is a ConfigError
    naming where it came from."""
    try:
        return make_url(url)
    except (ArgumentError, ValueError) as exc:
        # no URL in the message: it may hold a password, and a malformed one cannot be redacted
        raise ConfigError(f"{source} is not a valid database URL ({exc}); fix it") from None


def _sqlite_file_missing(parsed: URL) -> bool:
    if parsed.get_backend_name() != "sqlite":
        return False
    database = parsed.database or ""
    return database not in ("", ":memory:") and not Path(database).exists()


def current_revision(url: str, *, source: str = DEFAULT_SOURCE) -> str | None:
    """The revision the database is at; None for an empty (or absent SQLite) database."""
    _parsed(url, source)
    url = normalize_url(url)
    parsed = _parsed(url, source)
    if _sqlite_file_missing(parsed):
        return None
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        return _sqlite_revision_read_only(Path(str(parsed.database)), source)
    try:
        engine = make_engine(url, pooled=False)
    except (ArgumentError, ValueError) as exc:
        raise _cannot_connect(url, exc, source) from None
    try:
        # Alembic's version table read with plain SQL, as for SQLite: importing Alembic for
        # it cost every worker ~0.2 s of CPU at start-up.
        with engine.connect() as conn:
            if not inspect(conn).has_table(_VERSION_TABLE):
                return None
            found = conn.execute(text(f"SELECT version_num FROM {_VERSION_TABLE}")).all()  # noqa: S608 (a constant)
    except SQLAlchemyError as exc:
        raise _cannot_connect(url, exc, source) from None
    finally:
        engine.dispose()
    if len(found) > 1:
        raise ConfigError(
            f"database {redact_url(url)} records {len(found)} schema revisions (branches); "
            f"merge them with alembic, then run `keyturn db upgrade`; check {source}"
        )
    return str(found[0][0]) if found else None


def _sqlite_revision_read_only(path: Path, source: str = DEFAULT_SOURCE) -> str | None:
    """Read the revision without writing to the file (a check must never change a database
    that is not keyturn's, e.g. by switching it to WAL mode)."""
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as exc:
        raise ConfigError(
            f"database file {path} cannot be opened ({exc}); check {source}"
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
            f"database file {path} is not a keyturn SQLite database ({exc}); check {source}"
        ) from None
    finally:
        conn.close()


def upgrade(url: str, revision: str = "head", *, source: str = DEFAULT_SOURCE) -> None:
    """Bring the database up to `revision` (default: the newest)."""
    from alembic import command

    _parsed(url, source)
    try:
        command.upgrade(alembic_config(url), revision)
    except SQLAlchemyError as exc:
        raise _cannot_connect(normalize_url(url), exc, source) from None


def downgrade(url: str, revision: str = "base", *, source: str = DEFAULT_SOURCE) -> None:
    """Take the database down to `revision` (default: empty). Destroys data."""
    from alembic import command

    _parsed(url, source)
    try:
        command.downgrade(alembic_config(url), revision)
    except SQLAlchemyError as exc:
        raise _cannot_connect(normalize_url(url), exc, source) from None


def ensure_migrated(url: str, *, source: str = DEFAULT_SOURCE) -> None:
    """ConfigError (one line) unless the database is at the head revision."""
    current = current_revision(url, source=source)
    head = head_revision()
    if current != head:
        where = "" if source == DEFAULT_SOURCE else f" (from {source})"
        raise ConfigError(
            f"database {redact_url(url)}{where} is not migrated (at {current or 'empty'}, needs "
            f"{head}); run `keyturn db upgrade`"
        )


def open_store(url: str, *, source: str = DEFAULT_SOURCE) -> SqlStore:
    """The store for a migrated database; ConfigError if it is not migrated."""
    ensure_migrated(url, source=source)
    return SqlStore(url)


def _cannot_connect(url: str, exc: Exception, source: str = DEFAULT_SOURCE) -> ConfigError:
    orig = getattr(exc, "orig", None) or exc
    first = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    also = (
        "that its directory exists and is writable"
        if url.startswith("sqlite")
        else "that the server is running"
    )
    return ConfigError(f"cannot use database {redact_url(url)}: {first}; check {source} and {also}")
