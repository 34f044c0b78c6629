"""The request budget shared through the database (rate_budgets), on SQLite files.

Most tests run on a virtual clock (the process's and the database's: nothing is timed); one
uses the database's own clock for real.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import structlog
from sqlalchemy import create_engine

from keyturn.adapters.dfns.budget import RateBudget, spacing
from keyturn.adapters.store.budget import SharedRateBudget, rate_budgets_t
from keyturn.cli.wiring import Wiring
from keyturn.config import Config, DatabaseConfig, ProviderConfig
from keyturn.ports import RequestBudget


class VirtualTime:
    def __init__(self) -> None:
        self.now = 1000.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


def make_table(url: str) -> None:
    engine = create_engine(url)
    try:
        rate_budgets_t.create(engine)
    finally:
        engine.dispose()


@pytest.fixture
def url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'budget.db'}"
    make_table(url)
    return url


class Budgets:
    """Shared budgets on one database and one virtual clock; all closed at the end."""

    def __init__(self, url: str, t: VirtualTime) -> None:
        self.url, self.t = url, t
        self.made: list[SharedRateBudget] = []
        self.fallback_shares: list[float] = []

    def fallback(self, share: float) -> RequestBudget:
        self.fallback_shares.append(share)
        # 605/min with a burst of 1: one request every 0.1 s
        return RateBudget(605 * share, burst=1, clock=self.t.clock, sleep=self.t.sleep)

    def __call__(
        self,
        *,
        interval: float = 0.1,
        burst: int = 5,
        provider: str = "dfns",
        sleep: Callable[[float], Awaitable[None]] | None = None,
        url: str | None = None,
    ) -> SharedRateBudget:
        budget = SharedRateBudget(
            url or self.url,
            provider,
            interval=interval,
            burst=burst,
            fallback=self.fallback,
            clock=self.t.clock,
            sleep=sleep or self.t.sleep,
            db_clock=self.t.clock,
        )
        self.made.append(budget)
        return budget


@pytest.fixture
def t() -> VirtualTime:
    return VirtualTime()


@pytest.fixture
def budgets(url: str, t: VirtualTime) -> Iterator[Budgets]:
    b = Budgets(url, t)
    yield b
    for budget in b.made:
        budget.close()


def starts_of(t: VirtualTime, order: list[RequestBudget]) -> list[float]:
    async def go() -> list[float]:
        starts = []
        for budget in order:
            await budget.acquire()
            starts.append(t.now)
        return starts

    return asyncio.run(go())


def test_requests_are_spaced_after_a_burst(budgets: Budgets, t: VirtualTime) -> None:
    budget = budgets()
    starts = starts_of(t, [budget] * 25)
    assert starts[:5] == pytest.approx([1000.0] * 5)  # the burst goes at once
    gaps = [b - a for a, b in itertools.pairwise(starts[4:])]
    assert all(g == pytest.approx(0.1) for g in gaps)
    assert starts[-1] - starts[0] == pytest.approx(2.0)
    assert budget.granted == 25
    assert budget.granted_locally == 0


def test_the_burst_refills_after_an_idle_spell(budgets: Budgets, t: VirtualTime) -> None:
    budget = budgets()
    starts_of(t, [budget] * 10)
    t.now += 60.0
    idle_until = t.now
    starts = starts_of(t, [budget] * 6)
    assert starts[:5] == pytest.approx([idle_until] * 5)
    assert starts[5] - starts[4] == pytest.approx(0.1)


def test_two_budgets_on_one_database_share_the_rate(budgets: Budgets, t: VirtualTime) -> None:
    """Two processes' budgets (two engines on one SQLite file) take their slots from one row:
    together they go exactly as fast as one budget, burst included."""
    a, b = budgets(), budgets()
    starts = starts_of(t, [a, b] * 20)
    assert starts[:5] == pytest.approx([1000.0] * 5)
    gaps = [y - x for x, y in itertools.pairwise(starts[4:])]
    assert all(g == pytest.approx(0.1) for g in gaps)
    assert starts[-1] - starts[0] == pytest.approx(3.5)
    assert a.granted == b.granted == 20
    # each has taken half of everyone's reservations
    assert a.share == pytest.approx(0.5, abs=0.05)
    assert b.share == pytest.approx(0.5, abs=0.05)


def test_one_budget_alone_takes_the_whole_rate(budgets: Budgets, t: VirtualTime) -> None:
    a, b = budgets(), budgets()
    starts_of(t, [a, b] * 5)
    starts = starts_of(t, [a] * 30)  # b has nothing to do: a is not held to half the rate
    gaps = [y - x for x, y in itertools.pairwise(starts)]
    assert all(g == pytest.approx(0.1) for g in gaps)


def test_budgets_of_different_providers_are_independent(budgets: Budgets, t: VirtualTime) -> None:
    a, b = budgets(provider="one"), budgets(provider="two")
    starts = starts_of(t, [a, b] * 5)  # each has its own burst of 5
    assert starts == pytest.approx([1000.0] * 10)


def test_a_429_pauses_every_process_with_growing_backoff(budgets: Budgets, t: VirtualTime) -> None:
    a, b = budgets(burst=1), budgets(burst=1)

    async def go() -> None:
        await a.acquire()
        a.rate_limited_now()
        # a 429 of another request sent before the pause began does not lengthen it
        a.rate_limited_now()
        await a.drain()
        paused_from = t.now
        await b.acquire()  # the other process learns the pause from the row
        assert t.now == pytest.approx(paused_from + 1.0)
        # a 429 after the pause ended doubles it
        b.rate_limited_now()
        await b.drain()
        paused_from = t.now
        await a.acquire()
        assert t.now == pytest.approx(paused_from + 2.0)
        # a success after the pause starts the backoff afresh, for everyone
        a.succeeded()
        await a.drain()
        a.rate_limited_now()
        await a.drain()
        paused_from = t.now
        await b.acquire()
        assert t.now == pytest.approx(paused_from + 1.0)

    asyncio.run(go())
    assert a.rate_limited == 3
    assert b.rate_limited == 1
    engine = create_engine(budgets.url)
    try:
        with engine.connect() as conn:
            row = conn.execute(rate_budgets_t.select()).one()._mapping
    finally:
        engine.dispose()
    assert row["rate_limited"] == 4
    assert row["granted"] == 4


def test_a_success_during_the_pause_keeps_the_backoff(budgets: Budgets, t: VirtualTime) -> None:
    a = budgets(burst=1)

    async def go() -> None:
        await a.acquire()
        a.rate_limited_now()
        a.succeeded()  # a request sent before the pause: says nothing about now
        await a.drain()
        await a.acquire()
        a.rate_limited_now()
        await a.drain()
        paused_from = t.now
        await a.acquire()
        assert t.now == pytest.approx(paused_from + 2.0)

    asyncio.run(go())


@pytest.mark.parametrize("kind", ["local", "shared"])
def test_a_slot_that_a_pause_overtook_is_taken_again_after_it(
    kind: str, budgets: Budgets, t: VirtualTime
) -> None:
    """A request waiting for its slot when another one is answered 429 does not go at its
    slot (inside the pause): it waits for the pause and takes a new slot."""
    budget: SharedRateBudget | RateBudget
    slept: list[float] = []

    async def sleep_then_429(seconds: float) -> None:
        slept.append(seconds)
        t.now += seconds / 2
        if len(slept) == 1:
            budget.rate_limited_now()  # another rotation's request, meanwhile
        t.now += seconds / 2

    if kind == "local":
        budget = RateBudget(605, burst=1, clock=t.clock, sleep=sleep_then_429)  # every 0.1 s
    else:
        budget = budgets(interval=0.1, burst=1, sleep=sleep_then_429)

    async def go() -> None:
        await budget.acquire()
        assert t.now == 1000.0
        await budget.acquire()  # its slot (1000.1) falls into the pause (1000.05 .. 1001.05)

    asyncio.run(go())
    assert t.now >= 1001.05
    assert budget.granted == 2


def test_the_database_unavailable_falls_back_to_a_local_share(
    tmp_path: Path, budgets: Budgets, t: VirtualTime
) -> None:
    """Without the table (a database not migrated, or gone) the budget does not fail: the
    process uses a local budget for its recent share, says so once, and goes back to the
    shared row once the database answers again."""
    other = f"sqlite:///{tmp_path / 'other.db'}"
    a, b = budgets(url=other), budgets(url=other)
    with structlog.testing.capture_logs() as logs:
        starts = starts_of(t, [a] * 3)
    assert starts == pytest.approx([1000.0, 1000.1, 1000.2])  # local: the whole rate, burst 1
    assert a.granted == a.granted_locally == 3
    assert budgets.fallback_shares == [1.0]
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1
    assert "local budget" in warnings[0]["event"]
    assert "no such table" in warnings[0]["error"]

    make_table(other)
    t.now += 60.0  # past every retry delay
    starts_of(t, [a, b] * 20)
    assert a.granted_locally == 3  # shared again
    assert a.share == pytest.approx(0.5, abs=0.05)

    # gone again: the fallback runs at the process's recent share
    engine = create_engine(other)
    try:
        rate_budgets_t.drop(engine)
    finally:
        engine.dispose()
    t.now += 60.0
    starts = starts_of(t, [a] * 3)
    assert a.granted_locally == 6
    assert budgets.fallback_shares[-1] == pytest.approx(0.5, abs=0.05)
    gaps = [y - x for x, y in itertools.pairwise(starts)]
    assert all(g == pytest.approx(0.2, rel=0.05) for g in gaps)  # half the rate


def test_requests_queued_behind_a_failure_do_not_try_the_database_again(
    tmp_path: Path, budgets: Budgets, t: VirtualTime
) -> None:
    """Rotations in flight when the database goes away fall back together: the database is
    tried once (one warning), not once per waiting request."""
    a = budgets(url=f"sqlite:///{tmp_path / 'none.db'}")

    async def go() -> None:
        await asyncio.gather(*(a.acquire() for _ in range(8)))

    with structlog.testing.capture_logs() as logs:
        asyncio.run(go())
    assert a.granted == a.granted_locally == 8
    assert len([e for e in logs if e["log_level"] == "warning"]) == 1


def test_the_database_clock_spaces_requests_for_real(budgets: Budgets, url: str) -> None:
    """No virtual clock: the row's times come from SQLite's own clock."""
    budget = SharedRateBudget(url, "real", interval=0.02, burst=1, fallback=budgets.fallback)
    budgets.made.append(budget)

    async def go() -> list[float]:
        starts = []
        for _ in range(15):
            await budget.acquire()
            starts.append(time.monotonic())
        return starts

    starts = asyncio.run(go())
    assert budget.granted_locally == 0
    # 15 requests one interval apart on the database's clock (a late wake-up of one of them
    # shortens the next gap, not the whole)
    assert starts[-1] - starts[0] >= 14 * 0.02 - 0.01


def test_spacing_keeps_any_minute_within_the_limit_with_room_for_jitter() -> None:
    burst, interval = spacing(1000)
    assert burst == 10
    # a burst, a minute of the steady rate and 0.25 s of timing noise fit in the limit
    assert burst + (60.0 + 0.25) / interval <= 1000 - 1
    assert 60.0 / interval >= 980  # and little of the limit is left unused
    with pytest.raises(ValueError, match="positive"):
        spacing(0)


def test_wiring_shares_the_budget_through_the_database(tmp_path: Path) -> None:
    providers = {"p": ProviderConfig(base_url="http://127.0.0.1:1", requests_per_minute=1000)}
    for db, expected in (
        (f"sqlite:///{tmp_path / 'k.db'}", SharedRateBudget),
        ("postgresql+psycopg://k@db.internal/k", SharedRateBudget),
        ("sqlite:///:memory:", RateBudget),  # no other process can reach it
    ):
        wiring = Wiring(Config(database=DatabaseConfig(url=db), providers=providers))
        budget = wiring.budget("p")
        assert isinstance(budget, expected)
        assert wiring.budget("p") is budget  # one per provider per process
        if isinstance(budget, SharedRateBudget):
            assert (budget.burst, budget.interval) == spacing(1000)
            budget.close()
    unlimited = {"p": ProviderConfig(base_url="http://127.0.0.1:1")}
    assert Wiring(Config(providers=unlimited)).budget("p") is None
