"""Provider-bound throughput (issue 6, figure 3): the sandbox with a rate limit of 1,000
requests per minute per organisation and 50 ms latency, BENCH_FLEET (default 200) service
accounts rotated by BENCH_PROVIDER_WORKERS (default 2) `keyturn worker` processes on
PostgreSQL, sharing one budget.

The provider is configured once for the whole installation: requests_per_minute = BENCH_RPM
(default 1000, the sandbox's limit; "none" leaves the client-side budget off). Every worker
takes its requests from the same row of rate_budgets (keyturn.adapters.store.budget), so no
per-worker split is configured anywhere.

Reported, never asserted: the share of the limit used, honestly counted: API requests /
(limit * minutes from the first worker's start to the last rotation's finish), so worker
start-up counts against it; the start-up time and the share without it separately; 429
responses. Asserted: every rotation reached old_deactivated (else the figures mean nothing).

    .venv/bin/pytest -q -s tests/bench/test_provider_bound.py
"""

from __future__ import annotations

import os
import time
from datetime import datetime
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


def epoch(value: Any) -> float:
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert isinstance(value, datetime), value
    return value.timestamp()


def test_provider_bound(tmp_path: Path) -> None:
    if os.environ.get("BENCH_RPM_PER_WORKER"):
        raise SystemExit(
            "BENCH_RPM_PER_WORKER is gone: the budget is shared by every worker; set "
            "BENCH_RPM (the installation's requests per minute, or none)"
        )
    n = benchlib.env_int("BENCH_FLEET", 200)
    rpm = os.environ.get("BENCH_RPM", str(LIMIT))
    workers = benchlib.env_int("BENCH_PROVIDER_WORKERS", 2)
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
            t0 = time.time()
            for _ in range(workers):
                fleet.start_worker(concurrency=concurrency)
            rows = fleet.wait_settled(timeout=benchlib.env_float("BENCH_TIMEOUT_SECONDS", 1800))
            after = fleet.sandbox.state()
            started = [epoch(w_line["timestamp"]) for w in fleet.workers for w_line in w.lines()
                       if w_line.get("event") == "worker started"]  # fmt: skip
            fleet.stop_workers()
            fleet.assert_all_done(rows)
            (last_finish,) = fleet.reader.query("SELECT max(finished_at) FROM rotations")[0]
            budget_rows = fleet.reader.query(
                "SELECT provider, granted, rate_limited FROM rate_budgets"
            )
            warnings = [
                line["event"]
                for w in fleet.workers
                for line in w.lines()
                if line.get("log_level") == "warning"
            ]
        finally:
            fleet.kill_workers()
            fleet.sandbox.stop()
    counts_before, counts_after = api_requests(before), api_requests(after)
    by_status = {s: counts_after.get(s, 0) - counts_before.get(s, 0) for s in counts_after}
    total = sum(by_status.values())
    rejected = by_status.get("429", 0)
    accepted = total - rejected
    finish = epoch(last_finish)
    minutes = (finish - t0) / 60
    startup = [round(s - t0, 2) for s in sorted(started)]
    minutes_after_startup = (finish - max(started)) / 60 if started else minutes
    benchlib.write_result(
        "provider_bound",
        {
            "command": f"BENCH_FLEET={n} BENCH_RPM={rpm} BENCH_PROVIDER_WORKERS={workers} "
            ".venv/bin/pytest -q -s tests/bench/test_provider_bound.py",
            "rotations": n,
            "workers": workers,
            "concurrency_per_worker": concurrency,
            "requests_per_minute_installation": rpm,
            "sandbox_limit_per_minute": LIMIT,
            "sandbox_latency_ms": latency,
            "wall_seconds_first_worker_start_to_last_finish": round(finish - t0, 2),
            "worker_startup_seconds": startup,
            "api_requests": total,
            "api_requests_by_status": by_status,
            "requests_per_rotation": round(accepted / n, 2),
            # the headline: start-up counted against it
            "share_of_limit_used": round(accepted / (LIMIT * minutes), 4),
            "share_of_limit_used_after_last_worker_started": round(
                accepted / (LIMIT * minutes_after_startup), 4
            ),
            "share_of_limit_used_counting_429s": round(total / (LIMIT * minutes), 4),
            "responses_429": rejected,
            "sandbox_rate_limited_counter": after["faults"]["rate_limited"]
            - before["faults"]["rate_limited"],
            "budget_rows": [list(r) for r in budget_rows],
            "worker_warnings": warnings,
        },
    )
