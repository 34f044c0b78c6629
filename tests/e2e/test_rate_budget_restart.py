"""The shared request budget across a PostgreSQL restart: while the server is down the budget
falls back to a local one at once (no request fails, none waits for a timeout), and once the
server is back it shares the row again."""

from __future__ import annotations

import asyncio
import time

import pytest
import structlog
from fleet import PgCluster

from keyturn.adapters.dfns.budget import RateBudget
from keyturn.adapters.store.budget import RETRY_MIN_SECONDS, SharedRateBudget
from keyturn.adapters.store.migrate import upgrade
from keyturn.ports import RequestBudget

pytestmark = pytest.mark.postgres


def test_budget_survives_a_postgres_restart(pg_cluster: PgCluster) -> None:
    upgrade(pg_cluster.url)
    shares: list[float] = []

    def local(share: float) -> RequestBudget:
        shares.append(share)
        return RateBudget(6000 * share, burst=1)

    budget = SharedRateBudget(pg_cluster.url, "dfns", interval=0.01, burst=1, fallback=local)

    async def take(n: int) -> float:
        began = time.monotonic()
        for _ in range(n):
            await budget.acquire()
        return time.monotonic() - began

    try:
        asyncio.run(take(5))
        assert budget.granted_locally == 0

        pg_cluster.stop("fast")
        with structlog.testing.capture_logs() as logs:
            took = asyncio.run(take(5))
        assert budget.granted_locally == 5
        assert took < 2.0  # refused at once, not after a timeout per request
        assert shares == [1.0]
        warnings = [e for e in logs if e["log_level"] == "warning"]
        assert len(warnings) == 1, warnings
        assert "database unavailable" in warnings[0]["event"]

        pg_cluster.start()
        time.sleep(RETRY_MIN_SECONDS * 2 + 0.5)  # past the retry delay (it may have doubled)
        with structlog.testing.capture_logs() as logs:
            asyncio.run(take(5))
        assert budget.granted_locally == 5  # shared again (a fresh connection)
        assert any("available again" in e["event"] for e in logs)

        # a restart between two requests: the pooled connection is dead, a new one is used
        pg_cluster.stop("fast")
        pg_cluster.start()
        asyncio.run(take(3))
        assert budget.granted_locally == 5
    finally:
        budget.close()
