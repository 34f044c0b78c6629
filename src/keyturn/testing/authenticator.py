"""A software WebAuthn authenticator that plays a user's device in tests and demos.

    device = SoftwareAuthenticator(tmp_path / "device.json")
    info = device.make_credential(rp_id="example.com", origin="https://app.example.com",
                                  challenge=challenge["challenge"], user_id=user["id"])
    # -> {"credId", "clientData", "attestationData"}: Create Credential's credentialInfo
    first_factor = device.first_factor(action_challenge, origin="https://app.example.com")
    # -> {"kind": "Fido2", "credentialAssertion": {...}}: /auth/action's firstFactor

Each passkey is a P-256 key (COSE ES256). Registration sets the flags UP, UV and AT, carries
this authenticator's AAGUID and a `none` or `packed` (self) attestation; every assertion
increments the passkey's sign counter. Both challenge encodings Dfns' SDKs use are available:
``"utf8"`` (the challenge string's bytes, as the browser SDK passes it) and ``"base64url"`` (the
string decoded, as the React Native SDK does).

The private keys never leave this object except into its own state file (mode 0600, written
atomically after every change). Its repr and the public views (:meth:`credentials`) show ids,
rpIds and counters only. Knobs for negative tests (``user_verified=False``, ``counter=``,
``rp_id=`` on an assertion) make the device misbehave in the one way a test needs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fido2 import cbor

__all__ = [
    "DEFAULT_AAGUID",
    "AuthenticatorError",
    "PasskeyInfo",
    "SoftwareAuthenticator",
    "state_file_secrets",
]

#: The AAGUID this authenticator reports unless told otherwise (16 bytes, "keyturn-softauth").
DEFAULT_AAGUID = b"keyturn-softauth"

ChallengeEncoding = Literal["utf8", "base64url"]
AttestationFormat = Literal["none", "packed"]

_UP, _UV, _AT = 0x01, 0x04, 0x40


class AuthenticatorError(RuntimeError):
    """The authenticator cannot do what was asked (no matching passkey, bad state file)."""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _challenge_bytes(challenge: str, encoding: ChallengeEncoding) -> bytes:
    if encoding == "utf8":
        return challenge.encode("utf-8")
    if encoding == "base64url":
        return _b64url_decode(challenge)
    raise ValueError(f"challenge encoding must be 'utf8' or 'base64url', not {encoding!r}")


def _client_data(kind: str, challenge: str, origin: str, encoding: ChallengeEncoding) -> bytes:
    return json.dumps(
        {
            "type": kind,
            "challenge": _b64url(_challenge_bytes(challenge, encoding)),
            "origin": origin,
            "crossOrigin": False,
        },
        separators=(",", ":"),
    ).encode("utf-8")


def _cose_es256(key: ec.EllipticCurvePublicKey) -> dict[int, Any]:
    numbers = key.public_numbers()
    return {
        1: 2,  # kty: EC2
        3: -7,  # alg: ES256
        -1: 1,  # crv: P-256
        -2: numbers.x.to_bytes(32, "big"),
        -3: numbers.y.to_bytes(32, "big"),
    }


@dataclass(frozen=True)
class PasskeyInfo:
    """What may be shown about a passkey: never its private key."""

    credential_id: str
    rp_id: str
    user_id: str
    user_name: str
    counter: int


@dataclass
class _Passkey:
    credential_id: str
    rp_id: str
    user_id: str
    user_name: str
    counter: int
    key: ec.EllipticCurvePrivateKey

    def __repr__(self) -> str:  # never the key
        return f"_Passkey(credential_id={self.credential_id!r}, rp_id={self.rp_id!r})"

    def info(self) -> PasskeyInfo:
        return PasskeyInfo(
            self.credential_id, self.rp_id, self.user_id, self.user_name, self.counter
        )

    def to_json(self) -> dict[str, Any]:
        pem = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode("ascii")
        return {
            "credential_id": self.credential_id,
            "rp_id": self.rp_id,
            "user_id": self.user_id,
            "user_name": self.user_name,
            "counter": self.counter,
            "private_key_pem": pem,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> _Passkey:
        key = serialization.load_pem_private_key(str(data["private_key_pem"]).encode(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise AuthenticatorError("a passkey in the state file is not a P-256 key")
        return cls(
            credential_id=str(data["credential_id"]),
            rp_id=str(data["rp_id"]),
            user_id=str(data["user_id"]),
            user_name=str(data.get("user_name", "")),
            counter=int(data["counter"]),
            key=key,
        )


class SoftwareAuthenticator:
    """A WebAuthn authenticator in software; see the module docstring."""

    def __init__(self, path: Path | None = None, *, aaguid: bytes = DEFAULT_AAGUID) -> None:
        if len(aaguid) != 16:
            raise ValueError("an AAGUID is 16 bytes")
        self.path = Path(path) if path is not None else None
        self.aaguid = bytes(aaguid)
        self._passkeys: dict[str, _Passkey] = {}
        self._lock = threading.Lock()

    # --------------------------------------------------------------------------- state file

    @classmethod
    def load(cls, path: Path) -> SoftwareAuthenticator:
        """The authenticator saved at `path` (AuthenticatorError if unreadable)."""
        try:
            document = json.loads(Path(path).read_text())
            device = cls(path, aaguid=bytes.fromhex(document["aaguid"]))
            for entry in document["passkeys"]:
                passkey = _Passkey.from_json(entry)
                device._passkeys[passkey.credential_id] = passkey
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AuthenticatorError(
                f"cannot read the authenticator state {path}: {type(exc).__name__}"
            ) from None
        return device

    def save(self, path: Path | None = None) -> None:
        """Write the state (private keys included) atomically with mode 0600."""
        target = Path(path) if path is not None else self.path
        if target is None:
            return
        document = {
            "version": 1,
            "aaguid": self.aaguid.hex(),
            "passkeys": [p.to_json() for p in self._passkeys.values()],
        }
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, json.dumps(document, indent=2).encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(target)

    def __repr__(self) -> str:
        return f"SoftwareAuthenticator(passkeys={len(self._passkeys)}, path={self.path})"

    def __reduce__(self) -> Any:
        raise TypeError("a SoftwareAuthenticator holds private keys and cannot be pickled")

    # ------------------------------------------------------------------------------ views

    def credentials(self) -> list[PasskeyInfo]:
        return [p.info() for p in self._passkeys.values()]

    def credential(self, credential_id: str) -> PasskeyInfo:
        return self._get(credential_id).info()

    def _get(self, credential_id: str) -> _Passkey:
        passkey = self._passkeys.get(credential_id)
        if passkey is None:
            raise AuthenticatorError(f"this authenticator holds no passkey {credential_id!r}")
        return passkey

    def set_counter(self, credential_id: str, counter: int) -> None:
        """Wind a passkey's counter back or forward (to rehearse a cloned device)."""
        with self._lock:
            self._get(credential_id).counter = counter
            self.save()

    # ----------------------------------------------------------------------- registration

    def make_credential(
        self,
        *,
        rp_id: str,
        origin: str,
        challenge: str,
        user_id: str,
        user_name: str = "",
        attestation: AttestationFormat = "none",
        challenge_encoding: ChallengeEncoding = "utf8",
        user_verified: bool = True,
    ) -> dict[str, str]:
        """Create a passkey for `rp_id`; Create Credential's `credentialInfo` for it."""
        if attestation not in ("none", "packed"):
            raise ValueError("attestation must be 'none' or 'packed'")
        key = ec.generate_private_key(ec.SECP256R1())
        raw_id = secrets.token_bytes(32)
        credential_id = _b64url(raw_id)
        client_data = _client_data("webauthn.create", challenge, origin, challenge_encoding)
        flags = _UP | _AT | (_UV if user_verified else 0)
        attested = (
            self.aaguid
            + struct.pack(">H", len(raw_id))
            + raw_id
            + cbor.encode(_cose_es256(key.public_key()))
        )
        auth_data = (
            hashlib.sha256(rp_id.encode()).digest() + struct.pack(">BI", flags, 0) + attested
        )
        statement: dict[str, Any] = {}
        if attestation == "packed":  # self attestation: signed by the new key itself
            signed = auth_data + hashlib.sha256(client_data).digest()
            statement = {"alg": -7, "sig": key.sign(signed, ec.ECDSA(hashes.SHA256()))}
        attestation_object = cbor.encode(
            {"fmt": attestation, "attStmt": statement, "authData": auth_data}
        )
        with self._lock:
            self._passkeys[credential_id] = _Passkey(
                credential_id, rp_id, user_id, user_name, 0, key
            )
            self.save()
        return {
            "credId": credential_id,
            "clientData": _b64url(client_data),
            "attestationData": _b64url(attestation_object),
        }

    def forget(self, credential_id: str) -> None:
        """Drop a passkey (the device was lost)."""
        with self._lock:
            self._passkeys.pop(credential_id, None)
            self.save()

    # -------------------------------------------------------------------------- assertion

    def get_assertion(
        self,
        *,
        origin: str,
        challenge: str,
        credential_id: str | None = None,
        allow_credentials: Sequence[str] = (),
        challenge_encoding: ChallengeEncoding = "utf8",
        user_verified: bool = True,
        user_present: bool = True,
        rp_id: str | None = None,
        counter: int | None = None,
    ) -> dict[str, str]:
        """Sign `challenge` with a passkey: `credential_id`, else the first one held that is in
        `allow_credentials` (else any). The `credentialAssertion` for Dfns' firstFactor.

        `rp_id` overrides the passkey's own rpId in the authenticator data and `counter` the
        next counter value (both only for negative tests)."""
        with self._lock:
            passkey = self._choose(credential_id, allow_credentials)
            next_counter = passkey.counter + 1 if counter is None else counter
            if counter is None:
                passkey.counter = next_counter
            flags = (_UP if user_present else 0) | (_UV if user_verified else 0)
            target_rp = passkey.rp_id if rp_id is None else rp_id
            auth_data = hashlib.sha256(target_rp.encode()).digest() + struct.pack(
                ">BI", flags, next_counter
            )
            client_data = _client_data("webauthn.get", challenge, origin, challenge_encoding)
            signature = passkey.key.sign(
                auth_data + hashlib.sha256(client_data).digest(), ec.ECDSA(hashes.SHA256())
            )
            self.save()
        return {
            "credId": passkey.credential_id,
            "clientData": _b64url(client_data),
            "authenticatorData": _b64url(auth_data),
            "signature": _b64url(signature),
            "userHandle": _b64url(passkey.user_id.encode("utf-8")),
        }

    def _choose(self, credential_id: str | None, allowed: Sequence[str]) -> _Passkey:
        if credential_id is not None:
            return self._get(credential_id)
        for passkey in self._passkeys.values():
            if not allowed or passkey.credential_id in allowed:
                return passkey
        raise AuthenticatorError("this authenticator holds none of the allowed passkeys")

    def first_factor(
        self, challenge: Mapping[str, Any], *, origin: str, **options: Any
    ) -> dict[str, Any]:
        """`/auth/action`'s firstFactor for a user-action challenge (from /auth/action/init),
        signed by a passkey listed in its `allowCredentials.webauthn`."""
        allowed = challenge.get("allowCredentials") or {}
        ids = [str(c.get("id")) for c in allowed.get("webauthn") or [] if isinstance(c, Mapping)]
        if "credential_id" not in options and not ids:
            raise AuthenticatorError("the challenge allows no webauthn credential")
        options.setdefault("allow_credentials", ids)
        assertion = self.get_assertion(
            origin=origin, challenge=str(challenge["challenge"]), **options
        )
        return {"kind": "Fido2", "credentialAssertion": assertion}

    def sdk_signer(self, origin: str, **options: Any) -> _SdkSigner:
        """A signer for the official Dfns SDK (`DfnsClientConfig(signer=...)`)."""
        return _SdkSigner(self, origin, options)


class _SdkSigner:
    """Duck-types dfns_sdk's signer: `sign(challenge) -> firstFactor`."""

    def __init__(self, device: SoftwareAuthenticator, origin: str, options: dict[str, Any]):
        self._device = device
        self._origin = origin
        self._options = options

    def sign(self, challenge: Mapping[str, Any]) -> dict[str, Any]:
        return self._device.first_factor(challenge, origin=self._origin, **self._options)

    def __repr__(self) -> str:
        return f"_SdkSigner(origin={self._origin!r})"


def state_file_secrets(path: Path) -> dict[str, str]:
    """The private keys in an authenticator state file, named by credential id, for a secret
    scan (keyturn.testing.secret_scan) of the places they must never reach."""
    try:
        document = json.loads(Path(path).read_text())
        return {
            f"passkey {entry['credential_id']}": str(entry["private_key_pem"])
            for entry in document["passkeys"]
        }
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AuthenticatorError(
            f"cannot read the authenticator state {path}: {type(exc).__name__}"
        ) from None
