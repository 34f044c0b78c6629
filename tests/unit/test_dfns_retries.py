"""Side-effect-free Dfns calls are retried inside the client; state-changing calls never are."""

from __future__ import annotations

from collections import Counter

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from keyturn.adapters.dfns.client import DfnsClient
from keyturn.adapters.dfns.errors import DfnsApiError
from keyturn.adapters.dfns.signing import KeySigner

TOKEN = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ0In0.sig"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _signer() -> KeySigner:
    pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return KeySigner.from_pem("cred-1", pem)


def flaky(fail_first: dict[str, int]) -> tuple[httpx.MockTransport, Counter[str]]:
    """A transport whose paths answer 500 the first N times, then succeed."""
    calls: Counter[str] = Counter()

    def handler(request: httpx.Request) -> httpx.Response:
        key = f"{request.method} {request.url.path}"
        calls[key] += 1
        if calls[key] <= fail_first.get(key, 0):
            return httpx.Response(500, json={"error": {"status": 500, "message": "boom"}})
        if request.url.path == "/auth/action/init":
            return httpx.Response(
                200,
                json={
                    "challenge": "c",
                    "challengeIdentifier": "ci",
                    "allowCredentials": {"key": [{"type": "public-key", "id": "cred-1"}]},
                },
            )
        if request.url.path == "/auth/action":
            return httpx.Response(200, json={"userAction": "ua"})
        if request.url.path == "/auth/credentials" and request.method == "GET":
            return httpx.Response(200, json={"items": []})
        return httpx.Response(200, json={"message": "success"})

    return httpx.MockTransport(handler), calls


@pytest.mark.anyio
async def test_reads_and_signing_are_retried() -> None:
    transport, calls = flaky({"POST /auth/action/init": 2, "GET /auth/credentials": 3})
    async with DfnsClient("http://dfns.test", TOKEN, signer=_signer(), transport=transport) as c:
        assert await c.list_credentials() == []
        await c.deactivate_credential("cr-1")
    assert calls["GET /auth/credentials"] == 4
    assert calls["POST /auth/action/init"] == 3
    assert calls["PUT /auth/credentials/deactivate"] == 1


@pytest.mark.anyio
async def test_state_changing_calls_are_not_retried() -> None:
    transport, calls = flaky({"PUT /auth/credentials/deactivate": 1})
    async with DfnsClient("http://dfns.test", TOKEN, signer=_signer(), transport=transport) as c:
        with pytest.raises(DfnsApiError) as info:
            await c.deactivate_credential("cr-1")
    assert info.value.retryable and info.value.outcome_unknown
    assert calls["PUT /auth/credentials/deactivate"] == 1


@pytest.mark.anyio
async def test_retries_are_bounded() -> None:
    transport, calls = flaky({"GET /auth/credentials": 100})
    async with DfnsClient("http://dfns.test", TOKEN, transport=transport, safe_retries=2) as client:
        with pytest.raises(DfnsApiError):
            await client.list_credentials()
    assert calls["GET /auth/credentials"] == 3


class LeaseGone(Exception):
    pass


@pytest.mark.anyio
async def test_fence_is_checked_before_every_request() -> None:
    """A caller whose fence trips (a worker that lost its lease) sends nothing more, not even
    the in-client retries or the remaining requests of a signed call."""
    transport, calls = flaky({})
    allowed = {"n": 2}

    def fence() -> None:
        if allowed["n"] <= 0:
            raise LeaseGone()
        allowed["n"] -= 1

    async with DfnsClient(
        "http://dfns.test", TOKEN, signer=_signer(), transport=transport, fence=fence
    ) as client:
        with pytest.raises(LeaseGone):
            await client.deactivate_credential("cr-1")  # init, action, then the call: 3 requests
    assert sum(calls.values()) == 2
    assert calls["PUT /auth/credentials/deactivate"] == 0
