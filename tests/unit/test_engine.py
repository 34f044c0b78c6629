"""The engine end to end in one process: real stores (memory and SQLite), the fake provider,
real file targets. The same flows run against the sandbox over HTTP in tests/e2e."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from keyturn.adapters.deploy import FileTarget
from keyturn.adapters.fake_provider import FakeKeyProvider
from keyturn.adapters.keys import CryptoKeys
from keyturn.adapters.store.memory import MemoryStore
from keyturn.adapters.store.migrate import upgrade
from keyturn.adapters.store.sql import SqlStore
from keyturn.adapters.vault import AesGcmVault, MasterKey
from keyturn.domain.errors import IllegalTransition, ProviderError, TransitionRefused
from keyturn.domain.lifecycle import State
from keyturn.domain.model import (
    ActionStatus,
    CredentialKind,
    ManagedCredential,
    OperatorAction,
)
from keyturn.domain.retry import RetryPolicy
from keyturn.engine.operator import record_request, request_action, start_rotation
from keyturn.engine.run import EngineDeps, EngineSettings
from keyturn.engine.worker import Worker
from keyturn.ports import DeployedMaterial, Store

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
        self.deps = EngineDeps(
            store=store,
            vault=self.vault,
            keys=self.keys,
            clock=Clock(),
            provider_for=lambda _n, fence=None: self.provider,
            targets_for=lambda _n: [self.target],
            settings=EngineSettings(
                lease_seconds=10,
                lease_margin_seconds=1,
                retry=RetryPolicy(max_attempts=3, base_seconds=0.01, max_seconds=0.02),
                poll_seconds=0.01,
            ),
            crash_hook=lambda b: self.hook(b),
        )

    def rotate(self) -> str:
        r = start_rotation(
            self.store,
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
        record_request(self.store, Clock(), rid, action, "oncall", f"test {action.value}")

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
        ("transition.add_new.after_commit", State.NEW_ADDED),
        ("transition.verify.after_commit", State.VERIFIED),
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


def test_prove_uses_what_the_target_holds(env: Env, tmp_path: Path) -> None:
    """A target that silently keeps the old key must stop verification (not pass on keyturn's
    own copy)."""

    class StuckTarget(FileTarget):
        def deploy(self, material: DeployedMaterial) -> None:  # drops every write
            return None

    env.target = StuckTarget("stuck", tmp_path / "deploy")
    rid = env.rotate()
    env.work()
    r = env.store.get_rotation(rid)
    assert r.state is State.NEW_ADDED
    assert r.halted_reason and "does not hold the expected key" in r.halted_reason
    assert env.provider.credential(env.old_uuid).is_active
