"""What ``/metrics`` reads from the store (:class:`keyturn.ports.FleetReader`), in a handful of
aggregate queries on one connection: rotations grouped by what their status depends on,
transition and operator events counted by GROUP BY (the event log is the source of every
counter, whichever process did the work), a few timestamps per credential, the worker rows,
and only those unfinished rotations that may need attention.

Nothing here loads every rotation or every event; the cost is a scan of each table per scrape
(measured in tests/bench/test_metrics_scrape.py).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, and_, case, func, literal, or_, select

from keyturn.adapters.store.models import (
    credentials_t,
    events_t,
    rotations_t,
    slots_t,
    workers_t,
)
from keyturn.adapters.store.sql import _rotation_from_row, _worker_from_row
from keyturn.domain.lifecycle import State
from keyturn.domain.model import Rotation
from keyturn.ports import FleetFacts, RotationGroup

if TYPE_CHECKING:
    from keyturn.adapters.store.sql import SqlStore


def fleet_facts(store: SqlStore, now: datetime) -> FleetFacts:
    with store._read() as conn:
        return FleetFacts(
            rotations=_rotation_groups(conn),
            transitions=_transitions(conn),
            operator_actions=_operator_actions(conn),
            keys_created={
                str(name): at
                for name, at in conn.execute(
                    select(credentials_t.c.name, credentials_t.c.updated_at)
                ).all()
            },
            next_rotations=_next_rotations(conn),
            last_successes=_last_successes(conn),
            attention_candidates=_attention_candidates(conn, now),
            workers=[
                _worker_from_row(row)
                for row in conn.execute(select(workers_t).order_by(workers_t.c.owner)).all()
            ],
        )


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


def _next_rotations(conn: Connection) -> dict[str, datetime]:
    s = slots_t.c
    stmt = select(s.credential, s.due_at).where(s.status == "scheduled")
    return {str(name): due for name, due in conn.execute(stmt).all()}


def _last_successes(conn: Connection) -> dict[str, datetime]:
    r = rotations_t.c
    stmt = (
        select(r.credential, func.max(r.finished_at))
        .where(r.state == State.OLD_DEACTIVATED.value, r.finished_at.is_not(None))
        .group_by(r.credential)
    )
    return {str(name): at for name, at in conn.execute(stmt).all() if at is not None}


def _attention_candidates(conn: Connection, now: datetime) -> list[Rotation]:
    r = rotations_t.c
    stmt = select(rotations_t).where(
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
    return [_rotation_from_row(row) for row in conn.execute(stmt).all()]
