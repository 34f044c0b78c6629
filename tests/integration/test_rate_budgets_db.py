"""The shared request budget on a migrated database (SQLite and PostgreSQL), on real clocks:
two budgets in two threads, each with its own event loop, database connection and executor
(as two worker processes would have), take their requests from one row."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Iterator

import pytest

from keyturn.adapters.dfns.budget import RateBudget
from keyturn.adapters.store.budget import SharedRateBudget
from keyturn.ports import RequestBudget

INTERVAL = 0.025


def local(share: float) -> RequestBudget:
    return RateBudget(1000 * share, burst=1)


@pytest.fixture
def shared(db_url: str) -> Iterator[list[SharedRateBudget]]:
    budgets = [
        SharedRateBudget(db_url, "sandbox", interval=INTERVAL, burst=1, fallback=local)
        for _ in range(2)
    ]
    yield budgets
    for budget in budgets:
        budget.close()


def test_two_threads_share_one_rate(shared: list[SharedRateBudget]) -> None:
    grants: list[float] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def run(budget: SharedRateBudget) -> None:
        async def go() -> None:
            for _ in range(30):
                await budget.acquire()
                with lock:
                    grants.append(time.monotonic())

        try:
            asyncio.run(go())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(b,)) for b in shared]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert [b.granted for b in shared] == [30, 30]
    assert [b.granted_locally for b in shared] == [0, 0]
    grants.sort()
    # together no faster than one budget: 60 requests take 59 intervals ...
    assert grants[-1] - grants[0] >= 59 * INTERVAL - 0.02
    # ... and no window of 10 intervals holds more than 11 of them (5 ms of scheduling noise)
    for i, start in enumerate(grants):
        inside = sum(1 for g in grants[i:] if g < start + 10 * INTERVAL - 0.005)
        assert inside <= 11, (i, inside)
    # neither thread was starved: the row is first come, first served
    assert min(b.share for b in shared) >= 0.3


def test_a_429_in_one_process_pauses_the_other(shared: list[SharedRateBudget]) -> None:
    a, b = shared

    async def go() -> float:
        await a.acquire()
        a.rate_limited_now()
        await a.drain()
        started = time.monotonic()
        await b.acquire()
        return time.monotonic() - started

    waited = asyncio.run(go())
    assert 0.9 <= waited < 2.0
    assert b.granted_locally == 0


@pytest.mark.postgres
def test_an_unreachable_server_falls_back_at_once() -> None:
    budget = SharedRateBudget(
        "postgresql+psycopg://root@127.0.0.1:1/nowhere",
        "sandbox",
        interval=INTERVAL,
        burst=1,
        fallback=local,
    )
    try:

        async def go() -> list[float]:
            starts = []
            for _ in range(3):
                await budget.acquire()
                starts.append(time.monotonic())
            return starts

        began = time.monotonic()
        starts = asyncio.run(go())
        assert starts[-1] - began < 2.0
        assert budget.granted_locally == 3
        gaps = [y - x for x, y in itertools.pairwise(starts)]
        assert min(gaps) >= 0.05  # the local budget spaces them (about 1000/min)
    finally:
        budget.close()
