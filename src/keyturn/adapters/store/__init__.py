"""Persistence: the SQL store (SQLite, PostgreSQL), the in-memory store, and migrations."""

from keyturn.adapters.store.memory import MemoryStore
from keyturn.adapters.store.migrate import (
    current_revision,
    ensure_migrated,
    head_revision,
    open_store,
    upgrade,
)
from keyturn.adapters.store.sql import SqlStore

__all__ = [
    "MemoryStore",
    "SqlStore",
    "current_revision",
    "ensure_migrated",
    "head_revision",
    "open_store",
    "upgrade",
]
