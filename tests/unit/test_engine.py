"""The engine end to end in one process: real stores (memory and SQLite), the fake provider,
real file targets. The same flows run against the sandbox over HTTP in tests/e2e."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeServices, builtin_registry

from keyturn.adapters.deploy import FileTarget
from keyturn.adapters.fake_provider import FakeKeyProvider
from keyturn.adapters.keys import CryptoKeys
from keyturn.adapters.store.memory import MemoryStore
from keyturn.adapters.store.migrate import upgrade
from keyturn.adapters.store.sql import SqlStore
from keyturn.adapters.vault import AesGcmVault, MasterKey
from keyturn.domain.errors import (
    IllegalTransition,
    KeyturnError,
    ProviderError,
    StoreUnavailable,
    TransitionRefused,
)
from keyturn.domain.lifecycle import State
from keyturn.domain.model import (
    ActionRecord,
    ActionStatus,
    CredentialKind,
    ManagedCredential,
    OperatorAction,
    Phase,
    Rotation,
    evolve,
)
from keyturn.domain.retry import RetryPolicy
from keyturn.engine.attention import revision
from keyturn.engine.operator import (
    RevisionChanged,
    record_request,
    request_action,
    start_rotation,
)
from keyturn.engine.run import EngineDeps, EngineSettings, RotationRun
from keyturn.engine.spi import Services, TargetConfig
from keyturn.engine.unit import merge
from keyturn.engine.worker import Worker
from keyturn.kinds.signing_key import SigningKeyConfig
from keyturn.ports import Change, DeployedMaterial, Store
from keyturn.targets.files import KeyFiles, PathConfig

NAME = "svc"


class Clock:
    def now(self) -> datetime:
        return datetime.now(UTC)


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
    else:
        url = f"sqlite:///{tmp_path / 'k.db'}"
        upgrade(url)
        s = SqlStore(url)
        yield s
        s.close()


class StuckTarget(FileTarget):
    def stage(self, material: DeployedMaterial, credential: str = "") -> dict[str, object]:
        # drops the new key: stages what it already holds
        return super().stage(self.read_back(), credential)


class StuckPlugin:
    """A `file` target that silently keeps what it held (stages its current key)."""

    type = "stuck"
    description = "drops every write"
    config_model = PathConfig
    accepts = frozenset({"signing_key"})

    def build(self, config: TargetConfig, services: Services) -> KeyFiles:
        assert isinstance(config, PathConfig)
        return KeyFiles(StuckTarget(config.name or "stuck", config.path), services)


class Env:
    def __init__(self, store: Store, tmp_path: Path) -> None:
        self.store = store
        self.keys = CryptoKeys()
        self.vault = AesGcmVault(MasterKey.generate())
        old = self.keys.generate("ed25519")
        self.old_pem = old.private_pem
        self.provider, self.old_uuid = FakeKeyProvider.with_credential("old-cred", old.private_pem)
        self.store.add_credential(
            ManagedCredential(
                name=NAME,
                kind=CredentialKind.SERVICE_ACCOUNT,
                provider="fake",
                credential_id="old-cred",
                credential_uuid=self.old_uuid,
                key_ref="sec_old",
                algorithm="ed25519",
            ),
            [self.vault.seal("sec_old", "private_key", old.private_pem)],
        )
        self.target = FileTarget("t1", tmp_path / "deploy")
        self.target.deploy(DeployedMaterial(old.private_pem, "old-cred", self.old_uuid))
        self.hook: Callable[[str], None] = lambda _b: None
        self.registry = builtin_registry(StuckPlugin())
        self.services = FakeServices(sessions=lambda _n: self.provider)
        self.use_target("file")
        self.deps = EngineDeps(
            store=store,
            vault=self.vault,
            keys=self.keys,
            clock=Clock(),
            services=self.services,
            registry=self.registry,
            settings=EngineSettings(
                lease_seconds=10,
                lease_margin_seconds=1,
                retry=RetryPolicy(max_attempts=3, base_seconds=0.01, max_seconds=0.02),
                poll_seconds=0.01,
            ),
            crash_hook=lambda b: self.hook(b),
        )

    def use_target(self, type_: str) -> None:
        """The credential's one deploy target: of this type, at the directory `target` reads."""
        self.services.configs[NAME] = SigningKeyConfig(
            kind="service_account",
            provider="fake",
            targets=[PathConfig(type=type_, name="t1", path=self.target.directory)],
        )

    def rotate(self) -> str:
        r = start_rotation(
            self.store,
            self.registry,
            Clock(),
            credential=NAME,
            reason="test",
            actor="tester",
            options={"algorithm": "ed25519", "via": "credentials"},
        )
        return r.id

    def work(self, stop_at: str | None = None) -> None:
        worker = Worker(self.deps, concurrency=4)
        if stop_at:
            self.hook = lambda b: worker.stop() if b == stop_at else None
        else:
            self.hook = lambda _b: None
        asyncio.run(worker.run(until_idle=True))

    def request(self, rid: str, action: OperatorAction) -> None:
        """Record only (as while a worker holds the rotation); the next worker applies it."""
        record_request(
            self.store, self.registry, Clock(), rid, action, "oncall", f"test {action.value}"
        )

    def request_now(self, rid: str, action: OperatorAction) -> None:
        """As the CLI does: applied at once when no worker holds the rotation."""
        asyncio.run(request_action(self.deps, rid, action, "oncall", f"test {action.value}"))

    def assert_old_restored(self, rid: str) -> None:
        r = self.store.get_rotation(rid)
        assert r.state is State.ROLLED_BACK, r
        creds = {c.credential_uuid: c for c in self.provider.credentials}
        assert creds[self.old_uuid].is_active
        new_uuid = r.data.get("new_credential_uuid")
        if new_uuid:
            assert not creds[new_uuid].is_active
        assert sum(c.is_active for c in creds.values()) == 1
        held = self.target.read_back()
        assert held.private_key_pem == self.old_pem and held.credential_uuid == self.old_uuid
        assert self.store.get_credential(NAME).credential_uuid == self.old_uuid


@pytest.fixture
def env(store: Store, tmp_path: Path) -> Env:
    return Env(store, tmp_path)


def transitions(store: Store, rid: str) -> list[str]:
    return [f"{e.from_state}>{e.to_state}" for e in store.events(rid) if e.kind == "transition"]


def test_full_rotation(env: Env) -> None:
    rid = env.rotate()
    env.work()
    r = env.store.get_rotation(rid)
    assert r.state is State.OLD_DEACTIVATED and r.finished_at is not None
    assert transitions(env.store, rid) == [
        "pending>new_added",
        "new_added>verified",
        "verified>old_deactivated",
    ]
    creds = {c.credential_uuid: c for c in env.provider.credentials}
    assert len(creds) == 2
    assert not creds[env.old_uuid].is_active
    new_uuid = r.data["new_credential_uuid"]
    assert creds[new_uuid].is_active
    held = env.target.read_back()
    assert held.credential_uuid == new_uuid and held.private_key_pem != env.old_pem
    managed = env.store.get_credential(NAME)
    assert managed.credential_uuid == new_uuid and managed.key_ref == r.data["new_key_ref"]
    assert env.store.get_secret("sec_old").purge_after is not None
    assert r.lease_owner is None


def test_apply_then_fail_register_adopts_instead_of_duplicating(env: Env) -> None:
    env.provider.fail_next(
        "register_key",
        ProviderError("connection dropped", retryable=True, outcome_unknown=True),
        apply_first=True,
    )
    rid = env.rotate()
    env.work()
    r = env.store.get_rotation(rid)
    assert r.state is State.OLD_DEACTIVATED
    assert len(env.provider.credentials) == 2  # the old one and exactly one new one
    register = next(a for a in env.store.actions(rid) if a.name == "register_new")
    assert register.status is ActionStatus.DONE and register.detail.get("reconciled") is True
    assert env.provider.calls["register_key"] == 1


def test_non_retryable_failure_halts_after_one_attempt_then_resume_completes(env: Env) -> None:
    env.provider.fail_next(
        "register_key", ProviderError("signature rejected (401)", retryable=False)
    )
    rid = env.rotate()
    env.work()
    r = env.store.get_rotation(rid)
    assert r.state is State.PENDING and r.attempts == 1
    assert r.halted_reason and "not safe to retry" in r.halted_reason
    assert "signature rejected" in r.halted_reason
    env.request(rid, OperatorAction.RESUME)
    env.work()
    assert env.store.get_rotation(rid).state is State.OLD_DEACTIVATED


def test_retry_budget_is_bounded(env: Env) -> None:
    for _ in range(3):
        env.provider.fail_next("register_key", ProviderError("503", retryable=True))
    rid = env.rotate()
    env.work()
    r = env.store.get_rotation(rid)
    assert r.halted_reason and "retry budget spent" in r.halted_reason
    assert r.attempts == 3 and env.provider.calls["register_key"] == 3
    assert len(env.provider.credentials) == 1


@pytest.mark.parametrize(
    "stop_at, state",
    [
        # A worker stops at its next action boundary: the one before the next step's first
        # intent leaves the rotation in the state the previous step reached (a worker holds a
        # step's transition for the next commit, so "transition.*.after_commit" fires only
        # after the next intent is written, and the stop lands one action later).
        ("forward.stage_new@t1.before_intent", State.NEW_ADDED),
        ("forward.promote_new@t1.before_intent", State.NEW_ADDED),
        ("forward.deactivate_old.before_intent", State.VERIFIED),
        (None, State.OLD_DEACTIVATED),
    ],
)
def test_rollback_restores_the_old_side(env: Env, stop_at: str | None, state: State) -> None:
    rid = env.rotate()
    env.work(stop_at=stop_at)
    assert env.store.get_rotation(rid).state is state
    env.request_now(rid, OperatorAction.ROLLBACK)
    assert env.store.get_rotation(rid).state is State.ROLLING_BACK
    env.work()
    env.assert_old_restored(rid)
    assert env.store.get_secret("sec_old").purge_after is None
    with pytest.raises(IllegalTransition, match="rolled_back"):
        env.request(rid, OperatorAction.ROLLBACK)


def test_rollback_of_an_older_rotation_is_refused(env: Env) -> None:
    first = env.rotate()
    env.work()
    env.rotate()
    env.work()
    with pytest.raises(TransitionRefused, match="newer rotation"):
        env.request(first, OperatorAction.ROLLBACK)


def test_rollback_after_the_old_key_was_purged_is_refused(env: Env) -> None:
    rid = env.rotate()
    env.work()
    env.store.purge_secrets(datetime.now(UTC) + timedelta(days=31))
    with pytest.raises(TransitionRefused, match="purged"):
        env.request(rid, OperatorAction.ROLLBACK)


def test_cancel_only_before_any_intent(env: Env) -> None:
    rid = env.rotate()
    env.request(rid, OperatorAction.CANCEL)
    env.work()
    assert env.store.get_rotation(rid).state is State.CANCELLED
    assert len(env.provider.credentials) == 1
    # An intent with an unknown outcome (the call timed out): cancel is refused, and rollback
    # reconciles with the provider before it compensates.
    env.provider.fail_next(
        "register_key",
        ProviderError("timed out", retryable=True, outcome_unknown=True),
        apply_first=True,
    )
    rid2 = env.rotate()
    env.work(stop_at="forward.register_new.after_intent")
    assert env.store.get_rotation(rid2).state is State.PENDING
    with pytest.raises(TransitionRefused, match="use rollback"):
        env.request(rid2, OperatorAction.CANCEL)
    env.request_now(rid2, OperatorAction.ROLLBACK)
    env.work()
    env.assert_old_restored(rid2)
    assert len(env.provider.credentials) == 2  # the adopted one, now inactive


def test_pause_at_a_boundary_then_resume(env: Env) -> None:
    rid = env.rotate()
    env.work(stop_at="transition.add_new.after_commit")
    env.request(rid, OperatorAction.PAUSE)
    env.work()
    r = env.store.get_rotation(rid)
    assert r.paused and r.state is State.NEW_ADDED
    ops = [e.detail.get("status") for e in env.store.events(rid) if e.kind == "operator"]
    assert ops[-2:] == ["requested", "applied"]
    env.request(rid, OperatorAction.RESUME)
    env.work()
    assert env.store.get_rotation(rid).state is State.OLD_DEACTIVATED


def test_a_second_rotation_of_a_rotating_credential_is_refused(env: Env) -> None:
    from keyturn.domain.errors import AlreadyRotating

    rid = env.rotate()
    with pytest.raises(AlreadyRotating, match=rid):
        env.rotate()


def test_prove_uses_what_the_target_holds(env: Env) -> None:
    """A target that silently keeps the old key must stop verification (not pass on keyturn's
    own copy)."""

    env.use_target("stuck")  # StuckTarget at the same directory
    rid = env.rotate()
    env.work()
    r = env.store.get_rotation(rid)
    assert r.state is State.NEW_ADDED
    assert r.halted_reason and "does not hold the expected key" in r.halted_reason
    assert env.provider.credential(env.old_uuid).is_active


# ------------------------------------------------------------------ held writes (group commit)


def test_a_worker_writes_each_outcome_and_transition_with_the_next_intent(env: Env) -> None:
    """Six compare-and-sets take a service-account rotation from pending to old_deactivated:
    each intent carries the previous action's outcome (and the step's transition); the release
    carries the last outcome and the final transition. Nothing is lost on the way."""
    written: list[Change] = []
    commit_many = env.store.commit_many

    def counting(changes: Sequence[Change]) -> list[Rotation | KeyturnError]:
        written.extend(changes)
        return commit_many(changes)

    env.store.commit_many = counting  # type: ignore[method-assign]
    rid = env.rotate()
    env.work()
    mine = [c for c in written if c.rotation_id == rid]
    assert len(mine) == 6, [(c.action, c.updates.keys()) for c in mine]
    r = env.store.get_rotation(rid)
    assert r.state is State.OLD_DEACTIVATED and r.lease_owner is None
    assert [e.to_state for e in env.store.events(rid) if e.kind == "transition"] == [
        "new_added",
        "verified",
        "old_deactivated",
    ]
    assert all(a.status is ActionStatus.DONE for a in env.store.actions(rid))
    # every intent was durable before its call: the change that wrote it came before the next
    intents = [c.action.name for c in mine if c.action and c.action.status is ActionStatus.INTENT]
    assert intents == [
        "register_new",
        "stage_new@t1",
        "prove_new",
        "promote_new@t1",
        "deactivate_old",
    ]


def test_a_held_write_survives_a_failed_commit(env: Env) -> None:
    """A commit that fails (the database went away) keeps what was held: the next commit of the
    run writes it, so a transition is never silently dropped."""
    rid = env.rotate()
    store = env.store
    rotation = store.claim(
        owner="w",
        now=datetime.now(UTC),
        lease_until=datetime.now(UTC) + timedelta(seconds=30),
        limit=1,
    )[0]

    async def go() -> None:
        run = RotationRun(env.deps, rotation, "w", hold_writes=True)
        await run.unit.add(updates={"attempts": 5})  # held (no intent, no secrets)
        assert run.rotation.attempts == 5 and store.get_rotation(rid).attempts == 0
        real = store.commit
        calls = 0

        def flaky(change: Change) -> Rotation:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise StoreUnavailable("database is unavailable; will retry")
            return real(change)

        store.commit = flaky  # type: ignore[method-assign]
        with pytest.raises(StoreUnavailable):
            await run.unit.write(updates={"last_error": "x"})
        await run.unit.write(updates={"last_error": "y"})
        assert store.get_rotation(rid).attempts == 5
        assert store.get_rotation(rid).last_error == "y"

    asyncio.run(go())


def test_merge_keeps_the_latest_record_of_each_action_in_order() -> None:
    t = datetime(2026, 1, 1, tzinfo=UTC)

    def rec(name: str, status: ActionStatus) -> ActionRecord:
        return ActionRecord("r", Phase.FORWARD, name, f"r:{name}", status, t)

    first = Change(
        "r",
        3,
        updates={"state": State.NEW_ADDED, "attempts": 0},
        action=rec("a", ActionStatus.DONE),
        secrets=[],
        purge_after={"s1": t},
    )
    then = Change(
        "r",
        3,
        updates={"attempts": 1},
        action=rec("b", ActionStatus.INTENT),
        earlier_actions=[rec("a", ActionStatus.FAILED)],
        purge_after={"s2": None},
    )
    m = merge(first, then)
    assert m.updates == {"state": State.NEW_ADDED, "attempts": 1}
    assert [(a.name, a.status) for a in m.earlier_actions] == [("a", ActionStatus.FAILED)]
    assert m.action is not None and m.action.name == "b"
    assert m.purge_after == {"s1": t, "s2": None}
    held_only = merge(first, Change("r", 3))
    assert held_only.action is None
    assert [a.name for a in held_only.earlier_actions] == ["a"]


def test_evolve_is_replace_for_the_records_it_serves() -> None:
    t = datetime(2026, 1, 1, tzinfo=UTC)
    record = ActionRecord("r", Phase.FORWARD, "a", "r:a", ActionStatus.INTENT, t)
    changes = {"status": ActionStatus.DONE, "outcome_at": t, "detail": {"k": 1}}
    assert evolve(record, changes) == dataclasses.replace(record, **changes)  # type: ignore[arg-type]
    assert record.status is ActionStatus.INTENT  # the original is untouched
    with pytest.raises(TypeError, match="no field"):
        evolve(record, {"stauts": ActionStatus.DONE})


# ----------------------------------------------------------------- release-lease, If-Match


def _events(store: Store, rid: str, trigger: str) -> list[Any]:
    return [e for e in store.events(rid) if e.trigger == trigger]


def test_release_lease_is_honoured_by_its_holder_at_the_next_boundary(env: Env) -> None:
    rid = env.rotate()
    owners: list[str] = []

    def at(boundary: str) -> None:
        if boundary == "transition.add_new.after_commit" and not owners:
            held = env.store.get_rotation(rid)
            assert held.lease_owner is not None
            owners.append(held.lease_owner)
            env.request(rid, OperatorAction.RELEASE_LEASE)  # while the worker holds it

    env.hook = at
    worker = Worker(env.deps, concurrency=1)
    asyncio.run(worker.run(until_idle=True))
    r = env.store.get_rotation(rid)
    assert r.state is State.OLD_DEACTIVATED and r.request is None
    said = [(e.detail["status"], e.detail.get("lease"), e.detail.get("holder"))
            for e in _events(env.store, rid, "release-lease")]  # fmt: skip
    assert said == [("requested", None, owners[0]), ("applied", "released", owners[0])]
    # given back (the next claim took a free lease, not one it took over), then finished once
    claims = [e for e in env.store.events(rid) if e.detail.get("status") == "taken_over"]
    assert claims == []
    assert len(transitions(env.store, rid)) == len(set(transitions(env.store, rid))) == 3


def test_release_lease_is_refused_without_a_lease_and_changes_nothing(env: Env) -> None:
    rid = env.rotate()
    before = env.store.get_rotation(rid)
    with pytest.raises(TransitionRefused, match="no worker holds its lease"):
        env.request(rid, OperatorAction.RELEASE_LEASE)
    expired = env.store.commit(
        Change(
            rid,
            before.version,
            updates={
                "lease_owner": "gone",
                "lease_expires_at": datetime.now(UTC) - timedelta(seconds=1),
            },
        )
    )
    with pytest.raises(TransitionRefused, match=r"expired at .*the next worker to poll claims"):
        env.request(rid, OperatorAction.RELEASE_LEASE)
    assert env.store.get_rotation(rid) == expired
    assert _events(env.store, rid, "release-lease") == []


def test_release_lease_of_a_silent_holder_waits_for_the_original_expiry(env: Env) -> None:
    rid = env.rotate()
    r = env.store.get_rotation(rid)
    expiry = datetime.now(UTC) + timedelta(seconds=1.5)
    env.store.commit(
        Change(rid, r.version, updates={"lease_owner": "silent", "lease_expires_at": expiry})
    )
    env.request(rid, OperatorAction.RELEASE_LEASE)
    assert env.store.get_rotation(rid).lease_expires_at == expiry  # never cut short
    worker = Worker(env.deps, concurrency=1)
    asyncio.run(worker.run(until_idle=True))
    r = env.store.get_rotation(rid)
    assert r.state is State.OLD_DEACTIVATED
    assert r.lease_taken_at is not None and r.lease_taken_at >= expiry  # claimed after it
    applied = _events(env.store, rid, "release-lease")[-1]
    assert applied.detail["status"] == "applied" and applied.detail["lease"] == "expired"
    assert applied.detail["holder"] == "silent" and applied.detail["claimed_by"] == worker.owner


class _RenewsOnRead:
    """The store, where a lease holder commits (renews) right after each of the first
    `writes` reads of the rotation: between a verb's read and its write."""

    def __init__(self, store: Store, updates: dict[str, Any], writes: int = 2) -> None:
        self._store, self._updates, self.left = store, updates, writes

    def get_rotation(self, rotation_id: str) -> Rotation:
        r = self._store.get_rotation(rotation_id)
        if self.left:
            self.left -= 1
            self._store.commit(Change(rotation_id, r.version, updates=self._updates))
        return r

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_a_verb_is_a_compare_and_set_on_the_revision_it_was_given(env: Env) -> None:
    rid = env.rotate()
    r = env.store.get_rotation(rid)
    until = datetime.now(UTC) + timedelta(minutes=5)
    r = env.store.commit(
        Change(rid, r.version, updates={"lease_owner": "w1", "lease_expires_at": until})
    )
    seen = revision(r)
    renewing = _RenewsOnRead(env.store, {"lease_expires_at": until + timedelta(minutes=1)})
    after = record_request(
        renewing, env.registry, Clock(), rid, OperatorAction.PAUSE, "op", "x",  # type: ignore[arg-type]
        revisions=[seen],
    )  # fmt: skip
    assert renewing.left == 0 and after.request is not None  # read again twice, then written
    assert after.version == r.version + 2  # the renewals' versions; the request bumps none

    # the holder carries the request out; then it halts the rotation between a verb's read
    # and its write
    env.store.commit(Change(rid, env.store.get_rotation(rid).version, updates={"request": None}))
    halting = _RenewsOnRead(env.store, {"halted_reason": "spent"}, writes=1)
    with pytest.raises(RevisionChanged, match="changed since you read it"):
        record_request(
            halting, env.registry, Clock(), rid, OperatorAction.PAUSE, "op", "x",  # type: ignore[arg-type]
            revisions=[revision(env.store.get_rotation(rid))],
        )  # fmt: skip
    assert env.store.get_rotation(rid).request is None  # nothing written


def test_a_kept_session_is_reopened_when_the_signer_key_changed(env: Env) -> None:
    """A worker's run keeps a kind's provider session for its later steps; a step whose signer
    was rotated during the run (another key_ref) gets a new session, opened with the new key,
    and the old one is closed: it never signs with the key the signer left."""
    env.rotate()
    rotation = env.store.claim(
        owner="w",
        now=datetime.now(UTC),
        lease_until=datetime.now(UTC) + timedelta(seconds=30),
        limit=1,
    )[0]
    opened: list[Any] = []
    closed: list[Any] = []

    class Session:
        async def aclose(self) -> None:
            closed.append(self)

    class Kind:
        name = "fake-kind"

        async def open_session(self, services: Any, rotation: Any, fence: Any) -> Session:
            opened.append(Session())
            return opened[-1]

    async def go() -> None:
        run = RotationRun(env.deps, rotation, "w", keep_sessions=True)
        kind: Any = Kind()
        first = await run.open_session(kind, "key-1")
        await run.done_with_session(kind, first)
        assert await run.open_session(kind, "key-1") is first and not closed  # kept
        second = await run.open_session(kind, "key-2")  # the signer moved on
        assert second is not first and closed == [first]
        await run.done_with_session(kind, second)
        await run.close_sessions()
        assert closed == [first, second]

    asyncio.run(go())
