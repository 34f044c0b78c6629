"""The official Dfns Python SDK, unchanged, drives passkeys against the sandbox over HTTP:
delegated_login, create_credential_code, create_credential_challenge_with_code and
create_credential_with_code, with the software authenticator making the attestations and
signing the user's actions (through the SDK's duck-typed signer interface)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from dfns_sdk import DfnsClient, DfnsClientConfig, DfnsError, KeySigner

from keyturn.sandbox.testing import SandboxProcess
from keyturn.testing.authenticator import SoftwareAuthenticator

ORIGIN = "https://sandbox.keyturn.local"
NEW_ORIGIN = "https://wallet.newdomain.example"
NEW_RP_ID = "newdomain.example"


def test_sdk_code_flow_registers_a_passkey_on_a_new_domain(
    sandbox_factory: Callable[..., SandboxProcess], tmp_path: Path
) -> None:
    sandbox = sandbox_factory(
        end_users=1,
        extra_args=[
            *("--webauthn-origin", ORIGIN, "--webauthn-origin", NEW_ORIGIN),
            *("--webauthn-rp-id", "sandbox.keyturn.local", "--webauthn-rp-id", NEW_RP_ID),
        ],
    )
    boot = sandbox.bootstrap["service_account"]
    service = DfnsClient(
        DfnsClientConfig(
            auth_token=boot["token"],
            base_url=sandbox.base_url,
            signer=KeySigner(
                credential_id=boot["credential_id"], private_key=boot["private_key_pem"]
            ),
        )
    )
    entry = sandbox.end_user(0)

    login = service.auth.delegated_login({"username": entry["username"]})
    token = login["token"]
    assert token.count(".") == 2

    old_device = sandbox.authenticator()
    as_user = DfnsClient(
        DfnsClientConfig(
            auth_token=token, base_url=sandbox.base_url, signer=old_device.sdk_signer(ORIGIN)
        )
    )
    listed = as_user.auth.list_credentials()["items"]
    assert [c["credentialUuid"] for c in listed] == [entry["credential_uuid"]]

    expiration = (datetime.now(UTC) + timedelta(seconds=45)).isoformat()
    code = as_user.auth.create_credential_code({"expiration": expiration})
    assert len(code["code"]) == 11

    # the new device is on the new domain and holds no credential: unauthenticated calls
    browser = DfnsClient(
        DfnsClientConfig(
            auth_token="none", base_url=sandbox.base_url, headers={"Origin": NEW_ORIGIN}
        )
    )
    challenge = browser.auth.create_credential_challenge_with_code(
        {"code": code["code"], "credentialKind": "Fido2"}
    )
    assert challenge["rp"]["id"] == NEW_RP_ID
    new_device = SoftwareAuthenticator(tmp_path / "new-device.json")
    info = new_device.make_credential(
        rp_id=challenge["rp"]["id"],
        origin=NEW_ORIGIN,
        challenge=challenge["challenge"],
        user_id=challenge["user"]["id"],
        attestation="packed",
    )
    created = browser.auth.create_credential_with_code(
        {
            "challengeIdentifier": challenge["challengeIdentifier"],
            "credentialName": "phone on the new domain",
            "credentialKind": "Fido2",
            "credentialInfo": info,
        }
    )
    assert created["kind"] == "Fido2" and created["relyingPartyId"] == NEW_RP_ID

    # the code is spent
    with pytest.raises(DfnsError) as reused:
        browser.auth.create_credential_challenge_with_code(
            {"code": code["code"], "credentialKind": "Fido2"}
        )
    assert reused.value.status_code == 401

    # the new passkey, on its own domain, retires the old one through the SDK
    on_new_domain = DfnsClient(
        DfnsClientConfig(
            auth_token=token, base_url=sandbox.base_url, signer=new_device.sdk_signer(NEW_ORIGIN)
        )
    )
    on_new_domain.auth.deactivate_credential({"credentialUuid": entry["credential_uuid"]})
    states = {c["credentialUuid"]: c["isActive"] for c in as_user.auth.list_credentials()["items"]}
    assert states == {entry["credential_uuid"]: False, created["credentialUuid"]: True}

    # the old passkey is refused (the SDK's signer is handed only the new one to use)
    old_signer = old_device.sdk_signer(ORIGIN, credential_id=entry["credential_id"])
    stale = DfnsClient(
        DfnsClientConfig(auth_token=token, base_url=sandbox.base_url, signer=old_signer)
    )
    with pytest.raises(DfnsError) as refused:
        stale.auth.activate_credential({"credentialUuid": entry["credential_uuid"]})
    assert refused.value.status_code == 401

    # a user (signing with a valid passkey) cannot log anyone in
    with pytest.raises(DfnsError) as forbidden:
        on_new_domain.auth.delegated_login({"username": entry["username"]})
    assert forbidden.value.status_code == 403
    for client in (service, as_user, browser, on_new_domain, stale):
        client.close()


def test_sdk_service_account_registers_an_end_user_with_a_passkey(
    sandbox_factory: Callable[..., SandboxProcess], tmp_path: Path
) -> None:
    sandbox = sandbox_factory()
    boot = sandbox.bootstrap["service_account"]
    signer = KeySigner(credential_id=boot["credential_id"], private_key=boot["private_key_pem"])
    service = DfnsClient(
        DfnsClientConfig(auth_token=boot["token"], base_url=sandbox.base_url, signer=signer)
    )
    challenge = service.auth.create_delegated_registration_challenge(
        {"email": "jane@example.co", "kind": "EndUser"}
    )
    assert challenge["user"]["name"] == "jane@example.co"
    device = SoftwareAuthenticator(tmp_path / "jane.json")
    info = device.make_credential(
        rp_id=challenge["rp"]["id"],
        origin=ORIGIN,
        challenge=challenge["challenge"],
        user_id=challenge["user"]["id"],
    )
    registering = DfnsClient(
        DfnsClientConfig(
            auth_token=challenge["temporaryAuthenticationToken"], base_url=sandbox.base_url
        )
    )
    registered = registering.auth.register(
        {"firstFactorCredential": {"credentialKind": "Fido2", "credentialInfo": info}}
    )
    assert registered["user"]["username"] == "jane@example.co"
    with pytest.raises(DfnsError) as spent:  # the temporary token served once
        registering.auth.register(
            {"firstFactorCredential": {"credentialKind": "Fido2", "credentialInfo": info}}
        )
    assert spent.value.status_code == 401
    with pytest.raises(DfnsError) as taken:
        service.auth.create_delegated_registration_challenge(
            {"email": "jane@example.co", "kind": "EndUser"}
        )
    assert taken.value.status_code == 409

    token = service.auth.delegated_login({"username": "jane@example.co"})["token"]
    jane = DfnsClient(
        DfnsClientConfig(
            auth_token=token, base_url=sandbox.base_url, signer=device.sdk_signer(ORIGIN)
        )
    )
    [passkey] = jane.auth.list_credentials()["items"]
    assert passkey["kind"] == "Fido2" and passkey["credentialId"] == info["credId"]
    code = jane.auth.create_credential_code(
        {"expiration": (datetime.now(UTC) + timedelta(seconds=30)).isoformat()}
    )
    assert code["code"]
    for client in (service, registering, jane):
        client.close()
