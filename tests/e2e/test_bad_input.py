"""Bad input: one clear line on stderr, a non-zero exit, no traceback, and no state change
(a dump of the database before and after is identical)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import SA, Kt

from keyturn.adapters.vault import new_master_key


def assert_clean_failure(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert len(err.splitlines()) == 1, f"expected one line, got:\n{err}"
    assert err.startswith("keyturn: error: "), err
    for needle in needles:
        assert needle in err, err


def unchanged(
    kt: Kt, action: Callable[[], subprocess.CompletedProcess[str]], *needles: str
) -> None:
    before = kt.sqlite_dump()
    assert_clean_failure(action(), *needles)
    assert kt.sqlite_dump() == before


def test_unknown_credential(kt: Kt) -> None:
    unchanged(
        kt,
        lambda: kt.run("rotate", "no-such-cred", check=False),
        "no-such-cred",
        "credentials list",
    )


def test_second_rotation_of_a_rotating_credential(kt: Kt) -> None:
    rid = kt.rotate()
    unchanged(kt, lambda: kt.run("rotate", SA, check=False), "unfinished rotation", rid)


@pytest.mark.parametrize(
    "text, needles",
    [
        ("[worker\nlease_seconds = 3", ("not valid TOML",)),
        ('[worker]\nlease_seconds = "soon"\n', ("worker.lease_seconds",)),
        ("[workr]\nlease_seconds = 3\n", ("workr", "unknown key")),
        ('[database]\nurl = "mysql://x"\n', ("database.url", "sqlite")),
    ],
)
def test_malformed_config(kt: Kt, tmp_path: Path, text: str, needles: tuple[str, ...]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    unchanged(
        kt, lambda: kt.run("--config", str(bad), "rotate", SA, check=False), str(bad), *needles
    )


def test_wrong_master_key(kt: Kt) -> None:
    env = kt.env(KEYTURN_MASTER_KEY=new_master_key())
    for args in (["rotate", SA], ["worker", "--until-idle"]):
        unchanged(
            kt, lambda a=args: kt.run(*a, check=False, env=env), "master key", "KEYTURN_MASTER_KEY"
        )


def test_master_key_file_readable_by_others(kt: Kt) -> None:
    key = kt.workdir / "master.key"
    key.chmod(0o644)
    unchanged(kt, lambda: kt.run("rotate", SA, check=False), "chmod 600")


def test_database_not_migrated(kt: Kt, tmp_path: Path) -> None:
    import sqlite3

    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    env = kt.env(KEYTURN_DATABASE_URL=f"sqlite:///{empty}")
    before = empty.read_bytes()
    for args in (["rotations", "list"], ["rotate", SA], ["worker", "--until-idle"]):
        assert_clean_failure(
            kt.run(*args, check=False, env=env), "not migrated", "keyturn db upgrade"
        )
    assert empty.read_bytes() == before


def test_illegal_operator_actions(kt: Kt) -> None:
    rid = kt.rotate()
    assert kt.worker().returncode == 0
    kt.run("rotations", "rollback", rid, "--reason", "undo", "--yes")
    assert kt.worker().returncode == 0
    assert kt.show(rid)["state"] == "rolled_back"
    unchanged(
        kt,
        lambda: kt.run("rotations", "rollback", rid, "--reason", "again", "--yes", check=False),
        "cannot rollback",
        "rolled_back",
    )
    unchanged(
        kt,
        lambda: kt.run("rotations", "resume", rid, "--reason", "why", check=False),
        "finished",
    )
    unchanged(kt, lambda: kt.run("rotations", "show", "rot_nope", check=False), "rot_nope")
    unchanged(kt, lambda: kt.run("rotations", "list", "--state", "done", check=False), "--state")
    unchanged(kt, lambda: kt.run("rotations", "cancel", rid, check=False), "--reason")


def test_cancel_after_an_intent_says_rollback(kt: Kt, tmp_path: Path) -> None:
    rid = kt.rotate()
    killed = kt.worker(
        KEYTURN_TEST_CRASH_AT="forward.register_new.after_intent",
        KEYTURN_TEST_CRASH_MARKER=str(tmp_path / "m"),
    )
    assert killed.returncode == -9
    unchanged(
        kt, lambda: kt.run("rotations", "cancel", rid, "--reason", "x", check=False), "use rollback"
    )
