"""Rotation schedules: pure time arithmetic, no I/O.

A :class:`Policy` says when a credential is due (``every`` counted from its current key's
creation, a ``cron`` expression in a time zone, and/or ``max_age``), how young a key may be and
still be rotated (``min_age``), when a rotation may start and when the step that switches
something off may run (``windows``), how starts of one ``group`` are spread (``jitter``,
``stagger``), and what happens between ``verified`` and the switching off (``bake``,
``approval``). A :class:`Freeze` is a span of the shared calendar in which nothing starts and
nothing is switched off.

Every function here takes the time it reasons about as an argument (aware datetimes); none
reads a clock. The scheduler, ``keyturn plan`` and the tests call the same functions, so what
is planned is what fires.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

#: How far ahead the schedule looks for an allowed time before it calls a policy unsatisfiable.
HORIZON = timedelta(days=3 * 366)
_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

APPROVALS = ("none", "before_start", "before_deactivate")


class ScheduleError(ValueError):
    """A schedule that cannot work (an unknown zone, a cron that does not parse, ...)."""


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, IsADirectoryError):
        raise ScheduleError(
            f"unknown time zone {name!r}; use an IANA name such as UTC or Europe/Berlin"
        ) from None


def parse_duration(text: str) -> timedelta:
    """``90d``, ``12h``, ``30m``, ``45s``, ``2w`` or a combination (``1d12h``)."""
    units = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
    s = text.strip().lower()
    if not s:
        raise ScheduleError("empty duration; write it as 90d, 12h, 30m or 45s")
    total = 0.0
    number = ""
    for ch in s:
        if ch.isdigit() or ch == ".":
            number += ch
        elif ch in units and number:
            try:
                total += float(number) * units[ch]
            except ValueError:
                raise ScheduleError(f"duration {text!r} is not a number of units") from None
            number = ""
        else:
            raise ScheduleError(f"duration {text!r} does not parse; write it as 90d, 12h or 30m")
    if number:
        raise ScheduleError(f"duration {text!r} lacks a unit; write it as 90d, 12h, 30m or 45s")
    return timedelta(seconds=total)


def format_duration(d: timedelta) -> str:
    seconds = int(d.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


# ------------------------------------------------------------------------------------ windows


@dataclass(frozen=True)
class Window:
    """Weekdays (0 = Monday) and a daily span [start, end) of local time in `timezone`, in
    minutes after midnight (``end`` up to 1440). The span does not cross midnight: write two
    windows for a night."""

    days: frozenset[int]
    start: int
    end: int
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        if not self.days:
            raise ScheduleError("a window with no weekdays never opens; name at least one day")
        if not 0 <= self.start < self.end <= 1440:
            raise ScheduleError(
                "a window's hours must be START-END with START before END (e.g. 09:00-16:00); "
                "use two windows for a span across midnight"
            )
        zone(self.timezone)

    def contains(self, at: datetime) -> bool:
        local = at.astimezone(zone(self.timezone))
        minute = local.hour * 60 + local.minute + local.second / 60
        return local.weekday() in self.days and self.start <= minute < self.end

    def opens(self, day: date) -> list[datetime]:
        """The instants (UTC) this window may open on the local `day` (both readings of an
        ambiguous wall time)."""
        if day.weekday() not in self.days:
            return []
        tz = zone(self.timezone)
        h, m = divmod(self.start, 60)
        out = []
        for fold in (0, 1):
            local = datetime.combine(day, time(h, m), tzinfo=tz).replace(fold=fold)
            out.append(local.astimezone(UTC))
        return out

    def describe(self) -> str:
        days = ",".join(_WEEKDAYS[d] for d in sorted(self.days))
        return f"{days} {_hhmm(self.start)}-{_hhmm(self.end)} {self.timezone}"


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def parse_days(names: Iterable[str]) -> frozenset[int]:
    out = set()
    for n in names:
        key = n.strip().lower()[:3]
        if key not in _WEEKDAYS:
            raise ScheduleError(f"unknown weekday {n!r}; use mon, tue, wed, thu, fri, sat or sun")
        out.add(_WEEKDAYS.index(key))
    return frozenset(out)


def parse_hours(text: str) -> tuple[int, int]:
    """``09:00-16:00`` -> (540, 960); ``24:00`` is the end of the day."""
    try:
        a, b = text.split("-")
        return _minutes(a), _minutes(b)
    except (ValueError, IndexError):
        raise ScheduleError(f"hours {text!r} do not parse; write them as 09:00-16:00") from None


def _minutes(text: str) -> int:
    h, m = text.strip().split(":")
    hours, minutes = int(h), int(m)
    if not (0 <= hours <= 24 and 0 <= minutes < 60) or (hours == 24 and minutes):
        raise ValueError(text)
    return hours * 60 + minutes


# ------------------------------------------------------------------------------------ freezes


@dataclass(frozen=True)
class Freeze:
    """[start, end): nothing starts and nothing is switched off for the `groups` it names
    (every group, and credentials in none, when it names none)."""

    start: datetime
    end: datetime
    reason: str
    groups: frozenset[str] = frozenset()

    def applies(self, group: str | None) -> bool:
        return not self.groups or (group is not None and group in self.groups)

    def covers(self, at: datetime) -> bool:
        return self.start <= at < self.end


# ------------------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class Policy:
    name: str
    every: timedelta | None = None
    cron: str | None = None
    timezone: str = "UTC"
    max_age: timedelta | None = None
    #: None: half the interval.
    min_age_: timedelta | None = None
    windows: tuple[Window, ...] = ()
    jitter: timedelta = timedelta(0)
    stagger: timedelta = timedelta(0)
    group: str | None = None
    #: At most this many rotations of the group in flight at once (None: no limit).
    max_concurrent: int | None = None
    bake: timedelta = timedelta(0)
    approval: str = "none"
    approval_timeout: timedelta = timedelta(days=7)

    def __post_init__(self) -> None:
        zone(self.timezone)
        if self.cron is not None and not croniter.is_valid(self.cron):
            raise ScheduleError(
                f"cron expression {self.cron!r} does not parse; write five fields such as "
                "'0 9 * * TUE'"
            )
        if self.approval not in APPROVALS:
            raise ScheduleError(f"approval {self.approval!r}: use one of {', '.join(APPROVALS)}")

    @property
    def scheduled(self) -> bool:
        """Does the policy ever start a rotation by itself?"""
        return self.every is not None or self.cron is not None or self.max_age is not None

    @property
    def interval(self) -> timedelta | None:
        """The nominal time between rotations: ``every``, the shortest gap between the cron's
        next fires, else ``max_age``."""
        if self.every is not None:
            return self.every
        if self.cron is not None:
            start = datetime(2026, 1, 1, tzinfo=zone(self.timezone))
            it = croniter(self.cron, start)
            fires = [it.get_next(datetime) for _ in range(8)]
            return min(b - a for a, b in itertools.pairwise(fires))
        return self.max_age

    @property
    def min_age(self) -> timedelta:
        if self.min_age_ is not None:
            return self.min_age_
        interval = self.interval
        return interval / 2 if interval is not None else timedelta(0)

    def fingerprint(self, freezes: Sequence[Freeze] = ()) -> str:
        """Of everything that decides where this policy's slots fall (and the freezes that
        apply to its group): two workers whose configs give the same fingerprint plan alike."""
        doc = {
            "every": _secs(self.every),
            "cron": self.cron,
            "timezone": self.timezone,
            "max_age": _secs(self.max_age),
            "min_age": _secs(self.min_age),
            "windows": sorted(w.describe() for w in self.windows),
            "jitter": _secs(self.jitter),
            "stagger": _secs(self.stagger),
            "group": self.group,
            "freezes": sorted(
                [f.start.isoformat(), f.end.isoformat()] for f in freezes if f.applies(self.group)
            ),
        }
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _secs(d: timedelta | None) -> float | None:
    return None if d is None else d.total_seconds()


# ---------------------------------------------------------------------------------- the math


def in_windows(windows: Sequence[Window], at: datetime) -> bool:
    return not windows or any(w.contains(at) for w in windows)


def freeze_at(freezes: Iterable[Freeze], group: str | None, at: datetime) -> Freeze | None:
    for f in freezes:
        if f.applies(group) and f.covers(at):
            return f
    return None


def _next_open(windows: Sequence[Window], at: datetime) -> datetime | None:
    """The earliest instant >= `at` inside a window (None: none within the horizon)."""
    if in_windows(windows, at):
        return at
    best: datetime | None = None
    for w in windows:
        local_day = at.astimezone(zone(w.timezone)).date()
        for d in range(-1, 9):
            for t in w.opens(local_day + timedelta(days=d)):
                if t > at and w.contains(t) and (best is None or t < best):
                    best = t
    return best


def allowed_at(
    windows: Sequence[Window],
    freezes: Sequence[Freeze],
    group: str | None,
    at: datetime,
    *,
    horizon: timedelta = HORIZON,
) -> datetime | None:
    """The earliest instant >= `at` inside a window and outside every freeze that applies to
    `group` (None: none before `at + horizon`)."""
    limit = at + horizon
    t = at
    while t < limit:
        opened = _next_open(windows, t)
        if opened is None or opened >= limit:
            return None
        frozen = freeze_at(freezes, group, opened)
        if frozen is None:
            return opened
        t = frozen.end
    return None


def jitter_of(credential: str, slot: datetime, jitter: timedelta) -> timedelta:
    """Deterministic: the same credential and slot always get the same offset in [0, jitter)."""
    seconds = int(jitter.total_seconds())
    if seconds <= 0:
        return timedelta(0)
    digest = hashlib.sha256(f"{credential}|{slot.isoformat()}".encode()).digest()
    return timedelta(seconds=int.from_bytes(digest[:8], "big") % seconds)


def nominal_slot(
    policy: Policy, key_created: datetime, after: datetime | None = None
) -> tuple[datetime, str] | None:
    """The next slot of a credential whose current key was created at `key_created`, and why
    (the slot itself is the key of the at-most-once rule). A slot before ``key_created +
    min_age`` is skipped: a key rotated by hand just before a slot is not rotated again.
    `after`: the credential's last fired slot; the next one is later (a rotation rolled back
    leaves the key as it was: it is tried again an interval later, not at once)."""
    earliest = key_created + policy.min_age
    candidates: list[tuple[datetime, str]] = []

    def later(at: datetime, step: timedelta) -> datetime:
        at = max(at, earliest)
        if after is not None and at <= after:
            at = after + step
        return at

    if policy.every is not None:
        candidates.append(
            (
                later(key_created + policy.every, policy.every),
                f"every {format_duration(policy.every)}",
            )
        )
    if policy.cron is not None:
        tz = zone(policy.timezone)
        begin = earliest if after is None else max(earliest, after + timedelta(seconds=1))
        it = croniter(policy.cron, begin.astimezone(tz) - timedelta(microseconds=1))
        fire = it.get_next(datetime).astimezone(UTC)
        candidates.append((fire, f"cron {policy.cron} ({policy.timezone})"))
    if policy.max_age is not None:
        candidates.append(
            (
                later(key_created + policy.max_age, policy.max_age),
                f"max_age {format_duration(policy.max_age)}",
            )
        )
    if not candidates:
        return None
    at, why = min(candidates, key=lambda c: c[0])
    return at.astimezone(UTC).replace(microsecond=0), why


@dataclass(frozen=True)
class Start:
    """When a credential's next rotation starts, and why."""

    credential: str
    #: The nominal slot (the at-most-once key).
    slot: datetime
    #: When it starts: the slot plus jitter, moved into a window, out of freezes, past the
    #: stagger of its group's other starts, and not before `now`.
    at: datetime
    why: str
    notes: tuple[str, ...] = field(default=())


def next_start(
    policy: Policy,
    freezes: Sequence[Freeze],
    credential: str,
    key_created: datetime,
    now: datetime,
    peers: Sequence[datetime] = (),
    after: datetime | None = None,
) -> Start | None:
    """The next start of `credential` (None: the policy starts nothing). `peers`: the starts
    already planned or made for the other credentials of the policy's group; `after`: its last
    fired slot."""
    nominal = nominal_slot(policy, key_created, after)
    if nominal is None:
        return None
    slot, why = nominal
    notes: list[str] = []
    at = slot + jitter_of(credential, slot, policy.jitter)
    if at < now:
        notes.append(f"slot {slot.isoformat()} passed while no worker fired it; starting now")
        at = now
    placed = place(policy, freezes, at, peers, notes)
    if placed is None:
        return None
    return Start(credential, slot, placed, why, tuple(notes))


def place(
    policy: Policy,
    freezes: Sequence[Freeze],
    at: datetime,
    peers: Sequence[datetime] = (),
    notes: list[str] | None = None,
) -> datetime | None:
    """The earliest instant >= `at` in a window, outside freezes and at least the stagger away
    from every peer."""
    stagger = policy.stagger
    ordered = sorted(peers)
    t: datetime | None = at
    for _ in range(10_000):
        assert t is not None
        allowed = allowed_at(policy.windows, freezes, policy.group, t)
        if allowed is None:
            return None
        if notes is not None and allowed != t:
            frozen = freeze_at(freezes, policy.group, t)
            notes.append(
                f"freeze until {frozen.end.isoformat()} ({frozen.reason})"
                if frozen is not None
                else "moved into a window"
            )
        t = allowed
        if stagger <= timedelta(0):
            return t
        clash = next((p for p in ordered if abs(t - p) < stagger), None)
        if clash is None:
            return t
        if notes is not None:
            notes.append(f"stagger {format_duration(stagger)} after a peer in {policy.group}")
        t = clash + stagger
    return None


def deactivation_at(
    policy: Policy, freezes: Sequence[Freeze], earliest: datetime
) -> datetime | None:
    """The earliest instant >= `earliest` at which the switching-off step may run: in a
    window, outside every freeze that applies (None: never within the horizon)."""
    return allowed_at(policy.windows, freezes, policy.group, earliest)


def gate(policy: Policy, freezes: Sequence[Freeze], now: datetime) -> tuple[datetime, str] | None:
    """Why a start or a switching-off step may not run at `now`, and when it may (None: it
    may run now)."""
    frozen = freeze_at(freezes, policy.group, now)
    if frozen is None and in_windows(policy.windows, now):
        return None
    until = allowed_at(policy.windows, freezes, policy.group, now) or now + HORIZON
    if frozen is not None:
        return until, f"freeze until {frozen.end.isoformat()}: {frozen.reason}"
    windows = "; ".join(w.describe() for w in policy.windows)
    return until, f"outside the windows ({windows})"


# ------------------------------------------------------------------------- load-time checks


def problems(policy: Policy, freezes: Sequence[Freeze], now: datetime) -> list[tuple[str, str]]:
    """What makes the policy unsatisfiable, as (key, one line with the fix)."""
    out: list[tuple[str, str]] = []
    interval = policy.interval
    if policy.bake and interval is not None and policy.bake > interval:
        out.append(
            (
                "bake",
                f"bake {format_duration(policy.bake)} is longer than the interval "
                f"{format_duration(interval)}; shorten bake or lengthen the interval",
            )
        )
    if policy.min_age_ is not None and policy.max_age and policy.min_age_ > policy.max_age:
        out.append(("min_age", "min_age is longer than max_age; make it shorter"))
    if policy.cron is not None and policy.windows:
        tz = zone(policy.timezone)
        it = croniter(policy.cron, now.astimezone(tz))
        limit = now + timedelta(days=366)
        hit = False
        for _ in range(5000):
            fire = it.get_next(datetime).astimezone(UTC)
            if fire > limit:
                break
            if in_windows(policy.windows, fire):
                hit = True
                break
        if not hit:
            out.append(
                (
                    "windows",
                    f"no window ever overlaps the schedule (cron {policy.cron!r} in "
                    f"{policy.timezone} never fires inside "
                    f"{'; '.join(w.describe() for w in policy.windows)}); widen a window or "
                    "move the cron",
                )
            )
    if policy.scheduled and not out:
        # a key created now: its next slot must find an allowed time
        slot = nominal_slot(policy, now)
        if slot is not None and allowed_at(policy.windows, freezes, policy.group, slot[0]) is None:
            covering = [
                (i, f) for i, f in enumerate(freezes) if f.applies(policy.group) and f.end > slot[0]
            ]
            what = f"freeze {covering[0][1].reason!r}" if covering else "the windows"
            out.append(
                (
                    f"freeze[{covering[0][0]}]" if covering else "windows",
                    f"{what} covers every future slot (none allowed within "
                    f"{HORIZON.days} days); end the freeze or change the windows",
                )
            )
    return out
