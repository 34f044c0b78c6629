"""What "needs attention" means: one definition for the CLI (`rotations list --attention`),
and later the API and the dashboard."""

from __future__ import annotations

from datetime import datetime, timedelta

from keyturn.domain.model import Rotation

#: An operator request not applied after this long needs a look (no worker, or one stuck).
REQUEST_STALE = timedelta(minutes=5)


def attention(r: Rotation, now: datetime) -> str | None:
    """Why this rotation needs a human now, in a few words; None when it does not."""
    if r.finished:
        return None
    if r.halted_reason:
        return "halted"
    if (r.wait_key or "").startswith("gate.approval"):
        return "awaiting approval"
    if r.lease_owner and r.lease_expires_at is not None and r.lease_expires_at < now:
        return f"holder {r.lease_owner} lost (its lease expired)"
    if r.request is not None and now - r.request.at > REQUEST_STALE:
        return f"{r.request.action.value} requested and not applied yet"
    waiting = r.wait_since is not None and r.wait_deadline is not None
    if waiting and now - r.wait_since > (r.wait_deadline - r.wait_since) / 2:  # type: ignore[operator]
        return "waiting past half its deadline"
    if r.attempts > 0:
        return f"retrying (attempt {r.attempts})"
    return None
