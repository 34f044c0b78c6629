"""Shared database fixtures: fresh PostgreSQL databases, SQLite files, and every Store.

- ``pg_url`` (session): a fresh, empty PostgreSQL database of this test session (one per xdist
  worker), dropped at the end.
- ``fresh_pg_url`` (function): a fresh, empty PostgreSQL database of one test.
- ``sqlite_url`` (function): the URL of a not-yet-existing SQLite file in the test's tmp dir.
- ``db_url`` (function, over sqlite and postgres): a migrated, empty database.
- ``store`` (function, over memory, sqlite and postgres): an empty Store.
- ``seed``: quick ways to make credentials, rotations, events and secrets in ``store``.
"""

from __future__ import annotations

import secrets as _random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from keyturn.adapters.store.memory import MemoryStore
from keyturn.adapters.store.migrate import upgrade
from keyturn.adapters.store.sql import SqlStore
from keyturn.domain.lifecycle import State
from keyturn.domain.model import (
    CredentialKind,
    Event,
    ManagedCredential,
    Rotation,
    SealedSecret,
)
from keyturn.ports import Store

#: The server's maintenance database: only used to create and drop the tests' own databases.
PG_ADMIN_URL = "postgresql+psycopg://root@127.0.0.1:5432/test"
pg_admin_url = PG_ADMIN_URL

#: A fixed instant the store tests measure time from.
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

TABLES = (
    "notification_attempts",
    "notification_deliveries",
    "notifications",
    "actions",
    "events",
    "rotations",
    "credentials",
    "secrets",
    "workers",
    "api_tokens",
    "idempotency_keys",
)


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def create_pg_database(prefix: str = "keyturn_t") -> str:
    """Create an empty database with a random name; return its SQLAlchemy URL."""
    name = f"{prefix}_{_random.token_hex(6)}"
    try:
        with psycopg.connect(_libpq(PG_ADMIN_URL), autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0]
        pytest.fail(
            f"PostgreSQL at 127.0.0.1:5432 is not reachable ({first}); start it (.ci/run does)",
            pytrace=False,
        )
    return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def drop_pg_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(_libpq(PG_ADMIN_URL), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this session (each xdist worker gets its own)."""
    url = create_pg_database()
    yield url
    drop_pg_database(url)


@pytest.fixture
def fresh_pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test (for tests that migrate up and down)."""
    url = create_pg_database()
    yield url
    drop_pg_database(url)


@pytest.fixture(scope="session")
def _pg_migrated_url(pg_url: str) -> str:
    upgrade(pg_url)
    return pg_url


def _truncate(url: str) -> None:
    with psycopg.connect(_libpq(url), autocommit=True) as conn:
        conn.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """The URL of an SQLite file that does not exist yet."""
    return f"sqlite:///{tmp_path / 'keyturn.db'}"


def _migrated_url(request: pytest.FixtureRequest, backend: str) -> str:
    if backend == "postgres":
        url: str = request.getfixturevalue("_pg_migrated_url")
        _truncate(url)
        return url
    template: Path = request.getfixturevalue("_sqlite_template")
    url = request.getfixturevalue("sqlite_url")
    shutil.copyfile(template, url.removeprefix("sqlite:///"))
    return url


@pytest.fixture(
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
)
def db_url(request: pytest.FixtureRequest) -> str:
    """A migrated, empty database: SQLite (a fresh file) or PostgreSQL (the session's, emptied)."""
    return _migrated_url(request, request.param)


@pytest.fixture(
    params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
)
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    """An empty Store: in memory, on SQLite, on PostgreSQL."""
    if request.param == "memory":
        yield MemoryStore()
        return
    sql = SqlStore(_migrated_url(request, request.param))
    try:
        yield sql
    finally:
        sql.close()


# ------------------------------------------------------------------------------- seeding


@dataclass
class Seed:
    """Build and insert test data quickly. Every builder takes field overrides."""

    store: Store
    now: datetime = T0
    _n: int = field(default=0)

    def _next(self) -> int:
        self._n += 1
        return self._n

    def secret(self, secret_id: str | None = None, **kw: Any) -> SealedSecret:
        n = self._next()
        values: dict[str, Any] = {
            "id": secret_id or f"sec-{n}",
            "purpose": "signing-key",
            "master_key_id": "mk-1",
            "nonce": bytes([n % 256]) * 12,
            "ciphertext": b"sealed-" + str(n).encode(),
            "created_at": self.now,
        }
        values.update(kw)
        return SealedSecret(**values)

    def credential(self, name: str | None = None, **kw: Any) -> ManagedCredential:
        """Add a managed credential (with a sealed key unless key_ref is given) and return it."""
        n = self._next()
        values: dict[str, Any] = {
            "name": name or f"cred-{n}",
            "kind": CredentialKind.SERVICE_ACCOUNT,
            "provider": "sandbox",
            "credential_id": f"cid-{n}",
            "credential_uuid": f"cr-{n}",
            "key_ref": None,
            "algorithm": "ed25519",
            "created_at": self.now,
            "updated_at": self.now,
        }
        values.update(kw)
        sealed: list[SealedSecret] = []
        if "key_ref" not in kw:
            key = self.secret()
            values["key_ref"] = key.id
            sealed.append(key)
        credential = ManagedCredential(**values)
        self.store.add_credential(credential, sealed)
        return self.store.get_credential(credential.name)

    def new_rotation(self, credential: str, **kw: Any) -> Rotation:
        """A Rotation value (not stored)."""
        n = self._next()
        values: dict[str, Any] = {
            "id": f"rot-{n:04d}",
            "credential": credential,
            "kind": CredentialKind.SERVICE_ACCOUNT,
            "state": State.PENDING,
            "version": 1,
            "reason": "scheduled",
            "created_at": self.now,
            "updated_at": self.now,
            "next_attempt_at": self.now,
            "data": {"n": n},
        }
        values.update(kw)
        return Rotation(**values)

    def event(self, rotation_id: str, **kw: Any) -> Event:
        values: dict[str, Any] = {
            "rotation_id": rotation_id,
            "at": self.now,
            "kind": "run",
            "actor": "test",
            "detail": {"seq": self._next()},
        }
        values.update(kw)
        return Event(**values)

    def rotation(self, credential: str | None = None, **kw: Any) -> Rotation:
        """Create a rotation (and its credential when none is named) in the store."""
        name = credential or self.credential().name
        rotation = self.new_rotation(name, **kw)
        return self.store.create_rotation(rotation, self.event(rotation.id, kind="transition"))


@pytest.fixture
def seed(store: Store) -> Seed:
    return Seed(store)


@pytest.fixture
def t0() -> datetime:
    return T0
