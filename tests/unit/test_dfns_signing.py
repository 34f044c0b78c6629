"""KeySigner: assertions and attestations verify with the public key, for every algorithm."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import pickle

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

from keyturn.adapters.dfns.errors import InvalidSigningKey
from keyturn.adapters.dfns.signing import (
    DEFAULT_ORIGIN,
    KeySigner,
    b64url,
    b64url_decode,
    new_credential_id,
)
from keyturn.domain.errors import ProviderError

ALGORITHMS = ["ed25519", "ecdsa-p256", "ecdsa-secp256k1", "rsa-2048"]


def make_key(algorithm: str) -> PrivateKeyTypes:
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "ecdsa-secp256k1":
        return ec.generate_private_key(ec.SECP256K1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem_of(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def verify(public: PublicKeyTypes, signature: bytes, data: bytes) -> None:
    """Verify as Dfns does; raises InvalidSignature."""
    if isinstance(public, ed25519.Ed25519PublicKey):
        public.verify(signature, data)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        public.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    elif isinstance(public, rsa.RSAPublicKey):
        public.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    else:  # pragma: no cover
        raise AssertionError(type(public))


@pytest.fixture(scope="module", params=ALGORITHMS)
def keypair(request: pytest.FixtureRequest) -> tuple[str, PrivateKeyTypes]:
    return request.param, make_key(request.param)


def test_from_pem_reports_algorithm_and_public_key(keypair: tuple[str, PrivateKeyTypes]) -> None:
    algorithm, key = keypair
    signer = KeySigner.from_pem("cred-1", pem_of(key))
    assert signer.credential_id == "cred-1"
    assert signer.algorithm == algorithm
    expected_public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    assert signer.public_key_pem() == expected_public
    assert signer.public_key_pem().endswith("-----END PUBLIC KEY-----\n")
    # PEM given as str works too
    assert KeySigner.from_pem("cred-1", pem_of(key).decode()).algorithm == algorithm


def test_assertion_verifies_with_public_key(keypair: tuple[str, PrivateKeyTypes]) -> None:
    _, key = keypair
    signer = KeySigner.from_pem("Y3JlZC0x", pem_of(key))
    factor = signer.assertion("the-challenge")
    assert factor["kind"] == "Key"
    assertion = factor["credentialAssertion"]
    assert assertion["credId"] == "Y3JlZC0x"
    assert "=" not in assertion["clientData"] and "=" not in assertion["signature"]
    client_data = b64url_decode(assertion["clientData"])
    parsed = json.loads(client_data)
    assert parsed["type"] == "key.get"
    assert parsed["challenge"] == "the-challenge"
    assert parsed["origin"] == DEFAULT_ORIGIN
    assert parsed["crossOrigin"] is False
    assert b" " not in client_data  # compact
    verify(key.public_key(), b64url_decode(assertion["signature"]), client_data)
    # and the signature is bound to those exact bytes
    with pytest.raises(InvalidSignature):
        verify(
            key.public_key(),
            b64url_decode(assertion["signature"]),
            client_data.replace(b"the-challenge", b"the-challengf"),
        )


def test_assertion_by_another_key_does_not_verify() -> None:
    key, other = make_key("ed25519"), make_key("ed25519")
    factor = KeySigner.from_pem("c", pem_of(key)).assertion("x")["credentialAssertion"]
    with pytest.raises(InvalidSignature):
        verify(
            other.public_key(),
            b64url_decode(factor["signature"]),
            b64url_decode(factor["clientData"]),
        )


def test_ecdsa_signatures_are_der(keypair: tuple[str, PrivateKeyTypes]) -> None:
    algorithm, key = keypair
    signature = KeySigner.from_pem("c", pem_of(key)).sign(b"data")
    if algorithm.startswith("ecdsa"):
        assert signature[0] == 0x30  # DER SEQUENCE, not raw r||s
        assert signature[1] == len(signature) - 2
    elif algorithm == "ed25519":
        assert len(signature) == 64
    else:
        assert len(signature) == 256


def test_attestation_format(keypair: tuple[str, PrivateKeyTypes]) -> None:
    _, key = keypair
    signer = KeySigner.from_pem("bmV3LWNyZWQ", pem_of(key))
    info = signer.attestation("chal-123")
    assert set(info) == {"credId", "clientData", "attestationData"}
    assert info["credId"] == "bmV3LWNyZWQ"
    client_data = b64url_decode(info["clientData"])
    # compact, alphabetical keys, type key.create
    assert client_data == (
        b'{"challenge":"chal-123","crossOrigin":false,"origin":"https://app.dfns.io",'
        b'"type":"key.create"}'
    )
    attestation = json.loads(b64url_decode(info["attestationData"]))
    assert set(attestation) <= {"publicKey", "signature", "algorithm"}
    assert attestation["publicKey"] == signer.public_key_pem()
    # Rebuild the fingerprint the way the server does: hash the clientData bytes as received and
    # use the received PEM verbatim.
    fingerprint = json.dumps(
        {
            "clientDataHash": hashlib.sha256(client_data).hexdigest(),
            "publicKey": attestation["publicKey"],
        },
        separators=(",", ":"),
    ).encode()
    signature = bytes.fromhex(attestation["signature"])
    assert attestation["signature"] == attestation["signature"].lower()
    verify(key.public_key(), signature, fingerprint)


def test_attestation_origin_can_be_overridden() -> None:
    signer = KeySigner.from_pem("c", pem_of(make_key("ed25519")), origin="https://ops.example")
    data = json.loads(b64url_decode(signer.attestation("x")["clientData"]))
    assert data["origin"] == "https://ops.example"
    data = json.loads(
        b64url_decode(signer.attestation("x", origin="https://b.example")["clientData"])
    )
    assert data["origin"] == "https://b.example"


def test_repr_never_shows_key_and_cannot_be_pickled() -> None:
    key = make_key("ed25519")
    pem = pem_of(key)
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    signer = KeySigner.from_pem("cred-x", pem)
    for text in (repr(signer), str(signer), f"{signer}"):
        assert "cred-x" in text and "ed25519" in text
        assert "PRIVATE" not in text
        for form in (raw.hex(), b64url(raw), base64.b64encode(raw).decode()):
            assert form not in text
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(signer)
    with pytest.raises(TypeError):
        copy.deepcopy(signer)
    assert not hasattr(signer, "__dict__")


@pytest.mark.parametrize(
    ("pem", "fragment"),
    [
        (b"not a pem at all", "not a readable PEM private key"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "not a readable"),
    ],
)
def test_from_pem_rejects_garbage_without_echo(pem: bytes, fragment: str) -> None:
    with pytest.raises(InvalidSigningKey, match=fragment) as info:
        KeySigner.from_pem("cred-bad", pem)
    assert isinstance(info.value, ProviderError)
    assert info.value.retryable is False
    assert "cred-bad" in str(info.value)
    assert "AAAA" not in str(info.value)
    assert info.value.__cause__ is None


def test_from_pem_rejects_public_key_and_encrypted_key_without_password() -> None:
    key = make_key("ecdsa-p256")
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(InvalidSigningKey, match="not a readable PEM private key"):
        KeySigner.from_pem("c", public_pem)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    with pytest.raises(InvalidSigningKey):
        KeySigner.from_pem("c", encrypted)
    assert KeySigner.from_pem("c", encrypted, password=b"pw").algorithm == "ecdsa-p256"


def test_unsupported_keys_are_refused_with_the_reason() -> None:
    with pytest.raises(InvalidSigningKey, match="curve secp384r1 is not supported"):
        KeySigner.from_pem("c", pem_of(ec.generate_private_key(ec.SECP384R1())))
    with pytest.raises(InvalidSigningKey, match="1024 bits is too short"):
        KeySigner.from_pem("c", pem_of(rsa.generate_private_key(65537, 1024)))  # noqa: S505 (the weak key is the point)
    with pytest.raises(InvalidSigningKey, match="Ed448PrivateKey keys are not supported"):
        KeySigner.from_pem("c", pem_of(ed448.Ed448PrivateKey.generate()))
    with pytest.raises(InvalidSigningKey, match="credential id is empty"):
        KeySigner("", ed25519.Ed25519PrivateKey.generate())


def test_new_credential_ids_are_unique_base64url() -> None:
    ids = {new_credential_id() for _ in range(100)}
    assert len(ids) == 100
    for cred_id in ids:
        assert len(b64url_decode(cred_id)) == 32
        assert set(cred_id) <= set(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        )
