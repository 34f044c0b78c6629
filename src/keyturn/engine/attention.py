"""What "needs attention" means, and a rotation's status in one word: one definition for the
CLI (`rotations list --attention`, `--status`), the HTTP API and later the dashboard."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta

from keyturn.domain.model import Rotation
from keyturn.domain.reminders import OVERDUE_SUFFIX, PERSON_SUFFIX

#: An operator request not applied after this long needs a look (no worker, or one stuck).
REQUEST_STALE = timedelta(minutes=5)


def attention(r: Rotation, now: datetime) -> str | None:
    """Why this rotation needs a human now, in a few words; None when it does not."""
    if r.finished:
        return None
    if r.halted_reason:
        return "halted"
    if awaiting_approval(r):
        return "awaiting approval"
    if r.lease_owner and r.lease_expires_at is not None and r.lease_expires_at < now:
        return f"holder {r.lease_owner} lost (its lease expired)"
    if r.request is not None and now - r.request.at > REQUEST_STALE:
        return f"{r.request.action.value} requested and not applied yet"
    if overdue(r):
        # a person's task past its deadline, reported and left waiting (its old side active)
        words = r.wait_for or ""
        return words if words.startswith("overdue: ") else "overdue: the person did not act"
    # a person's task before its deadline is followed up by its reminders, not by on-call
    person = (r.wait_key or "").endswith(PERSON_SUFFIX)
    waiting = r.wait_since is not None and r.wait_deadline is not None and not person
    if waiting and now - r.wait_since > (r.wait_deadline - r.wait_since) / 2:  # type: ignore[operator]
        return "waiting past half its deadline"
    if r.attempts > 0:
        return f"retrying (attempt {r.attempts})"
    return None


STATUSES = (
    "halted",
    "paused",
    "requested",
    "awaiting_approval",
    "waiting",
    "running",
    "retrying",
    "due",
    "done",
)


def overdue(r: Rotation) -> bool:
    """Waiting on a person past their task's deadline (``on_due = "report"``)."""
    return (r.wait_key or "").endswith(OVERDUE_SUFFIX) and not r.finished


def awaiting_approval(r: Rotation) -> bool:
    """Waiting at an approval gate (its policy's `approval`) for `approve` or `deny`."""
    return (r.wait_key or "").startswith("gate.approval") and not r.finished


def status_key(r: Rotation) -> str:
    """The status in one word (what `rotations list --status` filters on)."""
    if r.request:
        return "requested"
    if r.paused:
        return "paused"
    if r.halted_reason:
        return "halted"
    if r.finished:
        return "done"
    if awaiting_approval(r):
        return "awaiting_approval"
    if r.wait_for is not None:
        return "waiting"
    if r.lease_owner:
        return "running"
    if r.attempts:
        return "retrying"
    return "due"


#: Statuses a worker moves a rotation between as it claims, works on and releases it (its
#: claim, a failed attempt, its next try): one "in progress" to an operator deciding a verb.
WORKER_STATUSES = frozenset({"running", "retrying", "due"})


def decision_status(r: Rotation) -> str:
    """The status as far as an operator's decision goes: what `revision` hashes. The worker's
    own comings and goings (running, retrying, due: a claim, a release, a failed attempt) are
    one "in_progress"; halted, paused, requested, awaiting approval, waiting and done each
    stand for themselves."""
    status = status_key(r)
    return "in_progress" if status in WORKER_STATUSES else status


def revision(r: Rotation) -> str:
    """What an HTTP ``If-Match`` names: a hash of what an operator decides on: the state, the
    status (:func:`decision_status`), the halted reason and the pending request. A worker's
    claims and releases, lease renewals, action commits, attempts and wait checks do not
    change it; the version (the fencing token) changes with every write."""
    request = r.request
    facts = [
        r.state.value,
        decision_status(r),
        r.halted_reason,
        [request.action.value, request.actor, request.reason, request.at.isoformat()]
        if request is not None
        else None,
    ]
    digest = hashlib.sha256(json.dumps(facts, separators=(",", ":")).encode()).hexdigest()
    return digest[:20]
