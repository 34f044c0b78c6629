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
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import KEYTURN, SA, Kt

CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).exists() or shutil.which("chromium") is None:
    if os.environ.get("CI"):
        raise RuntimeError(
            f"the passkey journey needs Debian's chromium at {CHROMIUM} "
            "(.ci/run installs it: apt-get install chromium)"
        )
    pytest.skip(f"no browser at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

from passkey_ui import PasskeyPage, VirtualAuthenticator  # noqa: E402
from playwright.sync_api import Browser, sync_playwright  # noqa: E402
from receivers import Receivers, start_receivers  # noqa: E402

from keyturn.testing.secret_scan import scan_bytes  # noqa: E402

ENTRY = "staff"
HOOK_KEY = "whk-journey-" + "7e" * 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def until(what: str, check: Callable[[], Any], seconds: float = 30.0) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {what}")
        time.sleep(0.1)


@dataclass
class Journey:
    kt: Kt
    mail: Receivers
    old: str
    new: str
    api: str
    token: str
    out: Path
    serve_log: Path

    def invitations(self, task: str | None = None) -> list[dict[str, Any]]:
        """What the users' mailer received: user_task notifications (a link each)."""
        docs = [r.json() for r in self.mail.at("/mail")]
        return [
            d
            for d in docs
            if d.get("kind") == "user_task" and task in (None, d.get("detail", {}).get("task"))
        ]

    def link_of(self, username: str, task: str = "enrol") -> str:
        try:
            found = until(
                f"the {task} link of {username}",
                lambda: [d for d in self.invitations(task) if d.get("to") == username],
            )
        except AssertionError:
            got = [{k: r.json().get(k) for k in ("kind", "to", "detail")} for r in self.mail.got]
            raise AssertionError(f"no {task} link for {username}; the mailer got {got}") from None
        link = str(found[-1]["link"])
        assert link.startswith((self.old, self.new)) and "/passkey/l/" in link
        return link

    def rotation(self, username: str) -> dict[str, Any]:
        listed = json.loads(self.kt.run("rotations", "list", "--json").stdout)
        [r] = [r for r in listed if r["credential"] == f"{ENTRY}:{username}"]
        return dict(r)

    def credentials(self, username: str) -> dict[str, dict[str, Any]]:
        token = self.kt.sandbox.delegated_login(username)
        r = httpx.get(
            f"{self.kt.sandbox.base_url}/auth/credentials",
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        r.raise_for_status()
        return {c["credentialUuid"]: c for c in r.json()["items"]}

    def campaign(self, name: str, users: list[str], *extra: str) -> str:
        listing = self.out / f"{name}.txt"
        listing.write_text("\n".join(users) + "\n")
        got = self.kt.run(
            "passkeys", "campaign", ENTRY, "--users", str(listing), "--reason", "yearly",
            "--name", name, *extra,
        )  # fmt: skip
        return got.stdout


@pytest.fixture
def journey(make_kt: Callable[..., Kt], tmp_path: Path) -> Iterator[Journey]:
    port = _free_port()
    old, new = f"http://old.localhost:{port}", f"http://new.localhost:{port}"
    kt = make_kt(
        end_users=3,
        extra_args=[
            *("--webauthn-origin", old, "--webauthn-origin", new),
            *("--webauthn-rp-id", "old.localhost", "--webauthn-rp-id", "new.localhost"),
        ],
    )
    mail = start_receivers()
    (kt.workdir / "mail.key").write_text(HOOK_KEY + "\n")
    (kt.workdir / "mail.key").chmod(0o600)
    kt.config.write_text(
        kt.config.read_text()
        + f"""
[credentials.{ENTRY}]
kind = "passkey"
provider = "sandbox"
signer = "{SA}"
origin = "{old}"
check_every_seconds = 0.3

[notifications]
poll_seconds = 0.2

[notifications.sinks.mailer]
type = "http"
url = "{mail.base}/mail"
secret_file = "mail.key"
events = ["user_task", "reminder"]

[serve]
metrics = "open"
"""
    )
    api_port = _free_port()
    log = tmp_path / "serve.log"
    out = tmp_path / "journey"
    out.mkdir()
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [*KEYTURN, "serve", "--worker", "--port", str(api_port), "--user-port", str(port)],
            env=kt.env(),
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        api = f"http://127.0.0.1:{api_port}"
        until("serve", lambda: _up(f"{api}/healthz"), 30)
        token = kt.run("tokens", "create", "--role", "viewer", "--name", "journey").stdout.strip()
        yield Journey(kt, mail, old, new, api, token, out, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        mail.server.shutdown()


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


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
