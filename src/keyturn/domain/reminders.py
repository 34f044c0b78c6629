"""The human-task policy of a wait on a person: when to remind, how snoozes postpone, and what
happens at the task's deadline. Pure time arithmetic on the schedule's clock; the engine
(:mod:`keyturn.engine.steps`) records what was sent as events and asks this module what is due.

A reminder schedule is a list of instants before ``due``: one for each ``before`` offset, then
one every ``then_every`` seconds after the last (latest) of them, up to ``due`` (exclusive).
Instants before the wait began are not reminders (the first invitation was just sent). A
check sends at most one reminder, however many instants passed since the previous one (a
worker that was down does not send a burst). A snooze postpones the next reminder by
``snooze_seconds``; at most ``snoozes`` of them count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

OnDue = Literal["halt", "report"]

#: A wait key's suffix while it waits on a person before their task's deadline (reminders, not
#: the attention queue, follow it up), and once the deadline passed and it is reported.
PERSON_SUFFIX = ":person"
OVERDUE_SUFFIX = ":overdue"


@dataclass(frozen=True)
class Reminders:
    """What a wait on a person asks of the engine (``Wait.remind`` returns it).

    - ``person``: who is asked (a username; the notification's ``to``);
    - ``due``: the task's deadline on the schedule's clock (the wait's deadline too);
    - ``before``: seconds before ``due`` to remind (7 days, 1 day: ``(604800, 86400)``);
    - ``then_every``: after the last ``before`` offset, remind every this many seconds until
      ``due`` (None: no more);
    - ``snoozes``: snoozes allowed; ``snoozed``: how many the person used (the kind counts
      them from its evidence); ``snooze_seconds``: how much one postpones the next reminder;
    - ``escalate``: at ``due``, an escalation notice (for the owner's sink);
    - ``on_due``: ``"halt"``: the rotation halts for a human with the reason; ``"report"``: it
      is left waiting, overdue (in the attention queue), with no more reminders;
    - ``link_ref``: the id of a sealed secret (the person's link) the deliverer opens at send
      time and puts in what the sink receives as ``link``; never stored in clear.
    """

    person: str
    due: datetime
    before: Sequence[float] = ()
    then_every: float | None = None
    snoozes: int = 0
    snooze_seconds: float = 0.0
    snoozed: int = 0
    escalate: bool = True
    on_due: OnDue = "halt"
    link_ref: str | None = None

    @property
    def snoozes_counted(self) -> int:
        """The snoozes that postpone (the person's, up to the limit)."""
        return max(0, min(self.snoozed, self.snoozes))


@dataclass(frozen=True)
class Sent:
    """What the recorded reminder events of one wait say."""

    #: Reminders sent so far.
    count: int = 0
    #: The schedule time of the last one.
    last_at: datetime | None = None
    #: The snoozes counted when the last one was sent.
    snoozed: int = 0
    #: The escalation was sent.
    escalated: bool = False


def schedule(r: Reminders, since: datetime) -> list[datetime]:
    """The reminder instants of `r` for a wait that began at `since`, oldest first: each in
    (since, due)."""
    times = sorted({r.due - timedelta(seconds=b) for b in r.before if b > 0})
    if r.then_every is not None and r.then_every > 0:
        every = timedelta(seconds=r.then_every)
        at = (times[-1] if times else since) + every
        while at < r.due:
            times.append(at)
            at += every
    return [t for t in times if since < t < r.due]


def next_reminder(r: Reminders, since: datetime, sent: Sent) -> datetime | None:
    """When the next reminder is due (None: no more before `due`): the first instant of the
    schedule after the last reminder sent, postponed by the snoozes used since then."""
    after = sent.last_at if sent.last_at is not None else since
    upcoming = [t for t in schedule(r, since) if t > after]
    if not upcoming:
        return None
    at = upcoming[0]
    fresh = r.snoozes_counted - sent.snoozed
    if fresh > 0:
        at += timedelta(seconds=fresh * r.snooze_seconds)
    return at if at < r.due else None


@dataclass(frozen=True)
class Decision:
    """What one check of a waiting person's task does."""

    #: Send a reminder now (the one numbered ``sent.count + 1``).
    remind: bool
    #: Send the escalation now.
    escalate: bool
    #: The deadline passed.
    overdue: bool
    #: The next instant something is due (a reminder or the deadline); None once overdue.
    next_at: datetime | None
    #: The reminder instant that was due (when ``remind``).
    scheduled: datetime | None = None


def decide(r: Reminders, since: datetime, sent: Sent, now: datetime) -> Decision:
    """What to do at `now` (schedule time) for a wait that began at `since`."""
    if now >= r.due:
        return Decision(False, r.escalate and not sent.escalated, True, None)
    upcoming = next_reminder(r, since, sent)
    if upcoming is not None and upcoming <= now:
        # sent now: the instants up to now are covered; the next one is after now
        after = Sent(sent.count + 1, now, r.snoozes_counted, sent.escalated)
        following = next_reminder(r, since, after)
        return Decision(True, False, False, min(following or r.due, r.due), upcoming)
    return Decision(False, False, False, min(upcoming or r.due, r.due))


def overdue_words(person: str, due: datetime) -> str:
    return f"overdue: {person} did not act by {due.isoformat(timespec='seconds')}"
