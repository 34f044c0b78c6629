"""Alembic environment for keyturn (SQLite and PostgreSQL).

The database URL comes from, in order: ``config.attributes["url"]`` (keyturn's own
``keyturn db upgrade``), ``alembic -x url=...``, or the ``KEYTURN_DATABASE_URL`` variable.
"""

from __future__ import annotations

import os
from typing import Any

from alembic import context

import keyturn.adapters.store.budget  # noqa: F401 (declares rate_budgets on the metadata)
from keyturn.adapters.store.models import UTCDateTime, metadata
from keyturn.adapters.store.sql import make_engine, normalize_url

config = context.config


def database_url() -> str:
    url = config.attributes.get("url") or context.get_x_argument(as_dictionary=True).get("url")
    url = url or os.environ.get("KEYTURN_DATABASE_URL")
    if not url:
        raise SystemExit(
            "no database URL for the migrations; pass -x url=sqlite:///keyturn.db or set "
            "KEYTURN_DATABASE_URL"
        )
    return normalize_url(str(url))


def render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:
    """Render UTCDateTime as plain ``sa.DateTime(timezone=True)``: revisions stay self-contained."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def run_migrations_offline() -> None:
    url = database_url()
    context.configure(
        url=url,
        target_metadata=metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=url.startswith("sqlite"),
        render_item=render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = database_url()
    engine = make_engine(url, pooled=False)
    try:
        with engine.connect() as connection:
            is_sqlite = connection.dialect.name == "sqlite"
            context.configure(
                connection=connection,
                target_metadata=metadata,
                render_as_batch=is_sqlite,
                # keyturn's SQLite engine runs every transaction as BEGIN IMMEDIATE, so the DDL
                # and the version stamp commit together there too.
                transactional_ddl=True,
                compare_type=True,
                render_item=render_item,
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
