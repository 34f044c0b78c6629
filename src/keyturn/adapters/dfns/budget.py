"""A client-side request budget per provider, shared by every rotation a worker has in flight:
requests are spaced to stay under the provider's rate limit (GCRA: a bucket of `burst`
requests refilled at `per_minute`), and a 429 pauses everyone sharing the budget, with
exponential backoff, instead of letting each rotation hammer the provider on its own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class RateBudget:
    def __init__(
        self,
        per_minute: float,
        *,
        burst: int = 10,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if per_minute <= 0:
            raise ValueError("a rate budget needs a positive requests-per-minute")
        self.burst = max(1, min(burst, int(per_minute // 10)))
        # Providers count requests in a sliding minute: a burst plus the steady rate must fit
        # in any 60 s window, so the steady spacing leaves room for the burst (and one edge).
        steady = max(1.0, per_minute - self.burst - 1)
        self.interval = 60.0 / steady
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
        and a single event loop runs it without interleaving."""
        now = self._clock()
        tolerance = (self.burst - 1) * self.interval
        start = max(now, self._tat - tolerance, self._paused_until)
        self._tat = max(self._tat, start) + self.interval
        self.granted += 1
        if start > now:
            await self._sleep(start - now)

    def rate_limited_now(self) -> None:
        """The provider answered 429: pause every request sharing this budget."""
        self.rate_limited += 1
        self._penalty = min(30.0, max(1.0, self._penalty * 2))
        self._paused_until = max(self._paused_until, self._clock() + self._penalty)

    def succeeded(self) -> None:
        self._penalty = 0.0
