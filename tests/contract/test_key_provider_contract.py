"""KeyProvider contract: one suite of behaviour, run against every provider implementation.

- ``fake``: :class:`keyturn.adapters.fake_provider.FakeKeyProvider`, in memory.
- ``sandbox``: :class:`keyturn.adapters.dfns.provider.DfnsKeyProvider` over real HTTP against a
  sandbox subprocess. One sandbox per test module and xdist worker, bootstrapped with several
  service accounts; each test gets a service account of its own, so tests stay independent
  without paying a sandbox start each.

The engine relies on exactly these behaviours: a new key registered with the old signer, proven,
the old deactivated with the new signer (and unable to sign afterwards, a non-retryable error),
reactivated for a rollback, and the active flags listed as the provider holds them.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from keyturn.adapters.fake_provider import FakeKeyProvider
from keyturn.adapters.keys import CryptoKeys
from keyturn.domain.errors import ProviderError
from keyturn.ports import KeyProvider, ProviderCredential, SigningKey
from keyturn.testing.secret_scan import scan_bytes

KEYS = CryptoKeys()
#: Service accounts per sandbox; a new sandbox starts when a module uses them all.
ACCOUNTS_PER_SANDBOX = 12
VIAS = ("credentials", "service_account_endpoint")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Harness:
    provider: KeyProvider
    old: SigningKey
    old_uuid: str


class SandboxPool:
    """Hands out a fresh service account per test; starts sandboxes as needed."""

    def __init__(self, tmp_dir: Path) -> None:
        self._tmp_dir = tmp_dir
        self._sandboxes: list[Any] = []
        self._free: list[tuple[str, dict[str, Any]]] = []

    def account(self) -> tuple[str, dict[str, Any]]:
        if not self._free:
            from keyturn.sandbox.testing import start_sandbox

            state_dir = self._tmp_dir / f"sandbox-{len(self._sandboxes)}"
            sandbox = start_sandbox(state_dir, service_accounts=ACCOUNTS_PER_SANDBOX)
            self._sandboxes.append(sandbox)
            accounts = sandbox.bootstrap.get("service_accounts") or [
                sandbox.bootstrap["service_account"]
            ]
            self._free = [(sandbox.base_url, account) for account in accounts]
        return self._free.pop()

    def close(self) -> None:
        for sandbox in self._sandboxes:
            sandbox.stop()


@pytest.fixture(scope="module")
def sandbox_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxPool]:
    pool = SandboxPool(tmp_path_factory.mktemp("provider-contract"))
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture(params=["fake", "sandbox"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "fake":
        old = SigningKey("b2xkLWtleS1jcmVk", KEYS.generate("ed25519").private_pem)
        fake, uuid = FakeKeyProvider.with_credential(old.credential_id, old.private_key_pem)
        yield Harness(fake, old, uuid)
        return
    from keyturn.adapters.dfns.provider import provider_for

    pool: SandboxPool = request.getfixturevalue("sandbox_pool")
    base_url, account = pool.account()
    provider = provider_for(base_url, account["token"], timeout=10.0)
    old = SigningKey(account["credential_id"], account["private_key_pem"].encode("ascii"))
    try:
        yield Harness(provider, old, account["credential_uuid"])
    finally:
        await provider.aclose()


def _new_key(algorithm: str = "ecdsa-p256") -> SigningKey:
    """A new key with a fresh base64url credId (used as-is by via="credentials")."""
    return SigningKey(secrets.token_urlsafe(18), KEYS.generate(algorithm).private_pem)


async def _register(
    h: Harness, via: str, algorithm: str = "ecdsa-p256"
) -> tuple[SigningKey, ProviderCredential]:
    """Register a new key signed by the old one; return the new signer (with the credential
    id the provider will accept) and the created credential."""
    new = _new_key(algorithm)
    created = await h.provider.register_key(signer=h.old, new_key=new, name="rotation-1", via=via)
    return SigningKey(created.credential_id, new.private_key_pem), created


async def _flags(h: Harness) -> dict[str, bool]:
    return {c.credential_uuid: c.is_active for c in await h.provider.list_credentials()}


async def _refused(awaitable: Any) -> ProviderError:
    """The call must fail with a non-retryable ProviderError whose text shows no key."""
    with pytest.raises(ProviderError) as info:
        await awaitable
    error = info.value
    assert error.retryable is False, str(error)
    assert "\n" not in str(error)
    return error


# ------------------------------------------------------------------------------------ tests


@pytest.mark.anyio
async def test_list_shows_the_existing_credential_active(harness: Harness) -> None:
    credentials = await harness.provider.list_credentials()
    [old] = [c for c in credentials if c.credential_uuid == harness.old_uuid]
    assert old.credential_id == harness.old.credential_id
    assert old.is_active
    assert old.kind == "Key"
    assert old.public_key.strip() == KEYS.public_pem(harness.old.private_key_pem).strip()
    await harness.provider.prove(signer=harness.old)


@pytest.mark.anyio
@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("algorithm", ["ed25519", "ecdsa-p256", "rsa-2048"])
async def test_register_new_key_signed_by_old_then_prove_with_new(
    harness: Harness, via: str, algorithm: str
) -> None:
    new = _new_key(algorithm)
    created = await harness.provider.register_key(
        signer=harness.old, new_key=new, name="rotation-1", via=via
    )
    if via == "credentials":
        assert created.credential_id == new.credential_id  # the client's credId, never cr-...
    assert created.credential_id and not created.credential_id.startswith("cr-")
    assert created.credential_uuid.startswith("cr-")
    assert created.credential_uuid != harness.old_uuid
    assert created.is_active
    assert created.name == "rotation-1"
    assert created.public_key.strip() == KEYS.public_pem(new.private_key_pem).strip()
    await harness.provider.prove(signer=SigningKey(created.credential_id, new.private_key_pem))
    listed = {c.credential_uuid: c for c in await harness.provider.list_credentials()}
    assert listed[created.credential_uuid].credential_id == created.credential_id
    assert listed[created.credential_uuid].is_active


@pytest.mark.anyio
@pytest.mark.parametrize("via", VIAS)
async def test_full_rotation_and_rollback_sequence(harness: Harness, via: str) -> None:
    h = harness
    new, created = await _register(h, via)
    await h.provider.prove(signer=new)

    # Deactivate the old credential, signed with the new key.
    await h.provider.deactivate(signer=new, credential_uuid=h.old_uuid)
    flags = await _flags(h)
    assert flags[h.old_uuid] is False
    assert flags[created.credential_uuid] is True

    # The old key can no longer sign: not retryable (trying again cannot help).
    await _refused(h.provider.prove(signer=h.old))
    # Deactivating an inactive credential is a no-op.
    await h.provider.deactivate(signer=new, credential_uuid=h.old_uuid)
    assert (await _flags(h))[h.old_uuid] is False

    # Rollback: reactivate the old one, signed with the new key; the old key signs again.
    await h.provider.activate(signer=new, credential_uuid=h.old_uuid)
    await h.provider.prove(signer=h.old)
    flags = await _flags(h)
    assert flags[h.old_uuid] is True
    assert flags[created.credential_uuid] is True

    # ... and the new one can be switched off by the old one.
    await h.provider.deactivate(signer=h.old, credential_uuid=created.credential_uuid)
    await _refused(h.provider.prove(signer=new))
    flags = await _flags(h)
    assert (flags[h.old_uuid], flags[created.credential_uuid]) == (True, False)


@pytest.mark.anyio
async def test_inactive_signer_cannot_register_activate_or_deactivate(harness: Harness) -> None:
    h = harness
    new, created = await _register(h, "credentials")
    await h.provider.deactivate(signer=new, credential_uuid=h.old_uuid)
    before = await _flags(h)

    await _refused(
        h.provider.register_key(signer=h.old, new_key=_new_key(), name="x", via="credentials")
    )
    await _refused(h.provider.activate(signer=h.old, credential_uuid=h.old_uuid))
    await _refused(h.provider.deactivate(signer=h.old, credential_uuid=created.credential_uuid))
    assert await _flags(h) == before  # nothing changed


@pytest.mark.anyio
async def test_signer_with_the_wrong_private_key_is_refused(harness: Harness) -> None:
    h = harness
    impostor = SigningKey(h.old.credential_id, KEYS.generate("ed25519").private_pem)
    error = await _refused(h.provider.prove(signer=impostor))
    assert scan_bytes(str(error), {"impostor": impostor.private_key_pem}) == []
    await _refused(
        h.provider.register_key(signer=impostor, new_key=_new_key(), name="x", via="credentials")
    )
    await _refused(h.provider.deactivate(signer=impostor, credential_uuid=h.old_uuid))
    assert (await _flags(h))[h.old_uuid] is True

    stranger = _new_key("ed25519")  # a credId the provider has never seen
    await _refused(h.provider.prove(signer=stranger))


@pytest.mark.anyio
async def test_unknown_credential_uuid_is_not_retryable(harness: Harness) -> None:
    error = await _refused(
        harness.provider.activate(signer=harness.old, credential_uuid="cr-doesnotexist00")
    )
    assert error.status == 404
    error = await _refused(
        harness.provider.deactivate(signer=harness.old, credential_uuid="cr-doesnotexist00")
    )
    assert error.status == 404


@pytest.mark.anyio
async def test_a_credid_cannot_be_registered_twice(harness: Harness) -> None:
    h = harness
    new = _new_key()
    await h.provider.register_key(signer=h.old, new_key=new, name="first", via="credentials")
    before = await _flags(h)
    error = await _refused(
        h.provider.register_key(signer=h.old, new_key=new, name="second", via="credentials")
    )
    assert error.status in (400, 409)
    assert await _flags(h) == before
