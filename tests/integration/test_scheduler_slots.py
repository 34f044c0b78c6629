"""The scheduler against a real store (SQLite, PostgreSQL), several schedulers at once in one
process, on a controlled clock: each slot fires exactly once; after downtime one rotation per
credential; a scheduler whose policy gives another fingerprint fires nothing; a credential with
an unfinished rotation is not rotated again and its slot says why. (The same with worker
processes: tests/e2e/test_schedule_fleet.py.)"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text

from keyturn.adapters.keys import CryptoKeys
from keyturn.adapters.store.slots import SqlSlots
from keyturn.adapters.store.sql import SqlStore
from keyturn.domain.lifecycle import State
from keyturn.domain.model import CredentialKind, Event, ManagedCredential, SealedSecret
from keyturn.domain.schedule import Policy
from keyturn.engine.registry import discovered
from keyturn.engine.run import EngineDeps
from keyturn.engine.schedtime import ScheduleBook, ScheduleTime
from keyturn.engine.scheduler import Scheduler
from keyturn.engine.spi import CredentialConfig
from keyturn.ports import Change

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
N = 40


class Services:
    """What the scheduler asks of the composition root: the credentials' configuration."""

    def __init__(self, configs: dict[str, CredentialConfig]) -> None:
        self.configs = configs

    def credential_config(self, name: str) -> CredentialConfig:
        return self.configs[name]


class Clock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def now(self) -> datetime:
        return self.at


def _deps(store: SqlStore, clock: Clock, policy: Policy, names: list[str]) -> EngineDeps:
    book = ScheduleBook(policies={n: policy for n in names}, tick_seconds=0.05, batch=1000)
    model = discovered().kind("service_account").config_model
    configs: dict[str, CredentialConfig] = {
        n: model.model_validate({"kind": "service_account", "provider": "sandbox"}) for n in names
    }
    return EngineDeps(
        store=store,
        vault=None,  # type: ignore[arg-type]  # the scheduler opens no secret
        keys=CryptoKeys(),
        clock=clock,
        services=Services(configs),  # type: ignore[arg-type]
        registry=discovered(),
        schedule=book,
        slots=SqlSlots(store),
        schedule_time=ScheduleTime(clock),
    )


def _seed(store: SqlStore) -> list[str]:
    names = [f"sa-{i:03d}" for i in range(N)]
    for i, n in enumerate(names):
        store.add_credential(
            ManagedCredential(
                name=n,
                kind=CredentialKind.SERVICE_ACCOUNT,
                provider="sandbox",
                credential_id=f"cid-{i}",
                credential_uuid=f"cr-{i}",
                key_ref=f"sec-{i}",
                algorithm="ed25519",
            ),
            [SealedSecret(f"sec-{i}", "private_key", "mk", b"n" * 12, b"sealed")],
        )
    return names


def _count(store: SqlStore, sql: str) -> dict[str, int]:
    with store.engine.connect() as conn:
        return {r[0]: int(r[1]) for r in conn.execute(text(sql)).all()}


def _finish_all(store: SqlStore, clock: Clock, *, new_key: bool) -> None:
    """What a worker's run does at the end (the state final; with a new key the credential's
    row is rewritten, which records the new key's time)."""
    for r in store.list_rotations():
        if r.finished:
            continue
        cred = store.get_credential(r.credential)
        store.commit(
            Change(
                r.id,
                r.version,
                updates={"state": State.CANCELLED, "finished_at": clock.now()},
                events=[Event(r.id, clock.now(), "transition", "test", to_state="cancelled")],
                credential=replace(cred, credential_id=cred.credential_id + "'")
                if new_key
                else None,
            )
        )


@pytest.fixture
def world(db_url: str) -> Any:
    clock = Clock(T0)
    store = SqlStore(db_url, clock=clock.now)
    try:
        yield store, clock, _seed(store)
    finally:
        store.close()


def test_each_slot_fires_once_with_three_schedulers_and_once_after_downtime(world: Any) -> None:
    store, clock, names = world
    hourly = Policy("hourly", every=timedelta(hours=1))
    schedulers = [Scheduler(_deps(store, clock, hourly, names), owner=f"w{i}") for i in range(3)]

    async def all_at_once(what: str) -> list[int]:
        return list(await asyncio.gather(*(getattr(s, what)() for s in schedulers)))

    # the credentials were imported at T0: the first slot is at T0+1h
    planned = asyncio.run(all_at_once("plan_all"))
    assert sum(planned) == N  # each credential planned once, whoever planned it
    assert asyncio.run(all_at_once("tick")) == [0, 0, 0]  # nothing due yet
    clock.at = T0 + timedelta(hours=1, minutes=1)
    assert sum(asyncio.run(all_at_once("tick"))) == N
    assert sum(asyncio.run(all_at_once("tick"))) == 0  # fired already
    per_cred = _count(store, "SELECT credential, count(*) FROM rotations GROUP BY credential")
    assert per_cred == dict.fromkeys(names, 1)
    fired = _count(
        store, "SELECT credential, count(*) FROM schedule_slots WHERE status = 'fired' GROUP BY 1"
    )
    assert fired == dict.fromkeys(names, 1)

    # the rotations end with new keys (the worker that ends one plans its next slot); then
    # every worker is down for three slots
    clock.at = T0 + timedelta(hours=1, minutes=5)
    _finish_all(store, clock, new_key=True)
    for i, n in enumerate(names):
        asyncio.run(schedulers[i % 3].finished(n))
    clock.at = T0 + timedelta(hours=4, minutes=30)
    assert sum(asyncio.run(all_at_once("plan_all"))) == 0  # restarted: nothing to plan
    assert sum(asyncio.run(all_at_once("tick"))) == N
    assert sum(asyncio.run(all_at_once("tick"))) == 0
    per_cred = _count(store, "SELECT credential, count(*) FROM rotations GROUP BY credential")
    assert per_cred == dict.fromkeys(names, 2)  # one for the three missed slots, not three
    slots = SqlSlots(store).slots_of(names[0])
    assert [s.status for s in slots] == ["fired", "fired"]
    late = slots[0]
    assert late.fired_at is not None and late.fired_at - late.slot > timedelta(hours=2)


def test_another_policy_fingerprint_does_not_fire(world: Any) -> None:
    store, clock, names = world
    hourly = Scheduler(_deps(store, clock, Policy("h", every=timedelta(hours=1)), names), owner="a")
    other = Scheduler(_deps(store, clock, Policy("h", every=timedelta(hours=2)), names), owner="b")
    assert asyncio.run(hourly.plan_all()) == N
    assert asyncio.run(other.plan_all()) == 0  # the credentials have their slot
    clock.at = T0 + timedelta(hours=1, minutes=1)
    assert asyncio.run(other.tick()) == 0  # not its fingerprint: left alone
    assert len(other._foreign) == N
    assert asyncio.run(hourly.tick()) == N
    assert asyncio.run(other.tick()) == 0
    assert len(store.list_rotations()) == N


def test_a_slot_no_live_worker_of_its_policy_fires_is_taken_over(world: Any) -> None:
    """Every worker's config changed: the slots planned by the old one are replanned by the
    new one once they are FOREIGN_GRACE overdue, and fire once."""
    store, clock, names = world
    old = Scheduler(_deps(store, clock, Policy("h", every=timedelta(hours=1)), names), owner="a")
    new = Scheduler(_deps(store, clock, Policy("h", every=timedelta(hours=2)), names), owner="b")
    assert asyncio.run(old.plan_all()) == N
    clock.at = T0 + timedelta(hours=1, minutes=5)  # due, seen by the new worker: left alone
    assert asyncio.run(new.tick()) == 0
    clock.at = T0 + timedelta(hours=1, minutes=5, seconds=30)
    assert asyncio.run(new.tick()) == 0  # within the grace
    clock.at = T0 + timedelta(hours=2, minutes=30)  # past the grace and past the new slot
    asyncio.run(new.tick())  # takes the slots over (and may fire some at once)
    asyncio.run(new.tick())
    assert len(store.list_rotations()) == N
    assert asyncio.run(old.tick()) == 0  # its slots were superseded or re-owned
    assert asyncio.run(new.tick()) == 0
    assert _count(store, "SELECT credential, count(*) FROM rotations GROUP BY credential") == (
        dict.fromkeys(names, 1)
    )


def test_an_unfinished_rotation_is_not_rotated_again_and_says_so(world: Any) -> None:
    store, clock, names = world
    sched = Scheduler(_deps(store, clock, Policy("h", every=timedelta(hours=1)), names), owner="a")
    asyncio.run(sched.plan_all())
    clock.at = T0 + timedelta(hours=1, minutes=1)
    assert asyncio.run(sched.tick()) == N
    halted = store.latest_rotation(names[0])
    assert halted is not None
    store.commit(Change(halted.id, halted.version, updates={"halted_reason": "provider said no"}))
    clock.at = T0 + timedelta(hours=1, minutes=2)
    _finish_all_but(store, clock, halted.id)
    for n in names:
        asyncio.run(sched.finished(n))
    clock.at = T0 + timedelta(hours=3)
    assert asyncio.run(sched.tick()) == N - 1
    slot = SqlSlots(store).scheduled_slots([names[0]]).get(names[0])
    assert slot is not None and slot.note is not None
    assert f"rotation {halted.id} is unfinished (halted: provider said no)" in slot.note
    assert slot.due_at > clock.at  # looked at again later, not every tick
    assert len(store.list_rotations(credential=names[0])) == 1


def _finish_all_but(store: SqlStore, clock: Clock, keep: str) -> None:
    for r in store.list_rotations():
        if r.finished or r.id == keep:
            continue
        cred = store.get_credential(r.credential)
        store.commit(
            Change(
                r.id,
                r.version,
                updates={"state": State.CANCELLED, "finished_at": clock.now()},
                credential=replace(cred, credential_id=cred.credential_id + "'"),
            )
        )
