"""An in-memory KeyProvider with the sandbox's semantics, for unit tests of the engine.

It holds one principal's credentials (credId, ``cr-`` uuid, public key, active flag, name). Every
state-changing call and :meth:`FakeKeyProvider.prove` checks its signer the way the provider
does: the signer must be a registered, ACTIVE credential, and a real signature over a random
challenge made with the signer's private key must verify with the public key registered for it.

Fault hooks let a test script failures: :meth:`FakeKeyProvider.fail_next` makes the next call of
a method raise, either before it changes anything or after it applied its change (the "apply
then fail" case a real provider produces with a 5xx or a dropped connection). ``calls`` counts
every call by method name.
"""

from __future__ import annotations

import re
import secrets
from collections import Counter, deque
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Final

from cryptography.hazmat.primitives import serialization

from keyturn.adapters.keys import (
    InvalidPrivateKey,
    load_private_key,
    public_pem_of,
    sign_message,
    verify_message,
)
from keyturn.domain.errors import ProviderError
from keyturn.ports import KeyProvider, ProviderCredential, SigningKey

VIA_CREDENTIALS: Final = "credentials"
VIA_SERVICE_ACCOUNT_ENDPOINT: Final = "service_account_endpoint"
VIAS: Final = (VIA_CREDENTIALS, VIA_SERVICE_ACCOUNT_ENDPOINT)

_BASE64URL_RE: Final = re.compile(r"[A-Za-z0-9_-]+")

METHODS: Final[tuple[str, ...]] = (
    "register_key",
    "list_credentials",
    "activate",
    "deactivate",
    "prove",
)


@dataclass(frozen=True)
class FakeCredential:
    credential_id: str
    credential_uuid: str
    public_key: str
    is_active: bool
    name: str
    kind: str = "Key"
    date_created: datetime | None = None

    def to_port(self) -> ProviderCredential:
        return ProviderCredential(
            credential_id=self.credential_id,
            credential_uuid=self.credential_uuid,
            is_active=self.is_active,
            public_key=self.public_key,
            name=self.name,
            kind=self.kind,
        )


@dataclass(frozen=True)
class _Fault:
    error: Exception
    apply_first: bool


def _random_credential_id() -> str:
    return secrets.token_urlsafe(24)  # base64url, no padding, like the provider's


def _random_uuid() -> str:
    return "cr-" + secrets.token_hex(10)


def _refused(message: str, status: int, code: str) -> ProviderError:
    return ProviderError(message, retryable=False, status=status, code=code)


class FakeKeyProvider(KeyProvider):
    """In-memory provider for one principal. Not thread-safe; meant for one event loop."""

    def __init__(self) -> None:
        self._credentials: dict[str, FakeCredential] = {}  # by uuid, in creation order
        self._faults: dict[str, deque[_Fault]] = {}
        #: Calls by method name (failed ones included), plus "aclose".
        self.calls: Counter[str] = Counter()
        #: Set by aclose(); the fake keeps working afterwards (tests may reuse it).
        self.closed = False

    # ----------------------------------------------------------------------------- seeding

    @classmethod
    def with_credential(
        cls, credential_id: str, private_key_pem: bytes, *, name: str = "existing key"
    ) -> tuple[FakeKeyProvider, str]:
        """A provider whose principal has one active credential for this key; (provider, uuid)."""
        provider = cls()
        uuid = provider.add_credential(credential_id, private_key_pem, name=name)
        return provider, uuid

    def add_credential(
        self,
        credential_id: str,
        key_pem: bytes | str,
        *,
        name: str = "key",
        active: bool = True,
    ) -> str:
        """Seed a credential from a private or public PEM key, bypassing every check; its uuid."""
        pem = key_pem.encode("ascii") if isinstance(key_pem, str) else bytes(key_pem)
        if b"PRIVATE KEY" in pem:
            public_key = public_pem_of(load_private_key(pem))
        else:
            public_key = pem.decode("ascii")
            serialization.load_pem_public_key(pem)  # validate
        if self._by_credential_id(credential_id) is not None:
            raise ValueError(f"credential id {credential_id} is already registered")
        uuid = _random_uuid()
        self._credentials[uuid] = FakeCredential(
            credential_id=credential_id,
            credential_uuid=uuid,
            public_key=public_key,
            is_active=active,
            name=name,
            date_created=datetime.now(UTC),
        )
        return uuid

    def set_active(self, credential_uuid: str, active: bool) -> None:
        """Flip a credential's flag out of band (as another operator might), no signer check."""
        cred = self._credentials[credential_uuid]
        self._credentials[credential_uuid] = replace(cred, is_active=active)

    # ----------------------------------------------------------------------------- inspection

    def credential(self, credential_uuid: str) -> FakeCredential:
        return self._credentials[credential_uuid]

    def credential_by_id(self, credential_id: str) -> FakeCredential:
        cred = self._by_credential_id(credential_id)
        if cred is None:
            raise KeyError(credential_id)
        return cred

    @property
    def credentials(self) -> list[FakeCredential]:
        return list(self._credentials.values())

    # ----------------------------------------------------------------------------- faults

    def fail_next(self, method_name: str, error: Exception, apply_first: bool = False) -> None:
        """Make the next call of `method_name` raise `error`.

        With apply_first=True the call first applies its change (as a provider that committed
        and then failed to answer), then raises. Several faults queue up, one per call.
        """
        if method_name not in METHODS:
            raise ValueError(f"unknown method {method_name!r}; use one of: {', '.join(METHODS)}")
        self._faults.setdefault(method_name, deque()).append(_Fault(error, apply_first))

    def pending_faults(self, method_name: str) -> int:
        return len(self._faults.get(method_name, ()))

    def _take_fault(self, method_name: str) -> _Fault | None:
        self.calls[method_name] += 1
        queue = self._faults.get(method_name)
        if not queue:
            return None
        fault = queue.popleft()
        if not fault.apply_first:
            raise fault.error
        return fault

    @staticmethod
    def _raise_after(fault: _Fault | None) -> None:
        if fault is not None:
            raise fault.error

    # ----------------------------------------------------------------------------- checks

    def _by_credential_id(self, credential_id: str) -> FakeCredential | None:
        for cred in self._credentials.values():
            if cred.credential_id == credential_id:
                return cred
        return None

    def _check_signer(self, signer: SigningKey) -> FakeCredential:
        cred = self._by_credential_id(signer.credential_id)
        if cred is None:
            raise _refused(
                f"credential {signer.credential_id} is not registered with the provider; "
                "it cannot sign",
                401,
                "unauthorized",
            )
        if not cred.is_active:
            raise _refused(
                f"credential {signer.credential_id} is inactive and cannot sign; activate it or "
                "sign with an active credential",
                401,
                "unauthorized",
            )
        try:
            key = load_private_key(signer.private_key_pem, what="the signer's private key")
            challenge = secrets.token_bytes(32)
            signature = sign_message(key, challenge)
        except InvalidPrivateKey as exc:
            raise _refused(str(exc), 401, "unauthorized") from None
        public = serialization.load_pem_public_key(cred.public_key.encode("ascii"))
        if not verify_message(public, signature, challenge):
            raise _refused(
                f"signature by credential {signer.credential_id} does not verify with its "
                "registered public key",
                401,
                "unauthorized",
            )
        return cred

    def _get(self, credential_uuid: str) -> FakeCredential:
        cred = self._credentials.get(credential_uuid)
        if cred is None:
            raise _refused(f"credential {credential_uuid} not found", 404, "not_found")
        return cred

    # ----------------------------------------------------------------------------- the port

    async def register_key(
        self, *, signer: SigningKey, new_key: SigningKey, name: str, via: str
    ) -> ProviderCredential:
        fault = self._take_fault("register_key")
        if via not in VIAS:
            raise _refused(
                f"unknown registration path {via!r}; use one of: {', '.join(VIAS)}",
                400,
                "bad_request",
            )
        self._check_signer(signer)
        try:
            public_key = public_pem_of(
                load_private_key(new_key.private_key_pem, what="the new key's private key")
            )
        except InvalidPrivateKey as exc:
            raise _refused(str(exc), 400, "bad_request") from None
        if via == VIA_CREDENTIALS:
            credential_id = new_key.credential_id
            if not credential_id or not _BASE64URL_RE.fullmatch(credential_id):
                raise _refused(
                    "credentialInfo.credId must be base64url (A-Z a-z 0-9 - _)", 400, "bad_request"
                )
            if self._by_credential_id(credential_id) is not None:
                raise _refused(
                    f"credential id {credential_id} already exists; choose a new credId",
                    409,
                    "conflict",
                )
        else:
            credential_id = _random_credential_id()
        uuid = _random_uuid()
        cred = FakeCredential(
            credential_id=credential_id,
            credential_uuid=uuid,
            public_key=public_key,
            is_active=True,
            name=name,
            date_created=datetime.now(UTC),
        )
        self._credentials[uuid] = cred
        self._raise_after(fault)
        return cred.to_port()

    async def list_credentials(self) -> list[ProviderCredential]:
        fault = self._take_fault("list_credentials")
        result = [cred.to_port() for cred in self._credentials.values()]
        self._raise_after(fault)
        return result

    async def activate(self, *, signer: SigningKey, credential_uuid: str) -> None:
        fault = self._take_fault("activate")
        self._check_signer(signer)
        cred = self._get(credential_uuid)
        self._credentials[credential_uuid] = replace(cred, is_active=True)
        self._raise_after(fault)

    async def deactivate(self, *, signer: SigningKey, credential_uuid: str) -> None:
        fault = self._take_fault("deactivate")
        self._check_signer(signer)
        cred = self._get(credential_uuid)
        if cred.is_active:
            self._credentials[credential_uuid] = replace(cred, is_active=False)
        self._raise_after(fault)

    async def prove(self, *, signer: SigningKey) -> None:
        fault = self._take_fault("prove")
        self._check_signer(signer)
        self._raise_after(fault)

    async def aclose(self) -> None:
        self.calls["aclose"] += 1
        self.closed = True

    def __repr__(self) -> str:
        active = sum(1 for c in self._credentials.values() if c.is_active)
        return f"FakeKeyProvider(credentials={len(self._credentials)}, active={active})"
