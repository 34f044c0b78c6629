"""The engine's PasskeyProvider port on DfnsClient: end users' credentials, read by delegation.

A service account logs each user in (Delegated Login, signed with the service account's key)
and reads with the user's delegated token; the token stays in this object (a few minutes, then
a fresh login) and is never returned, logged or put in an error.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from keyturn.adapters.dfns.client import DfnsClient
from keyturn.adapters.dfns.models import Credential, DelegatedToken
from keyturn.adapters.dfns.signing import KeySigner
from keyturn.ports import PasskeyProvider, ProviderCredential, RequestBudget, RequestObserver

#: A delegated token is reused this long for reads (Dfns' tokens live longer).
TOKEN_REUSE_SECONDS = 300.0


def provider_credential(c: Credential) -> ProviderCredential:
    return ProviderCredential(
        credential_id=c.credential_id,
        credential_uuid=c.credential_uuid,
        is_active=c.is_active,
        public_key=c.public_key,
        name=c.name,
        kind=c.kind,
        relying_party_id=c.relying_party_id,
        origin=c.origin,
    )


class DfnsUserReads(PasskeyProvider):
    def __init__(self, client: DfnsClient) -> None:
        self.client = client
        self._tokens: dict[str, tuple[float, DelegatedToken]] = {}

    def __repr__(self) -> str:
        return f"DfnsUserReads({self.client!r})"

    async def delegated(self, username: str) -> DelegatedToken:
        """The user's delegated token (a fresh login when the one held is old)."""
        held = self._tokens.get(username)
        if held is not None and time.monotonic() - held[0] < TOKEN_REUSE_SECONDS:
            return held[1]
        token = await self.client.delegated_login(username)
        self._tokens[username] = (time.monotonic(), token)
        return token

    async def user_credentials(self, username: str) -> list[ProviderCredential]:
        token = await self.delegated(username)
        return [provider_credential(c) for c in await self.client.list_user_credentials(token)]

    async def rp_for(self, username: str, origin: str) -> str | None:
        token = await self.delegated(username)
        challenge = await self.client.as_user(token).fido2_challenge(origin=origin)
        return challenge.rp_id

    async def aclose(self) -> None:
        self._tokens.clear()
        await self.client.aclose()


def user_reads_for(
    base_url: str,
    token: str,
    signer_credential_id: str,
    signer_private_key_pem: bytes,
    *,
    timeout: float = 10.0,
    fence: Callable[[], None] | None = None,
    budget: RequestBudget | None = None,
    observe: RequestObserver | None = None,
) -> DfnsUserReads:
    signer = KeySigner.from_pem(signer_credential_id, signer_private_key_pem)
    return DfnsUserReads(
        DfnsClient(
            base_url,
            token,
            signer=signer,
            timeout=timeout,
            fence=fence,
            budget=budget,
            observe=observe,
        )
    )
