"""Sandbox state survives restarts and SIGKILL under a steady stream of writes."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from keyturn.sandbox.testing import SandboxError, SandboxProcess, start_sandbox


def public_pem() -> str:
    return (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def test_acknowledged_writes_survive_sigkill(sandbox: SandboxProcess) -> None:
    bootstrap_before = dict(sandbox.bootstrap)
    acknowledged_credentials: list[str] = []
    acknowledged_updates: dict[str, str] = {}
    client = sandbox.client(timeout=5.0)
    hook = client.request(
        "POST", "/webhooks", {"url": "http://127.0.0.1:9/hook", "events": ["*"]}, sign=True
    )
    webhook_id = hook.json()["id"]
    stop = threading.Event()

    def create_credentials() -> None:
        with sandbox.client(timeout=5.0) as writer:
            while not stop.is_set():
                try:
                    response = writer.request(
                        "POST", "/auth/service-accounts/credentials", {"publicKey": public_pem()},
                        sign=True,
                    )  # fmt: skip
                except (httpx.HTTPError, SandboxError):
                    return
                if response.status_code == 200:
                    acknowledged_credentials.append(response.json()["credentialUuid"])

    def update_webhook() -> None:
        with sandbox.client(timeout=5.0) as writer:
            n = 0
            while not stop.is_set():
                n += 1
                description = f"update {n}"
                try:
                    response = writer.request(
                        "PUT", f"/webhooks/{webhook_id}", {"description": description}, sign=True
                    )
                except (httpx.HTTPError, SandboxError):
                    return
                if response.status_code == 200:
                    acknowledged_updates["last"] = description

    threads = [threading.Thread(target=create_credentials) for _ in range(2)]
    threads.append(threading.Thread(target=update_webhook))
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    sandbox.kill()  # SIGKILL mid-stream
    stop.set()
    for thread in threads:
        thread.join(10)
    assert len(acknowledged_credentials) >= 5, "the write stream barely ran"

    sandbox.start()
    assert sandbox.bootstrap["org_id"] == bootstrap_before["org_id"]
    assert sandbox.bootstrap["service_account"] == bootstrap_before["service_account"]
    listed = {
        c["credentialUuid"] for c in client.request("GET", "/auth/credentials").json()["items"]
    }
    missing = [uuid for uuid in acknowledged_credentials if uuid not in listed]
    assert not missing, f"{len(missing)} acknowledged credentials lost"
    webhook = client.request("GET", f"/webhooks/{webhook_id}").json()
    # the last acknowledged update is there (or a later one that was applied, unacknowledged)
    last_acked = int(acknowledged_updates["last"].split()[1])
    assert int(webhook["description"].split()[1]) >= last_acked


def test_restart_keeps_state_and_rewrites_bootstrap(
    sandbox_factory: Callable[..., SandboxProcess],
) -> None:
    sandbox = sandbox_factory(service_accounts=3)
    assert len(sandbox.bootstrap["service_accounts"]) == 3
    assert sandbox.bootstrap["service_accounts"][0] == sandbox.bootstrap["service_account"]
    tokens = {a["token"] for a in sandbox.bootstrap["service_accounts"]}
    assert len(tokens) == 3
    for account in sandbox.bootstrap["service_accounts"]:
        signer = httpx.get(
            sandbox.base_url + "/auth/credentials",
            headers={"Authorization": f"Bearer {account['token']}"},
        )
        assert [c["credentialUuid"] for c in signer.json()["items"]] == [account["credential_uuid"]]
    mode = sandbox.bootstrap_path.stat().st_mode & 0o777
    assert mode == 0o600
    created = sandbox.client().request(
        "POST", "/auth/service-accounts/credentials", {"publicKey": public_pem()}, sign=True
    )
    first_pid = sandbox.pid
    base_url = sandbox.base_url
    assert sandbox.stop() == 0, "SIGTERM stops the sandbox cleanly"
    sandbox.restart()
    assert sandbox.pid != first_pid
    assert sandbox.base_url == base_url, "restart() keeps the port"
    on_disk = json.loads(sandbox.bootstrap_path.read_text())
    assert on_disk["base_url"] == base_url
    assert on_disk["pid"] == sandbox.pid
    assert on_disk["service_accounts"] == sandbox.bootstrap["service_accounts"]
    listed = sandbox.client().request("GET", "/auth/credentials").json()["items"]
    assert created.json()["credentialUuid"] in [c["credentialUuid"] for c in listed]
    # request counters are in memory and reset on restart
    assert "POST /auth/service-accounts/credentials" not in sandbox.state()["requests"]


def test_unusable_state_is_reported_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "sandbox.sqlite3").write_text("not a database")
    with pytest.raises(SandboxError, match=r"state database in .* is unusable"):
        start_sandbox(tmp_path)
