"""Page objects of the dashboard (imported by test_dashboard.py as `dashboard_ui`): what a
person sees and does on each page, with Playwright's web-first assertions (expect(...) waits
and retries; nothing here sleeps)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from playwright.sync_api import Locator, Page, expect


@dataclass
class SignIn:
    page: Page
    base: str

    def open(self) -> SignIn:
        self.page.goto(f"{self.base}/ui/login")
        expect(self.page.get_by_role("heading", name="Sign in")).to_be_visible()
        return self

    def as_token(self, token: str) -> Overview:
        self.page.get_by_label("API token").fill(token)
        self.page.get_by_role("button", name="Sign in").click()
        overview = Overview(self.page, self.base)
        expect(overview.heading).to_be_visible()
        return overview


@dataclass
class Overview:
    page: Page
    base: str

    @property
    def heading(self) -> Locator:
        return self.page.get_by_role("heading", name="Overview", exact=True)

    def open(self) -> Overview:
        self.page.goto(f"{self.base}/ui/")
        expect(self.heading).to_be_visible()
        return self

    def attention_row(self, rotation_id: str) -> Locator:
        return self.page.locator(f'[data-testid="attention-row"][data-rotation="{rotation_id}"]')

    def open_attention(self, rotation_id: str) -> RotationPage:
        row = self.attention_row(rotation_id)
        expect(row).to_be_visible()
        row.get_by_role("link", name=rotation_id).click()
        return RotationPage(self.page, self.base).loaded(rotation_id)


@dataclass
class RotationPage:
    page: Page
    base: str

    def open(self, rotation_id: str) -> RotationPage:
        self.page.goto(f"{self.base}/ui/rotations/{rotation_id}")
        return self.loaded(rotation_id)

    def loaded(self, rotation_id: str) -> RotationPage:
        expect(self.page.get_by_role("heading", level=1)).to_contain_text(rotation_id)
        return self

    @property
    def state(self) -> Locator:
        return self.page.get_by_test_id("state")

    @property
    def halted_reason(self) -> Locator:
        return self.page.get_by_test_id("halted-reason")

    @property
    def flash(self) -> Locator:
        return self.page.get_by_test_id("flash")

    @property
    def timeline(self) -> Locator:
        return self.page.get_by_test_id("timeline")

    def verb_buttons(self) -> Locator:
        return self.page.locator('[data-testid^="verb-"]')

    def do(self, verb: str, reason: str) -> RotationPage:
        form = self.page.locator(f"form#verb-{verb}")
        form.get_by_label(re.compile("Reason")).fill(reason)
        form.get_by_role("button", name=verb.capitalize()).click()
        return self

    def plan_rollback(self) -> RollbackPage:
        self.page.get_by_test_id("verb-rollback").click()
        plan = RollbackPage(self.page, self.base)
        expect(plan.steps.first).to_be_visible()
        return plan


@dataclass
class RollbackPage:
    page: Page
    base: str

    def open(self, rotation_id: str) -> RollbackPage:
        self.page.goto(f"{self.base}/ui/rotations/{rotation_id}/rollback")
        expect(self.page.get_by_role("heading", level=1)).to_contain_text(rotation_id)
        return self

    @property
    def steps(self) -> Locator:
        return self.page.get_by_test_id("plan").locator(":scope > li")

    @property
    def revision(self) -> Locator:
        return self.page.get_by_test_id("plan-revision")

    @property
    def flash(self) -> Locator:
        return self.page.get_by_test_id("flash")

    def confirm(self, reason: str) -> None:
        self.page.get_by_label(re.compile("Reason")).fill(reason)
        self.page.get_by_test_id("confirm-rollback").click()


@dataclass
class CampaignsPage:
    """/ui/campaigns: each campaign's counts; one campaign's page lists its rotations."""

    page: Page
    base: str

    def open(self) -> CampaignsPage:
        self.page.goto(f"{self.base}/ui/campaigns")
        expect(self.page.get_by_role("heading", name="Campaigns", level=1)).to_be_visible()
        return self

    def from_nav(self) -> CampaignsPage:
        self.page.get_by_role("navigation", name="Pages").get_by_role(
            "link", name="Campaigns"
        ).click()
        expect(self.page.get_by_role("heading", name="Campaigns", level=1)).to_be_visible()
        return self

    def card(self, name: str) -> Locator:
        return self.page.locator(f'[data-testid="campaign"][data-campaign="{name}"]')

    def count(self, name: str, label: str) -> Locator:
        """The number on the campaign's tile for `label` (invited, done, overdue, ...)."""
        tile = f'[data-testid="campaign-count"][data-progress="{label}"] .n'
        return self.card(name).locator(tile)

    def open_campaign(self, name: str) -> CampaignsPage:
        self.card(name).get_by_role("link", name=name).click()
        expect(self.page.get_by_role("heading", level=1)).to_have_text(f"Campaign {name}")
        return self

    @property
    def rows(self) -> Locator:
        return self.page.get_by_test_id("campaign-row")

    def row(self, rotation_id: str) -> Locator:
        return self.rows.filter(has=self.page.get_by_role("link", name=rotation_id, exact=True))
