"""The official Dfns Python SDK, unchanged, against the sandbox over real HTTP."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from dfns_sdk import DfnsClient, DfnsClientConfig, DfnsError, KeySigner

from keyturn.sandbox.testing import SandboxProcess, key_attestation


def sdk(sandbox: SandboxProcess, role: str, cred_id: str, private_pem: str) -> DfnsClient:
    return DfnsClient(
        DfnsClientConfig(
            auth_token=sandbox.bootstrap[role]["token"],
            base_url=sandbox.base_url,
            signer=KeySigner(credential_id=cred_id, private_key=private_pem),
        )
    )


def pem(key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.mark.parametrize("role", ["service_account", "pat", "user"])
def test_sdk_rotates_a_key_credential(sandbox: SandboxProcess, role: str) -> None:
    boot = sandbox.bootstrap[role]
    old = sdk(sandbox, role, boot["credential_id"], boot["private_key_pem"])
    new_key = pem(ec.generate_private_key(ec.SECP256R1()) if role == "pat" else
                  ed25519.Ed25519PrivateKey.generate())  # fmt: skip

    challenge = old.auth.create_credential_challenge({"kind": "Key"})
    client_data, attestation = key_attestation(challenge["challenge"], new_key)
    created = old.auth.create_credential(
        {
            "challengeIdentifier": challenge["challengeIdentifier"],
            "credentialName": "rotated by the SDK",
            "credentialKind": "Key",
            "credentialInfo": {
                "credId": "sdk-new-key",
                "clientData": client_data,
                "attestationData": attestation,
            },
        }
    )
    assert created["credentialId"] == "sdk-new-key"
    assert created["credentialUuid"].startswith("cr-")
    assert created["isActive"] is True

    new = sdk(sandbox, role, "sdk-new-key", new_key.decode())
    new.auth.deactivate_credential({"credentialUuid": boot["credential_uuid"]})
    listed = {c["credentialUuid"]: c for c in new.auth.list_credentials()["items"]}
    assert listed[boot["credential_uuid"]]["isActive"] is False
    assert listed[created["credentialUuid"]]["isActive"] is True

    # the old key can no longer sign anything
    with pytest.raises(DfnsError) as refused:
        old.auth.activate_credential({"credentialUuid": boot["credential_uuid"]})
    assert refused.value.status_code == 401

    # rollback: the new key reactivates the old one
    new.auth.activate_credential({"credentialUuid": boot["credential_uuid"]})
    listed = {c["credentialUuid"]: c for c in new.auth.list_credentials()["items"]}
    assert listed[boot["credential_uuid"]]["isActive"] is True


def test_sdk_creates_pings_and_deletes_a_webhook(
    sandbox: SandboxProcess, webhook_receiver: Any
) -> None:
    boot = sandbox.bootstrap["service_account"]
    client = sdk(sandbox, "service_account", boot["credential_id"], boot["private_key_pem"])

    created = client.webhooks.create_webhook(
        {"url": webhook_receiver.url, "events": ["*"], "description": "sdk test"}
    )
    secret = created["secret"]
    assert secret.startswith("whs-")
    assert created["id"].startswith("wh-")
    assert "secret" not in client.webhooks.get_webhook(created["id"])

    pong = client.webhooks.ping_webhook(created["id"])
    assert pong == {"status": "200"}
    [(headers, body)] = webhook_receiver.events()
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    assert headers["x-dfns-webhook-signature"] == f"sha256={expected}"
    event = json.loads(body)
    assert event["id"].startswith("whe-")

    listed = client.webhooks.list_webhook_events(created["id"])
    assert [e["id"] for e in listed["items"]] == [event["id"]]
    assert client.webhooks.get_webhook_event(created["id"], event["id"])["status"] == "200"

    assert client.webhooks.delete_webhook(created["id"]) == {"deleted": True}
    with pytest.raises(DfnsError) as gone:
        client.webhooks.get_webhook(created["id"])
    assert gone.value.status_code == 404


def test_sdk_sees_failed_ping(sandbox: SandboxProcess, webhook_receiver: Any) -> None:
    boot = sandbox.bootstrap["service_account"]
    client = sdk(sandbox, "service_account", boot["credential_id"], boot["private_key_pem"])
    created = client.webhooks.create_webhook({"url": webhook_receiver.url, "events": ["*"]})
    webhook_receiver.status_code = 503
    pong = client.webhooks.ping_webhook(created["id"])
    assert pong["status"] == "503"
    assert "503" in pong["error"]


def test_sdk_service_account_endpoint(sandbox: SandboxProcess) -> None:
    boot = sandbox.bootstrap["service_account"]
    client = sdk(sandbox, "service_account", boot["credential_id"], boot["private_key_pem"])
    public = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    created = client.auth.create_service_account_credential({"publicKey": public, "name": "next"})
    assert created["publicKey"] == public
    assert created["credentialId"] != created["credentialUuid"]
    uuids = [c["credentialUuid"] for c in client.auth.list_credentials()["items"]]
    assert created["credentialUuid"] in uuids
    assert client.auth.delete_credential(created["credentialUuid"]) == {}
    uuids = [c["credentialUuid"] for c in client.auth.list_credentials()["items"]]
    assert created["credentialUuid"] not in uuids
