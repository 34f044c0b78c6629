"""The toy plugin, installed by its own entry points, rotated by real keyturn processes: a
rotation, reconcile, a rollback refused after its irreversible action, and a kill matrix
generated from its declared actions."""

from __future__ import annotations

from pathlib import Path

import pytest
from keyturn_toy import TOY, _asks_person, fingerprint
from toyenv import Toy, make_toy

from keyturn.plugin import Trigger

BOUNDARIES = ("before_intent", "after_intent", "after_call", "after_outcome")


def kill_points(rollback: bool) -> list[str]:
    """From the kind's declared actions: a new action gets its own kill points."""
    points = []
    for trigger, step in TOY.steps.items():
        if (trigger is Trigger.FINISH_ROLLBACK) != rollback:
            continue
        for action in step.actions:
            if action.when is _asks_person:  # no [person] in this config: never performed
                continue
            points += [f"{action.phase.value}.{action.name}.{b}" for b in BOUNDARIES]
        points.append(f"transition.{trigger.value}.after_commit")
    return points


def assert_rotated(toy: Toy, rid: str) -> None:
    rotation = toy.show(rid)
    assert rotation["state"] == "old_deactivated", rotation
    ledger = toy.ledger
    assert "k0" not in ledger  # burnt
    minted = [k for k in ledger if k.startswith("toy-")]
    assert minted == [f"toy-{rid}"], ledger  # exactly one new key, never minted twice
    assert ledger[minted[0]]["active"] is True
    assert fingerprint(toy.deployed) == ledger[minted[0]]["fingerprint"]
    transitions = [(e["from"], e["to"]) for e in rotation["events"] if e["kind"] == "transition"]
    assert len(transitions) == len(set(transitions)), transitions


def test_plugins_lists_the_toy_kind_and_target(toy: Toy) -> None:
    listed = toy.run("plugins").stdout
    assert "toy " in listed and "keyturn-toy" in listed
    assert "toy_file" in listed


def test_a_toy_rotation_then_reconcile_then_rollback_is_refused(toy: Toy) -> None:
    rid = toy.rotate()
    toy.run("worker", "--until-idle")
    assert_rotated(toy, rid)
    assert toy.run("reconcile").returncode == 0

    refused = toy.run("rotations", "rollback", rid, "--reason", "undo", "--yes", check=False)
    assert refused.returncode == 1
    assert "irreversible from action burn_old" in refused.stderr
    assert "a burnt toy key is gone for good" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert toy.show(rid)["state"] == "old_deactivated"

    ledger = toy.workdir / "ledger.json"
    ledger.write_text(ledger.read_text().replace("{", '{"toy-rot_0000": {"active": true}, ', 1))
    found = toy.run("reconcile", check=False)
    assert found.returncode == 1
    assert "orphan" in found.stdout and "toy-rot_0000" in found.stdout


def test_an_unknown_config_key_of_the_toy_kind_is_refused(toy: Toy) -> None:
    config = toy.workdir / "keyturn.toml"
    config.write_text(config.read_text().replace("bake_seconds = 0", "bake_secs = 0"))
    bad = toy.run("rotate", "toy1", check=False)
    assert bad.returncode == 1
    assert "key credentials.toy1.bake_secs: unknown key" in bad.stderr


def test_binary_material_is_imported_byte_for_byte(tmp_path: Path) -> None:
    # Bytes that look like whitespace at either end are part of a binary secret.
    first = b"\n\t " + bytes(range(32, 64)) + b"\r\n"
    toy = make_toy(tmp_path / "work", bake=3000, first=first)
    rid = toy.rotate_here()
    toy.worker_here()
    toy.rollback_here(rid)
    toy.worker_here()
    assert toy.show(rid)["state"] == "rolled_back"
    assert toy.deployed == first


@pytest.mark.parametrize("point", kill_points(rollback=False))
def test_forward_kill(toy: Toy, point: str, tmp_path: Path) -> None:
    rid = toy.rotate_here()
    marker = tmp_path / "killed-at"
    killed = toy.run(
        "worker",
        "--until-idle",
        check=False,
        KEYTURN_TEST_CRASH_AT=point,
        KEYTURN_TEST_CRASH_MARKER=str(marker),
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert marker.read_text().split() == [point]
    toy.run("worker", "--until-idle")
    assert_rotated(toy, rid)


@pytest.mark.parametrize("point", kill_points(rollback=True))
def test_rollback_kill(tmp_path: Path, point: str) -> None:
    # A long bake keeps the rotation in new_added (waiting, no lease) until it is rolled back.
    toy = make_toy(tmp_path / "work", bake=3000)
    rid = toy.rotate_here()
    toy.worker_here()
    waiting = toy.wiring().store.get_rotation(rid)
    assert waiting.state.value == "new_added" and waiting.lease_owner is None
    assert (waiting.wait_for or "").startswith("the new key to bake")
    toy.rollback_here(rid)
    marker = tmp_path / "killed-at"
    killed = toy.run(
        "worker",
        "--until-idle",
        check=False,
        KEYTURN_TEST_CRASH_AT=point,
        KEYTURN_TEST_CRASH_MARKER=str(marker),
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert marker.read_text().split() == [point]
    toy.run("worker", "--until-idle")
    rotation = toy.show(rid)
    assert rotation["state"] == "rolled_back", rotation
    ledger = toy.ledger
    assert ledger["k0"]["active"] is True
    assert ledger[f"toy-{rid}"]["active"] is False
    assert fingerprint(toy.deployed) == ledger["k0"]["fingerprint"]
