"""`keyturn workers`: the worker processes that registered, whether they still heartbeat, and
how many rotations each holds a lease on now."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer

from keyturn.cli.liveness import utc

if TYPE_CHECKING:
    from rich.console import Console

    from keyturn.domain.model import WorkerRecord
    from keyturn.ports import Store

COLUMNS = ("owner", "host", "pid", "started", "last heartbeat", "age", "status", "held")


def _age(seconds: float) -> str:
    s = round(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def worker_dict(w: WorkerRecord, held: int, now: datetime) -> dict[str, Any]:
    return {
        "owner": w.owner,
        "host": w.host,
        "pid": w.pid,
        "started_at": w.started_at.isoformat(),
        "heartbeat_at": w.heartbeat_at.isoformat(),
        "heartbeat_age_seconds": round(w.silent_for(now), 3),
        "stopped_at": w.stopped_at.isoformat() if w.stopped_at else None,
        "status": w.status(now),
        "stale_after_seconds": w.stale_after(),
        "heartbeat_seconds": w.heartbeat_seconds,
        "lease_seconds": w.lease_seconds,
        "concurrency": w.concurrency,
        "rotations_held": held,
    }


def workers_report(store: Store, now: datetime) -> list[dict[str, Any]]:
    """Every registered worker (most recently started first), then any lease owner holding
    rotations without a worker row (an operator command, a worker from before registration)."""
    workers = store.list_workers()
    held = store.leases_held(now)
    rows = [worker_dict(w, held.get(w.owner, 0), now) for w in workers]
    known = {w.owner for w in workers}
    for owner in sorted(set(held) - known):
        rows.append(_unregistered(owner, held[owner]))
    return rows


def _unregistered(owner: str, held: int) -> dict[str, Any]:
    return {
        "owner": owner,
        "host": None,
        "pid": None,
        "started_at": None,
        "heartbeat_at": None,
        "heartbeat_age_seconds": None,
        "stopped_at": None,
        "status": "unregistered",
        "stale_after_seconds": None,
        "heartbeat_seconds": None,
        "lease_seconds": None,
        "concurrency": None,
        "rotations_held": held,
    }


def _cells(row: Mapping[str, Any]) -> list[str]:
    def when(key: str) -> str:
        value = row[key]
        return utc(datetime.fromisoformat(value)) if value else "-"

    age = row["heartbeat_age_seconds"]
    return [
        str(row["owner"]),
        str(row["host"] or "-"),
        str(row["pid"] or "-"),
        when("started_at"),
        when("heartbeat_at"),
        _age(age) if age is not None else "-",
        str(row["status"]),
        str(row["rotations_held"]),
    ]


def workers_table(rows: list[dict[str, Any]]) -> list[str]:
    """Plain aligned columns, never cut (ids stay whole when piped)."""
    cells = [list(COLUMNS), *(_cells(r) for r in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]


def mount(app: typer.Typer, out: Console) -> None:
    @app.command()
    def workers(
        as_json: Annotated[
            bool, typer.Option("--json", help="One object per worker (ISO 8601 times).")
        ] = False,
    ) -> None:
        """Worker processes: host, pid, start, last heartbeat, live/stale/stopped, leases held.

        A worker heartbeats every third of its lease; it is stale after two silent intervals
        (killed, frozen or cut off), stopped after a clean stop. Rows are pruned after a day."""
        from keyturn.cli import state

        w = state.wiring()
        rows = workers_report(w.store, w.clock.now())
        if as_json:
            from keyturn.cli.render import dump

            sys.stdout.write(dump(rows) + "\n")
            return
        if not rows:
            sys.stdout.write("no worker has registered; start one with `keyturn worker`\n")
            return
        for line in workers_table(rows):
            out.print(line, markup=False)
