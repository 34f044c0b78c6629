"""Group commit on PostgreSQL in a handful of set-based statements.

A worker's batch of changes (one per rotation, each a compare-and-set on its own version) is
written in one transaction with one ``UPDATE ... FROM json_to_recordset(...)`` per shape of
change (the set of columns it writes), one insert for all events and one upsert for all action
records, instead of several statements and round trips per change. Each statement's rows travel
as one JSON document (one parameter, encoded by the C json encoder, parsed by the server). A
change whose version is stale updates nothing, so nothing else of it is written, and it is
reported as :class:`StaleVersion`, exactly as the change-by-change path does.

Anything this path does not handle (a naive datetime, a secret id already taken, an unknown
credential or secret) raises :class:`Fallback` before the transaction commits; the caller rolls
back and writes the batch change by change, which reports the precise error.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Connection, Table, TextualSelect, text
from sqlalchemy.dialects import postgresql

from keyturn.adapters.store.models import actions_t, credentials_t, events_t, secrets_t
from keyturn.domain.errors import KeyturnError, StaleVersion
from keyturn.domain.model import ActionRecord, ActionStatus, Phase, Rotation
from keyturn.ports import Change

_PG = postgresql.dialect()  # type: ignore[no-untyped-call]


def _typed(table: Table, names: Sequence[str]) -> list[tuple[str, str]]:
    """(column, PostgreSQL type) for `names`, from the table's declaration in models.py."""
    return [(n, table.c[n].type.compile(dialect=_PG)) for n in names]


class Fallback(Exception):
    """This batch needs the change-by-change path (which reports the precise error)."""


def _aware(value: Any) -> Any:
    """Refuse a naive datetime (the change-by-change path says which); pass anything else."""
    if isinstance(value, datetime) and (value.tzinfo is None or value.utcoffset() is None):
        raise Fallback("naive datetime")
    return value


def _rows(rows: list[dict[str, Any]]) -> dict[str, str]:
    """The statement's one parameter: its rows as a JSON array of objects (orjson: datetimes
    as RFC 3339 with their offset; the callers have refused naive ones)."""
    try:
        return {"rows": orjson.dumps(rows).decode()}
    except orjson.JSONEncodeError as exc:  # a value JSON cannot hold: the precise error is later
        raise Fallback(str(exc)) from None


def _recordset(columns: Sequence[tuple[str, str]]) -> str:
    """``json_to_recordset(:rows) AS v(name type, ...)``: the rows, typed by the server."""
    typed = ", ".join(f"{name} {kind}" for name, kind in columns)
    return f"json_to_recordset(CAST(:rows AS json)) AS v({typed})"


_statements: dict[tuple[str, ...], TextualSelect] = {}


def _update_statement(columns: tuple[str, ...], rotations: Table) -> TextualSelect:
    stmt = _statements.get(columns)
    if stmt is None:
        sets = "".join(f"{c} = v.{c}, " for c in columns)
        source = _recordset([("id", "varchar"), ("expected", "int"), *_typed(rotations, columns)])
        # Column names are the table's own (checked by rotation_update_values); every value is
        # in the bound document. RETURNING names every column in the models' order: .columns()
        # below gives the result columns their types by position, and a migrated table's
        # physical order is not the models' (ALTER TABLE ADD COLUMN appends), so with
        # ``RETURNING r.*`` a column would be read with its neighbour's type (wait_for's text
        # through wait_since's UTCDateTime).
        returning = ", ".join(f"r.{c.name}" for c in rotations.c)
        sql = (
            f"UPDATE rotations AS r SET {sets}version = r.version + 1, updated_at = :now "  # noqa: S608
            f"FROM {source} WHERE r.id = v.id AND r.version = v.expected RETURNING {returning}"
        )
        stmt = text(sql).columns(*rotations.c)
        _statements[columns] = stmt
    return stmt


def _insert(table: Table, names: Sequence[str], computed: Mapping[str, str] | None = None) -> str:
    """``INSERT INTO table (names) SELECT v.name, ... FROM json_to_recordset(:rows)``; a column
    in `computed` takes that SQL expression instead of a value from the rows."""
    computed = computed or {}
    given = [n for n in names if n not in computed]
    values = ", ".join(computed.get(n, f"v.{n}") for n in names)
    return (
        f"INSERT INTO {table.name} ({', '.join(names)}) "  # noqa: S608 (the models' names)
        f"SELECT {values} FROM {_recordset(_typed(table, given))}"
    )


_EVENT_COLUMNS = [
    "rotation_id", "at", "kind", "actor", "from_state", "to_state", "trigger", "reason", "detail"
]  # fmt: skip
_EVENTS = text(_insert(events_t, _EVENT_COLUMNS))

_ACTION_COLUMNS = [
    "rotation_id", "phase", "name", "idempotency_key", "status", "intent_at", "outcome_at",
    "attempts", "detail", "error",
]  # fmt: skip
# A new action's seq is the number of actions its rotation already has (one action per rotation
# per statement, so the count is exact); a known one keeps its seq.
_ACTIONS = text(
    _insert(  # noqa: S608 (the models' names)
        actions_t,
        [*_ACTION_COLUMNS, "seq"],
        {"seq": "(SELECT count(*) FROM actions a WHERE a.rotation_id = v.rotation_id)"},
    )
    + " ON CONFLICT (rotation_id, phase, name) DO UPDATE SET "
    + ", ".join(f"{n} = excluded.{n}" for n in _ACTION_COLUMNS[3:])
)

_CREDENTIAL_COLUMNS = [
    "name", "kind", "provider", "credential_id", "credential_uuid", "key_ref", "algorithm",
    "token_ref",
]  # fmt: skip
_CREDENTIALS = text(
    "UPDATE credentials AS c SET "  # noqa: S608 (the models' names)
    + "".join(f"{n} = v.{n}, " for n in _CREDENTIAL_COLUMNS[1:])
    + f"updated_at = :now FROM {_recordset(_typed(credentials_t, _CREDENTIAL_COLUMNS))} "
    "WHERE c.name = v.name RETURNING c.name"
)

_PURGE_AFTER = text(
    "UPDATE secrets AS s SET purge_after = v.purge_after "  # noqa: S608 (the models' names)
    f"FROM {_recordset(_typed(secrets_t, ['id', 'purge_after']))} "
    "WHERE s.id = v.id RETURNING s.id"
)

_EXISTING = text("SELECT id FROM rotations WHERE id = ANY(CAST(:ids AS varchar[]))")


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
    not_found: Callable[[str], KeyturnError],
) -> list[Rotation | KeyturnError]:
    """The compare-and-set of every change (each of another rotation), one statement per shape;
    stale ones are reported."""
    groups: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for i, v in enumerate(values):
        groups[tuple(sorted(v))].append(i)
    found: dict[str, Rotation] = {}
    for columns, members in groups.items():
        rows = []
        for i in members:
            row = {k: _aware(v) for k, v in values[i].items()}
            row["id"] = changes[i].rotation_id
            row["expected"] = changes[i].expected_version
            rows.append(row)
        params: dict[str, Any] = {**_rows(rows), "now": now}
        for returned in conn.execute(_update_statement(columns, rotations), params):
            rotation = from_row(returned)
            found[rotation.id] = rotation
    missing = [c.rotation_id for c in changes if c.rotation_id not in found]
    existing: set[str] = set()
    if missing:
        existing = set(conn.execute(_EXISTING, {"ids": missing}).scalars())
    results: list[Rotation | KeyturnError] = []
    for change in changes:
        rotation = found.get(change.rotation_id)
        if rotation is not None:
            results.append(rotation)
        elif change.rotation_id in existing:
            results.append(StaleVersion(change.rotation_id, change.expected_version))
        else:
            results.append(not_found(change.rotation_id))
    return results


def insert_events(conn: Connection, changes: Sequence[Change]) -> None:
    rows = [
        {
            "rotation_id": e.rotation_id,
            "at": _aware(e.at),
            "kind": e.kind,
            "actor": e.actor,
            "from_state": e.from_state,
            "to_state": e.to_state,
            "trigger": e.trigger,
            "reason": e.reason,
            "detail": dict(e.detail),
        }
        for c in changes
        for e in c.events
    ]
    if rows:
        conn.execute(_EVENTS, _rows(rows))


def _action_row(a: ActionRecord) -> dict[str, Any]:
    return {
        "rotation_id": a.rotation_id,
        "phase": Phase(a.phase).value,
        "name": a.name,
        "idempotency_key": a.idempotency_key,
        "status": ActionStatus(a.status).value,
        "intent_at": _aware(a.intent_at),
        "outcome_at": _aware(a.outcome_at),
        "attempts": a.attempts,
        "detail": dict(a.detail),
        "error": a.error,
    }


def upsert_actions(conn: Connection, changes: Sequence[Change]) -> None:
    """Every change's earlier actions, then its action: in one statement when no rotation has
    more than one record here (a statement must not touch a row twice, and a new record's seq
    counts those already written), else earlier ones first."""
    earlier = [_action_row(a) for c in changes for a in c.earlier_actions]
    last = [_action_row(c.action) for c in changes if c.action is not None]
    if len({r["rotation_id"] for r in earlier}) != len(earlier):
        raise Fallback("several earlier actions of one rotation")
    if {r["rotation_id"] for r in earlier} & {r["rotation_id"] for r in last}:
        statements = [earlier, last]
    else:
        statements = [earlier + last]
    for rows in statements:
        if rows:
            conn.execute(_ACTIONS, _rows(rows))


def replace_credentials(conn: Connection, changes: Sequence[Change], now: datetime) -> None:
    """The managed credentials some changes replace; an unknown one needs the precise error."""
    creds = [c.credential for c in changes if c.credential is not None]
    if not creds:
        return
    if len({c.name for c in creds}) != len(creds):
        raise Fallback("a credential twice in one round")
    rows = [{name: getattr(c, name) for name in _CREDENTIAL_COLUMNS} for c in creds]
    params: dict[str, Any] = {**_rows(rows), "now": now}
    if len(conn.execute(_CREDENTIALS, params).all()) != len(creds):
        raise Fallback("unknown credential")


def set_purge_after(conn: Connection, changes: Sequence[Change]) -> None:
    """Schedule (or clear) the purge of retained secrets; an unknown one needs the precise
    error."""
    rows = [
        {"id": i, "purge_after": _aware(when)} for c in changes for i, when in c.purge_after.items()
    ]
    if not rows:
        return
    if len({r["id"] for r in rows}) != len(rows):
        raise Fallback("a secret twice in one round")
    if len(conn.execute(_PURGE_AFTER, _rows(rows)).all()) != len(rows):
        raise Fallback("unknown secret")
