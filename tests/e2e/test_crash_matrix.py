"""A worker process SIGKILLed at every action boundary of the service-account rotation, forward
and in rollback, then restarted: the rotation ends right, exactly once, checked at the sandbox."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from harness import TARGETS, Kt

from keyturn.domain.lifecycle import Trigger
from keyturn.kinds.signing_key import SERVICE_ACCOUNT

#: Every boundary of an action: before its intent is recorded, after the intent commit, after
#: the provider call (before the outcome commit), after the outcome commit.
ACTION_BOUNDARIES = ("before_intent", "after_intent", "after_call", "after_outcome")


def kill_points(rollback: bool) -> list[str]:
    """Generated from the kind's declared actions, so a new action gets its own kill points."""
    points = []
    for trigger, step in SERVICE_ACCOUNT.steps.items():
        if (trigger is Trigger.FINISH_ROLLBACK) != rollback:
            continue
        for action in step.expanded_actions(TARGETS):
            points += [
                f"{action.phase.value}.{action.name}.{moment}" for moment in ACTION_BOUNDARIES
            ]
        points.append(f"transition.{trigger.value}.after_commit")
    return points


def public_pem_of(private_pem: bytes) -> str:
    key = serialization.load_pem_private_key(private_pem, password=None)
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def norm(pem: str) -> str:
    return "".join(pem.split())


def crash_then_finish(kt: Kt, point: str, tmp_path: Path) -> None:
    marker = tmp_path / "killed-at"
    killed = kt.worker(KEYTURN_TEST_CRASH_AT=point, KEYTURN_TEST_CRASH_MARKER=str(marker))
    assert killed.returncode == -9, f"worker was not killed at {point}: {killed.stderr[-2000:]}"
    assert marker.read_text().split() == [point]  # where the kill landed
    finished = kt.worker()
    assert finished.returncode == 0, finished.stderr[-2000:]


def assert_no_transition_twice(rotation: dict[str, object]) -> None:
    seen = [
        (e["from"], e["to"])
        for e in rotation["events"]  # type: ignore[attr-defined]
        if e["kind"] == "transition"
    ]
    assert len(seen) == len(set(seen)), seen


@pytest.mark.parametrize("point", kill_points(rollback=False))
def test_forward_kill(kt: Kt, point: str, tmp_path: Path) -> None:
    old_uuid = kt.bootstrap["service_account"]["credential_uuid"]
    rid = kt.rotate_here()
    crash_then_finish(kt, point, tmp_path)
    rotation = kt.show_here(rid)
    assert rotation["state"] == "old_deactivated"
    assert_no_transition_twice(rotation)
    creds = kt.provider_credentials()
    assert len(creds) == 2, f"expected the old and exactly one new credential: {list(creds)}"
    new_uuid = rotation["new_credential_uuid"]
    assert creds[old_uuid]["isActive"] is False
    assert creds[new_uuid]["isActive"] is True
    key, meta = kt.deployed()
    assert meta["credentialUuid"] == new_uuid
    assert meta["credentialId"] == creds[new_uuid]["credentialId"]
    assert norm(public_pem_of(key)) == norm(creds[new_uuid]["publicKey"])


@pytest.mark.postgres
@pytest.mark.parametrize(
    "point",
    [
        "forward.register_new.after_intent",
        "forward.register_new.after_call",
        "forward.deactivate_old.after_call",
        "transition.verify.after_commit",
    ],
)
def test_forward_kill_on_postgres(
    make_kt: Callable[..., Kt], fresh_pg_url: str, point: str, tmp_path: Path
) -> None:
    """A sample of the matrix on PostgreSQL (the whole matrix runs on SQLite above)."""
    assert set(kill_points(rollback=False)) >= {point}
    test_forward_kill(make_kt(db_url=fresh_pg_url), point, tmp_path)


@pytest.mark.parametrize("point", kill_points(rollback=True))
def test_rollback_kill(kt: Kt, point: str, tmp_path: Path) -> None:
    boot = kt.bootstrap["service_account"]
    rid = kt.rotate_here()
    assert kt.worker().returncode == 0
    kt.run("rotations", "rollback", rid, "--reason", "kill test", "--yes")
    crash_then_finish(kt, point, tmp_path)
    rotation = kt.show_here(rid)
    assert rotation["state"] == "rolled_back"
    assert_no_transition_twice(rotation)
    creds = kt.provider_credentials()
    assert len(creds) == 2
    assert creds[boot["credential_uuid"]]["isActive"] is True
    assert creds[rotation["new_credential_uuid"]]["isActive"] is False
    key, meta = kt.deployed()
    assert meta["credentialUuid"] == boot["credential_uuid"]
    assert key == boot["private_key_pem"].encode()
