"""The PasskeyProvider port on top of DfnsClient: a service account that logs end users in by
delegation, reads their credentials and relays the challenges their browsers sign.

A write for a user is three steps, so that the pages can check an assertion before it reaches
the provider and can record the proof before (or without) sending the request: a challenge for
the exact request (`POST /auth/action/init`), the provider's acceptance of the browser's
assertion (`POST /auth/action`, a user-action token held in a :class:`SignedCall`), and the
request itself, which presents that token (:meth:`DfnsClient.presenting`). The delegated token
lives inside :class:`DfnsUserPasskeys` only.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from keyturn.adapters.dfns.client import (
    DfnsClient,
    _fido2_credential_body,
    _iso_utc,
)
from keyturn.adapters.dfns.errors import DfnsApiError, InvalidRequest
from keyturn.adapters.dfns.models import (
    Credential,
    CredentialChallenge,
    CredentialCode,
    DelegatedToken,
    UserActionChallenge,
)
from keyturn.adapters.dfns.signing import KeySigner, compact_json
from keyturn.ports import (
    OneTimeCode,
    PasskeyCall,
    PasskeyChallenge,
    PasskeyCreation,
    PasskeyProvider,
    ProviderCredential,
    RequestBudget,
    RequestObserver,
    SignedCall,
    UserPasskeys,
)

#: A code is valid for at most a minute at the provider; the user signs within this.
CODE_SECONDS = 55

T = TypeVar("T")


def _credential(c: Credential) -> ProviderCredential:
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


def _creation(c: CredentialChallenge) -> PasskeyCreation:
    return PasskeyCreation(
        challenge_identifier=c.challenge_identifier,
        challenge=c.challenge,
        rp_id=c.rp_id,
        user_id=c.user_id,
        options=dict(c.raw),
    )


def _as_challenge(creation: PasskeyCreation) -> CredentialChallenge:
    return CredentialChallenge.from_api(creation.options)


def _subject(token: DelegatedToken) -> str | None:
    """The user id in the delegated token's JWT payload (`sub`), unverified: it only names
    whom the provider logged in; None if it is not a JWT."""
    parts = token.reveal().split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, TypeError):
        return None
    sub = payload.get("sub") if isinstance(payload, dict) else None
    return sub if isinstance(sub, str) and sub else None


@dataclass(frozen=True)
class _Request:
    """What a challenge was made for: sent later exactly as signed."""

    method: str
    path: str
    body: Mapping[str, Any]
    action: UserActionChallenge


class DfnsUserPasskeys(UserPasskeys):
    __slots__ = ("_client", "_user_id", "_username")

    def __init__(self, client: DfnsClient, username: str, user_id: str | None) -> None:
        self._client = client
        self._username = username
        self._user_id = user_id

    def __repr__(self) -> str:
        return f"DfnsUserPasskeys(username={self._username!r})"

    def __reduce__(self) -> Any:
        raise TypeError("a user's provider session holds a delegated token; it cannot be pickled")

    @property
    def username(self) -> str:
        return self._username

    @property
    def user_id(self) -> str | None:
        return self._user_id

    async def credentials(self) -> list[ProviderCredential]:
        return [_credential(c) for c in await self._client.list_credentials()]

    async def registration(self, origin: str) -> PasskeyCreation:
        return _creation(await self._client.fido2_challenge(origin=origin))

    async def challenge(
        self,
        call: PasskeyCall,
        *,
        credential_uuid: str | None = None,
        creation: PasskeyCreation | None = None,
        credential_info: Mapping[str, str] | None = None,
        name: str | None = None,
    ) -> PasskeyChallenge:
        if call in ("activate", "deactivate"):
            if not credential_uuid:
                raise InvalidRequest(f"{call} needs the credential's uuid")
            method, path = "PUT", f"/auth/credentials/{call}"
            body: Mapping[str, Any] = {"credentialUuid": credential_uuid}
        elif call == "create_passkey":
            if creation is None or credential_info is None or not name:
                raise InvalidRequest("create_passkey needs the creation, credential info and name")
            method, path = "POST", "/auth/credentials"
            body = _fido2_credential_body(_as_challenge(creation), credential_info, name)
        elif call == "create_code":
            method, path = "POST", "/auth/credentials/code"
            body = {"expiration": _iso_utc(datetime.now(UTC) + timedelta(seconds=CODE_SECONDS))}
        else:  # pragma: no cover - the Literal says it all
            raise InvalidRequest(f"unknown user call {call!r}")
        action = await self._client.user_action_challenge(method, path, compact_json(body))
        return PasskeyChallenge(
            call=call,
            challenge=action.challenge,
            rp_id=action.rp_id,
            user_verification=action.user_verification,
            allowed=action.allowed_passkeys,
            request=_Request(method, path, body, action),
        )

    async def accept(
        self, challenge: PasskeyChallenge, first_factor: Mapping[str, Any]
    ) -> SignedCall:
        request = challenge.request
        if not isinstance(request, _Request):
            raise InvalidRequest("this challenge was not made by a Dfns user session")
        token = await self._client.complete_user_action(request.action, first_factor)
        return SignedCall(challenge, token)

    def _presented(self, signed: SignedCall, *calls: PasskeyCall) -> DfnsClient:
        if signed.challenge.call not in calls:
            raise InvalidRequest(
                f"a signed {signed.challenge.call} cannot be sent as {' or '.join(calls)}"
            )
        return self._client.presenting(signed.reveal())

    async def send(self, signed: SignedCall) -> None:
        client = self._presented(signed, "activate", "deactivate")
        request = signed.challenge.request
        uuid = str(request.body["credentialUuid"])
        if signed.challenge.call == "activate":
            await client.activate_credential(uuid)
        else:
            await client.deactivate_credential(uuid)

    async def create_passkey(self, signed: SignedCall) -> ProviderCredential:
        client = self._presented(signed, "create_passkey")
        body = signed.challenge.request.body
        info = body["credentialInfo"]
        challenge = CredentialChallenge(
            kind="Fido2",
            challenge_identifier=str(body["challengeIdentifier"]),
            challenge="-",
        )
        return _credential(
            await client.create_fido2_credential(challenge, info, str(body["credentialName"]))
        )

    async def create_code(self, signed: SignedCall) -> OneTimeCode:
        client = self._presented(signed, "create_code")
        when = datetime.fromisoformat(
            str(signed.challenge.request.body["expiration"]).replace("Z", "+00:00")
        )
        code: CredentialCode = await client.create_credential_code(when)
        return OneTimeCode(code.code, code.expiration)


#: A user's delegated token is reused this long within a process (the worker's waits poll
#: every user; the pages make several calls a visit): never stored, never returned.
TOKEN_REUSE_SECONDS = 300.0
#: (base URL, the logging-in credential's id, username) -> (when, token): one per process.
_TOKENS: dict[tuple[str, str, str], tuple[float, DelegatedToken]] = {}
_TOKENS_MAX = 10_000


class DfnsPasskeyProvider(PasskeyProvider):
    def __init__(self, client: DfnsClient) -> None:
        self._client = client

    def __repr__(self) -> str:
        return f"DfnsPasskeyProvider({self._client!r})"

    def _key(self, username: str) -> tuple[str, str, str]:
        signer = self._client.signer
        return (self._client.base_url, signer.credential_id if signer else "", username)

    async def _token(self, username: str, *, fresh: bool = False) -> DelegatedToken:
        """The user's delegated token: the one this process holds while it is young, else a
        new Delegated Login (signed by this session's service account)."""
        key = self._key(username)
        held = _TOKENS.get(key)
        if not fresh and held is not None and time.monotonic() - held[0] < TOKEN_REUSE_SECONDS:
            return held[1]
        token = await self._client.delegated_login(username)
        if len(_TOKENS) >= _TOKENS_MAX:
            _TOKENS.clear()
        _TOKENS[key] = (time.monotonic(), token)
        return token

    async def _as(self, username: str, call: Callable[[DelegatedToken], Awaitable[T]]) -> T:
        """`call` with the user's token; a token the provider no longer takes (401) is
        replaced once by a fresh login."""
        try:
            return await call(await self._token(username))
        except DfnsApiError as exc:
            if exc.status != 401:
                raise
            return await call(await self._token(username, fresh=True))

    async def user_credentials(self, username: str) -> list[ProviderCredential]:
        found = await self._as(username, self._client.list_user_credentials)
        return [_credential(c) for c in found]

    async def rp_for(self, username: str, origin: str) -> str | None:
        async def ask(token: DelegatedToken) -> str | None:
            return (await self._client.as_user(token).fido2_challenge(origin=origin)).rp_id

        return await self._as(username, ask)

    async def login(self, username: str) -> UserPasskeys:
        token = await self._token(username)
        return DfnsUserPasskeys(self._client.as_user(token), username, _subject(token))

    async def code_registration(self, code: OneTimeCode | str, origin: str) -> PasskeyCreation:
        text = code.reveal() if isinstance(code, OneTimeCode) else code
        return _creation(await self._client.fido2_code_challenge(text, origin=origin))

    async def create_passkey_with_code(
        self, creation: PasskeyCreation, credential_info: Mapping[str, str], name: str
    ) -> ProviderCredential:
        created = await self._client.create_fido2_credential_with_code(
            _as_challenge(creation), credential_info, name
        )
        return _credential(created)

    async def aclose(self) -> None:
        await self._client.aclose()


def passkey_provider_for(
    base_url: str,
    token: str,
    signer_credential_id: str,
    signer_private_key_pem: bytes,
    *,
    timeout: float = 10.0,
    fence: Callable[[], None] | None = None,
    budget: RequestBudget | None = None,
    observe: RequestObserver | None = None,
) -> DfnsPasskeyProvider:
    signer = KeySigner.from_pem(signer_credential_id, signer_private_key_pem)
    return DfnsPasskeyProvider(
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
