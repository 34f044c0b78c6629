"""Auth rules of the sandbox, answered as the API notes say Dfns does (real HTTP)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from keyturn.sandbox.crypto import b64url_decode, b64url_encode
from keyturn.sandbox.testing import SandboxClient, SandboxProcess, key_attestation


def new_pem(kind: str = "ed25519") -> bytes:
    key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    if kind == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    elif kind == "p256":
        key = ec.generate_private_key(ec.SECP256R1())
    elif kind == "secp256k1":
        key = ec.generate_private_key(ec.SECP256K1())
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def assert_error(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["status"] == status
    assert set(error) >= {"id", "status", "code", "message", "details"}
    assert "\n" not in error["message"]
    return dict(error)


def init(client: SandboxClient, method: str, path: str, payload: str = "") -> dict[str, object]:
    response = client._http.post(
        "/auth/action/init",
        json={
            "userActionPayload": payload,
            "userActionHttpMethod": method,
            "userActionHttpPath": path,
            "userActionServerKind": "Api",
        },
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_missing_or_invalid_bearer_token_is_401(sandbox: SandboxProcess) -> None:
    assert_error(httpx.get(sandbox.base_url + "/auth/credentials"), 401)
    forged = sandbox.bootstrap["service_account"]["token"][:-4] + "AAAA"
    response = httpx.get(
        sandbox.base_url + "/auth/credentials", headers={"Authorization": f"Bearer {forged}"}
    )
    error = assert_error(response, 401)
    assert forged not in str(error["message"])


def test_wrong_signature_is_401(sandbox: SandboxProcess) -> None:
    client = sandbox.client()
    challenge = init(client, "POST", "/webhooks")
    assertion = client.assertion(challenge)
    # signed by another key under the same credId
    impostor = SandboxClient(
        sandbox.base_url,
        sandbox.bootstrap["service_account"]["token"],
        client.credential_id,
        new_pem(),
    )
    assertion = impostor.assertion(challenge)
    response = client._http.post(
        "/auth/action",
        json={"challengeIdentifier": challenge["challengeIdentifier"], "firstFactor": assertion},
    )
    assert_error(response, 401)


def test_clientdata_with_wrong_challenge_or_type_is_401(sandbox: SandboxProcess) -> None:
    client = sandbox.client()
    for data in ({"type": "key.get", "challenge": "not-it"}, {"type": "key.create"}):
        challenge = init(client, "POST", "/webhooks")
        if "challenge" not in data:
            data = {**data, "challenge": challenge["challenge"]}
        raw = json.dumps(data).encode()
        from keyturn.sandbox.testing import sign_bytes

        key = sandbox.bootstrap["service_account"]["private_key_pem"].encode()
        response = client._http.post(
            "/auth/action",
            json={
                "challengeIdentifier": challenge["challengeIdentifier"],
                "firstFactor": {
                    "kind": "Key",
                    "credentialAssertion": {
                        "credId": client.credential_id,
                        "clientData": b64url_encode(raw),
                        "signature": b64url_encode(sign_bytes(key, raw)),
                    },
                },
            },
        )
        assert_error(response, 401)


def test_unknown_or_reused_challenge_is_400(sandbox: SandboxProcess) -> None:
    client = sandbox.client()
    challenge = init(client, "POST", "/webhooks")
    body = {
        "challengeIdentifier": challenge["challengeIdentifier"],
        "firstFactor": client.assertion(challenge),
    }
    assert client._http.post("/auth/action", json=body).status_code == 200
    assert_error(client._http.post("/auth/action", json=body), 400)
    body["challengeIdentifier"] = "ch-unknown"
    assert_error(client._http.post("/auth/action", json=body), 400)


def test_deactivated_credential_cannot_sign_and_is_not_offered(sandbox: SandboxProcess) -> None:
    old = sandbox.client("user")
    new_key = new_pem("secp256k1")
    created = old.create_key_credential(new_key, "user-second-key")
    assert created.status_code == 200, created.text
    new = old.with_key("user-second-key", new_key)
    old_uuid = sandbox.bootstrap["user"]["credential_uuid"]
    response = new.request(
        "PUT", "/auth/credentials/deactivate", {"credentialUuid": old_uuid}, sign=True
    )
    assert response.json() == {"message": "success"}

    challenge = init(old, "POST", "/webhooks")
    offered = [c["id"] for c in challenge["allowCredentials"]["key"]]  # type: ignore[index]
    assert offered == ["user-second-key"]
    response = old._http.post(
        "/auth/action",
        json={
            "challengeIdentifier": challenge["challengeIdentifier"],
            "firstFactor": old.assertion(challenge),
        },
    )
    assert "deactivated" in str(assert_error(response, 401)["message"])
    # deactivating twice is a no-op success
    again = new.request(
        "PUT", "/auth/credentials/deactivate", {"credentialUuid": old_uuid}, sign=True
    )
    assert again.status_code == 200


def test_user_action_token_is_single_use(sandbox: SandboxProcess) -> None:
    client = sandbox.client()
    body = {"credentialUuid": sandbox.bootstrap["service_account"]["credential_uuid"]}
    payload = json.dumps(body, separators=(",", ":"))
    token = client.user_action("PUT", "/auth/credentials/activate", payload)
    first = client.request("PUT", "/auth/credentials/activate", body, user_action=token)
    assert first.status_code == 200
    error = assert_error(
        client.request("PUT", "/auth/credentials/activate", body, user_action=token), 400
    )
    assert error["message"] == "user action has already been used; sign again"


def test_token_spent_even_when_request_mismatches(sandbox: SandboxProcess) -> None:
    client = sandbox.client()
    uuid = sandbox.bootstrap["service_account"]["credential_uuid"]
    token = client.user_action(
        "PUT", "/auth/credentials/activate", json.dumps({"credentialUuid": uuid})
    )
    mismatched = client.request(
        "PUT", "/auth/credentials/deactivate", {"credentialUuid": uuid}, user_action=token
    )
    assert_error(mismatched, 403)
    assert_error(
        client.request(
            "PUT", "/auth/credentials/activate", {"credentialUuid": uuid}, user_action=token
        ),
        400,
    )


def test_body_differing_from_signed_payload_is_403(sandbox: SandboxProcess) -> None:
    client = sandbox.client()
    uuid = sandbox.bootstrap["service_account"]["credential_uuid"]
    token = client.user_action(
        "PUT", "/auth/credentials/deactivate", json.dumps({"credentialUuid": "cr-other"})
    )
    response = client.request(
        "PUT", "/auth/credentials/deactivate", {"credentialUuid": uuid}, user_action=token
    )
    assert "differs" in str(assert_error(response, 403)["message"])
    listed = client.request("GET", "/auth/credentials").json()["items"]
    assert all(c["isActive"] for c in listed), "a refused request must have no effect"


def test_payload_compared_as_parsed_json(sandbox: SandboxProcess) -> None:
    client = sandbox.client()
    uuid = sandbox.bootstrap["service_account"]["credential_uuid"]
    # signed with spaces and non-ASCII escaped, sent compact: same JSON
    token = client.user_action(
        "PUT", "/auth/credentials/activate", json.dumps({"credentialUuid": uuid}, indent=2)
    )
    ok = client.request(
        "PUT", "/auth/credentials/activate", {"credentialUuid": uuid}, user_action=token
    )
    assert ok.status_code == 200, ok.text
    # "", "{}" and no body are the same payload
    receiver_free = client.request(
        "POST", "/webhooks", {"url": "http://127.0.0.1:9/x", "events": ["*"]}, sign=True
    )
    webhook_id = receiver_free.json()["id"]
    for signed_payload, sent in (("{}", b""), ("", b"{}"), ("", b"")):
        token = client.user_action("DELETE", f"/webhooks/{webhook_id}", signed_payload)
        response = client._http.request(
            "DELETE",
            f"/webhooks/{webhook_id}",
            content=sent,
            headers={"X-DFNS-USERACTION": token, "Content-Type": "application/json"},
        )
        assert response.status_code in (200, 404), response.text
        assert response.json()  # never an empty body


def test_missing_user_action_is_403(sandbox: SandboxProcess) -> None:
    client = sandbox.client()
    response = client.request("PUT", "/auth/credentials/deactivate", {"credentialUuid": "cr-x"})
    assert_error(response, 403)
    assert_error(
        client.request(
            "PUT",
            "/auth/credentials/deactivate",
            {"credentialUuid": "cr-x"},
            user_action="ua-forged",
        ),
        403,
    )


def test_unknown_credential_uuid_is_404(sandbox: SandboxProcess) -> None:
    client = sandbox.client()
    for method, path, body in (
        ("PUT", "/auth/credentials/activate", {"credentialUuid": "cr-nope"}),
        ("PUT", "/auth/credentials/deactivate", {"credentialUuid": "cr-nope"}),
        ("DELETE", "/auth/credentials/cr-nope", None),
    ):
        assert_error(client.request(method, path, body, sign=True), 404)
    # another principal's credential is invisible too
    other = sandbox.bootstrap["user"]["credential_uuid"]
    assert_error(
        client.request("PUT", "/auth/credentials/deactivate", {"credentialUuid": other}, sign=True),
        404,
    )


def test_framework_404_and_405_use_the_envelope(sandbox: SandboxProcess) -> None:
    assert_error(httpx.get(sandbox.base_url + "/no/such/route"), 404)
    assert_error(httpx.patch(sandbox.base_url + "/auth/credentials"), 405)


@pytest.mark.parametrize("algorithm", ["ed25519", "p256", "secp256k1", "rsa"])
def test_every_key_algorithm_can_register_and_sign(sandbox: SandboxProcess, algorithm: str) -> None:
    client = sandbox.client("pat")
    key = new_pem(algorithm)
    created = client.create_key_credential(key, f"key-{algorithm}")
    assert created.status_code == 200, created.text
    signer = client.with_key(f"key-{algorithm}", key)
    response = signer.request(
        "PUT",
        "/auth/credentials/activate",
        {"credentialUuid": created.json()["credentialUuid"]},
        sign=True,
    )
    assert response.status_code == 200, response.text


def test_attestation_by_another_key_is_refused(sandbox: SandboxProcess) -> None:
    client = sandbox.client()
    challenge = client._http.post("/auth/credentials/init", json={"kind": "Key"}).json()
    client_data, attestation = key_attestation(challenge["challenge"], new_pem())
    _, other = key_attestation(challenge["challenge"], new_pem())
    # signature by the first key, public key of the second: possession not proven
    forged = json.loads(b64url_decode(attestation))
    forged["publicKey"] = json.loads(b64url_decode(other))["publicKey"]
    other_attestation = b64url_encode(json.dumps(forged).encode())
    body = {
        "challengeIdentifier": challenge["challengeIdentifier"],
        "credentialName": "x",
        "credentialKind": "Key",
        "credentialInfo": {
            "credId": "x1",
            "clientData": client_data,
            "attestationData": other_attestation,
        },
    }
    assert_error(client.request("POST", "/auth/credentials", body, sign=True), 400)
    assert len(client.request("GET", "/auth/credentials").json()["items"]) == 1


def test_pat_acts_for_its_linked_user_only(sandbox: SandboxProcess) -> None:
    pat = sandbox.client("pat")
    items = pat.request("GET", "/auth/credentials").json()["items"]
    assert [c["credentialUuid"] for c in items] == [sandbox.bootstrap["pat"]["credential_uuid"]]
    # service-account endpoint is for service accounts
    public = sandbox.client().request("GET", "/auth/credentials").json()["items"][0]["publicKey"]
    assert_error(
        pat.request("POST", "/auth/service-accounts/credentials", {"publicKey": public}, sign=True),
        403,
    )


def test_credential_code_flow(sandbox: SandboxProcess) -> None:
    client = sandbox.client("user")
    expiration = (datetime.now(UTC) + timedelta(seconds=50)).isoformat()
    code = client.request("POST", "/auth/credentials/code", {"expiration": expiration}, sign=True)
    assert code.status_code == 200, code.text
    anonymous = httpx.Client(base_url=sandbox.base_url)
    challenge = anonymous.post(
        "/auth/credentials/code/init", json={"code": code.json()["code"], "credentialKind": "Key"}
    ).json()
    key = new_pem()
    client_data, attestation = key_attestation(challenge["challenge"], key)
    created = anonymous.post(
        "/auth/credentials/code/verify",
        json={
            "challengeIdentifier": challenge["challengeIdentifier"],
            "credentialName": "from code",
            "credentialKind": "Key",
            "credentialInfo": {
                "credId": "via-code",
                "clientData": client_data,
                "attestationData": attestation,
            },
        },
    )
    assert created.status_code == 200, created.text
    ids = [c["credentialId"] for c in client.request("GET", "/auth/credentials").json()["items"]]
    assert "via-code" in ids
    # the code is single use; a code too far ahead is refused
    reused = anonymous.post(
        "/auth/credentials/code/init", json={"code": code.json()["code"], "credentialKind": "Key"}
    )
    assert_error(reused, 401)
    late = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    assert_error(
        client.request("POST", "/auth/credentials/code", {"expiration": late}, sign=True), 400
    )


def test_duplicate_cred_id_is_409(sandbox: SandboxProcess) -> None:
    client = sandbox.client()
    taken = sandbox.bootstrap["user"]["credential_id"]
    assert_error(client.create_key_credential(new_pem(), taken), 409)
