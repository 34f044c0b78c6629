"""`keyturn reconcile`: read-only comparison of the provider with the store."""

from __future__ import annotations

import json

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from harness import Kt


def _pem() -> bytes:
    return ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def test_reconcile_clean_then_orphan_and_mismatch(kt: Kt) -> None:
    boot = kt.bootstrap["service_account"]
    rid = kt.rotate()
    assert kt.worker().returncode == 0
    clean = kt.run("reconcile")
    assert clean.returncode == 0 and "agree" in clean.stdout
    assert json.loads(kt.run("reconcile", "--json").stdout) == []

    new_uuid = kt.show(rid)["new_credential_uuid"]
    new_pem, _ = kt.deployed()
    before = kt.sqlite_dump()
    # An orphan: a credential named as keyturn names them, for a rotation nobody knows; and a
    # mismatch: the old credential reactivated behind keyturn's back.
    with kt.sandbox.client("service_account").with_key(
        kt.deployed()[1]["credentialId"], new_pem
    ) as c:
        created = c.create_key_credential(_pem(), "kt-rot_0000deadbeef", "keyturn-rot_0000deadbeef")
        assert created.status_code == 200, created.text
        orphan_uuid = created.json()["credentialUuid"]
        body = {"credentialUuid": boot["credential_uuid"]}
        assert c.request("PUT", "/auth/credentials/activate", body, sign=True).status_code == 200
    found = kt.run("reconcile", "--json", check=False)
    assert found.returncode == 1
    findings = json.loads(found.stdout)
    kinds = {(f["kind"], f["provider_credential_uuid"]) for f in findings}
    assert ("orphan", orphan_uuid) in kinds
    assert ("mismatch", boot["credential_uuid"]) in kinds
    assert all(f["credential"] == "sandbox-service-account" for f in findings)
    assert new_uuid not in {f["provider_credential_uuid"] for f in findings}
    human = kt.run("reconcile", check=False)
    assert human.returncode == 1 and "rot_0000deadbeef" in human.stdout
    assert kt.sqlite_dump() == before  # read only
