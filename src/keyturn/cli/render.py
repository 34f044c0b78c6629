"""Human and JSON renderings of rotations, events and credentials (never secrets)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

from keyturn.domain.errors import KeyturnError
from keyturn.domain.model import ActionRecord, Event, ManagedCredential, Rotation

# defined with "needs attention" (one definition for the CLI and the API), used by name here
from keyturn.engine.attention import STATUSES as STATUSES
from keyturn.engine.attention import awaiting_approval
from keyturn.engine.attention import status_key as status_key
from keyturn.engine.registry import discovered

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table


class _LazyConsole:
    """A rich Console made at its first use: rich is a tenth of a read command's start-up, and
    output to a pipe (plain columns, JSON) never needs it."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console: Console | None = None

    def real(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real(), name)

    def __enter__(self) -> Console:  # special methods are not found through __getattr__
        return self.real().__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.real().__exit__(*exc)


def real_console(console: Console) -> Console:
    """The rich Console itself (for rich's own machinery, such as a Live display)."""
    return console.real() if isinstance(console, _LazyConsole) else console


def lazy_console(**options: Any) -> Console:
    """A stand-in for ``Console(**options)`` that imports rich when first used."""
    return cast("Console", _LazyConsole(**options))


def _iso(dt: datetime | None) -> str | None:
    return dt.isoformat() if dt else None


def when(dt: datetime | None, *, local: bool = False) -> str:
    """The one time format of human output: to the second, marked (UTC unless `local`)."""
    if dt is None:
        return "-"
    if local:
        return dt.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    return dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _one_line(words: str | None) -> str:
    return " ".join(str(words).split())


def waiting_of(r: Rotation) -> str:
    """``waiting for X since T, deadline D`` (one line): what a waiting rotation waits for."""
    head = "awaiting approval: " if awaiting_approval(r) else "waiting for "
    text = f"{head}{_one_line(r.wait_for)}"
    if r.wait_since is not None:
        text += f" since {when(r.wait_since)}"
    if r.wait_deadline is not None:
        text += f", deadline {when(r.wait_deadline)}"
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
        "campaign": r.campaign,
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


def show_document(store: Any, r: Rotation, lease_seconds: float | None = None) -> dict[str, Any]:
    """What `rotations show --json` prints: every field the table shows, and more."""
    from keyturn.cli.liveness import LeaseView
    from keyturn.engine.attention import attention

    return {
        **rotation_dict(r),
        "status": status_key(r),
        "status_text": status_of(r),
        "attention": attention(r, datetime.now(UTC)),
        "lease": LeaseView.of(store, r, lease_seconds).as_dict(),
        "actions": [action_dict(a) for a in store.actions(r.id)],
        "events": [event_dict(e) for e in store.events(r.id)],
    }


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=str)


SHORT_ID = 12  # "rot_" and 8 hex digits: what a terminal shows without --wide


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
        expired = r.lease_expires_at is not None and r.lease_expires_at < datetime.now(UTC)
        return "running (lease expired: holder lost)" if expired else "running"
    if r.attempts:
        return f"retrying ({r.attempts})"
    return "due"


ROTATION_COLUMNS = ("id", "credential", "state", "status", "attempts", "updated")


def rotation_row(r: Rotation, *, short: bool, local: bool) -> tuple[str, ...]:
    return (
        r.id[:SHORT_ID] if short else r.id,
        r.credential,
        r.state.value,
        status_of(r),
        str(r.attempts),
        when(r.updated_at, local=local),
    )


def rotations_table(
    rotations: list[Rotation], *, short: bool = False, local: bool = False
) -> Table:
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, header_style="bold", pad_edge=False, padding=(0, 2, 0, 0))
    for col in ROTATION_COLUMNS:
        # A long status (a wait's words) wraps inside its own column, which never gets narrower
        # than a word or two; ids, states and times are never wrapped.
        table.add_column(
            col,
            no_wrap=col in ("id", "credential", "state", "updated"),
            overflow="fold",
            min_width=8 if col == "status" else None,
        )
    for r in rotations:
        row = rotation_row(r, short=short, local=local)
        # the engine's words, never read as rich markup
        table.add_row(*row[:3], Text(row[3]), *row[4:])
    return table


PLAIN_COLUMNS = ("id", "credential", "state", "status", "attempts", "updated", "detail")


def plain_rotations(rotations: list[Rotation]) -> str:
    """The list for a pipe: every id whole, one word per column (the status as one word, the
    time as ISO 8601 in UTC) and the status's words last, so `awk '{print $1}'` gives ids and
    `awk '{print $4}'` statuses."""
    rows = [
        (
            r.id,
            r.credential,
            r.state.value,
            status_key(r),
            str(r.attempts),
            r.updated_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            _one_line(status_of(r)),
        )
        for r in rotations
    ]
    widths = [max([len(PLAIN_COLUMNS[i]), *(len(r[i]) for r in rows)]) for i in range(6)]
    return "\n".join(
        "  ".join(c.ljust(widths[i]) for i, c in enumerate(row[:6])) + "  " + row[6]
        for row in [PLAIN_COLUMNS, *rows]
    )


def _tokens(text: str) -> list[str]:
    """Words of a reason, a `quoted command` kept as one token (never broken)."""
    return [m.group(0) for m in re.finditer(r"`[^`]*`[^\s]*|\S+", text)]


def fold(text: str, width: int, indent: str) -> list[str]:
    """`text` in lines of at most `width` (longer only for one unbreakable token: an id, a
    command), each starting with `indent`."""
    lines: list[str] = []
    line = ""
    for token in _tokens(text):
        if line and len(indent) + len(line) + 1 + len(token) > width:
            lines.append(indent + line)
            line = token
        else:
            line = f"{line} {token}" if line else token
    if line:
        lines.append(indent + line)
    return lines


def event_change(e: Event) -> str:
    if e.kind == "transition":
        return f"{e.from_state} -> {e.to_state} ({e.trigger})"
    status = e.detail.get("status", "")
    return f"{e.trigger} {status}".strip()


def print_timeline(console: Console, events: list[Event], *, local: bool = False) -> None:
    """One row per event (time, kind, change, actor); its reason folded under it."""
    width = max(60, console.width)
    rows = [(when(e.at, local=local), e.kind, event_change(e), e.actor) for e in events]
    widths = [max([0, *(len(r[i]) for r in rows)]) for i in range(3)]
    for e, row in zip(events, rows, strict=True):
        head = "    " + "  ".join(c.ljust(widths[i]) for i, c in enumerate(row[:3]))
        console.print(f"{head}  {row[3]}", markup=False, highlight=False, soft_wrap=True)
        if e.reason:
            for line in fold(_one_line(e.reason), width, " " * 6):
                console.print(line, markup=False, highlight=False, soft_wrap=True)


def _print_actions(console: Console, actions: list[ActionRecord]) -> None:
    if not actions:
        return
    console.print("  actions:")
    for a in actions:
        console.print(
            f"    {a.phase.value}.{a.name}: {a.status.value} (attempts {a.attempts})",
            markup=False,
            highlight=False,
        )


def _plain_lease(r: Rotation, *, local: bool) -> list[str]:
    """The lease line when the holder's liveness is not known."""
    if not r.lease_owner:
        return ["  lease      none"]
    return [f"  lease      {r.lease_owner} until {when(r.lease_expires_at, local=local)}"]


def _attempts(r: Rotation, *, local: bool) -> str:
    stopped = r.halted_reason or r.paused or r.finished or r.next_attempt_at is None
    if r.wait_for is not None or stopped:
        return str(r.attempts)  # no next attempt: a check, a human, or nothing comes next
    return f"{r.attempts}   next attempt {when(r.next_attempt_at, local=local)}"


def show_rotation(
    console: Console,
    r: Rotation,
    events: list[Event],
    actions: list[ActionRecord],
    *,
    local: bool = False,
    lease: list[str] | None = None,
) -> None:
    """`lease`: the lease lines with the holder's liveness (keyturn.cli.liveness), if known."""

    def line(label: str, value: str) -> None:
        width = max(60, console.width)
        if 13 + len(value) <= width:
            console.print(f"  {label:<10} {value}", markup=False, highlight=False, soft_wrap=True)
            return
        folded = fold(value, width, " " * 13)
        first = folded[0][13:] if folded else ""
        console.print(f"  {label:<10} {first}", markup=False, highlight=False, soft_wrap=True)
        for more in folded[1:]:
            console.print(more, markup=False, highlight=False, soft_wrap=True)

    console.print(f"{r.id}  credential {r.credential} ({r.kind})", markup=False, style="bold")
    line("state", f"{r.state.value}   status {status_of(r)}   version {r.version}")
    line("reason", r.reason)
    for key, ident in identities(r).items():
        if ident:
            line(key.split("_")[0], ident)
    for text in lease if lease is not None else _plain_lease(r, local=local):
        console.print(text, markup=False, highlight=False, soft_wrap=True)
    if r.wait_for is not None:
        # While waiting, next_attempt_at is the next check, which is not an attempt.
        line(
            "waiting",
            f"for {_one_line(r.wait_for)} ({r.wait_key or '-'}) since "
            f"{when(r.wait_since, local=local)}, deadline {when(r.wait_deadline, local=local)}, "
            f"next check {when(r.next_attempt_at, local=local)}",
        )
    line("attempts", _attempts(r, local=local))
    if r.last_error:
        line("last error", _one_line(r.last_error))
    if r.halted_reason:
        line("HALTED", _one_line(r.halted_reason))
    if r.request:
        line("request", f"{r.request.action.value} by {r.request.actor}: {r.request.reason}")
    _print_actions(console, actions)
    console.print("  timeline:")
    print_timeline(console, events, local=local)


def age(seconds: float | None) -> str:
    """A duration in its largest unit: 45s, 12m, 5h, 91d."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"
