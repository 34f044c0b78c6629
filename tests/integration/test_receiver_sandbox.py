"""The reference receiver behind real sandbox webhooks: every delivered event is accepted.

Both processes are real (the sandbox delivers over HTTP on loopback, signed with the secret it
generated); the receiver's secrets file is written by the real deploy target. The sandbox's
delivery log is compared with the receiver's accepted ids.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from keyturn.adapters.secrets_file import ReceiverStateProbe, WebhookSecretsFileTarget
from keyturn.receiver import ReceiverProcess, start_receiver
from keyturn.sandbox.testing import SandboxClient, SandboxProcess

UNUSED_URL = "http://127.0.0.1:9/not-yet"  # a webhook is created before its receiver runs


@pytest.fixture
def receivers() -> Iterator[list[ReceiverProcess]]:
    started: list[ReceiverProcess] = []
    yield started
    for process in started:
        process.close()


def create_webhook(client: SandboxClient, url: str, status: str) -> tuple[str, str]:
    """(webhook id, secret) of a new webhook for every event kind."""
    response = client.request(
        "POST",
        "/webhooks",
        {"url": url, "events": ["*"], "status": status, "description": "receiver test"},
        sign=True,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    return body["id"], body["secret"]


def update_webhook(client: SandboxClient, webhook_id: str, **fields: Any) -> None:
    response = client.request("PUT", f"/webhooks/{webhook_id}", fields, sign=True)
    assert response.status_code == 200, response.text


def settle(
    sandbox: SandboxProcess, receiver: ReceiverProcess, timeout: float = 15.0
) -> dict[str, Any]:
    """Stop the synthetic load and wait until every delivery in flight has landed."""
    sandbox.set_event_rate(0)
    deadline = time.monotonic() + timeout
    previous: tuple[int, int] | None = None
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        state = sandbox.state()
        sent = sum(s["delivered"] + s["failed"] for s in state["deliveries"].values())
        seen = receiver.state()
        counts = (sent, seen["accepted"] + seen["rejected"] + seen["duplicates"])
        if counts != previous:
            previous, stable_since = counts, time.monotonic()
        elif time.monotonic() - stable_since >= 0.6:
            return sandbox.state(events=True)
        time.sleep(0.1)
    raise AssertionError(f"deliveries did not settle: sandbox/receiver counts {previous}")


def wait_for_no_delivery_in_flight(
    sandbox: SandboxProcess, webhook_id: str, timeout: float = 15.0
) -> None:
    """Until every post to this webhook's receiver has been answered (its grace period)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sandbox.state()["deliveries"].get(webhook_id, {}).get("in_flight", 0) == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"the deliveries to webhook {webhook_id} still in flight after {timeout}s")


def start_with_webhook(
    sandbox: SandboxProcess, receivers: list[ReceiverProcess], secrets_path: Path
) -> tuple[SandboxClient, ReceiverProcess, WebhookSecretsFileTarget, str, str]:
    """An enabled webhook whose secret the running receiver holds, in the safe order:
    created disabled, secret deployed and confirmed loaded, then enabled."""
    client = sandbox.client("service_account")
    webhook_id, secret = create_webhook(client, UNUSED_URL, "Disabled")
    target = WebhookSecretsFileTarget("receiver-secrets", secrets_path)
    version = target.deploy([secret])
    receiver = start_receiver(secrets_path)
    receivers.append(receiver)
    ReceiverStateProbe("receiver", receiver.url).wait_for_version(version)
    update_webhook(client, webhook_id, url=receiver.url + "/dfns/events", status="Enabled")
    return client, receiver, target, webhook_id, secret


def test_every_event_the_sandbox_delivers_is_accepted(
    sandbox_factory: Callable[..., SandboxProcess],
    receivers: list[ReceiverProcess],
    tmp_path: Path,
) -> None:
    sandbox = sandbox_factory(event_rate=50)
    _, receiver, target, webhook_id, _ = start_with_webhook(
        sandbox, receivers, tmp_path / "secrets.json"
    )
    emitted_before = sandbox.state()["events_emitted"]
    began = time.monotonic()
    time.sleep(2.5)
    emitted = sandbox.state()["events_emitted"] - emitted_before
    rate = emitted / (time.monotonic() - began)
    state = settle(sandbox, receiver)

    stats = state["deliveries"][webhook_id]
    seen = receiver.state(ids=True)
    assert rate >= 40, f"the sandbox emitted only {rate:.0f} events/s"
    assert stats["failed"] == 0, stats["errors"]
    assert stats["delivered"] >= 100
    assert seen["rejected"] == 0, seen["rejections"]
    assert seen["duplicates"] == 0
    assert set(seen["accepted_ids"]) == set(stats["event_ids"])
    assert len(seen["accepted_ids"]) == stats["delivered"]
    assert state["events_dropped"] == 0
    assert seen["secrets_version"] == target.read_back()[0]


def test_two_webhooks_overlapping_during_a_secret_rotation_lose_no_event(
    sandbox_factory: Callable[..., SandboxProcess],
    receivers: list[ReceiverProcess],
    tmp_path: Path,
) -> None:
    """The webhook rotation's order, by hand, under 500 events/s: new webhook disabled, both
    secrets deployed and confirmed, new webhook enabled and pinged, old deleted, grace, new
    secret alone."""
    sandbox = sandbox_factory(event_rate=500)
    client, receiver, target, old_id, old_secret = start_with_webhook(
        sandbox, receivers, tmp_path / "secrets.json"
    )
    probe = ReceiverStateProbe("receiver", receiver.url)
    began = time.monotonic()
    emitted_before = sandbox.state()["events_emitted"]
    time.sleep(0.5)

    new_id, new_secret = create_webhook(client, receiver.url + "/dfns/events", "Disabled")
    probe.wait_for_version(target.deploy([old_secret, new_secret]))
    assert receiver.state()["secrets_count"] == 2
    update_webhook(client, new_id, status="Enabled")
    ping = client.request("POST", f"/webhooks/{new_id}/ping", {}, sign=True)
    assert ping.status_code == 200 and ping.json()["status"] == "200", ping.text
    time.sleep(1.0)  # both webhooks deliver

    overlap = sandbox.state()["deliveries"]
    assert overlap[old_id]["delivered"] > 0 and overlap[new_id]["delivered"] > 0

    response = client.request("DELETE", f"/webhooks/{old_id}", {}, sign=True)
    assert response.status_code == 200, response.text
    # grace: the old webhook's deliveries already in flight land before its secret goes
    wait_for_no_delivery_in_flight(sandbox, old_id)
    final_version = target.deploy([new_secret])
    probe.wait_for_version(final_version)
    time.sleep(1.0)
    emitted = sandbox.state()["events_emitted"] - emitted_before
    rate = emitted / (time.monotonic() - began)
    state = settle(sandbox, receiver)

    seen = receiver.state(ids=True)
    deliveries = state["deliveries"]
    assert rate >= 400, f"the sandbox emitted only {rate:.0f} events/s"
    assert deliveries[old_id]["failed"] == 0, deliveries[old_id]["errors"]
    assert deliveries[new_id]["failed"] == 0, deliveries[new_id]["errors"]
    assert seen["rejected"] == 0, seen["rejections"]
    sent_ids = set(deliveries[old_id]["event_ids"]) | set(deliveries[new_id]["event_ids"])
    assert set(seen["accepted_ids"]) == sent_ids
    assert len(sent_ids) == deliveries[old_id]["delivered"] + deliveries[new_id]["delivered"]
    assert seen["secrets_count"] == 1
    assert seen["secrets_version"] == final_version
    assert state["webhooks"] == 1
    assert state["events_dropped"] == 0
