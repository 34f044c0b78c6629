"""The passkey user pages (keyturn.kinds.passkey.pages) in real headless Chromium (Debian's
`chromium`, Playwright with executable_path) with the browser's own virtual authenticator
(DevTools' WebAuthn domain), against a real sandbox over HTTP. The pages are served by uvicorn
on 127.0.0.1 and reached as http://old.localhost:PORT and http://new.localhost:PORT (two
origins, each its own rpId); the rotations are an in-memory PasskeyTasks (the engine is not
under test here). Each user's OLD passkey is imported into the virtual authenticator from the
sandbox's authenticator state file.

- direct: open the link, sign in, register, prove; the old passkey ends inactive, exactly one
  new passkey;
- the domain move: register on new.localhost through a code, prove; the old stays active until
  the cutover's "deactivate" link;
- refused: someone else's passkey, a superseded or reused link, an expired link, a snooze past
  the limit: refused with one sentence, nothing changed at the sandbox;
- a restarted server and a repeat visit after the registration do not register again;
- rollback; axe; and at the end of each test, the secret scan of every page and the log.

Each test stands alone (pytest-xdist may send them to different workers; each worker then
has its own sandbox, server and browser).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

CHROMIUM = "/usr/bin/chromium"

if not Path(CHROMIUM).exists() or shutil.which("chromium") is None:
    if os.environ.get("CI"):
        raise RuntimeError(
            f"the passkey pages' browser tests need Debian's chromium at {CHROMIUM} "
            "(.ci/run installs it: apt-get install chromium)"
        )
    pytest.skip(f"no browser at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

import uvicorn  # noqa: E402
from passkey_tasks_double import TasksDouble  # noqa: E402
from passkey_ui import PasskeyPage, VirtualAuthenticator  # noqa: E402
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright  # noqa: E402

from keyturn.kinds.passkey.pages import SESSION_COOKIE, user_app  # noqa: E402
from keyturn.kinds.passkey.tasks import (  # noqa: E402
    OLD_DEACTIVATED,
    PROVEN,
    REGISTERED,
    ROLLED_BACK,
    passkey_name,
)
from keyturn.plugin import ProviderAccess, SigningKey  # noqa: E402
from keyturn.sandbox.testing import SandboxProcess, start_sandbox  # noqa: E402
from keyturn.testing.authenticator import SoftwareAuthenticator  # noqa: E402
from keyturn.testing.secret_scan import describe, scan_bytes  # noqa: E402

pytestmark = pytest.mark.xdist_group("passkey_pages")


#: A delegated token (a JWT) or a sandbox user-action token, wherever one shows up.
TOKEN_SHAPES = re.compile(rb"eyJ[\w-]{8,}\.[\w-]{8,}\.[\w-]{8,}|ua-[\w-]{20,}")


class PagesServer:
    """The user pages in uvicorn on a thread, on a fixed port so that a restart (new app, no
    page sessions) keeps the origins."""

    def __init__(self, tasks: TasksDouble) -> None:
        self.tasks = tasks
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = int(probe.getsockname()[1])
        probe.close()
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None
        self.log_handler: logging.Handler | None = None

    def start(self) -> PagesServer:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        app = user_app(self.tasks, secure_cookies=False)
        # with uvicorn's access log on (keyturn serve turns it off): the link's token must
        # not reach it either
        config = uvicorn.Config(app, log_config=None, access_log=True, lifespan="off")
        access = logging.getLogger("uvicorn.access")
        if self.log_handler is not None and self.log_handler not in access.handlers:
            access.addHandler(self.log_handler)
        server = uvicorn.Server(config)
        self.server = server
        self.thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 15
        while not server.started:
            assert time.monotonic() < deadline, "the user pages did not start"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.server is not None and self.thread is not None:
            self.server.should_exit = True
            self.thread.join(timeout=15)
            self.server = None

    def restart(self) -> None:
        self.stop()
        self.start()


@dataclass
class Env:
    sandbox: SandboxProcess
    tasks: TasksDouble
    server: PagesServer
    browser: Browser
    old: str
    new: str
    out: Path
    log: Path
    state_file: Path
    pages: dict[str, bytes] = field(default_factory=dict)
    secrets: dict[str, bytes | str] = field(default_factory=dict)

    def context(self, width: int = 1000) -> tuple[BrowserContext, Page, VirtualAuthenticator]:
        ctx = self.browser.new_context(viewport={"width": width, "height": 800})
        ctx.set_default_timeout(20_000)
        page = ctx.new_page()
        page.on("response", self._keep)
        page.on("request", self._handed)
        page.on("console", lambda m: print(f"console {m.type}: {m.text}"))
        return ctx, page, VirtualAuthenticator.attach(ctx, page)

    def _keep(self, response: Any) -> None:
        """Every HTML page the browser got, and every code and hand-off token the server sent
        it (they must appear in no page and no log)."""
        kind = response.headers.get("content-type") or ""
        with contextlib.suppress(Exception):  # a redirect has no body to keep
            body = response.body()
            if "text/html" in kind:
                where = re.sub(r"/l/.*", "/l/…", response.url)
                self.pages[f"{len(self.pages)} {response.request.method} {where}"] = body

    def _handed(self, request: Any) -> None:
        """The code and hand-off token the new origin's page hands in (from the fragment)."""
        if request.url.endswith("/api/handoff") and request.post_data:
            for name, value in json.loads(request.post_data).items():
                if value:
                    self.secrets[f"fragment {name} {len(self.secrets)}"] = value

    def user(self, index: int) -> dict[str, Any]:
        return self.sandbox.end_user(index)

    def credentials(self, index: int) -> dict[str, dict[str, Any]]:
        """The user's credentials at the sandbox, by uuid."""
        token = self.sandbox.delegated_login(self.user(index)["username"])
        self.secrets[f"test's delegated token {len(self.secrets)}"] = token
        response = httpx.get(
            f"{self.sandbox.base_url}/auth/credentials",
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        response.raise_for_status()
        return {c["credentialUuid"]: c for c in response.json()["items"]}

    def link(self, rotation_id: str, index: int, **options: Any) -> str:
        token = self.tasks.add(rotation_id, self.user(index), origin=self.old, **options)
        self.secrets[f"link {rotation_id}"] = token
        return token

    def new_link(self, rotation_id: str, **changes: Any) -> str:
        token = self.tasks.new_link(rotation_id, **changes)
        self.secrets[f"link {rotation_id} {len(self.secrets)}"] = token
        return token

    def keep_cookies(self, ctx: BrowserContext) -> None:
        for cookie in ctx.cookies():
            if cookie["name"] == SESSION_COOKIE:
                self.secrets[f"session {len(self.secrets)}"] = cookie["value"]

    def assert_no_secrets(self) -> None:
        """No page the browser got so far, nor the pages' log (their own and uvicorn's access
        log), holds a link token, code, hand-off token, session cookie, delegated token or
        user-action token."""
        problems: list[str] = []
        for name, body in self.pages.items():
            found = scan_bytes(body, self.secrets)
            if found:
                problems.append(f"{name}: {describe(found)}")
            if TOKEN_SHAPES.search(body):
                problems.append(f"{name}: a token-shaped string")
        text = self.log.read_bytes()
        assert b"passkey rotation rot-" in text  # the log is the pages' own
        assert b'"GET /l/- HTTP/1.1" 200' in text  # and the server's access log, token hidden
        found = scan_bytes(text, self.secrets)
        if found:
            problems.append(f"server log: {describe(found)}")
        if TOKEN_SHAPES.search(text):
            problems.append("server log: a token-shaped string")
        assert not problems, problems

    def shot(self, page: Page, name: str) -> None:
        page.screenshot(path=str(self.out / f"{name}.png"), full_page=True)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("passkey-pages")
    holder = TasksDouble.__new__(TasksDouble)  # the access is known once the sandbox runs
    server = PagesServer(holder)
    old = f"http://old.localhost:{server.port}"
    new = f"http://new.localhost:{server.port}"
    sandbox = start_sandbox(
        base / "sandbox",
        end_users=7,
        extra_args=[
            *("--webauthn-origin", old, "--webauthn-origin", new),
            *("--webauthn-rp-id", "old.localhost", "--webauthn-rp-id", "new.localhost"),
        ],
    )
    log_path = base / "pages.log"
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    watched = [
        logging.getLogger(n)
        for n in ("keyturn", "uvicorn", "uvicorn.error", "uvicorn.access", "starlette")
    ]
    levels = [w.level for w in watched]
    server.log_handler = handler
    for w in watched:
        w.addHandler(handler)
        w.setLevel(logging.DEBUG)
    try:
        boot = sandbox.bootstrap["service_account"]
        access = ProviderAccess(
            credential="sa",
            provider="dfns",
            base_url=sandbox.base_url,
            token=boot["token"],
            timeout_seconds=10,
            key=SigningKey(boot["credential_id"], boot["private_key_pem"].encode()),
        )
        TasksDouble.__init__(holder, access)
        server.start()
        assert sandbox.authenticator_state is not None
        secrets: dict[str, bytes | str] = {
            "SA bearer": boot["token"],
            "SA private key": boot["private_key_pem"],
        }
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM,
                args=["--no-sandbox", "--host-resolver-rules=MAP *.localhost 127.0.0.1"],
            )
            try:
                out = base / "screenshots"
                out.mkdir()
                yield Env(
                    sandbox=sandbox,
                    tasks=holder,
                    server=server,
                    browser=browser,
                    old=old,
                    new=new,
                    out=out,
                    log=log_path,
                    state_file=Path(sandbox.authenticator_state),
                    secrets=secrets,
                )
            finally:
                browser.close()
    finally:
        server.stop()
        logging.getLogger("uvicorn.access").removeHandler(handler)
        for w, level in zip(watched, levels, strict=True):
            w.removeHandler(handler)
            w.setLevel(level)
        sandbox.stop()


def _critical_axe(page: Page) -> list[str]:
    from axe_playwright_python.sync_playwright import Axe

    return [v["id"] for v in Axe().run(page).response["violations"] if v["impact"] == "critical"]


def _named(creds: dict[str, dict[str, Any]], rotation_id: str) -> list[dict[str, Any]]:
    return [c for c in creds.values() if c["name"] == passkey_name(rotation_id)]


# ---------------------------------------------------------------------------- direct


def test_direct_enrolment_signs_in_registers_proves_and_deactivates(env: Env) -> None:
    user = env.user(0)
    token = env.link("rot-direct", 0)
    ctx, page, device = env.context()
    try:
        device.import_passkey(env.state_file, user["credential_id"])
        ui = PasskeyPage(page).open_link(env.old, token).at("signin")
        assert token not in page.url
        env.shot(page, "direct-1-signin")
        assert not _critical_axe(page)
        # one step: the old passkey signs in (a one-time code), the browser makes the new one
        ui.act("Sign in with your current passkey").at("prove")
        env.shot(page, "direct-2-prove")
        # the same device replaced the old passkey by the new one (same rpId and user): the
        # old one's last signature came first, so nobody is locked out
        assert [c["rpId"] for c in device.credentials()] == ["old.localhost"]
        ui.act("Use your new passkey").at("done")
        expect(ui.lead).to_contain_text("your old one is switched off")
        env.shot(page, "direct-3-done")
        assert not _critical_axe(page)
        env.keep_cookies(ctx)
    finally:
        ctx.close()
    creds = env.credentials(0)
    [new] = _named(creds, "rot-direct")
    assert new["isActive"] and new["kind"] == "Fido2"
    assert new["relyingPartyId"] == "old.localhost" and new["origin"] == env.old
    assert creds[user["credential_uuid"]]["isActive"] is False
    assert len(creds) == 2
    evidence = env.tasks.rotations["rot-direct"].evidence
    assert set(evidence) == {REGISTERED, PROVEN, OLD_DEACTIVATED}
    assert evidence[REGISTERED]["credential_uuid"] == new["credentialUuid"]
    assert evidence[PROVEN] == {"credential_id": new["credentialId"], "origin": env.old}
    env.assert_no_secrets()


# ----------------------------------------------------------------------- domain move


def test_domain_move_registers_on_the_new_origin_then_the_cutover_link_deactivates(
    env: Env,
) -> None:
    user = env.user(1)
    rid = "rot-move"
    token = env.link(rid, 1, new_origin=env.new, may_deactivate=False)
    ctx, page, device = env.context(390)
    try:
        device.import_passkey(env.state_file, user["credential_id"])
        ui = PasskeyPage(page).open_link(env.old, token).at("move")
        expect(ui.lead).to_contain_text("new.localhost")
        ui.act("Sign in with your current passkey").on_move_page()
        assert page.url == f"{env.new}/move"  # the fragment is gone from the address
        expect(ui.heading).to_contain_text("new.localhost")
        env.shot(page, "move-1-new-origin")
        assert not _critical_axe(page)
        ui.act("Register your new passkey").at("prove")
        assert page.url.startswith(env.new)
        ui.act("Use your new passkey").at("done-for-now")
        expect(ui.lead).to_contain_text("stays on until the move")
        env.shot(page, "move-2-done-for-now")
        env.keep_cookies(ctx)
        creds = env.credentials(1)
        [new] = _named(creds, rid)
        assert (new["relyingPartyId"], new["origin"], new["isActive"]) == (
            "new.localhost",
            env.new,
            True,
        )
        assert creds[user["credential_uuid"]]["isActive"] is True  # the old domain still works
        assert set(env.tasks.rotations[rid].evidence) == {REGISTERED, PROVEN}
        assert any(k.startswith("fragment c") for k in env.secrets)  # the code is scanned for

        # the cutover: the next link asks the user (on the new origin) to switch the old off
        env.tasks.change(rid, origin=env.new, new_origin=None)
        cutover = env.new_link(rid, task="deactivate", may_deactivate=True)
        ui.open_link(env.new, cutover).at("deactivate")
        ui.act("Sign in with your new passkey").at("done")
        expect(ui.lead).to_contain_text("Your old passkey is switched off")
        env.shot(page, "move-3-deactivated")
        env.keep_cookies(ctx)
    finally:
        ctx.close()
    creds = env.credentials(1)
    assert creds[user["credential_uuid"]]["isActive"] is False
    assert len(_named(creds, rid)) == 1 and len(creds) == 2
    assert OLD_DEACTIVATED in env.tasks.rotations[rid].evidence
    env.assert_no_secrets()


# ---------------------------------------------------------------------------- refused


def test_someone_elses_passkey_is_refused_before_it_reaches_the_provider(env: Env) -> None:
    victim, other = env.user(2), env.user(3)
    before = (env.credentials(2), env.credentials(3))
    token = env.link("rot-else", 2)
    ctx, page, device = env.context()
    try:
        device.import_passkey(env.state_file, other["credential_id"])  # only someone else's
        ui = PasskeyPage(page).open_link(env.old, token).at("signin")
        # the browser finds no passkey the page allows
        ui.act("Sign in with your current passkey")
        expect(ui.error).to_contain_text("Nothing was changed")
        ui.at("signin")
        env.shot(page, "refused-1-someone-else")
        # a hand-made assertion by the other user's passkey over the page's own challenge
        begun = ui.post("/api/begin", {"stage": "signin"})
        assert begun["status"] == 200
        options = begun["body"]["get"]
        assert [c["id"] for c in options["allowCredentials"]] == [victim["credential_id"]]
        challenge = base64.urlsafe_b64decode(options["challenge"] + "==").decode()
        device_sw = SoftwareAuthenticator.load(env.state_file)
        forged = device_sw.get_assertion(
            origin=env.old, challenge=challenge, credential_id=other["credential_id"]
        )
        answer = {
            "id": forged["credId"],
            "response": {
                "clientDataJSON": forged["clientData"],
                "authenticatorData": forged["authenticatorData"],
                "signature": forged["signature"],
                "userHandle": forged["userHandle"],
            },
        }
        refused = ui.post("/api/finish", {"stage": "signin", "credential": answer})
        assert refused["status"] == 403
        assert "not the one this step needs" in refused["body"]["error"]
        # the same with the victim's credential id claimed: the userHandle names another user
        answer["id"] = victim["credential_id"]
        ui.post("/api/begin", {"stage": "signin"})
        again = ui.post("/api/finish", {"stage": "signin", "credential": answer})
        assert again["status"] == 403
        # no CSRF token: refused
        assert ui.post("/api/begin", {"stage": "signin"}, csrf="")["status"] == 403
        page.reload()
        ui.at("signin")
        env.keep_cookies(ctx)
    finally:
        ctx.close()
    assert (env.credentials(2), env.credentials(3)) == before
    assert env.tasks.rotations["rot-else"].evidence == {}
    env.assert_no_secrets()


def test_superseded_reused_and_expired_links_are_refused_and_change_nothing(env: Env) -> None:
    before = env.credentials(4)
    first = env.link("rot-links", 4)
    ctx, page, _ = env.context()
    ctx2, page2, _ = env.context()
    try:
        ui = PasskeyPage(page).open_link(env.old, first).at("signin")
        # the same link opened again elsewhere ends the first page session
        other = PasskeyPage(page2).open_link(env.old, first).at("signin")
        refused = ui.post("/api/begin", {"stage": "signin"})
        assert refused["status"] == 403 and "expired" in refused["body"]["error"]
        page.reload()
        expect(ui.refused).to_contain_text("Open the link from your message again")
        # a newer link supersedes it: the old one and its page session are refused
        second = env.new_link("rot-links")
        PasskeyPage(page).open_refused_link(env.old, first)
        expect(ui.refused).to_contain_text("newer one")
        env.shot(page, "refused-2-superseded")
        stale = other.post("/api/begin", {"stage": "signin"})
        assert stale["status"] == 409 and "newer link" in stale["body"]["error"]
        # snoozes up to the limit, then the refusal's sentence
        ui.open_link(env.old, second).at("signin")
        ui.snooze().at("signin")
        expect(ui.notice).to_contain_text("remind you later")
        ui.snooze().at("signin")
        ui.snooze()
        expect(ui.error).to_contain_text("cannot be put off again")
        # the task changed under the page, or the rotation is no longer actionable
        env.tasks.change("rot-links", task="rollback")
        changed = ui.post("/api/begin", {"stage": "signin"})
        assert changed["status"] == 409, changed
        env.tasks.change("rot-links", task="enrol")
        ui.open_link(env.old, second).at("signin")
        env.tasks.change("rot-links", finished=True)
        finished = ui.post("/api/snooze", {})
        assert finished["status"] == 409 and "nothing left" in finished["body"]["error"]
        ui.open_refused_link(env.old, second)
        env.tasks.change("rot-links", finished=False)
        # an expired link
        env.tasks.change(
            "rot-links", expires_at=env.tasks.rotations["rot-links"].expires_at.replace(year=2000)
        )
        ui.open_refused_link(env.old, second)
        expect(ui.refused).to_contain_text("expired")
        env.shot(page, "refused-3-expired")
        assert not _critical_axe(page)
        # an unknown token
        ui.open_refused_link(env.old, "rot-links." + "x" * 43)
        env.keep_cookies(ctx)
        env.keep_cookies(ctx2)
    finally:
        ctx.close()
        ctx2.close()
    assert env.credentials(4) == before
    assert set(env.tasks.rotations["rot-links"].evidence) == {"snoozed:1", "snoozed:2"}
    env.assert_no_secrets()


# ------------------------------------------------------------------ restart, repeat


def test_a_restarted_server_or_a_repeat_visit_does_not_register_again(env: Env) -> None:
    user = env.user(5)
    rid = "rot-repeat"
    token = env.link(rid, 5)
    ctx, page, device = env.context()
    try:
        device.import_passkey(env.state_file, user["credential_id"], resident=False)
        ui = PasskeyPage(page).open_link(env.old, token).at("signin")
        ui.act("Sign in with your current passkey").at("prove")
        env.keep_cookies(ctx)
        # the server restarts: the page session is gone, the evidence is not
        env.server.restart()
        page.reload()
        expect(ui.refused).to_contain_text("Open the link from your message again")
        ui.open_link(env.old, token).at("prove")  # not asked to register again
        # REGISTERED lost (killed between the provider's answer and the record): the page
        # finds the passkey by its name and does not register another
        del env.tasks.rotations[rid].evidence[REGISTERED]
        ui.open_link(env.old, token).at("signin")
        ui.act("Sign in with your current passkey").at("prove")  # no prompt: found, recorded
        assert len(device.credentials()) == 2  # no second passkey was made in the browser
        ui.act("Use your new passkey").at("done")
        env.keep_cookies(ctx)
        # a visit after everything is done changes nothing
        ui.open_link(env.old, token).at("done")
    finally:
        ctx.close()
    creds = env.credentials(5)
    assert len(_named(creds, rid)) == 1 and len(creds) == 2
    assert creds[user["credential_uuid"]]["isActive"] is False
    env.assert_no_secrets()


def test_rollback_reactivates_the_old_passkey_and_deactivates_the_new(env: Env) -> None:
    user = env.user(6)
    rid = "rot-rollback"
    token = env.link(rid, 6)
    ctx, page, device = env.context()
    try:
        device.import_passkey(env.state_file, user["credential_id"], resident=False)
        ui = PasskeyPage(page).open_link(env.old, token).at("signin")
        ui.act("Sign in with your current passkey").at("prove")
        ui.act("Use your new passkey").at("done")
        new_uuid = env.tasks.rotations[rid].evidence[REGISTERED]["credential_uuid"]
        assert env.credentials(6)[user["credential_uuid"]]["isActive"] is False
        # the rollback link: the old passkey back on (signed by the new), the new one off
        # (signed by the old)
        env.tasks.change(rid, task="rollback")
        token = env.new_link(rid)
        ui.open_link(env.old, token).at("rollback")
        assert not _critical_axe(page)
        ui.act("Undo the passkey change").at("done")
        expect(ui.lead).to_contain_text("The change is undone")
        env.shot(page, "rollback-done")
        # a rollback with nothing left to undo (the evidence lost) is recorded all the same,
        # without asking for a passkey
        del env.tasks.rotations[rid].evidence[ROLLED_BACK]
        ui.open_link(env.old, token).at("rollback")
        ui.act("Undo the passkey change").at("done")
        env.keep_cookies(ctx)
    finally:
        ctx.close()
    creds = env.credentials(6)
    assert creds[user["credential_uuid"]]["isActive"] is True
    assert creds[new_uuid]["isActive"] is False
    assert ROLLED_BACK in env.tasks.rotations[rid].evidence
    env.assert_no_secrets()


# ------------------------------------------------------------------------ secret scan


def test_no_secret_in_any_page_or_the_server_log(env: Env) -> None:
    """Every HTML page the browser got in this module (on this worker) and the pages' log,
    once more at the end (each test also scans when it ends)."""
    assert env.pages and env.secrets
    env.assert_no_secrets()
