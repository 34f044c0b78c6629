"""keyturn's Dfns client drives an end user's passkey rotation against the sandbox over HTTP:
Delegated Login, the user's credentials, Fido2 registration signed by the old passkey through a
relay (the software authenticator plays the user's browser), the code flow, deactivation."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from keyturn.adapters.dfns import (
    DelegatedToken,
    DfnsApiError,
    DfnsClient,
    KeySigner,
    MissingSigner,
    UserActionChallenge,
)
from keyturn.sandbox.testing import SandboxProcess
from keyturn.testing.authenticator import SoftwareAuthenticator

ORIGIN = "https://sandbox.keyturn.local"
NEW_ORIGIN = "https://wallet.newdomain.example"


def browser(
    device: SoftwareAuthenticator, origin: str, seen: list[UserActionChallenge] | None = None
) -> Callable[[UserActionChallenge], Any]:
    """An AssertionRelay: the user's browser signs the challenge with its passkey."""

    async def relay(challenge: UserActionChallenge) -> dict[str, Any]:
        if seen is not None:
            seen.append(challenge)
        return device.first_factor(challenge.raw, origin=origin)

    return relay


@pytest.mark.anyio
async def test_client_rotates_an_end_users_passkey(
    sandbox_factory: Callable[..., SandboxProcess], tmp_path: Path
) -> None:
    sandbox = sandbox_factory(end_users=1)
    sandbox.set_relying_parties(
        origins=[ORIGIN, NEW_ORIGIN], rp_ids=["sandbox.keyturn.local", "newdomain.example"]
    )
    boot = sandbox.bootstrap["service_account"]
    entry = sandbox.end_user(0)
    old_device = sandbox.authenticator()
    signer = KeySigner.from_pem(boot["credential_id"], boot["private_key_pem"])
    async with DfnsClient(sandbox.base_url, boot["token"], signer=signer) as service:
        token = await service.delegated_login(entry["username"])
        assert isinstance(token, DelegatedToken)
        assert token.reveal() not in repr(token) and token.reveal() not in str(token)
        with pytest.raises(TypeError):
            pickle.dumps(token)

        # the user's credentials, read with the delegated token
        [old] = await service.list_user_credentials(token)
        assert (old.kind, old.credential_uuid) == ("Fido2", entry["credential_uuid"])

        # a delegated token alone cannot write: no signer, no relay
        reader = service.as_user(token)
        with pytest.raises(MissingSigner):
            await reader.deactivate_credential(old.credential_uuid)

        # register a passkey on a new device, signed by the old passkey through the relay
        seen: list[UserActionChallenge] = []
        user = service.as_user(token, relay=browser(old_device, ORIGIN, seen))
        challenge = await user.fido2_challenge(origin=ORIGIN)
        assert challenge.kind == "Fido2" and challenge.rp_id == "sandbox.keyturn.local"
        assert challenge.raw["excludeCredentials"] == [
            {"type": "public-key", "id": old.credential_id}
        ]
        new_device = SoftwareAuthenticator(tmp_path / "new-device.json")
        info = new_device.make_credential(
            rp_id=str(challenge.rp_id),
            origin=ORIGIN,
            challenge=challenge.challenge,
            user_id=str(challenge.user_id),
            attestation="packed",
        )
        created = await user.create_fido2_credential(challenge, info, "new phone")
        assert created.kind == "Fido2" and created.is_active
        assert seen[0].allowed_passkeys == (old.credential_id,)
        assert seen[0].user_verification == "required"

        # the new passkey deactivates the old one
        with_new = service.as_user(token, relay=browser(new_device, ORIGIN))
        await with_new.deactivate_credential(old.credential_uuid)
        states = {c.credential_uuid: c.is_active for c in await with_new.list_credentials()}
        assert states == {old.credential_uuid: False, created.credential_uuid: True}

        # a relay that hands in the deactivated passkey is refused by the provider
        async def stale(challenge: UserActionChallenge) -> dict[str, Any]:
            return old_device.first_factor(
                challenge.raw, origin=ORIGIN, credential_id=old.credential_id
            )

        with pytest.raises(DfnsApiError) as refused:
            await service.as_user(token, relay=stale).activate_credential(old.credential_uuid)
        assert refused.value.status == 401

        # the code flow: a code signed with the new passkey, a passkey made on the new domain
        code = await with_new.create_credential_code(datetime.now(UTC) + timedelta(seconds=50))
        assert code.code not in repr(code)
        on_new = await service.fido2_code_challenge(code, origin=NEW_ORIGIN)
        assert on_new.rp_id == "newdomain.example"
        far_device = SoftwareAuthenticator(tmp_path / "far-device.json")
        info = far_device.make_credential(
            rp_id=str(on_new.rp_id),
            origin=NEW_ORIGIN,
            challenge=on_new.challenge,
            user_id=str(on_new.user_id),
        )
        far = await service.create_fido2_credential_with_code(on_new, info, "new domain")
        assert (far.relying_party_id, far.origin) == ("newdomain.example", NEW_ORIGIN)
        with pytest.raises(DfnsApiError) as reused:
            await service.fido2_code_challenge(code, origin=NEW_ORIGIN)
        assert reused.value.status == 401
