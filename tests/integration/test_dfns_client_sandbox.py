"""keyturn's Dfns client and DfnsKeyProvider against the sandbox, over real HTTP on loopback.

Uses the `sandbox` fixture (tests/integration/conftest.py): a fresh sandbox process per test.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from keyturn.adapters.dfns import (
    CredentialNotAllowed,
    DfnsApiError,
    DfnsClient,
    DfnsConnectionError,
    DfnsRateLimited,
    DfnsTimeout,
    KeySigner,
    new_credential_id,
    provider_for,
)
from keyturn.domain.errors import ProviderError
from keyturn.ports import SigningKey


def gen_pem(algorithm: str) -> bytes:
    key: Any
    if algorithm == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    elif algorithm == "ecdsa-p256":
        key = ec.generate_private_key(ec.SECP256R1())
    elif algorithm == "ecdsa-secp256k1":
        key = ec.generate_private_key(ec.SECP256K1())
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem: bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem


def principal(sandbox: Any, who: str) -> tuple[str, str, KeySigner, str]:
    """(base_url, token, signer, credential uuid) of a bootstrapped principal."""
    entry = sandbox.bootstrap[who]
    signer = KeySigner.from_pem(entry["credential_id"], entry["private_key_pem"])
    return sandbox.base_url, entry["token"], signer, entry["credential_uuid"]


# ------------------------------------------------------------------------------ credentials


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("who", "algorithm"),
    [
        ("service_account", "ed25519"),
        ("service_account", "ecdsa-secp256k1"),
        ("pat", "ecdsa-p256"),
        ("user", "rsa-2048"),
    ],
)
async def test_key_credential_rotation_round_trip(sandbox: Any, who: str, algorithm: str) -> None:
    base_url, token, old, old_uuid = principal(sandbox, who)
    new = KeySigner.from_pem(new_credential_id(), gen_pem(algorithm))
    async with DfnsClient(base_url, token, signer=old) as client:
        challenge = await client.create_credential_challenge("Key")
        assert challenge.kind == "Key" and challenge.challenge and challenge.challenge_identifier

        created = await client.create_key_credential(new, f"rotation-{who}")
        assert created.credential_id == new.credential_id
        assert created.credential_uuid.startswith("cr-")
        assert created.is_active and created.kind == "Key"
        assert created.name == f"rotation-{who}"

        listed = {c.credential_uuid: c for c in await client.list_credentials()}
        assert listed[old_uuid].is_active and listed[created.credential_uuid].is_active
        assert listed[old_uuid].credential_id == old.credential_id

        # switch to the new key; deactivate the old one with it
        with_new = client.with_signer(new)
        await with_new.deactivate_credential(old_uuid)
        listed = {c.credential_uuid: c for c in await client.list_credentials()}
        assert listed[old_uuid].is_active is False
        assert listed[created.credential_uuid].is_active is True

        # the old key can no longer sign
        with pytest.raises(ProviderError) as info:
            await client.activate_credential(old_uuid)
        assert isinstance(info.value, CredentialNotAllowed | DfnsApiError)
        assert info.value.retryable is False

        # rollback: reactivate the old key, signed by the new one
        await with_new.activate_credential(old_uuid)
        listed = {c.credential_uuid: c for c in await client.list_credentials()}
        assert listed[old_uuid].is_active is True
        # and the old key signs again
        await client.deactivate_credential(created.credential_uuid)
        listed = {c.credential_uuid: c for c in await client.list_credentials()}
        assert listed[created.credential_uuid].is_active is False


@pytest.mark.anyio
async def test_deactivate_is_idempotent_and_unknown_uuid_is_404(sandbox: Any) -> None:
    base_url, token, old, _ = principal(sandbox, "service_account")
    new = KeySigner.from_pem(new_credential_id(), gen_pem("ed25519"))
    async with DfnsClient(base_url, token, signer=old) as client:
        created = await client.create_key_credential(new, "twice")
        await client.deactivate_credential(created.credential_uuid)
        await client.deactivate_credential(created.credential_uuid)  # no-op, still success
        with pytest.raises(DfnsApiError) as info:
            await client.activate_credential("cr-does-not-exist")
    assert info.value.status == 404
    assert info.value.retryable is False
    assert "PUT /auth/credentials/activate" in str(info.value)


@pytest.mark.anyio
async def test_service_account_credential_endpoint(sandbox: Any) -> None:
    base_url, token, old, _ = principal(sandbox, "service_account")
    pem = gen_pem("ecdsa-p256")
    public_pem = KeySigner.from_pem("unused", pem).public_key_pem()
    async with DfnsClient(base_url, token, signer=old) as client:
        created = await client.create_service_account_credential(public_pem, "sa-endpoint")
        assert created.is_active and created.credential_id
        assert created.credential_id != old.credential_id
        listed = {c.credential_id: c for c in await client.list_credentials()}
        assert listed[created.credential_id].public_key.strip() == public_pem.strip()
        # the provider-chosen credential id signs with the new key
        new = KeySigner.from_pem(created.credential_id, pem)
        token_value = await client.with_signer(new).sign_user_action(
            "POST", "/auth/credentials/init", b'{"kind":"Key"}'
        )
        assert token_value


@pytest.mark.anyio
async def test_credential_code_flow(sandbox: Any) -> None:
    base_url, token, old, _ = principal(sandbox, "user")
    new = KeySigner.from_pem(new_credential_id(), gen_pem("ed25519"))
    async with DfnsClient(base_url, token, signer=old) as client:
        code = await client.create_credential_code(datetime.now(UTC) + timedelta(seconds=50))
        created = await client.create_credential_with_code(code, new, "via-code")
        assert created.credential_id == new.credential_id and created.is_active
        ids = {c.credential_id for c in await client.list_credentials()}
        assert new.credential_id in ids


# --------------------------------------------------------------------------------- webhooks


class _Receiver(BaseHTTPRequestHandler):
    received: list[tuple[dict[str, str], bytes]]

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", "0"))
        body = self.rfile.read(length)
        self.server.received.append((dict(self.headers.items()), body))  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    received: list[tuple[dict[str, str], bytes]] = []
    server.received = received  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.anyio
async def test_webhook_create_ping_delete(sandbox: Any, receiver: Any) -> None:
    url, received = receiver
    base_url, token, signer, _ = principal(sandbox, "service_account")
    async with DfnsClient(base_url, token, signer=signer) as client:
        hook, secret = await client.create_webhook(url, ["*"], description="keyturn rot-1")
        assert hook.id.startswith("wh-") and hook.url == url and hook.enabled
        assert secret.reveal().startswith("whs-")
        assert secret.reveal() not in repr((hook, secret))

        assert [w.id for w in await client.list_webhooks()] == [hook.id]
        assert await client.get_webhook(hook.id) == hook

        ping = await client.ping_webhook(hook.id)
        assert ping.status == "200" and ping.ok, ping
        # ping is synchronous: its "200" is our receiver's answer, so the delivery is recorded
        assert received, "the receiver got no delivery"
        headers, body = received[-1]
        signature = {k.lower(): v for k, v in headers.items()}["x-dfns-webhook-signature"]
        expected = hmac.new(secret.reveal().encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(signature, f"sha256={expected}")
        event = json.loads(body)
        assert event["id"].startswith("whe-")

        page = await client.list_webhook_events(hook.id)
        assert any(e.id == event["id"] for e in page.items)
        got = await client.get_webhook_event(hook.id, event["id"])
        assert got.id == event["id"]

        updated = await client.update_webhook(hook.id, status="Disabled", description="old")
        assert updated.status == "Disabled" and updated.description == "old"

        await client.delete_webhook(hook.id)
        with pytest.raises(DfnsApiError) as info:
            await client.get_webhook(hook.id)
        assert info.value.status == 404 and info.value.retryable is False
        assert await client.list_webhooks() == []


@pytest.mark.anyio
async def test_webhook_listing_follows_pages_and_limit_is_a_clear_error(sandbox: Any) -> None:
    base_url, token, signer, _ = principal(sandbox, "service_account")
    async with DfnsClient(base_url, token, signer=signer) as client:
        ids = [
            (await client.create_webhook(f"https://r.example/{i}", ["*"], status="Disabled"))[0].id
            for i in range(5)
        ]
        assert sorted(w.id for w in await client.list_webhooks()) == sorted(ids)
        with pytest.raises(DfnsApiError) as info:
            await client.create_webhook("https://r.example/6", ["*"], status="Disabled")
    assert info.value.status == 400 and info.value.retryable is False


# --------------------------------------------------------------------------------- provider


@pytest.mark.anyio
async def test_provider_register_prove_deactivate_reactivate(sandbox: Any) -> None:
    entry = sandbox.bootstrap["service_account"]
    old = SigningKey(entry["credential_id"], entry["private_key_pem"].encode())
    provider = provider_for(sandbox.base_url, entry["token"])
    try:
        new_pem = gen_pem("ed25519")
        created = await provider.register_key(
            signer=old,
            new_key=SigningKey(new_credential_id(), new_pem),
            name="rot-provider",
            via="credentials",
        )
        new = SigningKey(created.credential_id, new_pem)
        await provider.prove(signer=new)
        await provider.deactivate(signer=new, credential_uuid=entry["credential_uuid"])
        with pytest.raises(ProviderError) as info:
            await provider.prove(signer=old)
        assert info.value.retryable is False
        flags = {c.credential_uuid: c.is_active for c in await provider.list_credentials()}
        assert flags[entry["credential_uuid"]] is False
        assert flags[created.credential_uuid] is True
        await provider.activate(signer=new, credential_uuid=entry["credential_uuid"])
        await provider.prove(signer=old)
        flags = {c.credential_uuid: c.is_active for c in await provider.list_credentials()}
        assert flags[entry["credential_uuid"]] is True
    finally:
        await provider.aclose()


@pytest.mark.anyio
async def test_provider_service_account_endpoint(sandbox: Any) -> None:
    entry = sandbox.bootstrap["service_account"]
    old = SigningKey(entry["credential_id"], entry["private_key_pem"].encode())
    provider = provider_for(sandbox.base_url, entry["token"])
    try:
        new_pem = gen_pem("ecdsa-p256")
        created = await provider.register_key(
            signer=old,
            new_key=SigningKey("chosen-by-provider", new_pem),
            name="rot-sa",
            via="service_account_endpoint",
        )
        await provider.prove(signer=SigningKey(created.credential_id, new_pem))
    finally:
        await provider.aclose()


# ----------------------------------------------------------------------- faults, real network


@pytest.mark.anyio
async def test_real_timeout_and_connection_errors(sandbox: Any) -> None:
    base_url, token, signer, _ = principal(sandbox, "service_account")
    sandbox.set_faults(hang_rate=1.0, hang_seconds=3, paths=["GET /auth/credentials"])
    async with DfnsClient(base_url, token, signer=signer, timeout=0.5) as client:
        with pytest.raises(DfnsTimeout) as info:
            await client.list_credentials()
    assert info.value.retryable is True and info.value.outcome_unknown is False
    assert info.value.phase == "read"
    # nothing listens on a closed port: connection refused, nothing applied
    async with DfnsClient("http://127.0.0.1:9", token, signer=signer, timeout=2) as client:
        with pytest.raises(DfnsConnectionError) as conn:
            await client.list_credentials()
    assert conn.value.retryable is True and conn.value.outcome_unknown is False


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["500", "drop"])
async def test_apply_then_fail_is_outcome_unknown(sandbox: Any, mode: str) -> None:
    base_url, token, signer, _ = principal(sandbox, "service_account")
    sandbox.set_faults(
        apply_then_fail_rate=1.0, apply_then_fail_mode=mode, paths=["POST /auth/credentials"]
    )
    new = KeySigner.from_pem(new_credential_id(), gen_pem("ed25519"))
    async with DfnsClient(base_url, token, signer=signer) as client:
        with pytest.raises(ProviderError) as info:
            await client.create_key_credential(new, "applied-then-failed")
        err = info.value
        assert isinstance(err, DfnsApiError if mode == "500" else DfnsConnectionError)
        assert err.retryable is True and err.outcome_unknown is True
        # reconcile: the credential does exist
        ids = {c.credential_id for c in await client.list_credentials()}
        assert new.credential_id in ids


@pytest.mark.anyio
async def test_rate_limit_fault_is_retryable(sandbox: Any) -> None:
    base_url, token, signer, uuid = principal(sandbox, "service_account")
    sandbox.set_faults(rate_429=1.0, paths=["PUT /auth/credentials/activate"])
    async with DfnsClient(base_url, token, signer=signer) as client:
        with pytest.raises(DfnsRateLimited) as info:
            await client.activate_credential(uuid)
    assert info.value.retryable is True and info.value.outcome_unknown is False
