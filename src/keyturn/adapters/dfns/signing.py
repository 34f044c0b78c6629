"""User-action signing and key attestation for Dfns Key credentials.

A :class:`KeySigner` holds one credential's private key (Ed25519, ECDSA P-256 or secp256k1, RSA)
and its credential id. It builds the `key.get` clientData and the `firstFactor` assertion for
`POST /auth/action`, and the `key.create` attestation that proves possession of a NEW key when
registering it. Its repr shows the credential id and the algorithm, never the key; it cannot be
pickled.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from typing import Any, NoReturn

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from keyturn.adapters.dfns.errors import InvalidSigningKey

#: The origin written into clientData when none is given (the Dfns dashboard's, as the SDKs use).
DEFAULT_ORIGIN = "https://app.dfns.io"

SupportedPrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

_CURVES: dict[str, str] = {"secp256r1": "ecdsa-p256", "secp256k1": "ecdsa-secp256k1"}


def b64url(data: bytes) -> str:
    """Base64url without padding, as Dfns uses everywhere."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def compact_json(value: Any) -> bytes:
    """Compact JSON (no spaces), non-ASCII escaped: the exact bytes keyturn signs and sends."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def new_credential_id() -> str:
    """A fresh client-chosen credId for a new Key credential (32 random bytes, base64url)."""
    return b64url(secrets.token_bytes(32))


def _algorithm_of(credential_id: str, key: object) -> str:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        name = _CURVES.get(key.curve.name)
        if name is None:
            raise InvalidSigningKey(
                credential_id,
                f"elliptic curve {key.curve.name} is not supported; use P-256 or secp256k1",
            )
        return name
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise InvalidSigningKey(
                credential_id, f"RSA key of {key.key_size} bits is too short; use 2048 or more"
            )
        return f"rsa-{key.key_size}"
    raise InvalidSigningKey(
        credential_id,
        f"{type(key).__name__} keys are not supported; use Ed25519, ECDSA P-256/secp256k1 or RSA",
    )


class KeySigner:
    """A Dfns Key credential: its credential id (credId) and private key."""

    __slots__ = ("_algorithm", "_credential_id", "_key", "_origin")

    def __init__(
        self,
        credential_id: str,
        private_key: SupportedPrivateKey,
        *,
        origin: str = DEFAULT_ORIGIN,
    ) -> None:
        if not credential_id or not isinstance(credential_id, str):
            raise InvalidSigningKey("<empty>", "the credential id is empty")
        self._credential_id = credential_id
        self._algorithm = _algorithm_of(credential_id, private_key)
        self._key: SupportedPrivateKey = private_key
        self._origin = origin

    @classmethod
    def from_pem(
        cls,
        credential_id: str,
        pem: bytes | str,
        *,
        password: bytes | None = None,
        origin: str = DEFAULT_ORIGIN,
    ) -> KeySigner:
        """Load a PEM private key (PKCS#8, or traditional OpenSSL). Errors never echo the key."""
        data = pem.encode("utf-8") if isinstance(pem, str) else pem
        try:
            key = serialization.load_pem_private_key(data, password=password)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            # The library's message is dropped on purpose: never risk echoing key material.
            raise InvalidSigningKey(
                credential_id,
                "it is not a readable PEM private key (encrypted without the password, "
                "corrupted, or a public key)",
            ) from None
        if not isinstance(
            key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
        ):
            _algorithm_of(credential_id, key)  # raises with the type named
            raise AssertionError("unreachable")  # pragma: no cover
        return cls(credential_id, key, origin=origin)

    # ------------------------------------------------------------------------------ identity

    @property
    def credential_id(self) -> str:
        return self._credential_id

    @property
    def algorithm(self) -> str:
        """ "ed25519", "ecdsa-p256", "ecdsa-secp256k1" or "rsa-<bits>"."""
        return self._algorithm

    @property
    def origin(self) -> str:
        return self._origin

    def public_key_pem(self) -> str:
        """The public half as SubjectPublicKeyInfo PEM (with its trailing newline)."""
        return (
            self._key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode("ascii")
        )

    def __repr__(self) -> str:
        return f"KeySigner(credential_id={self._credential_id!r}, algorithm={self._algorithm!r})"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("a KeySigner holds a private key and cannot be pickled or copied")

    # ------------------------------------------------------------------------------- signing

    def sign(self, data: bytes) -> bytes:
        """Ed25519 over the raw bytes; ECDSA SHA-256 (DER); RSA PKCS#1 v1.5 SHA-256."""
        key = self._key
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return key.sign(data)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key.sign(data, ec.ECDSA(hashes.SHA256()))
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())

    def key_get_client_data(self, challenge: str) -> bytes:
        """The clientData bytes for a user-action assertion (compact JSON, type `key.get`)."""
        return compact_json(
            {
                "type": "key.get",
                "challenge": challenge,
                "origin": self._origin,
                "crossOrigin": False,
            }
        )

    def assertion(self, challenge: str) -> dict[str, Any]:
        """The `firstFactor` of `POST /auth/action` for this challenge."""
        client_data = self.key_get_client_data(challenge)
        return {
            "kind": "Key",
            "credentialAssertion": {
                "credId": self._credential_id,
                "clientData": b64url(client_data),
                "signature": b64url(self.sign(client_data)),
            },
        }

    def attestation(self, challenge: str, *, origin: str | None = None) -> dict[str, Any]:
        """The `credentialInfo` that registers this key as a new Key credential.

        clientData is compact, alphabetical JSON of type `key.create`; the signature (hex) is
        over the compact fingerprint `{"clientDataHash": hex(SHA-256(clientData)), "publicKey":
        <PEM>}`; attestationData is base64url JSON `{"publicKey", "signature"}` (SHA-256).
        """
        client_data = compact_json(
            {
                "challenge": challenge,
                "crossOrigin": False,
                "origin": origin or self._origin,
                "type": "key.create",
            }
        )
        public_pem = self.public_key_pem()
        fingerprint = compact_json(
            {
                "clientDataHash": hashlib.sha256(client_data).hexdigest(),
                "publicKey": public_pem,
            }
        )
        attestation_data = compact_json(
            {"publicKey": public_pem, "signature": self.sign(fingerprint).hex()}
        )
        return {
            "credId": self._credential_id,
            "clientData": b64url(client_data),
            "attestationData": b64url(attestation_data),
        }
