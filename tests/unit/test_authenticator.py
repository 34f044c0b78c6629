"""The software authenticator against the sandbox's WebAuthn checks, in process (no HTTP), and
the relying-party rules."""

from __future__ import annotations

import json
import pickle
import stat
from pathlib import Path
from typing import Any

import pytest

from keyturn.sandbox.crypto import b64url_decode, b64url_encode, random_token
from keyturn.sandbox.webauthn import (
    Registration,
    WebAuthnError,
    check_rp_id,
    normalise_origin,
    rp_id_for_origin,
    rp_id_valid_for,
    validate_relying_parties,
    verify_assertion,
    verify_registration,
)
from keyturn.testing.authenticator import (
    DEFAULT_AAGUID,
    AuthenticatorError,
    SoftwareAuthenticator,
)

ORIGIN = "https://app.example.com"
RP_ID = "example.com"
ALLOWED = {"origins": [ORIGIN], "rp_ids": [RP_ID]}


def register(device: SoftwareAuthenticator, **options: Any) -> tuple[dict[str, str], Registration]:
    challenge = random_token(32)
    info = device.make_credential(
        rp_id=RP_ID, origin=ORIGIN, challenge=challenge, user_id="us-1", **options
    )
    registration = verify_registration(
        cred_id=info["credId"],
        client_data_b64=info["clientData"],
        attestation_b64=info["attestationData"],
        challenge=challenge,
        require_uv=True,
        **ALLOWED,
    )
    return info, registration


@pytest.mark.parametrize("attestation", ["none", "packed"])
@pytest.mark.parametrize("encoding", ["utf8", "base64url"])
def test_registration_and_assertions_verify(
    tmp_path: Path, attestation: str, encoding: str
) -> None:
    device = SoftwareAuthenticator(tmp_path / "device.json")
    info, registration = register(device, attestation=attestation, challenge_encoding=encoding)
    assert registration.attestation_format == attestation
    assert registration.aaguid == DEFAULT_AAGUID.hex()
    assert registration.rp_id == RP_ID and registration.sign_count == 0
    assert registration.user_verified

    count = 0
    for _ in range(3):
        challenge = random_token(32)
        assertion = device.get_assertion(
            origin=ORIGIN, challenge=challenge, challenge_encoding=encoding
        )
        verified = verify_assertion(
            public_key_pem=registration.public_key_pem,
            rp_id=RP_ID,
            stored_sign_count=count,
            client_data_b64=assertion["clientData"],
            authenticator_data_b64=assertion["authenticatorData"],
            signature_b64=assertion["signature"],
            challenge=challenge,
            require_uv=True,
            **ALLOWED,
        )
        assert verified.sign_count == count + 1
        count = verified.sign_count
        assert b64url_decode(assertion["userHandle"]) == b"us-1"
    # authenticator data flags of the registration: UP | UV | AT
    attestation_object = b64url_decode(info["attestationData"])
    assert attestation_object  # parsed by verify_registration above


def test_flags_counter_and_challenge_are_checked() -> None:
    device = SoftwareAuthenticator()
    _, registration = register(device)
    pem = registration.public_key_pem

    def check(stored: int = 0, challenge: str | None = None, **options: Any) -> None:
        sent = random_token(16)
        assertion = device.get_assertion(origin=ORIGIN, challenge=sent, **options)
        verify_assertion(
            public_key_pem=pem,
            rp_id=RP_ID,
            stored_sign_count=stored,
            client_data_b64=assertion["clientData"],
            authenticator_data_b64=assertion["authenticatorData"],
            signature_b64=assertion["signature"],
            challenge=challenge or sent,
            require_uv=True,
            **ALLOWED,
        )

    for options, stored, rule in [
        ({"user_verified": False}, 0, "user_verification"),
        ({"user_present": False}, 0, "user_presence"),
        ({"counter": 5}, 5, "sign_count"),
        ({"rp_id": "evil.example"}, 0, "rp_id"),
    ]:
        with pytest.raises(WebAuthnError) as refused:
            check(stored, **options)
        assert refused.value.check == rule
    with pytest.raises(WebAuthnError) as refused:
        check(challenge=random_token(16))
    assert refused.value.check == "challenge"
    # a device that keeps no counter (0 before and after) is accepted, as WebAuthn says
    check(0, counter=0)


def test_state_file_is_private_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "device.json"
    device = SoftwareAuthenticator(path)
    info, _ = register(device)
    device.get_assertion(origin=ORIGIN, challenge="c")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = SoftwareAuthenticator.load(path)
    assert again.credential(info["credId"]).counter == 1
    assert again.aaguid == DEFAULT_AAGUID
    document = json.loads(path.read_text())
    pem = document["passkeys"][0]["private_key_pem"]
    assert pem.startswith("-----BEGIN PRIVATE KEY-----")
    assert pem not in repr(again) and pem not in repr(again.credentials())
    with pytest.raises(TypeError):
        pickle.dumps(again)
    with pytest.raises(AuthenticatorError):
        again.get_assertion(origin=ORIGIN, challenge="c", allow_credentials=["other"])
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(AuthenticatorError, match="cannot read"):
        SoftwareAuthenticator.load(tmp_path / "broken.json")


def test_first_factor_uses_an_allowed_passkey() -> None:
    device = SoftwareAuthenticator()
    register(device)
    second, _ = register(device)
    challenge = {
        "challenge": random_token(16),
        "allowCredentials": {"webauthn": [{"type": "public-key", "id": second["credId"]}]},
    }
    factor = device.first_factor(challenge, origin=ORIGIN)
    assert factor["kind"] == "Fido2"
    assert factor["credentialAssertion"]["credId"] == second["credId"]
    assert set(factor["credentialAssertion"]) == {
        "credId",
        "clientData",
        "authenticatorData",
        "signature",
        "userHandle",
    }
    with pytest.raises(AuthenticatorError):
        device.first_factor({"challenge": "x", "allowCredentials": {"webauthn": []}}, origin=ORIGIN)


def test_tampered_packed_attestation_is_refused() -> None:
    device = SoftwareAuthenticator()
    challenge = random_token(16)
    info = device.make_credential(
        rp_id=RP_ID, origin=ORIGIN, challenge=challenge, user_id="u", attestation="packed"
    )
    data = json.loads(b64url_decode(info["clientData"]))
    data["crossOrigin"] = True
    with pytest.raises(WebAuthnError) as refused:
        verify_registration(
            cred_id=info["credId"],
            client_data_b64=b64url_encode(json.dumps(data).encode()),
            attestation_b64=info["attestationData"],
            challenge=challenge,
            require_uv=True,
            **ALLOWED,
        )
    assert refused.value.check == "attestation"
    with pytest.raises(WebAuthnError) as refused:
        verify_registration(
            cred_id=b64url_encode(b"another id"),
            client_data_b64=info["clientData"],
            attestation_b64=info["attestationData"],
            challenge=challenge,
            require_uv=True,
            **ALLOWED,
        )
    assert refused.value.check == "credential_id"


@pytest.mark.parametrize(
    ("rp_id", "origin", "valid"),
    [
        ("example.com", "https://example.com", True),
        ("example.com", "https://app.example.com", True),
        ("example.com", "https://app.example.com:8443", True),
        ("app.example.com", "https://example.com", False),
        ("example.com", "https://notexample.com", False),
        ("example.com", "http://app.example.com", False),
        ("com", "https://example.com", False),
        ("co.uk", "https://shop.co.uk", False),
        ("github.io", "https://me.github.io", False),
        ("127.0.0.1", "https://127.0.0.1", False),
        ("::1", "https://[::1]", False),
        ("localhost", "http://localhost:3000", True),
    ],
)
def test_rp_id_rules(rp_id: str, origin: str, valid: bool) -> None:
    assert rp_id_valid_for(rp_id, origin) is valid


def test_relying_party_settings() -> None:
    assert normalise_origin("HTTPS://App.Example.com:443/") == "https://app.example.com"
    for bad in ("ftp://x.example", "http://x.example", "https://x.example/path", "nope"):
        with pytest.raises(WebAuthnError):
            normalise_origin(bad)
    for bad in ("10.0.0.1", "[::1]", "com", "", "exa mple.com"):
        with pytest.raises(WebAuthnError) as refused:
            check_rp_id(bad)
        assert refused.value.check == "rp_id"
    with pytest.raises(WebAuthnError, match="neither the host nor a parent"):
        validate_relying_parties([ORIGIN], [RP_ID, "other.example"])
    origins, rp_ids = validate_relying_parties(
        [ORIGIN, "https://wallet.new.example"], ["example.com", "new.example", "app.example.com"]
    )
    assert rp_id_for_origin("https://wallet.new.example", origins, rp_ids) == "new.example"
    assert rp_id_for_origin(ORIGIN, origins, rp_ids) == "app.example.com"
    assert rp_id_for_origin(None, origins, rp_ids) == "example.com"
    assert rp_id_for_origin("https://elsewhere.example", origins, rp_ids) == "example.com"
