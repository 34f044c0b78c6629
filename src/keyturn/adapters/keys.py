"""Key generation and inspection with `cryptography` (implements the Keys port).

Private keys leave this module only as PKCS#8 PEM bytes, which the caller seals at once. Errors
never quote key material: a key that cannot be parsed is described, not shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

from keyturn.domain.errors import ConfigError, KeyturnError
from keyturn.ports import GeneratedKey

ED25519: Final = "ed25519"
ECDSA_P256: Final = "ecdsa-p256"
RSA_2048: Final = "rsa-2048"

#: The algorithms keyturn generates keys for, in the order they are offered.
ALGORITHMS: Final[tuple[str, ...]] = (ED25519, ECDSA_P256, RSA_2048)

_MAX_ECHO = 40


class InvalidPrivateKey(KeyturnError):
    """Bytes that are not a usable PEM private key (the message never quotes them)."""


def _describe_unknown(algorithm: str) -> str:
    # The algorithm name comes from configuration or the command line: not a secret, but keep
    # the line short and printable.
    text = algorithm if len(algorithm) <= _MAX_ECHO else algorithm[:_MAX_ECHO] + "..."
    return repr(text)


def check_algorithm(algorithm: str) -> str:
    """Return `algorithm` if keyturn can generate it, else raise ConfigError naming the choices."""
    if algorithm not in ALGORITHMS:
        raise ConfigError(
            f"unknown key algorithm {_describe_unknown(algorithm)}; "
            f"use one of: {', '.join(ALGORITHMS)}"
        )
    return algorithm


def load_private_key(private_pem: bytes, *, what: str = "the private key") -> PrivateKeyTypes:
    """Parse a PEM private key (PKCS#8 or traditional, unencrypted).

    Raises InvalidPrivateKey with one line naming `what` and never quoting the bytes.
    """
    if not isinstance(private_pem, bytes | bytearray):
        raise InvalidPrivateKey(f"{what} must be PEM bytes, not {type(private_pem).__name__}")
    if b"-----BEGIN" not in private_pem:
        raise InvalidPrivateKey(
            f"{what} is not PEM: expected a '-----BEGIN PRIVATE KEY-----' block"
        )
    try:
        key = serialization.load_pem_private_key(bytes(private_pem), password=None)
    except TypeError:
        raise InvalidPrivateKey(
            f"{what} is encrypted with a passphrase; keyturn needs an unencrypted PKCS#8 PEM key"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise InvalidPrivateKey(
            f"{what} is not a valid PEM private key (PKCS#8 or traditional, unencrypted)"
        ) from None
    return key


def algorithm_name(key: PrivateKeyTypes) -> str:
    """keyturn's name for the algorithm of a loaded private key."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return ED25519
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if isinstance(key.curve, ec.SECP256R1):
            return ECDSA_P256
        if isinstance(key.curve, ec.SECP256K1):
            return "ecdsa-secp256k1"
        raise InvalidPrivateKey(
            f"unsupported elliptic curve {key.curve.name}; use P-256 (secp256r1) or secp256k1"
        )
    if isinstance(key, rsa.RSAPrivateKey):
        return f"rsa-{key.key_size}"
    raise InvalidPrivateKey(
        f"unsupported private key type {type(key).__name__}; use one of: {', '.join(ALGORITHMS)}"
    )


def public_pem_of(key: PrivateKeyTypes) -> str:
    """The SubjectPublicKeyInfo PEM of a loaded private key."""
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )


def sign_message(key: PrivateKeyTypes, message: bytes) -> bytes:
    """Sign as Dfns expects: Ed25519 raw; ECDSA over SHA-256, DER; RSA PKCS#1 v1.5 SHA-256."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(message)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    raise InvalidPrivateKey(f"unsupported signing key type {type(key).__name__}")


def verify_message(public: PublicKeyTypes, signature: bytes, message: bytes) -> bool:
    """True when `signature` (made as :func:`sign_message` makes it) verifies with `public`."""
    try:
        if isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(signature, message)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public, rsa.RSAPublicKey):
            public.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
        else:
            return False
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True, repr=False)
class _GeneratedKey(GeneratedKey):
    """A GeneratedKey whose repr leaves out the private key (ports.GeneratedKey's own repr
    would print it)."""

    def __repr__(self) -> str:
        return f"GeneratedKey(algorithm={self.algorithm!r}, public_pem={self.public_pem!r})"

    __str__ = __repr__


class CryptoKeys:
    """The Keys port: generate signing keys and derive their public halves."""

    algorithms: tuple[str, ...] = ALGORITHMS

    def generate(self, algorithm: str) -> GeneratedKey:
        check_algorithm(algorithm)
        key: PrivateKeyTypes
        if algorithm == ED25519:
            key = ed25519.Ed25519PrivateKey.generate()
        elif algorithm == ECDSA_P256:
            key = ec.generate_private_key(ec.SECP256R1())
        else:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        private_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return _GeneratedKey(
            algorithm=algorithm, private_pem=private_pem, public_pem=public_pem_of(key)
        )

    def public_pem(self, private_pem: bytes) -> str:
        """The SubjectPublicKeyInfo PEM of a PEM private key."""
        return public_pem_of(load_private_key(private_pem))

    def algorithm_of(self, private_pem: bytes) -> str:
        """keyturn's algorithm name ("ed25519", "ecdsa-p256", "rsa-2048", ...) of a PEM key."""
        return algorithm_name(load_private_key(private_pem))

    def __repr__(self) -> str:
        return "CryptoKeys()"
