"""What /metrics reads from the SQL store (SQLite and PostgreSQL): the GROUP BY queries of
keyturn.adapters.store.metrics_read say what reading every row and applying the engine's own
definitions (status_key, attention) says, on rotations in every status; and the collector's
text parses, with the store's absence reported as keyturn_store_up 0."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from keyturn.adapters.store.slots import SqlSlots
from keyturn.adapters.store.sql import SqlStore
from keyturn.domain.errors import StoreUnavailable
from keyturn.domain.lifecycle import State
from keyturn.domain.model import (
    Event,
    ManagedCredential,
    OperatorAction,
    OperatorRequest,
    Rotation,
    Slot,
    WorkerRecord,
)
from keyturn.engine.attention import attention, status_key
from keyturn.engine.fleet import attention_summary, by_state_and_status
from keyturn.ports import Change
from keyturn.web.metrics import FleetCollector, scraper

NOW = datetime.now(UTC).replace(microsecond=0)


class _Clock:
    def now(self) -> datetime:
        return NOW


@pytest.fixture
def sql(db_url: str) -> Any:
    store = SqlStore(db_url)
    yield store
    store.close()


class _Seed:
    """Credentials and rotations, each rotation on a credential of its own unless named."""

    def __init__(self, store: SqlStore) -> None:
        self.store, self.n = store, 0
        self.at = NOW - timedelta(hours=2)

    def rotation(self, credential: str, kind: str = "service_account") -> Rotation:
        self.n += 1
        if credential not in {c.name for c in self.store.list_credentials()}:
            self.store.add_credential(
                ManagedCredential(credential, kind, "sandbox", f"cid-{self.n}", f"cr-{self.n}",
                                  None, "ed25519", created_at=self.at, updated_at=self.at),
                [],
            )  # fmt: skip
        rotation = Rotation(f"rot-{self.n:04d}", credential, kind, State.PENDING, 1, "seed",
                            self.at, self.at, next_attempt_at=self.at)  # fmt: skip
        return self.store.create_rotation(rotation, _operator(rotation.id, "create", None))


def _seed(store: SqlStore) -> dict[str, str]:
    seed = _Seed(store)
    ids: dict[str, str] = {}
    hour = timedelta(hours=1)
    shapes: dict[str, dict[str, Any]] = {
        "due": {},
        "retrying": {"attempts": 2, "last_error": "503", "next_attempt_at": NOW + hour},
        "halted": {"state": State.NEW_ADDED, "attempts": 5, "halted_reason": "budget spent"},
        "halted-empty-reason": {"halted_reason": ""},  # falsy: not halted, as status_key says
        "paused": {"paused": True},
        "approval": {"wait_key": "gate.approval.before_start", "wait_for": "an approval",
                     "wait_since": NOW - 2 * hour, "wait_deadline": NOW + 5 * hour},
        "waiting-long": {"state": State.VERIFIED, "wait_key": "forward.probe",
                         "wait_for": "holder probes", "wait_since": NOW - 3 * hour,
                         "wait_deadline": NOW + hour, "next_attempt_at": NOW + hour},
        "waiting": {"state": State.VERIFIED, "wait_key": "forward.probe", "wait_for": "probes",
                    "wait_since": NOW, "wait_deadline": NOW + 9 * hour},
        "running": {"state": State.NEW_ADDED, "lease_owner": "w-live",
                    "lease_expires_at": NOW + hour},
        "holder-lost": {"state": State.NEW_ADDED, "lease_owner": "w-dead",
                        "lease_expires_at": NOW - 3 * hour},
        "done": {"state": State.OLD_DEACTIVATED, "finished_at": NOW - hour},
        "rolled-back": {"state": State.ROLLED_BACK, "finished_at": NOW - hour},
        "cancelled": {"state": State.CANCELLED, "finished_at": NOW},
    }  # fmt: skip
    for name, updates in shapes.items():
        r = seed.rotation(f"c-{name}")
        if updates:
            r = store.commit(Change(r.id, r.version, updates=updates))
        ids[name] = r.id
    # a second, later success of the done credential's key, and a requested rotation
    done_again = seed.rotation("c-done")
    store.commit(
        Change(
            done_again.id,
            done_again.version,
            updates={"state": State.OLD_DEACTIVATED, "finished_at": NOW - timedelta(minutes=5)},
        )
    )
    ids["done-again"] = done_again.id
    requested = seed.rotation("c-requested", kind="webhook")
    at = NOW - timedelta(minutes=20)
    store.request(
        requested.id,
        OperatorRequest(OperatorAction.PAUSE, "op", "why", at),
        _operator(requested.id, "pause", "requested"),
    )
    ids["requested"] = requested.id
    # the event log: transitions and operator actions of every outcome
    for rid, source, dest in (
        (ids["done"], "pending", "new_added"),
        (ids["done"], "new_added", "verified"),
        (ids["done"], "verified", "old_deactivated"),
        (ids["done-again"], "pending", "new_added"),
        (ids["requested"], "pending", "new_added"),
    ):
        store.append_event(
            Event(rid, NOW, "transition", "w", from_state=source, to_state=dest, trigger="t")
        )
    for rid, verb, status in (
        (ids["halted"], "resume", "refused: rotation rot-1 is not halted (it is running)"),
        (ids["halted"], "resume", "refused: another reason"),
        (ids["paused"], "pause", "applied"),
        (ids["due"], "create", None),
        (ids["due"], "retry-now", "applied"),
        (ids["due"], "cancel", "something else"),
    ):
        store.append_event(_operator(rid, verb, status))
    SqlSlots(store).plan_slot(
        Slot("c-due", NOW + hour, NOW + 2 * hour, "fp", "default", None, "every 30d")
    )
    for owner, beat, stopped in (
        ("w-live", NOW, None),
        ("w-dead", NOW - 3 * hour, None),
        ("w-gone", NOW - hour, NOW - hour),
    ):
        store.register_worker(
            WorkerRecord(owner, "h", 1, NOW - 4 * hour, beat, 8, 10.0, 30.0, stopped_at=stopped)
        )
    return ids


def _operator(rid: str, verb: str, status: str | None) -> Event:
    detail = {"status": status} if status is not None else {"options": {}}
    return Event(rid, NOW, "operator", "op", trigger=verb, reason="r", detail=detail)


def test_fleet_facts_agree_with_every_row_read_and_the_engine_definitions(
    sql: SqlStore,
) -> None:
    ids = _seed(sql)
    facts = sql.fleet_facts(NOW)
    rotations = sql.list_rotations()
    expected = Counter((r.state.value, status_key(r)) for r in rotations)
    assert by_state_and_status(facts.rotations) == dict(expected)
    # every status of engine.attention occurs in the seed (so the check above covers them)
    assert {s for _, s in expected} == {
        "due", "retrying", "halted", "paused", "awaiting_approval", "waiting", "running",
        "requested", "done",
    }  # fmt: skip

    kinds = {r.id: r.kind for r in rotations}
    transitions = Counter(
        (e.from_state or "", e.to_state or "", kinds[r.id])
        for r in rotations
        for e in sql.events(r.id)
        if e.kind == "transition"
    )
    assert facts.transitions == dict(transitions)
    assert facts.transitions[("pending", "new_added", "service_account")] == 2
    assert facts.transitions[("pending", "new_added", "webhook")] == 1

    assert facts.operator_actions == {
        ("pause", "requested"): 1,
        ("pause", "applied"): 1,
        ("resume", "refused"): 2,
        ("create", "applied"): len(rotations) + 1,  # each rotation's first event, and one more
        ("retry-now", "applied"): 1,
        ("cancel", "other"): 1,
    }
    ms = 1e-3  # Unix seconds computed by the database: to the millisecond at least
    keys = {c.name: c.updated_at.timestamp() for c in sql.list_credentials() if c.updated_at}
    assert facts.keys_created == pytest.approx(keys, abs=ms)
    assert facts.next_rotations == pytest.approx(
        {"c-due": (NOW + timedelta(hours=2)).timestamp()}, abs=ms
    )
    assert facts.last_successes == pytest.approx(
        {"c-done": (NOW - timedelta(minutes=5)).timestamp()}, abs=ms
    )

    # the candidates hold every rotation that needs attention (attention() decides)
    needing = {r.id for r in rotations if attention(r, NOW) is not None}
    assert {r.id for r in facts.attention_candidates if attention(r, NOW)} == needing
    assert needing == {ids[n] for n in ("retrying", "halted", "approval", "waiting-long",
                                        "holder-lost", "requested")}  # fmt: skip
    summary = attention_summary(facts.attention_candidates, NOW)
    assert summary.count == len(needing)
    # the oldest: the holder lost 3 hours ago (its lease's expiry)
    assert summary.oldest_age_seconds == pytest.approx(3 * 3600, abs=1)
    assert {w.owner: w.status(NOW) for w in facts.workers} == {
        "w-live": "live",
        "w-dead": "stale",
        "w-gone": "stopped",
    }


def test_the_collector_text_parses_and_reports_an_absent_store(sql: SqlStore) -> None:
    _seed(sql)
    text = scraper([FleetCollector(sql, _Clock())])().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    assert samples[("keyturn_store_up", ())] == 1
    assert samples[("keyturn_rotations", (("state", "pending"), ("status", "halted")))] == 0
    assert samples[("keyturn_rotations", (("state", "new_added"), ("status", "halted")))] == 1
    assert samples[("keyturn_rotations", (("state", "old_deactivated"), ("status", "done")))] == 2
    key = ("keyturn_transitions_total", (("from", "pending"), ("kind", "service_account"),
                                         ("to", "new_added")))  # fmt: skip
    assert samples[key] == 2
    assert samples[("keyturn_operator_actions_total", (("outcome", "refused"),
                                                       ("verb", "resume")))] == 2  # fmt: skip
    assert samples[("keyturn_attention_rotations", ())] == 6
    assert samples[("keyturn_worker_last_heartbeat_timestamp_seconds", (("worker", "w-dead"),))] \
        == (NOW - timedelta(hours=3)).timestamp()  # fmt: skip
    assert ("keyturn_worker_last_heartbeat_timestamp_seconds", (("worker", "w-gone"),)) \
        not in samples  # fmt: skip
    assert samples[("keyturn_workers", (("status", "stopped"),))] == 1
    next_at = ("keyturn_credential_next_rotation_timestamp_seconds", (("credential", "c-due"),))
    assert samples[next_at] == (NOW + timedelta(hours=2)).timestamp()
    # bounded labels: no rotation id, no error text anywhere in the exposition
    assert "rot-" not in text and "budget spent" not in text and "another reason" not in text

    class Away:
        def fleet_facts(self, now: datetime) -> Any:
            raise StoreUnavailable("the database at sqlite:///x is unavailable")

    away = scraper([FleetCollector(Away(), _Clock())])().decode()
    assert [(s.name, s.value) for f in text_string_to_metric_families(away) for s in f.samples] \
        == [("keyturn_store_up", 0.0)]  # fmt: skip


def test_a_scrape_reads_one_snapshot_and_blocks_no_writer(sql: SqlStore) -> None:
    """While the reads of a scrape run, a worker's write commits at once (no write lock held on
    SQLite) and the scrape does not see it half-way (one snapshot on both databases)."""
    import time

    from sqlalchemy import func, select

    from keyturn.adapters.store.metrics_read import _snapshot
    from keyturn.adapters.store.models import workers_t

    other = SqlStore(sql.engine.url.render_as_string(hide_password=False))
    try:
        with _snapshot(sql) as conn:
            count = select(func.count()).select_from(workers_t)
            before = conn.execute(count).scalar_one()
            started = time.monotonic()
            other.register_worker(WorkerRecord("w-new", "h", 1, NOW, NOW, 8, 10.0, 30.0))
            assert time.monotonic() - started < 2, "the write waited for the scrape's lock"
            assert conn.execute(count).scalar_one() == before
        assert [w.owner for w in sql.list_workers()] == ["w-new"]
    finally:
        other.close()
