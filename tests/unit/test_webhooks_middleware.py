"""WebhookSignatureMiddleware in front of a real Starlette app (through httpx.ASGITransport)."""

from __future__ import annotations

import json
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from keyturn.webhooks import (
    SIGNATURE_HEADER,
    STATE_KEY,
    SecretsFile,
    SignatureError,
    Verified,
    WebhookSignatureMiddleware,
    render_secrets_document,
    sign,
)

OLD = "whs-" + "aa11" * 10
NEW = "whs-" + "bb22" * 10
WRONG = "whs-" + "cc33" * 10


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def body_for(event_id: str = "whe-1", *, sent: float | None = None, pad: str = "") -> bytes:
    event = {
        "id": event_id,
        "kind": "wallet.created",
        "date": "2027-01-01T00:00:00Z",
        "data": {"pad": pad},
        "status": "pending",
        "timestampSent": int(time.time()) if sent is None else sent,
        "deliveryAttempt": 1,
    }
    return json.dumps(event, separators=(",", ":")).encode()


class Seen:
    """What the app behind the middleware received."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.verified: list[Verified] = []
        self.lifespan_values: list[Any] = []
        self.rejected: list[tuple[str, str | None, str]] = []

    def on_reject(self, error: SignatureError, scope: MutableMapping[str, Any]) -> None:
        self.rejected.append((error.reason, error.event_id, scope["path"]))


def make_app(seen: Seen, secrets: Any, **kwargs: Any) -> Starlette:
    async def hook(request: Request) -> Response:
        seen.bodies.append(await request.body())
        seen.verified.append(request.state.webhook)
        seen.lifespan_values.append(getattr(request.state, "from_lifespan", None))
        return JSONResponse({"ok": True, "index": request.state.webhook.secret_index})

    async def health(request: Request) -> Response:
        return JSONResponse({"healthy": True})

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET", "POST"]),
            Route("/hooks/{name}", hook, methods=["POST"]),
        ],
        middleware=[
            Middleware(
                WebhookSignatureMiddleware,
                secrets=secrets,
                on_reject=seen.on_reject,
                **kwargs,
            )
        ],
    )


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://receiver")


async def post(
    client: httpx.AsyncClient, body: bytes, secret: str | None, path: str = "/hooks/a"
) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers[SIGNATURE_HEADER] = sign(secret, body)
    return await client.post(path, content=body, headers=headers)


@pytest.mark.anyio
async def test_verified_delivery_reaches_the_app_with_its_body_and_result() -> None:
    seen = Seen()
    async with client_for(make_app(seen, [OLD, NEW])) as client:
        body = body_for("whe-77")
        response = await post(client, body, NEW)
    assert response.status_code == 200
    assert response.json() == {"ok": True, "index": 1}
    assert seen.bodies == [body]  # replayed byte for byte
    assert seen.verified[0].event_id == "whe-77"
    assert seen.verified[0].secret_index == 1
    assert seen.rejected == []


@pytest.mark.parametrize(
    ("secret", "mutate", "reason"),
    [
        (WRONG, None, "bad_signature"),
        (OLD, "tamper", "bad_signature"),
        (None, None, "missing_header"),
        (OLD, "stale", "stale"),
    ],
)
@pytest.mark.anyio
async def test_rejections_answer_401_json_and_never_reach_the_app(
    secret: str | None, mutate: str | None, reason: str
) -> None:
    seen = Seen()
    body = body_for("whe-9", sent=time.time() - 301 if mutate == "stale" else None)
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers[SIGNATURE_HEADER] = sign(secret, body)
    if mutate == "tamper":
        body = body.replace(b"whe-9", b"whe-8")
    async with client_for(make_app(seen, [OLD])) as client:
        response = await client.post("/hooks/x", content=body, headers=headers)
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["reason"] == reason
    assert isinstance(error["message"], str) and "\n" not in error["message"]
    assert OLD not in response.text and WRONG not in response.text
    assert seen.bodies == []
    assert seen.rejected == [(reason, "whe-8" if mutate == "tamper" else "whe-9", "/hooks/x")]


@pytest.mark.anyio
async def test_malformed_header_is_401() -> None:
    seen = Seen()
    async with client_for(make_app(seen, [OLD])) as client:
        response = await client.post(
            "/hooks/a", content=body_for(), headers={SIGNATURE_HEADER: "sha256=nothex"}
        )
    assert response.status_code == 401
    assert response.json()["error"]["reason"] == "malformed_header"


@pytest.mark.anyio
async def test_no_secrets_is_401_with_its_reason() -> None:
    seen = Seen()
    async with client_for(make_app(seen, [])) as client:
        response = await post(client, body_for(), OLD)
    assert response.status_code == 401
    assert response.json()["error"]["reason"] == "no_secrets"


@pytest.mark.anyio
async def test_only_post_under_the_prefix_is_verified() -> None:
    seen = Seen()
    async with client_for(make_app(seen, [OLD], path_prefix="/hooks/")) as client:
        assert (await client.get("/health")).json() == {"healthy": True}
        assert (await client.post("/health")).json() == {"healthy": True}  # outside the prefix
        assert (await client.post("/hooks/a", content=body_for())).status_code == 401
    assert [r[0] for r in seen.rejected] == ["missing_header"]


@pytest.mark.anyio
async def test_an_oversized_body_is_refused_with_413() -> None:
    seen = Seen()
    async with client_for(make_app(seen, [OLD], max_body_bytes=1000)) as client:
        small = body_for()
        assert (await post(client, small, OLD)).status_code == 200
        big = body_for(pad="x" * 2000)
        response = await post(client, big, OLD)
    assert response.status_code == 413
    assert response.json()["error"]["reason"] == "body_too_large"
    assert len(seen.bodies) == 1


@pytest.mark.anyio
async def test_the_middleware_follows_a_secrets_file(tmp_path: Path) -> None:
    path = tmp_path / "secrets.json"

    def deploy(secrets: list[str]) -> None:
        _, content = render_secrets_document(secrets)
        tmp = tmp_path / "tmp"
        tmp.write_bytes(content)
        tmp.replace(path)

    deploy([OLD])
    seen = Seen()
    async with client_for(make_app(seen, SecretsFile(path))) as client:
        assert (await post(client, body_for("whe-1"), NEW)).status_code == 401
        deploy([OLD, NEW])
        assert (await post(client, body_for("whe-2"), NEW)).status_code == 200
        assert (await post(client, body_for("whe-3"), OLD)).status_code == 200
        deploy([NEW])
        assert (await post(client, body_for("whe-4"), OLD)).status_code == 401
        assert (await post(client, body_for("whe-5"), NEW)).status_code == 200
    assert [v.event_id for v in seen.verified] == ["whe-2", "whe-3", "whe-5"]
    assert [r[1] for r in seen.rejected] == ["whe-1", "whe-4"]


@pytest.mark.anyio
async def test_lifespan_state_is_kept_next_to_the_result() -> None:
    seen = Seen()
    app = make_app(seen, [OLD])

    async def server(scope: Any, receive: Any, send: Any) -> None:
        # as uvicorn does: each request scope carries a copy of the lifespan state
        scope["state"] = {"from_lifespan": "db-pool"}
        await app(scope, receive, send)

    body = body_for("whe-ls")
    async with client_for(server) as client:
        response = await post(client, body, OLD)
    assert response.status_code == 200
    assert seen.lifespan_values == ["db-pool"]
    assert seen.verified[0].event_id == "whe-ls"


@pytest.mark.anyio
async def test_a_body_in_several_chunks_is_joined_then_replayed() -> None:
    received: list[bytes] = []
    verified: list[Verified] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        received.append(message["body"])
        assert message["more_body"] is False
        verified.append(scope["state"][STATE_KEY])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    body = body_for("whe-chunks")
    pieces = [body[:10], body[10:25], body[25:]]
    messages = [
        {"type": "http.request", "body": piece, "more_body": index < 2}
        for index, piece in enumerate(pieces)
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    sent: list[dict[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "headers": [(b"x-dfns-webhook-signature", sign(NEW, body).encode())],
    }
    await WebhookSignatureMiddleware(app, [OLD, NEW])(scope, receive, send)
    assert received == [body]
    assert verified[0].event_id == "whe-chunks"
    assert verified[0].secret_index == 1
    assert sent[0]["status"] == 200
    assert "state" not in scope  # the caller's scope is not modified


@pytest.mark.anyio
async def test_a_client_that_disconnects_mid_body_gets_no_response() -> None:
    called: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        called.append(scope)

    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": b'{"id":', "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": []}
    await WebhookSignatureMiddleware(app, [OLD])(scope, receive, send)
    assert called == [] and sent == []
