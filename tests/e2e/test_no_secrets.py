"""After full rotations, none of the run's private keys, tokens or master key appear in the
database files (SQLite with its -wal, or a pg_dump of PostgreSQL) or in the logs, in any of the
encodings a leak takes (PEM, DER, base64, base64url, hex, raw key bytes)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from harness import Kt

from keyturn.testing.secret_scan import assert_no_secrets, variants


def rotate_twice_collecting_secrets(kt: Kt, tmp_path: Path) -> dict[str, bytes | str]:
    boot = kt.bootstrap["service_account"]
    secrets: dict[str, bytes | str] = {
        "old private key": boot["private_key_pem"],
        "bearer token": boot["token"],
        "master key": (kt.workdir / "master.key").read_text().strip(),
        "pat private key": kt.bootstrap["pat"]["private_key_pem"],
        "pat token": kt.bootstrap["pat"]["token"],
    }
    secrets_file = kt.workdir / "deploy" / "sandbox-webhook" / "secrets.json"
    (secrets["webhook secret"],) = json.loads(secrets_file.read_text())["secrets"]
    # First rotation: killed mid-way (so the SQLite -wal is left as a crash leaves it), with
    # JSON logs; the snapshot of the files taken right after the kill is scanned too.
    rid = kt.rotate()
    env = {
        "KEYTURN_TEST_CRASH_AT": "transition.verify.after_commit",
        "KEYTURN_TEST_CRASH_MARKER": str(tmp_path / "m"),
    }
    assert kt.run("--log-format", "json", "worker", "--until-idle", check=False,
                  env=kt.env(**env)).returncode == -9  # fmt: skip
    snapshot = tmp_path / "after-kill"
    snapshot.mkdir()
    for f in kt.workdir.glob("keyturn.db*"):
        shutil.copy(f, snapshot / f.name)
    assert kt.run("--log-format", "json", "worker", "--until-idle").returncode == 0
    secrets["first new private key"] = kt.deployed()[0]
    # Second rotation with console logs, then an operator rollback of it.
    rid2 = kt.rotate()
    assert kt.worker().returncode == 0
    secrets["second new private key"] = kt.deployed()[0]
    kt.run("rotations", "rollback", rid2, "--reason", "scan", "--yes")
    assert kt.worker().returncode == 0
    kt.run("rotations", "show", rid)
    kt.run("rotations", "show", rid2, "--json")
    assert kt.show(rid2)["state"] == "rolled_back"
    # every secret really has its variants, so the scan below can fail
    assert all(len(variants(v)) >= 4 for v in secrets.values())
    return secrets


def test_no_secrets_in_sqlite_or_logs(kt: Kt, tmp_path: Path) -> None:
    secrets = rotate_twice_collecting_secrets(kt, tmp_path)
    db_files = [*kt.workdir.glob("keyturn.db*"), *(tmp_path / "after-kill").iterdir()]
    assert any(f.name.endswith("-wal") for f in db_files), "the crash left no -wal to scan"
    assert_no_secrets([*db_files, *kt.logs], secrets)
    # The scan does find what is there: the deploy target holds the new key (as it must).
    from keyturn.testing.secret_scan import scan_paths

    assert scan_paths([kt.workdir / "deploy"], secrets)


def test_no_secrets_in_postgres_dump(
    make_kt: Callable[..., Kt], fresh_pg_url: str, tmp_path: Path
) -> None:
    kt = make_kt(db_url=fresh_pg_url)
    secrets = rotate_twice_collecting_secrets(kt, tmp_path)
    dump = tmp_path / "dump.sql"
    dbname = fresh_pg_url.rsplit("/", 1)[1]
    with dump.open("wb") as f:
        subprocess.run(
            ["pg_dump", "-h", "127.0.0.1", "-U", "root", "--no-owner", dbname], stdout=f, check=True
        )
    assert b"rotations" in dump.read_bytes() and b"secrets" in dump.read_bytes()
    assert_no_secrets([dump, *kt.logs], secrets)
