"""PAT key rotation end to end (issue 5): the real `keyturn` command against the sandbox. The
new Key credential is registered on the PAT's linked user; the new private key and the new
credential id are deployed together and sign a real user action with the PAT's token; the old
credential is inactive and refused. Rollback from old_deactivated restores the old pair."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from harness import PAT, SA, Kt

from keyturn.sandbox.testing import SandboxClient, SandboxError


def public_pem_of(private_pem: bytes) -> str:
    key = serialization.load_pem_private_key(private_pem, password=None)
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def norm(pem: str) -> str:
    return "".join(pem.split())


def pat_client(kt: Kt, credential_id: str, private_pem: bytes) -> SandboxClient:
    """A client calling as the PAT (its bearer token) and signing with the given pair."""
    return SandboxClient(
        kt.sandbox.base_url, kt.bootstrap["pat"]["token"], credential_id, private_pem
    )


def signed_noop(client: SandboxClient, inactive_uuid: str) -> Any:
    """A signed request that changes nothing: deactivate a credential already inactive (Dfns:
    a no-op). The sandbox runs the whole user-action flow: challenge, assertion, token, call."""
    return client.request(
        "PUT", "/auth/credentials/deactivate", {"credentialUuid": inactive_uuid}, sign=True
    )


def assert_deployed_pair_signs(kt: Kt, uuid: str, other_uuid: str) -> None:
    """The deployed key and credential id are `uuid`'s at the sandbox and sign a user action
    (a signed no-op on `other_uuid`, inactive); nothing changes at the sandbox."""
    creds = kt.pat_credentials()
    key, meta = kt.deployed(PAT)
    assert meta["credentialUuid"] == uuid
    assert meta["credentialId"] == creds[uuid]["credentialId"]
    assert norm(public_pem_of(key)) == norm(creds[uuid]["publicKey"])
    with pat_client(kt, meta["credentialId"], key) as client:
        response = signed_noop(client, other_uuid)
    assert response.status_code == 200, response.text
    assert kt.pat_credentials() == creds


def test_pat_rotation_deploys_a_pair_that_signs(kt: Kt) -> None:
    boot = kt.bootstrap["pat"]
    sa_before = kt.provider_credentials()
    rid = kt.rotate(PAT)
    assert kt.worker().returncode == 0
    rotation = kt.show(rid)
    assert rotation["state"] == "old_deactivated"
    old_uuid, new_uuid = boot["credential_uuid"], rotation["new_credential_uuid"]
    assert rotation["old_credential_uuid"] == old_uuid and new_uuid != old_uuid

    # On the PAT's linked user (what the PAT's token lists): the new one active, the old not.
    creds = kt.pat_credentials()
    assert set(creds) == {old_uuid, new_uuid}
    assert creds[new_uuid]["isActive"] is True and creds[new_uuid]["kind"] == "Key"
    assert creds[old_uuid]["isActive"] is False
    assert kt.provider_credentials() == sa_before  # the service account was not touched

    assert_deployed_pair_signs(kt, new_uuid, old_uuid)
    # The old pair no longer signs.
    old = pat_client(kt, boot["credential_id"], boot["private_key_pem"].encode())
    with old, pytest.raises(SandboxError, match="401"):
        signed_noop(old, old_uuid)
    managed = {c["name"]: c for c in kt.credentials()}
    assert managed[PAT]["credential_uuid"] == new_uuid
    assert managed[SA]["credential_uuid"] == kt.bootstrap["service_account"]["credential_uuid"]


def test_pat_rollback_from_old_deactivated_restores_the_old_pair(kt: Kt) -> None:
    boot = kt.bootstrap["pat"]
    rid = kt.rotate(PAT)
    assert kt.worker().returncode == 0
    assert kt.show(rid)["state"] == "old_deactivated"
    out = kt.run("rotations", "rollback", rid, "--reason", "pat undo", "--yes").stdout
    assert "rollback applied" in out
    assert kt.worker().returncode == 0
    rotation = kt.show(rid)
    assert rotation["state"] == "rolled_back"
    old_uuid, new_uuid = boot["credential_uuid"], rotation["new_credential_uuid"]

    creds = kt.pat_credentials()
    assert set(creds) == {old_uuid, new_uuid}
    assert creds[old_uuid]["isActive"] is True
    assert creds[new_uuid]["isActive"] is False
    key, _meta = kt.deployed(PAT)
    assert key == boot["private_key_pem"].encode()
    assert_deployed_pair_signs(kt, old_uuid, new_uuid)
    managed = {c["name"]: c for c in kt.credentials()}
    assert managed[PAT]["credential_uuid"] == old_uuid
