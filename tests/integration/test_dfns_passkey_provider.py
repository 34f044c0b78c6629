"""The PasskeyProvider port's Dfns adapter (plugin.dfns_passkey_session) against the sandbox
over HTTP, with the software authenticator as the user's browser: a user logged in by
delegation, a challenge per call, the provider's acceptance of the assertion before anything
is sent, then the call; the code flow; nothing hands out the delegated token."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import pytest

from keyturn.adapters.dfns import DfnsApiError
from keyturn.plugin import (
    KeyturnError,
    OneTimeCode,
    PasskeyCreation,
    ProviderAccess,
    SigningKey,
    dfns_passkey_session,
)
from keyturn.sandbox.testing import SandboxProcess
from keyturn.testing.authenticator import SoftwareAuthenticator

ORIGIN = "https://sandbox.keyturn.local"
NEW_ORIGIN = "https://wallet.newdomain.example"


def _access(sandbox: SandboxProcess, *, with_key: bool = True) -> ProviderAccess:
    boot = sandbox.bootstrap["service_account"]
    return ProviderAccess(
        credential="sa",
        provider="dfns",
        base_url=sandbox.base_url,
        token=boot["token"],
        timeout_seconds=10,
        key=SigningKey(boot["credential_id"], boot["private_key_pem"].encode())
        if with_key
        else None,
    )


def _made(device: SoftwareAuthenticator, creation: PasskeyCreation, origin: str) -> dict[str, str]:
    return device.make_credential(
        rp_id=str(creation.rp_id),
        origin=origin,
        challenge=creation.challenge,
        user_id=str(creation.user_id),
    )


@pytest.mark.anyio
async def test_passkey_session_registers_proves_and_deactivates_through_the_browser(
    sandbox_factory: Callable[..., SandboxProcess], tmp_path: Path
) -> None:
    sandbox = sandbox_factory(end_users=1)
    sandbox.set_relying_parties(
        origins=[ORIGIN, NEW_ORIGIN], rp_ids=["sandbox.keyturn.local", "newdomain.example"]
    )
    entry = sandbox.end_user(0)
    old_device = sandbox.authenticator()
    with pytest.raises(KeyturnError, match="with_key=True"):
        dfns_passkey_session(_access(sandbox, with_key=False))
    provider = dfns_passkey_session(_access(sandbox))
    try:
        user = await provider.login(entry["username"])
        assert user.user_id == entry["user_id"]
        assert "eyJ" not in repr(user)
        with pytest.raises(TypeError):
            pickle.dumps(user)
        [old] = await user.credentials()
        assert old.credential_uuid == entry["credential_uuid"]
        assert [c.credential_uuid for c in await provider.user_credentials(entry["username"])] == [
            old.credential_uuid
        ]

        # a passkey made "in the browser", its Create Credential signed by the old passkey
        creation = await user.registration(ORIGIN)
        assert creation.rp_id == "sandbox.keyturn.local" and creation.user_id == entry["user_id"]
        new_device = SoftwareAuthenticator(tmp_path / "new.json")
        info = _made(new_device, creation, ORIGIN)
        challenge = await user.challenge(
            "create_passkey", creation=creation, credential_info=info, name="keyturn rot-1"
        )
        assert challenge.allowed == (old.credential_id,)
        signed = await user.accept(
            challenge, old_device.first_factor(challenge.request.action.raw, origin=ORIGIN)
        )
        assert signed.reveal() not in repr(signed)
        with pytest.raises(TypeError):
            pickle.dumps(signed)
        with pytest.raises(KeyturnError):
            await user.send(signed)  # a create is not an activate/deactivate
        new = await user.create_passkey(signed)
        assert (new.kind, new.name, new.is_active) == ("Fido2", "keyturn rot-1", True)

        # the proof: a deactivation of the old passkey signed by the new one, accepted by the
        # provider; nothing changes until it is sent
        challenge = await user.challenge("deactivate", credential_uuid=old.credential_uuid)
        factor = new_device.first_factor(
            challenge.request.action.raw, origin=ORIGIN, credential_id=new.credential_id
        )
        signed = await user.accept(challenge, factor)
        states = {c.credential_uuid: c.is_active for c in await user.credentials()}
        assert states == {old.credential_uuid: True, new.credential_uuid: True}
        await user.send(signed)
        states = {c.credential_uuid: c.is_active for c in await user.credentials()}
        assert states == {old.credential_uuid: False, new.credential_uuid: True}
        with pytest.raises(DfnsApiError) as reused:
            await user.send(signed)  # a user action is single use
        assert reused.value.status == 400

        # someone else's assertion is refused by the provider at /auth/action
        challenge = await user.challenge("activate", credential_uuid=old.credential_uuid)
        stale = old_device.first_factor(
            challenge.request.action.raw, origin=ORIGIN, credential_id=old.credential_id
        )
        with pytest.raises(DfnsApiError) as refused:
            await user.accept(challenge, stale)
        assert refused.value.status == 401

        # the code flow: a code signed by the new passkey, a passkey on the new domain
        challenge = await user.challenge("create_code")
        signed = await user.accept(
            challenge,
            new_device.first_factor(
                challenge.request.action.raw, origin=ORIGIN, credential_id=new.credential_id
            ),
        )
        code = await user.create_code(signed)
        assert isinstance(code, OneTimeCode) and code.reveal() not in repr(code)
        on_new = await provider.code_registration(code, NEW_ORIGIN)
        assert on_new.rp_id == "newdomain.example"
        far = SoftwareAuthenticator(tmp_path / "far.json")
        made = await provider.create_passkey_with_code(
            on_new, _made(far, on_new, NEW_ORIGIN), "keyturn rot-2"
        )
        assert (made.relying_party_id, made.origin) == ("newdomain.example", NEW_ORIGIN)
    finally:
        await provider.aclose()
