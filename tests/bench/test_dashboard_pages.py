"""What the dashboard's pages cost the server at fleet scale: BENCH_DASH_N rotations (100,000;
the same seed as the /metrics bench: one per credential, a twentieth halted, retrying or
waiting, about 400,000 events), on SQLite and PostgreSQL. Server time is the wall time of one
request through the ASGI app in process (routing, session, store reads, template rendering;
no network), signed in as a viewer; p50/p99 of BENCH_DASH_REPEAT requests (10) per page:
the overview, the rotations list (first page, and filtered to halted), one rotation's page,
the credentials (first page) and the workers.
Reports, never asserts.

    BENCH_DASH_N=100000 .venv/bin/pytest -q -s tests/bench/test_dashboard_pages.py
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import benchlib
import pytest
from fastapi.testclient import TestClient
from test_metrics_scrape import _seed

from keyturn.adapters.store.migrate import upgrade
from keyturn.adapters.store.slots import SqlSlots
from keyturn.adapters.store.sql import SqlStore
from keyturn.domain.errors import KeyturnError
from keyturn.domain.model import Role
from keyturn.engine.access import create_token
from keyturn.engine.registry import discovered
from keyturn.web.app import Backend, create_app

pytestmark = pytest.mark.timeout(3600)


class _Clock:
    def now(self) -> datetime:
        return datetime.now(UTC)


class _Deps:
    """What the pages read of the engine's dependencies: the slots (next rotations), no
    policies, no configured credential (no targets or probes)."""

    schedule = None

    def __init__(self, store: SqlStore) -> None:
        self.slots = SqlSlots(store)

    def config(self, credential: str) -> Any:
        raise KeyturnError(f"{credential} is not configured in the bench")


def _no_plan(rotation_id: str) -> dict[str, Any]:
    raise KeyturnError("the bench plans no rollback")


def _not_used(*_: Any) -> Any:
    raise AssertionError("not used by the dashboard's pages")


def _measure(url: str, n: int) -> dict[str, Any]:
    upgrade(url)
    store = SqlStore(url)
    try:
        started = time.perf_counter()
        _seed(store, n)
        seeded = time.perf_counter() - started
        if store.engine.dialect.name == "postgresql":
            with store.engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("ANALYZE")
        clock = _Clock()
        deps = _Deps(store)
        _, token = create_token(store, clock, name="bench", role=Role.VIEWER, actor="bench")
        backend = Backend(
            store=store,
            access=store,
            registry=discovered(),
            clock=clock,
            lease_seconds=30,
            max_attempts=8,
            engine_deps=lambda: deps,
            rollback_plan=_no_plan,
            readiness=lambda: None,
            head_revision="bench",
            # the API's plan and credential reads: the dashboard's pages do not use them
            plan=_not_used,
            inventory=_not_used,
            configured=_not_used,
            metrics="off",
        )
        client = TestClient(create_app(backend), base_url="http://127.0.0.1")
        login = client.get("/ui/login")
        nonce = re.search(r'name="csrf" value="([^"]+)"', login.text)
        assert nonce is not None
        signed = client.post(
            "/ui/login",
            data={"csrf": nonce.group(1), "token": token, "next": "/ui/"},
            follow_redirects=False,
        )
        assert signed.status_code == 303, signed.text
        repeat = benchlib.env_int("BENCH_DASH_REPEAT", 10)
        figures: dict[str, Any] = {"rotations": n, "seed_seconds": round(seeded, 1)}
        pages = {
            "overview": "/ui/",
            "rotations_list": "/ui/rotations",
            "rotations_halted": "/ui/rotations?status=halted",
            "rotation": "/ui/rotations/rot-20",
            "credentials": "/ui/credentials",
            "workers": "/ui/workers",
        }
        for name, path in pages.items():
            times, size = [], 0
            for _ in range(repeat):
                t0 = time.perf_counter()
                r = client.get(path)
                times.append(time.perf_counter() - t0)
                assert r.status_code == 200, f"{path}: {r.status_code} {r.text[:300]}"
                size = len(r.content)
            figures[f"{name}_p50_ms"] = _ms(benchlib.percentile(times, 50))
            figures[f"{name}_p99_ms"] = _ms(benchlib.percentile(times, 99))
            figures[f"{name}_bytes"] = size
        return figures
    finally:
        store.close()


def _ms(seconds: float | None) -> float | None:
    return round(seconds * 1000, 1) if seconds is not None else None


@pytest.fixture
def pg_bench_url() -> Iterator[str]:
    with benchlib.fresh_db("keyturn_bench_dash") as name:
        yield benchlib.sa_url(name)


def test_dashboard_pages_on_sqlite(tmp_path: Path) -> None:
    n = benchlib.env_int("BENCH_DASH_N", 100_000)
    benchlib.write_result("dashboard-pages-sqlite", _measure(f"sqlite:///{tmp_path / 'b.db'}", n))


@pytest.mark.postgres
def test_dashboard_pages_on_postgres(pg_bench_url: str) -> None:
    n = benchlib.env_int("BENCH_DASH_N", 100_000)
    benchlib.write_result("dashboard-pages-postgres", _measure(pg_bench_url, n))
