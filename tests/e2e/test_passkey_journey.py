"""A user's passkey rotation as it really runs, in headless Chromium (Debian's `chromium`,
Playwright, the browser's own virtual authenticator): `keyturn passkeys campaign` starts it,
`keyturn serve --worker --user-port` runs it and serves the user pages on their own listener
(reached as http://old.localhost:PORT and http://new.localhost:PORT, two origins, each its own
rpId), the invitation reaches a mailer-shaped sink with its link, and the user's browser does
the rest against the sandbox over HTTP:

- same domain: open the link, sign in with the old passkey, prove the new one; the rotation
  reaches old_deactivated and the old passkey ends inactive at the sandbox, one new passkey;
- the domain move: register on new.localhost, the rotation waits in verified (the old passkey
  stays on) until `keyturn passkeys cutover`, whose new link (on the new origin) ends it;
- the campaign's progress as the CLI, /metrics and the dashboard say it;
- screenshots of each page the user sees, and the secret scan of every page, every sink
  payload, the outbox and the logs.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import Kt

CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).exists() or shutil.which("chromium") is None:
    if os.environ.get("CI"):
        raise RuntimeError(
            f"the passkey journey needs Debian's chromium at {CHROMIUM} "
            "(.ci/run installs it: apt-get install chromium)"
        )
    pytest.skip(f"no browser at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

from passkey_service import Journey, passkey_service, until  # noqa: E402
from passkey_ui import PasskeyPage, VirtualAuthenticator  # noqa: E402
from playwright.sync_api import Browser, sync_playwright  # noqa: E402

from keyturn.testing.secret_scan import scan_bytes  # noqa: E402


@pytest.fixture
def journey(make_kt: Callable[..., Kt], tmp_path: Path) -> Iterator[Journey]:
    with passkey_service(make_kt, tmp_path) as j:
        yield j


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        b = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--host-resolver-rules=MAP *.localhost 127.0.0.1"],
        )
        try:
            yield b
        finally:
            b.close()


def test_a_campaign_from_the_link_to_the_old_passkey_off_and_a_domain_move(
    journey: Journey, browser: Browser
) -> None:
    j, kt = journey, journey.kt
    users = [kt.sandbox.end_user(i) for i in range(3)]
    names = [u["username"] for u in users]
    assert "2 users invited" in j.campaign("spring", names[:2])
    pages: list[bytes] = []

    def context(width: int = 1000) -> tuple[Any, Any, VirtualAuthenticator]:
        ctx = browser.new_context(viewport={"width": width, "height": 800})
        ctx.set_default_timeout(20_000)
        page = ctx.new_page()
        page.on("response", lambda r: _keep(r, pages))
        return ctx, page, VirtualAuthenticator.attach(ctx, page)

    state = Path(str(kt.sandbox.authenticator_state))
    # user 0, same domain, at a phone's width: link, sign in, prove; nothing else to do
    ctx, page, device = context(390)
    try:
        device.import_passkey(state, users[0]["credential_id"])
        link = j.link_of(names[0])
        page.goto(link)
        ui = PasskeyPage(page).at("signin")
        page.screenshot(path=str(j.out / "1-signin-390.png"), full_page=True)
        ui.act("Sign in with your current passkey").at("prove")
        ui.act("Use your new passkey").at("done")
        page.screenshot(path=str(j.out / "2-done-390.png"), full_page=True)
        cookies = [c["value"] for c in ctx.cookies()]
    finally:
        ctx.close()
    until("user 0's rotation done", lambda: j.rotation(names[0])["state"] == "old_deactivated")
    creds = j.credentials(names[0])
    assert creds[users[0]["credential_uuid"]]["isActive"] is False
    ours = [c for c in creds.values() if c["name"] == f"keyturn {j.rotation(names[0])['id']}"]
    assert len(ours) == 1 and ours[0]["isActive"] and len(creds) == 2
    # the link of a finished rotation is refused, nothing changes
    ctx, page, _ = context()
    try:
        PasskeyPage(page).open_refused_link(j.old + "/passkey", link.rsplit("/", 1)[1])
    finally:
        ctx.close()

    # user 2: a domain move to new.localhost, then the cutover
    assert "moving from old.localhost to new.localhost" in j.campaign(
        "move", [names[2]], "--new-origin", j.new
    )
    # (one browser throughout: its authenticator keeps the new passkey for the last visit)
    ctx, page, device = context()
    try:
        device.import_passkey(state, users[2]["credential_id"])
        page.goto(j.link_of(names[2]))
        ui = PasskeyPage(page).at("move")
        ui.act("Sign in with your current passkey").on_move_page()
        page.screenshot(path=str(j.out / "3-new-origin.png"), full_page=True)
        ui.act("Register your new passkey").at("prove")
        ui.act("Use your new passkey").at("done-for-now")
        page.screenshot(path=str(j.out / "4-done-for-now.png"), full_page=True)
        waiting = until(
            "user 2 waits for the cutover",
            lambda: (
                (r := j.rotation(names[2]))["state"] == "verified"
                and r["wait_key"] == "forward.cutover"
                and r
            ),
        )
        assert "keyturn passkeys cutover" in waiting["wait_for"]
        assert j.credentials(names[2])[users[2]["credential_uuid"]]["isActive"] is True
        shown = kt.run("passkeys", "cutover", "move", "--reason", "new domain live").stdout
        assert "1 proven" in shown and "cutover recorded on 1" in shown
        deactivate = j.link_of(names[2], "deactivate")
        assert deactivate.startswith(j.new + "/passkey/l/")
        page.goto(deactivate)
        ui.at("deactivate")
        page.screenshot(path=str(j.out / "5-deactivate.png"), full_page=True)
        ui.act("Sign in with your new passkey").at("done")
        page.screenshot(path=str(j.out / "6-moved.png"), full_page=True)
        cookies += [c["value"] for c in ctx.cookies()]
    finally:
        ctx.close()
    until("user 2's rotation done", lambda: j.rotation(names[2])["state"] == "old_deactivated")
    moved = j.credentials(names[2])
    assert moved[users[2]["credential_uuid"]]["isActive"] is False
    [fresh] = [c for c in moved.values() if c["credentialUuid"] != users[2]["credential_uuid"]]
    assert fresh["isActive"] and fresh["relyingPartyId"] == "new.localhost"

    # progress: the CLI, /metrics and the dashboard say the same
    progress = json.loads(kt.run("passkeys", "progress", "--json").stdout)
    assert progress["spring"]["done"] == 1 and progress["spring"]["invited"] == 1
    assert progress["move"]["done"] == 1
    metrics = httpx.get(f"{j.api}/metrics", timeout=10).text
    assert 'keyturn_campaign_rotations{campaign="spring",progress="done"} 1.0' in metrics
    assert 'keyturn_campaign_rotations{campaign="spring",progress="invited"} 1.0' in metrics
    assert 'keyturn_campaign_rotations{campaign="move",progress="done"} 1.0' in metrics

    # no page, no sink payload, no log holds a link token, a session or a key
    secrets: dict[str, bytes | str] = {f"cookie {i}": c for i, c in enumerate(cookies)}
    for i, d in enumerate(j.invitations()):
        secrets[f"link token {i}"] = str(d["link"]).rsplit("/", 1)[1]
    for i, body in enumerate(pages):
        assert not scan_bytes(body, secrets), f"page {i}"
    assert not scan_bytes(j.serve_log.read_bytes(), secrets)
    assert not scan_bytes(Path(kt.workdir / "keyturn.db").read_bytes(), secrets)


def _keep(response: Any, pages: list[bytes]) -> None:
    if "text/html" in (response.headers.get("content-type") or ""):
        try:
            pages.append(response.body())
        except Exception:  # a redirect has no body
            return
