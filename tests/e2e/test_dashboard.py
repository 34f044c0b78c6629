"""The on-call dashboard (/ui of `keyturn serve --worker`) in real headless Chromium (Debian's
`chromium`, driven by Playwright with executable_path), against a real sandbox and SQLite.

Two real halted rotations: a sandbox fault fails every deactivation of an old credential, so
the service account's and the PAT's rotations halt in `verified` with their retry budget
spent; the fault is then lifted, and one server (with its worker) and one browser serve the
whole module.

- an operator signs in, finds the halted rotation from the overview, reads why, resumes it
  with a reason and watches it reach old_deactivated without reloading;
- a rollback shows its plan; confirming after the rotation moved is refused with the new plan;
- a viewer sees no verb, and forged posts (no CSRF token; a viewer's session) are 403;
- every page: no critical axe-core violation, nothing wider than the window at 390 px and
  1,440 px (screenshots under the test's output directory), no secret in its HTML.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import KEYTURN, PAT, SA, Kt, KtFactory

from keyturn.adapters.store.migrate import open_store
from keyturn.cli.wiring import SystemClock
from keyturn.domain.model import Role
from keyturn.engine.access import create_token
from keyturn.testing.secret_scan import describe, scan_bytes

CHROMIUM = "/usr/bin/chromium"

if not Path(CHROMIUM).exists() or shutil.which("chromium") is None:
    if os.environ.get("CI"):
        raise RuntimeError(
            f"the dashboard's browser tests need Debian's chromium at {CHROMIUM} "
            "(.ci/run installs it: apt-get install chromium)"
        )
    pytest.skip(f"no browser at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

from dashboard_ui import Overview, RollbackPage, RotationPage, SignIn  # noqa: E402
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright  # noqa: E402

pytestmark = pytest.mark.xdist_group("dashboard")
#: The longest a web-first wait waits for a worker to move a rotation (ms).
MOVE_MS = 60_000
FAULT = {"error_rate": 1.0, "paths": ["PUT /auth/credentials/deactivate"]}


@dataclass
class Dash:
    kt: Kt
    base: str
    browser: Browser
    tokens: dict[str, str]
    halted: dict[str, str]
    secrets: dict[str, bytes | str]
    out: Path
    pages: dict[str, bytes] = field(default_factory=dict)

    def context(self, width: int = 1440, height: int = 900) -> BrowserContext:
        ctx = self.browser.new_context(viewport={"width": width, "height": height})
        ctx.set_default_timeout(15_000)
        return ctx

    def signed_in(self, who: str, width: int = 1440) -> tuple[BrowserContext, Page, Overview]:
        ctx = self.context(width)
        page = ctx.new_page()
        page.on("response", self._keep)
        overview = SignIn(page, self.base).open().as_token(self.tokens[who])
        return ctx, page, overview

    def _keep(self, response: Any) -> None:
        """Every HTML page the browser got, for the secret scan."""
        if "text/html" in (response.headers.get("content-type") or ""):
            with contextlib.suppress(Exception):  # a redirect has no body to keep
                self.pages[f"{response.request.method} {response.url}"] = response.body()


def _halt_two(kt: Kt) -> dict[str, str]:
    """The SA's and the PAT's rotations, halted in verified by a deactivation that fails."""
    kt.patch_config("max_attempts = 8", "max_attempts = 2")
    kt.sandbox.set_faults(**FAULT)
    ids = {"sa": kt.rotate_here(SA, reason="quarterly"), "pat": kt.rotate_here(PAT)}
    assert kt.worker().returncode == 3  # it left rotations halted
    kt.sandbox.clear_faults()
    for rid in ids.values():
        shown = kt.show_here(rid)
        assert shown["halted_reason"] and shown["state"] == "verified", shown
    return ids


@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dash]:
    base_dir = tmp_path_factory.mktemp("dash")
    factory = KtFactory(base_dir)
    try:
        kt = factory.make()
        halted = _halt_two(kt)
        store = open_store(kt.database_url)
        tokens = {
            who: create_token(store, SystemClock(), name=f"t-{who}", role=role, actor="t")[1]
            for who, role in (
                ("viewer", Role.VIEWER),
                ("operator", Role.OPERATOR),
                ("revoked", Role.OPERATOR),
            )
        }
        store.close()
        key, _ = kt.deployed(SA)
        secrets: dict[str, bytes | str] = {f"token {w}": t for w, t in tokens.items()}
        secrets.update(
            {
                "SA private key": key,
                "PAT private key": kt.deployed(PAT)[0],
                "SA bearer": kt.bootstrap["service_account"]["token"],
                "PAT bearer": kt.bootstrap["pat"]["token"],
            }
        )
        log = base_dir / "serve.log"
        proc = subprocess.Popen(
            [*KEYTURN, "serve", "--port", "0", "--worker"],
            env=kt.env(),
            stdout=subprocess.PIPE,
            stderr=log.open("w"),
            text=True,
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert "listening on http://" in line, f"{line!r} {log.read_text()}"
            base = line.split("listening on ", 1)[1].split()[0]
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                try:
                    out = base_dir / "screenshots"
                    out.mkdir()
                    yield Dash(kt, base, browser, tokens, halted, secrets, out)
                finally:
                    browser.close()
        finally:
            proc.terminate()
            assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        factory.close()


# ------------------------------------------------------------------------- overview


def _fits(page: Page) -> tuple[int, int]:
    """(the document's width, the window's): nothing overflows when the first is not wider."""
    wide = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
    return int(wide[0]), int(wide[1])


def test_the_overview_at_390_and_1440_px(dash: Dash) -> None:
    """The overview as on-call first sees it (two halted rotations in the queue), on a phone
    and on a desktop: screenshots saved, no horizontal overflow, no critical axe violation."""
    from axe_playwright_python.sync_playwright import Axe

    for width in (390, 1440):
        ctx, page, overview = dash.signed_in("operator", width)
        try:
            rows = page.get_by_test_id("attention-row")
            expect(rows).to_have_count(2)
            expect(page.get_by_test_id("count-verified-halted")).to_contain_text("2")
            document, window = _fits(page)
            assert document <= window, f"the overview is {document}px wide at {width}px"
            for rid in dash.halted.values():
                box = overview.attention_row(rid).bounding_box()
                assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width
            page.screenshot(path=str(dash.out / f"overview-attention-{width}.png"), full_page=True)
            critical = [
                v["id"] for v in Axe().run(page).response["violations"] if v["impact"] == "critical"
            ]
            assert not critical, critical
            # the operator is offered the one action that helps; a viewer is not (below)
            expect(rows.get_by_role("link", name="resume")).to_have_count(2)
        finally:
            ctx.close()
    ctx, page, _ = dash.signed_in("viewer")
    try:
        rows = page.get_by_test_id("attention-row")
        expect(rows).to_have_count(2)
        expect(rows.first).to_contain_text("fix the cause, then resume it")
        expect(rows.get_by_role("link", name="resume")).to_have_count(0)
    finally:
        ctx.close()


# --------------------------------------------------------------------------- resume


def test_operator_resumes_a_halted_rotation_and_watches_it_finish(dash: Dash) -> None:
    rid = dash.halted["sa"]
    ctx, page, overview = dash.signed_in("operator")
    try:
        expect(overview.attention_row(rid)).to_contain_text("halted")
        rotation = overview.open_attention(rid)
        expect(rotation.state).to_have_text("verified")
        expect(rotation.halted_reason).to_contain_text("retry budget")
        rotation.do("resume", "provider deactivation fixed")
        # applied at once, or (serve's own worker claimed it between the request and its
        # application) requested from that live holder
        expect(rotation.flash).to_contain_text(
            re.compile(r"resume applied|resume requested; the holder \(\S+\) carries it out at")
        )
        # from here on the page is not reloaded: a marker set now must survive to the end
        page.evaluate("window.__kt_marker = 'same page'")
        expect(rotation.state).to_have_text("old_deactivated", timeout=MOVE_MS)
        assert page.evaluate("window.__kt_marker") == "same page"
        expect(rotation.timeline).to_contain_text("provider deactivation fixed")
        expect(rotation.timeline).to_contain_text("t-operator")
        # the verbs shown follow the state: a finished rotation can only be rolled back
        expect(rotation.verb_buttons()).to_have_count(1)
        expect(rotation.verb_buttons()).to_have_attribute("data-testid", "verb-rollback")
    finally:
        ctx.close()
    assert dash.kt.show_here(rid)["state"] == "old_deactivated"


# -------------------------------------------------------------------------- rollback


def test_rollback_shows_its_plan_and_refuses_a_confirmation_after_a_move(dash: Dash) -> None:
    rid = dash.halted["pat"]
    ctx, page, _ = dash.signed_in("operator")
    try:
        plan = RotationPage(page, dash.base).open(rid).plan_rollback()
        shown = plan.revision.inner_text()
        assert plan.steps.count() >= 1
        # the rotation moves while the plan is on screen (another operator pauses it)
        dash.kt.run("rotations", "pause", rid, "--reason", "someone else looks at it")
        plan.confirm("roll back the PAT")
        expect(plan.flash).to_contain_text("moved since the page you acted on")
        expect(plan.revision).not_to_have_text(shown)
        expect(plan.steps.first).to_be_visible()  # the new plan, from the planner
        page.screenshot(path=str(dash.out / "rollback-moved-1440.png"), full_page=True)
        events = [e["trigger"] for e in dash.kt.show_here(rid)["events"]]
        assert "rollback" not in events  # nothing was done
        # confirming the plan as it is now is carried out
        plan.confirm("roll back the PAT, as planned now")
        rotation = RotationPage(page, dash.base).loaded(rid)
        expect(rotation.flash).to_contain_text("rollback")
        expect(rotation.timeline).to_contain_text("roll back the PAT, as planned now")
        expect(rotation.state).to_have_text("rolled_back", timeout=MOVE_MS)
    finally:
        ctx.close()


# ---------------------------------------------------------------------- roles, CSRF


def test_a_viewer_sees_no_verb_and_forged_posts_get_403(dash: Dash) -> None:
    rid = dash.halted["pat"]
    ctx, page, _ = dash.signed_in("viewer")
    try:
        rotation = RotationPage(page, dash.base).open(rid)
        expect(page.get_by_test_id("read-only")).to_be_visible()
        expect(rotation.verb_buttons()).to_have_count(0)
        expect(page.locator("main form")).to_have_count(0)
        RollbackPage(page, dash.base).open(rid)
        expect(page.get_by_test_id("confirm-rollback")).to_have_count(0)
        viewer_cookies = {c["name"]: c for c in ctx.cookies()}
        viewer_csrf = page.locator('input[name="csrf"]').first.get_attribute("value")
    finally:
        ctx.close()
    session = viewer_cookies["keyturn_session"]
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    assert session["expires"] > 0  # a session that ends
    assert session["value"] not in dash.tokens.values()

    op_ctx, op_page, _ = dash.signed_in("operator")
    try:
        op_cookie = {c["name"]: c["value"] for c in op_ctx.cookies()}["keyturn_session"]
        RotationPage(op_page, dash.base).open(rid)
        # release-lease is the admin's (as in the API): an operator is offered no such form
        expect(op_page.locator("#verb-release-lease")).to_have_count(0)
        op_csrf = op_page.locator('input[name="csrf"]').first.get_attribute("value")
    finally:
        op_ctx.close()
    before = len(dash.kt.show_here(rid)["events"])
    url = f"{dash.base}/ui/rotations/{rid}/resume"
    form = {"reason": "forged", "revision": "x"}
    forged = [
        ("no session", {}, {**form, "csrf": viewer_csrf}),
        ("operator, no CSRF token", {"keyturn_session": op_cookie}, form),
        ("operator, a wrong CSRF token", {"keyturn_session": op_cookie}, {**form, "csrf": "x"}),
        ("viewer, its own CSRF token", {"keyturn_session": session["value"]},
         {**form, "csrf": viewer_csrf}),
    ]  # fmt: skip
    release = f"{dash.base}/ui/rotations/{rid}/release-lease"
    forged += [("operator, release-lease (admin only)", {"keyturn_session": op_cookie},
                {**form, "csrf": op_csrf}, release)]  # fmt: skip
    for label, cookies, data, *where in forged:
        r = httpx.post(where[0] if where else url, cookies=cookies, data=data, timeout=10)
        assert r.status_code == 403, f"{label}: {r.status_code} {r.text[:200]}"
        assert "text/html" in r.headers["content-type"]
    assert len(dash.kt.show_here(rid)["events"]) == before
    # the sign-in form checks its own token too
    r = httpx.post(f"{dash.base}/ui/login", data={"token": dash.tokens["operator"]}, timeout=10)
    assert r.status_code == 403


def test_a_bad_token_is_refused_and_pages_need_a_session(dash: Dash) -> None:
    ctx = dash.context()
    page = ctx.new_page()
    try:
        page.goto(f"{dash.base}/ui/rotations/{dash.halted['sa']}")
        expect(page.get_by_role("heading", name="Sign in")).to_be_visible()  # redirected
        SignIn(page, dash.base).open()
        page.get_by_label("API token").fill("kt_" + "x" * 43)
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_test_id("login-error")).to_contain_text("unknown or revoked")
    finally:
        ctx.close()


def test_a_revoked_token_ends_its_sessions(dash: Dash) -> None:
    ctx, page, _ = dash.signed_in("revoked")
    try:
        dash.kt.run("tokens", "revoke", "t-revoked")
        page.reload()
        expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    finally:
        ctx.close()


def test_rotations_list_filters_and_pages(dash: Dash) -> None:
    ctx, page, _ = dash.signed_in("viewer")
    try:
        page.goto(f"{dash.base}/ui/rotations?limit=1")
        rows = page.get_by_test_id("rotation-row")
        expect(rows).to_have_count(1)
        seen = [rows.first.get_attribute("data-rotation")]
        while page.get_by_test_id("next-page").count():
            page.get_by_test_id("next-page").click()
            expect(rows).to_have_count(1)
            expect(rows.first).not_to_have_attribute("data-rotation", seen[-1])
            seen.append(rows.first.get_attribute("data-rotation"))
        assert sorted(seen) == sorted(dash.halted.values())  # every rotation, once
        page.goto(f"{dash.base}/ui/rotations")
        page.get_by_label("Credential").fill(PAT)
        page.get_by_role("button", name="Filter").click()
        expect(rows).to_have_count(1)
        expect(rows.first).to_have_attribute("data-rotation", dash.halted["pat"])
        page.get_by_label("State").select_option("cancelled")
        page.get_by_role("button", name="Filter").click()
        expect(page.get_by_test_id("no-rotations")).to_be_visible()
        page.goto(f"{dash.base}/ui/rotations?state=nope")
        expect(page.get_by_role("alert")).to_contain_text("'nope' is not a state")
    finally:
        ctx.close()


def test_credentials_and_workers_pages(dash: Dash) -> None:
    ctx, page, _ = dash.signed_in("viewer")
    try:
        page.goto(f"{dash.base}/ui/credentials")
        sa = page.locator(f"#cred-{SA}")
        expect(sa).to_contain_text("local-files (file)")
        expect(sa).to_contain_text("none (rotated by hand)")
        expect(sa).to_contain_text("UTC")
        page.goto(f"{dash.base}/ui/workers")
        rows = page.get_by_test_id("worker-row")
        expect(rows).to_have_count(2)  # the --until-idle worker that halted them, and serve's
        expect(rows.filter(has_text="stopped")).to_have_count(1)
        live = rows.filter(has_text="live")
        expect(live).to_have_count(1)  # the worker of keyturn serve --worker
        expect(live).to_contain_text("ago")
    finally:
        ctx.close()


# ------------------------------------------------------- every page: a11y, widths, secrets


def _every_page(dash: Dash) -> list[tuple[str, str]]:
    sa, pat = dash.halted["sa"], dash.halted["pat"]
    return [
        ("overview", "/ui/"),
        ("rotations", "/ui/rotations"),
        ("rotations-filtered", f"/ui/rotations?credential={SA}&state=old_deactivated"),
        ("rotation", f"/ui/rotations/{sa}"),
        ("rotation-2", f"/ui/rotations/{pat}"),
        ("rollback", f"/ui/rotations/{pat}/rollback"),
        ("credentials", "/ui/credentials"),
        ("workers", "/ui/workers"),
    ]


def test_every_page_is_accessible_fits_390_and_1440_and_holds_no_secret(dash: Dash) -> None:
    from axe_playwright_python.sync_playwright import Axe

    axe = Axe()
    problems: list[str] = []
    errors: list[str] = []
    for width in (390, 1440):
        ctx, page, _ = dash.signed_in("operator", width)
        # a script or style the Content-Security-Policy blocked, or a script error, shows here
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            for name, path in [("login", "/ui/login"), *_every_page(dash)]:
                page.goto(dash.base + path)
                expect(page.locator("main h1")).to_be_visible()
                document, window = _fits(page)
                if document > window:
                    problems.append(f"{name} at {width}px: {document}px wide in {window}px")
                shot = dash.out / f"{name}-{width}.png"
                page.screenshot(path=str(shot), full_page=True)
                page.screenshot(path=str(dash.out / f"{name}-{width}-top.png"))  # what one sees
                if width == 1440 or name == "overview":
                    results = axe.run(page)
                    for v in results.response["violations"]:
                        if v["impact"] == "critical":
                            problems.append(f"{name}: axe {v['id']}: {v['help']}")
        finally:
            ctx.close()
    assert not problems, "\n".join(problems)
    assert not errors, errors
    print(f"screenshots in {dash.out}")
    assert (dash.out / "overview-390.png").stat().st_size > 0
    scanned = {label.split(" ", 1)[1].removeprefix(dash.base) for label in dash.pages}
    assert {path for _, path in _every_page(dash)} <= scanned, scanned
    for label, html in dash.pages.items():
        findings = scan_bytes(html, dash.secrets)
        assert not findings, f"{label}: {describe(findings)}"
