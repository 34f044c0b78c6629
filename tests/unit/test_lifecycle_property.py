"""Property test: random trigger sequences, stale writes and operator requests, checked against
an independent table of allowed (state, trigger) pairs written here (not derived from the graph);
replaying the event log reproduces the stored state. Runs on the in-memory and SQLite stores."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
from fakes import builtin_registry
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyturn.adapters.store.memory import MemoryStore
from keyturn.adapters.store.migrate import upgrade
from keyturn.adapters.store.sql import SqlStore
from keyturn.domain.errors import KeyturnError, StaleVersion
from keyturn.domain.lifecycle import State, Trigger
from keyturn.domain.model import (
    CredentialKind,
    ManagedCredential,
    OperatorAction,
    Rotation,
    SealedSecret,
)
from keyturn.engine.operator import apply_request, record_request
from keyturn.engine.run import EngineDeps, RotationRun
from keyturn.ports import Change, Store

REGISTRY = builtin_registry()

# The lifecycle, written out by hand: (state, trigger) -> destination.
ALLOWED: dict[tuple[str, str], str] = {
    ("pending", "add_new"): "new_added",
    ("new_added", "verify"): "verified",
    ("verified", "deactivate_old"): "old_deactivated",
    ("pending", "rollback"): "rolling_back",
    ("new_added", "rollback"): "rolling_back",
    ("verified", "rollback"): "rolling_back",
    ("old_deactivated", "rollback"): "rolling_back",
    ("rolling_back", "finish_rollback"): "rolled_back",
    ("pending", "cancel"): "cancelled",
}
FINAL = {"old_deactivated", "rolled_back", "cancelled"}

# Operator requests, by hand, for a rotation with no recorded intent (as in this test):
# cancel only from pending; rollback only where something may have happened (not pending).
REQUEST_OK: dict[str, set[str]] = {
    "cancel": {"pending"},
    "rollback": {"new_added", "verified", "old_deactivated"},
}


class Clock:
    def now(self) -> datetime:
        return datetime.now(UTC)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("fire"), st.sampled_from([t.value for t in Trigger])),
        st.tuples(st.just("stale"), st.integers(min_value=1, max_value=3)),
        st.tuples(st.just("request"), st.sampled_from([a.value for a in OperatorAction])),
        st.tuples(st.just("apply"), st.just("")),
    ),
    max_size=25,
)

_names = itertools.count()


def _new_rotation(store: Store) -> Rotation:
    name = f"c{next(_names)}"
    store.add_credential(
        ManagedCredential(
            name=name,
            kind=CredentialKind.SERVICE_ACCOUNT,
            provider="p",
            credential_id="id",
            credential_uuid="cr-1",
            key_ref=f"sec_{name}",
            algorithm="ed25519",
        ),
        # the old key a rollback needs (retained: never purged here)
        [SealedSecret(f"sec_{name}", "private_key", "mk", b"n" * 12, b"sealed", Clock().now())],
    )
    now = Clock().now()
    from keyturn.domain.model import Event

    rotation = Rotation(
        id=f"rot_{name}",
        credential=name,
        kind=CredentialKind.SERVICE_ACCOUNT,
        state=State.PENDING,
        version=1,
        reason="property",
        created_at=now,
        updated_at=now,
        data={
            "old_credential_id": "id",
            "old_credential_uuid": "cr-1",
            "old_key_ref": f"sec_{name}",
            "old_algorithm": "ed25519",
        },
    )
    return store.create_rotation(
        rotation,
        Event(rotation_id=rotation.id, at=now, kind="operator", actor="t", trigger="create"),
    )


def check_sequence(store: Store, sequence: list[tuple[str, Any]]) -> None:
    rotation = _new_rotation(store)
    deps = EngineDeps(
        store=store,
        vault=cast(Any, None),
        keys=cast(Any, None),
        clock=Clock(),
        services=cast(Any, None),
        registry=REGISTRY,
    )
    run = RotationRun(deps, rotation, "prop")
    expected = "pending"
    pending_request: str | None = None
    paused = False

    async def play() -> None:
        nonlocal expected, pending_request, paused
        for op, arg in sequence:
            before = store.get_rotation(rotation.id)
            if op == "fire":
                dest = ALLOWED.get((expected, arg))
                try:
                    await run.transition(Trigger(arg))
                except KeyturnError:
                    assert dest is None, f"{expected} --{arg}--> should go to {dest}"
                    assert store.get_rotation(rotation.id) == before  # nothing written
                else:
                    assert dest is not None, f"{expected} --{arg}--> should be refused"
                    expected = dest
            elif op == "stale":
                with pytest.raises(StaleVersion):
                    store.commit(
                        Change(
                            rotation.id,
                            before.version - arg,
                            updates={"state": State.CANCELLED},
                            events=[],
                        )
                    )
                assert store.get_rotation(rotation.id) == before
            elif op == "request":
                if (expected in FINAL and arg != "rollback") or pending_request is not None:
                    ok = False
                elif arg in REQUEST_OK:
                    ok = expected in REQUEST_OK[arg]
                elif arg in ("approve", "deny"):
                    ok = False  # no policy gate here: nothing ever awaits approval
                elif arg == "release-lease":
                    ok = False  # no worker holds a lease here: there is none to release
                elif arg == "pause":
                    ok = not paused
                else:  # resume
                    ok = paused
                try:
                    record_request(
                        store, REGISTRY, Clock(), rotation.id, OperatorAction(arg), "op", "why"
                    )
                except KeyturnError:
                    assert not ok, f"request {arg} in {expected} should be accepted"
                    assert store.get_rotation(rotation.id) == before
                else:
                    assert ok, f"request {arg} in {expected} should be refused"
                    after = store.get_rotation(rotation.id)
                    assert after.version == before.version  # requests never fence the holder
                    pending_request = arg
                # the lease holder re-reads the row (as at an action boundary)
                run.unit.rotation = store.get_rotation(rotation.id)
            elif op == "apply" and pending_request is not None:
                applied = await apply_request(run)
                # The state may have moved on since the request was accepted: then the holder
                # refuses it (with the reason) and clears it.
                still_ok = {
                    "pause": expected not in FINAL and not paused,
                    "resume": expected not in FINAL and paused,
                }.get(pending_request, expected in REQUEST_OK.get(pending_request, set()))
                if not still_ok:
                    assert applied.outcome.startswith("refused: "), applied
                    assert store.get_rotation(rotation.id).request is None
                    pending_request = None
                    continue
                assert applied.outcome == "applied"
                if pending_request == "pause":
                    paused = True
                elif pending_request == "resume":
                    paused = False
                else:
                    expected = ALLOWED[(expected, pending_request)]
                    paused = False
                pending_request = None
            stored = store.get_rotation(rotation.id)
            assert stored.state.value == expected
            assert (stored.finished_at is not None) == (expected in FINAL)

    asyncio.run(play())
    # Replaying the event log reproduces the stored state.
    state = "pending"
    for e in store.events(rotation.id):
        if e.kind == "transition":
            assert e.from_state == state
            assert ALLOWED[(state, str(e.trigger))] == e.to_state
            state = str(e.to_state)
    assert state == store.get_rotation(rotation.id).state.value == expected


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sequence=ops)
def test_memory_store(sequence: list[tuple[str, Any]]) -> None:
    check_sequence(MemoryStore(), sequence)


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory: pytest.TempPathFactory) -> SqlStore:
    path: Path = tmp_path_factory.mktemp("prop") / "p.db"
    upgrade(f"sqlite:///{path}")
    return SqlStore(f"sqlite:///{path}")


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(sequence=ops)
def test_sqlite_store(sqlite_store: SqlStore, sequence: list[tuple[str, Any]]) -> None:
    check_sequence(sqlite_store, sequence)
