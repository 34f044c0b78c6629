"""Fleet verbs: 50 service accounts brought under management with one `credentials import
--file` (each checked at the provider: a bogus credential id is refused and nothing of it is
stored) and rotated with one `rotate --kind service_account` (`--all` minus the webhook); ids
from a piped `rotations list` are accepted by `rotations show`, prefixes and `--latest` name
rotations, the list filters."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from fleet import add_credential_section
from harness import KEYTURN, SA, Kt

from keyturn.sandbox.testing import start_sandbox

N = 50


def test_import_fifty_from_one_file_and_rotate_them_all(tmp_path: Path) -> None:
    sandbox = start_sandbox(tmp_path / "sandbox", service_accounts=N + 2)
    try:
        kt = Kt(tmp_path / "work", sandbox)
        kt.run("init", str(kt.workdir), "--sandbox-bootstrap", str(sandbox.bootstrap_path))
        accounts = sandbox.bootstrap["service_accounts"][1:]
        secrets = tmp_path / "import"
        secrets.mkdir(mode=0o700)
        lines = []
        for i, acct in enumerate(accounts):
            name = f"svc-{i}"
            add_credential_section(kt.config, name)
            (secrets / f"{name}.pem").write_text(acct["private_key_pem"])
            (secrets / f"{name}.token").write_text(acct["token"])
            bogus = i == N  # the last entry names a credential id that does not exist
            lines.append(
                json.dumps(
                    {
                        "name": name,
                        "kind": "service_account",
                        "provider": "sandbox",
                        "credential_id": "Y3JlZC1ub3BlLW5vcGU" if bogus else acct["credential_id"],
                        "credential_uuid": acct["credential_uuid"],
                        "private_key_file": f"{name}.pem",
                        "token_file": f"{name}.token",
                    }
                )
            )
        (secrets / "fleet.jsonl").write_text("\n".join(lines) + "\n")
        before = kt.credentials()
        imported = kt.run(
            "credentials", "import", "--file", str(secrets / "fleet.jsonl"), check=False
        )
        assert imported.returncode == 1
        refused = imported.stderr.strip().splitlines()
        assert refused == [refused[0]] and refused[0].startswith(f"keyturn: error: svc-{N}: ")
        assert "credential id" in refused[0] and "check --credential-id" in refused[0]
        managed = {c["name"] for c in kt.credentials()}
        assert managed == {c["name"] for c in before} | {f"svc-{i}" for i in range(N)}
        assert f"svc-{N}" not in managed  # nothing of the refused entry

        # --all would take the webhook too, whose rotation waits for a receiver this test lacks
        started = kt.run("rotate", "--kind", "service_account", "--json", check=False)
        body = json.loads(started.stdout)
        ours = {s["credential"] for s in body["started"]}
        assert {f"svc-{i}" for i in range(N)} | {SA} <= ours
        assert started.returncode == 0 and body["refused"] == [], body
        kt.patch_config("concurrency = 8", "concurrency = 32")
        assert kt.worker().returncode == 0
        done = json.loads(kt.run("rotations", "list", "--json").stdout)
        assert {r["credential"] for r in done if r["state"] == "old_deactivated"} >= ours

        # the list piped: full ids in the first column, each accepted by show
        listed = subprocess.run(
            [*KEYTURN, "rotations", "list", "--credential", "svc-3"],
            env=kt.env(), capture_output=True, text=True, check=True,
        )  # fmt: skip
        ids = [line.split()[0] for line in listed.stdout.splitlines()[1:]]
        assert len(ids) == 1 and len(ids[0]) == len(body["started"][0]["id"])
        assert kt.show(ids[0])["credential"] == "svc-3"
        assert kt.show(ids[0][:12])["id"] == ids[0]  # a unique prefix
        assert kt.show("svc-3")["id"] == ids[0]  # a credential: its latest rotation
        limited = json.loads(kt.run("rotations", "list", "--limit", "5", "--json").stdout)
        assert len(limited) == 5
        halted = kt.run("rotations", "list", "--status", "halted").stdout
        assert halted.strip() == "no rotations"
        ambiguous = kt.run("rotations", "show", "rot_", check=False)
        assert ambiguous.returncode == 1 and "matches several rotations" in ambiguous.stderr
        paused = kt.run("rotations", "pause", "--latest", "svc-3", "--reason", "x", check=False)
        assert paused.returncode == 1 and "the rotation is finished" in paused.stderr
    finally:
        sandbox.stop()
