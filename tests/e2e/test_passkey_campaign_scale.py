"""A passkey campaign over 200 users, all from real processes: `keyturn passkeys campaign`
invites them, `keyturn serve --worker --user-port` runs the rotations and serves the user
pages, 150 users complete through the pages' own HTTP protocol with the software
authenticator (passkey_driver.SoftwareBrowser, a few at a time), then the shared test clock
moves past the deadline so the other 50 are overdue.

At the deadline the entry says ``on_deadline = "report"``: a user who never acted is left
waiting with the old passkey active (keyturn cannot remove it), and `rotations list
--attention` says "overdue: USER did not act by ...", which is what the 50 are; "halt" would
list them as "halted" among every other halt, for a human to resume into the same wait.

What must agree: `keyturn passkeys progress --json` (done 150, overdue 50), /metrics
(keyturn_campaign_rotations), the store (`rotations list --json`: 150 old_deactivated, 50
unfinished; `--attention` exactly the 50), and the sandbox (the 150: the old passkey
inactive and one new passkey each; the 50: the old passkey active, nothing new). Each
phase's duration is printed (pytest -s shows it).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import Kt
from passkey_driver import SoftwareBrowser
from passkey_service import Journey, passkey_service, until

CHROMIUM = "/usr/bin/chromium"
USERS = 200
DONE = 150
DAY = 86400
DEADLINE = 14 * DAY
#: Users acting at once (each is one browser: a few HTTP round trips per step).
BROWSERS = 6
CAMPAIGN = "big"

# no reminder before the deadline (the reminder tests cover them); report at the deadline
ENTRY_LINES = f"""deadline_seconds = {DEADLINE}
remind_before_seconds = []
remind_every_seconds = 0
on_deadline = "report"
"""


@pytest.fixture
def big(make_kt: Callable[..., Kt], tmp_path: Path) -> Iterator[Journey]:
    # a high check interval: the pages' evidence wakes a rotation at once
    with passkey_service(
        make_kt,
        tmp_path,
        end_users=USERS,
        entry=ENTRY_LINES,
        config="\n[schedule]\ntest_clock = true\n",
        check_every=30,
    ) as j:
        yield j


class Phases:
    """Each phase's duration, and the requests the sandbox answered during it."""

    def __init__(self, sandbox: Any) -> None:
        self.sandbox = sandbox
        self.at = time.monotonic()
        self.requests = self._requests()
        self.took: dict[str, float] = {}

    def _requests(self) -> int:
        counts = self.sandbox.state()["requests"]
        return sum(sum(by_status.values()) for by_status in counts.values())

    def done(self, name: str) -> None:
        now, requests = time.monotonic(), self._requests()
        self.took[name] = now - self.at
        print(
            f"phase {name}: {self.took[name]:.1f} s, {requests - self.requests} sandbox requests",
            flush=True,
        )
        self.at, self.requests = time.monotonic(), requests


def _passkeys(j: Journey) -> dict[str, dict[str, Any]]:
    """The campaign's rotations by username."""
    listed = json.loads(j.kt.run("rotations", "list", "--json").stdout)
    return {r["credential"].split(":", 1)[1]: r for r in listed if r["kind"] == "passkey"}


def _links(j: Journey, names: list[str]) -> dict[str, str]:
    def got() -> dict[str, str] | None:
        links = {str(d["to"]): str(d["link"]) for d in j.invitations("enrol")}
        return links if set(names) <= set(links) else None

    links = until(f"{len(names)} invitations at the mailer", got, 60)
    assert all(link.startswith(j.old + "/passkey/l/") for link in links.values())
    return dict(links)


def test_a_campaign_of_200_users_150_done_50_overdue(big: Journey) -> None:
    j, kt = big, big.kt
    phases = Phases(kt.sandbox)
    users = [kt.sandbox.end_user(i) for i in range(USERS)]
    names = [u["username"] for u in users]
    acting, idle = names[:DONE], names[DONE:]

    started = j.campaign(CAMPAIGN, names)
    assert f"campaign {CAMPAIGN}: {USERS} users invited, 0 skipped" in started
    phases.done("campaign start (CLI)")
    links = _links(j, names)
    phases.done("200 invitations at the mailer")

    device = kt.sandbox.authenticator()
    device.path = None  # kept in memory: each save would rewrite every user's key

    def rotate(username: str) -> str:
        with SoftwareBrowser(j.old, device) as browser:
            return browser.run(links[username])

    with ThreadPoolExecutor(BROWSERS) as pool:
        stages = list(pool.map(rotate, acting))
    assert stages == ["done"] * DONE, stages
    phases.done(f"{DONE} users through the pages")
    until(
        f"{DONE} rotations old_deactivated",
        lambda: sum(r["state"] == "old_deactivated" for r in _passkeys(j).values()) == DONE,
        60,
    )
    phases.done(f"{DONE} rotations finished by the worker")

    # the deadline passes on the shared test clock; the worker's next check reports the 50
    past = datetime.now(UTC) + timedelta(seconds=DEADLINE + DAY)
    kt.run("clock", "set", "--at", past.isoformat(), "--scale", "1")

    def overdue() -> dict[str, dict[str, Any]] | None:
        rs = _passkeys(j)
        late = {u: r for u, r in rs.items() if (r["wait_key"] or "").endswith(":overdue")}
        return rs if len(late) == len(idle) else None

    rotations = until(f"{len(idle)} rotations overdue", overdue, 60)
    phases.done("the deadline passes (clock set, the worker's next checks)")

    # the store
    assert len(rotations) == USERS
    assert {u for u, r in rotations.items() if r["state"] == "old_deactivated"} == set(acting)
    for u in idle:
        r = rotations[u]
        assert r["state"] == "pending" and r["finished_at"] is None, r
        assert r["wait_for"].startswith(f"overdue: {u} did not act by "), r
    ids = {rotations[u]["id"] for u in idle}
    attention = json.loads(kt.run("rotations", "list", "--attention", "--json").stdout)
    assert {r["id"] for r in attention} == ids
    assert all(r["attention"].startswith("overdue: ") for r in attention)
    # the CLI's progress and /metrics
    progress = json.loads(kt.run("passkeys", "progress", "--json").stdout)
    expected = {"invited": 0, "registered": 0, "proven": 0, "done": DONE, "overdue": len(idle),
                "rolled_back": 0, "cancelled": 0}  # fmt: skip
    assert progress == {CAMPAIGN: expected}
    metrics = httpx.get(f"{j.api}/metrics", timeout=30).text
    for label, n in expected.items():
        line = f'keyturn_campaign_rotations{{campaign="{CAMPAIGN}",progress="{label}"}} {n:.1f}'
        assert line in metrics, line
    phases.done("progress, metrics, the store")

    # the sandbox: the 150 have their old passkey off and one new one; the 50 keep theirs
    old = {u["username"]: u["credential_uuid"] for u in users}

    def at_provider(username: str) -> str | None:
        creds = j.credentials(username)
        mine = creds.get(old[username])
        if mine is None:
            return "the old passkey is gone"
        if username in idle:
            return None if mine["isActive"] and len(creds) == 1 else f"{creds}"
        rid = rotations[username]["id"]
        new = [c for c in creds.values() if c["name"] == f"keyturn {rid}"]
        ok = not mine["isActive"] and len(new) == 1 and new[0]["isActive"] and len(creds) == 2
        return None if ok else f"{creds}"

    with ThreadPoolExecutor(BROWSERS) as pool:
        wrong = {u: w for u, w in zip(names, pool.map(at_provider, names), strict=True) if w}
    assert not wrong, dict(list(wrong.items())[:3])
    phases.done("the sandbox's passkeys of 200 users")
    _dashboard(j, rotations, idle)
    phases.done("the dashboard's campaigns page in Chromium")
    print("phases: " + json.dumps({k: round(v, 1) for k, v in phases.took.items()}))


def _dashboard(j: Journey, rotations: dict[str, dict[str, Any]], idle: list[str]) -> None:
    """A viewer opens /ui/campaigns from the menu, sees the counts, opens the campaign and its
    rotations; at 390 and 1,440 px: nothing wider than the window, no critical axe
    violation, screenshots in the test's output directory."""
    if not Path(CHROMIUM).exists() or shutil.which("chromium") is None:
        if os.environ.get("CI"):
            raise AssertionError(f"the campaigns page needs Debian's chromium at {CHROMIUM}")
        print(f"no browser at {CHROMIUM}: the campaigns page is not visited")
        return
    from dashboard_ui import CampaignsPage, SignIn
    from playwright.sync_api import expect, sync_playwright

    late = rotations[idle[0]]
    problems: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            for width in (390, 1440):
                ctx = browser.new_context(viewport={"width": width, "height": 900})
                ctx.set_default_timeout(20_000)
                page = ctx.new_page()
                try:
                    SignIn(page, j.api).open().as_token(j.token)
                    ui = CampaignsPage(page, j.api).from_nav()
                    expect(ui.count(CAMPAIGN, "done")).to_have_text(str(DONE))
                    expect(ui.count(CAMPAIGN, "overdue")).to_have_text(str(len(idle)))
                    expect(ui.count(CAMPAIGN, "invited")).to_have_text("0")
                    problems += _looked_at(page, j.out / f"campaigns-{width}.png", width)
                    ui.open_campaign(CAMPAIGN)
                    expect(ui.rows).to_have_count(USERS)
                    row = ui.row(late["id"])
                    expect(row).to_contain_text("overdue")
                    expect(row).to_contain_text(late["credential"])
                    expect(ui.rows.filter(has_text="done")).to_have_count(DONE)
                    problems += _looked_at(page, j.out / f"campaign-{width}.png", width)
                    row.get_by_role("link", name=late["id"]).click()
                    expect(page.get_by_role("heading", level=1)).to_contain_text(late["id"])
                    page.screenshot(path=str(j.out / f"campaign-rotation-{width}.png"))
                finally:
                    ctx.close()
        finally:
            browser.close()
    print(f"screenshots in {j.out}")
    assert not problems, problems


def _looked_at(page: Any, shot: Path, width: int) -> list[str]:
    """Screenshots (the whole page, and what one sees first); what overflows; at 1,440 px,
    what axe finds critical (as test_dashboard.py: axe over 200 rows is slow)."""
    from axe_playwright_python.sync_playwright import Axe

    page.screenshot(path=str(shot), full_page=True)
    page.screenshot(path=str(shot.with_name(shot.stem + "-top.png")))
    wide = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
    found = [f"{shot.stem}: {wide[0]}px wide in {wide[1]}px"] if wide[0] > wide[1] else []
    for v in Axe().run(page).response["violations"] if width == 1440 else []:
        if v["impact"] == "critical":
            found.append(f"{shot.stem}: axe {v['id']}: {v['help']}")
    return found
