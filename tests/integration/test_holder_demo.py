"""The holder demo service (python -m keyturn.holders_demo) against the sandbox, both real
processes: it signs Dfns user actions with the key in its directory, and once the directory's
files are replaced with a second registered key, the http probe reports the new key and the
demo signs with it."""

from __future__ import annotations

import signal
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
from demo_fixture import Demo

from keyturn.adapters.deploy import FileTarget
from keyturn.adapters.dfns import new_credential_id
from keyturn.adapters.keys import CryptoKeys
from keyturn.holders import fingerprint_of_private
from keyturn.ports import DeployedMaterial
from keyturn.sandbox.testing import SandboxProcess
from keyturn.targets.holders import HTTP, HttpProbeConfig
from keyturn.testing.secret_scan import scan_bytes

KEYS = CryptoKeys()


def _register_second_key(sandbox: SandboxProcess) -> DeployedMaterial:
    pem = KEYS.generate("ecdsa-p256").private_pem
    credential_id = new_credential_id()
    with sandbox.client("service_account") as client:
        created = client.create_key_credential(pem, credential_id, "holder-demo-second")
    assert created.status_code == 200, created.text
    return DeployedMaterial(pem, credential_id, created.json()["credentialUuid"])


@pytest.mark.anyio
async def test_the_demo_signs_and_follows_a_replaced_key(
    tmp_path: Path, sandbox: SandboxProcess, start_demo: Callable[..., Demo]
) -> None:
    entry = sandbox.bootstrap["service_account"]
    first = DeployedMaterial(
        entry["private_key_pem"].encode(), entry["credential_id"], entry["credential_uuid"]
    )
    key_dir = tmp_path / "holder-key"
    target = FileTarget("holder", key_dir)
    target.deploy(first)
    token_file = tmp_path / "token"
    token_file.write_text(entry["token"] + "\n")
    token_file.chmod(0o600)

    demo = start_demo(
        "--key-dir", str(key_dir), "--port", "0", "--base-url", sandbox.base_url,
        "--token-file", str(token_file), "--sign-every", "0.2",
    )  # fmt: skip
    url = demo.wait_for_url()
    first_fp = fingerprint_of_private(first.private_key_pem)
    status = demo.wait_for("a first signature", lambda s: s["last_signed_fingerprint"] == first_fp)
    assert status["fingerprint"] == first_fp
    assert status["credential_id"] == first.credential_id
    assert status["last_error"] is None and status["last_signed_ok_at"]
    probe = HTTP.build(HttpProbeConfig(type="http", name="demo", url=url), None)  # type: ignore[arg-type]
    assert await probe.fingerprint() == first_fp

    second = _register_second_key(sandbox)
    second_fp = fingerprint_of_private(second.private_key_pem)
    assert second_fp != first_fp
    swapped_at = datetime.fromisoformat(status["last_signed_ok_at"])
    target.deploy(second)
    assert await probe.fingerprint() == second_fp
    status = demo.wait_for(
        "a signature with the second key",
        lambda s: (
            s["last_signed_fingerprint"] == second_fp
            and datetime.fromisoformat(s["last_signed_ok_at"]) > swapped_at
        ),
    )
    assert status["credential_id"] == second.credential_id
    assert status["last_error"] is None

    # A key the provider does not know is refused, and the demo says so without the key.
    unknown = DeployedMaterial(KEYS.generate("ed25519").private_pem, new_credential_id(), "cr-x")
    target.deploy(unknown)
    status = demo.wait_for("a refused signature", lambda s: s["last_error"] is not None)
    assert status["fingerprint"] == fingerprint_of_private(unknown.private_key_pem)
    assert status["last_signed_fingerprint"] == second_fp

    demo.proc.terminate()
    # a graceful stop (uvicorn ends by re-raising the SIGTERM it caught)
    assert demo.proc.wait(10) in (0, -signal.SIGTERM)
    output = demo.log.read_bytes()
    assert b"Traceback" not in output
    for name, secret in {"first": first, "second": second, "unknown": unknown}.items():
        assert scan_bytes(output, {name: secret.private_key_pem}) == []
    assert entry["token"].encode() not in output
