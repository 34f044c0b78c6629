"""Passkeys against the sandbox over real HTTP: end users, Delegated Login, Fido2 credentials
with WebAuthn checks, the code flow, relying-party rules; the software authenticator plays the
users' devices (keyturn.testing.authenticator)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from keyturn.sandbox.crypto import b64url_decode, b64url_encode
from keyturn.sandbox.testing import PasskeyClient, SandboxError, SandboxProcess
from keyturn.testing.authenticator import SoftwareAuthenticator, state_file_secrets

ORIGIN = "https://sandbox.keyturn.local"
RP_ID = "sandbox.keyturn.local"
NEW_ORIGIN = "https://wallet.newdomain.example"
NEW_RP_ID = "newdomain.example"


@pytest.fixture
def sandbox(sandbox_factory: Callable[..., SandboxProcess]) -> SandboxProcess:
    return sandbox_factory(end_users=2)


def assert_error(response: httpx.Response, status: int, check: str | None = None) -> dict[str, Any]:
    """Dfns' status and envelope, and (for WebAuthn refusals) which check refused."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["status"] == status
    assert set(error) >= {"id", "status", "code", "message", "details"}
    assert "\n" not in error["message"]
    if check is not None:
        assert error["details"].get("check") == check, error
    return dict(error)


def user(sandbox: SandboxProcess, index: int = 0) -> tuple[dict[str, Any], PasskeyClient]:
    """An end user's bootstrap entry and a client logged in for them (Delegated Login)."""
    entry = sandbox.end_user(index)
    token = sandbox.delegated_login(entry["username"])
    return entry, sandbox.passkey_client(token, sandbox.authenticator(), ORIGIN)


def action_challenge(client: PasskeyClient, method: str, path: str, body: Any) -> dict[str, Any]:
    response = client._http.post(
        "/auth/action/init",
        json={
            "userActionPayload": json.dumps(body, separators=(",", ":")),
            "userActionHttpMethod": method,
            "userActionHttpPath": path,
            "userActionServerKind": "Api",
        },
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


def sign(
    client: PasskeyClient, challenge: dict[str, Any], first_factor: dict[str, Any]
) -> httpx.Response:
    return client._http.post(
        "/auth/action",
        json={"challengeIdentifier": challenge["challengeIdentifier"], "firstFactor": first_factor},
    )


def deactivate(client: PasskeyClient, uuid: str, **options: Any) -> httpx.Response:
    saved = dict(client.options)
    client.options.update(options)
    try:
        return client.request(
            "PUT", "/auth/credentials/deactivate", {"credentialUuid": uuid}, sign=True
        )
    finally:
        client.options = saved


def credentials(client: PasskeyClient) -> dict[str, dict[str, Any]]:
    response = client._http.get("/auth/credentials")
    assert response.status_code == 200, response.text
    return {c["credentialUuid"]: c for c in response.json()["items"]}


# ---------------------------------------------------------------------------- the flows


def test_second_passkey_signed_by_the_first_then_deactivates_it(
    sandbox: SandboxProcess, tmp_path: Path
) -> None:
    entry, old = user(sandbox)
    new_device = SoftwareAuthenticator(tmp_path / "new-device.json")

    created = old.create_passkey(new_device, ORIGIN, name="new laptop", attestation="packed")
    assert created.status_code == 200, created.text
    passkey = created.json()
    assert passkey["kind"] == "Fido2"
    assert passkey["relyingPartyId"] == RP_ID and passkey["origin"] == ORIGIN
    assert passkey["credentialId"] == new_device.credentials()[0].credential_id
    assert passkey["publicKey"].startswith("-----BEGIN PUBLIC KEY-----")

    # both passkeys are offered for the next user action
    challenge = action_challenge(old, "PUT", "/auth/credentials/deactivate", {})
    offered = {c["id"] for c in challenge["allowCredentials"]["webauthn"]}
    assert offered == {entry["credential_id"], passkey["credentialId"]}
    assert challenge["allowCredentials"]["key"] == []
    assert "Fido2" in {k["kind"] for k in challenge["supportedCredentialKinds"]}
    assert challenge["rp"]["id"] == RP_ID

    # the new passkey signs a user action: deactivating the first one
    new = sandbox.passkey_client(old._http.headers["Authorization"][7:], new_device, ORIGIN)
    response = deactivate(new, entry["credential_uuid"])
    assert response.status_code == 200, response.text
    listed = credentials(new)
    assert listed[entry["credential_uuid"]]["isActive"] is False
    assert listed[passkey["credentialUuid"]]["isActive"] is True

    # the deactivated passkey is no longer offered, and is refused when used anyway
    challenge = action_challenge(old, "PUT", "/auth/credentials/activate", {})
    assert [c["id"] for c in challenge["allowCredentials"]["webauthn"]] == [passkey["credentialId"]]
    factor = sandbox.authenticator().first_factor(
        challenge, origin=ORIGIN, credential_id=entry["credential_id"]
    )
    assert_error(sign(old, challenge, factor), 401, "credential")


def test_code_flow_end_to_end_on_a_second_origin(sandbox: SandboxProcess, tmp_path: Path) -> None:
    sandbox.set_relying_parties(origins=[ORIGIN, NEW_ORIGIN], rp_ids=[RP_ID, NEW_RP_ID])
    entry, client = user(sandbox)
    expiration = (datetime.now(UTC) + timedelta(seconds=50)).isoformat()
    created = client.request(
        "POST", "/auth/credentials/code", {"expiration": expiration}, sign=True
    )
    assert created.status_code == 200, created.text
    code = created.json()["code"]

    # the new device, on the new domain, unauthenticated: challenge with the code ...
    browser = httpx.Client(base_url=sandbox.base_url, headers={"Origin": NEW_ORIGIN})
    init = browser.post(
        "/auth/credentials/code/init", json={"code": code, "credentialKind": "Fido2"}
    )
    assert init.status_code == 200, init.text
    challenge = init.json()
    assert challenge["kind"] == "Fido2"
    assert challenge["rp"]["id"] == NEW_RP_ID
    assert challenge["user"]["id"] == entry["user_id"]
    assert {c["id"] for c in challenge["excludeCredentials"]} == {entry["credential_id"]}
    assert challenge["authenticatorSelection"]["userVerification"] == "required"

    # ... the device makes the passkey for the new rpId, and verify registers it
    device = SoftwareAuthenticator(tmp_path / "new-domain-device.json")
    info = device.make_credential(
        rp_id=challenge["rp"]["id"],
        origin=NEW_ORIGIN,
        challenge=challenge["challenge"],
        user_id=challenge["user"]["id"],
        challenge_encoding="base64url",
    )
    verified = browser.post(
        "/auth/credentials/code/verify",
        json={
            "challengeIdentifier": challenge["challengeIdentifier"],
            "credentialName": "new domain",
            "credentialKind": "Fido2",
            "credentialInfo": info,
        },
    )
    assert verified.status_code == 200, verified.text
    passkey = verified.json()
    assert (passkey["relyingPartyId"], passkey["origin"]) == (NEW_RP_ID, NEW_ORIGIN)

    # the new passkey signs from the new origin, not from the old one (another rpId)
    token = client._http.headers["Authorization"][7:]
    on_new = sandbox.passkey_client(token, device, NEW_ORIGIN)
    assert deactivate(on_new, entry["credential_uuid"]).status_code == 200
    on_old = sandbox.passkey_client(token, device, ORIGIN)
    challenge = action_challenge(on_old, "PUT", "/auth/credentials/activate", {})
    assert_error(sign(on_old, challenge, on_old.assertion(challenge)), 401, "rp_id")

    # the code was single use
    again = browser.post(
        "/auth/credentials/code/init", json={"code": code, "credentialKind": "Fido2"}
    )
    assert_error(again, 401)
    browser.close()


# ------------------------------------------------------------------------ registration refusals


def registration_refusal(sandbox: SandboxProcess, tmp_path: Path, **options: Any) -> httpx.Response:
    _, client = user(sandbox)
    device = SoftwareAuthenticator(tmp_path / "device.json")
    tamper = options.pop("tamper", None)
    origin = options.pop("origin", ORIGIN)
    if tamper is None:
        return client.create_passkey(device, origin, **options)
    challenge = client.fido2_challenge()
    info = device.make_credential(
        rp_id=challenge["rp"]["id"],
        origin=origin,
        challenge=challenge["challenge"],
        user_id=challenge["user"]["id"],
        **options,
    )
    info["clientData"] = tamper(info["clientData"])
    body = {
        "challengeIdentifier": challenge["challengeIdentifier"],
        "credentialName": "tampered",
        "credentialKind": "Fido2",
        "credentialInfo": info,
    }
    return client.request("POST", "/auth/credentials", body, sign=True)


def tamper_client_data(encoded: str) -> str:
    data = json.loads(b64url_decode(encoded))
    data["extra"] = "injected"  # challenge, type and origin unchanged: only the hash differs
    return b64url_encode(json.dumps(data, separators=(",", ":")).encode())


@pytest.mark.parametrize(
    ("options", "check"),
    [
        ({"origin": "https://evil.example"}, "origin"),
        ({"rp_id": "evil.example"}, "rp_id"),
        ({"user_verified": False}, "user_verification"),
        ({"attestation": "packed", "tamper": tamper_client_data}, "attestation"),
    ],
    ids=["wrong-origin", "wrong-rp-id", "missing-uv", "tampered-client-data"],
)
def test_registration_refused(
    sandbox: SandboxProcess, tmp_path: Path, options: dict[str, Any], check: str
) -> None:
    assert_error(registration_refusal(sandbox, tmp_path, **options), 400, check)


def test_rp_id_must_be_host_or_parent_of_origin_never_an_ip(
    sandbox: SandboxProcess, tmp_path: Path
) -> None:
    # refused as configuration: an IP literal, a public suffix, an rpId no origin can use
    for rp_ids, origins in [
        (["127.0.0.1"], ["https://127.0.0.1"]),
        (["[::1]"], [ORIGIN]),
        (["com"], ["https://app.example.com"]),
        ([RP_ID, "other.example"], [ORIGIN]),
    ]:
        response = httpx.put(
            sandbox.base_url + "/_sandbox/relying-parties",
            json={"origins": origins, "rpIds": rp_ids},
        )
        assert_error(response, 400, "rp_id")
    assert sandbox.relying_parties()["rpIds"] == [RP_ID]

    # refused in the protocol: both rpIds allowed, but the passkey's is not a parent of the
    # origin it is used from; and an IP literal origin cannot bring its own rpId
    sandbox.set_relying_parties(
        origins=[ORIGIN, NEW_ORIGIN, "https://127.0.0.1:8443"], rp_ids=[RP_ID, NEW_RP_ID]
    )
    response = registration_refusal(sandbox, tmp_path, origin=NEW_ORIGIN, rp_id=RP_ID)
    error = assert_error(response, 400, "rp_id")
    assert "parent domain" in error["message"]
    response = registration_refusal(
        sandbox, tmp_path, origin="https://127.0.0.1:8443", rp_id="127.0.0.1"
    )
    assert_error(response, 400, "rp_id")


# --------------------------------------------------------------------------- assertion refusals


@pytest.mark.parametrize(
    ("options", "check"),
    [
        ({"origin": "https://evil.example"}, "origin"),
        ({"rp_id": "evil.example"}, "rp_id"),
        ({"user_verified": False}, "user_verification"),
        ({"user_present": False}, "user_presence"),
    ],
    ids=["wrong-origin", "wrong-rp-id", "missing-uv", "missing-up"],
)
def test_assertion_refused(sandbox: SandboxProcess, options: dict[str, Any], check: str) -> None:
    _, client = user(sandbox)
    challenge = action_challenge(client, "POST", "/auth/credentials/code", {})
    origin = options.pop("origin", ORIGIN)
    factor = client.device.first_factor(challenge, origin=origin, **options)
    assert_error(sign(client, challenge, factor), 401, check)


def test_replayed_assertion_and_tampered_client_data_are_refused(sandbox: SandboxProcess) -> None:
    entry, client = user(sandbox)
    device = client.device
    # a good assertion moves the counter to 1
    challenge = action_challenge(client, "POST", "/auth/credentials/code", {})
    assert sign(client, challenge, device.first_factor(challenge, origin=ORIGIN)).status_code == 200
    assert device.credential(entry["credential_id"]).counter == 1

    # a cloned device (its counter not ahead of the server's) is refused
    challenge = action_challenge(client, "POST", "/auth/credentials/code", {})
    factor = device.first_factor(challenge, origin=ORIGIN, counter=1)
    error = assert_error(sign(client, challenge, factor), 401, "sign_count")
    assert "replayed" in error["message"]

    # the very same assertion again: its challenge is spent
    assert_error(sign(client, challenge, factor), 400)

    # a clientData changed after signing: the signature no longer verifies
    challenge = action_challenge(client, "POST", "/auth/credentials/code", {})
    factor = device.first_factor(challenge, origin=ORIGIN)
    assertion = factor["credentialAssertion"]
    assertion["clientData"] = tamper_client_data(assertion["clientData"])
    assert_error(sign(client, challenge, factor), 401, "signature")

    # the counter kept moving on the device; the server still accepts a fresh assertion
    challenge = action_challenge(client, "POST", "/auth/credentials/code", {})
    assert sign(client, challenge, device.first_factor(challenge, origin=ORIGIN)).status_code == 200


def test_passkey_of_another_user_is_refused(sandbox: SandboxProcess) -> None:
    first, _ = user(sandbox, 0)
    _, second = user(sandbox, 1)
    challenge = action_challenge(second, "POST", "/auth/credentials/code", {})
    # the second user's challenge offers only the second user's passkey ...
    assert [c["id"] for c in challenge["allowCredentials"]["webauthn"]] == [
        sandbox.end_user(1)["credential_id"]
    ]
    # ... and the first user's passkey (same device file) is refused for it
    factor = second.device.first_factor(
        challenge, origin=ORIGIN, credential_id=first["credential_id"]
    )
    assert_error(sign(second, challenge, factor), 401, "credential")


def test_both_challenge_encodings_are_accepted(sandbox: SandboxProcess, tmp_path: Path) -> None:
    _, client = user(sandbox)
    for encoding in ("utf8", "base64url"):
        device = SoftwareAuthenticator(tmp_path / f"{encoding}.json")
        created = client.create_passkey(device, ORIGIN, challenge_encoding=encoding)
        assert created.status_code == 200, created.text
        challenge = action_challenge(client, "POST", "/auth/credentials/code", {})
        factor = device.first_factor(challenge, origin=ORIGIN, challenge_encoding=encoding)
        assert sign(client, challenge, factor).status_code == 200


def test_user_verification_preferred_accepts_a_device_without_it(sandbox: SandboxProcess) -> None:
    sandbox.set_relying_parties(user_verification="preferred")
    _, client = user(sandbox)
    challenge = action_challenge(client, "POST", "/auth/credentials/code", {})
    assert challenge["userVerification"] == "preferred"
    factor = client.device.first_factor(challenge, origin=ORIGIN, user_verified=False)
    assert sign(client, challenge, factor).status_code == 200


# ------------------------------------------------------------------------------- code refusals


def test_expired_and_reused_codes_are_refused(
    sandbox_factory: Callable[..., SandboxProcess],
) -> None:
    # --time-scale 30: a one-minute code lives two seconds
    sandbox = sandbox_factory(end_users=1, time_scale=30)
    _, client = user(sandbox)

    def new_code() -> str:
        expiration = (datetime.now(UTC) + timedelta(seconds=59)).isoformat()
        body = {"expiration": expiration}
        response = client.request("POST", "/auth/credentials/code", body, sign=True)
        assert response.status_code == 200, response.text
        return str(response.json()["code"])

    too_long = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    response = client.request("POST", "/auth/credentials/code", {"expiration": too_long}, sign=True)
    assert_error(response, 400)

    expired = new_code()
    reused = new_code()
    body = {"code": reused, "credentialKind": "Fido2"}
    first = httpx.post(sandbox.base_url + "/auth/credentials/code/init", json=body)
    assert first.status_code == 200, first.text
    assert_error(httpx.post(sandbox.base_url + "/auth/credentials/code/init", json=body), 401)

    time.sleep(2.2)
    body = {"code": expired, "credentialKind": "Fido2"}
    error = assert_error(
        httpx.post(sandbox.base_url + "/auth/credentials/code/init", json=body), 401
    )
    assert expired not in error["message"]


# ----------------------------------------------------------------------------- delegated login


def test_delegated_login_reads_but_writes_need_the_users_signature(
    sandbox: SandboxProcess,
) -> None:
    entry = sandbox.end_user(0)
    token = sandbox.delegated_login(entry["username"])
    reader = httpx.Client(base_url=sandbox.base_url, headers={"Authorization": f"Bearer {token}"})
    listed = reader.get("/auth/credentials").json()["items"]
    assert [(c["credentialUuid"], c["kind"]) for c in listed] == [
        (entry["credential_uuid"], "Fido2")
    ]

    # a write with the user's token and no user action, or one signed by the service account
    body = {"credentialUuid": entry["credential_uuid"]}
    assert_error(reader.put("/auth/credentials/deactivate", json=body), 403)
    with sandbox.client("service_account") as sa:
        content = json.dumps(body, separators=(",", ":"))
        action = sa.user_action("PUT", "/auth/credentials/deactivate", content)
    headers = {"X-DFNS-USERACTION": action, "Content-Type": "application/json"}
    response = reader.put("/auth/credentials/deactivate", content=content, headers=headers)
    assert_error(response, 403)
    reader.close()

    # only a service account may log a user in, and only a user of the organisation
    with sandbox.client("user") as key_user:
        response = key_user.request(
            "POST", "/auth/login/delegated", {"username": entry["username"]}, sign=True
        )
    assert_error(response, 403)
    with pytest.raises(SandboxError, match="404"):
        sandbox.delegated_login("nobody@sandbox.local")
    with pytest.raises(SandboxError, match="404"):
        sandbox.delegated_login(sandbox.bootstrap["service_account"]["name"])


# ----------------------------------------------------------------------------- state, secrets


def test_passkey_state_survives_a_restart(sandbox: SandboxProcess) -> None:
    sandbox.set_relying_parties(origins=[ORIGIN, NEW_ORIGIN], rp_ids=[RP_ID, NEW_RP_ID])
    entry, client = user(sandbox)
    challenge = action_challenge(client, "POST", "/auth/credentials/code", {})
    assert (
        sign(client, challenge, client.device.first_factor(challenge, origin=ORIGIN)).status_code
        == 200
    )
    token = client._http.headers["Authorization"][7:]
    client.close()

    sandbox.kill()
    sandbox.start()
    assert sandbox.relying_parties()["origins"] == [ORIGIN, NEW_ORIGIN]
    client = sandbox.passkey_client(token, sandbox.authenticator(), ORIGIN)
    assert list(credentials(client)) == [entry["credential_uuid"]]  # the token still reads
    challenge = action_challenge(client, "POST", "/auth/credentials/code", {})
    factor = client.device.first_factor(challenge, origin=ORIGIN, counter=1)
    assert_error(sign(client, challenge, factor), 401, "sign_count")  # the counter persisted
    challenge = action_challenge(client, "POST", "/auth/credentials/code", {})
    assert (
        sign(client, challenge, client.device.first_factor(challenge, origin=ORIGIN)).status_code
        == 200
    )


def test_start_flags_set_relying_parties_and_refuse_bad_ones(
    sandbox_factory: Callable[..., SandboxProcess], tmp_path: Path
) -> None:
    args = ["--webauthn-origin", NEW_ORIGIN, "--webauthn-rp-id", NEW_RP_ID]
    sandbox = sandbox_factory(end_users=1, extra_args=args)
    assert sandbox.relying_parties()["rpIds"] == [NEW_RP_ID]
    assert sandbox.end_user(0)["rp_id"] == NEW_RP_ID
    sandbox.stop()

    bad = SandboxProcess(tmp_path / "bad", extra_args=["--webauthn-rp-id", "10.0.0.1"])
    with pytest.raises(SandboxError, match="IP literal"):
        bad.start()
    inside = SandboxProcess(
        tmp_path / "inside", end_users=1, authenticator_state=tmp_path / "inside" / "a.json"
    )
    with pytest.raises(SandboxError, match="outside --state-dir"):
        inside.start()


def test_sandbox_files_hold_no_passkey_key_nor_delegated_token(
    sandbox: SandboxProcess, tmp_path: Path
) -> None:
    from keyturn.testing.secret_scan import assert_no_secrets, scan_paths, variants

    _, client = user(sandbox)
    new_device = SoftwareAuthenticator(tmp_path / "new-device.json")
    assert client.create_passkey(new_device, ORIGIN, attestation="packed").status_code == 200
    expiration = (datetime.now(UTC) + timedelta(seconds=30)).isoformat()
    code = client.request("POST", "/auth/credentials/code", {"expiration": expiration}, sign=True)
    token = client._http.headers["Authorization"][7:]
    client.close()
    sandbox.stop()  # the -wal is checkpointed or left; both are scanned below

    # the authenticator's state lies outside the sandbox's state directory ...
    assert sandbox.authenticator_state is not None
    state_dir = sandbox.state_dir.resolve()
    for device_file in (sandbox.authenticator_state, new_device.path):
        assert device_file is not None and state_dir not in device_file.resolve().parents
    bootstrap_keys = state_file_secrets(sandbox.authenticator_state)
    secrets: dict[str, bytes | str] = {
        **bootstrap_keys,
        **state_file_secrets(tmp_path / "new-device.json"),
    }
    assert len(secrets) == 3
    secrets["delegated-login token"] = token
    secrets["credential code"] = code.json()["code"]
    assert all(len(variants(v)) >= 2 for v in secrets.values())

    # ... and none of the passkeys' private keys, the user's token or the code is in it
    files = sorted(p for p in sandbox.state_dir.iterdir() if p.is_file())
    assert any(p.name == "sandbox.sqlite3" for p in files)
    assert_no_secrets(files, secrets)
    # the scan does find what is there: the devices hold their keys
    found = {f.secret for f in scan_paths([sandbox.authenticator_state], secrets)}
    assert found == set(bootstrap_keys)
