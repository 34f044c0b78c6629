"""The scheduler's tick at fleet scale (issue 13): BENCH_SCHED_N managed credentials (100,000)
with a policy and a scheduled slot each, on a fresh PostgreSQL database; the tick's wall time
and the database time inside it (every statement timed at the driver), p50/p99, with 0, 10 and
1,000 slots due at once (each due slot is fired: its rotation created in the transaction that
marks it fired), and EXPLAIN (ANALYZE, BUFFERS) of the due-slot query. Reports, never asserts.

    BENCH_SCHED_N=100000 .venv/bin/pytest -q -s tests/bench/test_scheduler_tick.py
"""

from __future__ import annotations

import asyncio
import os
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import benchlib
import psycopg
import pytest
from sqlalchemy import event

from keyturn.adapters.keys import CryptoKeys
from keyturn.adapters.store.migrate import upgrade
from keyturn.adapters.store.slots import SqlSlots
from keyturn.adapters.store.sql import SqlStore
from keyturn.domain.schedule import Policy
from keyturn.engine.registry import discovered
from keyturn.engine.run import EngineDeps
from keyturn.engine.schedtime import ScheduleBook, ScheduleTime
from keyturn.engine.scheduler import Scheduler
from keyturn.engine.spi import CredentialConfig

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(3600)]

KIND = "service_account"
POLICY = Policy("fleet", every=timedelta(days=90))


class _Services:
    def __init__(self, config: CredentialConfig) -> None:
        self.config = config

    def credential_config(self, name: str) -> CredentialConfig:
        return self.config


def _seed(url: str, n: int, fingerprint: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            f"""
            INSERT INTO secrets (id, purpose, master_key_id, nonce, ciphertext, created_at)
            SELECT 'sec-' || g, 'private_key', 'mk', '\\x00', '\\x00', now()
              FROM generate_series(1, {n}) AS g;
            INSERT INTO credentials (name, kind, provider, credential_id, credential_uuid,
                                     key_ref, algorithm, token_ref, created_at, updated_at)
            SELECT 'svc-' || g, '{KIND}', 'sandbox', 'cid-' || g, 'cr-' || g, 'sec-' || g,
                   'ed25519', NULL, now() - interval '10 days', now() - interval '10 days'
              FROM generate_series(1, {n}) AS g;
            INSERT INTO schedule_slots (credential, slot, due_at, status, fingerprint, policy,
                                        grp, why, planned_by, key_recorded_at, key_created,
                                        created_at)
            SELECT 'svc-' || g, now() + g * interval '1 minute', now() + g * interval '1 minute',
                   'scheduled', '{fingerprint}', 'fleet', NULL, 'every 90d', 'bench',
                   c.updated_at, c.updated_at, now()
              FROM generate_series(1, {n}) AS g JOIN credentials c ON c.name = 'svc-' || g;
            """  # noqa: S608 - integers and a hex digest of ours, no input
        )
        conn.execute("VACUUM ANALYZE")


def _make_due(url: str, due: int) -> None:
    """Undo the last tick's fires, then make `due` slots due (the first ones)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            """
            DELETE FROM events WHERE rotation_id IN
              (SELECT rotation_id FROM schedule_slots WHERE status = 'fired');
            DELETE FROM rotations WHERE id IN
              (SELECT rotation_id FROM schedule_slots WHERE status = 'fired');
            UPDATE schedule_slots SET status = 'scheduled', rotation_id = NULL, fired_at = NULL
             WHERE status = 'fired';
            UPDATE schedule_slots SET due_at = slot WHERE due_at < slot;
            """
        )
        if due:
            conn.execute(
                "UPDATE schedule_slots SET due_at = now() - interval '1 minute' WHERE credential"
                " IN (SELECT 'svc-' || g FROM generate_series(1, %s) AS g)",
                (due,),
            )


def test_scheduler_tick_at_scale() -> None:
    n = benchlib.env_int("BENCH_SCHED_N", 100_000)
    profile = os.environ.get("BENCH_SCHED_PROFILE")  # a file: cProfile stats of a 1,000 tick
    with benchlib.fresh_db("kt_sched") as name:
        url = benchlib.sa_url(name)
        upgrade(url)
        store = SqlStore(url)
        names = [f"svc-{i}" for i in range(1, n + 1)]
        book = ScheduleBook(policies=dict.fromkeys(names, POLICY), batch=1000)
        fingerprint = book.fingerprint(names[0])
        assert fingerprint is not None
        started = time.monotonic()
        _seed(benchlib.libpq(name), n, fingerprint)
        seeded_s = time.monotonic() - started

        db_seconds = [0.0]
        statements = [0]

        @event.listens_for(store.engine, "before_cursor_execute")
        def _before(
            conn: Any, cursor: Any, statement: Any, params: Any, ctx: Any, many: Any
        ) -> None:
            conn.info["t"] = time.perf_counter()

        @event.listens_for(store.engine, "after_cursor_execute")
        def _after(
            conn: Any, cursor: Any, statement: Any, params: Any, ctx: Any, many: Any
        ) -> None:
            db_seconds[0] += time.perf_counter() - conn.info.pop("t", time.perf_counter())
            statements[0] += 1

        config = (
            discovered()
            .kind(KIND)
            .config_model.model_validate({"kind": KIND, "provider": "sandbox"})
        )

        class _Clock:
            def now(self) -> datetime:
                return datetime.now(UTC)

        clock = _Clock()
        deps = EngineDeps(
            store=store,
            vault=None,  # type: ignore[arg-type]
            keys=CryptoKeys(),
            clock=clock,
            services=_Services(config),  # type: ignore[arg-type]
            registry=discovered(),
            schedule=book,
            slots=SqlSlots(store),
            schedule_time=ScheduleTime(clock),
        )
        scheduler = Scheduler(deps, owner="bench")
        figures: dict[str, Any] = {"credentials": n, "seed_seconds": round(seeded_s, 1)}
        for due, ticks in ((0, 200), (10, 50), (1000, 5)):
            walls, dbs, stmts, fired = [], [], [], 0
            for _ in range(ticks):
                _make_due(benchlib.libpq(name), due)
                db_seconds[0], statements[0] = 0.0, 0
                t = time.perf_counter()
                if profile and due == 1000:
                    import cProfile

                    prof = cProfile.Profile()
                    fired += prof.runcall(asyncio.run, scheduler.tick())
                    prof.dump_stats(profile)
                else:
                    fired += asyncio.run(scheduler.tick())
                walls.append((time.perf_counter() - t) * 1000)
                dbs.append(db_seconds[0] * 1000)
                stmts.append(statements[0])
            figures[f"due_{due}"] = {
                "ticks": ticks,
                "fired_per_tick": fired / ticks,
                "tick_ms_p50": benchlib.percentile(walls, 50),
                "tick_ms_p99": benchlib.percentile(walls, 99),
                "db_ms_p50": benchlib.percentile(dbs, 50),
                "db_ms_p99": benchlib.percentile(dbs, 99),
                "statements_per_tick_p50": benchlib.percentile(stmts, 50),
            }
        _make_due(benchlib.libpq(name), 10)
        with psycopg.connect(benchlib.libpq(name)) as conn:
            plan = conn.execute(
                "EXPLAIN (ANALYZE, BUFFERS) SELECT * FROM schedule_slots WHERE status = "
                "'scheduled' AND due_at <= now() ORDER BY due_at LIMIT 1010"
            ).fetchall()
        figures["explain_due_query"] = [r[0] for r in plan]
        store.close()
        benchlib.write_result("scheduler_tick", figures)
