"""Group commit on PostgreSQL in a handful of set-based statements.

A worker's batch of changes (one per rotation, each a compare-and-set on its own version) is
written in one transaction with one ``UPDATE ... FROM unnest(...)`` per shape of change (the set
of columns it writes), one insert for all events and one upsert for all action records, instead
of several statements and round trips per change. A change whose version is stale updates
nothing, so nothing else of it is written, and it is reported as :class:`StaleVersion`, exactly
as the change-by-change path does.

Anything this path does not handle (a duplicate rotation in one batch, a naive datetime, a
secret id already taken) raises :class:`Fallback` before the transaction commits; the caller
rolls back and writes the batch change by change, which reports the precise error.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Table, TextualSelect, text

from keyturn.domain.errors import KeyturnError, NotFound, StaleVersion
from keyturn.domain.model import ActionStatus, Phase, Rotation
from keyturn.ports import Change

#: The PostgreSQL element type of each column a change may write (for ``unnest`` arrays).
ROTATION_COLUMN_TYPES: Mapping[str, str] = {
    "state": "varchar",
    "reason": "varchar",
    "data": "json",
    "next_attempt_at": "timestamptz",
    "lease_owner": "varchar",
    "lease_expires_at": "timestamptz",
    "attempts": "int",
    "last_error": "varchar",
    "halted_reason": "varchar",
    "paused": "bool",
    "request_action": "varchar",
    "request_actor": "varchar",
    "request_reason": "varchar",
    "request_at": "timestamptz",
    "rollback_from": "varchar",
    "finished_at": "timestamptz",
}

_JSON_COLUMNS = frozenset({"data"})


class Fallback(Exception):
    """This batch needs the change-by-change path (which reports the precise error)."""


def _array_param(column: str, value: Any) -> Any:
    if column in _JSON_COLUMNS:
        return json.dumps(value)
    if isinstance(value, datetime) and (value.tzinfo is None or value.utcoffset() is None):
        raise Fallback("naive datetime")
    return value


def _element_type(column: str) -> str:
    # JSON travels as text and is cast per row (there is no unnest of json[] from text).
    return "text" if column in _JSON_COLUMNS else ROTATION_COLUMN_TYPES[column]


def _unnest(columns: Sequence[tuple[str, str]]) -> str:
    """``unnest(CAST(:a AS t[]), ...) AS v(a, ...)``: one bound array per column."""
    arrays = ", ".join(f"CAST(:{name} AS {kind}[])" for name, kind in columns)
    return f"unnest({arrays}) AS v({', '.join(name for name, _ in columns)})"


def _value(name: str) -> str:
    return f"v.{name}::json" if name in _JSON_COLUMNS or name == "detail" else f"v.{name}"


_statements: dict[tuple[str, ...], TextualSelect] = {}


def _update_statement(columns: tuple[str, ...], rotations: Table) -> TextualSelect:
    stmt = _statements.get(columns)
    if stmt is None:
        sets = "".join(f"{c} = {_value(c)}, " for c in columns)
        source = _unnest(
            [("id", "varchar"), ("expected", "int"), *((c, _element_type(c)) for c in columns)]
        )
        # Column names come from ROTATION_COLUMN_TYPES; every value is a bound array.
        sql = (
            f"UPDATE rotations AS r SET {sets}version = r.version + 1, updated_at = :now "  # noqa: S608
            f"FROM {source} WHERE r.id = v.id AND r.version = v.expected RETURNING r.*"
        )
        stmt = text(sql).columns(*rotations.c)
        _statements[columns] = stmt
    return stmt


_EVENT_COLUMNS = [
    ("rotation_id", "varchar"),
    ("at", "timestamptz"),
    ("kind", "varchar"),
    ("actor", "varchar"),
    ("from_state", "varchar"),
    ("to_state", "varchar"),
    ("trigger", "varchar"),
    ("reason", "varchar"),
    ("detail", "text"),
]
_EVENTS = text(
    f"INSERT INTO events ({', '.join(n for n, _ in _EVENT_COLUMNS)}) "  # noqa: S608 (constants)
    f"SELECT {', '.join(_value(n) for n, _ in _EVENT_COLUMNS)} FROM {_unnest(_EVENT_COLUMNS)}"
)

_ACTION_COLUMNS = [
    ("rotation_id", "varchar"),
    ("phase", "varchar"),
    ("name", "varchar"),
    ("idempotency_key", "varchar"),
    ("status", "varchar"),
    ("intent_at", "timestamptz"),
    ("outcome_at", "timestamptz"),
    ("attempts", "int"),
    ("detail", "text"),
    ("error", "varchar"),
]
_ACTION_UPDATED = [n for n, _ in _ACTION_COLUMNS[3:]]
# A new action's seq is the number of actions its rotation already has (one action per rotation
# per batch, so the count is exact); a known one keeps its seq.
_ACTIONS = text(
    f"INSERT INTO actions ({', '.join(n for n, _ in _ACTION_COLUMNS)}, seq) "  # noqa: S608
    f"SELECT {', '.join(_value(n) for n, _ in _ACTION_COLUMNS)}, "
    "(SELECT count(*) FROM actions a WHERE a.rotation_id = v.rotation_id) "
    f"FROM {_unnest(_ACTION_COLUMNS)} "
    "ON CONFLICT (rotation_id, phase, name) DO UPDATE SET "
    + ", ".join(f"{n} = excluded.{n}" for n in _ACTION_UPDATED)
)

_CREDENTIAL_COLUMNS = [
    ("name", "varchar"),
    ("kind", "varchar"),
    ("provider", "varchar"),
    ("credential_id", "varchar"),
    ("credential_uuid", "varchar"),
    ("key_ref", "varchar"),
    ("algorithm", "varchar"),
    ("token_ref", "varchar"),
]
_CREDENTIALS = text(
    "UPDATE credentials AS c SET "  # noqa: S608 (constants)
    + "".join(f"{n} = v.{n}, " for n, _ in _CREDENTIAL_COLUMNS[1:])
    + f"updated_at = :now FROM {_unnest(_CREDENTIAL_COLUMNS)} WHERE c.name = v.name "
    "RETURNING c.name"
)

_PURGE_AFTER = text(
    "UPDATE secrets AS s SET purge_after = v.purge_after "  # noqa: S608 (constants)
    f"FROM {_unnest([('id', 'varchar'), ('purge_after', 'timestamptz')])} "
    "WHERE s.id = v.id RETURNING s.id"
)

_EXISTING = text("SELECT id FROM rotations WHERE id = ANY(CAST(:ids AS varchar[]))")


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and (value.tzinfo is None or value.utcoffset() is None):
        raise Fallback("naive datetime")
    return value


def rounds(changes: Sequence[Change]) -> list[list[int]]:
    """The batch in rounds that each hold a rotation at most once, in order: a rotation's second
    change in one batch (it expects the version its first one makes) goes in the next round."""
    seen: dict[str, int] = defaultdict(int)
    out: list[list[int]] = []
    for i, change in enumerate(changes):
        k = seen[change.rotation_id]
        seen[change.rotation_id] = k + 1
        if k == len(out):
            out.append([])
        out[k].append(i)
    return out


def update_rotations(
    conn: Connection,
    rotations: Table,
    changes: Sequence[Change],
    values: Sequence[dict[str, Any]],
    now: datetime,
    from_row: Any,
) -> list[Rotation | KeyturnError]:
    """The compare-and-set of every change (each of another rotation), one statement per shape;
    stale ones are reported."""
    ids = [c.rotation_id for c in changes]
    groups: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for i, v in enumerate(values):
        groups[tuple(sorted(v))].append(i)
    rows: dict[str, Rotation] = {}
    for columns, members in groups.items():
        params: dict[str, Any] = {
            "now": now,
            "id": [changes[i].rotation_id for i in members],
            "expected": [changes[i].expected_version for i in members],
        }
        for c in columns:
            params[c] = [_array_param(c, values[i][c]) for i in members]
        for row in conn.execute(_update_statement(columns, rotations), params):
            rotation = from_row(row)
            rows[rotation.id] = rotation
    results: list[Rotation | KeyturnError] = []
    missing = [i for i in ids if i not in rows]
    existing: set[str] = set()
    if missing:
        existing = set(conn.execute(_EXISTING, {"ids": missing}).scalars())
    for change in changes:
        found = rows.get(change.rotation_id)
        if found is not None:
            results.append(found)
        elif change.rotation_id in existing:
            results.append(StaleVersion(change.rotation_id, change.expected_version))
        else:
            results.append(
                NotFound(f"no rotation with id {change.rotation_id}; see `keyturn status`")
            )
    return results


def insert_events(conn: Connection, changes: Sequence[Change]) -> None:
    events = [ev for c in changes for ev in c.events]
    if not events:
        return
    conn.execute(
        _EVENTS,
        {
            "rotation_id": [e.rotation_id for e in events],
            "at": [_aware(e.at) for e in events],
            "kind": [e.kind for e in events],
            "actor": [e.actor for e in events],
            "from_state": [e.from_state for e in events],
            "to_state": [e.to_state for e in events],
            "trigger": [e.trigger for e in events],
            "reason": [e.reason for e in events],
            "detail": [json.dumps(dict(e.detail)) for e in events],
        },
    )


def upsert_actions(conn: Connection, changes: Sequence[Change]) -> None:
    actions = [c.action for c in changes if c.action is not None]
    if not actions:
        return
    conn.execute(
        _ACTIONS,
        {
            "rotation_id": [a.rotation_id for a in actions],
            "phase": [Phase(a.phase).value for a in actions],
            "name": [a.name for a in actions],
            "idempotency_key": [a.idempotency_key for a in actions],
            "status": [ActionStatus(a.status).value for a in actions],
            "intent_at": [_aware(a.intent_at) for a in actions],
            "outcome_at": [_aware(a.outcome_at) for a in actions],
            "attempts": [a.attempts for a in actions],
            "detail": [json.dumps(dict(a.detail)) for a in actions],
            "error": [a.error for a in actions],
        },
    )


def replace_credentials(conn: Connection, changes: Sequence[Change], now: datetime) -> None:
    """The managed credentials some changes replace; an unknown one needs the precise error."""
    creds = [c.credential for c in changes if c.credential is not None]
    if not creds:
        return
    if len({c.name for c in creds}) != len(creds):
        raise Fallback("a credential twice in one round")
    params: dict[str, Any] = {"now": now}
    for name, _ in _CREDENTIAL_COLUMNS:
        params[name] = [
            str(getattr(c, name)) if name == "kind" else getattr(c, name) for c in creds
        ]
    if len(conn.execute(_CREDENTIALS, params).all()) != len(creds):
        raise Fallback("unknown credential")


def set_purge_after(conn: Connection, changes: Sequence[Change]) -> None:
    """Schedule (or clear) the purge of retained secrets; an unknown one needs the precise
    error."""
    pairs = [(i, _aware(when)) for c in changes for i, when in c.purge_after.items()]
    if not pairs:
        return
    if len({i for i, _ in pairs}) != len(pairs):
        raise Fallback("a secret twice in one round")
    rows = conn.execute(
        _PURGE_AFTER, {"id": [i for i, _ in pairs], "purge_after": [w for _, w in pairs]}
    ).all()
    if len(rows) != len(pairs):
        raise Fallback("unknown secret")
