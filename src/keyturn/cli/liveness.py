"""What the CLI says about liveness: who holds a rotation's lease, whether that holder is still
heartbeating, and whether any worker will carry on after an operator command.

Truth comes from two records: the rotation (lease owner, ``lease_taken_at``/``lease_taken_from``
set by the claim, ``lease_expires_at`` moved by every renewal) and the holder's row in
``workers`` (its heartbeat, every ``heartbeat_seconds``; stale after two intervals). The last
renewal is not stored: it is ``lease_expires_at - lease_seconds`` (a renewal sets the expiry to
its own time plus the holder's lease length, recorded in its worker row).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from keyturn.domain.model import Rotation, WorkerRecord

if TYPE_CHECKING:
    from keyturn.ports import Store

LIVE_HINT = "a worker carries on from here"
NO_WORKER_HINT = "no live worker: start `keyturn worker`"
#: The label column of `rotations show` (``  lease      ...``) and its continuation lines.
_LABEL = "  lease      "
_MORE = " " * len(_LABEL)


def utc(dt: datetime) -> str:
    """``2026-12-02 10:02:11Z``: UTC, marked, to the second."""
    return dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _iso(dt: datetime | None) -> str | None:
    return dt.isoformat() if dt is not None else None


def _seconds(delta: timedelta) -> int:
    return max(0, round(delta.total_seconds()))


def holder_status(owner: str, workers_by_owner: Mapping[str, WorkerRecord], now: datetime) -> str:
    """``live``, ``stale``, ``stopped`` or ``unknown`` (no worker registered with that owner)."""
    worker = workers_by_owner.get(owner)
    return worker.status(now) if worker is not None else "unknown"


def _renewed_at(
    rotation: Rotation, worker: WorkerRecord | None, lease_seconds: float | None
) -> datetime | None:
    seconds = worker.lease_seconds if worker is not None else lease_seconds
    if rotation.lease_expires_at is None or seconds is None:
        return None
    renewed = rotation.lease_expires_at - timedelta(seconds=seconds)
    if rotation.lease_taken_at is not None and renewed < rotation.lease_taken_at:
        return rotation.lease_taken_at
    return renewed


def _not_seen_for(
    rotation: Rotation,
    worker: WorkerRecord | None,
    renewed_at: datetime | None,
    now: datetime,
) -> int | None:
    """Seconds since the holder was last seen, when it is not live (None while it is live, or
    when nothing tells when it was last seen)."""
    if worker is not None:
        if worker.status(now) == "live":
            return None
        return _seconds(now - worker.heartbeat_at)
    seen = renewed_at or rotation.lease_taken_at
    return _seconds(now - seen) if seen is not None else None


def lease_dict(
    rotation: Rotation,
    workers_by_owner: Mapping[str, WorkerRecord],
    now: datetime,
    *,
    lease_seconds: float | None = None,
) -> dict[str, Any] | None:
    """The lease and its holder's liveness for JSON (None when no one holds the lease).

    `lease_seconds` (the configured lease) derives the last renewal when the holder is not a
    registered worker (an operator command, say)."""
    owner = rotation.lease_owner
    if owner is None:
        return None
    worker = workers_by_owner.get(owner)
    renewed_at = _renewed_at(rotation, worker, lease_seconds)
    status = holder_status(owner, workers_by_owner, now)
    expires = rotation.lease_expires_at
    return {
        "owner": owner,
        "expires_at": _iso(expires),
        "expired": expires is not None and expires <= now,
        "taken_at": _iso(rotation.lease_taken_at),
        "taken_over_from": rotation.lease_taken_from
        if rotation.lease_taken_from not in (None, owner)
        else None,
        # derived: lease_expires_at - the holder's lease_seconds
        "renewed_at": _iso(renewed_at),
        "holder": {
            "status": status,
            "host": worker.host if worker else None,
            "pid": worker.pid if worker else None,
            "last_heartbeat_at": _iso(worker.heartbeat_at) if worker else None,
            "heartbeat_seconds": worker.heartbeat_seconds if worker else None,
            "stopped_at": _iso(worker.stopped_at) if worker else None,
        },
        "holder_not_seen_seconds": _not_seen_for(rotation, worker, renewed_at, now),
    }


def _holder_words(owner: str, worker: WorkerRecord | None, not_seen: int | None) -> str:
    if worker is None:
        seen = f"holder not seen for {not_seen} s" if not_seen is not None else "holder not seen"
        return f"{owner}: {seen} (no worker registered as {owner})"
    where = f"pid {worker.pid} on {worker.host}"
    if worker.stopped_at is not None:
        return (
            f"{owner} ({where}): holder not seen for {not_seen} s "
            f"(it stopped at {utc(worker.stopped_at)})"
        )
    if not_seen is not None:
        return (
            f"{owner} ({where}): holder not seen for {not_seen} s "
            f"(last heartbeat {utc(worker.heartbeat_at)}; it heartbeats every "
            f"{worker.heartbeat_seconds:g} s)"
        )
    return f"{owner} ({where}), live: last heartbeat {utc(worker.heartbeat_at)}"


def lease_lines(
    rotation: Rotation,
    workers_by_owner: Mapping[str, WorkerRecord],
    now: datetime,
    *,
    lease_seconds: float | None = None,
) -> list[str]:
    """The ``lease`` lines of `rotations show`: holder and liveness, then taken, last renewal
    and expiry."""
    owner = rotation.lease_owner
    if owner is None:
        return [f"{_LABEL}none"]
    worker = workers_by_owner.get(owner)
    renewed_at = _renewed_at(rotation, worker, lease_seconds)
    not_seen = _not_seen_for(rotation, worker, renewed_at, now)
    times = []
    if rotation.lease_taken_at is not None:
        taken = f"taken {utc(rotation.lease_taken_at)}"
        if rotation.lease_taken_from not in (None, owner):
            taken += f" (taken over from {rotation.lease_taken_from})"
        times.append(taken)
    if renewed_at is not None:
        times.append(f"last renewal {utc(renewed_at)}")
    expires = rotation.lease_expires_at
    if expires is not None:
        if expires > now:
            after = f"in {_seconds(expires - now)} s"
            if not_seen is not None:
                after += "; then the next worker to claim it takes over"
            times.append(f"expires {utc(expires)} ({after})")
        else:
            ago = _seconds(now - expires)
            when = f"{ago} s ago" if ago else "just now"
            times.append(f"expired {utc(expires)} ({when}; the next worker to claim it takes over)")
    lines = [f"{_LABEL}{_holder_words(owner, worker, not_seen)}"]
    if times:
        lines.append(_MORE + ", ".join(times))
    return lines


def live_workers(workers: list[WorkerRecord], now: datetime) -> list[WorkerRecord]:
    return [w for w in workers if w.status(now) == "live"]


def next_step_hint(store: Store, now: datetime) -> str:
    """What happens after an operator command: a live worker carries on, or none heartbeats."""
    return LIVE_HINT if live_workers(store.list_workers(), now) else NO_WORKER_HINT


class LeaseView:
    """A rotation's lease with its holder's worker row, read once: what `rotations show` prints
    (:meth:`lines`) and puts in its JSON (:meth:`as_dict`)."""

    def __init__(
        self,
        rotation: Rotation,
        workers_by_owner: Mapping[str, WorkerRecord],
        now: datetime,
        lease_seconds: float | None = None,
    ) -> None:
        self.rotation = rotation
        self.workers_by_owner = workers_by_owner
        self.now = now
        self.lease_seconds = lease_seconds

    @classmethod
    def of(cls, store: Store, rotation: Rotation, lease_seconds: float | None = None) -> LeaseView:
        owner = rotation.lease_owner
        holders = store.get_workers([owner]) if owner is not None else {}
        return cls(rotation, holders, datetime.now(UTC), lease_seconds)

    def lines(self) -> list[str]:
        return lease_lines(
            self.rotation, self.workers_by_owner, self.now, lease_seconds=self.lease_seconds
        )

    def as_dict(self) -> dict[str, Any] | None:
        return lease_dict(
            self.rotation, self.workers_by_owner, self.now, lease_seconds=self.lease_seconds
        )
