"""FakeKeyProvider: the sandbox's signer rules, credential bookkeeping and the fault hooks."""

from __future__ import annotations

from collections.abc import Awaitable

import pytest

from keyturn.adapters.fake_provider import FakeKeyProvider
from keyturn.adapters.keys import CryptoKeys
from keyturn.domain.errors import ProviderError
from keyturn.ports import SigningKey
from keyturn.testing.secret_scan import scan_bytes

KEYS = CryptoKeys()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _key(credential_id: str, algorithm: str = "ed25519") -> SigningKey:
    return SigningKey(credential_id, KEYS.generate(algorithm).private_pem)


@pytest.fixture
def old() -> SigningKey:
    return _key("old-cred-id-0001")


@pytest.fixture
def seeded(old: SigningKey) -> tuple[FakeKeyProvider, str]:
    return FakeKeyProvider.with_credential(old.credential_id, old.private_key_pem, name="sa key")


async def _refused(awaitable: Awaitable[object], status: int, match: str) -> ProviderError:
    with pytest.raises(ProviderError, match=match) as info:
        await awaitable
    assert info.value.retryable is False
    assert info.value.status == status
    assert "\n" not in str(info.value)
    return info.value


@pytest.mark.anyio
async def test_seeded_credential_is_listed_active(
    seeded: tuple[FakeKeyProvider, str], old: SigningKey
) -> None:
    provider, uuid = seeded
    assert uuid.startswith("cr-")
    [cred] = await provider.list_credentials()
    assert (cred.credential_id, cred.credential_uuid, cred.is_active) == (
        old.credential_id,
        uuid,
        True,
    )
    assert cred.public_key == KEYS.public_pem(old.private_key_pem)
    assert cred.name == "sa key"
    assert cred.kind == "Key"
    await provider.prove(signer=old)


@pytest.mark.anyio
@pytest.mark.parametrize("algorithm", ["ed25519", "ecdsa-p256", "rsa-2048"])
async def test_register_via_credentials_keeps_the_client_credid(
    seeded: tuple[FakeKeyProvider, str], old: SigningKey, algorithm: str
) -> None:
    provider, _ = seeded
    new = _key("new-cred-id-0002", algorithm)
    created = await provider.register_key(signer=old, new_key=new, name="rot-1", via="credentials")
    assert created.credential_id == new.credential_id
    assert created.is_active
    assert created.public_key == KEYS.public_pem(new.private_key_pem)
    assert created.name == "rot-1"
    await provider.prove(signer=new)
    assert {c.credential_id for c in await provider.list_credentials()} == {
        old.credential_id,
        new.credential_id,
    }


@pytest.mark.anyio
async def test_register_via_service_account_endpoint_chooses_the_credid(
    seeded: tuple[FakeKeyProvider, str], old: SigningKey
) -> None:
    provider, _ = seeded
    new = _key("ignored-by-provider")
    created = await provider.register_key(
        signer=old, new_key=new, name="rot-1", via="service_account_endpoint"
    )
    assert created.credential_id != new.credential_id
    assert created.credential_id
    await provider.prove(signer=SigningKey(created.credential_id, new.private_key_pem))


@pytest.mark.anyio
async def test_register_rejects_duplicate_credid_and_unknown_via(
    seeded: tuple[FakeKeyProvider, str], old: SigningKey
) -> None:
    provider, _ = seeded
    dup = _key(old.credential_id)
    await _refused(
        provider.register_key(signer=old, new_key=dup, name="x", via="credentials"),
        409,
        "already exists",
    )
    await _refused(
        provider.register_key(
            signer=old, new_key=_key("not/base64url"), name="x", via="credentials"
        ),
        400,
        "must be base64url",
    )
    await _refused(
        provider.register_key(signer=old, new_key=_key("n"), name="x", via="carrier-pigeon"),
        400,
        "unknown registration path",
    )
    assert len(provider.credentials) == 1


@pytest.mark.anyio
async def test_signer_must_be_registered_active_and_hold_the_matching_key(
    seeded: tuple[FakeKeyProvider, str], old: SigningKey
) -> None:
    provider, uuid = seeded
    impostor = SigningKey(old.credential_id, KEYS.generate("ed25519").private_pem)
    stranger = _key("never-registered")
    for signer, match in [
        (impostor, "does not verify with its registered public key"),
        (stranger, "is not registered"),
        (SigningKey(old.credential_id, b"not a pem key at all, long enough"), "is not PEM"),
    ]:
        await _refused(provider.prove(signer=signer), 401, match)
        await _refused(
            provider.register_key(signer=signer, new_key=_key("n1"), name="x", via="credentials"),
            401,
            match,
        )
        await _refused(provider.deactivate(signer=signer, credential_uuid=uuid), 401, match)
        await _refused(provider.activate(signer=signer, credential_uuid=uuid), 401, match)
    # Nothing changed.
    [cred] = provider.credentials
    assert cred.is_active


@pytest.mark.anyio
async def test_deactivate_activate_and_inactive_signers(
    seeded: tuple[FakeKeyProvider, str], old: SigningKey
) -> None:
    provider, old_uuid = seeded
    new = _key("new-cred-id-0002")
    created = await provider.register_key(signer=old, new_key=new, name="n", via="credentials")
    await provider.deactivate(signer=new, credential_uuid=old_uuid)
    assert not provider.credential(old_uuid).is_active
    await provider.deactivate(signer=new, credential_uuid=old_uuid)  # no-op when inactive
    assert not provider.credential(old_uuid).is_active
    await _refused(provider.prove(signer=old), 401, "is inactive")
    await _refused(
        provider.register_key(signer=old, new_key=_key("n3"), name="x", via="credentials"),
        401,
        "is inactive",
    )
    await _refused(provider.activate(signer=old, credential_uuid=old_uuid), 401, "is inactive")
    await provider.activate(signer=new, credential_uuid=old_uuid)
    await provider.prove(signer=old)
    flags = {c.credential_uuid: c.is_active for c in await provider.list_credentials()}
    assert flags == {old_uuid: True, created.credential_uuid: True}


@pytest.mark.anyio
async def test_unknown_uuid_is_not_found(
    seeded: tuple[FakeKeyProvider, str], old: SigningKey
) -> None:
    provider, _ = seeded
    await _refused(provider.activate(signer=old, credential_uuid="cr-nope"), 404, "not found")
    await _refused(provider.deactivate(signer=old, credential_uuid="cr-nope"), 404, "not found")


@pytest.mark.anyio
async def test_fail_next_before_the_change(
    seeded: tuple[FakeKeyProvider, str], old: SigningKey
) -> None:
    provider, _ = seeded
    boom = ProviderError("POST /auth/credentials: 503", retryable=True, status=503)
    provider.fail_next("register_key", boom)
    with pytest.raises(ProviderError) as info:
        await provider.register_key(signer=old, new_key=_key("n1"), name="x", via="credentials")
    assert info.value is boom
    assert len(provider.credentials) == 1  # nothing applied
    assert provider.pending_faults("register_key") == 0
    # The fault is spent: the retry succeeds.
    await provider.register_key(signer=old, new_key=_key("n1"), name="x", via="credentials")
    assert len(provider.credentials) == 2
    assert provider.calls["register_key"] == 2


@pytest.mark.anyio
async def test_fail_next_apply_first_applies_then_raises(
    seeded: tuple[FakeKeyProvider, str], old: SigningKey
) -> None:
    provider, old_uuid = seeded
    new = _key("n1")
    lost = ProviderError("connection dropped", retryable=True, outcome_unknown=True)
    provider.fail_next("register_key", lost, apply_first=True)
    with pytest.raises(ProviderError):
        await provider.register_key(signer=old, new_key=new, name="rot-9", via="credentials")
    # The change happened: a reconciler finds the credential by its credId.
    assert provider.credential_by_id("n1").name == "rot-9"
    # A naive retry collides with it.
    await _refused(
        provider.register_key(signer=old, new_key=new, name="rot-9", via="credentials"),
        409,
        "already exists",
    )

    provider.fail_next("deactivate", lost, apply_first=True)
    with pytest.raises(ProviderError):
        await provider.deactivate(
            signer=SigningKey("n1", new.private_key_pem), credential_uuid=old_uuid
        )
    assert not provider.credential(old_uuid).is_active


@pytest.mark.anyio
async def test_faults_queue_in_order_and_counters_count(
    seeded: tuple[FakeKeyProvider, str], old: SigningKey
) -> None:
    provider, _ = seeded
    first, second = ProviderError("1", retryable=True), ProviderError("2", retryable=True)
    provider.fail_next("prove", first)
    provider.fail_next("prove", second)
    for expected in (first, second):
        with pytest.raises(ProviderError) as info:
            await provider.prove(signer=old)
        assert info.value is expected
    await provider.prove(signer=old)
    await provider.list_credentials()
    await provider.aclose()
    assert provider.calls == {"prove": 3, "list_credentials": 1, "aclose": 1}
    assert provider.closed
    with pytest.raises(ValueError, match="unknown method 'register'"):
        provider.fail_next("register", first)


@pytest.mark.anyio
async def test_errors_and_reprs_never_show_private_keys(
    seeded: tuple[FakeKeyProvider, str], old: SigningKey
) -> None:
    provider, _ = seeded
    impostor = SigningKey(old.credential_id, KEYS.generate("ed25519").private_pem)
    with pytest.raises(ProviderError) as info:
        await provider.prove(signer=impostor)
    shown = str(info.value) + repr(provider) + repr(old) + repr(provider.credentials)
    assert (
        scan_bytes(shown, {"old": old.private_key_pem, "impostor": impostor.private_key_pem}) == []
    )
