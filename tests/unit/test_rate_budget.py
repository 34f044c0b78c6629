"""The client-side request budget, on a virtual clock (no real sleeping, nothing timed)."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from keyturn.adapters.dfns.budget import RateBudget


class VirtualTime:
    def __init__(self) -> None:
        self.now = 1000.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_requests_are_spaced_to_the_rate_after_a_burst() -> None:
    t = VirtualTime()
    # 609 per minute with a burst of 5: the steady rate leaves room for the burst and the
    # jitter margin (600/min)
    budget = RateBudget(609, burst=5, clock=t.clock, sleep=t.sleep)

    async def go() -> list[float]:
        starts = []
        for _ in range(25):
            await budget.acquire()
            starts.append(t.now)
        return starts

    starts = asyncio.run(go())
    assert starts[:5] == pytest.approx([1000.0] * 5)  # the burst goes at once
    gaps = [b - a for a, b in itertools.pairwise(starts[4:])]
    assert all(g == pytest.approx(0.1) for g in gaps)
    # 25 requests at 10/s with a burst of 5: the last starts 2 s after the first
    assert starts[-1] - starts[0] == pytest.approx(2.0)
    assert budget.granted == 25


def test_a_429_pauses_everyone_with_growing_backoff_until_a_success() -> None:
    t = VirtualTime()
    budget = RateBudget(60_000, burst=1, clock=t.clock, sleep=t.sleep)

    async def one() -> float:
        await budget.acquire()
        return t.now

    first = asyncio.run(one())
    budget.rate_limited_now()
    assert asyncio.run(one()) >= first + 1.0
    budget.rate_limited_now()
    paused_from = t.now
    assert asyncio.run(one()) >= paused_from + 2.0  # doubled
    budget.succeeded()
    budget.rate_limited_now()
    paused_from = t.now
    assert asyncio.run(one()) == pytest.approx(paused_from + 1.0)  # reset after success
    assert budget.rate_limited == 3


def test_needs_a_positive_rate() -> None:
    with pytest.raises(ValueError, match="positive"):
        RateBudget(0)


def test_any_sliding_minute_stays_within_the_limit() -> None:
    t = VirtualTime()
    budget = RateBudget(500, burst=10, clock=t.clock, sleep=t.sleep)

    async def go() -> list[float]:
        starts = []
        for _ in range(1500):
            await budget.acquire()
            starts.append(t.now)
        return starts

    starts = asyncio.run(go())
    worst = max(sum(1 for x in starts[i:] if x < s + 60.0) for i, s in enumerate(starts[:600]))
    assert 480 <= worst <= 500
