"""Webhook delivery: real HTTP POSTs to a receiver started by the test, signed, retried."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

from keyturn.sandbox.testing import SandboxClient, SandboxProcess


def create_webhook(client: SandboxClient, url: str, **fields: Any) -> dict[str, Any]:
    response = client.request(
        "POST", "/webhooks", {"url": url, "events": ["*"], **fields}, sign=True
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(headers["x-dfns-webhook-signature"], expected)


def test_events_at_rate_are_signed_with_the_secret(
    sandbox_factory: Callable[..., SandboxProcess], webhook_receiver: Any
) -> None:
    sandbox = sandbox_factory(event_rate=300)
    client = sandbox.client()
    webhook = create_webhook(client, webhook_receiver.url)
    received_at_start = len(webhook_receiver.events())
    time.sleep(2.0)
    received = webhook_receiver.events()
    rate = (len(received) - received_at_start) / 2.0
    assert rate >= 200, f"only {rate:.0f} events/s delivered"
    now = time.time()
    ids = set()
    for headers, body in received:
        assert verify(webhook["secret"], headers, body)
        event = json.loads(body)
        assert event["id"].startswith("whe-")
        assert event["kind"] == "wallet.blockchainevent.detected"
        assert event["deliveryAttempt"] == 1
        assert abs(now - event["timestampSent"]) < 300
        assert set(event) >= {"id", "kind", "date", "data", "status", "timestampSent"}
        ids.add(event["id"])
    assert len(ids) == len(received), "every delivery has its own event id"
    state = sandbox.state(events=True)
    stats = state["deliveries"][webhook["id"]]
    assert stats["failed"] == 0
    assert stats["delivered"] >= len(received)
    assert ids <= set(stats["event_ids"])
    assert state["events_emitted"] >= 400


def test_failed_deliveries_are_retried_with_new_ids(
    sandbox_factory: Callable[..., SandboxProcess], webhook_receiver: Any
) -> None:
    # time scale 600: retries at +0.1 s, +1.2 s, +12 s, ...
    sandbox = sandbox_factory(time_scale=600)
    client = sandbox.client()
    webhook = create_webhook(client, webhook_receiver.url)
    webhook_receiver.status_code = 500
    assert sandbox.emit("wallet.created", {"walletId": "wa-1"}) == 1
    wait_for(lambda: len(webhook_receiver.events()) >= 3, timeout=5)
    events = [json.loads(body) for _, body in webhook_receiver.events()]
    first, second, third = events[:3]
    assert [e["deliveryAttempt"] for e in (first, second, third)] == [1, 2, 3]
    assert "retryOf" not in first
    assert second["retryOf"] == first["id"] and third["retryOf"] == first["id"]
    assert len({first["id"], second["id"], third["id"]}) == 3
    assert first["data"] == second["data"] == {"walletId": "wa-1"}

    listed = client.request("GET", f"/webhooks/{webhook['id']}/events").json()["items"]
    assert [e["id"] for e in listed][:3] == [first["id"], second["id"], third["id"]]
    assert all(e["deliveryFailed"] and e["status"] == "500" for e in listed)
    one = client.request("GET", f"/webhooks/{webhook['id']}/events/{second['id']}").json()
    assert one["retryOf"] == first["id"]
    failed_only = client.request(
        "GET", f"/webhooks/{webhook['id']}/events?deliveryFailed=false"
    ).json()
    assert failed_only["items"] == []


def test_unreachable_receiver_is_recorded_as_an_error(sandbox: SandboxProcess) -> None:
    client = sandbox.client()
    webhook = create_webhook(client, "http://127.0.0.1:9/closed-port")
    ping = client.request("POST", f"/webhooks/{webhook['id']}/ping", sign=True).json()
    assert ping["status"] == ""
    assert ping["error"]
    stats = sandbox.state()["deliveries"][webhook["id"]]
    assert (stats["delivered"], stats["failed"], stats["in_flight"]) == (0, 1, 0)
    assert len(stats["errors"]) == 1 and "ConnectError" in stats["errors"][0], stats["errors"]


def test_disabled_and_unsubscribed_webhooks_get_nothing(
    sandbox: SandboxProcess, webhook_receiver: Any
) -> None:
    client = sandbox.client()
    disabled = create_webhook(client, webhook_receiver.url, status="Disabled")
    other_kind = create_webhook(client, webhook_receiver.url + "?k", events=["key.created"])
    assert sandbox.emit("wallet.created") == 0
    enabled = client.request(
        "PUT", f"/webhooks/{disabled['id']}", {"status": "Enabled"}, sign=True
    ).json()
    assert enabled["status"] == "Enabled"
    assert sandbox.emit("wallet.created") == 1
    assert sandbox.emit("key.created") == 2
    wait_for(lambda: len(webhook_receiver.events()) == 3)
    assert other_kind["events"] == ["key.created"]


def test_sixth_webhook_is_refused_naming_the_limit(sandbox: SandboxProcess) -> None:
    client = sandbox.client()
    for n in range(5):
        create_webhook(client, f"http://127.0.0.1:9/{n}")
    response = client.request(
        "POST", "/webhooks", {"url": "http://127.0.0.1:9/6", "events": ["*"]}, sign=True
    )
    assert response.status_code == 400
    assert "maximum of 5 webhooks" in response.json()["error"]["message"]
    listed = client.request("GET", "/webhooks?limit=2").json()
    assert len(listed["items"]) == 2 and listed["nextPageToken"]
    assert all("secret" not in w for w in listed["items"])


def test_webhook_validation_errors(sandbox: SandboxProcess) -> None:
    client = sandbox.client()
    for body, message in (
        ({"url": "ftp://x", "events": ["*"]}, "url must be"),
        ({"url": "http://x", "events": []}, "events must be"),
        ({"events": ["*"]}, "missing required field 'url'"),
        ({"url": "http://x", "events": ["*"], "status": "On"}, "status must be"),
    ):
        response = client.request("POST", "/webhooks", body, sign=True)
        assert response.status_code == 400
        assert message in response.json()["error"]["message"]
    assert client.request("GET", "/webhooks/wh-missing").status_code == 404


def test_synthetic_load_reaches_every_enabled_webhook_in_a_kind_it_wants(
    sandbox_factory: Callable[..., SandboxProcess], webhook_receiver: Any
) -> None:
    sandbox = sandbox_factory(event_rate=50)
    client = sandbox.client()
    create_webhook(client, webhook_receiver.url, events=["key.created"])
    wait_for(lambda: len(webhook_receiver.events()) >= 20, timeout=5)
    kinds = {json.loads(body)["kind"] for _, body in webhook_receiver.events()}
    assert kinds == {"key.created"}
