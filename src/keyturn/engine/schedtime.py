"""The schedule's clock and what the engine knows of the configured policies.

Schedules, windows, freezes, bake, approval timeouts and wait deadlines run on the schedule's
clock: the database server's time (so workers on several hosts agree whatever their own clocks
say), or, in tests, a clock shared through the database that runs faster than real time
(``schedule = anchor.schedule + (database time - anchor.real) * anchor.scale``). Leases,
heartbeats and retry backoff stay on the worker's own clock: a waiting rotation's next check
(``next_attempt_at``) is converted back to it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property

from keyturn.domain.schedule import Freeze, Policy
from keyturn.ports import Clock, ClockAnchor, SlotStore


class ScheduleTime:
    """Schedule time from the worker's clock, sampled against the database by :meth:`sync`."""

    def __init__(
        self, clock: Clock, slots: SlotStore | None = None, *, shared_test_clock: bool = False
    ) -> None:
        self.clock = clock
        self.slots = slots
        self.shared_test_clock = shared_test_clock
        #: database time - local time
        self.offset = timedelta(0)
        self.anchor: ClockAnchor | None = None

    def sync(self) -> None:
        """Sample the database's clock (and the shared test clock); blocking."""
        if self.slots is None:
            return
        local = self.clock.now()
        self.offset = self.slots.db_now() - local
        if self.shared_test_clock:
            self.anchor = self.slots.clock_anchor()

    def of_local(self, at: datetime) -> datetime:
        """The schedule time at the local instant `at`."""
        real = at + self.offset
        a = self.anchor
        return real if a is None else a.schedule + (real - a.real) * a.scale

    def to_local(self, at: datetime) -> datetime:
        """The local instant at which the schedule's clock reads `at`."""
        a = self.anchor
        real = at if a is None else a.real + (at - a.schedule) / a.scale
        return real - self.offset

    def now(self) -> datetime:
        return self.of_local(self.clock.now())

    def seconds(self, schedule_seconds: float) -> float:
        """Real seconds that pass while the schedule's clock advances this many."""
        a = self.anchor
        return schedule_seconds if a is None else schedule_seconds / a.scale


@dataclass(frozen=True)
class ScheduleBook:
    """The resolved policies of the configured credentials, the freeze calendar and the
    limits, as the composition root read them from the configuration."""

    policies: Mapping[str, Policy]
    freezes: Sequence[Freeze] = ()
    #: credential -> provider name
    providers: Mapping[str, str] = field(default_factory=dict)
    #: provider -> rotations in flight at most
    provider_limits: Mapping[str, int] = field(default_factory=dict)
    tick_seconds: float = 5.0
    batch: int = 100

    def policy_of(self, credential: str) -> Policy | None:
        return self.policies.get(credential)

    def fingerprint(self, credential: str) -> str | None:
        return self._fingerprints.get(credential)

    @cached_property
    def _fingerprints(self) -> dict[str, str]:
        return {c: p.fingerprint(self.freezes) for c, p in self.policies.items()}

    @cached_property
    def _groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for c, p in self.policies.items():
            if p.group is not None:
                out.setdefault(p.group, []).append(c)
        return out

    def members(self, group: str) -> list[str]:
        return self._groups.get(group, [])
