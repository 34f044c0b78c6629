"""The in-process request budget: requests are spaced to stay under the provider's rate limit
(GCRA: a bucket of `burst` requests refilled at the steady rate), and a 429 pauses everyone
sharing the budget, with exponential backoff, instead of letting each rotation hammer the
provider on its own.

This one is shared by the clients of one process. Every worker process on the same database
shares :class:`keyturn.adapters.store.budget.SharedRateBudget` instead (the same arithmetic,
its state in one database row), which falls back to this one while the database is away. Both
satisfy :class:`keyturn.ports.RequestBudget`, which is all the Dfns client knows of them.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable

#: Seconds of timing noise allowed between taking a slot and the request reaching the
#: provider's counter (a late wake-up, a slow send): the steady rate leaves room for it.
JITTER_SECONDS = 0.25
#: Backoff after a 429: the first pause, doubled on each further 429, capped.
PAUSE_MIN_SECONDS = 1.0
PAUSE_MAX_SECONDS = 30.0


def spacing(per_minute: float, burst: int = 10) -> tuple[int, float]:
    """(burst, interval in seconds) of a GCRA that keeps any sliding minute within `per_minute`.

    Providers count requests in a sliding minute: a full burst plus a minute of the steady rate
    must fit in any 60 s window, with room for :data:`JITTER_SECONDS` of timing noise and one
    request at the window's edge."""
    if per_minute <= 0:
        raise ValueError("a rate budget needs a positive requests-per-minute")
    burst = max(1, min(burst, int(per_minute // 10)))
    margin = 1 + math.ceil(per_minute * JITTER_SECONDS / 60.0)
    steady = max(1.0, per_minute - burst - margin)
    return burst, 60.0 / steady


def next_pause(penalty: float) -> float:
    """The pause after a 429 given the previous one (0: none yet)."""
    return min(PAUSE_MAX_SECONDS, max(PAUSE_MIN_SECONDS, penalty * 2))


class RateBudget:
    """A :class:`keyturn.ports.RequestBudget` for the clients of one process."""

    def __init__(
        self,
        per_minute: float,
        *,
        burst: int = 10,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.per_minute = per_minute
        self.burst, self.interval = spacing(per_minute, burst)
        self._clock = clock
        self._sleep = sleep
        #: The theoretical arrival time of the next request (GCRA).
        self._tat = clock()
        self._paused_until = 0.0
        self._penalty = 0.0
        #: Requests let through, and 429s reported (for logs and benchmarks).
        self.granted = 0
        self.rate_limited = 0

    async def acquire(self) -> None:
        """Wait for this request's turn. Lock-free: the reservation is made before awaiting,
        and a single event loop runs it without interleaving. A slot that a pause (a 429
        reported meanwhile) overtook is given up and a new one taken after the pause."""
        while True:
            now = self._clock()
            tolerance = (self.burst - 1) * self.interval
            start = max(now, self._tat - tolerance, self._paused_until)
            self._tat = max(self._tat, start) + self.interval
            if start > now:
                await self._sleep(start - now)
            if self._clock() >= self._paused_until:
                self.granted += 1
                return

    def rate_limited_now(self) -> None:
        """The provider answered 429: pause every request sharing this budget. A 429 while a
        pause is in force (a request sent before it began) counts, but does not lengthen it."""
        self.rate_limited += 1
        now = self._clock()
        if now < self._paused_until:
            return
        self._penalty = next_pause(self._penalty)
        self._paused_until = now + self._penalty

    def succeeded(self) -> None:
        """A response other than 429: the backoff starts afresh, unless the request was sent
        before the pause in force (its success says nothing about the provider now)."""
        if self._clock() >= self._paused_until:
            self._penalty = 0.0
