"""The human-task policy's schedule (keyturn.domain.reminders): which reminders are due, how a
snooze postpones the next one and how many count, then_every, and the deadline."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from keyturn.domain.notify import NoticeKind, notices
from keyturn.domain.reminders import Reminders, Sent, decide, next_reminder, schedule

DAY = 86400.0
T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
DUE = T0 + timedelta(days=10)


def days(n: float) -> datetime:
    return T0 + timedelta(days=n)


def policy(**kw: object) -> Reminders:
    base: dict[str, object] = {"person": "alice", "due": DUE, "before": (7 * DAY, DAY)}
    return Reminders(**{**base, **kw})  # type: ignore[arg-type]


def run(r: Reminders, checks: list[float]) -> list[tuple[float, int]]:
    """Check at each of these days; the (day, reminder number) of each reminder sent."""
    sent = Sent()
    out = []
    for d in checks:
        decision = decide(r, T0, sent, days(d))
        if decision.remind:
            sent = Sent(sent.count + 1, days(d), r.snoozes_counted, sent.escalated)
            out.append((d, sent.count))
    return out


def test_the_schedule_is_the_offsets_before_due_then_every_until_due() -> None:
    assert schedule(policy(), T0) == [days(3), days(9)]
    every = schedule(policy(before=(7 * DAY, 3 * DAY), then_every=DAY), T0)
    assert every == [days(3), days(7), days(8), days(9)]
    # no offsets: every N from the wait's start; nothing at or past due
    assert schedule(policy(before=(), then_every=4 * DAY), T0) == [days(4), days(8)]
    # offsets before the wait began are not reminders (the invitation was just sent)
    assert schedule(policy(), days(5)) == [days(9)]


def test_which_are_due_one_event_however_many_passed() -> None:
    r = policy(before=(7 * DAY, 3 * DAY), then_every=DAY)
    assert run(r, [1, 2, 2.99, 3.0, 3.5, 6.9, 7.01, 8.0, 9.2, 9.9]) == [
        (3.0, 1),
        (7.01, 2),
        (8.0, 3),
        (9.2, 4),
    ]
    # a worker down from day 2 to day 8.5: one reminder then, not four
    assert run(r, [2, 8.5, 8.9, 9.1]) == [(8.5, 1), (9.1, 2)]
    # the next check is at the next reminder, never past due
    d = decide(r, T0, Sent(), days(1))
    assert not d.remind and d.next_at == days(3)
    d = decide(r, T0, Sent(4, days(9.2), 0), days(9.5))
    assert not d.remind and d.next_at == DUE


def test_a_snooze_postpones_the_next_reminder_and_the_limit_holds() -> None:
    half = DAY / 2
    one = policy(snoozes=2, snooze_seconds=half, snoozed=1)
    after_first = Sent(1, days(3), 0)
    assert next_reminder(one, T0, after_first) == days(9.5)
    # three snoozes used, two allowed: postponed by two only
    three = policy(snoozes=2, snooze_seconds=half, snoozed=3)
    assert three.snoozes_counted == 2
    assert next_reminder(policy(snoozes=2, snooze_seconds=DAY / 4, snoozed=3), T0, after_first) == (
        days(9.5)
    )
    # a snooze already counted at the last reminder postpones nothing more
    assert next_reminder(one, T0, Sent(1, days(3), 1)) == days(9)
    # postponed to or past due: no more reminders, the deadline is next
    assert next_reminder(three, T0, after_first) is None
    assert decide(three, T0, after_first, days(9.6)).next_at == DUE
    # snoozes before the first reminder postpone it
    assert next_reminder(policy(snoozes=3, snooze_seconds=DAY, snoozed=1), T0, Sent()) == days(4)


def test_at_due_escalate_once_and_say_overdue() -> None:
    r = policy(on_due="report")
    d = decide(r, T0, Sent(2, days(9), 0), DUE)
    assert d.overdue and d.escalate and not d.remind and d.next_at is None
    assert not decide(r, T0, Sent(2, days(9), 0, escalated=True), days(11)).escalate
    assert not decide(policy(escalate=False), T0, Sent(), DUE).escalate


def test_reminder_events_become_person_notices_with_the_schedule_time() -> None:
    from keyturn.domain.lifecycle import State
    from keyturn.domain.model import Event, Rotation

    rotation = Rotation(
        id="rot_1",
        credential="c1",
        kind="k",
        state=State.NEW_ADDED,
        version=3,
        reason="r",
        created_at=T0,
        updated_at=T0,
    )
    at = days(3).isoformat()
    events = [
        Event(
            "rot_1",
            T0,
            "run",
            "w1",
            detail={
                "status": status,
                "to": "alice",
                "due": DUE.isoformat(),
                "link_ref": "sec_1",
                "at": at,
                "reminder": 1,
            },
        )
        for status in ("reminder", "escalated", "user_task")
    ]
    found = notices(events, rotation)
    assert [n.kind for n in found] == [
        NoticeKind.REMINDER,
        NoticeKind.ESCALATED,
        NoticeKind.USER_TASK,
    ]
    payload = found[0].payload()
    assert payload["at"] == at and payload["to"] == "alice" and payload["link_ref"] == "sec_1"
    assert payload["due"] == DUE.isoformat() and not payload["opens"]
    assert "link" not in payload


def test_attention_a_person_task_only_once_overdue() -> None:
    from dataclasses import replace

    from keyturn.domain.lifecycle import State
    from keyturn.domain.model import Rotation
    from keyturn.engine.attention import attention, status_key

    r = Rotation("rot_1", "c1", "k", State.VERIFIED, 3, "r", T0, T0)
    waiting = replace(
        r, wait_key="forward.approve:person", wait_for="alice to act", wait_since=T0,
        wait_deadline=DUE,
    )  # fmt: skip
    assert attention(waiting, days(8)) is None  # past half: its reminders follow it up
    words = "overdue: alice did not act by 2026-12-11T09:00:00+00:00"
    overdue = replace(waiting, wait_key="forward.approve:overdue", wait_for=words)
    assert attention(overdue, days(1)) == words  # whatever the clock reading it says
    assert status_key(overdue) == "waiting"
    plain = replace(waiting, wait_key="forward.bake")
    assert attention(plain, days(8)) == "waiting past half its deadline"
