"""The synthetic event stream can be started, changed and stopped at run time."""

from __future__ import annotations

import time
from typing import Any

from keyturn.sandbox.testing import SandboxProcess


def test_event_rate_changes_at_run_time(sandbox: SandboxProcess, webhook_receiver: Any) -> None:
    with sandbox.client("service_account") as client:
        r = client.request(
            "POST", "/webhooks", {"url": webhook_receiver.url, "events": ["*"]}, sign=True
        )
        assert r.status_code == 200, r.text
    assert sandbox.set_event_rate(100) == 100
    time.sleep(1.5)
    assert sandbox.set_event_rate(0) == 0
    time.sleep(0.5)
    received = len(webhook_receiver.events())
    assert 80 <= received <= 220, received
    time.sleep(1.0)
    assert len(webhook_receiver.events()) == received  # stopped
    bad = sandbox.client("service_account")._http.put("/_sandbox/events/rate", json={"rate": -1})
    assert bad.status_code == 400 and "rate" in bad.json()["error"]["message"]
