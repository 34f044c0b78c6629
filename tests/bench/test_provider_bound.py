"""Provider-bound throughput (issue 6, figure 3): the sandbox with a rate limit of 1,000
requests per minute per organisation and 50 ms latency, BENCH_FLEET (default 200) service
accounts rotated by two `keyturn worker` processes on PostgreSQL, sharing that one budget.

Each worker is configured with requests_per_minute = BENCH_RPM_PER_WORKER (default 500, half of
the organisation's limit; "none" leaves the client-side budget off). Reported, never asserted:
the share of the limit used (API requests / (limit * minutes)), 429 responses, rotations that
did not finish. Asserted: every rotation reached old_deactivated (else the figures mean nothing).

    .venv/bin/pytest -q -s tests/bench/test_provider_bound.py
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import benchlib
import pytest
from fleet import make_fleet

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(3600)]

LIMIT = 1000


def api_requests(state: dict[str, Any]) -> dict[str, int]:
    """Requests per status over the provider's API routes (not the sandbox's control routes)."""
    out: dict[str, int] = {}
    for route, statuses in state["requests"].items():
        if "/_sandbox" in route:
            continue
        for status, count in statuses.items():
            out[status] = out.get(status, 0) + int(count)
    return out


def test_provider_bound(tmp_path: Path) -> None:
    n = benchlib.env_int("BENCH_FLEET", 200)
    rpm = os.environ.get("BENCH_RPM_PER_WORKER", "500")
    latency = benchlib.env_int("BENCH_LATENCY_MS", 50)
    concurrency = benchlib.env_int("BENCH_CONCURRENCY", 8)
    with benchlib.fresh_db("kt_bench_provider") as dbname:
        fleet = make_fleet(
            tmp_path,
            n,
            db_url=benchlib.sa_url(dbname),
            sandbox_args=["--rate-limit-per-minute", str(LIMIT), "--latency-ms", str(latency)],
        )
        try:
            if rpm.lower() != "none":
                text = fleet.kt.config.read_text()
                assert text.count("[providers.sandbox]\n") == 1, text
                fleet.kt.config.write_text(
                    text.replace(
                        "[providers.sandbox]\n",
                        f"[providers.sandbox]\nrequests_per_minute = {float(rpm)}\n",
                    )
                )
            fleet.start_rotations(reason="provider-bound bench")
            # init and the set-up spent part of the sliding one-minute window: start afresh
            time.sleep(61)
            before = fleet.sandbox.state()
            t0 = time.monotonic()
            for _ in range(2):
                fleet.start_worker(concurrency=concurrency)
            rows = fleet.wait_settled(timeout=benchlib.env_float("BENCH_TIMEOUT_SECONDS", 1800))
            wall = time.monotonic() - t0
            after = fleet.sandbox.state()
            fleet.stop_workers()
            fleet.assert_all_done(rows)
        finally:
            fleet.kill_workers()
            fleet.sandbox.stop()
    counts_before, counts_after = api_requests(before), api_requests(after)
    by_status = {s: counts_after.get(s, 0) - counts_before.get(s, 0) for s in counts_after}
    total = sum(by_status.values())
    rejected = by_status.get("429", 0)
    minutes = wall / 60
    benchlib.write_result(
        "provider_bound",
        {
            "command": f"BENCH_FLEET={n} BENCH_RPM_PER_WORKER={rpm} .venv/bin/pytest -q -s "
            "tests/bench/test_provider_bound.py",
            "rotations": n,
            "workers": 2,
            "concurrency_per_worker": concurrency,
            "requests_per_minute_per_worker": rpm,
            "sandbox_limit_per_minute": LIMIT,
            "sandbox_latency_ms": latency,
            "wall_seconds": round(wall, 1),
            "api_requests": total,
            "api_requests_by_status": by_status,
            "requests_per_rotation": round((total - rejected) / n, 2),
            "share_of_limit_used": round((total - rejected) / (LIMIT * minutes), 3),
            "share_of_limit_used_counting_429s": round(total / (LIMIT * minutes), 3),
            "responses_429": rejected,
            "sandbox_rate_limited_counter": after["faults"]["rate_limited"]
            - before["faults"]["rate_limited"],
        },
    )
