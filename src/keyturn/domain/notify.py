"""Which events reach on-call: the one mapping from a rotation's events to notifications.

The store calls :func:`notices` on the events of every commit and writes what it returns to the
outbox in the same transaction as the events (so a notification exists exactly when its event
does). Pure: no I/O; the payload holds what the event and the rotation hold, which never
includes secret material.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from keyturn.domain.lifecycle import State
from keyturn.domain.model import Event, Rotation


class NoticeKind(StrEnum):
    #: The rotation stopped for a human: retry budget spent, a step not safe to retry, a
    #: wait past its deadline, an internal error.
    HALTED = "halted"
    #: Its lease expired and no worker took it over (every worker dead, or none can claim it).
    HOLDER_LOST = "holder_lost"
    #: Waiting at an approval gate for `approve` or `deny`.
    AWAITING_APPROVAL = "awaiting_approval"
    #: Waiting for holders' probes, a window, a bake time or a person.
    WAITING = "waiting"
    ROLLED_BACK = "rolled_back"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    #: A person is asked to act (a kind's first invitation: an action outcome asked for it).
    USER_TASK = "user_task"
    #: A person is reminded of a task not done yet (a wait's ``Reminders``).
    REMINDER = "reminder"
    #: A person did not act by the task's deadline (for the owner's sink).
    ESCALATED = "escalated"


#: Kinds that open something on a paging sink (an Alertmanager alert, a PagerDuty incident).
OPENING: frozenset[NoticeKind] = frozenset(
    {
        NoticeKind.HALTED,
        NoticeKind.HOLDER_LOST,
        NoticeKind.AWAITING_APPROVAL,
        NoticeKind.WAITING,
    }
)
#: Kinds that end the rotation, and so resolve what it opened.
RESOLVING: frozenset[NoticeKind] = frozenset(
    {NoticeKind.COMPLETED, NoticeKind.ROLLED_BACK, NoticeKind.CANCELLED}
)

_FINISHED = {
    State.OLD_DEACTIVATED.value: NoticeKind.COMPLETED,
    State.ROLLED_BACK.value: NoticeKind.ROLLED_BACK,
    State.CANCELLED.value: NoticeKind.CANCELLED,
}
_RUN_STATUS = {
    "halted": NoticeKind.HALTED,
    "holder_lost": NoticeKind.HOLDER_LOST,
    "awaiting_approval": NoticeKind.AWAITING_APPROVAL,
    "waiting": NoticeKind.WAITING,
    "user_task": NoticeKind.USER_TASK,
    "reminder": NoticeKind.REMINDER,
    "escalated": NoticeKind.ESCALATED,
}
#: Kinds addressed to a person (their payload names them in ``to`` and may carry a link):
#: a sink takes them only when its ``events`` names them.
PERSONAL: frozenset[NoticeKind] = frozenset({NoticeKind.USER_TASK, NoticeKind.REMINDER})
#: Kinds about a person's task: ``at`` is the schedule's time of the event.
_PERSON = PERSONAL | {NoticeKind.ESCALATED}
_WORDS = {
    NoticeKind.HALTED: "halted",
    NoticeKind.HOLDER_LOST: "lost its holder",
    NoticeKind.AWAITING_APPROVAL: "awaits approval",
    NoticeKind.WAITING: "is waiting",
    NoticeKind.ROLLED_BACK: "rolled back",
    NoticeKind.COMPLETED: "completed",
    NoticeKind.CANCELLED: "was cancelled",
    NoticeKind.USER_TASK: "asks a person to act",
    NoticeKind.REMINDER: "reminds a person",
    NoticeKind.ESCALATED: "is escalated",
}
#: Event detail keys copied into a notification (bounded, never free-form material).
_DETAIL_KEYS = ("attempt", "retryable", "wait", "deadline", "from", "holder_last_seen")
#: And for a person's task (``link_ref`` is a secret's id: the deliverer opens it at send time
#: and only what the sink receives holds the link).
_PERSON_KEYS = (
    "to", "due", "link_ref", "reminder", "scheduled", "snoozed", "action", "at", "task",
)  # fmt: skip


@dataclass(frozen=True)
class Notice:
    """One notification, as written to the outbox."""

    kind: NoticeKind
    rotation_id: str
    credential: str
    credential_kind: str
    state: str
    at: datetime
    summary: str
    reason: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    #: At most one notification with this key is ever written (None: no such limit).
    key: str | None = None

    @property
    def opens(self) -> bool:
        return self.kind in OPENING

    @property
    def resolves(self) -> bool:
        return self.kind in RESOLVING

    def payload(self) -> dict[str, Any]:
        """The JSON document stored in the outbox and sent (wrapped) to every sink. A person's
        notice also names them (``to``) and its task's deadline (``due``); its ``link_ref`` is
        replaced by ``link`` in what a sink receives."""
        extra: dict[str, Any] = {}
        if self.kind in _PERSON:
            extra = {k: self.detail.get(k) for k in ("to", "due", "link_ref")}
        return {
            **extra,
            "kind": self.kind.value,
            "rotation_id": self.rotation_id,
            "credential": self.credential,
            "credential_kind": self.credential_kind,
            "state": self.state,
            "at": self.at.isoformat(),
            "summary": self.summary,
            "reason": self.reason,
            "opens": self.opens,
            "resolves": self.resolves,
            "detail": dict(self.detail),
        }


def notice_kind(event: Event) -> NoticeKind | None:
    """The notification an event causes, if any."""
    if event.kind == "transition" and event.to_state in _FINISHED:
        return _FINISHED[event.to_state]
    if event.kind == "run":
        return _RUN_STATUS.get(str(event.detail.get("status", "")))
    return None


def notice_for(event: Event, rotation: Rotation, *, key: str | None = None) -> Notice | None:
    """The notification of `event`, with `rotation` as it is after the commit; None for the
    events nobody is told about (actions, operator requests, retries, lease takeovers)."""
    kind = notice_kind(event)
    if kind is None:
        return None
    reason = event.reason
    if kind is NoticeKind.HALTED and rotation.halted_reason:
        reason = rotation.halted_reason  # the error and what to do about it
    state = event.to_state or rotation.state.value
    summary = (
        f"keyturn: rotation {rotation.id} of {rotation.credential} ({rotation.kind}) "
        f"{_WORDS[kind]} in state {state}"
    )
    if reason and kind is not NoticeKind.COMPLETED:
        summary += f": {reason}"
    keys = _DETAIL_KEYS + _PERSON_KEYS if kind in _PERSON else _DETAIL_KEYS
    detail = {k: event.detail[k] for k in keys if k in event.detail}
    at = event.at
    if kind in _PERSON and "at" in event.detail:
        at = datetime.fromisoformat(str(event.detail["at"]))  # the schedule's clock
    return Notice(
        kind=kind,
        rotation_id=rotation.id,
        credential=rotation.credential,
        credential_kind=rotation.kind,
        state=state,
        at=at,
        summary=summary[:1000],
        reason=reason,
        detail=detail,
        key=key,
    )


def notices(events: Iterable[Event], rotation: Rotation) -> list[Notice]:
    """The notifications of a commit's events (most commits: none)."""
    out = []
    for event in events:
        if event.kind not in ("transition", "run"):
            continue
        found = notice_for(event, rotation)
        if found is not None:
            out.append(found)
    return out
