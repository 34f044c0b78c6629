"""The installation at a glance, for ``/metrics``: the store's :class:`~keyturn.ports.FleetFacts`
turned into the numbers an alert is written on, with the engine's own definitions of a
rotation's status (:func:`keyturn.engine.attention.status_key`) and of "needs attention"
(:func:`keyturn.engine.attention.attention`). No metrics library here (see keyturn.web.metrics).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from keyturn.domain.model import OperatorAction, OperatorRequest, Rotation
from keyturn.engine.attention import attention, awaiting_approval
from keyturn.engine.attention import status_key as _status_key
from keyturn.ports import RotationGroup

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_REQUEST = OperatorRequest(OperatorAction.PAUSE, "", "", _EPOCH)


def group_status(group: RotationGroup) -> str:
    """The status (``status_key``) of every rotation of `group`: computed on a stand-in that
    has exactly the group's facts, so the one definition in engine.attention decides."""
    stand_in = Rotation(
        id="",
        credential="",
        kind="",
        state=group.state,
        version=0,
        reason="",
        created_at=_EPOCH,
        updated_at=_EPOCH,
        request=_REQUEST if group.requested else None,
        paused=group.paused,
        halted_reason="halted" if group.halted else None,
        wait_key=group.wait_key,
        wait_for="waiting" if group.waiting else None,
        lease_owner="holder" if group.leased else None,
        attempts=1 if group.retried else 0,
    )
    return _status_key(stand_in)


def by_state_and_status(groups: Iterable[RotationGroup]) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for g in groups:
        key = (g.state.value, group_status(g))
        out[key] = out.get(key, 0) + g.count
    return out


def attention_since(r: Rotation, now: datetime) -> datetime | None:
    """Since when `r` has needed attention (None: it does not now). Which rotations need it is
    attention()'s call; this says from when: the approval wait's start, the lease's expiry, the
    request's time, the wait's half-way point, or else (halted, retrying) its last change."""
    why = attention(r, now)
    if why is None:
        return None
    if why == "halted":
        return r.updated_at
    if why == "awaiting approval" and awaiting_approval(r):
        return r.wait_since or r.updated_at
    if why.startswith("holder ") and r.lease_expires_at is not None:
        return r.lease_expires_at
    if r.request is not None and why.endswith("requested and not applied yet"):
        return r.request.at
    if why.startswith("waiting") and r.wait_since is not None and r.wait_deadline is not None:
        return r.wait_since + (r.wait_deadline - r.wait_since) / 2
    return r.updated_at


@dataclass(frozen=True)
class AttentionSummary:
    count: int
    #: Seconds since the longest-standing item started needing attention (0 when none).
    oldest_age_seconds: float


def attention_summary(candidates: Iterable[Rotation], now: datetime) -> AttentionSummary:
    count, oldest = 0, None
    for r in candidates:
        since = attention_since(r, now)
        if since is None:
            continue
        count += 1
        oldest = since if oldest is None or since < oldest else oldest
    age = max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0
    return AttentionSummary(count, age)
