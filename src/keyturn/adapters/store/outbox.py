"""The notification outbox on SQL (SQLite and PostgreSQL): :class:`keyturn.ports.OutboxStore`.

Notifications are inserted by the store's commits, with their events (see
:func:`keyturn.adapters.store.sql.insert_notices`). This module is the delivering side: the
fan-out into one delivery per sink, the claim of due deliveries (a lease: ``claimed_by`` until
``claimed_until``; ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, the ``BEGIN IMMEDIATE`` write lock
on SQLite), and the record of every attempt.

Order per rotation and sink: a delivery is claimed only when no other delivery of the same
rotation to the same sink is leased and no earlier one is pending, so a resolve never reaches
PagerDuty or Alertmanager before the trigger it resolves. On PostgreSQL the fan-out and the
claim take a transaction-scoped advisory lock (they are short; the sending happens outside any
transaction), so two processes never decide on the same rotation at once.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Connection,
    Row,
    and_,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError

from keyturn.adapters.store.models import (
    events_t,
    notification_attempts_t,
    notification_deliveries_t,
    notifications_t,
    rotations_t,
)
from keyturn.adapters.store.sql import (
    SqlStore,
    _event_values,
    _rotation_from_row,
    notice_values,
)
from keyturn.domain.model import Event, Rotation
from keyturn.domain.notify import OPENING, RESOLVING, notice_for
from keyturn.ports import Delivery, DeliveryAttempt, Route

#: pg_advisory_xact_lock key of the outbox's fan-out and claim ("kt-outbx").
_LOCK_KEY = 0x6B742D6F7574

_OPENING = sorted(k.value for k in OPENING)
_RESOLVING = frozenset(k.value for k in RESOLVING)
_DUE = ("pending", "firing")

d_t = notification_deliveries_t
n_t = notifications_t


def lost_holder_key(rotation: Rotation) -> str:
    expires = rotation.lease_expires_at.isoformat() if rotation.lease_expires_at else "-"
    return f"holder_lost:{rotation.id}:{rotation.lease_owner}:{expires}"


def _delivery(row: Row[Any], payload: dict[str, Any] | None = None) -> Delivery:
    m = row._mapping
    body = dict(payload if payload is not None else m.get("payload") or {})
    body["id"] = m["notification_id"]
    return Delivery(
        id=m["id"],
        notification_id=m["notification_id"],
        sink=m["sink"],
        rotation_id=m["rotation_id"],
        kind=m["kind"],
        status=m["status"],
        attempts=m["attempts"],
        payload=body,
        created_at=m["created_at"],
        next_attempt_at=m["next_attempt_at"],
        claimed_by=m["claimed_by"],
        first_attempt_at=m["first_attempt_at"],
        last_attempt_at=m["last_attempt_at"],
        sent_at=m["sent_at"],
        last_status_code=m["last_status_code"],
        last_error=m["last_error"],
    )


class SqlOutbox:
    """The outbox port on a :class:`SqlStore`'s database."""

    def __init__(self, store: SqlStore) -> None:
        self.store = store
        self._postgres = store.engine.dialect.name == "postgresql"

    def _exclusive(self, conn: Connection) -> None:
        if self._postgres:
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})

    # ------------------------------------------------------------------------ fan-out

    def _nothing(self, stmt: Any) -> bool:
        """A read first (no write lock, no advisory lock) when there is likely nothing to do:
        an idle delivery loop costs one indexed read per round, not a write transaction."""
        with self.store._read() as conn:
            return conn.execute(stmt.limit(1)).first() is None

    def fan_out(self, route: Route, now: datetime, limit: int) -> int:
        if self._nothing(select(n_t.c.id).where(n_t.c.fanned_out.is_(False))):
            return 0
        with self.store._tx() as conn:
            self._exclusive(conn)
            rows = conn.execute(
                select(n_t.c.id, n_t.c.rotation_id, n_t.c.kind, n_t.c.payload)
                .where(n_t.c.fanned_out.is_(False))
                .order_by(n_t.c.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            ).all()
            if not rows:
                return 0
            rotations = sorted({r.rotation_id for r in rows})
            opened: dict[str, set[str]] = defaultdict(set)
            for rid, sink in conn.execute(
                select(d_t.c.rotation_id, d_t.c.sink)
                .where(d_t.c.rotation_id.in_(rotations), d_t.c.kind.in_(_OPENING))
                .distinct()
            ).all():
                opened[rid].add(sink)
            values = []
            for row in rows:
                payload = {**dict(row.payload or {}), "id": row.id}
                sinks = list(dict.fromkeys(route(payload, frozenset(opened[row.rotation_id]))))
                if row.kind in _OPENING:
                    opened[row.rotation_id].update(sinks)
                values += [
                    {
                        "notification_id": row.id,
                        "sink": sink,
                        "rotation_id": row.rotation_id,
                        "kind": row.kind,
                        "status": "pending",
                        "attempts": 0,
                        "next_attempt_at": now,
                        "created_at": now,
                    }
                    for sink in sinks
                ]
            if values:
                stmt = self.store._upsert(d_t).on_conflict_do_nothing(
                    index_elements=[d_t.c.notification_id, d_t.c.sink]
                )
                conn.execute(stmt, values)
            conn.execute(
                update(n_t).where(n_t.c.id.in_([r.id for r in rows])).values(fanned_out=True)
            )
            return len(rows)

    # ------------------------------------------------------------------------ claim

    def claim_deliveries(
        self, owner: str, now: datetime, until: datetime, limit: int
    ) -> list[Delivery]:
        if limit <= 0:
            return []
        d = d_t.c
        o = d_t.alias("o")
        held_or_earlier = exists().where(
            o.c.rotation_id == d.rotation_id,
            o.c.sink == d.sink,
            o.c.id != d.id,
            or_(
                and_(o.c.status == "pending", o.c.notification_id < d.notification_id),
                o.c.claimed_until > now,
            ),
        )
        unfanned_before = exists().where(
            n_t.c.rotation_id == d.rotation_id,
            n_t.c.id < d.notification_id,
            n_t.c.fanned_out.is_(False),
        )
        candidates = (
            select(d.id, d.rotation_id, d.sink, d.status, d.notification_id)
            .where(
                d.status.in_(_DUE),
                d.next_attempt_at <= now,
                or_(d.claimed_until.is_(None), d.claimed_until <= now),
                ~held_or_earlier,
                ~unfanned_before,
            )
            .order_by(d.next_attempt_at, d.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        if self._nothing(select(d.id).where(d.status.in_(_DUE), d.next_attempt_at <= now)):
            return []
        with self.store._tx() as conn:
            self._exclusive(conn)
            # one delivery per (rotation, sink) at a time: the pending one (a trigger or a
            # resolve) before a re-send of a firing alert it supersedes or resolves
            chosen: dict[tuple[str, str], Any] = {}
            for row in conn.execute(candidates).all():
                group = (row.rotation_id, row.sink)
                best = chosen.get(group)
                if best is None or (row.status == "pending" and best.status != "pending"):
                    chosen[group] = row
            if not chosen:
                return []
            ids = [r.id for r in chosen.values()]
            rows = conn.execute(
                update(d_t)
                .where(d.id.in_(ids))
                .values(claimed_by=owner, claimed_until=until)
                .returning(d_t)
            ).all()
            payloads = dict(
                conn.execute(
                    select(n_t.c.id, n_t.c.payload).where(
                        n_t.c.id.in_(sorted({r.notification_id for r in rows}))
                    )
                ).all()
            )
        found = [_delivery(r, payloads.get(r.notification_id)) for r in rows]
        return sorted(found, key=lambda x: (x.next_attempt_at or now, x.id))

    def finish_delivery(
        self,
        delivery: Delivery,
        owner: str,
        attempt: DeliveryAttempt,
        *,
        status: str,
        next_attempt_at: datetime | None,
        close_firing: bool = False,
    ) -> bool:
        d = d_t.c
        delivered = attempt.outcome in ("sent", "resent")
        with self.store._tx() as conn:
            done = conn.execute(
                update(d_t)
                .where(d.id == delivery.id, d.claimed_by == owner)
                .values(
                    status=status,
                    next_attempt_at=next_attempt_at,
                    claimed_by=None,
                    claimed_until=None,
                    attempts=d.attempts + 1,
                    first_attempt_at=func.coalesce(d.first_attempt_at, attempt.at),
                    last_attempt_at=attempt.at,
                    sent_at=attempt.at if delivered else d.sent_at,
                    last_status_code=attempt.status_code,
                    last_error=attempt.error,
                )
                .returning(d.id)
            ).first()
            if done is None:
                return False
            conn.execute(
                insert(notification_attempts_t).values(
                    delivery_id=delivery.id,
                    at=attempt.at,
                    owner=owner,
                    outcome=attempt.outcome,
                    status_code=attempt.status_code,
                    error=attempt.error,
                    duration_ms=attempt.duration_ms,
                )
            )
            if close_firing:
                ended = "resolved" if delivery.kind in _RESOLVING else "superseded"
                conn.execute(
                    update(d_t)
                    .where(
                        d.rotation_id == delivery.rotation_id,
                        d.sink == delivery.sink,
                        d.status == "firing",
                        d.id != delivery.id,
                    )
                    .values(status=ended, next_attempt_at=None)
                )
        return True

    # ------------------------------------------------------------------ lost holders

    def lost_holders(self, expired_before: datetime, limit: int) -> list[Rotation]:
        r = rotations_t.c
        stmt = (
            select(rotations_t)
            .where(
                r.finished_at.is_(None),
                r.lease_owner.is_not(None),
                r.lease_expires_at < expired_before,
            )
            .order_by(r.lease_expires_at)
            .limit(limit)
        )
        with self.store._read() as conn:
            return [_rotation_from_row(row) for row in conn.execute(stmt).all()]

    def record_lost_holder(self, rotation: Rotation, event: Event) -> bool:
        r = rotations_t.c
        key = lost_holder_key(rotation)
        notice = notice_for(event, rotation, key=key)
        if notice is None:
            raise ValueError("record_lost_holder takes a run event whose status is holder_lost")
        now = self.store._now()
        try:
            with self.store._tx() as conn:
                still = conn.execute(
                    select(r.id)
                    .where(
                        r.id == rotation.id,
                        r.version == rotation.version,
                        r.lease_owner == rotation.lease_owner,
                        r.lease_expires_at == rotation.lease_expires_at,
                        r.finished_at.is_(None),
                    )
                    .with_for_update()
                ).first()
                if still is None:
                    return False
                known = conn.execute(select(n_t.c.id).where(n_t.c.key == key)).first()
                if known is not None:
                    return False
                conn.execute(insert(events_t).values(**_event_values(event)))
                conn.execute(insert(n_t).values(**notice_values(notice, now)))
        except IntegrityError:  # another process recorded it first
            return False
        return True

    # ------------------------------------------------------------------------ reads

    def deliveries(
        self, *, rotation_id: str | None = None, status: str | None = None, limit: int = 100
    ) -> list[Delivery]:
        d = d_t.c
        stmt = select(d_t, n_t.c.payload).join(n_t, n_t.c.id == d.notification_id)
        if rotation_id is not None:
            stmt = stmt.where(d.rotation_id == rotation_id)
        if status is not None:
            stmt = stmt.where(d.status == status)
        stmt = stmt.order_by(d.id.desc()).limit(limit)
        with self.store._read() as conn:
            return [_delivery(row) for row in conn.execute(stmt).all()]

    def attempts(self, delivery_ids: Sequence[int]) -> dict[int, list[DeliveryAttempt]]:
        out: dict[int, list[DeliveryAttempt]] = {i: [] for i in delivery_ids}
        if not out:
            return out
        a = notification_attempts_t.c
        stmt = (
            select(notification_attempts_t, d_t.c.sink)
            .join(d_t, d_t.c.id == a.delivery_id)
            .where(a.delivery_id.in_(list(out)))
            .order_by(a.delivery_id, a.id)
        )
        with self.store._read() as conn:
            for row in conn.execute(stmt).all():
                m = row._mapping
                out[m["delivery_id"]].append(
                    DeliveryAttempt(
                        delivery_id=m["delivery_id"],
                        at=m["at"],
                        owner=m["owner"],
                        outcome=m["outcome"],
                        status_code=m["status_code"],
                        error=m["error"],
                        duration_ms=m["duration_ms"],
                        sink=m["sink"],
                    )
                )
        return out

    def pending_notifications(self) -> int:
        with self.store._read() as conn:
            unfanned = conn.execute(
                select(func.count()).select_from(n_t).where(n_t.c.fanned_out.is_(False))
            ).scalar_one()
            pending = conn.execute(
                select(func.count()).select_from(d_t).where(d_t.c.status == "pending")
            ).scalar_one()
        return int(unfanned) + int(pending)

    def prune(self, before: datetime) -> int:
        """Delete what is done with and older than `before`: attempts of every delivery,
        deliveries no longer due (sent, resolved, superseded, failed), notifications whose
        deliveries are all gone; how many rows."""
        a = notification_attempts_t.c
        d = d_t.c
        done = d.status.not_in(_DUE)
        with self.store._tx() as conn:
            old_deliveries = select(d.id).where(done, d.created_at < before)
            n = conn.execute(
                delete(notification_attempts_t).where(
                    or_(a.at < before, a.delivery_id.in_(old_deliveries))
                )
            ).rowcount
            n += conn.execute(delete(d_t).where(done, d.created_at < before)).rowcount
            n += conn.execute(
                delete(n_t).where(
                    n_t.c.fanned_out.is_(True),
                    n_t.c.created_at < before,
                    ~exists().where(d.notification_id == n_t.c.id),
                )
            ).rowcount
        return int(n or 0)
