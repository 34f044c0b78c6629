"""The worker's coalescing of database calls: requests that arrive while one batch runs go
together in the next, each caller gets its own result, and a failure reaches every waiter."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

from keyturn.domain.errors import StoreUnavailable
from keyturn.engine.batch import BatchLoader, Coalescer


class Doubler(Coalescer[int, int]):
    """Doubles numbers; refuses negative ones (an exception result for that caller only)."""

    def __init__(self, gate: threading.Event) -> None:
        super().__init__()
        self.gate = gate
        self.seen: list[list[int]] = []

    def handle(self, requests: list[int]) -> Sequence[int | BaseException]:
        self.gate.wait(5)  # the first batch waits, so the next requests pile up behind it
        self.seen.append(list(requests))
        return [ValueError(f"negative: {n}") if n < 0 else 2 * n for n in requests]


def test_requests_during_a_batch_share_the_next_and_get_their_own_results() -> None:
    async def go() -> None:
        gate = threading.Event()
        doubler = Doubler(gate)
        first = asyncio.create_task(doubler.submit(1))
        await asyncio.sleep(0.05)  # the first batch ([1]) is now blocked in its thread
        rest = [asyncio.create_task(doubler.submit(n)) for n in (2, -3, 4)]
        await asyncio.sleep(0.05)
        gate.set()
        assert await first == 2
        results = await asyncio.gather(*rest, return_exceptions=True)
        assert results[0] == 4 and results[2] == 8
        assert isinstance(results[1], ValueError)
        assert doubler.seen == [[1], [2, -3, 4]]
        assert (doubler.batches, doubler.requests) == (2, 4)
        await doubler.aclose()

    asyncio.run(go())


def test_a_failed_batch_reaches_every_waiter_and_the_next_batch_runs() -> None:
    calls: list[list[str]] = []

    def fetch(keys: list[str]) -> dict[str, str]:
        calls.append(keys)
        if len(calls) == 1:
            raise StoreUnavailable("database is unavailable; will retry")
        return {k: k.upper() for k in keys if k != "missing"}

    async def go() -> None:
        loader: BatchLoader[str, str] = BatchLoader(fetch)
        failed = await asyncio.gather(loader.load("a"), return_exceptions=True)
        assert isinstance(failed[0], StoreUnavailable)
        got = await asyncio.gather(loader.load("b"), loader.load("b"), loader.load("missing"))
        assert got == ["B", "B", None]
        assert calls[-1] == ["b", "missing"]  # one read, each key once
        await loader.aclose()

    asyncio.run(go())


def test_aclose_stops_the_background_task() -> None:
    async def go() -> None:
        loader: BatchLoader[str, str] = BatchLoader(lambda keys: {k: k for k in keys})
        assert await loader.load("x") == "x"
        await loader.aclose()
        assert loader._task is not None and loader._task.cancelled()

    asyncio.run(go())
