"""Cryptography the sandbox needs: signature checks, key attestation, tokens, ids.

The sandbox stands alone (it must not import keyturn's domain or adapters), so it verifies
signatures itself with `cryptography`. Nothing here logs or echoes key material.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

# ------------------------------------------------------------------------------- encodings


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode base64url with or without padding; ValueError on garbage."""
    if not isinstance(text, str):
        raise ValueError("expected a base64url string")
    padded = text + "=" * (-len(text) % 4)
    try:
        return base64.urlsafe_b64decode(padded.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise ValueError("not valid base64url") from exc


def new_id(prefix: str, nbytes: int = 10) -> str:
    """A URL-safe id such as ``cr-3f9a…`` (lowercase hex, never needs percent-encoding)."""
    return f"{prefix}-{secrets.token_hex(nbytes)}"


def random_token(nbytes: int = 32) -> str:
    return b64url_encode(secrets.token_bytes(nbytes))


# ----------------------------------------------------------------------------- public keys


class KeyError_(ValueError):
    """A public key or signature the sandbox cannot use (message is safe to show)."""


@dataclass(frozen=True)
class PublicKey:
    algorithm: str  # "ed25519", "ecdsa-p256", "ecdsa-secp256k1", "rsa"
    key: Any

    def verify(self, signature: bytes, data: bytes, *, digest: str = "SHA256") -> bool:
        """True when `signature` over `data` is valid for this key.

        Ed25519 signs the raw bytes; ECDSA uses `digest` and a DER signature; RSA uses PKCS#1
        v1.5 with `digest`.
        """
        hash_alg: hashes.HashAlgorithm = hashes.SHA512() if digest == "SHA512" else hashes.SHA256()
        try:
            if isinstance(self.key, ed25519.Ed25519PublicKey):
                self.key.verify(signature, data)
            elif isinstance(self.key, ec.EllipticCurvePublicKey):
                self.key.verify(signature, data, ec.ECDSA(hash_alg))
            elif isinstance(self.key, rsa.RSAPublicKey):
                self.key.verify(signature, data, padding.PKCS1v15(), hash_alg)
            else:  # pragma: no cover - load_public_key refuses other types
                return False
        except (InvalidSignature, ValueError):
            return False
        return True


def load_public_key(pem: str) -> PublicKey:
    """Parse a SubjectPublicKeyInfo PEM; KeyError_ naming the problem otherwise."""
    if not isinstance(pem, str) or "BEGIN PUBLIC KEY" not in pem:
        raise KeyError_("publicKey must be a PEM-encoded public key (-----BEGIN PUBLIC KEY-----)")
    try:
        key = serialization.load_pem_public_key(pem.encode("utf-8"))
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyError_("publicKey is not a readable PEM public key") from exc
    if isinstance(key, ed25519.Ed25519PublicKey):
        return PublicKey("ed25519", key)
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return PublicKey("ecdsa-p256", key)
        if isinstance(key.curve, ec.SECP256K1):
            return PublicKey("ecdsa-secp256k1", key)
        raise KeyError_(
            f"unsupported elliptic curve {key.curve.name}; use P-256, secp256k1 or Ed25519"
        )
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise KeyError_("RSA keys must be at least 2048 bits")
        return PublicKey("rsa", key)
    raise KeyError_("unsupported key type; use Ed25519, ECDSA P-256/secp256k1 or RSA")


# ------------------------------------------------------------------------- key attestation


def verify_key_attestation(
    *, client_data_b64: str, attestation_b64: str, challenge: str
) -> tuple[str, PublicKey]:
    """Check a Key credential's attestation; return (public key PEM as received, parsed key).

    clientData must be JSON with type "key.create" and the expected challenge; the fingerprint
    `{"clientDataHash":"<hex sha256 of clientData as received>","publicKey":"<PEM verbatim>"}`
    must be signed (hex signature) by the new key. Raises KeyError_ with a one-line reason.
    """
    try:
        client_data = b64url_decode(client_data_b64)
        parsed = json.loads(client_data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise KeyError_("credentialInfo.clientData is not base64url-encoded JSON") from exc
    if not isinstance(parsed, dict) or parsed.get("type") != "key.create":
        raise KeyError_('credentialInfo.clientData must have type "key.create"')
    if not hmac.compare_digest(str(parsed.get("challenge", "")), challenge):
        raise KeyError_("credentialInfo.clientData does not carry this challenge")
    try:
        attestation = json.loads(b64url_decode(attestation_b64))
    except (ValueError, UnicodeDecodeError) as exc:
        raise KeyError_("credentialInfo.attestationData is not base64url-encoded JSON") from exc
    if not isinstance(attestation, dict):
        raise KeyError_("credentialInfo.attestationData must be a JSON object")
    pem = attestation.get("publicKey")
    sig_hex = attestation.get("signature")
    algorithm = attestation.get("algorithm") or "SHA256"
    if not isinstance(pem, str) or not isinstance(sig_hex, str):
        raise KeyError_("attestationData needs publicKey (PEM) and signature (hex)")
    if algorithm not in ("SHA256", "SHA512", "RSA-SHA256"):
        raise KeyError_("attestationData.algorithm must be SHA256, SHA512 or RSA-SHA256")
    public_key = load_public_key(pem)
    try:
        signature = bytes.fromhex(sig_hex)
    except ValueError as exc:
        raise KeyError_("attestationData.signature must be hex") from exc
    fingerprint = json.dumps(
        {"clientDataHash": hashlib.sha256(client_data).hexdigest(), "publicKey": pem},
        separators=(",", ":"),
    ).encode("utf-8")
    digest = "SHA512" if algorithm == "SHA512" else "SHA256"
    if not public_key.verify(signature, fingerprint, digest=digest):
        raise KeyError_("the attestation signature does not verify with the new public key")
    return pem, public_key


# ---------------------------------------------------------------------------------- tokens


def make_jwt(payload: dict[str, Any], secret: bytes) -> str:
    header = {"alg": "HS256", "typ": "JWT"}
    signing_input = (
        b64url_encode(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + b64url_encode(json.dumps(payload, separators=(",", ":")).encode())
    )
    mac = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    return signing_input + "." + b64url_encode(mac)


def read_jwt(token: str, secret: bytes) -> dict[str, Any] | None:
    """The payload of an HS256 token made with `secret`, or None if it is not one."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    signing_input = (parts[0] + "." + parts[1]).encode("ascii", "replace")
    expected = hmac.new(secret, signing_input, hashlib.sha256).digest()
    try:
        if not hmac.compare_digest(expected, b64url_decode(parts[2])):
            return None
        payload = json.loads(b64url_decode(parts[1]))
    except (ValueError, UnicodeDecodeError):
        return None
    return payload if isinstance(payload, dict) else None


def unverified_org(token: str) -> str | None:
    """The orgId claim of a JWT without checking it (used only to key the rate limiter)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(b64url_decode(parts[1]))
        org = payload["https://custom/app_metadata"]["orgId"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None
    return org if isinstance(org, str) else None


# ------------------------------------------------------------------------ bootstrap keys


def generate_private_key(algorithm: str) -> tuple[str, str]:
    """(private PKCS#8 PEM, public SPKI PEM) for "ed25519" or "ecdsa-p256"."""
    private: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
    if algorithm == "ed25519":
        private = ed25519.Ed25519PrivateKey.generate()
    elif algorithm == "ecdsa-p256":
        private = ec.generate_private_key(ec.SECP256R1())
    else:  # pragma: no cover - internal callers only
        raise ValueError(f"unsupported bootstrap algorithm {algorithm}")
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")
    public_pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )
    return private_pem, public_pem


def webhook_signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
