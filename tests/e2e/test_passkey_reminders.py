"""A passkey user who does not act, on the shared test clock (48,000 times real time) through
`keyturn serve --worker --user-port`: the invitation, reminders 7 days and 1 day before the
deadline (the first postponed by the one snooze the user took on the page; a second snooze is
refused there), the escalation to the owner's sink at the deadline, then the rotation left
overdue in the attention queue with the old passkey still active."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from harness import Kt
from passkey_driver import PageRefused, SoftwareBrowser
from passkey_service import passkey_service, until

DAY = 86400.0
SCALE = 48000.0
#: A waiting rotation's check on the schedule's clock (0.6 s real): the tolerance of a reminder.
CHECK = 8 * 3600.0


def test_reminders_a_snooze_and_the_escalation_then_overdue_with_the_old_passkey(
    make_kt: Callable[..., Kt], tmp_path: Path
) -> None:
    entry = f"""deadline_seconds = {10 * DAY:g}
remind_before_seconds = [{7 * DAY:g}, {DAY:g}]
remind_every_seconds = 0
snoozes = 1
snooze_seconds = {8 * 3600:g}
on_deadline = "report"
"""
    with passkey_service(
        make_kt, tmp_path, end_users=1, entry=entry, check_every=CHECK,
        config="""
[notifications.sinks.owner]
type = "http"
url = "{mail}/owner"
secret_file = "mail.key"
events = ["escalated"]

[schedule]
test_clock = true
""",
    ) as j:  # fmt: skip
        kt = j.kt
        user = kt.sandbox.end_user(0)
        name = user["username"]
        start = datetime.now(UTC).replace(microsecond=0)
        kt.run("clock", "set", "--at", start.isoformat(), "--scale", f"{SCALE:g}")
        j.campaign("lazy", [name])
        link = j.link_of(name)
        invite = j.invitations()[0]
        due = datetime.fromisoformat(invite["due"])
        assert abs((due - _at(invite)).total_seconds() - 10 * DAY) < CHECK
        # the user opens the link, snoozes once; a second snooze is refused on the page
        with SoftwareBrowser(j.old, kt.sandbox.authenticator()) as browser:
            assert browser.open(link) == "signin"
            browser.api("snooze", {})
            browser.task()
            with pytest.raises(PageRefused, match="snoozed 1 times, the most allowed"):
                browser.api("snooze", {})

        def reminders() -> list[dict[str, Any]]:
            got = [r.json() for r in j.mail.at("/mail")]
            return _distinct([d for d in got if d.get("kind") == "reminder"])

        first, second = until("two reminders", lambda: len(reminders()) >= 2 and reminders(), 60)
        assert first["link"] == link and second["link"] == link and first["to"] == name
        late = (_at(first) - (due - timedelta(days=7) + timedelta(hours=8))).total_seconds()
        assert 0 <= late <= CHECK, f"reminder 1 {late:.0f} s after its snoozed offset"
        late = (_at(second) - (due - timedelta(days=1))).total_seconds()
        assert 0 <= late <= CHECK, f"reminder 2 {late:.0f} s after its offset"

        escalated = until("the escalation", lambda: [r.json() for r in j.mail.at("/owner")], 60)[0]
        assert escalated["kind"] == "escalated" and escalated["to"] == name
        assert 0 <= (_at(escalated) - due).total_seconds() <= CHECK
        assert len(reminders()) == 2  # none after the deadline
        listed = until(
            "overdue in the attention queue",
            lambda: [
                r
                for r in json.loads(kt.run("rotations", "list", "--attention", "--json").stdout)
                if r["credential"].endswith(name)
            ],
        )
        assert listed[0]["attention"].startswith(f"overdue: {name} did not act by")
        progress = json.loads(kt.run("passkeys", "progress", "lazy", "--json").stdout)
        assert progress["lazy"]["overdue"] == 1
    # a user who never acts keeps the old passkey
    assert j.credentials(name)[user["credential_uuid"]]["isActive"] is True


def _at(doc: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(doc["at"])


def _distinct(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen, out = set(), []
    for d in docs:
        key = (d.get("rotation_id"), d.get("detail", {}).get("reminder"))
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out
