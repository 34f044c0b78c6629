"""DfnsClient and DfnsKeyProvider against an in-process fake Dfns (httpx.MockTransport).

The fake verifies what a real server verifies: the bearer token, the user-action signature with
the credential's public key, the challenge, and that the target request carries EXACTLY the bytes
that were signed (stricter than Dfns, which compares parsed JSON).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyturn.adapters.dfns import (
    CredentialNotAllowed,
    DfnsApiError,
    DfnsBadResponse,
    DfnsClient,
    DfnsConnectionError,
    DfnsKeyProvider,
    DfnsRateLimited,
    DfnsTimeout,
    InvalidRequest,
    KeySigner,
    MissingSigner,
    PolicyPending,
    WebhookSecret,
    new_credential_id,
    provider_for,
)
from keyturn.adapters.dfns.signing import b64url_decode
from keyturn.domain.errors import ConfigError, ProviderError
from keyturn.ports import KeyProvider, SigningKey

BASE = "https://dfns.test"
TOKEN = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJzYS0xIn0.c2VjcmV0LXRva2VuLXZhbHVl"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def gen_pem(algorithm: str = "ed25519") -> bytes:
    key: Any
    if algorithm == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    elif algorithm == "ecdsa-p256":
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem: bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem


def verify(public_pem: str, signature: bytes, data: bytes) -> bool:
    public = serialization.load_pem_public_key(public_pem.encode())
    try:
        if isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(signature, data)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public, rsa.RSAPublicKey):
            public.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        else:
            return False
    except Exception:
        return False
    return True


# ----------------------------------------------------------------------------------- the fake


@dataclass
class FakeCredential:
    credential_id: str
    uuid: str
    public_key: str
    name: str
    active: bool = True

    def api(self) -> dict[str, Any]:
        return {
            "credentialId": self.credential_id,
            "credentialUuid": self.uuid,
            "dateCreated": "2026-01-01T00:00:00.000Z",
            "isActive": self.active,
            "kind": "Key",
            "name": self.name,
            "publicKey": self.public_key,
            "relyingPartyId": "dfns.test",
            "origin": "https://app.dfns.io",
        }


@dataclass
class FakeDfns:
    """A strict in-memory Dfns for one principal."""

    token: str = TOKEN
    credentials: dict[str, FakeCredential] = field(default_factory=dict)
    webhooks: dict[str, dict[str, Any]] = field(default_factory=dict)
    challenges: dict[str, dict[str, Any]] = field(default_factory=dict)
    user_actions: dict[str, dict[str, Any]] = field(default_factory=dict)
    credential_challenges: dict[str, str] = field(default_factory=dict)
    codes: set[str] = field(default_factory=set)
    log: list[httpx.Request] = field(default_factory=list)
    signed: list[tuple[str, str, bytes, str]] = field(default_factory=list)
    #: (method, path) -> a response or exception to answer instead (once, or always).
    overrides: dict[tuple[str, str], Callable[[httpx.Request], httpx.Response]] = field(
        default_factory=dict
    )
    page_size: int = 2
    _ids: Any = field(default_factory=itertools.count)

    def seed(self, name: str = "old", algorithm: str = "ed25519") -> tuple[str, bytes, str]:
        pem = gen_pem(algorithm)
        cred_id = new_credential_id()
        uuid = f"cr-{next(self._ids)}"
        public = KeySigner.from_pem(cred_id, pem).public_key_pem()
        self.credentials[cred_id] = FakeCredential(cred_id, uuid, public, name)
        return cred_id, pem, uuid

    def by_uuid(self, uuid: str) -> FakeCredential | None:
        return next((c for c in self.credentials.values() if c.uuid == uuid), None)

    # helpers
    @staticmethod
    def error(status: int, message: str, code: str = "E") -> httpx.Response:
        return httpx.Response(
            status,
            json={"error": {"id": "err-1", "status": status, "code": code, "message": message}},
        )

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.log.append(request)
        method, path = request.method, request.url.path
        override = self.overrides.get((method, path))
        if override is not None:
            return override(request)
        unauthenticated = path in ("/auth/credentials/code/init", "/auth/credentials/code/verify")
        if not unauthenticated and request.headers.get("authorization") != f"Bearer {self.token}":
            return self.error(401, "missing or invalid bearer token")
        body = json.loads(request.content) if request.content else None
        if path == "/auth/action/init":
            return self.action_init(body)
        if path == "/auth/action":
            return self.action(body)
        signed_routes = {
            ("POST", "/auth/credentials"),
            ("POST", "/auth/service-accounts/credentials"),
            ("PUT", "/auth/credentials/activate"),
            ("PUT", "/auth/credentials/deactivate"),
            ("POST", "/auth/credentials/code"),
            ("POST", "/webhooks"),
        }
        if (
            (method, path) in signed_routes
            or method == "DELETE"
            or (method in ("PUT", "POST") and path.startswith("/webhooks/"))
        ):
            problem = self.check_user_action(request)
            if problem is not None:
                return problem
        return self.route(method, path, body, request)

    def action_init(self, body: dict[str, Any]) -> httpx.Response:
        challenge = secrets.token_urlsafe(16)
        identifier = f"ch-{next(self._ids)}"
        self.challenges[identifier] = {"challenge": challenge, **body}
        return httpx.Response(
            200,
            json={
                "challenge": challenge,
                "challengeIdentifier": identifier,
                "supportedCredentialKinds": [
                    {"kind": "Key", "factor": "first", "requiresSecondFactor": False}
                ],
                "rp": {"id": "dfns.test", "name": "Fake"},
                "userVerification": "required",
                "attestation": "direct",
                "externalAuthenticationUrl": "",
                "allowCredentials": {
                    "key": [
                        {"type": "public-key", "id": c.credential_id}
                        for c in self.credentials.values()
                        if c.active
                    ],
                    "passwordProtectedKey": [],
                    "webauthn": [],
                },
            },
        )

    def action(self, body: dict[str, Any]) -> httpx.Response:
        pending = self.challenges.pop(body["challengeIdentifier"], None)
        if pending is None:
            return self.error(400, "unknown challenge")
        assertion = body["firstFactor"]["credentialAssertion"]
        cred = self.credentials.get(assertion["credId"])
        client_data = b64url_decode(assertion["clientData"])
        parsed = json.loads(client_data)
        if (
            cred is None
            or not cred.active
            or body["firstFactor"]["kind"] != "Key"
            or parsed.get("type") != "key.get"
            or parsed.get("challenge") != pending["challenge"]
            or not verify(cred.public_key, b64url_decode(assertion["signature"]), client_data)
        ):
            return self.error(401, "invalid signature")
        token = f"ua-{secrets.token_urlsafe(12)}"
        self.user_actions[token] = pending
        return httpx.Response(200, json={"userAction": token})

    def check_user_action(self, request: httpx.Request) -> httpx.Response | None:
        token = request.headers.get("x-dfns-useraction")
        if not token:
            return self.error(403, "missing user action")
        bound = self.user_actions.pop(token, None)
        if bound is None:
            return self.error(400, "user action has already been used")
        sent = request.content.decode()
        if (
            bound["userActionHttpMethod"] != request.method
            or bound["userActionHttpPath"] != request.url.path
            or bound["userActionPayload"] != sent  # byte-exact: stricter than Dfns
        ):
            return self.error(403, "user action does not match the request")
        self.signed.append((request.method, request.url.path, request.content, token))
        return None

    def route(self, method: str, path: str, body: Any, request: httpx.Request) -> httpx.Response:
        if (method, path) in (
            ("POST", "/auth/credentials/init"),
            ("POST", "/auth/credentials/code/init"),
        ):
            if path.endswith("code/init"):
                if body["code"] not in self.codes:
                    return self.error(400, "invalid code")
                self.codes.discard(body["code"])
            identifier = f"cc-{next(self._ids)}"
            challenge = secrets.token_urlsafe(16)
            self.credential_challenges[identifier] = challenge
            return httpx.Response(
                200,
                json={
                    "kind": body.get("kind") or body.get("credentialKind"),
                    "challengeIdentifier": identifier,
                    "challenge": challenge,
                    "rp": {"id": "dfns.test", "name": "Fake"},
                    "user": {"id": "us-1", "name": "sa", "displayName": "sa"},
                },
            )
        if (method, path) in (
            ("POST", "/auth/credentials"),
            ("POST", "/auth/credentials/code/verify"),
        ):
            challenge = self.credential_challenges.pop(body["challengeIdentifier"], None)
            if challenge is None:
                return self.error(400, "unknown challenge")
            info = body["credentialInfo"]
            client_data = b64url_decode(info["clientData"])
            parsed = json.loads(client_data)
            attestation = json.loads(b64url_decode(info["attestationData"]))
            fingerprint = json.dumps(
                {
                    "clientDataHash": hashlib.sha256(client_data).hexdigest(),
                    "publicKey": attestation["publicKey"],
                },
                separators=(",", ":"),
            ).encode()
            if (
                parsed["type"] != "key.create"
                or parsed["challenge"] != challenge
                or not verify(
                    attestation["publicKey"], bytes.fromhex(attestation["signature"]), fingerprint
                )
            ):
                return self.error(400, "invalid attestation")
            if info["credId"] in self.credentials:
                return self.error(409, "credential exists")
            cred = FakeCredential(
                info["credId"],
                f"cr-{next(self._ids)}",
                attestation["publicKey"],
                body["credentialName"],
            )
            self.credentials[cred.credential_id] = cred
            return httpx.Response(200, json=cred.api())
        if (method, path) == ("POST", "/auth/service-accounts/credentials"):
            cred = FakeCredential(
                new_credential_id(),
                f"cr-{next(self._ids)}",
                body["publicKey"],
                body.get("name", ""),
            )
            self.credentials[cred.credential_id] = cred
            return httpx.Response(200, json=cred.api())
        if (method, path) == ("GET", "/auth/credentials"):
            return httpx.Response(200, json={"items": [c.api() for c in self.credentials.values()]})
        if path in ("/auth/credentials/activate", "/auth/credentials/deactivate"):
            cred = self.by_uuid(body["credentialUuid"])
            if cred is None:
                return self.error(404, "credential not found")
            cred.active = path.endswith("/activate")
            return httpx.Response(200, json={"message": "success"})
        if method == "DELETE" and path.startswith("/auth/credentials/"):
            cred = self.by_uuid(path.rsplit("/", 1)[1])
            if cred is None:
                return self.error(404, "credential not found")
            del self.credentials[cred.credential_id]
            return httpx.Response(200, json={})
        if (method, path) == ("POST", "/auth/credentials/code"):
            code = f"A7U-{next(self._ids):03d}-9PT"
            self.codes.add(code)
            return httpx.Response(200, json={"code": code, "expiration": body["expiration"]})
        if (method, path) == ("POST", "/webhooks"):
            wid = f"wh-{next(self._ids)}"
            hook = {
                "id": wid,
                "url": body["url"],
                "events": body["events"],
                "status": body.get("status", "Enabled"),
                "description": body.get("description"),
                "dateCreated": "2026-01-01T00:00:00Z",
                "dateUpdated": "2026-01-01T00:00:00Z",
            }
            self.webhooks[wid] = hook
            return httpx.Response(200, json={**hook, "secret": f"whs-{secrets.token_hex(16)}"})
        if (method, path) == ("GET", "/webhooks"):
            ids = sorted(self.webhooks)
            start = int(request.url.params.get("paginationToken", "0"))
            page = ids[start : start + self.page_size]
            out: dict[str, Any] = {"items": [self.webhooks[i] for i in page]}
            if start + self.page_size < len(ids):
                out["nextPageToken"] = str(start + self.page_size)
            return httpx.Response(200, json=out)
        if path.startswith("/webhooks/"):
            parts = path.split("/")[2:]
            hook = self.webhooks.get(parts[0])
            if hook is None:
                return self.error(404, "webhook not found")
            if len(parts) == 1 and method == "GET":
                return httpx.Response(200, json=hook)
            if len(parts) == 1 and method == "PUT":
                hook.update(body)
                return httpx.Response(200, json=hook)
            if len(parts) == 1 and method == "DELETE":
                del self.webhooks[parts[0]]
                return httpx.Response(200, json={"deleted": True})
            if parts[1:] == ["ping"]:
                return httpx.Response(200, json={"status": "200"})
            if parts[1:] == ["events"]:
                return httpx.Response(
                    200,
                    json={
                        "items": [
                            {
                                "id": "whe-1",
                                "kind": "key.created",
                                "date": "2026-01-01T00:00:00Z",
                                "data": {"a": 1},
                                "status": "200",
                                "timestampSent": 1767225600,
                                "deliveryAttempt": 1,
                            }
                        ],
                        "nextPageToken": "p2",
                    },
                )
            if parts[1] == "events" and len(parts) == 3:
                return httpx.Response(
                    200, json={"id": parts[2], "kind": "ping", "retryOf": "whe-0"}
                )
        return self.error(404, f"no route {method} {path}")


@pytest.fixture
def fake() -> FakeDfns:
    return FakeDfns()


def client_for(fake: FakeDfns, signer: KeySigner | None = None, **kw: Any) -> DfnsClient:
    return DfnsClient(BASE, fake.token, signer=signer, transport=fake.transport(), **kw)


@pytest.fixture
def seeded(fake: FakeDfns) -> tuple[FakeDfns, KeySigner, str, bytes]:
    cred_id, pem, uuid = fake.seed()
    return fake, KeySigner.from_pem(cred_id, pem), uuid, pem


# ------------------------------------------------------------------------- user-action flow


@pytest.mark.anyio
async def test_signed_call_sends_exactly_the_signed_bytes(seeded: Any) -> None:
    fake, signer, uuid, _ = seeded
    async with client_for(fake, signer) as client:
        await client.deactivate_credential(uuid)
    # init, action, target
    assert [r.url.path for r in fake.log] == [
        "/auth/action/init",
        "/auth/action",
        "/auth/credentials/deactivate",
    ]
    init_body = json.loads(fake.log[0].content)
    target = fake.log[2]
    assert init_body["userActionPayload"].encode() == target.content
    assert init_body["userActionHttpMethod"] == "PUT"
    assert init_body["userActionHttpPath"] == "/auth/credentials/deactivate"
    assert init_body["userActionServerKind"] == "Api"
    assert target.headers["content-type"] == "application/json"
    assert target.headers["x-dfns-useraction"].startswith("ua-")
    assert json.loads(target.content) == {"credentialUuid": uuid}
    assert fake.credentials[signer.credential_id].active is False


@pytest.mark.anyio
async def test_non_ascii_body_is_signed_and_sent_identically(seeded: Any) -> None:
    fake, signer, _, _ = seeded
    async with client_for(fake, signer) as client:
        hook, _secret = await client.create_webhook(
            "https://recv.example/hook", ["*"], description="rotation für ключ ✓"
        )
    assert hook.description == "rotation für ключ ✓"
    method, path, sent, _ = fake.signed[-1]
    assert (method, path) == ("POST", "/webhooks")
    init = json.loads(fake.log[-3].content)
    assert init["userActionPayload"].encode() == sent


@pytest.mark.anyio
async def test_delete_signs_empty_payload_and_sends_no_body(seeded: Any) -> None:
    fake, signer, _, _ = seeded
    other_id, _, other_uuid = fake.seed("other")
    async with client_for(fake, signer) as client:
        await client.delete_credential(other_uuid)
    init = json.loads(fake.log[-3].content)
    assert init["userActionPayload"] == ""
    assert init["userActionHttpMethod"] == "DELETE"
    assert init["userActionHttpPath"] == f"/auth/credentials/{other_uuid}"
    assert fake.log[-1].content == b""
    assert other_id not in fake.credentials


@pytest.mark.anyio
async def test_sign_user_action_returns_single_use_token(seeded: Any) -> None:
    fake, signer, uuid, _ = seeded
    body = json.dumps({"credentialUuid": uuid}, separators=(",", ":")).encode()
    async with client_for(fake, signer) as client:
        token = await client.sign_user_action("PUT", "/auth/credentials/deactivate", body)
    assert token in fake.user_actions
    assert fake.user_actions[token]["userActionPayload"] == body.decode()


@pytest.mark.anyio
async def test_signed_call_without_signer_is_refused_before_sending(fake: FakeDfns) -> None:
    async with client_for(fake) as client:
        with pytest.raises(MissingSigner, match="no signer") as info:
            await client.activate_credential("cr-1")
    assert info.value.retryable is False
    assert fake.log == []


@pytest.mark.anyio
async def test_inactive_signer_is_refused_locally_when_not_allowed(seeded: Any) -> None:
    fake, signer, uuid, _ = seeded
    fake.seed("second")  # another active credential, so allowCredentials.key is not empty
    fake.credentials[signer.credential_id].active = False
    async with client_for(fake, signer) as client:
        with pytest.raises(CredentialNotAllowed, match=signer.credential_id) as info:
            await client.activate_credential(uuid)
    assert info.value.retryable is False
    assert [r.url.path for r in fake.log] == ["/auth/action/init"]


@pytest.mark.anyio
async def test_server_refusal_of_signature_is_not_retryable(seeded: Any) -> None:
    fake, signer, uuid, _ = seeded
    wrong = KeySigner.from_pem(signer.credential_id, gen_pem())  # right id, wrong key
    async with client_for(fake, wrong) as client:
        with pytest.raises(DfnsApiError) as info:
            await client.deactivate_credential(uuid)
    assert info.value.status == 401
    assert info.value.retryable is False
    assert info.value.outcome_unknown is False
    assert "POST /auth/action" in str(info.value)
    assert fake.credentials[signer.credential_id].active is True


# ------------------------------------------------------------------------------ credentials


@pytest.mark.anyio
@pytest.mark.parametrize("algorithm", ["ed25519", "ecdsa-p256", "rsa-2048"])
async def test_create_key_credential_then_switch_signer(seeded: Any, algorithm: str) -> None:
    fake, old, old_uuid, _ = seeded
    new = KeySigner.from_pem(new_credential_id(), gen_pem(algorithm))
    async with client_for(fake, old) as client:
        challenge = await client.create_credential_challenge()
        assert challenge.kind == "Key" and challenge.challenge_identifier.startswith("cc-")
        created = await client.create_key_credential(new, "rot-1")
        assert created.credential_id == new.credential_id
        assert created.is_active and created.name == "rot-1"
        assert created.public_key == new.public_key_pem()
        # the create was signed by the OLD key
        init = json.loads(fake.log[-3].content)
        assert init["userActionHttpPath"] == "/auth/credentials"
        action = json.loads(fake.log[-2].content)
        assert action["firstFactor"]["credentialAssertion"]["credId"] == old.credential_id
        # switch to the new key, deactivate the old one with it
        switched = client.with_signer(new)
        assert switched.signer is new
        await switched.deactivate_credential(old_uuid)
        action = json.loads(fake.log[-2].content)
        assert action["firstFactor"]["credentialAssertion"]["credId"] == new.credential_id
        listed = {c.credential_uuid: c for c in await client.list_credentials()}
        assert listed[old_uuid].is_active is False
        assert listed[created.credential_uuid].is_active is True
        # reactivation (rollback) with the new key
        await switched.activate_credential(old_uuid)
        await switched.aclose()  # borrowed pool: no-op
        assert (await client.list_credentials())[0].is_active is True


@pytest.mark.anyio
async def test_service_account_endpoint(seeded: Any) -> None:
    fake, signer, _, _ = seeded
    new = KeySigner.from_pem("ignored", gen_pem("ecdsa-p256"))
    async with client_for(fake, signer) as client:
        created = await client.create_service_account_credential(new.public_key_pem(), "sa-rot")
    assert created.public_key == new.public_key_pem()
    assert created.credential_id != "ignored"
    assert fake.signed[-1][1] == "/auth/service-accounts/credentials"


@pytest.mark.anyio
async def test_credential_code_flow(seeded: Any) -> None:
    fake, signer, _, _ = seeded
    new = KeySigner.from_pem(new_credential_id(), gen_pem())
    async with client_for(fake, signer) as client:
        code = await client.create_credential_code(datetime.now(UTC) + timedelta(seconds=50))
        assert "A7U" not in repr(code)  # the code grants access: masked
        assert code.expiration is not None and code.expiration.endswith("Z")
        created = await client.create_credential_with_code(code, new, "by-code")
    assert created.credential_id == new.credential_id
    unauth = [r for r in fake.log if r.url.path.startswith("/auth/credentials/code/")]
    assert [r.url.path for r in unauth] == [
        "/auth/credentials/code/init",
        "/auth/credentials/code/verify",
    ]
    assert all("authorization" not in r.headers for r in unauth)
    assert all("x-dfns-useraction" not in r.headers for r in unauth)


@pytest.mark.anyio
async def test_credential_code_needs_aware_expiration(seeded: Any) -> None:
    fake, signer, _, _ = seeded
    async with client_for(fake, signer) as client:
        with pytest.raises(InvalidRequest, match="timezone-aware"):
            await client.create_credential_code(datetime(2030, 1, 1))
    assert fake.log == []


# -------------------------------------------------------------------------------- webhooks


@pytest.mark.anyio
async def test_webhook_lifecycle_and_secret_handling(seeded: Any) -> None:
    fake, signer, _, _ = seeded
    async with client_for(fake, signer) as client:
        created = [
            await client.create_webhook(f"https://r.example/{i}", ["*"], description=f"rot {i}")
            for i in range(5)
        ]
        hook, secret = created[0]
        assert isinstance(secret, WebhookSecret)
        assert secret.reveal().startswith("whs-")
        assert secret.reveal() not in repr(created[0])
        assert secret.reveal() not in str(secret)
        listed = await client.list_webhooks()  # 3 pages of 2
        assert sorted(w.id for w in listed) == sorted(w.id for w, _ in created)
        assert [
            r.url.params.get("paginationToken")
            for r in fake.log
            if r.url.path == "/webhooks" and r.method == "GET"
        ] == [None, "2", "4"]
        got = await client.get_webhook(hook.id)
        assert got == hook and got.enabled
        updated = await client.update_webhook(hook.id, status="Disabled")
        assert updated.status == "Disabled" and not updated.enabled
        assert json.loads(fake.signed[-1][2]) == {"status": "Disabled"}
        ping = await client.ping_webhook(hook.id)
        assert ping.ok and ping.status == "200"
        page = await client.list_webhook_events(hook.id, limit=10)
        assert page.items[0].id == "whe-1" and page.items[0].delivery_attempt == 1
        assert page.next_page_token == "p2"
        event = await client.get_webhook_event(hook.id, "whe-9")
        assert event.id == "whe-9" and event.retry_of == "whe-0"
        await client.delete_webhook(hook.id)
        assert hook.id not in fake.webhooks
        with pytest.raises(InvalidRequest, match="at least one"):
            await client.update_webhook(hook.id)
        with pytest.raises(InvalidRequest, match="list of event kinds"):
            await client.create_webhook("https://r.example", "*")


@pytest.mark.anyio
async def test_webhook_created_without_secret_is_a_bad_response(seeded: Any) -> None:
    fake, signer, _, _ = seeded
    fake.overrides[("POST", "/webhooks")] = lambda r: httpx.Response(
        200, json={"id": "wh-x", "url": "u", "events": ["*"], "status": "Enabled"}
    )
    async with client_for(fake, signer) as client:
        with pytest.raises(DfnsBadResponse, match="wh-x created without its secret") as info:
            await client.create_webhook("https://r.example", ["*"])
    assert info.value.outcome_unknown is True
    assert info.value.retryable is False


# --------------------------------------------------------------------------- error mapping


def respond(status: int, message: str = "boom") -> Callable[[httpx.Request], httpx.Response]:
    return lambda _request: FakeDfns.error(status, message, code=f"C{status}")


@pytest.mark.anyio
@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422])
async def test_client_errors_are_not_retryable(seeded: Any, status: int) -> None:
    fake, signer, uuid, _ = seeded
    fake.overrides[("PUT", "/auth/credentials/activate")] = respond(status, "nope")
    async with client_for(fake, signer) as client:
        with pytest.raises(DfnsApiError) as info:
            await client.activate_credential(uuid)
    err = info.value
    assert type(err) is DfnsApiError
    assert isinstance(err, ProviderError)
    assert (err.status, err.code, err.error_id, err.server_message) == (
        status,
        f"C{status}",
        "err-1",
        "nope",
    )
    assert err.retryable is False and err.outcome_unknown is False
    text = str(err)
    assert text.startswith(f"Dfns PUT /auth/credentials/activate failed with {status}: nope")
    assert "\n" not in text


@pytest.mark.anyio
async def test_429_is_rate_limited_and_retryable(seeded: Any) -> None:
    fake, signer, uuid, _ = seeded
    fake.overrides[("PUT", "/auth/credentials/activate")] = respond(429, "slow down")
    async with client_for(fake, signer) as client:
        with pytest.raises(DfnsRateLimited) as info:
            await client.activate_credential(uuid)
    assert info.value.status == 429
    assert info.value.retryable is True and info.value.outcome_unknown is False
    assert "rate limited" in str(info.value)


@pytest.mark.anyio
@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_5xx_is_retryable_and_unknown_for_state_changes(seeded: Any, status: int) -> None:
    fake, signer, uuid, _ = seeded
    fake.overrides[("PUT", "/auth/credentials/activate")] = respond(status)
    fake.overrides[("GET", "/auth/credentials")] = lambda r: httpx.Response(
        status, text="<html>bad gateway</html>"
    )
    async with client_for(fake, signer) as client:
        with pytest.raises(DfnsApiError) as info:
            await client.activate_credential(uuid)
        assert info.value.retryable is True and info.value.outcome_unknown is True
        assert "reconcile" in str(info.value)
        with pytest.raises(DfnsApiError) as read_info:
            await client.list_credentials()
    assert read_info.value.retryable is True and read_info.value.outcome_unknown is False
    assert read_info.value.status == status


@pytest.mark.anyio
async def test_202_is_policy_pending_never_success(seeded: Any) -> None:
    fake, signer, uuid, _ = seeded
    fake.overrides[("PUT", "/auth/credentials/deactivate")] = lambda r: httpx.Response(
        202, json={"id": "ap-42", "status": "Pending", "activity": {"kind": "Credential"}}
    )
    async with client_for(fake, signer) as client:
        with pytest.raises(PolicyPending) as info:
            await client.deactivate_credential(uuid)
    err = info.value
    assert err.approval_id == "ap-42" and err.approval_status == "Pending"
    assert err.approval["activity"] == {"kind": "Credential"}
    assert err.status == 202 and err.retryable is True and err.outcome_unknown is True
    assert "waiting for policy approval ap-42" in str(err)
    assert fake.credentials[signer.credential_id].active is True


@pytest.mark.anyio
async def test_202_without_body_is_still_pending(seeded: Any) -> None:
    fake, signer, _, _ = seeded
    fake.overrides[("POST", "/webhooks")] = lambda r: httpx.Response(202)
    async with client_for(fake, signer) as client:
        with pytest.raises(PolicyPending) as info:
            await client.create_webhook("https://r.example", ["*"])
    assert info.value.approval_id is None


def raising(exc: Exception) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    return handler


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("exc", "phase", "unknown"),
    [
        (httpx.ReadTimeout("timed out"), "read", True),
        (httpx.WriteTimeout("timed out"), "write", True),
        (httpx.ConnectTimeout("timed out"), "connect", False),
        (httpx.PoolTimeout("timed out"), "pool", False),
    ],
)
async def test_timeouts(seeded: Any, exc: Exception, phase: str, unknown: bool) -> None:
    fake, signer, uuid, _ = seeded
    fake.overrides[("PUT", "/auth/credentials/activate")] = raising(exc)
    fake.overrides[("GET", "/auth/credentials")] = raising(exc)
    async with client_for(fake, signer, timeout=2.5) as client:
        with pytest.raises(DfnsTimeout) as info:
            await client.activate_credential(uuid)
        assert info.value.retryable is True
        assert info.value.outcome_unknown is unknown
        assert info.value.phase == phase
        assert f"({phase} timeout after 2.5 s)" in str(info.value)
        with pytest.raises(DfnsTimeout) as read_info:
            await client.list_credentials()
    assert read_info.value.retryable is True and read_info.value.outcome_unknown is False


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("exc", "unknown"),
    [
        (httpx.ConnectError("[Errno 111] Connection refused"), False),
        (httpx.RemoteProtocolError("Server disconnected without sending a response."), True),
        (httpx.ReadError("connection reset"), True),
    ],
)
async def test_connection_errors(seeded: Any, exc: Exception, unknown: bool) -> None:
    fake, signer, uuid, _ = seeded
    fake.overrides[("PUT", "/auth/credentials/activate")] = raising(exc)
    fake.overrides[("GET", "/auth/credentials")] = raising(exc)
    async with client_for(fake, signer) as client:
        with pytest.raises(DfnsConnectionError) as info:
            await client.activate_credential(uuid)
        assert info.value.retryable is True
        assert info.value.outcome_unknown is unknown
        assert str(exc) in str(info.value)
        with pytest.raises(DfnsConnectionError) as read_info:
            await client.list_credentials()
    assert read_info.value.outcome_unknown is False


@pytest.mark.anyio
async def test_failure_while_signing_leaves_no_unknown_outcome(seeded: Any) -> None:
    fake, signer, uuid, _ = seeded
    fake.overrides[("POST", "/auth/action/init")] = respond(503)
    async with client_for(fake, signer) as client:
        with pytest.raises(DfnsApiError) as info:
            await client.activate_credential(uuid)
    assert info.value.retryable is True
    assert info.value.outcome_unknown is False  # the target request was never sent
    assert info.value.path == "/auth/action/init"


@pytest.mark.anyio
async def test_bad_success_bodies(seeded: Any) -> None:
    fake, signer, _, _ = seeded
    fake.overrides[("GET", "/auth/credentials")] = lambda r: httpx.Response(200, text="<html>")
    fake.overrides[("POST", "/auth/credentials/init")] = lambda r: httpx.Response(
        200, json={"kind": "Key"}
    )
    async with client_for(fake, signer) as client:
        with pytest.raises(DfnsBadResponse, match="not JSON"):
            await client.list_credentials()
        with pytest.raises(DfnsBadResponse, match="'challengeIdentifier'"):
            await client.create_credential_challenge()


@pytest.mark.anyio
async def test_older_error_envelope_and_empty_error_body(seeded: Any) -> None:
    fake, signer, _, _ = seeded
    fake.overrides[("GET", "/webhooks/wh-1")] = lambda r: httpx.Response(
        404, json={"error": {"message": "Webhook not found"}}
    )
    fake.overrides[("GET", "/webhooks/wh-2")] = lambda r: httpx.Response(403)
    async with client_for(fake, signer) as client:
        with pytest.raises(DfnsApiError, match="404: Webhook not found; not found") as info:
            await client.get_webhook("wh-1")
        assert info.value.code is None and info.value.error_id is None
        with pytest.raises(DfnsApiError, match="403: Forbidden") as info2:
            await client.get_webhook("wh-2")
        assert info2.value.retryable is False


@pytest.mark.anyio
async def test_ids_are_percent_encoded_and_validated(seeded: Any) -> None:
    fake, signer, _, _ = seeded
    async with client_for(fake, signer) as client:
        with pytest.raises(DfnsApiError):
            await client.get_webhook("a/b?c")
        assert fake.log[-1].url.raw_path == b"/webhooks/a%2Fb%3Fc"
        with pytest.raises(InvalidRequest, match="webhook id is empty"):
            await client.get_webhook("")


# ---------------------------------------------------------------------------- no secrets out


@pytest.mark.anyio
async def test_no_token_or_key_in_errors_reprs_or_logs(
    seeded: Any, caplog: pytest.LogCaptureFixture
) -> None:
    fake, signer, uuid, pem = seeded
    caplog.set_level(logging.DEBUG)
    # a server that echoes the caller's token into its error message
    fake.overrides[("PUT", "/auth/credentials/activate")] = respond(
        400, f"bad request from Bearer {TOKEN}\nsecond line"
    )
    user_action_tokens: list[str] = []
    errors: list[BaseException] = []
    async with client_for(fake, signer) as client:
        hook, secret = await client.create_webhook("https://r.example", ["*"])
        user_action_tokens.extend(t for *_, t in fake.signed)
        with pytest.raises(DfnsApiError) as info:
            await client.activate_credential(uuid)
        errors.append(info.value)
        fake.overrides[("GET", "/auth/credentials")] = raising(
            httpx.ConnectError(f"refused {TOKEN}")
        )
        with pytest.raises(DfnsConnectionError) as info2:
            await client.list_credentials()
        errors.append(info2.value)
        texts = [repr(client), str(client), repr(signer), repr(hook), repr(secret)]
    texts += [str(e) for e in errors] + [repr(e) for e in errors]
    texts.append(caplog.text)
    assert "\n" not in str(errors[0]) and "***" in str(errors[0])
    forbidden = [TOKEN, secret.reveal(), pem.decode(), *user_action_tokens]
    forbidden += [line for line in pem.decode().splitlines() if "-----" not in line]
    for text in texts:
        for value in forbidden:
            assert value not in text
    assert "dfns POST /webhooks -> 200" in caplog.text  # the calls were logged, minus secrets


def test_bad_configuration_is_one_clear_line_without_the_token() -> None:
    with pytest.raises(ConfigError, match="without a path"):
        DfnsClient("https://api.dfns.io/v1", TOKEN)
    with pytest.raises(ConfigError, match="must be http"):
        DfnsClient("ftp://api.dfns.io", TOKEN)
    with pytest.raises(ConfigError, match="must be http"):
        DfnsClient("api.dfns.io", TOKEN)
    bad_token = "abc\r\nX-Injected: 1"
    with pytest.raises(ConfigError, match="value is not shown") as info:
        DfnsClient(BASE, bad_token)
    assert "Injected" not in str(info.value)
    with pytest.raises(ConfigError):
        DfnsClient(BASE, "")
    with pytest.raises(ConfigError, match="timeout must be positive"):
        DfnsClient(BASE, TOKEN, timeout=0)


@pytest.mark.anyio
async def test_client_sets_explicit_timeouts() -> None:
    client = DfnsClient(BASE, TOKEN, timeout=3.0)
    timeout = client._http.timeout
    assert (timeout.connect, timeout.read, timeout.write, timeout.pool) == (3.0, 3.0, 3.0, 3.0)
    await client.aclose()
    assert client._http.is_closed


# --------------------------------------------------------------------------------- provider


def signing_key(signer_id: str, pem: bytes) -> SigningKey:
    return SigningKey(credential_id=signer_id, private_key_pem=pem)


@pytest.mark.anyio
@pytest.mark.parametrize("via", ["credentials", "service_account_endpoint"])
async def test_provider_full_rotation_sequence(fake: FakeDfns, via: str) -> None:
    old_id, old_pem, old_uuid = fake.seed("old", "ecdsa-p256")
    old = signing_key(old_id, old_pem)
    provider: KeyProvider = provider_for(BASE, TOKEN, transport=fake.transport())
    new_pem = gen_pem()
    created = await provider.register_key(
        signer=old, new_key=signing_key(new_credential_id(), new_pem), name="rot-7", via=via
    )
    assert created.is_active and created.name == "rot-7"
    new = signing_key(created.credential_id, new_pem)
    await provider.prove(signer=new)
    actions_before = len(fake.user_actions)
    await provider.deactivate(signer=new, credential_uuid=old_uuid)
    assert len(fake.user_actions) == actions_before  # the deactivate consumed its own token
    with pytest.raises(ProviderError) as info:
        await provider.prove(signer=old)
    assert info.value.retryable is False
    flags = {c.credential_uuid: c.is_active for c in await provider.list_credentials()}
    assert flags == {old_uuid: False, created.credential_uuid: True}
    await provider.activate(signer=new, credential_uuid=old_uuid)
    await provider.prove(signer=old)
    await provider.aclose()


@pytest.mark.anyio
async def test_provider_prove_has_no_side_effect(fake: FakeDfns) -> None:
    old_id, old_pem, _ = fake.seed()
    provider = DfnsKeyProvider(DfnsClient(BASE, TOKEN, transport=fake.transport()))
    before = {k: v.active for k, v in fake.credentials.items()}
    await provider.prove(signer=signing_key(old_id, old_pem))
    assert [r.url.path for r in fake.log] == ["/auth/action/init", "/auth/action"]
    assert {k: v.active for k, v in fake.credentials.items()} == before
    assert fake.signed == [] and fake.webhooks == {}
    await provider.aclose()


@pytest.mark.anyio
async def test_provider_rejects_unknown_path_and_bad_keys(fake: FakeDfns) -> None:
    old_id, old_pem, _ = fake.seed()
    provider = provider_for(BASE, TOKEN, transport=fake.transport())
    with pytest.raises(ProviderError, match="unknown registration path 'pats'") as info:
        await provider.register_key(
            signer=signing_key(old_id, old_pem),
            new_key=signing_key("x", gen_pem()),
            name="n",
            via="pats",
        )
    assert info.value.retryable is False
    with pytest.raises(ProviderError, match="not a readable PEM") as info:
        await provider.prove(signer=signing_key(old_id, b"garbage"))
    assert info.value.retryable is False
    assert fake.log == []
    assert "TOKEN" not in repr(provider) and TOKEN not in repr(provider)
    await provider.aclose()


# ------------------------------------------------------------------- property: bytes == payload


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(description=st.text(max_size=60), events=st.lists(st.text(min_size=1, max_size=12)))
def test_any_body_is_sent_exactly_as_signed(description: str, events: list[str]) -> None:
    fake = FakeDfns()
    cred_id, pem, _ = fake.seed()
    fake.webhooks["wh-1"] = {"id": "wh-1", "url": "u", "events": ["*"], "status": "Enabled"}

    async def run() -> None:
        async with client_for(fake, KeySigner.from_pem(cred_id, pem)) as client:
            updated = await client.update_webhook(
                "wh-1", description=description, events=events or ["*"]
            )
        assert updated.description == description

    anyio.run(run)
    init = json.loads(fake.log[0].content)
    method, path, sent, _ = fake.signed[-1]
    assert (method, path) == ("PUT", "/webhooks/wh-1")
    assert init["userActionPayload"].encode("utf-8") == sent
    assert json.loads(sent) == {"description": description, "events": events or ["*"]}
