"""The scheduler's slots on SQL (SQLite and PostgreSQL): :class:`keyturn.ports.SlotStore`.

A slot is fired by one transaction that marks it fired (a compare-and-set on its status and
fingerprint) and inserts its rotation: of several workers firing the same slot one wins, the
others update no row. The tick is one query on the partial index of scheduled slots' due_at.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Row, and_, delete, exists, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from keyturn.adapters.store.models import credentials_t, events_t, rotations_t, slots_t
from keyturn.adapters.store.models import schedule_clock_t as clock_t
from keyturn.adapters.store.sql import (
    SqlStore,
    _event_values,
    _rotation_from_row,
    _rotation_values,
)
from keyturn.domain.errors import AlreadyRotating, KeyturnError
from keyturn.domain.model import Event, Rotation, Slot
from keyturn.ports import ClockAnchor

#: The IN lists a query takes at once.
_CHUNK = 500


def _aware(value: Any) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _slot_from_row(row: Row[Any]) -> Slot:
    m = row._mapping
    return Slot(
        credential=m["credential"],
        slot=m["slot"],
        due_at=m["due_at"],
        fingerprint=m["fingerprint"],
        policy=m["policy"],
        group=m["grp"],
        why=m["why"],
        status=m["status"],
        note=m["note"],
        rotation_id=m["rotation_id"],
        planned_by=m["planned_by"],
        key_recorded_at=m["key_recorded_at"],
        key_created=m["key_created"],
        created_at=m["created_at"],
        fired_at=m["fired_at"],
    )


def _slot_values(slot: Slot, now: datetime) -> dict[str, Any]:
    return {
        "credential": slot.credential,
        "slot": slot.slot,
        "due_at": slot.due_at,
        "status": slot.status,
        "fingerprint": slot.fingerprint,
        "policy": slot.policy,
        "grp": slot.group,
        "why": slot.why,
        "note": slot.note,
        "rotation_id": slot.rotation_id,
        "planned_by": slot.planned_by,
        "key_recorded_at": slot.key_recorded_at,
        "key_created": slot.key_created,
        "created_at": slot.created_at or now,
        "fired_at": slot.fired_at,
    }


class SqlSlots:
    """The slot store on the same database (and engine) as `store`."""

    def __init__(self, store: SqlStore) -> None:
        self.store = store

    # ------------------------------------------------------------------ clocks

    def db_now(self) -> datetime:
        with self.store._read() as conn:
            if self.store._postgres:
                value = conn.execute(select(func.clock_timestamp())).scalar_one()
            else:
                value = conn.exec_driver_sql(
                    "SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')"
                ).scalar_one()
        return _aware(value)

    def clock_anchor(self) -> ClockAnchor | None:
        with self.store._read() as conn:
            row = conn.execute(select(clock_t).where(clock_t.c.id == 1)).first()
        if row is None:
            return None
        m = row._mapping
        return ClockAnchor(m["anchor_real"], m["anchor_schedule"], float(m["scale"]))

    def set_clock_anchor(self, anchor: ClockAnchor | None) -> None:
        r = rotations_t.c
        with self.store._tx() as conn:
            # every wait is looked at again on the new clock (its next check was on the old)
            conn.execute(
                update(rotations_t)
                .where(r.finished_at.is_(None), r.wait_key.is_not(None))
                .values(next_attempt_at=self.store._now())
            )
            conn.execute(delete(clock_t))
            if anchor is not None:
                conn.execute(
                    insert(clock_t).values(
                        id=1,
                        anchor_real=anchor.real,
                        anchor_schedule=anchor.schedule,
                        scale=anchor.scale,
                    )
                )

    # ------------------------------------------------------------------ reads

    def due_slots(self, now: datetime, limit: int) -> list[Slot]:
        s = slots_t.c
        stmt = (
            select(slots_t)
            .where(s.status == "scheduled", s.due_at <= now)
            .order_by(s.due_at.asc())
            .limit(limit)
        )
        with self.store._read() as conn:
            return [_slot_from_row(r) for r in conn.execute(stmt).all()]

    def scheduled_slots(self, credentials: Sequence[str] | None = None) -> dict[str, Slot]:
        s = slots_t.c
        out: dict[str, Slot] = {}
        with self.store._read() as conn:
            if credentials is None:
                rows = conn.execute(select(slots_t).where(s.status == "scheduled")).all()
                out.update((r._mapping["credential"], _slot_from_row(r)) for r in rows)
                return out
            names = list(credentials)
            for i in range(0, len(names), _CHUNK):
                stmt = select(slots_t).where(
                    s.status == "scheduled", s.credential.in_(names[i : i + _CHUNK])
                )
                out.update(
                    (r._mapping["credential"], _slot_from_row(r)) for r in conn.execute(stmt)
                )
        return out

    def unplanned(self, credentials: Sequence[str]) -> list[str]:
        c, s = credentials_t.c, slots_t.c
        out: list[str] = []
        names = list(credentials)
        with self.store._read() as conn:
            for i in range(0, len(names), _CHUNK):
                stmt = select(c.name).where(
                    c.name.in_(names[i : i + _CHUNK]),
                    ~exists().where(s.credential == c.name, s.status == "scheduled"),
                )
                out.extend(conn.execute(stmt).scalars())
        return out

    def last_fired(self, credentials: Sequence[str]) -> dict[str, datetime]:
        s = slots_t.c
        out: dict[str, datetime] = {}
        names = list(credentials)
        with self.store._read() as conn:
            for i in range(0, len(names), _CHUNK):
                stmt = (
                    select(s.credential, func.max(s.slot))
                    .where(s.credential.in_(names[i : i + _CHUNK]), s.status == "fired")
                    .group_by(s.credential)
                )
                out.update((c, _aware(v)) for c, v in conn.execute(stmt).all())
        return out

    def keys_created(self, credentials: Sequence[str]) -> dict[str, tuple[datetime, datetime]]:
        s = slots_t.c
        out: dict[str, tuple[datetime, datetime]] = {}
        names = list(credentials)
        with self.store._read() as conn:
            for i in range(0, len(names), _CHUNK):
                stmt = (
                    select(s.credential, s.key_recorded_at, s.key_created)
                    .where(s.credential.in_(names[i : i + _CHUNK]), s.key_created.is_not(None))
                    .order_by(s.created_at.asc())
                )
                for c, recorded, created in conn.execute(stmt).all():
                    if recorded is not None:
                        out[c] = (_aware(recorded), _aware(created))
        return out

    def group_last_start(self, group: str) -> datetime | None:
        s = slots_t.c
        stmt = select(func.max(s.fired_at)).where(s.grp == group, s.status == "fired")
        with self.store._read() as conn:
            value = conn.execute(stmt).scalar()
        return _aware(value) if value is not None else None

    def record_start(self, slot: Slot) -> None:
        with contextlib.suppress(IntegrityError), self.store._tx() as conn:
            conn.execute(insert(slots_t).values(**_slot_values(slot, self.store._now())))

    def group_starts(self, group: str, since: datetime) -> list[datetime]:
        s = slots_t.c
        stmt = select(s.status, s.due_at, s.fired_at).where(
            s.grp == group,
            s.due_at >= since,
            s.status.in_(("scheduled", "fired")),
        )
        with self.store._read() as conn:
            rows = conn.execute(stmt).all()
        return [
            (m["fired_at"] if m["status"] == "fired" and m["fired_at"] else m["due_at"])
            for m in (row._mapping for row in rows)
        ]

    def slots_of(self, credential: str, limit: int = 20) -> list[Slot]:
        s = slots_t.c
        stmt = (
            select(slots_t)
            .where(s.credential == credential)
            .order_by(s.slot.desc(), s.created_at.desc())
            .limit(limit)
        )
        with self.store._read() as conn:
            return [_slot_from_row(r) for r in conn.execute(stmt).all()]

    def in_flight(self, credentials: Sequence[str]) -> tuple[int, datetime | None]:
        r = rotations_t.c
        count, newest = 0, None
        names = list(credentials)
        with self.store._read() as conn:
            for i in range(0, len(names), _CHUNK):
                chunk = names[i : i + _CHUNK]
                n = conn.execute(
                    select(func.count())
                    .select_from(rotations_t)
                    .where(r.credential.in_(chunk), r.finished_at.is_(None))
                ).scalar_one()
                last = conn.execute(
                    select(func.max(r.created_at)).where(r.credential.in_(chunk))
                ).scalar()
                count += int(n)
                if last is not None:
                    last = _aware(last)
                    newest = last if newest is None or last > newest else newest
        return count, newest

    def in_flight_of_provider(self, provider: str) -> int:
        r, c = rotations_t.c, credentials_t.c
        stmt = (
            select(func.count())
            .select_from(rotations_t.join(credentials_t, c.name == r.credential))
            .where(r.finished_at.is_(None), c.provider == provider)
        )
        with self.store._read() as conn:
            return int(conn.execute(stmt).scalar_one())

    # ------------------------------------------------------------------ writes

    def plan_slot(self, slot: Slot, *, replaces: datetime | None = None) -> bool:
        s = slots_t.c
        now = self.store._now()
        try:
            with self.store._tx() as conn:
                if replaces is not None:
                    conn.execute(
                        update(slots_t)
                        .where(
                            s.credential == slot.credential,
                            s.slot == replaces,
                            s.status == "scheduled",
                        )
                        .values(status="superseded", note=f"replanned: {slot.why}")
                    )
                conn.execute(insert(slots_t).values(**_slot_values(slot, now)))
        except IntegrityError:
            return False
        return True

    def postpone_slot(
        self,
        credential: str,
        slot: datetime,
        due_at: datetime,
        note: str | None,
        *,
        key_recorded_at: datetime | None = None,
        fingerprint: str | None = None,
    ) -> None:
        s = slots_t.c
        values: dict[str, Any] = {"due_at": due_at, "note": note}
        if key_recorded_at is not None:
            values["key_recorded_at"] = key_recorded_at
        if fingerprint is not None:
            values["fingerprint"] = fingerprint
        with self.store._tx() as conn:
            conn.execute(
                update(slots_t)
                .where(s.credential == credential, s.slot == slot, s.status == "scheduled")
                .values(**values)
            )

    def close_slot(self, credential: str, slot: datetime, status: str, note: str) -> None:
        s = slots_t.c
        with self.store._tx() as conn:
            conn.execute(
                update(slots_t)
                .where(s.credential == credential, s.slot == slot, s.status == "scheduled")
                .values(status=status, note=note)
            )

    def fire_slots(
        self, fires: Sequence[tuple[Slot, Rotation, Event]], now: datetime
    ) -> list[bool | KeyturnError]:
        out: list[bool | KeyturnError] = []
        with self.store._tx() as conn:
            for slot, rotation, event in fires:
                try:
                    with conn.begin_nested():
                        out.append(self._fire(conn, slot, rotation, event, now))
                except IntegrityError:
                    out.append(AlreadyRotating(slot.credential))
        return out

    def unfinished(self, credentials: Sequence[str]) -> dict[str, Rotation]:
        r = rotations_t.c
        out: dict[str, Rotation] = {}
        names = list(credentials)
        with self.store._read() as conn:
            for i in range(0, len(names), _CHUNK):
                stmt = select(rotations_t).where(
                    r.credential.in_(names[i : i + _CHUNK]), r.finished_at.is_(None)
                )
                for row in conn.execute(stmt).all():
                    rotation = _rotation_from_row(row)
                    out[rotation.credential] = rotation
        return out

    def _fire(
        self, conn: Connection, slot: Slot, rotation: Rotation, event: Event, now: datetime
    ) -> bool:
        s = slots_t.c
        taken = conn.execute(
            update(slots_t)
            .where(
                and_(
                    s.credential == slot.credential,
                    s.slot == slot.slot,
                    s.status == "scheduled",
                    s.fingerprint == slot.fingerprint,
                )
            )
            .values(status="fired", rotation_id=rotation.id, fired_at=now)
        ).rowcount
        if taken != 1:
            return False
        conn.execute(insert(rotations_t).values(**_rotation_values(rotation)))
        conn.execute(insert(events_t).values(**_event_values(event)))
        return True

    def fire_slot(self, slot: Slot, rotation: Rotation, event: Event, now: datetime) -> bool:
        try:
            with self.store._tx() as conn:
                if not self._fire(conn, slot, rotation, event, now):
                    return False
        except IntegrityError:
            existing = self.store.latest_rotation(slot.credential)
            raise AlreadyRotating(
                slot.credential, existing.id if existing and not existing.finished else None
            ) from None
        return True
