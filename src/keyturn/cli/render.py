"""Human and JSON renderings of rotations, events and credentials (never secrets)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from keyturn.domain.errors import KeyturnError
from keyturn.domain.model import ActionRecord, Event, ManagedCredential, Rotation
from keyturn.engine.registry import discovered


def _iso(dt: datetime | None) -> str | None:
    return dt.isoformat() if dt else None


def _clock(dt: datetime, *, with_date: bool) -> str:
    """UTC time of day as ``10:02:11Z`` (the timeline's clock, to the second); with the date
    in front when the times it is shown with fall on different days."""
    utc = dt.astimezone(UTC)
    return utc.strftime("%Y-%m-%d %H:%M:%SZ" if with_date else "%H:%M:%SZ")


def _one_line(words: str | None) -> str:
    return " ".join(str(words).split())


def waiting_of(r: Rotation) -> str:
    """``waiting for X since T, deadline D`` (one line): what a waiting rotation waits for."""
    what = _one_line(r.wait_for)
    times = [t for t in (r.wait_since, r.wait_deadline) if t is not None]
    with_date = len({t.astimezone(UTC).date() for t in times}) > 1
    text = f"waiting for {what}"
    if r.wait_since is not None:
        text += f" since {_clock(r.wait_since, with_date=with_date)}"
    if r.wait_deadline is not None:
        text += f", deadline {_clock(r.wait_deadline, with_date=with_date)}"
    return text


def rotation_dict(r: Rotation) -> dict[str, Any]:
    return {
        "id": r.id,
        "credential": r.credential,
        "kind": r.kind,
        "state": r.state.value,
        "version": r.version,
        "reason": r.reason,
        "created_at": _iso(r.created_at),
        "updated_at": _iso(r.updated_at),
        "finished_at": _iso(r.finished_at),
        "next_attempt_at": _iso(r.next_attempt_at),
        "lease": {"owner": r.lease_owner, "expires_at": _iso(r.lease_expires_at)}
        if r.lease_owner
        else None,
        "attempts": r.attempts,
        "last_error": r.last_error,
        "halted_reason": r.halted_reason,
        "paused": r.paused,
        "request": {
            "action": r.request.action.value,
            "actor": r.request.actor,
            "reason": r.request.reason,
            "at": _iso(r.request.at),
        }
        if r.request
        else None,
        "rollback_from": r.rollback_from.value if r.rollback_from else None,
        "wait_key": r.wait_key,
        "wait_for": r.wait_for,
        "wait_since": _iso(r.wait_since),
        "wait_deadline": _iso(r.wait_deadline),
        **identities(r),
    }


def identities(r: Rotation) -> dict[str, str | None]:
    """The old and new side's provider ids, as the rotation's kind names them ({} when the
    kind is not installed here)."""
    try:
        kind = discovered().kind(r.kind)
        return kind.identities(kind.data_model.model_validate(r.data))
    except (KeyturnError, ValueError):
        return {}


def event_dict(e: Event) -> dict[str, Any]:
    return {
        "at": _iso(e.at),
        "kind": e.kind,
        "actor": e.actor,
        "from": e.from_state,
        "to": e.to_state,
        "trigger": e.trigger,
        "reason": e.reason,
        "detail": e.detail,
    }


def action_dict(a: ActionRecord) -> dict[str, Any]:
    return {
        "phase": a.phase.value,
        "name": a.name,
        "status": a.status.value,
        "attempts": a.attempts,
        "intent_at": _iso(a.intent_at),
        "outcome_at": _iso(a.outcome_at),
        "error": a.error,
    }


def credential_dict(c: ManagedCredential) -> dict[str, Any]:
    return {
        "name": c.name,
        "kind": c.kind,
        "provider": c.provider,
        "credential_id": c.credential_id,
        "credential_uuid": c.credential_uuid,
        "algorithm": c.algorithm,
        "updated_at": _iso(c.updated_at),
    }


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=str)


def status_of(r: Rotation) -> str:
    if r.request:
        return f"{r.request.action.value} requested"
    if r.paused:
        return "paused"
    if r.halted_reason:
        return "HALTED"
    if r.finished:
        return "done"
    if r.wait_for is not None:
        # Also while a worker holds it for a check: the wait is what on-call wants to see.
        return waiting_of(r)
    if r.lease_owner:
        return "running"
    if r.attempts:
        return f"retrying ({r.attempts})"
    return "due"


def rotations_table(rotations: list[Rotation]) -> Table:
    table = Table(box=None, header_style="bold")
    for col in ("id", "credential", "state", "status", "attempts", "updated"):
        # A long status (a wait's words) wraps inside its own column, which never gets narrower
        # than a word or two; ids, states and times are never wrapped.
        table.add_column(
            col,
            no_wrap=col in ("id", "state", "updated"),
            overflow="fold",
            min_width=10 if col == "status" else None,
        )
    for r in rotations:
        table.add_row(
            r.id,
            r.credential,
            r.state.value,
            Text(status_of(r)),  # the engine's words, never read as rich markup
            str(r.attempts),
            r.updated_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
    return table


def timeline_table(events: list[Event]) -> Table:
    table = Table(box=None, header_style="bold")
    for col in ("at", "kind", "change", "actor", "reason"):
        table.add_column(col)
    for e in events:
        if e.kind == "transition":
            change = f"{e.from_state} -> {e.to_state} ({e.trigger})"
        else:
            status = e.detail.get("status", "")
            change = f"{e.trigger} {status}".strip()
        table.add_row(e.at.strftime("%H:%M:%S.%f")[:-3], e.kind, change, e.actor, e.reason or "")
    return table


def show_rotation(
    console: Console,
    r: Rotation,
    events: list[Event],
    actions: list[ActionRecord],
    *,
    lease: list[str] | None = None,
) -> None:
    """`lease`: the lease lines with the holder's liveness (keyturn.cli.liveness), if known."""
    console.print(f"[bold]{r.id}[/bold]  credential {r.credential} ({r.kind})")
    console.print(
        f"  state      {r.state.value}   status {status_of(r)}   version {r.version}", markup=False
    )
    console.print(f"  reason     {r.reason}")
    for key, ident in identities(r).items():
        if ident:
            console.print(f"  {key.split('_')[0]:<10} {ident}")
    if lease is not None:
        for line in lease:
            console.print(line, markup=False)
    else:
        held = f"{r.lease_owner} until {_iso(r.lease_expires_at)}" if r.lease_owner else "none"
        console.print(f"  lease      {held}")
    if r.wait_for is not None:
        # While waiting, next_attempt_at is the next check, which is not an attempt.
        since, deadline = _iso(r.wait_since) or "-", _iso(r.wait_deadline) or "-"
        console.print(
            f"  waiting    for {_one_line(r.wait_for)} ({r.wait_key or '-'}) since {since}, "
            f"deadline {deadline}, next check {_iso(r.next_attempt_at) or '-'}",
            markup=False,
        )
        console.print(f"  attempts   {r.attempts}")
    else:
        console.print(f"  attempts   {r.attempts}   next attempt {_iso(r.next_attempt_at) or '-'}")
    if r.last_error:
        console.print(f"  last error {r.last_error}", markup=False)
    if r.halted_reason:
        console.print(f"  [red]halted[/red]     {r.halted_reason}")
    if r.request:
        console.print(
            f"  request    {r.request.action.value} by {r.request.actor}: {r.request.reason}"
        )
    if actions:
        console.print("  actions:")
        for a in actions:
            console.print(f"    {a.phase.value}.{a.name}: {a.status.value} (attempts {a.attempts})")
    console.print("  timeline:")
    console.print(timeline_table(events))
