"""The engine's KeyProvider port on top of :class:`DfnsClient`.

One provider serves one managed credential: its bearer token is bound into the client; the
signing key of each call is passed in (the old key, then the new one once registered).
"""

from __future__ import annotations

from collections.abc import Callable

import httpx

from keyturn.adapters.dfns.client import DfnsClient
from keyturn.adapters.dfns.errors import InvalidRequest
from keyturn.adapters.dfns.models import Credential
from keyturn.adapters.dfns.signing import KeySigner
from keyturn.ports import ProviderCredential, RequestBudget, RequestObserver, SigningKey

#: The ways a new key can be registered (see KeyProvider.register_key).
REGISTER_VIA: tuple[str, ...] = ("credentials", "service_account_endpoint")

# What `prove` signs: a harmless request (it would only create a credential challenge). The
# token it yields is never presented, so proving has no effect at the provider.
_PROVE_METHOD = "POST"
_PROVE_PATH = "/auth/credentials/init"
_PROVE_BODY = b'{"kind":"Key"}'


def _provider_credential(credential: Credential) -> ProviderCredential:
    return ProviderCredential(
        credential_id=credential.credential_id,
        credential_uuid=credential.credential_uuid,
        is_active=credential.is_active,
        public_key=credential.public_key,
        name=credential.name,
        kind=credential.kind,
    )


def _signer(key: SigningKey) -> KeySigner:
    return KeySigner.from_pem(key.credential_id, key.private_key_pem)


class DfnsKeyProvider:
    """:class:`keyturn.ports.KeyProvider` for Dfns. Errors are ProviderError subclasses."""

    #: Signers a provider keeps loaded (a rotation's run signs with its old and its new key).
    KEEP_SIGNERS = 4

    def __init__(self, client: DfnsClient) -> None:
        self._client = client
        # Loaded keys by (credential id, PEM): parsing a PEM costs ~0.1 ms of CPU, and one run
        # signs several requests with the same two keys. Bounded, and gone with the provider
        # (a worker's provider lives for one rotation's run).
        self._signers: dict[tuple[str, bytes], KeySigner] = {}

    def _signer(self, key: SigningKey) -> KeySigner:
        cache_key = (key.credential_id, key.private_key_pem)
        signer = self._signers.get(cache_key)
        if signer is None:
            signer = _signer(key)
            if len(self._signers) >= self.KEEP_SIGNERS:
                self._signers.pop(next(iter(self._signers)))
            self._signers[cache_key] = signer
        return signer

    def __repr__(self) -> str:
        return f"DfnsKeyProvider(base_url={self._client.base_url!r})"

    async def register_key(
        self, *, signer: SigningKey, new_key: SigningKey, name: str, via: str
    ) -> ProviderCredential:
        if via not in REGISTER_VIA:
            raise InvalidRequest(
                f"unknown registration path {via!r}; use one of: {', '.join(REGISTER_VIA)}"
            )
        client = self._client.with_signer(self._signer(signer))
        new_signer = self._signer(new_key)
        if via == "credentials":
            created = await client.create_key_credential(new_signer, name)
        else:
            created = await client.create_service_account_credential(
                new_signer.public_key_pem(), name
            )
        return _provider_credential(created)

    async def list_credentials(self) -> list[ProviderCredential]:
        return [_provider_credential(c) for c in await self._client.list_credentials()]

    async def activate(self, *, signer: SigningKey, credential_uuid: str) -> None:
        await self._client.with_signer(self._signer(signer)).activate_credential(credential_uuid)

    async def deactivate(self, *, signer: SigningKey, credential_uuid: str) -> None:
        await self._client.with_signer(self._signer(signer)).deactivate_credential(credential_uuid)

    async def prove(self, *, signer: SigningKey) -> None:
        """init + sign + /auth/action with `signer`: succeeds only if the provider accepts its
        signature (an active credential of this principal, the matching key). No side effect."""
        client = self._client.with_signer(self._signer(signer))
        await client.sign_user_action(_PROVE_METHOD, _PROVE_PATH, _PROVE_BODY)

    async def aclose(self) -> None:
        await self._client.aclose()


def provider_for(
    base_url: str,
    token: str,
    *,
    timeout: float = 10.0,
    transport: httpx.AsyncBaseTransport | None = None,
    fence: Callable[[], None] | None = None,
    budget: RequestBudget | None = None,
    observe: RequestObserver | None = None,
) -> DfnsKeyProvider:
    """A DfnsKeyProvider owning its own client; close it with `aclose()`. `fence` is called
    before every request (see DfnsClient)."""
    return DfnsKeyProvider(
        DfnsClient(
            base_url,
            token,
            timeout=timeout,
            transport=transport,
            fence=fence,
            budget=budget,
            observe=observe,
        )
    )
