"""`keyturn notifications`: what the outbox sent where, each attempt, and a delivery loop of its
own (`deliver`) for a host that runs no worker and no `keyturn serve`."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from keyturn.domain.errors import KeyturnError

app = typer.Typer(
    help="Notifications: the outbox's deliveries to the configured sinks, and their attempts.",
    no_args_is_help=True,
    add_completion=False,
)

STATUSES = ("pending", "firing", "sent", "resolved", "superseded", "failed")


def _delivery_dict(d: Any, attempts: list[Any]) -> dict[str, Any]:
    def iso(dt: Any) -> str | None:
        return dt.isoformat() if dt is not None else None

    return {
        "id": d.id,
        "notification_id": d.notification_id,
        "sink": d.sink,
        "kind": d.kind,
        "rotation_id": d.rotation_id,
        "credential": d.payload.get("credential"),
        "status": d.status,
        "attempts": d.attempts,
        "created_at": iso(d.created_at),
        "first_attempt_at": iso(d.first_attempt_at),
        "last_attempt_at": iso(d.last_attempt_at),
        "sent_at": iso(d.sent_at),
        "next_attempt_at": iso(d.next_attempt_at),
        "last_status_code": d.last_status_code,
        "last_error": d.last_error,
        "summary": d.payload.get("summary"),
        "attempt_log": [
            {
                "at": iso(a.at),
                "owner": a.owner,
                "outcome": a.outcome,
                "status_code": a.status_code,
                "error": a.error,
                "duration_ms": a.duration_ms,
            }
            for a in attempts
        ],
    }


def _print_table(found: list[Any], log: dict[int, list[Any]], *, attempts: bool) -> None:
    from keyturn.cli.render import when

    header = ("id", "sink", "kind", "rotation", "status", "tries", "last", "sent / next")
    rows = []
    for d in found:
        last = "-"
        if d.last_status_code is not None or d.last_error:
            last = str(d.last_status_code) if d.last_status_code is not None else "error"
        if d.status in ("sent", "resolved", "superseded"):
            later = when(d.sent_at)
        elif d.status in ("pending", "firing"):
            later = "next " + when(d.next_attempt_at)
        else:
            later = "-"
        rows.append((str(d.id), d.sink, d.kind, d.rotation_id, d.status, str(d.attempts), last,
                     later))  # fmt: skip
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r, d in zip([header, *rows], [None, *found], strict=True):
        sys.stdout.write("  ".join(v.ljust(widths[i]) for i, v in enumerate(r)).rstrip() + "\n")
        if d is not None and d.status == "failed" and d.last_error:
            sys.stdout.write(f"    error: {d.last_error}\n")
        if d is not None and attempts:
            for a in log.get(d.id, []):
                code = f" HTTP {a.status_code}" if a.status_code is not None else ""
                error = f": {a.error}" if a.error else ""
                sys.stdout.write(
                    f"    {when(a.at)}  {a.outcome}{code}{error} ({a.duration_ms} ms)\n"
                )


@app.command("list")
def list_command(
    rotation: Annotated[
        str | None, typer.Option("--rotation", help="Only this rotation's (id or unique prefix).")
    ] = None,
    status: Annotated[
        str | None, typer.Option("--status", help="Only this status: " + ", ".join(STATUSES) + ".")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", help="At most this many, newest first.")] = 50,
    attempts: Annotated[
        bool, typer.Option("--attempts", help="Also each attempt (time, outcome, HTTP status).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One object per delivery.")] = False,
) -> None:
    """Deliveries, newest first: sink, kind, rotation, status, attempts, the last HTTP status
    and error (sink secrets redacted), and the next attempt."""
    from keyturn.cli import _resolve_id, state
    from keyturn.cli.render import dump

    if status is not None and status not in STATUSES:
        raise KeyturnError(f"--status {status!r} is not a delivery status; use one of "
                           + ", ".join(STATUSES))  # fmt: skip
    if limit < 1:
        raise KeyturnError("--limit must be at least 1")
    w = state.wiring()
    rid = _resolve_id(w.store, rotation) if rotation is not None else None
    found = w.outbox.deliveries(rotation_id=rid, status=status, limit=limit)
    log = w.outbox.attempts([d.id for d in found]) if (attempts or as_json) else {}
    if as_json:
        sys.stdout.write(dump([_delivery_dict(d, log.get(d.id, [])) for d in found]) + "\n")
        return
    if not found:
        sys.stdout.write("no notification deliveries" + (" match" if rid or status else "") + "\n")
        return
    _print_table(found, log, attempts=attempts)


@app.command("deliver")
def deliver_command(
    until_drained: Annotated[
        bool,
        typer.Option(
            "--until-drained", help="Exit 0 once nothing is left to send (no pending delivery)."
        ),
    ] = False,
    timeout: Annotated[
        float, typer.Option("--timeout", help="With --until-drained: give up after this long.")
    ] = 300.0,
) -> None:
    """Deliver the outbox to the configured sinks (what every worker and `keyturn serve` do
    already); SIGTERM/SIGINT stop it."""
    import asyncio
    import signal
    import time

    from keyturn.cli import state
    from keyturn.engine.run import db
    from keyturn.engine.worker import default_owner

    w = state.wiring()
    notifier = w.deliverer(f"deliver:{default_owner()}")
    if notifier is None:
        raise KeyturnError(
            "no notification sinks are configured; add [notifications.sinks.NAME] tables to "
            "the configuration"
        )
    stopping = asyncio.Event()

    async def go() -> bool:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        if not until_drained:
            await notifier.run(stopping)
            await notifier.aclose()
            return True
        deadline = time.monotonic() + timeout
        try:
            while not stopping.is_set() and time.monotonic() < deadline:
                if not await notifier.round():
                    if not await db(w.outbox.pending_notifications):
                        return True
                    await asyncio.sleep(notifier.settings.poll_seconds)
            return stopping.is_set()
        finally:
            await notifier.aclose()

    if not asyncio.run(go()):
        left = w.outbox.pending_notifications()
        raise KeyturnError(
            f"{left} notification(s) still to send after {timeout:g} s; see "
            "`keyturn notifications list --status pending --attempts`"
        )
