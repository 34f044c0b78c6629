"""A policy's gates on rotations in flight, with worker processes against the sandbox:

- approval before_deactivate: the rotation waits in verified holding no lease ("awaiting
  approval" in `rotations list`, `--attention`, an event); `approve` completes it; `deny` rolls
  it back; `approval_timeout` halts it with the reason;
- a freeze that starts while a service-account and a webhook rotation are in flight: no old
  credential is deactivated and no old webhook deleted inside it; both finish after it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from harness import SA, WEBHOOK, Kt


def _policy(kt: Kt, names: list[str], policy: str, extra: str = "") -> None:
    text = kt.config.read_text()
    for name in names:
        head = f"[credentials.{name}]\n"
        assert text.count(head) == 1
        text = text.replace(head, f'{head}policy = "gated"\n')
    kt.config.write_text(text + f"\n[policies.gated]\n{policy}\n{extra}")


def _list(kt: Kt, *args: str) -> list[dict[str, object]]:
    return list(json.loads(kt.run("rotations", "list", "--json", *args).stdout))


def _active(kt: Kt, uuid: str) -> bool:
    return bool(kt.provider_credentials()[uuid]["isActive"])


def test_approval_before_deactivate(make_kt: Callable[..., Kt]) -> None:
    kt = make_kt()
    _policy(kt, [SA], 'approval = "before_deactivate"\napproval_timeout = "1h"')
    old_uuid = kt.bootstrap["service_account"]["credential_uuid"]

    # approve: waits in verified without a lease, then completes
    rid = kt.rotate(SA)
    assert kt.worker().returncode == 0  # idle: the only rotation waits for a human
    shown = kt.show(rid)
    assert shown["state"] == "verified"
    assert shown["lease"] is None  # no lease held while it waits
    assert shown["status"] == "awaiting_approval", shown
    assert "awaiting approval" in shown["status_text"]
    listed = {r["id"]: r for r in _list(kt, "--attention")}
    assert listed[rid]["attention"] == "awaiting approval"
    assert any(r["id"] == rid for r in _list(kt, "--status", "awaiting_approval"))
    waits = [e for e in shown["events"] if e["detail"].get("status") == "awaiting_approval"]
    assert len(waits) == 1, shown["events"]
    assert _active(kt, old_uuid)
    out = kt.run("rotations", "approve", rid, "--reason", "change 123 reviewed").stdout
    assert "approve applied" in out
    assert kt.worker().returncode == 0
    assert kt.show(rid)["state"] == "old_deactivated"
    assert not _active(kt, old_uuid)

    # deny: rolls back; the key the first rotation made stays the active one
    current = kt.credentials()
    sa_uuid = next(c["credential_uuid"] for c in current if c["name"] == SA)
    rid = kt.rotate(SA)
    kt.worker()
    assert kt.show(rid)["status"] == "awaiting_approval"
    refused = kt.run("rotations", "deny", "--reason", "", rid, check=False)
    assert refused.returncode == 1 and "keyturn: error:" in refused.stderr  # no reason: refused
    kt.run("rotations", "deny", rid, "--reason", "not during the audit")
    assert kt.worker().returncode == 0
    shown = kt.show(rid)
    assert shown["state"] == "rolled_back", shown["state"]
    assert _active(kt, sa_uuid)
    new_uuid = shown.get("new_credential_uuid")
    assert new_uuid and not _active(kt, str(new_uuid))

    # approve of a rotation that awaits nothing is refused with one line, nothing changes
    bad = kt.run("rotations", "approve", rid, "--reason", "x", check=False)
    assert bad.returncode == 1 and "the rotation is finished" in bad.stderr, bad.stderr
    assert bad.stderr.count("\n") == 1 and kt.show(rid)["state"] == "rolled_back"

    # timeout: halts with the reason
    kt.patch_config('approval_timeout = "1h"', 'approval_timeout = "3s"')
    rid = kt.rotate(SA)
    result = kt.worker()  # waits (its next check is the deadline), then halts
    assert result.returncode == 3, result.stderr
    shown = kt.show(rid)
    assert shown["state"] == "verified"
    assert "approval not given within approval_timeout 3s" in (shown["halted_reason"] or "")
    assert _active(kt, sa_uuid)


def test_a_freeze_holds_switching_off_in_flight(make_kt: Callable[..., Kt]) -> None:
    kt = make_kt(receiver=True)
    t0 = datetime.now(UTC).replace(microsecond=0)
    freeze_from, freeze_to = t0 + timedelta(hours=1), t0 + timedelta(hours=2)
    _policy(
        kt,
        [SA, WEBHOOK],
        'approval = "before_deactivate"',
        f"[schedule]\ntest_clock = true\n\n[[freeze]]\nfrom = {freeze_from.isoformat()}\n"
        f'to = {freeze_to.isoformat()}\nreason = "year-end freeze"\n',
    )
    kt.run("clock", "set", "--at", t0.isoformat(), "--scale", "1")
    old_sa = kt.bootstrap["service_account"]["credential_uuid"]
    old_hooks = set(kt.provider_webhooks())
    ids = [kt.rotate(SA), kt.rotate(WEBHOOK)]
    kt.worker()
    assert [kt.show(r)["status"] for r in ids] == ["awaiting_approval"] * 2
    # the freeze begins while both are in flight; they are approved inside it
    kt.run("clock", "set", "--at", (freeze_from + timedelta(minutes=5)).isoformat())
    for rid in ids:
        kt.run("rotations", "approve", rid, "--reason", "approved before the freeze ends")
    assert kt.worker().returncode == 0
    for rid in ids:
        shown = kt.show(rid)
        assert shown["state"] == "verified"
        assert shown["wait_key"] == "gate.freeze", shown["wait_key"]
        assert "year-end freeze" in shown["status_text"]
    assert _active(kt, old_sa)
    assert old_hooks <= set(kt.provider_webhooks())  # no old webhook deleted
    # after the freeze: both finish
    kt.run("clock", "set", "--at", (freeze_to + timedelta(minutes=1)).isoformat())
    assert kt.worker().returncode == 0
    assert [kt.show(r)["state"] for r in ids] == ["old_deactivated"] * 2
    assert not _active(kt, old_sa)
    assert not old_hooks & set(kt.provider_webhooks())


def test_bake_and_approval_before_start(make_kt: Callable[..., Kt]) -> None:
    kt = make_kt()
    _policy(kt, [SA], 'bake = "4s"\napproval = "before_start"\napproval_timeout = "1h"')
    old_uuid = kt.bootstrap["service_account"]["credential_uuid"]
    before = set(kt.provider_credentials())
    rid = kt.rotate(SA)
    assert kt.worker().returncode == 0
    shown = kt.show(rid)
    assert (shown["state"], shown["status"]) == ("pending", "awaiting_approval")
    assert set(kt.provider_credentials()) == before  # nothing was called before the approval
    kt.run("rotations", "approve", rid, "--reason", "go")
    # bake: the worker goes on past verified only after 4 s there, holding no lease meanwhile
    result = kt.worker()
    assert result.returncode == 0, result.stderr
    shown = kt.show(rid)
    assert shown["state"] == "old_deactivated"
    events = shown["events"]
    baked = [e for e in events if e["detail"].get("wait") == "gate.bake"]
    assert baked and "bake time: 4s in verified" in baked[0]["reason"], events
    verified_at = next(e["at"] for e in events if e.get("to") == "verified")
    done_at = next(e["at"] for e in events if e.get("to") == "old_deactivated")
    from datetime import datetime as dt

    assert dt.fromisoformat(done_at) - dt.fromisoformat(verified_at) >= timedelta(seconds=4)
    assert not _active(kt, old_uuid)
