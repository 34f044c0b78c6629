"""CryptoKeys: generation, public halves, algorithm detection, and errors that quote no key."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from keyturn.adapters.keys import (
    ALGORITHMS,
    CryptoKeys,
    InvalidPrivateKey,
    load_private_key,
    sign_message,
    verify_message,
)
from keyturn.domain.errors import ConfigError, KeyturnError
from keyturn.testing.secret_scan import scan_bytes

KEYS = CryptoKeys()


def _verify_pair(private_pem: bytes, public_pem: str) -> None:
    """Sign with the private key and verify with the public one (raises if they differ)."""
    private = serialization.load_pem_private_key(private_pem, password=None)
    public = serialization.load_pem_public_key(public_pem.encode())
    message = b"keyturn pairing check"
    if isinstance(private, ed25519.Ed25519PrivateKey):
        assert isinstance(public, ed25519.Ed25519PublicKey)
        public.verify(private.sign(message), message)
    elif isinstance(private, ec.EllipticCurvePrivateKey):
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(
            private.sign(message, ec.ECDSA(hashes.SHA256())), message, ec.ECDSA(hashes.SHA256())
        )
    else:
        assert isinstance(private, rsa.RSAPrivateKey) and isinstance(public, rsa.RSAPublicKey)
        sig = private.sign(message, padding.PKCS1v15(), hashes.SHA256())
        public.verify(sig, message, padding.PKCS1v15(), hashes.SHA256())


@pytest.mark.parametrize(
    ("algorithm", "key_type", "detail"),
    [
        ("ed25519", ed25519.Ed25519PrivateKey, None),
        ("ecdsa-p256", ec.EllipticCurvePrivateKey, "secp256r1"),
        ("rsa-2048", rsa.RSAPrivateKey, 2048),
    ],
)
def test_generate_gives_pkcs8_private_and_spki_public(
    algorithm: str, key_type: type, detail: object
) -> None:
    generated = KEYS.generate(algorithm)
    assert generated.algorithm == algorithm
    assert generated.private_pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")  # PKCS#8
    assert generated.public_pem.startswith("-----BEGIN PUBLIC KEY-----\n")  # SPKI
    private = serialization.load_pem_private_key(generated.private_pem, password=None)
    assert isinstance(private, key_type)
    if isinstance(private, ec.EllipticCurvePrivateKey):
        assert private.curve.name == detail
    if isinstance(private, rsa.RSAPrivateKey):
        assert private.key_size == detail
    _verify_pair(generated.private_pem, generated.public_pem)
    assert KEYS.public_pem(generated.private_pem) == generated.public_pem
    assert KEYS.algorithm_of(generated.private_pem) == algorithm


def test_every_generate_is_a_fresh_key() -> None:
    first, second = KEYS.generate("ed25519"), KEYS.generate("ed25519")
    assert first.private_pem != second.private_pem
    assert first.public_pem != second.public_pem


def test_unknown_algorithm_names_the_allowed_values() -> None:
    with pytest.raises(ConfigError) as info:
        KEYS.generate("dsa-1024")
    message = str(info.value)
    assert "'dsa-1024'" in message
    for algorithm in ALGORITHMS:
        assert algorithm in message
    assert "\n" not in message


def test_algorithm_of_accepts_traditional_pem_and_other_curves() -> None:
    p256 = ec.generate_private_key(ec.SECP256R1())
    traditional = p256.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    assert traditional.startswith(b"-----BEGIN EC PRIVATE KEY-----")
    assert KEYS.algorithm_of(traditional) == "ecdsa-p256"
    k1 = ec.generate_private_key(ec.SECP256K1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert KEYS.algorithm_of(k1) == "ecdsa-secp256k1"
    p384 = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(InvalidPrivateKey, match="unsupported elliptic curve secp384r1"):
        KEYS.algorithm_of(p384)


def test_bad_private_keys_are_described_never_quoted() -> None:
    generated = KEYS.generate("ed25519")
    # A PEM whose DER is corrupted (a wrong outer length): the error must not quote any of it.
    assert generated.private_pem.startswith(b"-----BEGIN PRIVATE KEY-----\nMC4CAQAw")
    corrupted = generated.private_pem.replace(b"MC4CAQAw", b"MC9CAQAw")
    for bad, expected in [
        (b"not a key at all, but long enough to be a secret", "is not PEM"),
        (corrupted, "is not a valid PEM private key"),
        (generated.public_pem.encode(), "is not a valid PEM private key"),
    ]:
        with pytest.raises(KeyturnError, match=expected) as info:
            KEYS.public_pem(bad)
        message = str(info.value)
        assert "\n" not in message
        assert scan_bytes(message, {"input": bad}) == []
        assert info.value.__cause__ is None


def test_encrypted_private_key_says_it_needs_no_passphrase() -> None:
    encrypted = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )
    with pytest.raises(InvalidPrivateKey, match="encrypted with a passphrase"):
        KEYS.algorithm_of(encrypted)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_sign_and_verify_message_as_dfns_expects(algorithm: str) -> None:
    generated = KEYS.generate(algorithm)
    key = load_private_key(generated.private_pem)
    public = serialization.load_pem_public_key(generated.public_pem.encode())
    signature = sign_message(key, b"challenge")
    assert verify_message(public, signature, b"challenge")
    assert not verify_message(public, signature, b"challengf")
    other = serialization.load_pem_public_key(KEYS.generate(algorithm).public_pem.encode())
    assert not verify_message(other, signature, b"challenge")
    if algorithm == "ed25519":
        # Ed25519 signs the raw bytes: a standard library verification agrees.
        assert isinstance(public, ed25519.Ed25519PublicKey)
        public.verify(signature, b"challenge")
    elif algorithm == "ecdsa-p256":
        assert signature[0] == 0x30  # DER SEQUENCE, not raw r||s
    else:
        assert len(signature) == 256


def test_generated_key_repr_leaves_out_the_private_key() -> None:
    generated = KEYS.generate("ecdsa-p256")
    for shown in (repr(generated), str(generated), f"{generated!r}", repr([generated])):
        assert "ecdsa-p256" in shown
        assert scan_bytes(shown, {"private": generated.private_pem}) == []
