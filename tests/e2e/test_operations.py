"""Operating keyturn: importing credentials, many rotations in flight in one worker, JSON logs,
master-key rotation, retention purge, and leases kept through slow provider calls."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from harness import SA, Kt


def add_credential_section(kt: Kt, name: str) -> None:
    with kt.config.open("a") as f:
        f.write(
            f'\n[credentials.{name}]\nkind = "service_account"\nprovider = "sandbox"\n'
            f'[[credentials.{name}.targets]]\ntype = "file"\npath = "deploy/{name}"\n'
        )


def test_import_and_concurrent_rotations(make_kt: Callable[..., Kt], tmp_path: Path) -> None:
    kt = make_kt(service_accounts=5)
    accounts = kt.bootstrap["service_accounts"]
    assert len(accounts) == 5
    names = [SA]
    for i, acct in enumerate(accounts[1:], start=1):
        name = f"svc-{i}"
        add_credential_section(kt, name)
        key = tmp_path / f"{name}.pem"
        key.write_text(acct["private_key_pem"])
        token = tmp_path / f"{name}.token"
        token.write_text(acct["token"])
        kt.run(
            "credentials", "import", name, "--kind", "service_account", "--provider", "sandbox",
            "--private-key-file", str(key), "--credential-id", acct["credential_id"],
            "--credential-uuid", acct["credential_uuid"], "--token-file", str(token),
        )  # fmt: skip
        names.append(name)
    listed = json.loads(kt.run("credentials", "list", "--json").stdout)
    assert set(names) <= {c["name"] for c in listed}
    # importing the same name again is refused
    again = kt.run(
        "credentials", "import", "svc-1", "--kind", "service_account", "--provider", "sandbox",
        "--private-key-file", str(tmp_path / "svc-1.pem"), "--credential-id", "x",
        "--credential-uuid", "y", "--token-file", str(tmp_path / "svc-1.token"), check=False,
    )  # fmt: skip
    assert again.returncode == 1 and "managed already" in again.stderr

    ids = [kt.rotate(n) for n in names]
    # slow the provider down so that overlap is visible: every request takes 150 ms
    kt.sandbox.set_faults(latency_ms=150)
    done = kt.run("--log-format", "json", "worker", "--until-idle", "--concurrency", "5")
    spans = []
    for rid in ids:
        rotation = kt.show(rid)
        assert rotation["state"] == "old_deactivated", rotation
        times = [datetime.fromisoformat(e["at"]) for e in rotation["events"]]
        spans.append((min(times[1:]), max(times)))
    # the five rotations were in flight at the same time, in one worker process
    latest_start = max(s for s, _ in spans)
    earliest_end = min(e for _, e in spans)
    assert latest_start < earliest_end, spans
    # one JSON log line per action, with rotation, credential, step, action, outcome, duration
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    actions = [x for x in lines if x.get("event") == "action"]
    # register, stage and promote on its one target, prove, deactivate
    assert len(actions) == 5 * 5
    for a in actions:
        assert {"rotation", "credential", "step", "action", "outcome", "duration_ms"} <= set(a)


def test_rotate_master_key(kt: Kt, tmp_path: Path) -> None:
    new_key = tmp_path / "new.key"
    new_key.write_text(kt.run("keys", "new-master").stdout)
    new_key.chmod(0o600)
    out = kt.run("keys", "rotate-master", "--new-key-file", str(new_key)).stdout
    # the keys and tokens of the service account and the PAT, and the webhook secret
    assert "re-encrypted 5 secret(s)" in out
    # the old key no longer opens the database; the new one does
    old = kt.run("rotate", SA, check=False)
    assert old.returncode == 1 and "master key" in old.stderr
    text = kt.config.read_text().replace('"master.key"', f'"{new_key}"')
    kt.config.write_text(text)
    rid = kt.rotate()
    assert kt.worker().returncode == 0
    assert kt.show(rid)["state"] == "old_deactivated"


def test_old_key_purged_after_retention_then_rollback_refused(kt: Kt) -> None:
    kt.config.write_text(kt.config.read_text().replace("retention_days = 30", "retention_days = 0"))
    rid = kt.rotate()
    assert kt.worker().returncode == 0
    assert kt.worker().returncode == 0  # a worker purges expired keys when it starts
    refused = kt.run("rotations", "rollback", rid, "--reason", "too late", "--yes", check=False)
    assert refused.returncode == 1
    assert "purged" in refused.stderr and "retention" in refused.stderr


def test_lease_is_renewed_through_slow_calls(kt: Kt) -> None:
    """Each provider call takes longer than half the 2 s lease: the worker renews and keeps
    the rotation (no takeover, no stale write) and finishes it."""
    kt.sandbox.set_faults(latency_ms=1200)
    rid = kt.rotate()
    done = kt.worker()
    assert done.returncode == 0, done.stderr
    assert "lease lost" not in done.stderr
    assert kt.show(rid)["state"] == "old_deactivated"


def test_rsa_key_via_the_service_account_endpoint_and_token_from_a_file(kt: Kt) -> None:
    """The other registration path and key algorithm, with the bearer token read from a file
    named in the config instead of the encrypted copy."""
    token_file = kt.workdir / "sa.token"
    token_file.write_text(kt.bootstrap["service_account"]["token"])
    text = kt.config.read_text()
    text = text.replace(
        'registration = "credentials"', 'registration = "service_account_endpoint"', 1
    )
    text = text.replace(
        'algorithm = "ed25519"', 'algorithm = "rsa-2048"\ntoken_file = "sa.token"', 1
    )
    kt.config.write_text(text)
    rid = kt.rotate()
    assert kt.worker().returncode == 0
    rotation = kt.show(rid)
    assert rotation["state"] == "old_deactivated"
    new = kt.provider_credentials()[rotation["new_credential_uuid"]]
    assert new["isActive"] is True and "PUBLIC KEY" in new["publicKey"]
    key, meta = kt.deployed()
    assert b"PRIVATE KEY" in key and meta["credentialId"] == new["credentialId"]
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    assert isinstance(serialization.load_pem_private_key(key, None), rsa.RSAPrivateKey)
    # a token file that goes missing is a clear, one-line error at the next rotation's worker
    token_file.unlink()
    rid2 = kt.rotate()
    worker = kt.worker()
    assert worker.returncode == 3  # it left the rotation halted
    halted = kt.show(rid2)["halted_reason"]
    assert halted and "token_file" in halted and "sa.token" in halted
