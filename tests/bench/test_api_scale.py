"""The HTTP API's reads at fleet scale (issue 14): BENCH_API_N rotations (100,000) in a fresh
PostgreSQL database, seeded with bulk INSERTs (5 rotations per credential: 4 finished, the
latest in one of every status, ~1.5% of them needing attention; 5 events and 3 action records
each), served by the real app on uvicorn in this process; p50/p99 over BENCH_API_REQUESTS
requests (50) of

- the first page of ``GET /v1/rotations`` (50 rows),
- the first page of ``GET /v1/rotations?attention=true``,
- ``GET /v1/rotations?status=halted``, and the second page (a cursor) of the plain list,
- a rotation's detail ``GET /v1/rotations/{id}`` (timeline, actions, lease holder),

and EXPLAIN ANALYZE of the list queries the store sends. Reports, never asserts.

    BENCH_API_N=100000 .venv/bin/pytest -q -s tests/bench/test_api_scale.py
"""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import benchlib
import httpx
import psycopg
import pytest

from keyturn.adapters.store.migrate import upgrade
from keyturn.adapters.store.sql import SqlStore
from keyturn.domain.model import Role
from keyturn.engine.access import create_token
from keyturn.engine.registry import discovered

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(3600)]

PER_CREDENTIAL = 5


def _seed(url: str, n: int) -> None:
    creds = max(1, n // PER_CREDENTIAL)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            f"""
            INSERT INTO secrets (id, purpose, master_key_id, nonce, ciphertext, created_at)
            SELECT 'sec-' || g, 'private_key', 'mk', '\\x00', '\\x00', now()
              FROM generate_series(1, {creds}) AS g;
            INSERT INTO credentials (name, kind, provider, credential_id, credential_uuid,
                                     key_ref, algorithm, token_ref, created_at, updated_at)
            SELECT 'svc-' || g, 'service_account', 'sandbox', 'cid-' || g, 'cr-' || g,
                   'sec-' || g, 'ed25519', NULL, now() - interval '400 days', now()
              FROM generate_series(1, {creds}) AS g;
            -- rotation g: credential 1 + g % creds, the (g / creds)-th of it; the last round
            -- (g > (PER-1) * creds) is each credential's latest, left unfinished in a mix of
            -- statuses (1 in 8 of those, i.e. 1.5%: attention), the rest finished
            INSERT INTO rotations (id, credential, kind, state, version, reason, created_at,
                                   updated_at, next_attempt_at, lease_owner, lease_expires_at,
                                   attempts, last_error, halted_reason, paused, finished_at,
                                   wait_key, wait_for, wait_since, wait_deadline, data)
            SELECT 'rot_' || lpad(g::text, 20, '0'),
                   'svc-' || (1 + g % {creds}),
                   'service_account',
                   CASE WHEN latest THEN
                        (ARRAY['pending','new_added','verified','new_added'])[1 + g % 4]
                        ELSE 'old_deactivated' END,
                   7, 'bench',
                   now() - (({n} - g) * interval '1 minute'),
                   now() - (({n} - g) * interval '1 minute') + interval '30 seconds',
                   CASE WHEN latest AND g % 8 = 1 THEN now() + interval '1 hour' END,
                   CASE WHEN latest AND g % 8 = 2 THEN 'bench-worker' END,
                   CASE WHEN latest AND g % 8 = 2 THEN now() + interval '1 hour' END,
                   CASE WHEN latest AND g % 8 = 1 THEN 2 ELSE 0 END,
                   CASE WHEN latest AND g % 8 = 1 THEN 'provider answered 503' END,
                   CASE WHEN latest AND g % 64 = 0 THEN 'retry budget spent: 503' END,
                   latest AND g % 8 = 3,
                   CASE WHEN NOT latest THEN now() - (({n} - g) * interval '1 minute') END,
                   CASE WHEN latest AND g % 8 = 4 THEN 'forward.probe' END,
                   CASE WHEN latest AND g % 8 = 4 THEN 'holder probes' END,
                   CASE WHEN latest AND g % 8 = 4 THEN now() - interval '1 minute' END,
                   CASE WHEN latest AND g % 8 = 4 THEN now() + interval '1 hour' END,
                   '{{}}'::json
              FROM (SELECT g, g > {(PER_CREDENTIAL - 1) * creds} AS latest
                      FROM generate_series(1, {n}) AS g) AS s;
            INSERT INTO events (rotation_id, at, kind, actor, from_state, to_state, trigger,
                                reason, detail)
            SELECT r.id, r.created_at + e * interval '1 second', 'transition', 'bench-worker',
                   'pending', 'new_added', 'add_new', 'bench', '{{}}'::json
              FROM rotations r, generate_series(1, 5) AS e;
            INSERT INTO actions (rotation_id, phase, name, seq, idempotency_key, status,
                                 intent_at, outcome_at, attempts, detail)
            SELECT r.id, 'forward', 'action-' || a, a, r.id || ':' || a, 'done', r.created_at,
                   r.created_at, 1, '{{}}'::json
              FROM rotations r, generate_series(1, 3) AS a;
            """  # noqa: S608 - integers of ours, no input
        )
        conn.execute("VACUUM ANALYZE")


def _backend(store: SqlStore) -> Any:
    from keyturn.cli.wiring import SystemClock
    from keyturn.web.app import Backend

    def nothing(*_: Any) -> Any:
        raise AssertionError("not used by the bench")

    return Backend(
        store=store,
        access=store,
        registry=discovered(),
        clock=SystemClock(),
        lease_seconds=30.0,
        max_attempts=8,
        engine_deps=nothing,
        rollback_plan=nothing,
        readiness=lambda: None,
        head_revision="bench",
        **_extra_backend_fields(nothing),
    )


def _extra_backend_fields(nothing: Any) -> dict[str, Any]:
    """Callables Backend grew after this bench was first written (None when absent)."""
    from dataclasses import fields

    from keyturn.web.app import Backend

    known = {f.name for f in fields(Backend)}
    return {name: nothing for name in ("plan", "inventory", "configured") if name in known}


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, str, str]]:
    import uvicorn

    from keyturn.web.app import create_app

    n = benchlib.env_int("BENCH_API_N", 100_000)
    with benchlib.fresh_db("kt_bench_api") as dbname:
        url = benchlib.sa_url(dbname)
        upgrade(url)
        started = time.monotonic()
        _seed(benchlib.libpq(dbname), n)
        print(f"\nseeded {n} rotations in {time.monotonic() - started:.1f}s")
        store = SqlStore(url)
        from keyturn.cli.wiring import SystemClock

        token = create_token(store, SystemClock(), name="bench", role=Role.VIEWER, actor="b")[1]
        # proto IPPROTO_TCP: asyncio sets TCP_NODELAY on the accepted sockets only then (else
        # uvicorn's two writes per response wait ~40 ms for a delayed ACK on keep-alive)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        port = sock.getsockname()[1]
        server = uvicorn.Server(
            uvicorn.Config(create_app(_backend(store)), log_config=None, access_log=False,
                           lifespan="off")
        )  # fmt: skip
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        base = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                httpx.get(base + "/healthz", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        try:
            yield base, token, dbname
        finally:
            server.should_exit = True
            thread.join(timeout=30)
            store.close()


def _timed(client: httpx.Client, path: str, requests: int, **params: Any) -> dict[str, Any]:
    times = []
    body: Any = None
    for _ in range(requests):
        t0 = time.perf_counter()
        r = client.get(path, params=params)
        times.append((time.perf_counter() - t0) * 1000)
        assert r.status_code == 200, r.text[:300]
        body = r.json()
    times.sort()
    p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]
    rows = len(body["items"]) if isinstance(body, dict) and "items" in body else None
    return {
        "p50_ms": round(statistics.median(times), 2),
        "p99_ms": round(p99, 2),
        "max_ms": round(times[-1], 2),
        "requests": requests,
        "rows": rows,
        "bytes": len(json.dumps(body)),
        "_body": body,
    }


def test_api_reads_at_scale(served: tuple[str, str, str]) -> None:
    base, token, dbname = served
    requests = benchlib.env_int("BENCH_API_REQUESTS", 50)
    n = benchlib.env_int("BENCH_API_N", 100_000)
    results: dict[str, Any] = {}
    with httpx.Client(
        base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=120
    ) as client:
        client.get("/v1/rotations")  # warm the pool
        results["list_first_page"] = _timed(client, "/v1/rotations", requests)
        cursor = results["list_first_page"]["_body"]["next_cursor"]
        results["list_second_page"] = _timed(client, "/v1/rotations", requests, cursor=cursor)
        results["attention_first_page"] = _timed(
            client, "/v1/rotations", requests, attention="true"
        )
        results["status_halted"] = _timed(client, "/v1/rotations", requests, status="halted")
        rid = results["attention_first_page"]["_body"]["items"][0]["id"]
        results["detail"] = _timed(client, f"/v1/rotations/{rid}", requests)
    for r in results.values():
        r.pop("_body")
    with psycopg.connect(benchlib.libpq(dbname), autocommit=True) as conn:
        plans = {}
        counts = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE finished_at IS NULL) FROM rotations"
        ).fetchone()
        assert counts is not None
        for label, sql in _explained().items():
            rows = conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql).fetchall()
            plans[label] = [r[0] for r in rows]
    print(
        f"\n{n} rotations ({counts[0]} stored, {counts[1]} unfinished), {requests} requests each:"
    )
    for label, r in results.items():
        print(f"  {label:22} p50 {r['p50_ms']:8.2f} ms  p99 {r['p99_ms']:8.2f} ms  "
              f"rows {r['rows']}  {r['bytes']} bytes")  # fmt: skip
    for label, lines in plans.items():
        print(f"  EXPLAIN {label}:")
        for line in lines:
            print(f"    {line}")
    benchlib.write_result(
        "api_scale",
        {"n": n, "at": datetime.now(UTC).isoformat(), "results": results, "plans": plans},
    )


def _explained() -> dict[str, str]:
    """The list queries as the store sends them now (SQL compiled with literal values)."""
    try:
        from keyturn.adapters.store.sql import rotation_query_sql
    except ImportError:  # the store of before: every row, newest first
        return {"list (every row)": "SELECT * FROM rotations ORDER BY created_at DESC, id DESC"}
    return rotation_query_sql()
