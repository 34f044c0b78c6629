"""WebAuthn checks for the sandbox's Fido2 credentials (registration and assertion).

The CBOR structures and the attestation statements (`none`, `packed`) are read and checked with
the `fido2` library; the relying-party rules, the challenge encodings Dfns' SDKs use and the
sign counter are the sandbox's own. Every refusal is a :class:`WebAuthnError` whose `check`
names the rule that failed (it goes in the error envelope's `details`) and whose message is one
line that never echoes key material.

Relying-party rules: an origin is `https://host[:port]` (or `http://localhost[:port]`, which
browsers treat as a secure context); an rpId is a domain name, never an IP literal nor a public
suffix; an rpId is usable from an origin when it equals the origin's host or is a parent domain
of it. Both challenge encodings are accepted: the browser SDK passes the challenge string's
UTF-8 bytes to WebAuthn, the React Native SDK passes its base64url-decoded bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from fido2.attestation.base import InvalidAttestation, NoneAttestation
from fido2.attestation.packed import PackedAttestation
from fido2.rpid import verify_rp_id
from fido2.webauthn import AttestationObject, AuthenticatorData

from keyturn.sandbox.crypto import b64url_decode, load_public_key

#: COSE algorithms the sandbox accepts for passkeys: ES256, EdDSA, RS256.
SUPPORTED_ALGORITHMS = (-7, -8, -257)
ATTESTATION_FORMATS = ("none", "packed")

_FLAG_UP = 0x01
_FLAG_UV = 0x04
_FLAG_AT = 0x40


class WebAuthnError(ValueError):
    """A WebAuthn check failed; `check` names it (origin, rp_id, challenge, ...)."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(message)
        self.check = check
        self.message = message


# ----------------------------------------------------------------------- relying parties


def normalise_origin(origin: str) -> str:
    """`scheme://host[:port]` in lower case; WebAuthnError when it is not a usable origin."""
    if not isinstance(origin, str) or not origin:
        raise WebAuthnError("origin", "an origin must be a non-empty string")
    parts = urlsplit(origin.strip())
    host = parts.hostname
    if parts.scheme not in ("http", "https") or not host:
        raise WebAuthnError("origin", f"origin {origin!r} must be https://host[:port]")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise WebAuthnError(
            "origin", f"origin {origin!r} must be scheme://host[:port] with no path or query"
        )
    if parts.scheme == "http" and not _is_localhost(host):
        raise WebAuthnError(
            "origin",
            f"origin {origin!r} is not a secure context; use https:// (or http://localhost)",
        )
    try:
        port = parts.port
    except ValueError:
        raise WebAuthnError("origin", f"origin {origin!r} has an invalid port") from None
    default = 443 if parts.scheme == "https" else 80
    netloc = host if port in (None, default) else f"{host}:{port}"
    if ":" in host and not netloc.startswith("["):
        netloc = f"[{host}]" if port in (None, default) else f"[{host}]:{port}"
    return f"{parts.scheme}://{netloc}"


def _is_localhost(host: str) -> bool:
    return host == "localhost" or host.endswith(".localhost")


def _is_ip_literal(value: str) -> bool:
    try:
        ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        return False
    return True


def check_rp_id(rp_id: str) -> str:
    """A valid rpId (lower case); WebAuthnError naming the rule otherwise."""
    if not isinstance(rp_id, str) or not rp_id.strip():
        raise WebAuthnError("rp_id", "an rpId must be a non-empty domain name")
    value = rp_id.strip().lower()
    if _is_ip_literal(value):
        raise WebAuthnError("rp_id", f"rpId {rp_id!r} is an IP literal; use a domain name")
    labels = value.split(".")
    if any(not label or len(label) > 63 for label in labels) or not all(
        c.isalnum() or c == "-" for c in value.replace(".", "")
    ):
        raise WebAuthnError("rp_id", f"rpId {rp_id!r} is not a domain name")
    if value != "localhost" and not verify_rp_id(value, f"https://x.{value}"):
        raise WebAuthnError("rp_id", f"rpId {rp_id!r} is a public suffix; use a registrable domain")
    return value


def rp_id_valid_for(rp_id: str, origin: str) -> bool:
    """True when `rp_id` may be used from `origin` (its host or a parent domain of it)."""
    try:
        value = check_rp_id(rp_id)
        normalised = normalise_origin(origin)
    except WebAuthnError:
        return False
    host = urlsplit(normalised).hostname or ""
    if _is_ip_literal(host):
        return False
    if _is_localhost(host):
        return host == value or host.endswith("." + value)
    return verify_rp_id(value, normalised)


def validate_relying_parties(
    origins: Sequence[str], rp_ids: Sequence[str]
) -> tuple[list[str], list[str]]:
    """Checked, normalised (origins, rpIds): each rpId is valid and usable from an origin."""
    if not origins or not rp_ids:
        raise WebAuthnError("rp_id", "give at least one allowed origin and one rpId")
    clean_origins = list(dict.fromkeys(normalise_origin(o) for o in origins))
    clean_rp_ids = list(dict.fromkeys(check_rp_id(r) for r in rp_ids))
    for rp_id in clean_rp_ids:
        if not any(rp_id_valid_for(rp_id, o) for o in clean_origins):
            raise WebAuthnError(
                "rp_id",
                f"rpId {rp_id!r} is neither the host nor a parent domain of any allowed origin",
            )
    return clean_origins, clean_rp_ids


def rp_id_for_origin(origin: str | None, origins: Sequence[str], rp_ids: Sequence[str]) -> str:
    """The rpId to offer a client at `origin` (the most specific usable one), else the first."""
    if origin:
        try:
            normalised = normalise_origin(origin)
        except WebAuthnError:
            normalised = ""
        if normalised in origins:
            usable = [r for r in rp_ids if rp_id_valid_for(r, normalised)]
            if usable:
                return max(usable, key=len)
    return rp_ids[0]


# ------------------------------------------------------------------------- client data


def challenge_matches(received: str, challenge: str) -> bool:
    """clientData.challenge (base64url) against the Dfns challenge string, in both encodings."""
    try:
        got = b64url_decode(received)
    except ValueError:
        return False
    candidates = [challenge.encode("utf-8")]
    with contextlib.suppress(ValueError):
        candidates.append(b64url_decode(challenge))
    return any(hmac.compare_digest(got, c) for c in candidates)


@dataclass(frozen=True)
class ClientData:
    raw: bytes
    type: str
    challenge: str
    origin: str


def parse_client_data(client_data_b64: str, *, expected_type: str, challenge: str) -> ClientData:
    try:
        raw = b64url_decode(client_data_b64)
        parsed = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise WebAuthnError("client_data", "clientData is not base64url-encoded JSON") from None
    if not isinstance(parsed, dict):
        raise WebAuthnError("client_data", "clientData must be a JSON object")
    kind, received, origin = parsed.get("type"), parsed.get("challenge"), parsed.get("origin")
    if kind != expected_type:
        raise WebAuthnError("type", f'clientData.type must be "{expected_type}"')
    if not isinstance(received, str) or not challenge_matches(received, challenge):
        raise WebAuthnError("challenge", "clientData does not carry this challenge")
    if not isinstance(origin, str):
        raise WebAuthnError("origin", "clientData has no origin")
    return ClientData(raw, kind, received, origin)


def check_origin(origin: str, allowed: Iterable[str]) -> str:
    try:
        normalised = normalise_origin(origin)
    except WebAuthnError:
        raise WebAuthnError("origin", f"origin {origin!r} is not allowed here") from None
    if normalised not in allowed:
        raise WebAuthnError(
            "origin", f"origin {origin!r} is not an allowed origin of this organisation"
        )
    return normalised


def _rp_id_of_hash(rp_id_hash: bytes, origin: str, rp_ids: Iterable[str]) -> str:
    for rp_id in rp_ids:
        if hmac.compare_digest(hashlib.sha256(rp_id.encode()).digest(), rp_id_hash):
            if not rp_id_valid_for(rp_id, origin):
                raise WebAuthnError(
                    "rp_id",
                    f"rpId {rp_id!r} is neither the host nor a parent domain of origin {origin!r}",
                )
            return rp_id
    raise WebAuthnError("rp_id", "the authenticator data's rpId hash matches no allowed rpId")


def _check_flags(flags: int, *, require_uv: bool) -> None:
    if not flags & _FLAG_UP:
        raise WebAuthnError("user_presence", "the authenticator did not report user presence")
    if require_uv and not flags & _FLAG_UV:
        raise WebAuthnError(
            "user_verification", "user verification is required and the authenticator lacks it"
        )


# --------------------------------------------------------------------------- registration


@dataclass(frozen=True)
class Registration:
    """A verified new passkey (its public key as SPKI PEM; the private key never comes here)."""

    credential_id: str
    public_key_pem: str
    algorithm: str  # as the sandbox's PublicKey names it: ecdsa-p256, ed25519, rsa
    rp_id: str
    origin: str
    sign_count: int
    aaguid: str
    attestation_format: str
    user_verified: bool


def _spki_pem(cose: Any) -> tuple[str, str]:
    alg = cose.get(3)
    if alg not in SUPPORTED_ALGORITHMS:
        raise WebAuthnError(
            "algorithm", f"COSE algorithm {alg} is not supported; use ES256, EdDSA or RS256"
        )
    key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey
    try:
        if alg == -7:
            if cose.get(-1) != 1:
                raise WebAuthnError("algorithm", "ES256 keys must be on P-256")
            x, y = int.from_bytes(cose[-2], "big"), int.from_bytes(cose[-3], "big")
            key = ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
        elif alg == -8:
            key = ed25519.Ed25519PublicKey.from_public_bytes(cose[-2])
        else:
            n, e = int.from_bytes(cose[-1], "big"), int.from_bytes(cose[-2], "big")
            key = rsa.RSAPublicNumbers(e, n).public_key()
    except (KeyError, TypeError, ValueError):
        raise WebAuthnError("attestation", "the credential public key is malformed") from None
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")
    return pem, load_public_key(pem).algorithm


def verify_registration(
    *,
    cred_id: str,
    client_data_b64: str,
    attestation_b64: str,
    challenge: str,
    origins: Sequence[str],
    rp_ids: Sequence[str],
    require_uv: bool,
) -> Registration:
    """Check a Fido2 attestation (WebAuthn §7.1); the new passkey, or WebAuthnError."""
    client = parse_client_data(
        client_data_b64, expected_type="webauthn.create", challenge=challenge
    )
    origin = check_origin(client.origin, origins)
    try:
        attestation = AttestationObject(b64url_decode(attestation_b64))
        auth_data = attestation.auth_data
    except Exception:
        raise WebAuthnError(
            "attestation", "attestationData is not a base64url CBOR attestation object"
        ) from None
    rp_id = _rp_id_of_hash(auth_data.rp_id_hash, origin, rp_ids)
    _check_flags(auth_data.flags, require_uv=require_uv)
    credential = auth_data.credential_data
    if not auth_data.flags & _FLAG_AT or credential is None:
        raise WebAuthnError("attestation", "the authenticator data has no attested credential")
    try:
        expected_id = b64url_decode(cred_id)
    except ValueError:
        raise WebAuthnError("credential_id", "credentialInfo.credId is not base64url") from None
    if not hmac.compare_digest(bytes(credential.credential_id), expected_id):
        raise WebAuthnError(
            "credential_id", "credentialInfo.credId differs from the attested credential id"
        )
    pem, algorithm = _spki_pem(credential.public_key)
    fmt = attestation.fmt
    if fmt not in ATTESTATION_FORMATS:
        raise WebAuthnError(
            "attestation", f"attestation format {fmt!r} is not supported; use none or packed"
        )
    verifier = NoneAttestation() if fmt == "none" else PackedAttestation()
    client_hash = hashlib.sha256(client.raw).digest()
    try:
        verifier.verify(attestation.att_stmt, auth_data, client_hash)
    except (InvalidAttestation, ValueError, KeyError, TypeError, NotImplementedError):
        raise WebAuthnError(
            "attestation", f"the {fmt} attestation statement does not verify"
        ) from None
    return Registration(
        credential_id=cred_id,
        public_key_pem=pem,
        algorithm=algorithm,
        rp_id=rp_id,
        origin=origin,
        sign_count=int(auth_data.counter),
        aaguid=bytes(credential.aaguid).hex(),
        attestation_format=fmt,
        user_verified=bool(auth_data.flags & _FLAG_UV),
    )


# ------------------------------------------------------------------------------ assertion


@dataclass(frozen=True)
class Assertion:
    sign_count: int
    origin: str
    user_verified: bool


def verify_assertion(
    *,
    public_key_pem: str,
    rp_id: str,
    stored_sign_count: int,
    client_data_b64: str,
    authenticator_data_b64: str,
    signature_b64: str,
    challenge: str,
    origins: Sequence[str],
    rp_ids: Sequence[str],
    require_uv: bool,
) -> Assertion:
    """Check a Fido2 assertion (WebAuthn §7.2) by the passkey registered for `rp_id`.

    The sign counter must be greater than the stored one; an authenticator that keeps no
    counter (0 before and after, as synced passkeys do) is accepted, per §7.2 step 21."""
    client = parse_client_data(client_data_b64, expected_type="webauthn.get", challenge=challenge)
    origin = check_origin(client.origin, origins)
    try:
        auth_bytes = b64url_decode(authenticator_data_b64)
        auth_data = AuthenticatorData(auth_bytes)
        signature = b64url_decode(signature_b64)
    except Exception:
        raise WebAuthnError(
            "authenticator_data", "authenticatorData or signature is not valid base64url"
        ) from None
    if rp_id not in rp_ids:
        raise WebAuthnError(
            "rp_id", f"rpId {rp_id!r} of this passkey is no longer allowed by the organisation"
        )
    if not hmac.compare_digest(hashlib.sha256(rp_id.encode()).digest(), auth_data.rp_id_hash):
        raise WebAuthnError("rp_id", "the authenticator data is for another rpId than this passkey")
    if not rp_id_valid_for(rp_id, origin):
        raise WebAuthnError(
            "rp_id", f"rpId {rp_id!r} is neither the host nor a parent domain of origin {origin!r}"
        )
    _check_flags(auth_data.flags, require_uv=require_uv)
    message = auth_bytes + hashlib.sha256(client.raw).digest()
    if not load_public_key(public_key_pem).verify(signature, message):
        raise WebAuthnError("signature", "the assertion signature does not verify for this passkey")
    counter = int(auth_data.counter)
    if (counter or stored_sign_count) and counter <= stored_sign_count:
        raise WebAuthnError(
            "sign_count",
            f"sign counter {counter} is not greater than {stored_sign_count}:"
            " a replayed or cloned authenticator",
        )
    return Assertion(
        sign_count=counter, origin=origin, user_verified=bool(auth_data.flags & _FLAG_UV)
    )


def user_handle_matches(user_handle: str, user_id: str) -> bool:
    """userHandle (base64url) names this user: user.id's UTF-8 bytes, or user.id decoded."""
    return challenge_matches(user_handle, user_id)
