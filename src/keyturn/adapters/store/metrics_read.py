"""What ``/metrics`` reads from the store (:class:`keyturn.ports.FleetReader`), in a handful of
aggregate queries in one read-only transaction: rotations grouped by what their status depends
on, transition and operator events counted by GROUP BY (the event log is the source of every
counter, whichever process did the work), the three timestamps of each credential in one
query (as Unix seconds, computed by the database), the worker rows, and only those unfinished
rotations that may need attention (the columns attention() reads).

On SQLite the transaction is a deferred one (a WAL snapshot): a scrape never holds the write
lock the workers commit with. tests/bench/test_metrics_scrape.py measures it at 100,000
rotations.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Float, and_, case, cast, func, literal, or_, select

from keyturn.adapters.store.models import (
    credentials_t,
    events_t,
    rotations_t,
    slots_t,
    workers_t,
)
from keyturn.adapters.store.sql import DEFERRED_READ, _worker_from_row
from keyturn.domain.lifecycle import State
from keyturn.domain.model import OperatorAction, OperatorRequest, Rotation
from keyturn.ports import FleetFacts, RotationGroup

if TYPE_CHECKING:
    from keyturn.adapters.store.sql import SqlStore


def fleet_facts(store: SqlStore, now: datetime, *, counters: bool = True) -> FleetFacts:
    with _snapshot(store) as conn:
        keys, nexts, successes = _credential_times(conn, store._postgres)
        return FleetFacts(
            rotations=_rotation_groups(conn),
            # the event log's counts (the costliest reads: every event) only when asked
            transitions=_transitions(conn) if counters else {},
            operator_actions=_operator_actions(conn) if counters else {},
            keys_created=keys,
            next_rotations=nexts,
            last_successes=successes,
            attention_candidates=_attention_candidates(conn, now),
            workers=[
                _worker_from_row(row)
                for row in conn.execute(select(workers_t).order_by(workers_t.c.owner)).all()
            ],
        )


@contextmanager
def _snapshot(store: SqlStore) -> Iterator[Connection]:
    """One read-only transaction: REPEATABLE READ on PostgreSQL, a deferred BEGIN on SQLite."""
    options: dict[str, Any] = (
        {"isolation_level": "REPEATABLE READ", "postgresql_readonly": True}
        if store._postgres
        else {DEFERRED_READ: True}
    )
    with store._translated(), store.engine.connect() as conn:
        conn.execution_options(**options)
        with conn.begin():
            yield conn


def _set(column: Any) -> Any:
    """1 when the string column holds a non-empty value (as Python's truthiness), else 0."""
    return case((and_(column.is_not(None), column != literal("")), 1), else_=0)


def _rotation_groups(conn: Connection) -> list[RotationGroup]:
    r = rotations_t.c
    # the flags in a subquery, so the GROUP BY names plain columns on every dialect
    flags = select(
        r.state.label("state"),
        case((r.request_action.is_not(None), 1), else_=0).label("requested"),
        case((r.paused, 1), else_=0).label("paused"),
        _set(r.halted_reason).label("halted"),
        r.wait_key.label("wait_key"),
        case((r.wait_for.is_not(None), 1), else_=0).label("waiting"),
        _set(r.lease_owner).label("leased"),
        case((r.attempts != 0, 1), else_=0).label("retried"),
    ).subquery("f")
    f = flags.c
    columns = (f.state, f.requested, f.paused, f.halted, f.wait_key, f.waiting, f.leased, f.retried)
    stmt = select(*columns, func.count()).group_by(*columns)
    return [
        RotationGroup(
            state=State(state),
            requested=bool(requested),
            paused=bool(paused),
            halted=bool(halted),
            wait_key=wait_key,
            waiting=bool(waiting),
            leased=bool(leased),
            retried=bool(retried),
            count=int(n),
        )
        for state, requested, paused, halted, wait_key, waiting, leased, retried, n in conn.execute(
            stmt
        ).all()
    ]


def _transitions(conn: Connection) -> dict[tuple[str, str, str], int]:
    e, r = events_t.c, rotations_t.c
    stmt = (
        select(e.from_state, e.to_state, r.kind, func.count())
        .select_from(events_t.join(rotations_t, e.rotation_id == r.id))
        .where(e.kind == "transition")
        .group_by(e.from_state, e.to_state, r.kind)
    )
    return {
        (str(source or ""), str(dest or ""), str(kind)): int(n)
        for source, dest, kind, n in conn.execute(stmt).all()
    }


def _operator_actions(conn: Connection) -> dict[tuple[str, str], int]:
    """Operator events by verb and outcome: ``applied`` (a verb carried out, or a rotation
    started: its event has no status), ``requested`` (left to the lease holder), ``refused``
    (whatever the refusal said), ``other``."""
    e = events_t.c
    status = e.detail["status"].as_string()
    outcome = case(
        (status.is_(None), literal("applied")),
        (status.like("refused%"), literal("refused")),
        (status.in_(["applied", "requested"]), status),
        else_=literal("other"),
    )
    inner = (
        select(e.trigger.label("verb"), outcome.label("outcome"))
        .where(e.kind == "operator")
        .subquery("o")
    )
    o = inner.c
    stmt = select(o.verb, o.outcome, func.count()).group_by(o.verb, o.outcome)
    out: dict[tuple[str, str], int] = {}
    for verb, result, n in conn.execute(stmt).all():
        key = (str(verb or ""), str(result))
        out[key] = out.get(key, 0) + int(n)
    return out


def _epoch(column: Any, postgres: bool) -> Any:
    """Unix seconds of a timestamp column, computed by the database (no datetime per row)."""
    if postgres:
        return cast(func.extract("epoch", column), Float)
    # SQLite keeps naive UTC text; julianday() reads it
    return (func.julianday(column) - 2440587.5) * 86400.0


def _credential_times(
    conn: Connection, postgres: bool
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Per credential, in one query: when its key was recorded, when its scheduled slot fires,
    when its latest rotation that ended in old_deactivated finished (Unix seconds)."""
    c, r, s = credentials_t.c, rotations_t.c, slots_t.c
    done = (
        select(r.credential.label("credential"), func.max(r.finished_at).label("at"))
        .where(r.state == State.OLD_DEACTIVATED.value, r.finished_at.is_not(None))
        .group_by(r.credential)
        .subquery("done")
    )
    scheduled = (
        select(s.credential.label("credential"), s.due_at.label("at"))
        .where(s.status == "scheduled")
        .subquery("scheduled")
    )
    stmt = select(
        c.name,
        _epoch(c.updated_at, postgres),
        _epoch(scheduled.c.at, postgres),
        _epoch(done.c.at, postgres),
    ).select_from(
        credentials_t.outerjoin(scheduled, scheduled.c.credential == c.name).outerjoin(
            done, done.c.credential == c.name
        )
    )
    keys: dict[str, float] = {}
    nexts: dict[str, float] = {}
    successes: dict[str, float] = {}
    for name, key_at, next_at, done_at in conn.execute(stmt).all():
        keys[name] = float(key_at)
        if next_at is not None:
            nexts[name] = float(next_at)
        if done_at is not None:
            successes[name] = float(done_at)
    return keys, nexts, successes


#: What attention() reads of a rotation (the rest is not loaded).
_ATTENTION_COLUMNS = (
    "id",
    "credential",
    "kind",
    "state",
    "version",
    "created_at",
    "updated_at",
    "lease_owner",
    "lease_expires_at",
    "attempts",
    "halted_reason",
    "request_action",
    "request_actor",
    "request_at",
    "wait_key",
    "wait_since",
    "wait_deadline",
)


def _attention_candidates(conn: Connection, now: datetime) -> list[Rotation]:
    r = rotations_t.c
    stmt = select(*(rotations_t.c[name] for name in _ATTENTION_COLUMNS)).where(
        r.finished_at.is_(None),
        or_(
            r.halted_reason.is_not(None),
            r.wait_key.is_not(None),
            r.wait_deadline.is_not(None),
            r.request_action.is_not(None),
            r.attempts != 0,
            and_(r.lease_owner.is_not(None), r.lease_expires_at < now),
        ),
    )
    out = []
    for row in conn.execute(stmt).all():
        m = row._mapping
        request = (
            OperatorRequest(
                OperatorAction(m["request_action"]), m["request_actor"], "", m["request_at"]
            )
            if m["request_action"] is not None
            else None
        )
        out.append(
            Rotation(
                id=m["id"],
                credential=m["credential"],
                kind=str(m["kind"]),
                state=State(m["state"]),
                version=m["version"],
                reason="",
                created_at=m["created_at"],
                updated_at=m["updated_at"],
                lease_owner=m["lease_owner"],
                lease_expires_at=m["lease_expires_at"],
                attempts=m["attempts"],
                halted_reason=m["halted_reason"],
                request=request,
                wait_key=m["wait_key"],
                wait_since=m["wait_since"],
                wait_deadline=m["wait_deadline"],
            )
        )
    return out
