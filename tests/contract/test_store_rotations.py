"""Store contract: credentials, rotations, compare-and-set commits, events, actions, requests.

Runs against every Store (the ``store`` fixture: memory, SQLite, PostgreSQL).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest

from keyturn.domain.errors import AlreadyRotating, KeyturnError, NotFound, StaleVersion
from keyturn.domain.lifecycle import State
from keyturn.domain.model import (
    ActionRecord,
    ActionStatus,
    CredentialKind,
    OperatorAction,
    OperatorRequest,
    Phase,
)
from keyturn.ports import Change, Store

#: The seed fixture's clock (tests/conftest.py).
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def _action(rotation_id: str, name: str, key: str, **kw: object) -> ActionRecord:
    values: dict[str, object] = {
        "rotation_id": rotation_id,
        "phase": Phase.FORWARD,
        "name": name,
        "idempotency_key": key,
        "status": ActionStatus.INTENT,
        "intent_at": T0,
    }
    values.update(kw)
    return ActionRecord(**values)  # type: ignore[arg-type]


# ------------------------------------------------------------------------- credentials


def test_credentials_round_trip_and_list_by_name(store: Store, seed) -> None:
    b = seed.credential("b-cred", kind=CredentialKind.PAT, token_ref=None)
    a = seed.credential("a-cred")
    assert store.get_credential("b-cred") == b
    assert b.kind == CredentialKind.PAT  # kinds are plain names (plugins)
    assert b.created_at == T0
    assert [c.name for c in store.list_credentials()] == ["a-cred", "b-cred"]
    assert store.get_secret(a.key_ref).ciphertext.startswith(b"sealed-")


def test_duplicate_credential_name_is_refused_and_writes_nothing(store: Store, seed) -> None:
    seed.credential("svc")
    extra = seed.secret("sec-extra")
    with pytest.raises(KeyturnError, match="svc already exists"):
        store.add_credential(store.get_credential("svc"), [extra])
    with pytest.raises(NotFound):
        store.get_secret("sec-extra")


def test_credential_pointing_at_a_missing_secret_is_refused(store: Store, seed) -> None:
    with pytest.raises(KeyturnError):
        seed.credential("svc", key_ref="nowhere")
    assert store.list_credentials() == []


def test_unknown_credential_message_names_it_and_the_fix(store: Store) -> None:
    with pytest.raises(NotFound) as info:
        store.get_credential("ghost")
    assert str(info.value) == ("no managed credential named ghost; see `keyturn credentials list`")


# --------------------------------------------------------------------------- rotations


def test_create_rotation_starts_at_version_1_with_its_first_event(store: Store, seed) -> None:
    cred = seed.credential("svc")
    rotation = seed.new_rotation("svc", version=7, data={"old": {"id": "x"}, "list": [1, 2]})
    created = store.create_rotation(rotation, seed.event(rotation.id, kind="transition"))
    assert created.version == 1
    assert created == replace(rotation, version=1)
    assert store.get_rotation(rotation.id) == created
    events = store.events(rotation.id)
    assert [e.kind for e in events] == ["transition"]
    assert events[0].id is not None
    assert cred.name == created.credential


def test_create_rotation_for_unknown_credential_is_not_found(store: Store, seed) -> None:
    rotation = seed.new_rotation("ghost")
    with pytest.raises(NotFound, match="no managed credential named ghost"):
        store.create_rotation(rotation, seed.event(rotation.id))
    assert store.list_rotations() == []


def test_unknown_rotation_is_not_found_everywhere(store: Store) -> None:
    with pytest.raises(NotFound) as info:
        store.get_rotation("rot-x")
    assert str(info.value).startswith("no rotation with id rot-x")
    with pytest.raises(NotFound):
        store.events("rot-x")
    with pytest.raises(NotFound):
        store.actions("rot-x")
    with pytest.raises(NotFound):
        store.commit(Change("rot-x", 1, updates={"attempts": 1}))


def test_one_unfinished_rotation_per_credential(store: Store, seed) -> None:
    first = seed.rotation(seed.credential("svc").name)
    second = seed.new_rotation("svc")
    with pytest.raises(AlreadyRotating) as info:
        store.create_rotation(second, seed.event(second.id))
    assert info.value.rotation_id == first.id
    assert info.value.credential == "svc"
    assert first.id in str(info.value)
    # Nothing of the refused rotation was written.
    assert [r.id for r in store.list_rotations()] == [first.id]
    with pytest.raises(NotFound):
        store.get_rotation(second.id)

    # Other credentials are not affected.
    seed.rotation(seed.credential("other").name)

    # Once the first is finished, a new rotation of the same credential is allowed.
    store.commit(
        Change(
            first.id,
            1,
            updates={"state": State.CANCELLED, "finished_at": T0 + timedelta(minutes=1)},
        )
    )
    third = store.create_rotation(second, seed.event(second.id))
    assert third.version == 1
    assert store.latest_rotation("svc") == third


def test_duplicate_rotation_id_is_refused(store: Store, seed) -> None:
    first = seed.rotation(seed.credential("svc").name, finished_at=T0, state=State.CANCELLED)
    seed.credential("other")
    again = seed.new_rotation("other", id=first.id)
    with pytest.raises(KeyturnError, match="already exists"):
        store.create_rotation(again, seed.event(again.id))


def test_list_rotations_newest_first_with_filters(store: Store, seed) -> None:
    seed.credential("a")
    seed.credential("b")
    r1 = seed.rotation("a", created_at=T0, state=State.CANCELLED, finished_at=T0)
    r2 = seed.rotation("b", created_at=T0 + timedelta(seconds=1))
    r3 = seed.rotation("a", created_at=T0 + timedelta(seconds=2), state=State.NEW_ADDED)
    assert [r.id for r in store.list_rotations()] == [r3.id, r2.id, r1.id]
    assert [r.id for r in store.list_rotations(credential="a")] == [r3.id, r1.id]
    assert [r.id for r in store.list_rotations(state=State.PENDING)] == [r2.id]
    assert [r.id for r in store.list_rotations(state=State.NEW_ADDED, credential="b")] == []
    assert store.latest_rotation("a") == r3
    assert store.latest_rotation("b") == r2
    assert store.latest_rotation("nobody") is None


def test_same_created_at_orders_by_id(store: Store, seed) -> None:
    seed.credential("a")
    seed.credential("b")
    x = seed.rotation("a", id="rot-a")
    y = seed.rotation("b", id="rot-b")
    assert [r.id for r in store.list_rotations()] == [y.id, x.id]


def test_datetimes_come_back_aware_utc(store: Store, seed) -> None:
    plus2 = timezone(timedelta(hours=2))
    local = T0.astimezone(plus2)
    rotation = seed.rotation(created_at=local, next_attempt_at=local)
    got = store.get_rotation(rotation.id)
    assert got.created_at == T0
    assert got.created_at.utcoffset() == timedelta(0)
    assert got.next_attempt_at is not None and got.next_attempt_at.tzinfo is not None
    assert got.next_attempt_at.utcoffset() == timedelta(0)


def test_naive_datetimes_are_refused(store: Store, seed) -> None:
    rotation = seed.rotation()
    with pytest.raises(ValueError, match="naive datetime"):
        store.commit(Change(rotation.id, 1, updates={"next_attempt_at": T0.replace(tzinfo=None)}))
    assert store.get_rotation(rotation.id).version == 1


# ------------------------------------------------------------------------ commit (CAS)


def test_commit_sets_fields_bumps_version_and_appends_events(store: Store, seed) -> None:
    rotation = seed.rotation()
    later = T0 + timedelta(minutes=5)
    new = store.commit(
        Change(
            rotation.id,
            1,
            updates={
                "state": State.NEW_ADDED,
                "data": {"new_key_ref": "sec-9", "nested": {"a": [1, 2]}},
                "next_attempt_at": later,
                "attempts": 2,
                "last_error": "timeout",
                "rollback_from": State.VERIFIED,
            },
            events=[
                seed.event(rotation.id, kind="transition", from_state="pending", to_state="x"),
                seed.event(rotation.id, kind="action", reason="second"),
            ],
        )
    )
    assert new.version == 2
    assert new.state is State.NEW_ADDED
    assert new.rollback_from is State.VERIFIED
    assert new.data == {"new_key_ref": "sec-9", "nested": {"a": [1, 2]}}
    assert new.next_attempt_at == later
    assert (new.attempts, new.last_error) == (2, "timeout")
    assert new.updated_at >= rotation.updated_at
    assert store.get_rotation(rotation.id) == new

    events = store.events(rotation.id)
    assert [e.kind for e in events] == ["transition", "transition", "action"]
    assert [e.reason for e in events][-1] == "second"
    ids = [e.id for e in events]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert events[1].from_state == "pending" and events[1].to_state == "x"

    newer = store.commit(Change(rotation.id, 2, updates={"last_error": None}))
    assert newer.version == 3 and newer.last_error is None


def test_stale_commit_raises_and_writes_nothing(store: Store, seed) -> None:
    cred = seed.credential("svc")
    rotation = seed.rotation("svc")
    store.commit(Change(rotation.id, 1, updates={"attempts": 1}))  # now at version 2
    before_events = store.events(rotation.id)
    new_secret = seed.secret("sec-new")
    stale = Change(
        rotation.id,
        1,
        updates={"state": State.NEW_ADDED, "attempts": 99},
        events=[seed.event(rotation.id, reason="lost")],
        action=_action(rotation.id, "create", "idem-1"),
        secrets=[new_secret],
        credential=replace(cred, key_ref="sec-new", credential_id="cid-new"),
        purge_after={cred.key_ref: T0},
    )
    with pytest.raises(StaleVersion) as info:
        store.commit(stale)
    assert info.value.expected == 1
    assert "lost its lease" in str(info.value)

    after = store.get_rotation(rotation.id)
    assert (after.version, after.attempts, after.state) == (2, 1, State.PENDING)
    assert store.events(rotation.id) == before_events
    assert store.actions(rotation.id) == []
    with pytest.raises(NotFound):
        store.get_secret("sec-new")
    assert store.get_credential("svc") == cred
    assert store.get_secret(cred.key_ref).purge_after is None


def test_commit_is_all_or_nothing_when_a_later_part_fails(store: Store, seed) -> None:
    rotation = seed.rotation()
    with pytest.raises(NotFound, match="no secret with id ghost"):
        store.commit(
            Change(
                rotation.id,
                1,
                updates={"attempts": 5},
                events=[seed.event(rotation.id)],
                purge_after={"ghost": T0},
            )
        )
    assert store.get_rotation(rotation.id).version == 1
    assert len(store.events(rotation.id)) == 1


def test_commit_writes_secrets_credential_and_purge_schedule(store: Store, seed) -> None:
    cred = seed.credential("svc")
    rotation = seed.rotation("svc")
    new_key = seed.secret("sec-new", ciphertext=b"new-cipher")
    store.commit(
        Change(
            rotation.id,
            1,
            secrets=[new_key],
            credential=replace(cred, key_ref="sec-new", credential_id="cid-new"),
            purge_after={cred.key_ref: T0 + timedelta(days=7)},
        )
    )
    assert store.get_secret("sec-new").ciphertext == b"new-cipher"
    now_cred = store.get_credential("svc")
    assert (now_cred.key_ref, now_cred.credential_id) == ("sec-new", "cid-new")
    assert now_cred.created_at == cred.created_at
    assert store.get_secret(cred.key_ref).purge_after == T0 + timedelta(days=7)

    # None clears a scheduled purge (a rollback makes the old key current again).
    store.commit(Change(rotation.id, 2, purge_after={cred.key_ref: None}))
    assert store.get_secret(cred.key_ref).purge_after is None


def test_commit_refuses_unknown_fields(store: Store, seed) -> None:
    rotation = seed.rotation()
    with pytest.raises(ValueError, match="version"):
        store.commit(Change(rotation.id, 1, updates={"version": 10}))
    assert store.get_rotation(rotation.id).version == 1


def test_request_can_be_set_and_cleared_by_commit(store: Store, seed) -> None:
    rotation = seed.rotation()
    req = OperatorRequest(OperatorAction.PAUSE, "alice", "investigating", T0)
    new = store.commit(Change(rotation.id, 1, updates={"request": req, "paused": True}))
    assert new.request == req and new.paused is True
    cleared = store.commit(Change(rotation.id, 2, updates={"request": None}))
    assert cleared.request is None and cleared.paused is True


def test_a_wait_is_set_read_back_and_cleared_by_commit(store: Store, seed) -> None:
    """The four wait fields (and the next check in next_attempt_at) round-trip like any other
    field; datetimes given in another zone come back aware UTC; None clears them."""
    rotation = seed.rotation()
    plus2 = timezone(timedelta(hours=2))
    since, deadline, check = T0, T0 + timedelta(minutes=10), T0 + timedelta(seconds=30)
    wait = {
        "wait_key": "forward.confirm_loaded",
        "wait_for": "receivers to load secrets version 3",
        "wait_since": since.astimezone(plus2),
        "wait_deadline": deadline,
        "next_attempt_at": check,
        "lease_owner": None,
        "lease_expires_at": None,
    }
    waiting = store.commit(Change(rotation.id, 1, updates=wait))
    assert waiting.version == 2
    assert (waiting.wait_key, waiting.wait_for) == (
        "forward.confirm_loaded",
        "receivers to load secrets version 3",
    )
    assert (waiting.wait_since, waiting.wait_deadline, waiting.next_attempt_at) == (
        since,
        deadline,
        check,
    )
    assert waiting.wait_since is not None and waiting.wait_since.utcoffset() == timedelta(0)
    assert waiting.attempts == 0
    assert store.get_rotation(rotation.id) == waiting
    assert [r for r in store.list_rotations() if r.id == rotation.id] == [waiting]

    # A later check keeps the wait and only moves the next check.
    later = check + timedelta(seconds=30)
    checked = store.commit(Change(rotation.id, 2, updates={"next_attempt_at": later}))
    assert (checked.wait_key, checked.wait_since, checked.next_attempt_at) == (
        "forward.confirm_loaded",
        since,
        later,
    )

    cleared = store.commit(
        Change(
            rotation.id,
            3,
            updates={"wait_key": None, "wait_for": None, "wait_since": None, "wait_deadline": None},
        )
    )
    assert (cleared.wait_key, cleared.wait_for, cleared.wait_since, cleared.wait_deadline) == (
        None,
        None,
        None,
        None,
    )
    assert store.get_rotation(rotation.id) == cleared


def test_a_rotation_created_waiting_keeps_its_wait(store: Store, seed) -> None:
    rotation = seed.rotation(
        wait_key="bake", wait_for="a bake time of 1h", wait_since=T0, wait_deadline=T0
    )
    got = store.get_rotation(rotation.id)
    assert (got.wait_key, got.wait_for, got.wait_since, got.wait_deadline) == (
        "bake",
        "a bake time of 1h",
        T0,
        T0,
    )


def test_naive_wait_datetimes_are_refused(store: Store, seed) -> None:
    rotation = seed.rotation()
    for name in ("wait_since", "wait_deadline"):
        with pytest.raises(ValueError, match="naive datetime"):
            store.commit(Change(rotation.id, 1, updates={name: T0.replace(tzinfo=None)}))
    assert store.get_rotation(rotation.id).version == 1


# ----------------------------------------------------------------------------- actions


def test_actions_upsert_by_rotation_phase_and_name_in_first_intent_order(
    store: Store, seed
) -> None:
    rotation = seed.rotation()
    rid = rotation.id
    v = store.commit(Change(rid, 1, action=_action(rid, "create", "k-create"))).version
    v = store.commit(
        Change(rid, v, action=_action(rid, "deploy", "k-deploy", intent_at=T0 - timedelta(1)))
    ).version
    v = store.commit(
        Change(rid, v, action=_action(rid, "create", "k-create2", phase=Phase.ROLLBACK))
    ).version
    done = _action(
        rid,
        "create",
        "k-create",
        status=ActionStatus.DONE,
        outcome_at=T0 + timedelta(seconds=3),
        attempts=2,
        detail={"credential_uuid": "cr-new"},
    )
    store.commit(Change(rid, v, action=done))

    actions = store.actions(rid)
    assert [(a.phase, a.name) for a in actions] == [
        (Phase.FORWARD, "create"),
        (Phase.FORWARD, "deploy"),
        (Phase.ROLLBACK, "create"),
    ]
    assert actions[0] == done
    assert actions[1].status is ActionStatus.INTENT
    assert actions[2].phase is Phase.ROLLBACK


def test_idempotency_keys_are_unique(store: Store, seed) -> None:
    a = seed.rotation()
    b = seed.rotation()
    store.commit(Change(a.id, 1, action=_action(a.id, "create", "same-key")))
    with pytest.raises(KeyturnError):
        store.commit(
            Change(
                b.id,
                1,
                updates={"attempts": 3},
                action=_action(b.id, "create", "same-key"),
                events=[seed.event(b.id)],
            )
        )
    assert store.get_rotation(b.id).version == 1
    assert store.actions(b.id) == []
    assert len(store.events(b.id)) == 1


# ----------------------------------------------------------------------------- request


def test_request_records_without_bumping_the_version(store: Store, seed) -> None:
    rotation = seed.rotation(next_attempt_at=T0 + timedelta(hours=1))
    at = T0 + timedelta(minutes=1)
    req = OperatorRequest(OperatorAction.ROLLBACK, "alice", "bad deploy", at)
    got = store.request(rotation.id, req, seed.event(rotation.id, kind="operator"))
    assert got.version == 1
    assert got.request == req
    assert got.next_attempt_at == at
    assert store.get_rotation(rotation.id) == got
    assert [e.kind for e in store.events(rotation.id)] == ["transition", "operator"]
    # The lease holder's fencing token is still valid.
    after = store.commit(Change(rotation.id, 1, updates={"request": None}))
    assert after.version == 2 and after.request is None


def test_request_for_unknown_rotation_is_not_found(store: Store, seed) -> None:
    req = OperatorRequest(OperatorAction.CANCEL, "alice", "no", T0)
    with pytest.raises(NotFound):
        store.request("rot-x", req, seed.event("rot-x"))


def test_returned_values_are_copies(store: Store, seed) -> None:
    rotation = seed.rotation(data={"k": [1]})
    rotation.data["k"].append(2)
    assert store.get_rotation(rotation.id).data == {"k": [1]}
    events = store.events(rotation.id)
    events[0].detail["x"] = 1
    assert "x" not in store.events(rotation.id)[0].detail


def test_utc_is_kept_for_other_zones_in_events(store: Store, seed) -> None:
    rotation = seed.rotation()
    at = (T0 + timedelta(seconds=1)).astimezone(timezone(timedelta(hours=-5)))
    store.commit(Change(rotation.id, 1, events=[seed.event(rotation.id, at=at)]))
    got = store.events(rotation.id)[-1].at
    assert got == at and got.tzinfo is not None and got.utcoffset() == timedelta(0)


def test_append_event_adds_to_the_timeline_without_touching_the_rotation(
    store: Store, seed
) -> None:
    rotation = seed.rotation()
    store.append_event(seed.event(rotation.id, kind="operator", detail={"status": "refused: x"}))
    assert store.get_rotation(rotation.id) == rotation  # same version, same updated_at
    assert [e.detail for e in store.events(rotation.id)][-1] == {"status": "refused: x"}
    with pytest.raises(NotFound):
        store.append_event(seed.event("rot-missing"))
